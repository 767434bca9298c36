//! Fail closed when the identity admission policies are not in force.
//!
//! A vote's `spec.voter` and `spec.voterGroups`, and a job's `agentgate.dev/requested-by`
//! annotation, are true only because the policies of `deploy/admission/identity.yaml` make them
//! so. Without them (deleted, edited, switched to `Warn`, or a cluster older than 1.36 where
//! MutatingAdmissionPolicy is not served) anyone may vote in anyone's name or claim
//! `voterGroups: [system:masters]`. So the operator watches those policies and their bindings,
//! compares each with the copy compiled into it, and while any is missing or differs it counts
//! no vote at all: jobs awaiting approval say `Approved=False` with reason
//! `IdentityPoliciesMissing` and what is missing, `agentgate_identity_policies_missing` counts the
//! problems and `/readyz` names them. A job without the author annotation is never approved
//! either (`AuthorUnknown`): it was created while the policy was not in force, and its author
//! could approve it.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding, ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::Value;

use super::triggers::Triggers;
use super::watches::WatchBackoff;
use crate::api::{AgentJob, IgnoredVote, JobPhase};
use crate::domain::decide::{Plan, PlannedEvent, condition};
use crate::domain::tally::Tally;

/// The policies as shipped; the operator holds the cluster's copies to these.
const SHIPPED: &str = include_str!("../../deploy/admission/identity.yaml");

/// Reasons on the `Approved` condition while votes cannot be trusted.
pub const POLICIES_MISSING: &str = "IdentityPoliciesMissing";
pub const AUTHOR_UNKNOWN: &str = "AuthorUnknown";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Validating,
    ValidatingBinding,
    Mutating,
    MutatingBinding,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Validating, Kind::ValidatingBinding, Kind::Mutating, Kind::MutatingBinding];

    fn name(self) -> &'static str {
        match self {
            Kind::Validating => "ValidatingAdmissionPolicy",
            Kind::ValidatingBinding => "ValidatingAdmissionPolicyBinding",
            Kind::Mutating => "MutatingAdmissionPolicy",
            Kind::MutatingBinding => "MutatingAdmissionPolicyBinding",
        }
    }

    fn resource(self) -> &'static str {
        match self {
            Kind::Validating => "validatingadmissionpolicies",
            Kind::ValidatingBinding => "validatingadmissionpolicybindings",
            Kind::Mutating => "mutatingadmissionpolicies",
            Kind::MutatingBinding => "mutatingadmissionpolicybindings",
        }
    }

    fn from_name(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == kind)
    }
}

/// One shipped object: its kind, name and spec.
#[derive(Clone, Debug)]
pub struct Expected {
    pub kind: Kind,
    pub name: String,
    pub spec: Value,
}

/// The shipped identity policies, parsed from the manifest compiled in. A manifest that does not
/// parse is a build defect that tests catch; at run time it yields nothing to hold the cluster
/// to, which `problems` reports as a problem rather than trusting every vote.
pub fn shipped() -> Vec<Expected> {
    SHIPPED
        .split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok())
        .filter_map(|o| {
            Some(Expected {
                kind: Kind::from_name(o["kind"].as_str()?)?,
                name: o["metadata"]["name"].as_str()?.to_string(),
                spec: o["spec"].clone(),
            })
        })
        .collect()
}

/// What the watch of one kind has seen.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// True once a full list arrived.
    pub listed: bool,
    /// Specs by name, of the shipped names only.
    pub specs: BTreeMap<String, Value>,
    /// The last error of the watch, cleared by the next full list.
    pub error: Option<String>,
}

/// The problems that stop votes from counting; `None` until every kind was listed or failed to
/// be listed (the operator does not decide anything on votes before that).
pub fn problems(shipped: &[Expected], seen: &BTreeMap<Kind, Seen>) -> Option<Vec<String>> {
    let mut out = Vec::new();
    if !Kind::ALL.iter().all(|k| shipped.iter().any(|e| e.kind == *k)) {
        out.push("the identity policies compiled into the operator do not parse (a build defect)".to_string());
    }
    for kind in Kind::ALL {
        let s = seen.get(&kind)?;
        if !s.listed {
            let error = s.error.as_deref()?;
            out.push(format!(
                "{} cannot be listed ({error}); MutatingAdmissionPolicy needs Kubernetes 1.36 or later, and the operator's RBAC \
                 must allow list and watch",
                kind.resource()
            ));
        }
    }
    for e in shipped {
        let Some(s) = seen.get(&e.kind).filter(|s| s.listed) else { continue };
        match s.specs.get(&e.name) {
            None => out.push(format!("{} {} is missing", e.kind.name(), e.name)),
            Some(live) => {
                let mut diffs = Vec::new();
                differences(&e.spec, live, "spec", &mut diffs);
                if !diffs.is_empty() {
                    out.push(format!("{} {} differs from what agentgate ships: {}", e.kind.name(), e.name, diffs.join("; ")));
                }
            }
        }
    }
    Some(out)
}

/// Fields the apiserver fills in by default, which a shipped spec leaves out and which change
/// nothing it enforces.
const DEFAULTS: &[(&str, &str)] = &[("matchPolicy", "Equivalent"), ("scope", "*")];

/// Where `live` departs from `shipped`: every shipped field must be there with the same value, and
/// anything more must be empty or a harmless default, since an added selector, match condition or
/// exclusion narrows what the policy covers.
pub fn differences(shipped: &Value, live: &Value, path: &str, out: &mut Vec<String>) {
    match (shipped, live) {
        (Value::Object(want), Value::Object(have)) => {
            for (k, w) in want {
                let p = format!("{path}.{k}");
                match have.get(k) {
                    Some(h) => differences(w, h, &p, out),
                    None => out.push(format!("{p} is absent")),
                }
            }
            for (k, h) in have.iter().filter(|(k, _)| !want.contains_key(*k)) {
                if !benign(k, h) {
                    out.push(format!("{path}.{k} is set to {h}, which agentgate does not ship"));
                }
            }
        }
        (Value::Array(want), Value::Array(have)) if want.len() == have.len() => {
            for (i, (w, h)) in want.iter().zip(have).enumerate() {
                differences(w, h, &format!("{path}[{i}]"), out);
            }
        }
        (w, h) if w == h => {}
        (w, h) => out.push(format!("{path} is {h}, agentgate ships {w}")),
    }
}

/// Whether a field the shipped spec leaves out changes nothing: empty, a default, or an object
/// of such fields (a defaulted `matchResources: {namespaceSelector: {}, matchPolicy: Equivalent}`).
fn benign(key: &str, value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(o) => o.iter().all(|(k, v)| benign(k, v)),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => DEFAULTS.contains(&(key, s.as_str())),
        _ => false,
    }
}

/// The operator's view of the identity policies, shared by the watches and every reconcile.
pub struct Gate {
    shipped: Vec<Expected>,
    seen: Mutex<BTreeMap<Kind, Seen>>,
    current: Mutex<Option<Vec<String>>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate { shipped: shipped(), seen: Mutex::default(), current: Mutex::default() }
    }
}

impl Gate {
    /// The problems now; `None` before the first lists (or failures) of all four kinds.
    pub fn problems(&self) -> Option<Vec<String>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Records what a watch saw; true when the problems changed.
    fn update(&self, kind: Kind, change: impl FnOnce(&mut Seen)) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        change(seen.entry(kind).or_default());
        let now = problems(&self.shipped, &seen);
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = *current != now;
        *current = now;
        changed
    }

    /// Why no vote on a job may count now, if any: `(reason, message)`.
    pub fn block(&self, author: Option<&str>) -> Option<(&'static str, String)> {
        match self.problems() {
            Some(p) if !p.is_empty() => Some((
                POLICIES_MISSING,
                format!(
                    "no vote counts while the identity admission policies are not in force (votes' voters and groups cannot be \
                     trusted): {}",
                    p.join("; ")
                ),
            )),
            // Not yet known: the reconcile waits for it (`verified`), this is a safe default.
            None => Some((POLICIES_MISSING, "the identity admission policies have not been verified yet".to_string())),
            Some(_) if author.is_none_or(str::is_empty) => Some((
                AUTHOR_UNKNOWN,
                "the job has no agentgate.dev/requested-by annotation (it was created while the identity admission policies were \
                 not in force), so its author could approve it; no vote counts until an update of the job, admitted with the \
                 policies in force, records its author"
                    .to_string(),
            )),
            Some(_) => None,
        }
    }

    /// True once all four kinds were listed or found unlistable.
    pub fn verified(&self) -> bool {
        self.problems().is_some()
    }
}

/// Counts no vote: every vote that would have counted is listed as ignored, with `why`.
pub fn void_votes(tally: &mut Tally, why: &str) {
    let counted = tally.approvers.drain(..).map(|a| a.vote).chain(tally.rejected_by.take().map(|r| r.vote));
    let ignored: Vec<IgnoredVote> = counted.map(|name| IgnoredVote { name, why: why.to_string() }).collect();
    tally.ignored.extend(ignored);
    tally.approver_groups.clear();
}

/// Gives a job that waits for votes the specific reason it waits: the `Approved` and `Ready`
/// conditions say `reason` instead of `AwaitingApproval`, and a Warning Event is planned when the
/// job did not say so already.
pub fn explain(plan: &mut Plan, old: &crate::api::AgentJobStatus, reason: &str, message: &str) {
    if plan.status.phase != Some(JobPhase::AwaitingApproval) {
        return;
    }
    for type_ in [condition::APPROVED, condition::READY] {
        if let Some(c) = plan.status.conditions.iter_mut().find(|c| c.type_ == type_ && c.reason == "AwaitingApproval") {
            c.reason = reason.into();
            c.message = crate::domain::validate::bounded_to(&format!("{message}; {}", c.message), 30_000).into();
        }
    }
    let said = crate::domain::conditions::find(&old.conditions, condition::APPROVED).is_some_and(|c| c.reason == reason);
    if !said {
        plan.events.push(PlannedEvent { warning: true, reason: reason.to_string(), note: message.to_string() });
    }
}

/// Who hears of a change of the problems: the metric, `/readyz`, and the current term's
/// controller (none while standing by).
pub struct Listeners {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub health: Arc<crate::state::Health>,
    pub jobs: Store<AgentJob>,
    pub requeue: Triggers<AgentJob>,
}

/// Watches the four kinds until the operator stops, keeping `gate` current. The watches live as
/// long as the process (watches.rs), so a retaken term lists none of them again and finds the
/// gate as they last saw it. Each change of the problems is logged, counted in the metric and
/// `/readyz`, and every job that is not running or finished is looked at again: votes stop or
/// resume counting.
pub async fn run(gate: Arc<Gate>, client: Client, told: Listeners) {
    let watched = (gate, told);
    futures::future::join4(
        watch_kind::<ValidatingAdmissionPolicy>(&watched, client.clone(), Kind::Validating),
        watch_kind::<ValidatingAdmissionPolicyBinding>(&watched, client.clone(), Kind::ValidatingBinding),
        watch_kind::<MutatingAdmissionPolicy>(&watched, client.clone(), Kind::Mutating),
        watch_kind::<MutatingAdmissionPolicyBinding>(&watched, client, Kind::MutatingBinding),
    )
    .await;
}

async fn watch_kind<K>((gate, told): &(Arc<Gate>, Listeners), client: Client, kind: Kind)
where
    K: Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + serde::de::DeserializeOwned
        + serde::Serialize
        + Send
        + 'static,
{
    let names: Vec<String> = gate.shipped.iter().filter(|e| e.kind == kind).map(|e| e.name.clone()).collect();
    let spec_of = |o: &K| serde_json::to_value(o).ok().map(|v| v["spec"].clone()).unwrap_or(Value::Null);
    let mut pending: BTreeMap<String, Value> = BTreeMap::new();
    let mut stream = watch(Api::<K>::all(client), watcher::Config::default()).backoff(WatchBackoff::new()).boxed();
    while let Some(event) = stream.next().await {
        let changed = match event {
            Ok(Event::Init) => {
                pending.clear();
                false
            }
            Ok(Event::InitApply(o)) => {
                if names.contains(&o.name_any()) {
                    pending.insert(o.name_any(), spec_of(&o));
                }
                false
            }
            Ok(Event::InitDone) => gate.update(kind, |s| {
                s.specs = std::mem::take(&mut pending);
                s.listed = true;
                s.error = None;
            }),
            Ok(Event::Apply(o)) if names.contains(&o.name_any()) => gate.update(kind, |s| {
                s.specs.insert(o.name_any(), spec_of(&o));
            }),
            Ok(Event::Delete(o)) if names.contains(&o.name_any()) => gate.update(kind, |s| {
                s.specs.remove(&o.name_any());
            }),
            Ok(_) => false,
            // A watch that breaks after a full list keeps what it saw (an apiserver restart is no
            // reason to stop counting votes); one that never listed is a problem of its own.
            Err(e) => gate.update(kind, |s| s.error = Some(e.to_string())),
        };
        if changed {
            announce(gate, told);
        }
    }
}

fn announce(gate: &Gate, told: &Listeners) {
    let problems = gate.problems().unwrap_or_default();
    told.metrics.identity_policies_missing.set(problems.len() as i64);
    if problems.is_empty() {
        tracing::info!("identity admission policies in force: votes count");
    } else {
        tracing::warn!(?problems, "identity admission policies not in force: no vote counts");
    }
    // A standby's /readyz names none (state.rs); a new term reads them from the gate (`lead`).
    if told.health.leading.load(std::sync::atomic::Ordering::Relaxed) {
        *told.health.identity_problems.write().unwrap_or_else(PoisonError::into_inner) = Some(problems);
    }
    let waiting = told.jobs.state_filter(|j| {
        let phase = j.status.as_ref().and_then(|s| s.phase);
        !phase.is_some_and(|p| p.is_terminal() || p == JobPhase::Running)
    });
    for job in waiting {
        let _ = told.requeue.send(ObjectRef::from_obj(job.as_ref()));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn all_seen(shipped: &[Expected]) -> BTreeMap<Kind, Seen> {
        let mut seen: BTreeMap<Kind, Seen> = Kind::ALL.into_iter().map(|k| (k, Seen { listed: true, ..Seen::default() })).collect();
        for e in shipped {
            let mut live = e.spec.clone();
            // What the apiserver adds by default.
            if let Some(mc) = live.get_mut("matchConstraints") {
                mc["matchPolicy"] = json!("Equivalent");
                mc["namespaceSelector"] = json!({});
                mc["objectSelector"] = json!({});
                for rule in mc["resourceRules"].as_array_mut().unwrap() {
                    rule["scope"] = json!("*");
                }
            }
            if matches!(e.kind, Kind::ValidatingBinding | Kind::MutatingBinding) {
                live["matchResources"] = json!({"namespaceSelector": {}, "objectSelector": {}, "matchPolicy": "Equivalent"});
            }
            seen.get_mut(&e.kind).unwrap().specs.insert(e.name.clone(), live);
        }
        seen
    }

    #[test]
    fn the_shipped_policies_parse_into_four_objects() {
        let kinds: Vec<Kind> = shipped().iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [Kind::Validating, Kind::ValidatingBinding, Kind::Mutating, Kind::MutatingBinding, Kind::Mutating, Kind::MutatingBinding]
                [..kinds.len()]
        );
        assert_eq!(kinds.len(), 6);
    }

    #[test]
    fn policies_as_shipped_with_server_defaults_are_in_force() {
        let s = shipped();
        assert_eq!(problems(&s, &all_seen(&s)), Some(vec![]));
    }

    #[test]
    fn unknown_until_every_kind_was_listed_or_failed() {
        let s = shipped();
        let mut seen = all_seen(&s);
        seen.get_mut(&Kind::Mutating).unwrap().listed = false;
        assert_eq!(problems(&s, &seen), None);
        seen.get_mut(&Kind::Mutating).unwrap().error = Some("the server could not find the requested resource".into());
        let p = problems(&s, &seen).unwrap();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("mutatingadmissionpolicies cannot be listed (the server could not find"), "{p:?}");
        assert!(p[0].contains("Kubernetes 1.36 or later"), "{p:?}");
    }

    #[test]
    fn each_missing_altered_or_weakened_object_is_a_problem() {
        let s = shipped();
        type Edit = fn(&mut BTreeMap<Kind, Seen>);
        let cases: &[(&str, Edit, &str)] = &[
            (
                "binding deleted",
                |seen| {
                    seen.get_mut(&Kind::ValidatingBinding).unwrap().specs.clear();
                },
                "ValidatingAdmissionPolicyBinding agentgate-approvalvote-identity is missing",
            ),
            (
                "binding only warns",
                |seen| {
                    let b = seen.get_mut(&Kind::ValidatingBinding).unwrap().specs.get_mut("agentgate-approvalvote-identity").unwrap();
                    b["validationActions"] = json!(["Warn"]);
                },
                "spec.validationActions[0] is \"Warn\", agentgate ships \"Deny\"",
            ),
            (
                "failure ignored",
                |seen| {
                    let p = seen.get_mut(&Kind::Mutating).unwrap().specs.get_mut("agentgate-approvalvote-voter-groups").unwrap();
                    p["failurePolicy"] = json!("Ignore");
                },
                "spec.failurePolicy is \"Ignore\", agentgate ships \"Fail\"",
            ),
            (
                "a namespace exempted",
                |seen| {
                    let b = seen.get_mut(&Kind::MutatingBinding).unwrap().specs.get_mut("agentgate-agentjob-requested-by").unwrap();
                    b["matchResources"] = json!({"namespaceSelector": {"matchLabels": {"team": "mallory"}}});
                },
                "spec.matchResources is set to",
            ),
            (
                "an expression rewritten",
                |seen| {
                    let p = seen.get_mut(&Kind::Validating).unwrap().specs.get_mut("agentgate-approvalvote-identity").unwrap();
                    p["validations"][0]["expression"] = json!("true");
                },
                "spec.validations[0].expression is \"true\"",
            ),
            (
                "a match condition added",
                |seen| {
                    let p = seen.get_mut(&Kind::Mutating).unwrap().specs.get_mut("agentgate-agentjob-requested-by").unwrap();
                    p["matchConditions"] = json!([{"name": "not-mallory", "expression": "request.userInfo.username != 'mallory'"}]);
                },
                "spec.matchConditions is set to",
            ),
        ];
        for (name, edit, want) in cases {
            let mut seen = all_seen(&s);
            edit(&mut seen);
            let p = problems(&s, &seen).unwrap();
            assert_eq!(p.len(), 1, "{name}: {p:?}");
            assert!(p[0].contains(want), "{name}: {p:?} should contain {want:?}");
        }
    }

    #[test]
    fn voided_votes_say_why_and_nothing_counts() {
        let approver = |v: &str| crate::api::Approver { voter: v.into(), vote: format!("{v}-vote"), decided_at: None, reason: None };
        let mut t = Tally {
            required: 2,
            approvers: vec![approver("alice"), approver("bob")],
            rejected_by: Some(approver("carol")),
            ignored: vec![IgnoredVote { name: "dave-vote".into(), why: "dave is not a head".into() }],
            ..Tally::default()
        };
        void_votes(&mut t, "policies missing");
        assert!(!t.approved() && t.approvers.is_empty() && t.rejected_by.is_none());
        let why: Vec<(&str, &str)> = t.ignored.iter().map(|i| (i.name.as_str(), i.why.as_str())).collect();
        assert_eq!(
            why,
            [
                ("dave-vote", "dave is not a head"),
                ("alice-vote", "policies missing"),
                ("bob-vote", "policies missing"),
                ("carol-vote", "policies missing")
            ]
        );
    }
}
