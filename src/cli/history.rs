//! `kubectl agentgate history JOB` and `kubectl agentgate rerun JOB [--generation N] [--name NEW]`.
//!
//! The history is the job's `status.history` (written by the operator, domain/history.rs); the
//! spec of each generation is read from the job's ControllerRevision for it and trusted only if
//! it is owned by the job and has the digest the history recorded. A rerun is a new job: a new
//! uid, so no vote on the old one counts for it (votes are per job uid and generation,
//! domain/tally.rs), and it needs its own approvals.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ControllerRevision;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use super::{Emit, create_or_print};
use crate::api::{AgentJob, AgentJobSpec, GenerationRecord, TEMPLATE_LABEL};
use crate::domain::digest::short;
use crate::domain::history::{JOB_UID_LABEL, RERUN_OF_ANNOTATION, RERUN_OF_LABEL, SPEC_DIGEST_ANNOTATION, revision_name, spec_digest};
use crate::review::get_job;

#[derive(clap::Args, Debug)]
pub struct HistoryArgs {
    pub job: String,
}

#[derive(clap::Args, Debug)]
pub struct RerunArgs {
    pub job: String,
    /// The recorded generation to run again (default: the job's current one).
    #[arg(long)]
    pub generation: Option<i64>,
    /// Name of the new job (default: `<job>-g<generation>-rerun`).
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RerunError {
    #[error("generation {generation} of {job} is not in its history (recorded: {recorded}); the last {limit} are kept")]
    NotRecorded { job: String, generation: i64, recorded: String, limit: usize },
    #[error("the spec of generation {generation} of {job} is no longer stored (ControllerRevision {revision} is missing)")]
    NotStored { job: String, generation: i64, revision: String },
    #[error(
        "ControllerRevision {revision} does not hold the spec recorded for generation {generation} of {job} ({why}); refusing to rerun it"
    )]
    NotTrusted { job: String, generation: i64, revision: String, why: String },
}

/// One line of `kubectl agentgate history`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryRow {
    #[serde(flatten)]
    pub record: GenerationRecord,
    /// Whether the spec can be rerun: `stored`, `current` (the job's spec), `missing`, or why not.
    pub spec: String,
}

/// The history of `job` with what is known of each generation's stored spec.
pub fn history_rows(job: &AgentJob, revisions: &[ControllerRevision]) -> Vec<HistoryRow> {
    let current = job.metadata.generation.unwrap_or(1);
    let history = job.status.as_ref().map(|s| s.history.clone()).unwrap_or_default();
    history
        .into_iter()
        .map(|record| {
            let spec = match spec_of(job, record.generation, revisions) {
                Ok(_) if record.generation == current => "current".to_string(),
                Ok(_) => "stored".to_string(),
                Err(RerunError::NotStored { .. }) => "missing".to_string(),
                Err(RerunError::NotTrusted { why, .. }) => format!("untrusted: {why}"),
                Err(e) => e.to_string(),
            };
            HistoryRow { record, spec }
        })
        .collect()
}

pub fn render_history(job: &AgentJob, rows: &[HistoryRow]) -> String {
    let mut out = format!(
        "agentjob {}/{} (uid {}), generation {}",
        job.namespace().unwrap_or_default(),
        job.name_any(),
        job.metadata.uid.as_deref().unwrap_or("?"),
        job.metadata.generation.unwrap_or(1)
    );
    if let Some(t) = job.labels().get(TEMPLATE_LABEL) {
        out.push_str(&format!(", from template {}", crate::domain::terminal_text::line(t)));
    }
    // The author may write this annotation: shown on its line, escaped
    // (`tests::a_forged_rerun_annotation_cannot_add_rows_or_move_the_cursor`).
    if let Some(of) = job.annotations().get(RERUN_OF_ANNOTATION) {
        out.push_str(&format!(", a rerun of {}", crate::domain::terminal_text::line(of)));
    }
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no history recorded yet (the operator records each generation it sees)\n");
        return out;
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let h = &r.record;
            vec![
                h.generation.to_string(),
                short(&h.spec_digest.to_string()).to_string(),
                h.observed_time.0.to_string(),
                h.approvals
                    .as_ref()
                    .map(|a| if h.approved_by.is_empty() { a.to_string() } else { format!("{a} ({})", h.approved_by.join(", ")) })
                    .unwrap_or_else(|| "-".into()),
                h.attempts.to_string(),
                h.total_tokens.map_or("-".into(), |t| t.to_string()),
                h.cost_usd.clone().map_or("-".into(), |c| format!("${c}")),
                h.result.to_string(),
                r.spec.clone(),
            ]
        })
        .collect();
    out.push_str(&crate::plugin::table(
        &["GEN", "SPEC DIGEST", "SEEN", "APPROVALS", "ATTEMPTS", "TOKENS", "COST", "RESULT", "SPEC"],
        &table,
    ));
    out
}

/// The spec of generation `generation` of `job`: its current spec, or the stored revision, each
/// checked against the digest the operator recorded.
pub fn spec_of(job: &AgentJob, generation: i64, revisions: &[ControllerRevision]) -> Result<AgentJobSpec, RerunError> {
    let name = job.name_any();
    let history = job.status.as_ref().map(|s| s.history.as_slice()).unwrap_or_default();
    let current = job.metadata.generation.unwrap_or(1);
    let record = history.iter().find(|h| h.generation == generation);
    if generation == current {
        // The spec is right here; if the operator has recorded it, it is this one.
        return match record {
            Some(r) if r.spec_digest != spec_digest(&job.spec) => Err(RerunError::NotTrusted {
                job: name,
                generation,
                revision: "(the job's spec)".into(),
                why: "digest differs from status.history".into(),
            }),
            _ => Ok(job.spec.clone()),
        };
    }
    let Some(record) = record else {
        let recorded = history.iter().map(|h| h.generation.to_string()).collect::<Vec<_>>().join(", ");
        return Err(RerunError::NotRecorded {
            job: name,
            generation,
            recorded: if recorded.is_empty() { "none".into() } else { recorded },
            limit: crate::domain::history::HISTORY_LIMIT,
        });
    };
    let revision = revision_name(&name, generation);
    let untrusted = |why: &str| RerunError::NotTrusted { job: name.clone(), generation, revision: revision.clone(), why: why.into() };
    let Some(stored) = revisions.iter().find(|r| r.name_any() == revision) else {
        return Err(RerunError::NotStored { job: name.clone(), generation, revision: revision.clone() });
    };
    let uid = job.metadata.uid.as_deref().unwrap_or_default();
    if !stored.owner_references().iter().any(|o| o.uid == uid && o.controller == Some(true)) {
        return Err(untrusted("not controlled by this job"));
    }
    let spec: AgentJobSpec = stored
        .data
        .0
        .get("spec")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .ok_or_else(|| untrusted("no AgentJob spec in its data"))?;
    if spec_digest(&spec) != record.spec_digest {
        return Err(untrusted("its spec's digest differs from status.history"));
    }
    Ok(spec)
}

/// The new job that reruns generation `generation` of `job` with `spec`.
pub fn rerun_job(job: &AgentJob, generation: i64, spec: AgentJobSpec, name: &str) -> AgentJob {
    let mut labels: BTreeMap<String, String> = job.labels().clone();
    labels.remove(RERUN_OF_LABEL);
    // A label value holds at most 63 characters; the annotation always names the job.
    if job.name_any().len() <= 63 {
        labels.insert(RERUN_OF_LABEL.into(), job.name_any());
    }
    // Where the spec came from (template annotations) carries over; nothing else does (the
    // admission policy stamps the requester anew).
    let mut annotations: BTreeMap<String, String> =
        job.annotations().iter().filter(|(k, _)| k.starts_with("agentgate.dev/template")).map(|(k, v)| (k.clone(), v.clone())).collect();
    annotations.insert(
        RERUN_OF_ANNOTATION.into(),
        format!(
            "{}/{} generation {generation} uid {}",
            job.namespace().unwrap_or_default(),
            job.name_any(),
            job.metadata.uid.as_deref().unwrap_or_default()
        ),
    );
    annotations.insert(SPEC_DIGEST_ANNOTATION.into(), spec_digest(&spec));
    let mut new = AgentJob::new(name, spec);
    new.metadata.namespace = job.namespace();
    new.metadata.labels = Some(labels);
    new.metadata.annotations = Some(annotations);
    new
}

async fn revisions_of(client: &Client, job: &AgentJob) -> anyhow::Result<Vec<ControllerRevision>> {
    let namespace = job.namespace().unwrap_or_default();
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &namespace);
    let selector = format!("{JOB_UID_LABEL}={}", job.metadata.uid.as_deref().unwrap_or_default());
    match api.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(s)) if s.code == 403 => anyhow::bail!(
            "reading the job's stored specs needs `list` on controllerrevisions (apps) in {namespace}, which the view, edit and admin roles grant: {}",
            s.message
        ),
        Err(e) => Err(anyhow::Error::from(e).context("listing the job's ControllerRevisions")),
    }
}

pub async fn history(client: &Client, namespace: &str, args: HistoryArgs, emit: Emit) -> anyhow::Result<()> {
    let job = get_job(client, namespace, &args.job).await?;
    let rows = history_rows(&job, &revisions_of(client, &job).await?);
    match emit {
        Emit::Create => print!("{}", render_history(&job, &rows)),
        Emit::Json => println!("{}", super::json_for_terminal(&rows)?),
        Emit::Yaml => print!("{}", super::yaml_for_terminal(&rows)?),
    }
    Ok(())
}

pub async fn rerun(client: &Client, namespace: &str, args: RerunArgs, emit: Emit) -> anyhow::Result<()> {
    let job = get_job(client, namespace, &args.job).await?;
    let generation = args.generation.unwrap_or_else(|| job.metadata.generation.unwrap_or(1));
    let spec = spec_of(&job, generation, &revisions_of(client, &job).await?)?;
    let name = args.name.unwrap_or_else(|| format!("{}-g{generation}-rerun", job.name_any()));
    let new = rerun_job(&job, generation, spec, &name);
    if create_or_print(client, &new, emit).await? {
        println!(
            "agentjob/{name} created in {namespace}: generation {generation} of {} again (spec {}).",
            job.name_any(),
            short(&spec_digest(&new.spec))
        );
        println!("It is a new job and needs its own approvals: kubectl agentgate approve {name} -n {namespace}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

    fn job_at(generation: i64, budget: &str) -> AgentJob {
        let mut job: AgentJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": "nightly", "namespace": "team", "uid": "u-1", "labels": {"team": "a", TEMPLATE_LABEL: "scan"},
                         "annotations": {"agentgate.dev/requested-by": "dave", "agentgate.dev/template-digest": "sha256:t"}},
            "spec": {"category": "payments", "agents": {"primary": {"name": "a", "image": "img", "model": "gpt-4o-mini"}},
                     "budget": {"maxCostUSD": budget}}}))
        .unwrap();
        job.metadata.generation = Some(generation);
        job
    }

    fn record(generation: i64, spec: &AgentJobSpec) -> GenerationRecord {
        GenerationRecord {
            generation,
            spec_digest: spec_digest(spec).into(),
            observed_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            approvals: None,
            approved_by: vec![],
            attempts: 0,
            total_tokens: None,
            cost_usd: None,
            result: "Superseded".into(),
        }
    }

    /// Job `nightly` at generation 2 (budget 7) that recorded generation 1 (budget 5), and the
    /// revision the operator would have stored for generation 1.
    fn edited() -> (AgentJob, ControllerRevision) {
        let first = job_at(1, "5");
        let mut job = job_at(2, "7");
        job.status = Some(crate::api::AgentJobStatus { history: vec![record(1, &first.spec), record(2, &job.spec)], ..Default::default() });
        let mut revision = ControllerRevision::default();
        revision.metadata.name = Some("nightly-g1".into());
        revision.metadata.owner_references =
            Some(vec![OwnerReference { uid: "u-1".into(), controller: Some(true), ..OwnerReference::default() }]);
        revision.data.0 = serde_json::json!({"spec": first.spec});
        (job, revision)
    }

    #[test]
    fn a_recorded_generation_is_read_from_its_revision() {
        let (job, revision) = edited();
        assert_eq!(spec_of(&job, 1, std::slice::from_ref(&revision)).unwrap().budget.max_cost_usd, "5");
        assert_eq!(spec_of(&job, 2, &[]).unwrap().budget.max_cost_usd, "7", "the current generation is the job's own spec");
        let rows = history_rows(&job, &[revision]);
        assert_eq!(rows.iter().map(|r| r.spec.as_str()).collect::<Vec<_>>(), ["stored", "current"]);
    }

    #[test]
    fn a_revision_not_controlled_by_the_job_or_not_matching_the_digest_is_refused() {
        let (job, revision) = edited();
        let mut foreign = revision.clone();
        foreign.metadata.owner_references.as_mut().unwrap()[0].uid = "u-other".into();
        let err = spec_of(&job, 1, &[foreign]).unwrap_err().to_string();
        assert!(err.ends_with("(not controlled by this job); refusing to rerun it"), "{err}");
        let mut altered = revision.clone();
        altered.data.0["spec"]["budget"]["maxCostUSD"] = serde_json::json!("900");
        let err = spec_of(&job, 1, &[altered]).unwrap_err().to_string();
        assert!(err.contains("its spec's digest differs from status.history"), "{err}");
        assert_eq!(
            spec_of(&job, 1, &[]).unwrap_err().to_string(),
            "the spec of generation 1 of nightly is no longer stored (ControllerRevision nightly-g1 is missing)"
        );
    }

    #[test]
    fn a_rerun_is_a_new_job_that_says_where_it_came_from() {
        let (job, revision) = edited();
        let spec = spec_of(&job, 1, &[revision]).unwrap();
        let rerun = rerun_job(&job, 1, spec.clone(), "nightly-again");
        assert_eq!((rerun.name_any(), rerun.namespace().as_deref(), &rerun.spec), ("nightly-again".into(), Some("team"), &spec));
        assert_eq!(rerun.metadata.uid, None);
        assert_eq!(rerun.labels().get(RERUN_OF_LABEL).map(String::as_str), Some("nightly"));
        assert_eq!(rerun.labels().get("team").map(String::as_str), Some("a"));
        let annotations = rerun.annotations();
        assert_eq!(annotations.get(RERUN_OF_ANNOTATION).map(String::as_str), Some("team/nightly generation 1 uid u-1"));
        assert_eq!(annotations.get(SPEC_DIGEST_ANNOTATION), Some(&spec_digest(&spec)));
        assert_eq!(annotations.get("agentgate.dev/template-digest").map(String::as_str), Some("sha256:t"));
        assert!(!annotations.contains_key("agentgate.dev/requested-by"), "the requester is stamped anew by admission");
    }

    /// The rerun-of annotation is the author's to write: a line break in it forged history
    /// rows (a generation approved by two heads), an escape sequence erased the real ones.
    #[test]
    fn a_forged_rerun_annotation_cannot_add_rows_or_move_the_cursor() {
        let (mut job, revision) = edited();
        job.metadata.annotations.get_or_insert_default().insert(
            RERUN_OF_ANNOTATION.into(),
            "team/x\n2   8892a58daaf0   2026-11-30T06:49:27Z   2/2 (alice, bob)   1   Succeeded\x1b[1A\x1b[2K".into(),
        );
        let shown = render_history(&job, &history_rows(&job, &[revision]));
        assert_eq!(shown.lines().count(), 4, "the job's line, the header and two generations:\n{shown}");
        assert!(!shown.chars().any(|c| c != '\n' && crate::domain::terminal_text::is_hidden(c)), "{shown:?}");
        assert!(shown.contains(r"a rerun of team/x\n2   8892a58daaf0"), "{shown}");
    }
}
