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
        out.push_str(&format!(", from template {t}"));
    }
    if let Some(of) = job.annotations().get(RERUN_OF_ANNOTATION) {
        out.push_str(&format!(", a rerun of {of}"));
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
                short(&h.spec_digest).to_string(),
                h.observed_time.0.to_string(),
                h.approvals
                    .clone()
                    .map(|a| if h.approved_by.is_empty() { a } else { format!("{a} ({})", h.approved_by.join(", ")) })
                    .unwrap_or_else(|| "-".into()),
                h.attempts.to_string(),
                h.total_tokens.map_or("-".into(), |t| t.to_string()),
                h.cost_usd.clone().map_or("-".into(), |c| format!("${c}")),
                h.result.clone(),
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
        Emit::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Emit::Yaml => print!("{}", serde_saphyr::to_string(&rows)?),
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
