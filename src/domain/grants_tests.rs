use super::*;
use crate::api::ModelUsage;

fn usd(text: &str) -> MicroUsd {
    MicroUsd::parse(text).unwrap()
}

fn who(pod: &str, attempt: i32) -> MeterIdentity {
    MeterIdentity { pod: pod.into(), pod_uid: format!("uid-{pod}"), attempt }
}

fn usage(cost: &str, output: i64) -> Usage {
    let mut u = Usage::default();
    add_model_usage(&mut u, "gpt-4o-mini", &TokenCounts { input: 10, cached_input: 0, output, ..Default::default() }, usd(cost));
    u.cost_usd = cost.into();
    u
}

fn ask(session: &str, sequence: i64, spent: &str, want: &str) -> SyncRequest {
    SyncRequest { session: session.into(), sequence, usage: usage(spent, sequence), want: usd(want), last: false, budget_refusals: 0 }
}

fn settle(session: &str, sequence: i64, spent: &str) -> SyncRequest {
    SyncRequest { last: true, want: MicroUsd(0), ..ask(session, sequence, spent, "0") }
}

#[test]
fn grants_never_exceed_the_budget_and_the_last_one_gets_what_is_left() {
    let mut m = MeterStatus::default();
    let budget = usd("1.00");
    let r = apply(&mut m, budget, &who("a", 1), &ask("s1", 1, "0", "0.40"), true).unwrap();
    assert_eq!((r.granted, r.granted_now, r.available), (usd("0.40"), usd("0.40"), usd("0.60")));
    let r = apply(&mut m, budget, &who("b", 1), &ask("s2", 1, "0", "0.40"), true).unwrap();
    assert_eq!(r.granted_now, usd("0.40"));
    let r = apply(&mut m, budget, &who("c", 1), &ask("s3", 1, "0", "0.40"), true).unwrap();
    assert_eq!((r.granted_now, r.available), (usd("0.20"), MicroUsd(0)), "only what is left");
    let r = apply(&mut m, budget, &who("c", 1), &ask("s3", 2, "0", "0.40"), true).unwrap();
    assert_eq!((r.granted, r.granted_now), (usd("0.20"), MicroUsd(0)), "nothing left: nothing more");
    assert_eq!((m.granted_usd.as_str(), m.committed_usd.as_str()), ("1.00", "1.00"));
}

#[test]
fn a_retried_request_is_answered_the_same_and_never_applied_twice() {
    let mut m = MeterStatus::default();
    let first = apply(&mut m, usd("1"), &who("a", 1), &ask("s1", 1, "0", "0.30"), true).unwrap();
    let before = m.clone();
    let again = apply(&mut m, usd("1"), &who("a", 1), &ask("s1", 1, "0", "0.30"), true).unwrap();
    assert_eq!(m, before, "nothing changed");
    assert_eq!((again.granted, again.granted_now, again.changed), (first.granted, MicroUsd(0), false));
    // An older request arriving late is a retry too.
    apply(&mut m, usd("1"), &who("a", 1), &ask("s1", 3, "0.10", "0"), true).unwrap();
    let late = apply(&mut m, usd("1"), &who("a", 1), &ask("s1", 2, "0.05", "0.50"), true).unwrap();
    assert!(!late.changed);
    assert_eq!(m.grants[0].spent_usd, "0.10");
}

fn apply_open(m: &mut MeterStatus, budget: MicroUsd, w: &MeterIdentity, r: &SyncRequest) -> Result<SyncReply, SyncError> {
    apply(m, budget, w, r, true)
}

#[test]
fn settling_returns_the_unspent_grant_and_an_unsettled_grant_stays_held() {
    let mut m = MeterStatus::default();
    let budget = usd("1.00");
    apply_open(&mut m, budget, &who("a", 1), &ask("s1", 1, "0", "0.60")).unwrap();
    apply_open(&mut m, budget, &who("b", 1), &ask("s2", 1, "0", "0.40")).unwrap();
    // b reports 0.05 spent but dies without settling: its whole grant stays held.
    apply_open(&mut m, budget, &who("b", 1), &ask("s2", 2, "0.05", "0")).unwrap();
    // a settles having spent 0.25: 0.35 goes back.
    let r = apply_open(&mut m, budget, &who("a", 1), &settle("s1", 2, "0.25")).unwrap();
    assert_eq!(r.available, usd("0.35"));
    assert_eq!((m.spent_usd.as_str(), m.committed_usd.as_str(), m.granted_usd.as_str()), ("0.30", "0.65", "1.00"));
    // A retry's meter draws on what came back.
    let r = apply_open(&mut m, budget, &who("a2", 2), &ask("s3", 1, "0", "1.00")).unwrap();
    assert_eq!(r.granted_now, usd("0.35"));
    assert!(matches!(apply_open(&mut m, budget, &who("a", 1), &settle("s1", 3, "0.25")), Err(SyncError::Settled(_))));
}

#[test]
fn a_finished_job_takes_reports_but_grants_nothing() {
    let mut m = MeterStatus::default();
    let r = apply(&mut m, usd("1"), &who("a", 1), &ask("s1", 1, "0.01", "0.50"), false).unwrap();
    assert_eq!((r.granted_now, m.spent_usd.as_str()), (MicroUsd(0), "0.01"));
}

#[test]
fn another_pods_session_usage_going_down_and_bad_usage_are_refused() {
    let mut m = MeterStatus::default();
    apply_open(&mut m, usd("1"), &who("a", 1), &ask("s1", 1, "0.20", "0.50")).unwrap();
    let before = m.clone();
    assert_eq!(apply_open(&mut m, usd("1"), &who("b", 1), &ask("s1", 2, "0.30", "0.5")), Err(SyncError::SessionOfAnotherPod("s1".into())));
    assert!(matches!(apply_open(&mut m, usd("1"), &who("a", 1), &ask("s1", 2, "0.10", "0")), Err(SyncError::UsageWentDown { .. })));
    let mut bad = ask("s1", 2, "0.30", "0");
    bad.usage.models.push(ModelUsage { model: "x".into(), input_tokens: -1, cost_usd: "0".into(), ..ModelUsage::default() });
    assert!(matches!(apply_open(&mut m, usd("1"), &who("a", 1), &bad), Err(SyncError::BadUsage(_))));
    let mut bad = ask("s1", 2, "0.30", "0");
    bad.usage.models.push(ModelUsage { model: "x".into(), cache_write_1h_input_tokens: -1, cost_usd: "0".into(), ..ModelUsage::default() });
    assert!(matches!(apply_open(&mut m, usd("1"), &who("a", 1), &bad), Err(SyncError::BadUsage(_))), "cache writes are checked too");
    assert_eq!(m, before, "refusals change nothing");
}

#[test]
fn a_meter_that_spent_past_its_grant_holds_what_it_spent() {
    // Only a rounding slack of the meter's can do this; the budget still counts it.
    let mut m = MeterStatus::default();
    apply_open(&mut m, usd("1"), &who("a", 1), &ask("s1", 1, "0", "0.10")).unwrap();
    apply_open(&mut m, usd("1"), &who("a", 1), &ask("s1", 2, "0.100002", "0")).unwrap();
    assert_eq!(available(&m, usd("1")), usd("0.899998"));
}

#[test]
fn sessions_are_bounded() {
    let mut m = MeterStatus::default();
    for i in 0..MAX_GRANTS {
        apply_open(&mut m, usd("1000"), &who("a", 1), &ask(&format!("s{i}"), 1, "0", "0")).unwrap();
    }
    assert_eq!(apply_open(&mut m, usd("1000"), &who("a", 1), &ask("one-more", 1, "0", "0")), Err(SyncError::TooManySessions));
}

#[test]
fn an_attempts_usage_sums_its_sessions_and_a_claim_is_compared_token_for_token() {
    let mut m = MeterStatus::default();
    apply_open(&mut m, usd("1"), &who("a", 1), &ask("s1", 5, "0.02", "0")).unwrap();
    apply_open(&mut m, usd("1"), &who("b", 1), &ask("s2", 7, "0.03", "0")).unwrap();
    apply_open(&mut m, usd("1"), &who("c", 2), &ask("s3", 1, "0.50", "0")).unwrap();
    let one = attempt_usage(Some(&m), 1).unwrap();
    assert_eq!((one.output_tokens, one.input_tokens, one.cost_usd.as_str()), (12, 20, "0.05"));
    assert_eq!(one.models[0].cost_usd, "0.05");
    assert_eq!(attempt_usage(Some(&m), 3), None, "not metered");
    let mut claim = tokens_of(&one);
    assert_eq!(claim_mismatch(&one, &claim), None);
    claim.get_mut("gpt-4o-mini").unwrap().output = 3;
    let why = claim_mismatch(&one, &claim).unwrap();
    assert!(why.contains("metered 20/0/12") && why.contains("claimed 20/0/3"), "{why}");
    claim.insert("other".into(), TokenCounts::default());
    assert_eq!(claim_mismatch(&one, &claim), Some(why), "a zero claim for an unseen model is no disagreement");
}

#[test]
fn budget_refusals_are_recorded_per_session_summed_per_attempt_and_never_erased() {
    let mut m = MeterStatus::default();
    let refused = |session: &str, sequence: i64, spent: &str, refusals: i64| SyncRequest {
        budget_refusals: refusals,
        ..ask(session, sequence, spent, "0")
    };
    apply_open(&mut m, usd("1"), &who("a", 1), &refused("s1", 1, "0.10", 2)).unwrap();
    apply_open(&mut m, usd("1"), &who("b", 1), &refused("s2", 1, "0.10", 1)).unwrap();
    apply_open(&mut m, usd("1"), &who("c", 2), &refused("s3", 1, "0.10", 0)).unwrap();
    assert_eq!((attempt_budget_refusals(Some(&m), 1), attempt_budget_refusals(Some(&m), 2)), (3, 0));
    // A lower count (no meter sends one) does not erase what was recorded.
    apply_open(&mut m, usd("1"), &who("a", 1), &refused("s1", 2, "0.10", 0)).unwrap();
    assert_eq!(m.grants[0].budget_refusals, 2);
    assert_eq!(attempt_budget_refusals(None, 1), 0, "not metered: nothing refused");
    // The body carries it, absent when zero (what meters always sent), bounded.
    let body = |refusals: i64| SyncBody {
        pod: None,
        session: "s".into(),
        sequence: 1,
        usage: usage("0", 0),
        want_usd: None,
        last: false,
        budget_refusals: refusals,
    };
    assert!(!serde_json::to_string(&body(0)).unwrap().contains("budgetRefusals"));
    let wire = serde_json::to_string(&body(4)).unwrap();
    assert!(wire.contains("\"budgetRefusals\":4"), "{wire}");
    assert_eq!(serde_json::from_str::<SyncBody>(&wire).unwrap().request().unwrap().budget_refusals, 4);
    assert!(body(-1).request().unwrap_err().contains("budgetRefusals"));
}

#[test]
fn status_names_a_session_by_its_digest_which_reaches_nothing_and_a_legacy_id_is_found_once() {
    let mut m = MeterStatus::default();
    apply_open(&mut m, usd("1"), &who("a", 1), &ask("secret-session", 1, "0", "0.50")).unwrap();
    let named = m.grants[0].session.clone();
    assert_eq!(named, session_key("secret-session"));
    assert!(named.starts_with("sha256:") && !named.contains("secret-session"), "{named}");
    // Someone who read status and holds a token for the same Pod sends what status shows: that
    // is another session (and not even a valid id), never the meter's.
    let mut body =
        SyncBody { pod: None, session: named.clone(), sequence: 1, usage: usage("0", 0), want_usd: None, last: true, budget_refusals: 0 };
    assert!(body.request().is_err(), "the digest is no session id");
    body.session = named.trim_start_matches("sha256:").into();
    let forged = body.request().unwrap();
    apply_open(&mut m, usd("1"), &who("a", 1), &SyncRequest { sequence: 1_000_000, ..forged }).unwrap();
    assert_eq!((m.grants.len(), m.grants[0].settled, m.grants[0].sequence), (2, false, 1), "the meter's session untouched");
    assert_eq!(m.committed_usd, "0.50", "its grant still held");
    // A session an older operator recorded in the clear is found by its id and renamed.
    let mut legacy = MeterStatus::default();
    apply_open(&mut legacy, usd("1"), &who("a", 1), &ask("old", 1, "0", "0.20")).unwrap();
    legacy.grants[0].session = "old".into();
    let r = apply_open(&mut legacy, usd("1"), &who("a", 1), &ask("old", 2, "0.10", "0")).unwrap();
    assert_eq!((legacy.grants.len(), legacy.grants[0].session.clone(), r.granted), (1, session_key("old"), usd("0.20")));
}

fn agent_pod(env: serde_json::Value) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({"metadata": {"name": "p"},
        "spec": {"containers": [{"name": "sidecar", "image": "x", "env": [{"name": "AGENTGATE_BUDGET_USD", "value": "100"}]},
                                {"name": "agent", "image": "x", "env": env}]}}))
    .unwrap()
}

#[test]
fn a_pods_terms_come_from_its_agent_containers_env_and_nothing_stands_in_for_them() {
    let built =
        agent_pod(serde_json::json!([{"name": "AGENTGATE_ATTEMPT", "value": "2"}, {"name": "AGENTGATE_BUDGET_USD", "value": "0.25"}]));
    assert_eq!(pod_terms(&built, 2), Ok(PodTerms { attempt: 2, budget: usd("0.25") }));
    let relabelled = pod_terms(&built, 1).unwrap_err();
    assert_eq!(relabelled.reason(), "pod_attempt_mismatch");
    assert!(relabelled.to_string().contains("says 1 but it was built with AGENTGATE_ATTEMPT 2"), "{relabelled}");
    // Another container's variable is not the agent's.
    let missing = pod_terms(&agent_pod(serde_json::json!([{"name": "AGENTGATE_ATTEMPT", "value": "1"}])), 1).unwrap_err();
    assert_eq!(missing.reason(), "pod_budget_missing");
    assert!(missing.to_string().contains("has no AGENTGATE_BUDGET_USD"), "{missing}");
    let unreadable =
        agent_pod(serde_json::json!([{"name": "AGENTGATE_ATTEMPT", "value": "1"}, {"name": "AGENTGATE_BUDGET_USD", "value": "lots"}]));
    assert_eq!(pod_terms(&unreadable, 1).unwrap_err().reason(), "pod_budget_missing");
    let from_a_secret = agent_pod(serde_json::json!([{"name": "AGENTGATE_ATTEMPT", "value": "1"},
        {"name": "AGENTGATE_BUDGET_USD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]));
    assert_eq!(pod_terms(&from_a_secret, 1).unwrap_err().reason(), "pod_budget_missing");
    let no_attempt = agent_pod(serde_json::json!([{"name": "AGENTGATE_BUDGET_USD", "value": "1"}]));
    assert_eq!(pod_terms(&no_attempt, 1).unwrap_err().reason(), "pod_attempt_mismatch");
}

#[test]
fn only_an_attempt_still_running_or_not_yet_recorded_is_unsettled() {
    let status: crate::api::AgentJobStatus = serde_json::from_value(serde_json::json!({"attempts": [
        {"attempt": 1, "generation": 1, "pods": ["p-1"], "result": "Failed"},
        {"attempt": 2, "generation": 1, "pods": ["p-2"], "result": "Running"}]}))
    .unwrap();
    assert!(attempt_settled(&status, 1));
    assert!(!attempt_settled(&status, 2));
    assert!(!attempt_settled(&status, 3), "Pods created before the status records their attempt");
}

/// 400 sessions, each reporting 64 models with 128-character names, the most a body can carry
/// of them: stored as sent that was ~6 MB of status, four times what etcd takes.
#[test]
fn sessions_full_of_long_model_names_stay_within_a_bounded_status_and_every_total_exact() {
    let mut m = MeterStatus::default();
    for session in 0..MAX_GRANTS {
        let mut u = Usage::default();
        for model in 0..80 {
            let name = format!("s{session:04}-m{model:02}-{}", "x".repeat(118));
            add_model_usage(
                &mut u,
                &name,
                &TokenCounts { input: 1, cached_input: 2, output: 3, ..Default::default() },
                MicroUsd(model + 1),
            );
        }
        u.cost_usd = MicroUsd((1..=80).sum()).to_string();
        let request = SyncRequest { usage: u, ..ask(&format!("s{session}"), 1, "0", "0") };
        apply(&mut m, usd("1000"), &who(&format!("pod-{session}"), 1), &request, true).unwrap();
    }
    let size = serde_json::to_vec(&m).unwrap().len();
    assert!(size < 450_000, "status.meter is {size} bytes");
    let listed: usize = m.grants.iter().map(|g| g.usage.as_ref().unwrap().models.len()).sum();
    assert!(listed <= MAX_MODEL_ENTRIES + MAX_GRANTS, "{listed} entries");
    // Every session's tokens and cost, folded or not, are in its usage and the sums.
    for g in &m.grants {
        let u = g.usage.as_ref().unwrap();
        let tokens: i64 = u.models.iter().map(|e| e.input_tokens + e.cached_input_tokens + e.output_tokens).sum();
        let cost: MicroUsd = u.models.iter().map(|e| usd(&e.cost_usd)).sum();
        assert_eq!((tokens, cost, u.total_tokens), (80 * 6, MicroUsd(3240), 80 * 6), "{}", g.session);
    }
    let total = attempt_usage(Some(&m), 1).unwrap();
    assert!(total.models.len() <= MAX_MODELS);
    assert_eq!((total.total_tokens, usd(&total.cost_usd)), (400 * 80 * 6, MicroUsd(400 * 3240)));
    let listed_cost: MicroUsd = total.models.iter().map(|e| usd(&e.cost_usd)).sum();
    assert_eq!(listed_cost, MicroUsd(400 * 3240), "the folded entry carries the rest");
    assert_eq!(usd(&m.spent_usd), MicroUsd(400 * 3240), "spent is every session's, whatever was folded");
}

#[test]
fn a_meter_of_a_few_models_keeps_them_listed_one_by_one() {
    let mut m = MeterStatus::default();
    let mut u = usage("0.02", 5);
    add_model_usage(&mut u, "claude-sonnet-4", &TokenCounts { input: 1, cached_input: 0, output: 1, ..Default::default() }, usd("0.01"));
    u.cost_usd = "0.03".into();
    apply(&mut m, usd("1"), &who("a", 1), &SyncRequest { usage: u.clone(), ..ask("s1", 1, "0", "0") }, true).unwrap();
    assert_eq!(m.grants[0].usage.as_ref(), Some(&u));
}

/// Sessions reporting the largest cost a report may carry ($999,999,999,999.999999 each: a
/// tenant's own sessions, opened with a token minted for their agent Pod) sum past what an i64
/// of micro-dollars holds; the free budget was `budget - others - held`, which then overflowed:
/// a panic in a debug build, and in release a wrapped, huge amount granted past the budget.
#[test]
fn sessions_reporting_the_largest_costs_are_granted_nothing_past_the_budget() {
    let mut m = MeterStatus::default();
    let budget = usd("1.00");
    let most = "999999999999.999999";
    for s in 0..11 {
        apply_open(&mut m, budget, &who("mallory", 1), &ask(&format!("m{s}"), 1, most, "0")).unwrap();
    }
    let r = apply_open(&mut m, budget, &who("mallory", 1), &ask("m0", 2, most, "1000")).unwrap();
    assert_eq!((r.granted, r.granted_now, r.available), (MicroUsd(0), MicroUsd(0), MicroUsd(0)));
}
