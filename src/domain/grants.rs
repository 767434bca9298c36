//! The arithmetic of the agent meters' budget grants (the I/O is controller/meter_api.rs).
//!
//! A job's budget is shared by every meter of every attempt. A meter asks the operator for budget
//! in chunks; the operator records each grant in the job's status (`status.meter`) with a
//! resourceVersion-checked write before it answers, so what was handed out is always in status.
//! The invariant kept by [`apply`]: `committed ≤ budget`, where a grant counts all it was given
//! while its meter may still spend it, and only what it spent once the meter has settled.
//! A meter never spends beyond what it holds (meter/budget.rs), so `spent ≤ committed ≤ budget`.

use std::collections::BTreeMap;

use super::money::MicroUsd;
use super::pricing::TokenCounts;
use super::report::{accumulate, add_model_usage, fold_models, tokens_of};
use crate::api::{MeterGrant, MeterStatus, Usage};

/// Meter sessions one job may open over all its attempts. Each is a few hundred bytes of status;
/// a job of 16 agents retried 10 times with one meter restart each fits.
pub const MAX_GRANTS: usize = 400;
/// Models listed one by one in a session's usage, an attempt's and the job's; the rest are
/// summed into one entry (domain/report.rs `fold_models`).
pub const MAX_MODELS: usize = 64;
/// Model entries listed over all of a job's sessions: beyond, a session lists its costliest
/// model and sums the rest. With [`MAX_GRANTS`] sessions and 128-character model names the
/// job's `status.meter` stays under ~400 KB, well within the 1.5 MiB etcd takes for the whole
/// object (tests/meter_grants.rs sessions_full_of_long_model_names_cannot_grow_the_jobs_status_past_what_etcd_takes:
/// stored as sent, ~100 such sessions made every status write of the job fail).
pub const MAX_MODEL_ENTRIES: usize = 256;
const MAX_TOKENS: i64 = 1_000_000_000_000;
const MAX_REFUSALS: i64 = 1_000_000_000_000;

/// Whose meter asks: established by the operator from a verified token and the Pod, never from
/// the request body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeterIdentity {
    pub pod: String,
    pub pod_uid: String,
    pub attempt: i32,
}

/// One request of a meter: its cumulative measured usage, and how much more budget it wants.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncRequest {
    pub session: String,
    /// Increases with every request of a session; a retry repeats it.
    pub sequence: i64,
    /// Cumulative since the session started: tokens per model and the cost the meter charged.
    pub usage: Usage,
    /// More budget wanted on top of what the session holds.
    pub want: MicroUsd,
    /// The meter is exiting: what it did not spend goes back to the job.
    pub last: bool,
    /// Calls the meter refused because the job's budget could not cover them, cumulative.
    pub budget_refusals: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncReply {
    /// All the session has been granted, in total (a meter sets its budget to it, so a retried
    /// request never counts twice).
    pub granted: MicroUsd,
    pub granted_now: MicroUsd,
    /// What the job's budget can still grant to anyone.
    pub available: MicroUsd,
    /// Status changed and must be written before the reply goes out.
    pub changed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("session {0} belongs to another Pod")]
    SessionOfAnotherPod(String),
    #[error("the job already has {MAX_GRANTS} meter sessions; no more are opened")]
    TooManySessions,
    #[error("session {0} has settled; a new meter must start a new session")]
    Settled(String),
    #[error("usage went down from ${before} to ${after}: a meter's usage is cumulative")]
    UsageWentDown { before: MicroUsd, after: MicroUsd },
    #[error("bad usage: {0}")]
    BadUsage(String),
}

/// The meter API's request body (`POST /v1/sync`), as the meter sends it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub session: String,
    pub sequence: i64,
    pub usage: Usage,
    #[serde(rename = "wantUSD", default, skip_serializing_if = "Option::is_none")]
    pub want_usd: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub last: bool,
    /// Absent when none, so a meter that refused nothing sends what meters always sent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub budget_refusals: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

impl SyncBody {
    /// The request to apply, or why the body is unusable (a 400).
    pub fn request(&self) -> Result<SyncRequest, String> {
        if self.session.is_empty() || self.session.len() > 64 || !self.session.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err("session must be 1 to 64 letters, digits or dashes".into());
        }
        if self.sequence < 1 {
            return Err("sequence must be at least 1".into());
        }
        let want = match &self.want_usd {
            None => MicroUsd(0),
            Some(text) => MicroUsd::parse(text).ok_or_else(|| format!("wantUSD {text:?} is not a USD amount"))?,
        };
        if !(0..=MAX_REFUSALS).contains(&self.budget_refusals) {
            return Err(format!("budgetRefusals must be between 0 and {MAX_REFUSALS}"));
        }
        Ok(SyncRequest {
            session: self.session.clone(),
            sequence: self.sequence,
            usage: self.usage.clone(),
            want,
            last: self.last,
            budget_refusals: self.budget_refusals,
        })
    }
}

/// The meter API's answer to a request it applied (or had applied before).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncAnswer {
    /// Everything the session has been granted, in total.
    #[serde(rename = "grantedUSD")]
    pub granted_usd: String,
    #[serde(rename = "availableUSD")]
    pub available_usd: String,
}

/// How status names a session: `sha256:` and 32 hex digits of a digest of the id the meter sent,
/// never the id. Status is readable by the job's tenants, and whoever knows a session's id and
/// holds a token bound to its Pod (`create serviceaccounts/token` mints one, as the kubelet does
/// for the meter) could settle it, handing the grant the meter still holds to other meters, or
/// jump its sequence ahead, so that the meter's later reports are taken for retries
/// (tests/meter_grants.rs a_token_minted_for_the_agent_pod_cannot_settle_or_freeze_its_meters_session).
/// The `:` no session id may contain (see [`SyncBody::request`]) keeps the two apart.
pub fn session_key(session: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, session.as_bytes());
    let mut key = String::with_capacity(7 + 32);
    key.push_str("sha256:");
    for byte in &digest.as_ref()[..16] {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

/// What one grant holds against the budget.
pub fn committed(grant: &MeterGrant) -> MicroUsd {
    let granted = amount(&grant.granted_usd);
    let spent = amount(&grant.spent_usd);
    if grant.settled { spent } else { granted.max(spent) }
}

fn amount(text: &str) -> MicroUsd {
    // Only this module writes these fields; an unreadable one (edited by hand) is counted as the
    // whole budget would be: the maximum, so it can only make grants smaller.
    MicroUsd::parse(text).unwrap_or(MicroUsd(i64::MAX / 4))
}

/// What the budget can still grant.
pub fn available(meter: &MeterStatus, budget: MicroUsd) -> MicroUsd {
    let committed: MicroUsd = meter.grants.iter().map(committed).sum();
    MicroUsd((budget.0 - committed.0).max(0))
}

/// Checks a meter's usage report: bounded, non-negative, its cost readable.
pub fn check_usage(usage: &Usage) -> Result<MicroUsd, SyncError> {
    let cost =
        MicroUsd::parse(&usage.cost_usd).ok_or_else(|| SyncError::BadUsage(format!("costUSD {:?} is not a USD amount", usage.cost_usd)))?;
    // Any number of models (a meter that served more than MAX_MODELS priced ones): refusing
    // the report would lose its usage; [`apply`] folds them.
    for m in &usage.models {
        let tokens = [m.input_tokens, m.cached_input_tokens, m.output_tokens, m.cache_write_input_tokens, m.cache_write_1h_input_tokens];
        if m.model.is_empty() || m.model.len() > 128 || tokens.iter().any(|t| !(0..=MAX_TOKENS).contains(t)) {
            return Err(SyncError::BadUsage(format!(
                "model entry {:?} has a bad name or token count",
                m.model.chars().take(128).collect::<String>()
            )));
        }
        if MicroUsd::parse(&m.cost_usd).is_none() {
            return Err(SyncError::BadUsage(format!("model {:?}: costUSD is not a USD amount", m.model)));
        }
    }
    Ok(cost)
}

/// Applies one meter request to the job's meter status. `open`: the job may still grant (not
/// finished); reports are taken either way. Pure: the caller writes `meter` back with the
/// resourceVersion it read, and answers only once that write succeeded.
pub fn apply(
    meter: &mut MeterStatus,
    budget: MicroUsd,
    who: &MeterIdentity,
    request: &SyncRequest,
    open: bool,
) -> Result<SyncReply, SyncError> {
    let spent = check_usage(&request.usage)?;
    let key = session_key(&request.session);
    // A session recorded by an operator before the digests (its id in the clear) is found by
    // its id once, and recorded by its digest from then on.
    let found = meter.grants.iter().position(|g| g.session == key).or_else(|| {
        let legacy = meter.grants.iter().position(|g| g.session == request.session)?;
        meter.grants[legacy].session = key.clone();
        Some(legacy)
    });
    let index = match found {
        Some(i) if meter.grants[i].pod_uid != who.pod_uid => return Err(SyncError::SessionOfAnotherPod(request.session.clone())),
        Some(i) => i,
        None if meter.grants.len() >= MAX_GRANTS => return Err(SyncError::TooManySessions),
        None => {
            meter.grants.push(MeterGrant {
                pod: who.pod.clone(),
                pod_uid: who.pod_uid.clone(),
                attempt: who.attempt,
                session: key,
                sequence: 0,
                granted_usd: MicroUsd(0).to_string(),
                spent_usd: MicroUsd(0).to_string(),
                settled: false,
                usage: None,
                budget_refusals: 0,
            });
            meter.grants.len() - 1
        }
    };
    let grant = &meter.grants[index];
    if request.sequence <= grant.sequence {
        // A retry of a request already applied (its reply was lost): the same answer, no change.
        let granted = amount(&grant.granted_usd);
        return Ok(SyncReply { granted, granted_now: MicroUsd(0), available: available(meter, budget), changed: false });
    }
    if grant.settled {
        return Err(SyncError::Settled(request.session.clone()));
    }
    let before = amount(&grant.spent_usd);
    if spent < before {
        return Err(SyncError::UsageWentDown { before, after: spent });
    }
    // Computed before this grant changes: its own committed amount is part of what is held.
    let others: MicroUsd = meter.grants.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, g)| committed(g)).sum();
    let listed_by_others: usize =
        meter.grants.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, g)| g.usage.as_ref().map_or(0, |u| u.models.len())).sum();
    let mut usage = request.usage.clone();
    fold_models(&mut usage, MAX_MODEL_ENTRIES.saturating_sub(listed_by_others).min(MAX_MODELS));
    let grant = &mut meter.grants[index];
    grant.sequence = request.sequence;
    grant.spent_usd = spent.to_string();
    grant.usage = Some(usage);
    // Cumulative, like the usage: a lower count (impossible from a meter) never erases refusals.
    grant.budget_refusals = grant.budget_refusals.max(request.budget_refusals);
    let mut granted_now = MicroUsd(0);
    if request.last {
        grant.settled = true;
    } else if open && request.want.0 > 0 {
        let held = amount(&grant.granted_usd).max(spent);
        // Saturating: reported costs may sum past an i64 (grants_tests.rs
        // sessions_reporting_the_largest_costs_are_granted_nothing_past_the_budget).
        let free = MicroUsd(budget.0.saturating_sub(others.0).saturating_sub(held.0).max(0));
        granted_now = request.want.min(free);
        grant.granted_usd = amount(&grant.granted_usd).saturating_add(granted_now).to_string();
    }
    let granted = amount(&grant.granted_usd);
    recount(meter);
    Ok(SyncReply { granted, granted_now, available: available(meter, budget), changed: true })
}

/// Settles the grants of `attempt`, which has ended, whose sessions a termination message speaks
/// for (`final_usage`: by session digest, the larger figure of the two channels and the
/// refusals, domain/meter_message.rs `measure_attempt`). A meter cut off from the operator until
/// it exited could not settle: its whole grant stayed committed after the attempt ended, out of
/// reach of a retry's meters. Its message is the session's final usage (its meter has stopped,
/// and a restarted meter carries on the same session, so the last message covers it all): the
/// grant is settled to it, holding what it spent from then on. Never below what the meter API
/// heard (the figure is the larger of the two), never above both. Grants without a message stay
/// as they are: what their meter spent after its last report is unknown, so all they were given
/// stays held.
pub fn settle_from_messages(meter: &mut MeterStatus, attempt: i32, final_usage: &BTreeMap<String, (Usage, i64)>) {
    let mut settled = false;
    for index in 0..meter.grants.len() {
        let grant = &meter.grants[index];
        if grant.attempt != attempt || grant.settled {
            continue;
        }
        // An operator older than the digests recorded a session by its id.
        let key = if grant.session.starts_with("sha256:") { grant.session.clone() } else { session_key(&grant.session) };
        let Some((usage, refusals)) = final_usage.get(&key) else { continue };
        let Some(cost) = MicroUsd::parse(&usage.cost_usd) else { continue };
        // Folded as a report is ([`apply`]): the job's status stays within what etcd takes.
        let listed_by_others: usize =
            meter.grants.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, g)| g.usage.as_ref().map_or(0, |u| u.models.len())).sum();
        let mut usage = usage.clone();
        fold_models(&mut usage, MAX_MODEL_ENTRIES.saturating_sub(listed_by_others).min(MAX_MODELS));
        let grant = &mut meter.grants[index];
        let heard = amount(&grant.spent_usd);
        if cost >= heard {
            grant.spent_usd = cost.to_string();
            grant.usage = Some(usage);
        }
        grant.budget_refusals = grant.budget_refusals.max(*refusals);
        grant.settled = true;
        settled = true;
    }
    if settled {
        recount(meter);
    }
}

/// Rewrites the totals from the grants.
pub fn recount(meter: &mut MeterStatus) {
    meter.granted_usd = meter.grants.iter().map(|g| amount(&g.granted_usd)).sum::<MicroUsd>().to_string();
    meter.spent_usd = meter.grants.iter().map(|g| amount(&g.spent_usd)).sum::<MicroUsd>().to_string();
    meter.committed_usd = meter.grants.iter().map(committed).sum::<MicroUsd>().to_string();
}

/// The usage the meters of `attempt` measured, summed over its sessions, with the costs the
/// meters charged (a call whose usage could not be read costs its reservation, with no tokens).
/// None when no meter of that attempt reported: the attempt was not metered.
pub fn attempt_usage(meter: Option<&MeterStatus>, attempt: i32) -> Option<Usage> {
    let usages: Vec<&Usage> = meter?.grants.iter().filter(|g| g.attempt == attempt).filter_map(|g| g.usage.as_ref()).collect();
    (!usages.is_empty()).then(|| sum_usages(&usages))
}

/// Calls the meters of `attempt` refused because the job's budget could not cover them.
pub fn attempt_budget_refusals(meter: Option<&MeterStatus>, attempt: i32) -> i64 {
    meter.map_or(0, |m| m.grants.iter().filter(|g| g.attempt == attempt).map(|g| g.budget_refusals.max(0)).fold(0, i64::saturating_add))
}

/// Adds usages model by model, tokens and costs alike.
pub fn sum_usages(usages: &[&Usage]) -> Usage {
    let mut tokens: BTreeMap<String, TokenCounts> = BTreeMap::new();
    let mut costs: BTreeMap<String, MicroUsd> = BTreeMap::new();
    let mut total = MicroUsd(0);
    for usage in usages {
        accumulate(&mut tokens, &tokens_of(usage));
        for m in &usage.models {
            let cost = costs.entry(m.model.clone()).or_default();
            *cost = cost.saturating_add(MicroUsd::parse(&m.cost_usd).unwrap_or_default());
        }
        total = total.saturating_add(MicroUsd::parse(&usage.cost_usd).unwrap_or_default());
    }
    let mut sum = Usage::default();
    for (model, counts) in &tokens {
        add_model_usage(&mut sum, model, counts, costs.get(model).copied().unwrap_or_default());
    }
    sum.cost_usd = total.to_string();
    fold_models(&mut sum, MAX_MODELS);
    sum
}

/// How the agents' own usage claim differs from what the meters measured, model by model; None
/// when they agree on every token count.
pub fn claim_mismatch(measured: &Usage, claimed: &BTreeMap<String, TokenCounts>) -> Option<String> {
    let measured = tokens_of(measured);
    let mut differences = Vec::new();
    for model in measured.keys().chain(claimed.keys()).collect::<std::collections::BTreeSet<_>>() {
        let m = measured.get(model).copied().unwrap_or_default();
        let c = claimed.get(model).copied().unwrap_or_default();
        if m != c {
            differences.push(format!(
                "{model}: metered {}/{}/{}/{}/{} input/cached/output/cache-write/1h-cache-write tokens, claimed {}/{}/{}/{}/{}",
                m.input,
                m.cached_input,
                m.output,
                m.cache_write,
                m.cache_write_1h,
                c.input,
                c.cached_input,
                c.output,
                c.cache_write,
                c.cache_write_1h
            ));
        }
    }
    (!differences.is_empty()).then(|| differences.join("; "))
}

/// Whether the job's status has settled `attempt`: the operator does so once every Pod of it
/// has terminated (every meter has exited), and its usage is then final. A meter session on it
/// opened later (a token minted for one of its Pods, which stay until deleted) could only draw on
/// the budget and report usage that no total ever counts again (tests/meter_grants.rs
/// a_settled_attempts_pod_draws_nothing_and_reports_nothing).
pub fn attempt_settled(status: &crate::api::AgentJobStatus, attempt: i32) -> bool {
    status.attempts.iter().any(|a| a.attempt == attempt && a.result != crate::api::AttemptResult::Running)
}

/// What a meter draws on, from the Pod the operator built for one attempt of its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodTerms {
    pub attempt: i32,
    /// The `budget.maxCostUSD` of the generation the heads approved for the attempt.
    pub budget: MicroUsd,
}

/// Why a Pod the job controls gets no budget.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PodTermsError {
    #[error("{0}")]
    BudgetMissing(String),
    #[error("{0}")]
    AttemptMismatch(String),
}

impl PodTermsError {
    /// The meter API's refusal reason (a metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            PodTermsError::BudgetMissing(_) => "pod_budget_missing",
            PodTermsError::AttemptMismatch(_) => "pod_attempt_mismatch",
        }
    }
}

/// The attempt and budget an agent Pod was built with, from its agent container's environment
/// (`AGENTGATE_ATTEMPT`, `AGENTGATE_BUDGET_USD`): the operator writes both from the generation
/// the heads approved for the attempt, and a Pod's env never changes. Its attempt label must say
/// the same (labels can be changed: one relabelled would book its meters' usage on another
/// attempt). No fallback: a Pod the job controls without them, which the operator never builds,
/// gets nothing, rather than whatever the spec's budget says now (tests/meter_grants.rs
/// a_pod_without_the_approved_budget_in_its_environment_is_granted_nothing). `attempt_label` is
/// the Pod's (already checked to be a positive number).
pub fn pod_terms(pod: &k8s_openapi::api::core::v1::Pod, attempt_label: i32) -> Result<PodTerms, PodTermsError> {
    use super::pod_builder::{ENV_ATTEMPT, ENV_BUDGET_USD, LABEL_ATTEMPT};
    let agent = pod.spec.as_ref().and_then(|spec| spec.containers.iter().find(|c| c.name == "agent"));
    let env = |name: &str| {
        let var = agent?.env.as_ref()?.iter().find(|e| e.name == name)?;
        Some(var.value.as_deref().unwrap_or_default())
    };
    let budget = match env(ENV_BUDGET_USD) {
        None => {
            return Err(PodTermsError::BudgetMissing(format!(
                "its agent container has no {ENV_BUDGET_USD}, which every Pod the operator builds carries (the approved budget)"
            )));
        }
        Some(text) => MicroUsd::parse(text).ok_or_else(|| {
            let shown: String = text.chars().take(32).collect();
            PodTermsError::BudgetMissing(format!("its agent container's {ENV_BUDGET_USD} {shown:?} is not a USD amount"))
        })?,
    };
    let attempt = env(ENV_ATTEMPT).and_then(|a| a.parse::<i32>().ok());
    if attempt != Some(attempt_label) {
        let built = attempt.map_or_else(|| format!("no valid {ENV_ATTEMPT}"), |a| format!("{ENV_ATTEMPT} {a}"));
        return Err(PodTermsError::AttemptMismatch(format!(
            "its label {LABEL_ATTEMPT} says {attempt_label} but it was built with {built}: the label was changed"
        )));
    }
    Ok(PodTerms { attempt: attempt_label, budget })
}

#[cfg(test)]
#[path = "grants_tests.rs"]
mod tests;
