use super::*;
use crate::api::MeterGrant;
use crate::domain::grants::{MeterIdentity, SyncRequest, apply};
use crate::domain::report::OTHER_MODELS;

fn usd(text: &str) -> MicroUsd {
    MicroUsd::parse(text).unwrap()
}

/// One model's usage at `cost`, `output` output tokens.
fn usage(model: &str, cost: &str, output: i64) -> Usage {
    let mut u = Usage::default();
    add_model_usage(&mut u, model, &TokenCounts { input: 100, output, ..Default::default() }, usd(cost));
    u.cost_usd = cost.into();
    u
}

fn message(session: &str, u: &Usage) -> MeterMessage {
    parse(&encode(&session_key(session), u, 0)).unwrap()
}

fn built(messages: Vec<MeterMessage>) -> PodMeter {
    PodMeter { ran: true, messages, exited_cleanly: true }
}

/// The job's meter status after `session` of Pod `pod` reported `u` through the meter API.
fn reported(pod: &str, session: &str, u: &Usage) -> MeterStatus {
    let mut m = MeterStatus::default();
    let who = MeterIdentity { pod: pod.into(), pod_uid: format!("uid-{pod}"), attempt: 1 };
    let request =
        SyncRequest { session: session.into(), sequence: 1, usage: u.clone(), want: usd("0.10"), last: false, budget_refusals: 0 };
    apply(&mut m, usd("5"), &who, &request, true).unwrap();
    m
}

#[test]
fn a_message_reads_back_as_written_and_anything_else_is_no_figure() {
    let mut u = usage("gpt-4o", "0.012345", 42);
    add_model_usage(
        &mut u,
        "claude-sonnet-4",
        &TokenCounts { input: 7, cache_write: 3, cache_write_1h: 2, ..Default::default() },
        usd("0.001"),
    );
    u.cost_usd = "0.013345".into();
    let text = encode(&session_key("s1"), &u, 2);
    let back = parse(&text).unwrap();
    assert_eq!((back.session, back.usage, back.budget_refusals), (session_key("s1"), u, 2));
    println!("figure: meter termination message with 2 models: {} bytes: {text}", text.len());
    // Padding left by a shorter rewrite (src/meter/mod.rs writes in place) is whitespace.
    assert!(parse(&format!("{text}      ")).is_ok());
    for bad in [
        "",
        "Error on reading termination log /var/lib/kubelet/pods/x: open: no such file",
        &text[..text.len() - 3],
        &text.replace("\"agentgateMeter\":1", "\"agentgateMeter\":2"),
        // A session id in the clear is no digest (and would show the id).
        &text.replace(&session_key("s1"), "s1"),
        &text.replace("42", "-42"),
        &text.replace("\"costUSD\":\"0.013345\"", "\"costUSD\":\"lots\""),
        &format!("{},\"extra\":1}}", &text[..text.len() - 1]),
        &" ".repeat(MAX_BYTES + 1),
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
    let twice = text.replace("[\"claude-sonnet-4\"", "[\"gpt-4o\",\"0\",0,0,0,0,0],[\"claude-sonnet-4\"");
    assert!(parse(&twice).unwrap_err().contains("listed twice"), "{twice}");
}

#[test]
fn a_message_fits_the_kubelets_4_kib_with_every_total_exact() {
    for (models, name_len) in [(1, 12), (64, 12), (64, 128), (300, 128)] {
        let mut u = Usage::default();
        let mut total = MicroUsd(0);
        for i in 0..models {
            let name = format!("{i:03}{}", "m".repeat(name_len - 3));
            let cost = MicroUsd(1_000 + i as i64);
            add_model_usage(&mut u, &name, &TokenCounts { input: 999_999_999, output: 123_456, ..Default::default() }, cost);
            total = total.saturating_add(cost);
        }
        u.cost_usd = total.to_string();
        let text = encode(&session_key("s"), &u, 1_000_000);
        let back = parse(&text).unwrap();
        println!("figure: {models} models of {name_len}-character names: {} bytes, {} entries listed", text.len(), back.usage.models.len());
        assert!(text.len() <= MAX_BYTES, "{models} models: {} bytes", text.len());
        assert_eq!((back.usage.cost_usd, back.usage.total_tokens), (u.cost_usd.clone(), u.total_tokens), "{models} models");
        let folded = back.usage.models.iter().any(|m| m.model == OTHER_MODELS);
        assert_eq!(folded, back.usage.models.len() < models, "{models} models: folded only when they do not fit");
    }
}

#[test]
fn per_session_the_larger_figure_counts_once() {
    let early = usage("gpt-4o", "0.01", 10);
    let late = usage("gpt-4o", "0.05", 50);
    // Cut off after its first report: the API has the early figure, the message the late one.
    let m = reported("p", "s1", &early);
    let measured = measure_attempt(Some(&m), 1, &[("p", &built(vec![message("s1", &late)]))]);
    assert_eq!(measured.usage.as_ref().map(|u| u.cost_usd.as_str()), Some("0.05"), "the message's later figure, not a sum");
    assert_eq!(measured.usage.as_ref().unwrap().output_tokens, 50);
    assert_eq!(measured.raised_by_messages, [format!("p: {}", session_key("s1"))]);
    assert!(measured.unmeasured.is_empty());
    // The other way round (the message written before the last report): usage never goes down.
    let m = reported("p", "s1", &late);
    let measured = measure_attempt(Some(&m), 1, &[("p", &built(vec![message("s1", &early)]))]);
    assert_eq!(measured.usage.unwrap().cost_usd, "0.05");
    assert!(measured.raised_by_messages.is_empty());
    // Same cost, more tokens (a free model): the later figure.
    let more = usage("gpt-4o", "0.01", 11);
    let measured = measure_attempt(Some(&reported("p", "s1", &early)), 1, &[("p", &built(vec![message("s1", &more)]))]);
    assert_eq!(measured.usage.unwrap().output_tokens, 11);
}

/// A restarted meter carries on its Pod's session (src/meter/state_file.rs): the Pod's status
/// shows two messages of one session, cumulative figures of it at two times (lastState, then
/// state). The larger counts, once, and the session is raised once; its final figure is what the
/// operator settles its grant to.
#[test]
fn a_sessions_two_messages_after_a_restart_count_once() {
    let heard = usage("gpt-4o", "0.01", 10);
    let before_restart = usage("gpt-4o", "0.03", 30);
    let after_restart = usage("gpt-4o", "0.05", 50);
    let m = reported("p", "s1", &heard);
    let p = built(vec![message("s1", &after_restart), message("s1", &before_restart)]);
    let measured = measure_attempt(Some(&m), 1, &[("p", &p)]);
    let u = measured.usage.as_ref().unwrap();
    assert_eq!((u.cost_usd.as_str(), u.output_tokens), ("0.05", 50), "not 0.08, nor 0.09");
    assert_eq!(measured.raised_by_messages, [format!("p: {}", session_key("s1"))], "said once");
    assert_eq!(measured.final_by_message.get(&session_key("s1")).map(|(u, _)| u.cost_usd.as_str()), Some("0.05"));
    // The order the kubelet lists them in does not matter.
    let p = built(vec![message("s1", &before_restart), message("s1", &after_restart)]);
    let measured = measure_attempt(Some(&m), 1, &[("p", &p)]);
    assert_eq!(measured.usage.unwrap().cost_usd, "0.05");
    assert_eq!(measured.raised_by_messages.len(), 1);
}

#[test]
fn sessions_only_one_channel_knows_are_added_and_other_attempts_left_out() {
    // A restarted meter: the API knows the first session, the Pod shows both sessions' messages
    // (lastState and state); a second Pod's meter was never heard through the API.
    let m = reported("p", "s1", &usage("gpt-4o", "0.01", 10));
    let p = built(vec![message("s2", &usage("gpt-4o", "0.02", 20)), message("s1", &usage("gpt-4o", "0.01", 10))]);
    let q = built(vec![message("s3", &usage("gpt-4o-mini", "0.004", 4))]);
    let measured = measure_attempt(Some(&m), 1, &[("p", &p), ("q", &q)]);
    let u = measured.usage.unwrap();
    assert_eq!((u.cost_usd.as_str(), u.output_tokens), ("0.034", 34));
    assert!(measured.unmeasured.is_empty());
    // Nothing the API knew was raised: a session only the message knows (a fixed-budget meter
    // reports nothing to the API) is no sign of a meter cut off.
    assert!(measured.raised_by_messages.is_empty(), "{:?}", measured.raised_by_messages);
    // Attempt 2's Pods see nothing of attempt 1's sessions.
    let measured = measure_attempt(Some(&m), 2, &[]);
    assert_eq!(measured, Measurement::default());
}

#[test]
fn budget_refusals_take_the_larger_count_of_each_session() {
    let mut m = reported("p", "s1", &usage("gpt-4o", "0.01", 10));
    m.grants[0].budget_refusals = 1;
    let cut = parse(&encode(&session_key("s1"), &usage("gpt-4o", "0.01", 10), 3)).unwrap();
    let other = parse(&encode(&session_key("s2"), &usage("gpt-4o", "0", 0), 2)).unwrap();
    assert_eq!(measure_attempt(Some(&m), 1, &[("p", &built(vec![cut, other]))]).budget_refusals, 5);
}

#[test]
fn a_meter_heard_through_neither_channel_is_unmeasured_never_the_agents_word() {
    // Pod p's meter reported; q's meter was built but left nothing (no session, no message).
    let m = reported("p", "s1", &usage("gpt-4o", "0.01", 10));
    let silent = built(Vec::new());
    let measured = measure_attempt(Some(&m), 1, &[("p", &built(Vec::new())), ("q", &silent)]);
    assert_eq!(measured.unmeasured, ["q"]);
    assert_eq!(measured.usage.unwrap().cost_usd, "0.01", "what was measured still counts");
    // Alone: nothing measured at all, and unmeasured says so (the agent's report is not taken).
    let measured = measure_attempt(None, 1, &[("q", &silent)]);
    assert_eq!((measured.usage, measured.unmeasured), (None, vec!["q".to_string()]));
    // A message of zero usage is a measurement: a meter whose agent made no call.
    let idle = built(vec![message("s9", &Usage { cost_usd: "0".into(), ..Usage::default() })]);
    let measured = measure_attempt(None, 1, &[("q", &idle)]);
    assert_eq!(measured.usage.map(|u| u.total_tokens), Some(0));
    assert!(measured.unmeasured.is_empty());
    // A Pod without a meter (an operator version before it), or whose meter never started (its
    // agent never did either), is left to the agents' reports.
    let measured = measure_attempt(None, 1, &[("old", &PodMeter::default())]);
    assert_eq!(measured, Measurement::default());
}

#[test]
fn a_session_an_older_operator_recorded_by_its_id_matches_its_digest() {
    let mut m = reported("p", "s1", &usage("gpt-4o", "0.01", 10));
    m.grants[0] = MeterGrant { session: "s1".into(), ..m.grants[0].clone() };
    let measured = measure_attempt(Some(&m), 1, &[("p", &built(vec![message("s1", &usage("gpt-4o", "0.02", 20))]))]);
    assert_eq!(measured.usage.unwrap().cost_usd, "0.02", "one session, not two");
}
