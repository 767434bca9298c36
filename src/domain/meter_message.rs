//! The meter's second channel: its own container's termination message.
//!
//! A meter reports its usage to the operator's meter API (domain/grants.rs), which a tenant can
//! cut off (a NetworkPolicy of their namespace, anything that makes the API unreachable from the
//! Pod): the meter then spends what it holds, and what it spent after the last report that got
//! through never reached the job. So the meter also keeps its cumulative usage in its
//! termination message (`/dev/termination-log`, src/meter/mod.rs), which the kubelet copies into
//! the Pod's status (`initContainerStatuses[].state.terminated.message`) when it stops. Neither
//! the tenant nor the agent can write it: the file is the meter container's own (no volume of
//! the agent reaches it), exec and ephemeral containers into agent Pods are refused
//! (deploy/admission/pods.yaml), and `edit`/`admin` grant no `pods/status` write.
//!
//! When it settles an attempt the operator takes, session by session, the larger of the two
//! cumulative figures ([`measure_attempt`]): never a sum, so a session both channels carry is
//! counted once, and usage never goes down. A Pod whose meter ran and of which neither channel
//! says anything is not counted from its agent's own report, which the agent writes: its usage
//! is unmeasured (`UsageUnmeasured`).

use std::collections::BTreeMap;

use super::grants::{check_usage, session_key};
use super::money::MicroUsd;
use super::pricing::TokenCounts;
use super::report::{add_model_usage, fold_models, model_tokens};
use crate::api::{MeterStatus, Usage};

/// What the kubelet keeps of a container's termination message (its last 4 KiB).
pub const MAX_BYTES: usize = 4096;
const VERSION: u32 = 1;
const MAX_TOKENS: i64 = 1_000_000_000_000;

/// What one meter process left in its termination message.
#[derive(Clone, Debug, PartialEq)]
pub struct MeterMessage {
    /// The session's digest, as status names it ([`session_key`]), never its id: the Pod's
    /// status is readable by the job's tenants, and the id speaks for the session.
    pub session: String,
    /// Cumulative since the meter started: tokens and cost per model, as the meter charged them.
    pub usage: Usage,
    pub budget_refusals: i64,
}

/// One model: name, cost the meter charged, then input, cached input, output, cache-write and
/// 1-hour cache-write tokens. An array, not an object: a model costs its name and ~40 bytes.
type ModelEntry = (String, String, i64, i64, i64, i64, i64);

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    #[serde(rename = "agentgateMeter")]
    version: u32,
    session: String,
    #[serde(rename = "costUSD")]
    cost_usd: String,
    #[serde(rename = "budgetRefusals", default, skip_serializing_if = "is_zero")]
    budget_refusals: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    models: Vec<ModelEntry>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn wire(session: &str, usage: &Usage, budget_refusals: i64) -> Wire {
    let models = usage
        .models
        .iter()
        .map(|m| {
            (
                m.model.clone(),
                m.cost_usd.clone(),
                m.input_tokens,
                m.cached_input_tokens,
                m.output_tokens,
                m.cache_write_input_tokens,
                m.cache_write_1h_input_tokens,
            )
        })
        .collect();
    Wire { version: VERSION, session: session.to_string(), cost_usd: usage.cost_usd.clone(), budget_refusals, models }
}

/// The message for a meter whose session has digest `session`: compact JSON of at most
/// [`MAX_BYTES`], the costliest models listed and the rest folded into `(other models)` as status
/// folds them (every total exact), so the kubelet never cuts it.
pub fn encode(session: &str, usage: &Usage, budget_refusals: i64) -> String {
    let mut usage = usage.clone();
    fold_models(&mut usage, super::grants::MAX_MODELS);
    loop {
        let text = serde_json::to_string(&wire(session, &usage, budget_refusals)).unwrap_or_default();
        if text.len() <= MAX_BYTES || usage.models.len() <= 1 {
            return text;
        }
        // Each entry is at most ~200 bytes (names are at most 128): drop as many as the excess
        // needs, at least one.
        let excess = text.len() - MAX_BYTES;
        let fewer = usage.models.len().saturating_sub(excess.div_ceil(200).max(1));
        fold_models(&mut usage, fewer);
    }
}

/// A meter's termination message, or why it is not one. Only the meter writes it; anything else
/// there (a kubelet's "Error on reading termination log", a message cut short) is no figure.
pub fn parse(text: &str) -> Result<MeterMessage, String> {
    if text.len() > MAX_BYTES {
        return Err(format!("longer than {MAX_BYTES} bytes"));
    }
    let wire: Wire = serde_json::from_str(text.trim()).map_err(|e| format!("not a meter's message: {e}"))?;
    if wire.version != VERSION {
        return Err(format!("version {} unknown", wire.version));
    }
    let digest = wire.session.strip_prefix("sha256:").unwrap_or_default();
    if digest.len() != 32 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("session is not a session digest".into());
    }
    if !(0..=MAX_TOKENS).contains(&wire.budget_refusals) {
        return Err("budgetRefusals out of range".into());
    }
    let mut usage = Usage::default();
    let mut seen = std::collections::BTreeSet::new();
    for (model, cost, input, cached_input, output, cache_write, cache_write_1h) in &wire.models {
        let tokens = TokenCounts {
            input: *input,
            cached_input: *cached_input,
            output: *output,
            cache_write: *cache_write,
            cache_write_1h: *cache_write_1h,
        };
        if [tokens.input, tokens.cached_input, tokens.output, tokens.cache_write, tokens.cache_write_1h]
            .iter()
            .any(|t| !(0..=MAX_TOKENS).contains(t))
        {
            return Err(format!("model {:?}: a token count out of range", model.chars().take(128).collect::<String>()));
        }
        if !seen.insert(model.as_str()) {
            return Err(format!("model {:?} listed twice", model.chars().take(128).collect::<String>()));
        }
        let cost = MicroUsd::parse(cost)
            .ok_or_else(|| format!("model {:?}: costUSD is not a USD amount", model.chars().take(128).collect::<String>()))?;
        add_model_usage(&mut usage, model, &tokens, cost);
    }
    usage.cost_usd = wire.cost_usd;
    // The same checks as a report through the meter API: names, counts, amounts.
    check_usage(&usage).map_err(|e| e.to_string())?;
    fold_models(&mut usage, super::grants::MAX_MODELS);
    Ok(MeterMessage { session: wire.session, usage, budget_refusals: wire.budget_refusals })
}

/// What one agent Pod's status says of its meter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodMeter {
    /// The Pod's meter ran: its container started (the kubelet says so, in the Pod's status).
    /// The agent starts only once its meter answers (its startup probe), so an agent that ran
    /// had a meter that ran; a meter that never started let nothing through.
    pub ran: bool,
    /// The messages of the meter's stopped processes the Pod's status still shows (the last one
    /// and, after a restart, the one before): cumulative figures of the Pod's session (a
    /// restarted meter carries it on, src/meter/state_file.rs), or of sessions of their own
    /// (meters without a state file, or after a settled session).
    pub messages: Vec<MeterMessage>,
    /// The meter ran one process, which exited 0: stopped with SIGTERM, it let every call end
    /// before it wrote its last message, so that message is its session's exact final usage,
    /// with nothing in flight. A meter killed (OOM, SIGKILL: an agent can make its own meter
    /// run out of memory) or restarted may have had calls in flight that the provider billed
    /// and no message counts; its grant stays held ([`Measurement::final_by_message`]).
    pub exited_cleanly: bool,
}

/// What the meters of one attempt measured, through both channels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measurement {
    /// Summed over the attempt's sessions; None when no session is known through either channel.
    pub usage: Option<Usage>,
    /// Calls the meters refused for budget, over the sessions (the larger count of each).
    pub budget_refusals: i64,
    /// Pods whose meter ran and of which neither channel says anything.
    pub unmeasured: Vec<String>,
    /// Sessions the meter API knew whose termination message said more than it had been told
    /// (their meter was cut off from the operator, or stopped before its last report got through).
    pub raised_by_messages: Vec<String>,
    /// Sessions whose final usage a termination message gives, by digest: what counts of each
    /// (the larger figure of the two channels) and its refusals. Only of meters that exited
    /// cleanly ([`PodMeter::exited_cleanly`]): the operator settles their grants to it
    /// (domain/grants.rs `settle_from_messages`).
    pub final_by_message: BTreeMap<String, (Usage, i64)>,
}

/// Measures an attempt from its meters' reports through the meter API (`meter`'s grants of
/// `attempt`) and from the termination messages of its Pods' meters (`pods`): per session the
/// larger figure (by cost, then tokens: both are the same meter's cumulative totals, so the
/// larger is the later), every session once.
pub fn measure_attempt(meter: Option<&MeterStatus>, attempt: i32, pods: &[(&str, &PodMeter)]) -> Measurement {
    // Session digest → (pod, usage, refusals). An operator older than the digests recorded a
    // session by its id: its digest is computed here, so both channels find each other.
    let mut sessions: BTreeMap<String, (String, Usage, i64)> = BTreeMap::new();
    let grants = meter.map(|m| m.grants.as_slice()).unwrap_or_default();
    for g in grants.iter().filter(|g| g.attempt == attempt) {
        let Some(usage) = &g.usage else { continue };
        let key = if g.session.starts_with("sha256:") { g.session.clone() } else { session_key(&g.session) };
        sessions.insert(key, (g.pod.clone(), usage.clone(), g.budget_refusals.max(0)));
    }
    let mut raised = Vec::new();
    let mut unmeasured = Vec::new();
    let mut by_message = std::collections::BTreeSet::new();
    for (pod, pod_meter) in pods {
        // A session's two messages (a meter restarted, carrying on its Pod's session:
        // meter/state_file.rs) are the same cumulative figure at two times: the larger counts.
        for message in &pod_meter.messages {
            if pod_meter.exited_cleanly {
                by_message.insert(message.session.clone());
            }
            match sessions.get_mut(&message.session) {
                Some((_, usage, refusals)) => {
                    if larger(&message.usage, usage) {
                        *usage = message.usage.clone();
                        let note = format!("{pod}: {}", message.session);
                        if !raised.contains(&note) {
                            raised.push(note);
                        }
                    }
                    *refusals = (*refusals).max(message.budget_refusals);
                }
                None => {
                    // Never seen by the meter API: a fixed-budget meter, which reports nothing to
                    // it, or one that never got through (and so never held a grant to spend). Its
                    // message is all there is; zero usage is still a measurement.
                    sessions.insert(message.session.clone(), (pod.to_string(), message.usage.clone(), message.budget_refusals));
                }
            }
        }
        let reported = sessions.values().any(|(p, _, _)| p == pod);
        if pod_meter.ran && !reported {
            unmeasured.push(pod.to_string());
        }
    }
    let usages: Vec<&Usage> = sessions.values().map(|(_, u, _)| u).collect();
    Measurement {
        usage: (!usages.is_empty()).then(|| super::grants::sum_usages(&usages)),
        budget_refusals: sessions.values().map(|(_, _, r)| *r).fold(0, i64::saturating_add),
        unmeasured,
        raised_by_messages: raised,
        final_by_message: sessions.into_iter().filter(|(key, _)| by_message.contains(key)).map(|(key, (_, u, r))| (key, (u, r))).collect(),
    }
}

/// Whether `a` is a later figure of the same meter than `b`.
fn larger(a: &Usage, b: &Usage) -> bool {
    let cost = |u: &Usage| MicroUsd::parse(&u.cost_usd).unwrap_or_default();
    let tokens = |u: &Usage| u.models.iter().map(|m| model_tokens(m).total()).fold(0i64, i64::saturating_add);
    (cost(a), tokens(a)) > (cost(b), tokens(b))
}

#[cfg(test)]
#[path = "meter_message_tests.rs"]
mod tests;
