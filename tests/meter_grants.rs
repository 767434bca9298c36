//! The agent meter drawing its job's budget from the operator, against the real apiserver: real
//! `agentgate meter` processes with `--grant-url`, authenticated by real Pod-bound tokens
//! (TokenRequest on the Pod's ServiceAccount, audience agentgate.dev/meter), in front of a
//! local upstream stand-in that speaks OpenAI Chat Completions. No node: the test plays the
//! kubelet (support::cluster), as the other operator tests do.
//!
//! - the usage in status is what the upstream reported, token for token, and the agents' own
//!   claim is kept beside it and flagged; a client killed mid-call is charged its reservation;
//! - meters racing one small budget: grants and spend stay within it;
//! - forged requests (wrong audience, a token bound to no Pod, a Pod no job controls, a deleted
//!   Pod, a request speaking for another Pod) are refused and counted, and grant nothing;
//! - the operator killed mid-run: the meter serves within its grant, then refuses (402); grants
//!   and usage are in status and the restarted operator carries on from them.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentgate::api::{AgentJob, Decision, MeterStatus};
use agentgate::domain::money::MicroUsd;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::*;
use support::controlplane::{ControlPlane, OperatorProcess};
use support::http::{free_port, http_get};

const TIMEOUT: Duration = Duration::from_secs(60);
const AUDIENCE: &str = "agentgate.dev/meter";
/// The meters' prices: $1 per million input tokens, $100 per million output: 1 and 100 µ$.
const PRICES: &str = "models:\n  test-gpt: {inputPerMillion: 1, cachedInputPerMillion: 0.5, outputPerMillion: 100}\n";

// ---------------------------------------------------------------- the upstream stand-in

/// Usage the stand-in reported, per call it answered: (prompt tokens, completion tokens).
type Reported = Arc<Mutex<Vec<(i64, i64)>>>;

/// An OpenAI Chat Completions stand-in on loopback: prompt tokens are the body's bytes / 8,
/// completion tokens min(max_tokens, 40); a request whose text has SLOW waits a minute first.
async fn upstream() -> (u16, Reported) {
    let reported: Reported = Arc::default();
    let state = reported.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: Bytes| {
            let reported = state.clone();
            async move {
                let request: Value = serde_json::from_slice(&body).unwrap();
                let prompt = body.len() as i64 / 8;
                let completion = request["max_tokens"].as_i64().unwrap_or(1000).min(40);
                let answer = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": request["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}});
                if !request.to_string().contains("SLOW") {
                    reported.lock().unwrap().push((prompt, completion));
                    return axum::response::IntoResponse::into_response(axum::Json(answer));
                }
                // Headers now, then whitespace (valid before JSON) every 100 ms for a minute: a
                // client that hangs up is noticed at the next write.
                let dribble = futures::stream::unfold(0, move |i| async move {
                    if i == 600 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Ok::<_, std::convert::Infallible>(Bytes::from_static(b" ")), i + 1))
                });
                let body = futures::StreamExt::chain(dribble, futures::stream::once(async move { Ok(Bytes::from(answer.to_string())) }));
                axum::response::Response::builder()
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from_stream(body))
                    .unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, reported)
}

fn reported_totals(reported: &Reported) -> (i64, i64, MicroUsd) {
    let calls = reported.lock().unwrap().clone();
    let prompt: i64 = calls.iter().map(|c| c.0).sum();
    let completion: i64 = calls.iter().map(|c| c.1).sum();
    (prompt, completion, MicroUsd(prompt + completion * 100))
}

// ---------------------------------------------------------------- meters

struct MeterProcess {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl MeterProcess {
    fn start(dir: &Path, name: &str, upstream: u16, grant_port: u16, token: &str, chunk: &str) -> MeterProcess {
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, token).unwrap();
        let prices = dir.join("prices.yaml");
        std::fs::write(&prices, PRICES).unwrap();
        let log = dir.join(format!("{name}.log"));
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_agentgate"))
            .args(["meter", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--openai-upstream", &format!("http://127.0.0.1:{upstream}/v1")])
            .args(["--grant-url", &format!("http://127.0.0.1:{grant_port}")])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--price-table")
            .arg(&prices)
            .args(["--grant-chunk-usd", chunk, "--report-seconds", "1"])
            .env("RUST_LOG", "info,agentgate=debug")
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(std::fs::File::options().append(true).open(&log).unwrap()))
            .spawn()
            .expect("start agentgate meter");
        let meter = MeterProcess { child, port, log };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return meter;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("meter {name} did not start: {}", std::fs::read_to_string(&meter.log).unwrap_or_default());
    }

    fn usage(&self) -> Value {
        serde_json::from_str(&http_get(self.port, "/usage").1).unwrap()
    }

    /// SIGTERM, as the kubelet stops it: it settles with the operator, then exits.
    async fn stop(mut self) -> String {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "meter exited with {status}: {}", self.logs());
                return self.logs();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("meter did not exit after SIGTERM: {}", self.logs());
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MeterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One chat call through the meter, as an agent makes it: (status, body).
async fn chat(meter_port: u16, text: &str) -> (u16, Value) {
    let body = json!({"model": "test-gpt", "max_tokens": 50, "messages": [{"role": "user", "content": text}]});
    post(&format!("http://127.0.0.1:{meter_port}/v1/chat/completions"), Some("sk-dummy"), &body).await
}

async fn post(url: &str, bearer: Option<&str>, body: &Value) -> (u16, Value) {
    let client = agentgate::meter::client().unwrap();
    let mut request = hyper::Request::post(url).header("content-type", "application/json");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = client.request(request.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await.expect("POST");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

// ---------------------------------------------------------------- the cluster side

struct Setup {
    admin: Client,
    operator: OperatorProcess,
    api_port: u16,
    metrics_port: u16,
    dir: tempfile::TempDir,
}

fn start_operator(ns: &str, api_port: u16, metrics_port: u16) -> OperatorProcess {
    OperatorProcess::start(
        ControlPlane::shared(),
        &[
            "--namespace",
            ns,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--meter-api-listen",
            &format!("127.0.0.1:{api_port}"),
        ],
    )
}

/// The shared [`Env`] (namespace, node, voting rights) and an operator serving the meter API on a
/// port of its own, which [`start_operator`] restarts on.
async fn setup(ns: &str) -> Setup {
    let admin = Env::builder(ns).node("meter-grants-node", "64", "256Gi", &[]).operator(OperatorMode::Later).build().await.admin;
    let (api_port, metrics_port) = (free_port(), free_port());
    let operator = start_operator(ns, api_port, metrics_port);
    Setup { admin, operator, api_port, metrics_port, dir: tempfile::tempdir().unwrap() }
}

/// Creates a job with these agents and budget, approves it, and returns it with its Pods running.
async fn running_job(s: &Setup, ns: &str, name: &str, agents: &[&str], budget: &str) -> (AgentJob, Vec<Pod>) {
    let agent = |n: &str| json!({"name": n, "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"});
    let spec = json!({"category": "payments",
        "agents": {"primary": agent(agents[0]), "supporting": agents[1..].iter().map(|a| agent(a)).collect::<Vec<_>>()},
        "resources": {"cpu": "100m", "memory": "128Mi"}, "budget": {"maxCostUSD": budget}});
    let job =
        Api::<AgentJob>::namespaced(s.admin.clone(), ns).create(&PostParams::default(), &agent_job(name, spec, json!({}))).await.unwrap();
    let cp = ControlPlane::shared();
    vote(&cp.client("alice").await, &job, "alice", Decision::Approve).await;
    vote(&cp.client("bob").await, &job, "bob", Decision::Approve).await;
    let pods = wait_for("the agent Pods", TIMEOUT, || job_pods(&s.admin, ns, &job), |p: &Vec<Pod>| p.len() == agents.len()).await;
    for pod in &pods {
        run_pod(&s.admin, ns, &pod.name_any()).await;
    }
    (job, pods)
}

/// A token from the apiserver's TokenRequest API for the namespace's `default` ServiceAccount,
/// bound to `pod` when given.
async fn token(admin: &Client, ns: &str, pod: Option<&Pod>, audience: &str) -> String {
    let bound = pod.map(|p| json!({"apiVersion": "v1", "kind": "Pod", "name": p.name_any(), "uid": p.metadata.uid.clone()}));
    let request: TokenRequest = serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [audience], "boundObjectRef": bound, "expirationSeconds": 3600}}))
    .unwrap();
    let answer = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request("default", &PostParams::default(), &request)
        .await
        .unwrap();
    answer.status.and_then(|s| s.token).expect("a token")
}

async fn meter_status(admin: &Client, ns: &str, name: &str) -> MeterStatus {
    let job = Api::<AgentJob>::namespaced(admin.clone(), ns).get(name).await.unwrap();
    job.status.and_then(|s| s.meter).unwrap_or_default()
}

fn usd(text: &str) -> MicroUsd {
    MicroUsd::parse(text).unwrap_or_else(|| panic!("{text:?} is not USD"))
}

fn micro(value: &Value) -> MicroUsd {
    usd(value.as_str().unwrap_or_else(|| panic!("{value} is not a USD string")))
}

// ---------------------------------------------------------------- tests

/// A forged request: what it is, its bearer token, the Pod its body speaks for, and the status
/// and reason it must be refused with.
type Attack<'a> = (&'a str, Option<String>, Option<&'a str>, u16, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metered_usage_is_the_jobs_usage_token_for_token_and_a_false_claim_is_flagged() {
    let ns = "meter-grants-happy";
    let s = setup(ns).await;
    let (up, reported) = upstream().await;
    let (job, pods) = running_job(&s, ns, "metered", &["agent"], "1").await;
    let token = token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let meter = MeterProcess::start(s.dir.path(), "happy", up, s.api_port, &token, "0.02");

    for text in ["hello", "a longer question about the ledger", "and a third one, longer still, to vary the counts"] {
        let (status, body) = chat(meter.port, text).await;
        assert_eq!(status, 200, "{body}\n{}", meter.logs());
    }
    // Live: the reports reach status while the agent runs (at most a report interval later).
    let (prompt, completion, cost) = reported_totals(&reported);
    let live = wait_for(
        "live usage in status",
        TIMEOUT,
        || meter_status(&s.admin, ns, "metered"),
        |m: &MeterStatus| MicroUsd::parse(&m.spent_usd) == Some(cost),
    )
    .await;
    let table = ControlPlane::shared().kubectl("admin", &["get", "aj", "metered", "-n", ns]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("SPENT") && table.contains(&live.spent_usd), "kubectl get aj shows the live spend:\n{table}");
    assert_eq!(live.grants.len(), 1);
    assert_eq!((live.grants[0].pod.as_str(), live.grants[0].attempt), (pods[0].name_any().as_str(), 1));
    assert!(!live.grants[0].settled);
    assert!(usd(&live.committed_usd) <= usd("1") && usd(&live.granted_usd) >= cost, "{live:?}");

    // A client that hangs up mid-call is charged the call's whole reservation, not zero.
    let call = tokio::spawn(chat(meter.port, "SLOW please"));
    wait_for("the slow call in flight", TIMEOUT, || async { meter.usage() }, |u: &Value| u["inFlight"] == 1).await;
    call.abort();
    let after = wait_for("the abandoned call charged", TIMEOUT, || async { meter.usage() }, |u: &Value| u["inFlight"] == 0).await;
    assert_eq!(after["unmeasuredCalls"], 1, "{after}");
    let charged = micro(&after["usage"]["costUSD"]);
    assert!(charged.0 > cost.0 + 5_000, "charged its reservation (input bound + 50 output tokens at 100 µ$): {charged} vs {cost}");

    // The agent exits; its meter settles; the agent's own claim understates its output.
    let logs = meter.stop().await;
    assert!(logs.contains("settled with the operator"), "{logs}");
    let settled = meter_status(&s.admin, ns, "metered").await;
    assert!(settled.grants[0].settled);
    assert_eq!((usd(&settled.spent_usd), usd(&settled.committed_usd)), (charged, charged), "unspent grant returned: {settled:?}");
    let claim = usage_report("test-gpt", prompt, 0, completion / 2, json!({"done": true}));
    finish_pod(&s.admin, ns, &pods[0].name_any(), 0, &claim).await;
    let done = wait_for_job(&s.admin, ns, "metered", "Succeeded", |j| phase(j) == Some("Succeeded")).await;
    let status = done.status.unwrap();
    let usage = status.usage.unwrap();
    assert_eq!((usage.input_tokens, usage.cached_input_tokens, usage.output_tokens), (prompt, 0, completion), "token for token");
    assert_eq!(usd(&usage.cost_usd), charged, "the measured cost, the abandoned call's reservation included");
    let attempt = &status.attempts[0];
    assert_eq!(attempt.usage.as_ref().unwrap().output_tokens, completion);
    assert_eq!(attempt.reported_usage.as_ref().unwrap().output_tokens, completion / 2, "the claim is kept for comparison");
    let events: Api<Event> = Api::namespaced(s.admin.clone(), ns);
    let mismatch = wait_for(
        "a UsageClaimMismatch Event",
        TIMEOUT,
        || async { events.list(&ListParams::default()).await.unwrap().items },
        |e: &Vec<Event>| {
            e.iter().any(|e| {
                e.reason.as_deref() == Some("UsageClaimMismatch") && e.regarding.as_ref().and_then(|r| r.uid.clone()) == job.metadata.uid
            })
        },
    )
    .await;
    let note = mismatch.iter().find(|e| e.reason.as_deref() == Some("UsageClaimMismatch")).unwrap().note.clone().unwrap();
    assert!(note.contains(&format!("claimed {prompt}/0/{}", completion / 2)), "{note}");
    // Learned once, from the metered usage.
    wait_for_job(&s.admin, ns, "metered", "the attempt learned", |j| {
        j.status.as_ref().is_some_and(|s| s.attempts[0].learned == Some(true))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_racing_one_small_budget_never_exceed_it() {
    let ns = "meter-grants-race";
    let s = setup(ns).await;
    let (up, reported) = upstream().await;
    let agents = ["lead", "helper-a", "helper-b", "helper-c"];
    let budget = usd("0.05");
    let (_, pods) = running_job(&s, ns, "race", &agents, "0.05").await;
    let mut meters = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let token = token(&s.admin, ns, Some(pod), AUDIENCE).await;
        meters.push(MeterProcess::start(s.dir.path(), &format!("race-{i}"), up, s.api_port, &token, "0.01"));
    }
    // Each agent calls until the meter refuses; all at once.
    let mut agents_running = Vec::new();
    for meter in &meters {
        let port = meter.port;
        agents_running.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..100 {
                let (status, body) = chat(port, &format!("call {i}")).await;
                match status {
                    200 => ok += 1,
                    402 => {
                        assert_eq!(body["error"]["type"], "budget_exceeded", "{body}");
                        return ok;
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
            panic!("never refused: the budget is not held");
        }));
    }
    let mut calls = 0;
    for agent in agents_running {
        calls += agent.await.unwrap();
    }
    let (_, _, upstream_cost) = reported_totals(&reported);
    assert_eq!(reported.lock().unwrap().len(), calls);
    assert!(upstream_cost <= budget, "the upstream billed {upstream_cost} on a {budget} budget");
    // One call costs about 4,000 µ$ and reserves about 6,200: the budget was used, not hoarded.
    assert!(upstream_cost.0 > budget.0 - 4 * 10_000, "spent {upstream_cost} of {budget}");
    for meter in meters {
        meter.stop().await;
    }
    let status = meter_status(&s.admin, ns, "race").await;
    assert_eq!(status.grants.len(), 4);
    assert!(status.grants.iter().all(|g| g.settled), "{status:?}");
    assert!(usd(&status.granted_usd) <= budget, "total grants {} > budget", status.granted_usd);
    assert_eq!(usd(&status.spent_usd), upstream_cost, "status has every call, each once");
    assert_eq!(usd(&status.committed_usd), upstream_cost, "settled: only what was spent stays held");

    // The agents are killed (OOM: no termination message, no usage report of their own): their
    // usage is what their meters measured all the same.
    for pod in &pods {
        finish_pod(&s.admin, ns, &pod.name_any(), 137, "").await;
    }
    let failed = wait_for_job(&s.admin, ns, "race", "Failed", |j| phase(j) == Some("Failed")).await;
    let reported_condition = condition(&failed, "UsageReported").cloned().unwrap();
    assert_eq!((reported_condition.status.as_str(), reported_condition.reason.as_str()), ("True", "Metered"), "{reported_condition:?}");
    let usage = failed.status.unwrap().usage.unwrap();
    let (prompt, completion, _) = reported_totals(&reported);
    assert_eq!((usage.input_tokens, usage.output_tokens, usd(&usage.cost_usd)), (prompt, completion, upstream_cost));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_misdirected_meter_requests_are_refused_and_grant_nothing() {
    let ns = "meter-grants-forged";
    let s = setup(ns).await;
    let (job, pods) = running_job(&s, ns, "victim", &["agent"], "1").await;
    let (_, other_pods) = running_job(&s, ns, "other", &["agent"], "1").await;
    let pods_api: Api<Pod> = Api::namespaced(s.admin.clone(), ns);
    // A Pod no job controls, and an agent-looking Pod that is then deleted.
    let pod = |name: &str, controlled: bool| -> Pod {
        let owners = if controlled {
            json!([{"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob", "name": job.name_any(),
                    "uid": job.metadata.uid.clone().unwrap(), "controller": true}])
        } else {
            json!([])
        };
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "ownerReferences": owners,
            "labels": {"agentgate.dev/job-uid": job.metadata.uid.clone().unwrap(), "agentgate.dev/attempt": "1"}},
            "spec": {"containers": [{"name": "agent", "image": "ghcr.io/mallory/agent:1"}]}}))
        .unwrap()
    };
    // Labelled as the victim's, not controlled by it.
    let plain = pods_api.create(&PostParams::default(), &pod("plain", false)).await.unwrap();
    // The victim's (as if the operator made it), deleted before its token is used.
    let doomed = pods_api.create(&PostParams::default(), &pod("doomed", true)).await.unwrap();
    let doomed_token = token(&s.admin, ns, Some(&doomed), AUDIENCE).await;
    pods_api.delete("doomed", &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }).await.unwrap();
    wait_for("the doomed Pod gone", TIMEOUT, || async { pods_api.get_opt("doomed").await.unwrap() }, |p: &Option<Pod>| p.is_none()).await;

    let url = format!("http://127.0.0.1:{}/v1/sync", s.api_port);
    let ask = |pod: Option<&str>| {
        let mut body = json!({"session": "forged-1", "sequence": 1, "usage": {"inputTokens": 0, "cachedInputTokens": 0, "outputTokens": 0,
            "totalTokens": 0, "costUSD": "0"}, "wantUSD": "0.50"});
        if let Some(pod) = pod {
            body["pod"] = json!(pod);
        }
        body
    };
    let victim_pod = pods[0].name_any();
    // (what, token, the Pod the body speaks for, status, reason). A deleted Pod's token is
    // refused by the apiserver itself (bound tokens die with their object).
    let cases: Vec<Attack> = vec![
        ("no token", None, None, 401, "no_token"),
        ("garbage", Some("not-a-token".into()), None, 401, "token_rejected"),
        (
            "the victim's Pod, wrong audience",
            Some(token(&s.admin, ns, Some(&pods[0]), "https://kubernetes.default.svc").await),
            None,
            401,
            "token_rejected",
        ),
        ("a ServiceAccount token bound to no Pod", Some(token(&s.admin, ns, None, AUDIENCE).await), None, 403, "not_bound_to_a_pod"),
        ("a Pod no AgentJob controls", Some(token(&s.admin, ns, Some(&plain), AUDIENCE).await), None, 403, "not_an_agent_pod"),
        ("a deleted Pod", Some(doomed_token), None, 401, "token_rejected"),
        (
            "another job's Pod speaking for the victim's",
            Some(token(&s.admin, ns, Some(&other_pods[0]), AUDIENCE).await),
            Some(&victim_pod),
            403,
            "pod_mismatch",
        ),
    ];
    for (what, bearer, pod, code, reason) in &cases {
        let (status, body) = post(&url, bearer.as_deref(), &ask(*pod)).await;
        assert_eq!((status, body["error"]["reason"].as_str()), (*code, Some(*reason)), "{what}: {body}");
    }
    // The admin's own token (not a ServiceAccount, not for this audience) is no better.
    let (status, body) = post(&url, Some(ControlPlane::shared().token("admin")), &ask(None)).await;
    assert!(status == 401 || status == 403, "{body}");

    // The victim's own meter is served, and it is the only grant the victim's job has: the
    // refusals above granted nothing.
    let victim = token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let (status, body) = post(&url, Some(&victim), &ask(Some(&victim_pod))).await;
    assert_eq!((status, body["grantedUSD"].as_str()), (200, Some("0.50")), "{body}");
    let meter = meter_status(&s.admin, ns, "victim").await;
    assert_eq!((meter.grants.len(), meter.granted_usd.as_str()), (1, "0.50"), "{meter:?}");
    // The other job's Pod reusing the victim's session is refused too.
    let other = token(&s.admin, ns, Some(&other_pods[0]), AUDIENCE).await;
    let (status, body) =
        post(&url, Some(&other), &json!({"session": "forged-1", "sequence": 2, "usage": ask(None)["usage"], "wantUSD": "0.5"})).await;
    assert_eq!(status, 200, "a session is per job: the other job's status has its own: {body}");
    assert_eq!(meter_status(&s.admin, ns, "victim").await.granted_usd, "0.50");
    // A standby replica (the first operator holds the lease: it ran these jobs) grants nothing
    // and says so, so the meter retries until it reaches the leader.
    let standby_port = free_port();
    let _standby = start_operator(ns, standby_port, free_port());
    let standby_url = format!("http://127.0.0.1:{standby_port}/v1/sync");
    let answer = wait_for(
        "the standby's meter API",
        TIMEOUT,
        || async {
            let client = agentgate::meter::client().unwrap();
            let request = hyper::Request::post(&standby_url)
                .header("authorization", format!("Bearer {victim}"))
                .body(Full::new(Bytes::from(ask(None).to_string())))
                .unwrap();
            match client.request(request).await {
                Ok(response) => Some((response.status().as_u16(), response.headers().get("retry-after").is_some())),
                Err(_) => None,
            }
        },
        |a: &Option<(u16, bool)>| a.is_some(),
    )
    .await;
    assert_eq!(answer, Some((503, true)), "a standby answers 503 with Retry-After");
    assert_eq!(meter_status(&s.admin, ns, "victim").await.granted_usd, "0.50");
    let (_, metrics) = http_get(s.metrics_port, "/metrics");
    for reason in ["not_bound_to_a_pod", "not_an_agent_pod", "pod_mismatch", "token_rejected", "no_token"] {
        assert!(metrics.contains(&format!("agentgate_meter_api_requests_total{{outcome=\"{reason}\"}}")), "{reason} counted:\n{metrics}");
    }
    drop(s.operator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_killed_mid_run_leaves_grants_and_usage_and_the_meter_fails_closed() {
    let ns = "meter-grants-restart";
    let mut s = setup(ns).await;
    let (up, reported) = upstream().await;
    let (_, pods) = running_job(&s, ns, "restart", &["agent"], "1").await;
    let token = token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    // A chunk covers three calls (≈6,200 µ$ reserved, ≈4,000 spent each).
    let meter = MeterProcess::start(s.dir.path(), "restart", up, s.api_port, &token, "0.014");
    let (status, body) = chat(meter.port, "first").await;
    assert_eq!(status, 200, "{body}");
    // Recorded before the meter heard of it.
    assert_eq!(meter_status(&s.admin, ns, "restart").await.granted_usd, "0.014");

    s.operator.kill();
    // The meter keeps serving within what it holds, then refuses: fail closed.
    let mut served = 1;
    let refused = loop {
        let (status, body) = chat(meter.port, "while the operator is down").await;
        match status {
            200 => served += 1,
            402 => break body,
            other => panic!("{other}: {body}"),
        }
        assert!(served < 10, "served beyond its grant");
    };
    assert_eq!(refused["error"]["type"], "budget_exceeded");
    let (_, _, cost) = reported_totals(&reported);
    assert!(cost <= usd("0.014") && served >= 2, "{served} calls for {cost} within the 0.014 grant");
    // What was granted is in status, whoever reads it.
    assert_eq!(meter_status(&s.admin, ns, "restart").await.granted_usd, "0.014");

    // A new operator carries on from status: more budget, and usage reported while it was down
    // arrives (the meter's next report carries the cumulative total).
    s.operator = start_operator(ns, s.api_port, s.metrics_port);
    let resumed =
        wait_for("the meter served again", Duration::from_secs(90), || chat(meter.port, "after the restart"), |(status, _)| *status == 200)
            .await;
    assert_eq!(resumed.0, 200);
    let (_, _, cost) = reported_totals(&reported);
    meter.stop().await;
    let status = meter_status(&s.admin, ns, "restart").await;
    assert_eq!(usd(&status.spent_usd), cost, "every call counted once: {status:?}");
    assert!(usd(&status.granted_usd) > usd("0.014") && status.grants.len() == 1 && status.grants[0].settled, "{status:?}");
}
