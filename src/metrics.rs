//! Prometheus metrics, served on /metrics.

use std::sync::atomic::AtomicU64;

use kube::runtime::reflector::Store;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    pub phase: String,
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolLabels {
    pub tool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub kind: String,
    pub result: String,
}

/// `error` is `controller::Error::metric_label`: the failed call, one of a fixed few.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileErrorLabels {
    pub kind: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobTypeLabels {
    pub job_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    pub model: String,
    pub category: String,
}

/// Label values that come from tenants' objects (model names in reports, categories, job types)
/// are capped: past `max` distinct values, new ones are counted under `other`, so one tenant
/// cannot grow the scrape (and the operator's memory) without bound.
pub struct LabelBook {
    max: usize,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// The value that stands for every label value past the cap, and for values that are not
/// label-safe (too long).
pub const OTHER_LABEL: &str = "other";

impl LabelBook {
    pub fn new(max: usize) -> Self {
        LabelBook { max, seen: std::sync::Mutex::new(std::collections::HashSet::new()) }
    }

    /// `value` when it already has its label, else `other`, claiming none.
    pub fn seen_or_other(&self, value: &str) -> String {
        let seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(value) { value.into() } else { OTHER_LABEL.into() }
    }

    /// `value` while it is one of the first `max` distinct values seen, `other` after that.
    pub fn label(&self, value: &str) -> String {
        if value.is_empty() || value.len() > 63 {
            return OTHER_LABEL.into();
        }
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(value) {
            return value.into();
        }
        if seen.len() >= self.max {
            return OTHER_LABEL.into();
        }
        seen.insert(value.into());
        value.into()
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub jobs: Family<PhaseLabels, Gauge>,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_errors: Family<ReconcileErrorLabels, Counter>,
    pub reconcile_seconds: Histogram,
    pub approval_wait_seconds: Histogram,
    pub validation_seconds: Histogram,
    pub tokens: Family<UsageLabels, Counter>,
    pub cost_usd: Family<UsageLabels, Counter<f64, AtomicU64>>,
    pub estimate_error_ratio: Family<JobTypeLabels, Histogram>,
    pub pods_created: Counter,
    pub jobs_finished: Family<FinishedLabels, Counter>,
    pub tool_ready: Family<ToolLabels, Gauge>,
    /// Identity admission policies or bindings missing or altered (controller/identity_policies.rs):
    /// while above 0 no vote counts.
    pub identity_policies_missing: Gauge,
    /// Objects left out of a cache because they do not decode (controller/decode.rs), by kind.
    pub objects_undecodable: Family<KindLabels, Counter>,
    /// Meter API requests (controller/meter_api.rs) by outcome: `ok`, or the reason of a refusal.
    pub meter_api_requests: Family<OutcomeLabels, Counter>,
    /// The AgentTool cache, set once the controllers run: tool readiness is read from it at
    /// scrape time, so a deleted tool leaves no stale series behind.
    /// The current leadership term's tool cache (replaced when this replica leads again).
    pub tools: std::sync::RwLock<Option<Store<crate::api::AgentTool>>>,
    /// Caps on the label values tenants choose (see `LabelBook`).
    pub model_labels: LabelBook,
    pub category_labels: LabelBook,
    pub job_type_labels: LabelBook,
}

/// Distinct values kept per tenant-chosen label before the rest are counted as `other`.
const MAX_MODEL_LABELS: usize = 64;
const MAX_CATEGORY_LABELS: usize = 64;
const MAX_JOB_TYPE_LABELS: usize = 256;

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentgate");
        let jobs = Family::<PhaseLabels, Gauge>::default();
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let reconcile_errors = Family::<ReconcileErrorLabels, Counter>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let approval_wait_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 18));
        let validation_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let tokens = Family::<UsageLabels, Counter>::default();
        let cost_usd = Family::<UsageLabels, Counter<f64, AtomicU64>>::default();
        // Actual over p50: 1 is exact; a calibrated p90 puts nine jobs in ten at or below its
        // own p90/p50 (about 2 to 3 for agent workloads).
        let estimate_error_ratio = Family::<JobTypeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.1, 0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0])
        });
        let pods_created = Counter::default();
        let jobs_finished = Family::<FinishedLabels, Counter>::default();
        let tool_ready = Family::<ToolLabels, Gauge>::default();
        registry.register("jobs", "AgentJobs by phase", jobs.clone());
        registry.register("reconciles", "Reconciles by kind and result", reconciles.clone());
        registry.register("reconcile_errors", "Failed reconciles by kind and failed call", reconcile_errors.clone());
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", reconcile_seconds.clone());
        registry.register("approval_wait_seconds", "Time from creation until a job had its approvals", approval_wait_seconds.clone());
        registry.register("validation_seconds", "Time to estimate a job and check its input", validation_seconds.clone());
        registry.register("tokens", "Tokens used by finished attempts", tokens.clone());
        registry.register("cost_usd", "USD spent by finished attempts", cost_usd.clone());
        registry.register(
            "estimate_error_ratio",
            "Actual tokens of a succeeded job over its p50 estimate, by jobType",
            estimate_error_ratio.clone(),
        );
        registry.register("pods_created", "Agent Pods created", pods_created.clone());
        registry.register(
            "jobs_finished",
            "AgentJobs entering a final phase (Succeeded, Failed, Rejected), by phase and category",
            jobs_finished.clone(),
        );
        registry.register("tool_ready", "1 when the AgentTool is Ready, 0 when not", tool_ready.clone());
        let identity_policies_missing = Gauge::default();
        registry.register(
            "identity_policies_missing",
            "Identity admission policies or bindings missing or not as shipped; while above 0 no vote counts",
            identity_policies_missing.clone(),
        );
        let objects_undecodable = Family::<KindLabels, Counter>::default();
        registry.register(
            "objects_undecodable",
            "Objects left out of the operator's caches because they do not decode (too deep, or a spec value this version does not know), by kind",
            objects_undecodable.clone(),
        );
        let meter_api_requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "meter_api_requests",
            "Requests of agent meters for budget and usage, by outcome (ok, or why refused: token_rejected, not_bound_to_a_pod, pod_gone, ...)",
            meter_api_requests.clone(),
        );
        Metrics {
            objects_undecodable,
            meter_api_requests,
            registry,
            jobs,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            approval_wait_seconds,
            validation_seconds,
            tokens,
            cost_usd,
            estimate_error_ratio,
            pods_created,
            jobs_finished,
            tool_ready,
            identity_policies_missing,
            tools: std::sync::RwLock::new(None),
            model_labels: LabelBook::new(MAX_MODEL_LABELS),
            category_labels: LabelBook::new(MAX_CATEGORY_LABELS),
            job_type_labels: LabelBook::new(MAX_JOB_TYPE_LABELS),
        }
    }
}

impl Metrics {
    pub fn count_undecodable(&self, kind: &str) {
        self.objects_undecodable.get_or_create(&KindLabels { kind: kind.to_string() }).inc();
    }

    /// `outcome` is one of meter_api.rs's fixed reasons, never a tenant's string.
    pub fn count_meter_api(&self, outcome: &'static str) {
        self.meter_api_requests.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc();
    }

    /// One reconcile's outcome: `Err` carries the failed call's bounded label.
    pub fn count_reconcile(&self, kind: &str, outcome: Result<(), &'static str>) {
        let result = if outcome.is_ok() { "ok" } else { "error" };
        self.reconciles.get_or_create(&ReconcileLabels { kind: kind.into(), result: result.into() }).inc();
        if let Err(error) = outcome {
            self.reconcile_errors.get_or_create(&ReconcileErrorLabels { kind: kind.into(), error: error.into() }).inc();
        }
    }

    /// Counts a job entering a final phase. Only a job that heads of its category approved may
    /// claim a category label: anyone may create jobs rejected at once (over budget) under 64
    /// made-up categories, which took every label and counted every other team's jobs, cost and
    /// tokens as `other` (`tests::rejected_jobs_of_made_up_categories_take_no_label_from_real_ones`).
    pub fn count_finished(&self, phase: &str, category: &str, approved: bool) {
        let category = if approved { self.category_labels.label(category) } else { self.category_labels.seen_or_other(category) };
        self.jobs_finished.get_or_create(&FinishedLabels { phase: phase.into(), category }).inc();
    }

    /// Labels for usage counters: the model is kept only when the price table knows it (an
    /// agent's report can name anything), the category under its cap.
    pub fn usage_labels(&self, model: &str, known_model: bool, category: &str) -> UsageLabels {
        let model = if known_model { self.model_labels.label(model) } else { OTHER_LABEL.into() };
        UsageLabels { model, category: self.category_labels.label(category) }
    }

    /// A standby reports no leader-only gauge (jobs by phase, tool readiness): it would repeat
    /// what the last term saw, frozen, next to the new leader's live figures.
    pub fn forget_leader_state(&self) {
        *self.tools.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.tool_ready.clear();
        self.jobs.clear();
    }

    /// Rebuilds `tool_ready` from the tool cache.
    pub fn refresh_tools(&self) {
        let Some(tools) = self.tools.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone() else {
            self.tool_ready.clear();
            return;
        };
        self.tool_ready.clear();
        for tool in tools.state() {
            let ready = tool.status.as_ref().is_some_and(|s| s.ready);
            self.tool_ready.get_or_create(&ToolLabels { tool: kube::ResourceExt::name_any(tool.as_ref()) }).set(i64::from(ready));
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_book_caps_distinct_values() {
        let book = LabelBook::new(2);
        assert_eq!(book.label("a"), "a");
        assert_eq!(book.label("b"), "b");
        assert_eq!(book.label("c"), OTHER_LABEL);
        assert_eq!(book.label("a"), "a", "a value seen before the cap keeps its own series");
        assert_eq!(book.label(""), OTHER_LABEL);
        assert_eq!(book.label(&"x".repeat(64)), OTHER_LABEL);
    }

    #[test]
    fn rejected_jobs_of_made_up_categories_take_no_label_from_real_ones() {
        let m = Metrics::default();
        for i in 0..MAX_CATEGORY_LABELS {
            m.count_finished("Rejected", &format!("junk-{i}"), false);
        }
        m.count_finished("Succeeded", "payments", true);
        assert_eq!(m.usage_labels("gpt-4o", true, "payments").category, "payments");
        let text = m.encode();
        assert!(text.contains(r#"agentgate_jobs_finished_total{phase="Succeeded",category="payments"} 1"#), "{text}");
        assert!(text.contains(r#"agentgate_jobs_finished_total{phase="Rejected",category="other"} 64"#), "{text}");
        // A category that has its label keeps it for its rejected jobs too.
        m.count_finished("Rejected", "payments", false);
        assert!(m.encode().contains(r#"agentgate_jobs_finished_total{phase="Rejected",category="payments"} 1"#));
    }

    #[test]
    fn unknown_models_are_counted_as_other() {
        let m = Metrics::default();
        assert_eq!(m.usage_labels("made-up-model-1", false, "c").model, OTHER_LABEL);
        assert_eq!(m.usage_labels("gpt-4o", true, "c").model, "gpt-4o");
    }

    #[test]
    fn a_standby_reports_no_leader_gauges() {
        let m = Metrics::default();
        m.jobs.get_or_create(&PhaseLabels { phase: "Running".into() }).set(3);
        m.tool_ready.get_or_create(&ToolLabels { tool: "t".into() }).set(1);
        assert!(m.encode().contains("agentgate_jobs{phase=\"Running\"} 3"));
        m.forget_leader_state();
        let text = m.encode();
        assert!(!text.contains("agentgate_jobs{"), "{text}");
        assert!(!text.contains("agentgate_tool_ready{"), "{text}");
    }
}
