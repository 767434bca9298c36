use super::*;
use crate::domain::meter_message::{PodMeter, measure_attempt};
use crate::domain::pricing::{PriceTable, TokenCounts};
use crate::meter::budget::{Outcome, Plan};
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    meter: crate::meter::MeterArgs,
}

/// A scratch directory of the test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("agentgate-meter-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One meter process of a Pod, started as `agentgate meter` starts it (`build`, then the first
/// writes of `serve`), with the state file on the Pod's emptyDir (`dir`) and a termination
/// message of its own, as the kubelet gives each container process.
fn start(dir: &Path, process: usize, extra: &[&str]) -> (crate::meter::Process, crate::meter::message::TerminationMessage) {
    let state = dir.join("state.json");
    let message = dir.join(format!("termination-log-{process}"));
    let mut args = vec!["meter", "--state-file", state.to_str().unwrap(), "--termination-message-path", message.to_str().unwrap()];
    args.extend_from_slice(extra);
    let cli = Cli::try_parse_from(args).unwrap();
    let process = crate::meter::build(&cli.meter, PriceTable::builtin()).unwrap();
    let message = crate::meter::message::TerminationMessage::new(cli.meter.termination_message_path.clone().unwrap(), &process.session);
    process.state.as_ref().unwrap().write(&process.meter.ledger).unwrap();
    message.write(&process.meter.ledger).unwrap();
    (process, message)
}

/// One call of `input` gpt-4o-mini tokens and 100 output, settled, and the files rewritten as
/// `write_reports` does after it; its cost.
fn call(process: &crate::meter::Process, message: &crate::meter::message::TerminationMessage, input: i64) -> MicroUsd {
    let price = *PriceTable::builtin().get("gpt-4o-mini").unwrap();
    let tokens = TokenCounts { input, output: 100, ..Default::default() };
    let (reservation, _) =
        process.meter.ledger.reserve("gpt-4o-mini", price, |_| Ok(Plan { reserve: price.cost(&tokens), inject_cap: None })).unwrap();
    reservation.settle(Outcome::Measured(tokens));
    process.state.as_ref().unwrap().write(&process.meter.ledger).unwrap();
    message.write(&process.meter.ledger).unwrap();
    price.cost(&tokens)
}

/// The attack: the tenant cut the meter off from the operator (a NetworkPolicy) and its agent
/// made the meter restart three times (OOM-killed, crashed): four meter processes, of which the
/// kubelet keeps the last two termination messages. The meter API heard the first process's
/// first call only. Every process's usage still counts, once.
///
/// Without the state file each process opened a new session from zero: the operator counted the
/// API's first call and the last two processes' own calls, $0.00255 of $0.00348 here (the second
/// process's calls and the first one's second were lost).
#[test]
fn a_pod_whose_meter_restarted_three_times_while_cut_off_counts_every_processs_usage() {
    let scratch = Scratch::new("restarts");
    let mut spent = MicroUsd(0);
    let mut sessions = Vec::new();
    let mut heard = None;
    for process_number in 1..=4 {
        let (process, message) = start(&scratch.0, process_number, &[]);
        sessions.push(process.session.clone());
        for call_number in 1..=2 {
            spent = spent.saturating_add(call(&process, &message, 1_000 * process_number as i64));
            if process_number == 1 && call_number == 1 {
                // What the meter API heard before the tenant cut the meter off.
                heard = Some(process.meter.ledger.snapshot().usage);
            }
        }
        assert_eq!(process.meter.ledger.spent(), spent, "process {process_number} holds every earlier process's usage");
        // Killed: no settle, no final write beyond the last call's.
    }
    assert!(sessions.iter().all(|s| *s == sessions[0]), "one session for the Pod: {sessions:?}");
    let message_of = |n: usize| std::fs::read_to_string(scratch.0.join(format!("termination-log-{n}"))).unwrap();
    // The Pod's status as the kubelet leaves it: the last process's message and the one before.
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p"},
        "status": {"initContainerStatuses": [{
            "name": crate::domain::meter_sidecar::CONTAINER, "image": "agentgate", "imageID": "", "ready": false, "restartCount": 3,
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": "2026-12-01T05:00:03Z", "message": message_of(4)}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": "2026-12-01T05:00:02Z", "message": message_of(3)}},
        }]}
    }))
    .unwrap();
    let pod_meter: PodMeter = crate::domain::snapshot::pod_meter(&pod);
    assert_eq!(pod_meter.messages.len(), 2);
    let heard = heard.unwrap();
    let api = crate::api::MeterStatus {
        grants: vec![crate::api::MeterGrant {
            pod: "p".into(),
            pod_uid: "uid-p".into(),
            attempt: 1,
            session: crate::domain::grants::session_key(&sessions[0]),
            sequence: 1,
            granted_usd: "0.10".into(),
            spent_usd: heard.cost_usd.clone(),
            settled: false,
            usage: Some(heard),
            budget_refusals: 0,
        }],
        ..Default::default()
    };
    let measured = measure_attempt(Some(&api), 1, &[("p", &pod_meter)]).usage.unwrap();
    assert_eq!(spent, MicroUsd(3_480), "2 × (1,000 + 2,000 + 3,000 + 4,000) input tokens at $0.15/M, 8 × 100 output at $0.60/M");
    assert_eq!((measured.cost_usd.as_str(), measured.input_tokens, measured.output_tokens), ("0.00348", 20_000, 800));
}

/// A fixed budget (`--budget-usd`) holds against the Pod's whole usage: an agent that makes its
/// meter restart does not get the budget afresh. Without the state file the restarted meter
/// had all $0.002 again after $0.00126 was spent.
#[test]
fn a_restarted_meter_does_not_hand_its_agent_a_fresh_fixed_budget() {
    let scratch = Scratch::new("fixed");
    let (first, message) = start(&scratch.0, 1, &["--budget-usd", "0.002"]);
    let spent = call(&first, &message, 8_000);
    assert_eq!(first.meter.ledger.remaining(), Some(MicroUsd(2_000 - spent.0)));
    drop(first);
    let (second, _) = start(&scratch.0, 2, &["--budget-usd", "0.002"]);
    assert_eq!(spent, MicroUsd(1_260));
    assert_eq!(second.meter.ledger.remaining(), Some(MicroUsd(740)), "what the first process left, not $0.002");
}

/// The agent starts a call and kills its meter while the provider runs it (SIGKILL, OOM: no
/// `Drop` charges the reservation). The next meter process charges it its reservation, as a
/// surviving meter charges a call whose usage it never read: without it, the restarted meter
/// had the whole $0.002 fixed budget less the settled call ($0.00074) to spend again, beside
/// the call the provider billed.
#[test]
fn a_call_in_flight_when_the_meter_is_killed_is_charged_by_the_next_process() {
    let scratch = Scratch::new("killed-mid-call");
    let (first, message) = start(&scratch.0, 1, &["--budget-usd", "0.002"]);
    let settled = call(&first, &message, 8_000);
    let price = *PriceTable::builtin().get("gpt-4o-mini").unwrap();
    let (in_flight, _) =
        first.meter.ledger.reserve("gpt-4o-mini", price, |_| Ok(Plan { reserve: MicroUsd(500), inject_cap: None })).unwrap();
    // What `admit` does before the call goes upstream.
    first.state.as_ref().unwrap().write(&first.meter.ledger).unwrap();
    std::mem::forget(in_flight);
    drop(first);
    let (second, _) = start(&scratch.0, 2, &["--budget-usd", "0.002"]);
    assert_eq!(settled, MicroUsd(1_260));
    assert_eq!(second.meter.ledger.remaining(), Some(MicroUsd(240)), "$0.002 less $0.00126 settled and the $0.0005 in flight");
    let snapshot = second.meter.ledger.snapshot();
    assert_eq!((snapshot.calls, snapshot.unmeasured_calls, snapshot.usage.models[0].cost_usd.as_str()), (2, 1, "0.00176"));
}

/// The wiring: a call is on disk, charged its reservation, by the time it reaches the provider.
#[tokio::test]
async fn a_call_is_on_disk_charged_its_reservation_before_it_reaches_the_provider() {
    use http_body_util::BodyExt;
    let scratch = Scratch::new("proxy");
    // The provider: takes the call and holds it.
    let provider = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let provider_url = format!("http://{}/v1", provider.local_addr().unwrap());
    let (reached, reached_provider) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (connection, _) = provider.accept().await.unwrap();
        let _ = reached.send(());
        tokio::time::sleep(std::time::Duration::from_secs(600)).await;
        drop(connection);
    });
    let (process, _message) = start(&scratch.0, 1, &["--budget-usd", "1", "--openai-upstream", &provider_url]);
    assert_eq!(resume(&scratch.0.join("state.json")).unwrap().carried.usage.cost_usd, "0.00");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let meter_url = format!("http://{}/v1/chat/completions", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, crate::meter::proxy::router(process.meter.clone())).into_future());
    let body = r#"{"model":"gpt-4o-mini","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = hyper::Request::post(meter_url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let client = crate::meter::client().unwrap();
    let agent = tokio::spawn(async move { client.request(request).await.map(|r| r.into_body().collect()) });
    reached_provider.await.unwrap();
    let on_disk = resume(&scratch.0.join("state.json")).unwrap().carried;
    let reserved = process.meter.ledger.snapshot().reserved_usd;
    assert!(MicroUsd::parse(&reserved).unwrap() > MicroUsd(0), "{reserved}");
    assert_eq!((on_disk.usage.cost_usd.as_str(), on_disk.calls, on_disk.unmeasured_calls), (reserved.as_str(), 1, 1));
    agent.abort();
}

/// The state file is written before a step goes out, so a restarted process carries on after the
/// last number sent and from figures at least those the operator heard; a session whose settle
/// was sent is not resumed (the operator may have settled it and released its grant).
#[test]
fn a_step_is_on_disk_before_it_is_sent_and_a_settling_session_is_never_resumed() {
    let scratch = Scratch::new("steps");
    let path = scratch.0.join("state.json");
    let ledger = Ledger::new(Some(MicroUsd(0)));
    let state = StateFile::new(path.clone(), "session-a", 0);
    state.granted(MicroUsd(100_000));
    state.before_step(&ledger, 7, false).unwrap();
    let resumed = resume(&path).unwrap();
    assert_eq!((resumed.session.as_str(), resumed.sequence, resumed.granted), ("session-a", 7, Some(MicroUsd(100_000))));
    // A later write of figures alone never moves the number back.
    state.write(&ledger).unwrap();
    assert_eq!(resume(&path).unwrap().sequence, 7);
    state.before_step(&ledger, 8, true).unwrap();
    assert_eq!(resume(&path), None, "settling: a restarted meter opens a new session");
    // Not a state file (or one of another version): a new session, never a panic.
    for text in ["", "{}", "not json", r#"{"agentgateMeterState":2,"session":"s","sequence":1,"carried":{"usage":{"costUSD":"0"}}}"#] {
        std::fs::write(&path, text).unwrap();
        assert_eq!(resume(&path), None, "{text:?}");
    }
}

/// Written in place: a shorter figure than the file holds (a resumed process's first write
/// after one of many models folded, or the previous process's longer file) is padded, and the
/// file always reads as the latest write, never the tail of an earlier one.
#[test]
fn a_shorter_write_in_place_leaves_no_tail_of_the_longer_one() {
    let scratch = Scratch::new("in-place");
    let path = scratch.0.join("state.json");
    let earlier = format!("{{\"left\": \"by an earlier process\", \"pad\": \"{}\"}}", "x".repeat(900));
    std::fs::write(&path, &earlier).unwrap();
    let ledger = Ledger::new(None);
    let state = StateFile::new(path.clone(), "session-c", 4);
    state.before_step(&ledger, 5, false).unwrap();
    assert_eq!(std::fs::read(&path).unwrap().len(), earlier.len(), "padded to the earlier file's length");
    assert_eq!(resume(&path).map(|r| (r.session, r.sequence)), Some(("session-c".to_string(), 5)));
}

/// A state file that cannot be written is removed: a restart then opens a new session rather
/// than resuming from a figure behind what the operator heard.
#[test]
fn a_state_file_that_cannot_be_written_is_not_resumed_from() {
    let scratch = Scratch::new("broken");
    let path = scratch.0.join("state.json");
    let ledger = Ledger::new(None);
    // Longer than a page (a meter of many models): written aside and renamed.
    std::fs::write(&path, " ".repeat(5_000)).unwrap();
    let state = StateFile::new(path.clone(), "session-b", 0);
    state.write(&ledger).unwrap();
    assert!(resume(&path).is_some());
    // The aside file's place taken by a directory: the rename's source cannot be written.
    std::fs::create_dir(path.with_extension("tmp")).unwrap();
    assert!(state.before_step(&ledger, 1, false).is_err());
    assert_eq!(resume(&path), None, "removed");
    std::fs::remove_dir(path.with_extension("tmp")).unwrap();
    state.write(&ledger).unwrap();
    assert_eq!(resume(&path), None, "and not written again");
}
