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
use agentgate::domain::meter_tls as tls;
use agentgate::domain::money::MicroUsd;
use agentgate::meter::grant_client::pinned_client;
use agentgate::meter::proxy::HttpsClient;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rustls::pki_types::pem::PemObject;
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
    /// A meter granted by the operator at `grant` (`--grant-url` and how to trust it), once it
    /// listens.
    fn start(dir: &Path, name: &str, upstream: u16, grant: &[String], token: &str, chunk: &str) -> MeterProcess {
        let mut meter = MeterProcess::spawn(dir, name, upstream, grant, token, chunk);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", meter.port)).is_ok() {
                return meter;
            }
            if let Some(status) = meter.child.try_wait().unwrap() {
                panic!("meter {name} exited with {status}: {}", meter.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("meter {name} did not start: {}", meter.logs());
    }

    fn spawn(dir: &Path, name: &str, upstream: u16, grant: &[String], token: &str, chunk: &str) -> MeterProcess {
        let token_file = dir.join(format!("{name}.token"));
        std::fs::write(&token_file, token).unwrap();
        let prices = dir.join("prices.yaml");
        std::fs::write(&prices, PRICES).unwrap();
        let log = dir.join(format!("{name}.log"));
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_agentgate"))
            .args(["meter", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--openai-upstream", &format!("http://127.0.0.1:{upstream}/v1")])
            .args(grant)
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
        MeterProcess { child, port, log }
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
    let client = agentgate::meter::client().unwrap();
    post(&client, &format!("http://127.0.0.1:{meter_port}/v1/chat/completions"), Some("sk-dummy"), &body).await.expect("POST")
}

async fn post(client: &HttpsClient, url: &str, bearer: Option<&str>, body: &Value) -> Result<(u16, Value), String> {
    let mut request = hyper::Request::post(url).header("content-type", "application/json");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = client.request(request.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await.map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

// ---------------------------------------------------------------- the cluster side

struct Setup {
    admin: Client,
    operator: OperatorProcess,
    api_port: u16,
    metrics_port: u16,
    dir: tempfile::TempDir,
    /// The operator's CA certificate for the meter API, as a file, and a client trusting it alone.
    ca_file: PathBuf,
    api: HttpsClient,
}

impl Setup {
    /// A meter's `--grant-url` and CA, as the operator gives them to the meters it injects.
    fn grant(&self) -> Vec<String> {
        let ca = self.ca_file.display().to_string();
        vec!["--grant-url".into(), format!("https://127.0.0.1:{}", self.api_port), "--grant-ca-file".into(), ca]
    }

    fn sync_url(&self) -> String {
        format!("https://127.0.0.1:{}/v1/sync", self.api_port)
    }
}

fn start_operator(ns: &str, api_port: u16, metrics_port: u16) -> OperatorProcess {
    start_operator_with(ns, api_port, metrics_port, &[])
}

/// [`start_operator`] with `extra` flags after the usual ones.
fn start_operator_with(ns: &str, api_port: u16, metrics_port: u16, extra: &[&str]) -> OperatorProcess {
    let (metrics, listen, grant_url) =
        (format!("127.0.0.1:{metrics_port}"), format!("127.0.0.1:{api_port}"), format!("https://127.0.0.1:{api_port}"));
    // Where the meters dial it: the managed certificate names this address.
    let mut args = vec!["--namespace", ns, "--metrics-addr", &metrics, "--meter-api-listen", &listen, "--meter-grant-url", &grant_url];
    args.extend_from_slice(extra);
    OperatorProcess::start(ControlPlane::shared(), &args)
}

/// The meter API's Secret (controller/meter_tls.rs), once the operator has made it.
async fn tls_secret(admin: &Client, ns: &str) -> Secret {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    wait_for(
        "the meter API's certificate Secret",
        TIMEOUT,
        || async { secrets.get_opt(tls::DEFAULT_SECRET).await.unwrap() },
        |s| s.is_some(),
    )
    .await
    .unwrap()
}

fn secret_text(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

/// The shared [`Env`] (namespace, node, voting rights) and an operator serving the meter API on a
/// port of its own, which [`start_operator`] restarts on.
async fn setup(ns: &str) -> Setup {
    let admin = Env::builder(ns).node("meter-grants-node", "64", "256Gi", &[]).operator(OperatorMode::Later).build().await.admin;
    let (api_port, metrics_port) = (free_port(), free_port());
    let operator = start_operator(ns, api_port, metrics_port);
    let dir = tempfile::tempdir().unwrap();
    let ca = secret_text(&tls_secret(&admin, ns).await, tls::CA_CERT_KEY);
    let ca_file = dir.path().join("meter-api-ca.crt");
    std::fs::write(&ca_file, &ca).unwrap();
    let api = pinned_client(ca.as_bytes()).unwrap();
    Setup { admin, operator, api_port, metrics_port, dir, ca_file, api }
}

/// Creates a job with these agents and budget, approves it, and returns it with its Pods running.
async fn running_job(s: &Setup, ns: &str, name: &str, agents: &[&str], budget: &str) -> (AgentJob, Vec<Pod>) {
    running_job_with(s, ns, name, agents, budget, json!({})).await
}

/// [`running_job`] with `patch` merged into the spec.
async fn running_job_with(s: &Setup, ns: &str, name: &str, agents: &[&str], budget: &str, patch: Value) -> (AgentJob, Vec<Pod>) {
    let agent = |n: &str| json!({"name": n, "image": "ghcr.io/acme/agent:1", "model": "gpt-4o-mini"});
    let spec = json!({"category": "payments",
        "agents": {"primary": agent(agents[0]), "supporting": agents[1..].iter().map(|a| agent(a)).collect::<Vec<_>>()},
        "resources": {"cpu": "100m", "memory": "128Mi"}, "budget": {"maxCostUSD": budget}});
    let job = Api::<AgentJob>::namespaced(s.admin.clone(), ns).create(&PostParams::default(), &agent_job(name, spec, patch)).await.unwrap();
    let cp = ControlPlane::shared();
    vote(&cp.client("alice").await, &job, "alice", Decision::Approve).await;
    vote(&cp.client("bob").await, &job, "bob", Decision::Approve).await;
    let pods = wait_for("the agent Pods", TIMEOUT, || job_pods(&s.admin, ns, &job), |p: &Vec<Pod>| p.len() == agents.len()).await;
    for pod in &pods {
        run_pod(&s.admin, ns, &pod.name_any()).await;
    }
    (job, pods)
}

async fn meter_status(admin: &Client, ns: &str, name: &str) -> MeterStatus {
    let job = Api::<AgentJob>::namespaced(admin.clone(), ns).get(name).await.unwrap();
    job.status.and_then(|s| s.meter).map(|m| *m).unwrap_or_default()
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
    let token = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let meter = MeterProcess::start(s.dir.path(), "happy", up, &s.grant(), &token, "0.02");

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
        let token = service_account_token(&s.admin, ns, Some(pod), AUDIENCE).await;
        meters.push(MeterProcess::start(s.dir.path(), &format!("race-{i}"), up, &s.grant(), &token, "0.01"));
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
    assert_eq!(condition(&failed, "Ready").unwrap().reason, "BudgetExhausted", "the meters refused calls for budget");
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
    let doomed_token = service_account_token(&s.admin, ns, Some(&doomed), AUDIENCE).await;
    pods_api.delete("doomed", &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }).await.unwrap();
    wait_for("the doomed Pod gone", TIMEOUT, || async { pods_api.get_opt("doomed").await.unwrap() }, |p: &Option<Pod>| p.is_none()).await;

    let url = s.sync_url();
    let ask = |pod: Option<&str>| {
        let mut body = json!({"session": "forged-1", "sequence": 1, "usage": {"inputTokens": 0, "cachedInputTokens": 0, "outputTokens": 0,
            "totalTokens": 0, "costUSD": "0"}, "wantUSD": "0.50"});
        if let Some(pod) = pod {
            body["pod"] = json!(pod);
        }
        body
    };
    let victim_pod = pods[0].name_any();
    // (what, token, the Pod the body speaks for, status, reason).
    let cases: Vec<Attack> = vec![
        ("no token", None, None, 401, "no_token"),
        ("garbage", Some("not-a-token".into()), None, 401, "token_rejected"),
        (
            "the victim's Pod, wrong audience",
            Some(service_account_token(&s.admin, ns, Some(&pods[0]), "https://kubernetes.default.svc").await),
            None,
            401,
            "token_rejected",
        ),
        (
            "a ServiceAccount token bound to no Pod",
            Some(service_account_token(&s.admin, ns, None, AUDIENCE).await),
            None,
            403,
            "not_bound_to_a_pod",
        ),
        (
            "a Pod no AgentJob controls",
            Some(service_account_token(&s.admin, ns, Some(&plain), AUDIENCE).await),
            None,
            403,
            "not_an_agent_pod",
        ),
        // Not in the operator's Pod cache: refused before any TokenReview (retryable, as a Pod
        // created a moment ago may not be there yet).
        ("a deleted Pod", Some(doomed_token), None, 503, "pod_unknown"),
        (
            "another job's Pod speaking for the victim's",
            Some(service_account_token(&s.admin, ns, Some(&other_pods[0]), AUDIENCE).await),
            Some(&victim_pod),
            403,
            "pod_mismatch",
        ),
    ];
    for (what, bearer, pod, code, reason) in &cases {
        let (status, body) = post(&s.api, &url, bearer.as_deref(), &ask(*pod)).await.unwrap();
        assert_eq!((status, body["error"]["reason"].as_str()), (*code, Some(*reason)), "{what}: {body}");
    }
    // The admin's own token (not a ServiceAccount, not for this audience) is no better.
    let (status, body) = post(&s.api, &url, Some(ControlPlane::shared().token("admin")), &ask(None)).await.unwrap();
    assert!(status == 401 || status == 403, "{body}");

    // The victim's own meter is served, and it is the only grant the victim's job has: the
    // refusals above granted nothing.
    let victim = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let (status, body) = post(&s.api, &url, Some(&victim), &ask(Some(&victim_pod))).await.unwrap();
    assert_eq!((status, body["grantedUSD"].as_str()), (200, Some("0.50")), "{body}");
    let meter = meter_status(&s.admin, ns, "victim").await;
    assert_eq!((meter.grants.len(), meter.granted_usd.as_str()), (1, "0.50"), "{meter:?}");
    // The other job's Pod reusing the victim's session is refused too.
    let other = service_account_token(&s.admin, ns, Some(&other_pods[0]), AUDIENCE).await;
    let (status, body) =
        post(&s.api, &url, Some(&other), &json!({"session": "forged-1", "sequence": 2, "usage": ask(None)["usage"], "wantUSD": "0.5"}))
            .await
            .unwrap();
    assert_eq!(status, 200, "a session is per job: the other job's status has its own: {body}");
    assert_eq!(meter_status(&s.admin, ns, "victim").await.granted_usd, "0.50");
    // A standby replica (the first operator holds the lease: it ran these jobs) grants nothing
    // and says so, so the meter retries until it reaches the leader.
    let standby_port = free_port();
    let _standby = start_operator(ns, standby_port, free_port());
    let standby_url = format!("https://127.0.0.1:{standby_port}/v1/sync");
    let answer = wait_for(
        "the standby's meter API",
        TIMEOUT,
        || async {
            let request = hyper::Request::post(&standby_url)
                .header("authorization", format!("Bearer {victim}"))
                .body(Full::new(Bytes::from(ask(None).to_string())))
                .unwrap();
            match s.api.request(request).await {
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

/// A running attempt draws on the budget its heads approved. Raising `budget.maxCostUSD` while it
/// runs is a new generation nobody approved (it applies from the next attempt, once approved):
/// it must buy the running attempt's meters nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_budget_while_an_attempt_runs_grants_it_nothing_more() {
    let ns = "meter-grants-raise";
    let s = setup(ns).await;
    let (_, pods) = running_job(&s, ns, "raised", &["agent"], "0.05").await;
    let meter = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let raised = Api::<AgentJob>::namespaced(s.admin.clone(), ns)
        .patch("raised", &PatchParams::default(), &Patch::Merge(json!({"spec": {"budget": {"maxCostUSD": "100"}}})))
        .await
        .unwrap();
    assert_eq!(raised.metadata.generation, Some(2));
    let zero = json!({"inputTokens": 0, "cachedInputTokens": 0, "outputTokens": 0, "totalTokens": 0, "costUSD": "0"});
    let ask = json!({"session": "raise-1", "sequence": 1, "usage": zero, "wantUSD": "10"});
    let (status, body) = post(&s.api, &s.sync_url(), Some(&meter), &ask).await.unwrap();
    assert_eq!((status, body["grantedUSD"].as_str()), (200, Some("0.05")), "granted beyond the approved budget: {body}");
    assert_eq!(meter_status(&s.admin, ns, "raised").await.granted_usd, "0.05");
    // Lowering it (a stricter budget, whoever wrote it) holds at once.
    Api::<AgentJob>::namespaced(s.admin.clone(), ns)
        .patch("raised", &PatchParams::default(), &Patch::Merge(json!({"spec": {"budget": {"maxCostUSD": "0.01"}}})))
        .await
        .unwrap();
    let ask = json!({"session": "raise-2", "sequence": 1, "usage": zero, "wantUSD": "10"});
    let (status, body) = post(&s.api, &s.sync_url(), Some(&meter), &ask).await.unwrap();
    assert_eq!((status, body["grantedUSD"].as_str()), (200, Some("0.00")), "{body}");
}

/// The meter API takes a running attempt's budget and attempt number from the agent container's
/// environment, fixed when the operator built the Pod from the generation the heads approved (a
/// Pod's env never changes). A Pod the job controls without them (made by hand where the Pod
/// admission policy is missing, or by a cluster admin) must draw nothing: falling back to the
/// spec's budget would hand it whatever the spec says now, approved or not, and a relabelled
/// attempt would book its usage on another attempt's account. The operator's own Pod is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_without_the_approved_budget_in_its_environment_is_granted_nothing() {
    let ns = "meter-grants-pod-terms";
    let s = setup(ns).await;
    let (job, pods) = running_job(&s, ns, "termless", &["agent"], "1").await;
    let pods_api: Api<Pod> = Api::namespaced(s.admin.clone(), ns);
    let forged = |name: &str, env: Value| -> Pod {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name,
            "labels": {"agentgate.dev/attempt": "1"},
            "ownerReferences": [{"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob", "name": job.name_any(),
                "uid": job.metadata.uid.clone().unwrap(), "controller": true}]},
            "spec": {"containers": [{"name": "agent", "image": "ghcr.io/mallory/agent:1", "env": env}]}}))
        .unwrap()
    };
    let cases = [
        ("no-budget", json!([{"name": "AGENTGATE_ATTEMPT", "value": "1"}]), "pod_budget_missing"),
        (
            "bad-budget",
            json!([{"name": "AGENTGATE_ATTEMPT", "value": "1"}, {"name": "AGENTGATE_BUDGET_USD", "value": "lots"}]),
            "pod_budget_missing",
        ),
        (
            "relabelled",
            json!([{"name": "AGENTGATE_ATTEMPT", "value": "2"}, {"name": "AGENTGATE_BUDGET_USD", "value": "1"}]),
            "pod_attempt_mismatch",
        ),
    ];
    let zero = json!({"inputTokens": 0, "cachedInputTokens": 0, "outputTokens": 0, "totalTokens": 0, "costUSD": "0"});
    for (name, env, reason) in cases {
        let pod = pods_api.create(&PostParams::default(), &forged(name, env)).await.unwrap();
        let bearer = service_account_token(&s.admin, ns, Some(&pod), AUDIENCE).await;
        let ask = json!({"session": format!("terms-{name}"), "sequence": 1, "usage": zero, "wantUSD": "0.50"});
        let (status, body) = post(&s.api, &s.sync_url(), Some(&bearer), &ask).await.unwrap();
        assert_eq!((status, body["error"]["reason"].as_str()), (403, Some(reason)), "{name}: {body}");
    }
    for name in ["no-budget", "bad-budget", "relabelled"] {
        let named = wait_for(
            &format!("a MeterPodRefused Event naming Pod {name}"),
            TIMEOUT,
            || job_events(&s.admin, ns, &job, "MeterPodRefused"),
            |e: &Vec<Event>| e.iter().any(|e| e.note.as_deref().is_some_and(|n| n.contains(&format!("Pod {ns}/{name} ")))),
        )
        .await;
        assert!(named.iter().all(|e| e.type_.as_deref() == Some("Warning")), "{named:?}");
    }
    // The operator's own Pod draws on the approved budget, and its grant is the only one.
    let meter = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let ask = json!({"session": "terms-own", "sequence": 1, "usage": zero, "wantUSD": "0.50"});
    let (status, body) = post(&s.api, &s.sync_url(), Some(&meter), &ask).await.unwrap();
    assert_eq!((status, body["grantedUSD"].as_str()), (200, Some("0.50")), "{body}");
    let meter = meter_status(&s.admin, ns, "termless").await;
    assert_eq!((meter.grants.len(), meter.granted_usd.as_str()), (1, "0.50"), "{meter:?}");
    let (_, metrics) = http_get(s.metrics_port, "/metrics");
    for reason in ["pod_budget_missing", "pod_attempt_mismatch"] {
        assert!(metrics.contains(&format!("agentgate_meter_api_requests_total{{outcome=\"{reason}\"}}")), "{reason} counted");
    }
}

/// An attempt's usage is final once the operator has settled it (every Pod of it terminated):
/// nothing reported on it later is ever counted. Its Pods stay until deleted, and a tenant who
/// may mint tokens (`edit`) gets one bound to such a Pod as the kubelet would: its sessions must
/// draw and report nothing, or a meter run on it (with the team's keys, which `edit` reads)
/// would spend the retry's budget on an account nobody adds up again (usage under-reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_attempts_pod_draws_nothing_and_reports_nothing() {
    let ns = "meter-grants-settled";
    let s = setup(ns).await;
    let (job, first) = running_job_with(&s, ns, "retried", &["agent"], "1", json!({"limits": {"maxRetries": 1}})).await;
    finish_pod(&s.admin, ns, &first[0].name_any(), 1, "").await;
    let attempt = |p: &Pod| p.labels().get("agentgate.dev/attempt").cloned().unwrap_or_default();
    let pods =
        wait_for("attempt 2's Pod", TIMEOUT, || job_pods(&s.admin, ns, &job), |p: &Vec<Pod>| p.iter().any(|p| attempt(p) == "2")).await;
    let second = pods.into_iter().find(|p| attempt(p) == "2").unwrap();
    run_pod(&s.admin, ns, &second.name_any()).await;
    let settled = wait_for_job(&s.admin, ns, "retried", "attempt 1 settled", |j| {
        j.status.as_ref().is_some_and(|s| s.attempts.len() == 2 && s.attempts[0].result != agentgate::api::AttemptResult::Running)
    })
    .await;
    let usage_before = settled.status.as_ref().unwrap().attempts[0].usage.clone();

    let late = json!({"inputTokens": 0, "cachedInputTokens": 0, "outputTokens": 0, "totalTokens": 0, "costUSD": "0.30"});
    let stale = service_account_token(&s.admin, ns, Some(&first[0]), AUDIENCE).await;
    let ask = json!({"session": "after-the-end", "sequence": 1, "usage": late, "wantUSD": "0.50"});
    let (status, body) = post(&s.api, &s.sync_url(), Some(&stale), &ask).await.unwrap();
    assert_eq!((status, body["error"]["reason"].as_str()), (409, Some("attempt_ended")), "{body}");

    // The running attempt's Pod draws as ever; the ended one's account holds nothing.
    let current = service_account_token(&s.admin, ns, Some(&second), AUDIENCE).await;
    let zero = json!({"inputTokens": 0, "cachedInputTokens": 0, "outputTokens": 0, "totalTokens": 0, "costUSD": "0"});
    let ask = json!({"session": "the-retry", "sequence": 1, "usage": zero, "wantUSD": "0.50"});
    let (status, body) = post(&s.api, &s.sync_url(), Some(&current), &ask).await.unwrap();
    assert_eq!((status, body["grantedUSD"].as_str()), (200, Some("0.50")), "{body}");
    let meter = meter_status(&s.admin, ns, "retried").await;
    assert!(meter.grants.iter().all(|g| g.attempt == 2), "a session on the settled attempt: {meter:?}");
    assert_eq!((meter.spent_usd.as_str(), meter.committed_usd.as_str()), ("0.00", "0.50"), "{meter:?}");
    let after = Api::<AgentJob>::namespaced(s.admin.clone(), ns).get("retried").await.unwrap();
    assert_eq!(after.status.unwrap().attempts[0].usage, usage_before);
}

/// A tenant who may mint tokens for the namespace's ServiceAccounts (`create` on
/// `serviceaccounts/token`, which the built-in `edit` role grants) gets one bound to their own
/// agent Pod for the meters' audience, exactly as the kubelet's: to the operator it is the
/// meter's. With it they must not reach the meter's session, which status shows them: settling
/// it would give its unspent grant, still held by the meter, to other meters (spend past the
/// budget), and a sequence far ahead would have every later report of the meter taken for a
/// retry (usage frozen, under-reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_for_the_agent_pod_cannot_settle_or_freeze_its_meters_session() {
    let ns = "meter-grants-session";
    let s = setup(ns).await;
    let (up, _) = upstream().await;
    let (_, pods) = running_job(&s, ns, "hijacked", &["agent"], "1").await;
    let meter_token = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let meter = MeterProcess::start(s.dir.path(), "hijacked", up, &s.grant(), &meter_token, "0.05");
    let (status, body) = chat(meter.port, "first").await;
    assert_eq!(status, 200, "{body}");

    // dave may read the job (and its status) and mint tokens in the namespace, as `edit` allows.
    let pp = PatchParams::apply("meter-grants").force();
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "token-minter", "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}]});
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(s.admin.clone(), ns)
        .patch("token-minter", &pp, &Patch::Apply(&role))
        .await
        .unwrap();
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "dave-mints-tokens", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "token-minter"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dave"}]});
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(s.admin.clone(), ns)
        .patch("dave-mints-tokens", &pp, &Patch::Apply(&binding))
        .await
        .unwrap();
    let dave = ControlPlane::shared().client("dave").await;
    let reported = wait_for(
        "the meter's first report, as dave reads it",
        TIMEOUT,
        || meter_status(&dave, ns, "hijacked"),
        |m: &MeterStatus| m.grants.len() == 1 && m.grants[0].usage.is_some(),
    )
    .await
    .grants[0]
        .clone();
    let forged = service_account_token(&dave, ns, Some(&pods[0]), AUDIENCE).await;

    // Whatever status names the session by, dave settles it, far ahead in sequence, claiming
    // only what it had reported.
    let attack = json!({"session": reported.session, "sequence": 1_000_000_000, "usage": reported.usage, "last": true});
    let (status, body) = post(&s.api, &s.sync_url(), Some(&forged), &attack).await.unwrap();
    let after = meter_status(&s.admin, ns, "hijacked").await;
    let session = after.grants.iter().find(|g| g.session == reported.session && g.pod_uid == reported.pod_uid).unwrap();
    assert!(
        !session.settled && session.sequence == reported.sequence,
        "dave's request ({status} {body}) reached the meter's session: {session:?}"
    );
    assert_eq!(usd(&after.committed_usd), usd(&reported.granted_usd), "the meter's grant is still held: {after:?}");

    // The meter's own reports still count: its next call's usage reaches status.
    let (status, body) = chat(meter.port, "second").await;
    assert_eq!(status, 200, "{body}");
    let spent_before = usd(&reported.spent_usd);
    wait_for(
        "the meter's second call in status",
        TIMEOUT,
        || meter_status(&s.admin, ns, "hijacked"),
        |m: &MeterStatus| m.grants.iter().any(|g| g.session == reported.session && usd(&g.spent_usd) > spent_before),
    )
    .await;
    meter.stop().await;
}

/// A tenant holding a token bound to their agent Pod (minted, as `edit` allows; or an agent
/// calling many priced models) opens session after session, each reporting 64 models with
/// 128-character names. Stored as sent, the job's status passed what etcd takes (1.5 MiB) after
/// about 100 sessions: from then on every status write of the job failed, the real meter's
/// reports with them (its usage lost), and the job could no longer record its end. Beyond a cap
/// the per-model detail is folded into one entry, every total kept exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_full_of_long_model_names_cannot_grow_the_jobs_status_past_what_etcd_takes() {
    let ns = "meter-grants-bloat";
    let s = setup(ns).await;
    let (job, pods) = running_job(&s, ns, "bloated", &["agent"], "1").await;
    let minted = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    const SESSIONS: usize = 150;
    let bloat = |session: usize| {
        let models: Vec<Value> = (0..64)
            .map(|m| {
                json!({"model": format!("s{session:04}-m{m:02}-{}", "x".repeat(118)), "inputTokens": 1, "cachedInputTokens": 1,
                "outputTokens": 1, "costUSD": "0.000001"})
            })
            .collect();
        json!({"session": format!("bloat-{session}"), "sequence": 1, "usage": {"inputTokens": 64, "cachedInputTokens": 64,
            "outputTokens": 64, "totalTokens": 192, "costUSD": "0.000064", "models": models}})
    };
    let mut refused = Vec::new();
    for session in 0..SESSIONS {
        let (status, body) = post(&s.api, &s.sync_url(), Some(&minted), &bloat(session)).await.unwrap();
        if status != 200 {
            refused.push(format!("session {session}: {status} {body}"));
        }
    }
    // The meter's own report after the flood is recorded, token for token.
    let usage = json!({"inputTokens": 1000, "cachedInputTokens": 0, "outputTokens": 2000, "totalTokens": 3000, "costUSD": "0.201",
        "models": [{"model": "gpt-4o-mini", "inputTokens": 1000, "cachedInputTokens": 0, "outputTokens": 2000, "costUSD": "0.201"}]});
    let meter_token = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let (status, body) =
        post(&s.api, &s.sync_url(), Some(&meter_token), &json!({"session": "the-meter", "sequence": 1, "usage": usage, "last": true}))
            .await
            .unwrap();
    assert_eq!(status, 200, "the meter's report after {} refused bloat sessions ({:?}): {body}", refused.len(), refused.first());
    let meter = meter_status(&s.admin, ns, "bloated").await;
    let own = meter.grants.iter().find(|g| g.usage.as_ref().is_some_and(|u| u.cost_usd == "0.201")).expect("the meter's grant");
    assert_eq!(own.usage.as_ref().unwrap().output_tokens, 2000);
    // Every session counted: usage is never lost, only its per-model detail folded.
    let expected = usd("0.201").saturating_add(MicroUsd(64 * SESSIONS as i64));
    assert_eq!(usd(&meter.spent_usd), expected, "{} sessions, {} refused", meter.grants.len(), refused.len());

    // The attempt ends: its usage is every session's, exactly.
    finish_pod(&s.admin, ns, &pods[0].name_any(), 0, &usage_report("gpt-4o-mini", 1000, 0, 2000, json!({}))).await;
    let done = wait_for_job(&s.admin, ns, "bloated", "succeeded", |j| phase(j) == Some("Succeeded")).await;
    let total = done.status.as_ref().unwrap().usage.as_ref().unwrap();
    assert_eq!(usd(&total.cost_usd), expected);
    assert_eq!(total.output_tokens, 2000 + 64 * SESSIONS as i64);
    let size = serde_json::to_vec(&done.status).unwrap().len();
    println!("status of a job with {} sessions of 64 long model names: {size} bytes", meter.grants.len());
    assert!(size < 1024 * 1024, "status is {size} bytes");
    drop(job);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_killed_mid_run_leaves_grants_and_usage_and_the_meter_fails_closed() {
    let ns = "meter-grants-restart";
    let mut s = setup(ns).await;
    let (up, reported) = upstream().await;
    let (_, pods) = running_job(&s, ns, "restart", &["agent"], "1").await;
    let token = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    // A chunk covers three calls (≈6,200 µ$ reserved, ≈4,000 spent each).
    let meter = MeterProcess::start(s.dir.path(), "restart", up, &s.grant(), &token, "0.014");
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
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("the operator could not be reached"), "{message}");
    assert_eq!(meter.usage()["budgetRefusals"], 0, "refused for want of an operator, not of budget: the job does not end for it");
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
    assert_eq!(status.grants[0].budget_refusals, 0, "{status:?}");
}

/// A meter killed (SIGKILL, as the kernel's OOM killer does: an agent can make its own meter run
/// out of memory) and restarted in the same Pod carries on its session from its state file
/// (src/meter/state_file.rs): the operator sees one session, the later sequence numbers apply
/// (none is taken for a retry), its usage never goes down (no `UsageWentDown` refusal), and when
/// it settles every call of both processes is counted once. Without the file the second process
/// opened a second session and the first one's grant stayed held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_killed_and_restarted_carries_on_its_session_and_every_call_counts_once() {
    let ns = "meter-grants-meter-restart";
    let s = setup(ns).await;
    let (up, reported) = upstream().await;
    let (_, pods) = running_job(&s, ns, "killed", &["agent"], "1").await;
    let token = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let state = s.dir.path().join("meter-state.json");
    let mut args = s.grant();
    args.extend(["--state-file".to_string(), state.display().to_string()]);
    let first = MeterProcess::start(s.dir.path(), "first", up, &args, &token, "0.02");
    for text in ["one", "two"] {
        assert_eq!(chat(first.port, text).await.0, 200, "{}", first.logs());
    }
    let (_, _, cost) = reported_totals(&reported);
    wait_for(
        "the first process's report",
        TIMEOUT,
        || meter_status(&s.admin, ns, "killed"),
        |m: &MeterStatus| MicroUsd::parse(&m.spent_usd) == Some(cost),
    )
    .await;
    drop(first); // SIGKILL: no settle, no last report.
    let second = MeterProcess::start(s.dir.path(), "second", up, &args, &token, "0.02");
    assert_eq!(micro(&second.usage()["usage"]["costUSD"]), cost, "it starts from the first process's usage");
    assert_eq!(chat(second.port, "three").await.0, 200, "{}", second.logs());
    let (prompt, completion, cost) = reported_totals(&reported);
    let logs = second.stop().await;
    assert!(logs.contains("resumed the session") && logs.contains("settled with the operator"), "{logs}");
    let status = meter_status(&s.admin, ns, "killed").await;
    assert_eq!(status.grants.len(), 1, "one session for the Pod: {status:?}");
    let grant = &status.grants[0];
    assert!(grant.settled, "{status:?}");
    let usage = grant.usage.as_ref().unwrap();
    assert_eq!((usage.input_tokens, usage.output_tokens, usd(&status.spent_usd)), (prompt, completion, cost), "{status:?}");
    assert_eq!(usd(&status.committed_usd), cost, "the unspent grant returned: {status:?}");
}

/// Calls through the meter until it refuses one for budget; returns how many were served.
async fn call_until_refused(meter: &MeterProcess) -> usize {
    for served in 0..100 {
        let (status, body) = chat(meter.port, &format!("call {served}")).await;
        match status {
            200 => {}
            402 => {
                assert_eq!(body["error"]["type"], "budget_exceeded", "{body}");
                return served;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    panic!("never refused: the budget is not held");
}

async fn job_events(admin: &Client, ns: &str, job: &AgentJob, reason: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(admin.clone(), ns);
    let uid = job.metadata.uid.clone();
    wait_for(
        &format!("a {reason} Event"),
        TIMEOUT,
        || async { events.list(&ListParams::default()).await.unwrap().items },
        |e: &Vec<Event>| e.iter().any(|e| e.reason.as_deref() == Some(reason) && e.regarding.as_ref().and_then(|r| r.uid.clone()) == uid),
    )
    .await
    .into_iter()
    .filter(|e| e.reason.as_deref() == Some(reason) && e.regarding.as_ref().and_then(|r| r.uid.clone()) == uid)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_smaller_than_the_run_ends_the_job_budget_exhausted_within_it_keeping_output_and_usage() {
    let ns = "meter-grants-exhausted";
    let s = setup(ns).await;
    let (up, reported) = upstream().await;
    // A retry is allowed, and must not be made: its calls could not fit either.
    let (job, pods) = running_job_with(&s, ns, "exhausted", &["agent"], "0.02", json!({"limits": {"maxRetries": 1}})).await;
    let token = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let meter = MeterProcess::start(s.dir.path(), "exhausted", up, &s.grant(), &token, "0.01");
    let served = call_until_refused(&meter).await;
    let (prompt, completion, cost) = reported_totals(&reported);
    assert!(served >= 2 && cost <= usd("0.02"), "{served} calls for {cost} within the $0.02 budget");
    assert_eq!(meter.usage()["budgetRefusals"], 1, "{}", meter.logs());

    // Live: the refusal reaches status with the meter's next report, and the job says what follows.
    let live = wait_for_job(&s.admin, ns, "exhausted", "the refusal reported", |j| {
        condition(j, "Ready").is_some_and(|c| c.message.contains("the job ends BudgetExhausted when its agents exit"))
    })
    .await;
    assert_eq!((phase(&live), live.status.as_ref().unwrap().meter.as_ref().unwrap().grants[0].budget_refusals), (Some("Running"), 1));

    // The agent handles the 402 (the SDK raised it), reports what it has and exits 0.
    meter.stop().await;
    let claim = usage_report("test-gpt", prompt, 0, completion, json!({"partial": true, "calls": served}));
    finish_pod(&s.admin, ns, &pods[0].name_any(), 0, &claim).await;
    let done = wait_for_job(&s.admin, ns, "exhausted", "Failed", |j| phase(j) == Some("Failed")).await;
    let ready = condition(&done, "Ready").cloned().unwrap();
    assert_eq!(ready.reason, "BudgetExhausted", "{ready:?}");
    assert!(
        ready.message.contains(&format!("spent ${cost} of budget.maxCostUSD $0.02; output and usage so far kept; not retried")),
        "{ready:?}"
    );
    let status = done.status.clone().unwrap();
    assert_eq!(status.attempts.len(), 1, "not retried");
    assert!(status.attempts[0].message.as_deref().unwrap().starts_with("BudgetExhausted: the agent meters refused 1 call(s)"));
    assert_eq!(status.output.as_deref(), Some(&json!({"partial": true, "calls": served})), "the output so far is kept");
    let usage = status.usage.unwrap();
    assert_eq!((usage.input_tokens, usage.output_tokens, usd(&usage.cost_usd)), (prompt, completion, cost), "the usage so far is kept");
    assert!(usd(&status.meter.unwrap().committed_usd) <= usd("0.02"));
    let events = job_events(&s.admin, ns, &job, "BudgetExhausted").await;
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    assert_eq!(events[0].note.as_deref(), Some(ready.message.as_str()), "the Event says what the condition says");
    let table = ControlPlane::shared().kubectl("admin", &["get", "aj", "exhausted", "-n", ns, "-o", "wide"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("REASON") && table.contains("BudgetExhausted"), "kubectl get aj -o wide shows the reason:\n{table}");
}

/// The attack: an agent that ignores 402 and keeps calling. It gets nothing more (spend stays
/// within the budget), its meter does not turn every refused call into a status write (it stops
/// asking the operator for 5 s once told nothing is left), and when it is finally stopped (its
/// deadline, here played by the test) the job still ends BudgetExhausted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_ignoring_402_spends_nothing_more_and_writes_status_at_a_bounded_rate() {
    let ns = "meter-grants-ignores-402";
    let s = setup(ns).await;
    let (up, reported) = upstream().await;
    let (_, pods) = running_job(&s, ns, "stubborn", &["agent"], "0.02").await;
    let token = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let meter = MeterProcess::start(s.dir.path(), "stubborn", up, &s.grant(), &token, "0.01");
    let served = call_until_refused(&meter).await;
    let steps_at_refusal = meter_status(&s.admin, ns, "stubborn").await.grants[0].sequence;
    let mut refused = 1;
    let started = std::time::Instant::now();
    for i in 0..300 {
        let (status, body) = chat(meter.port, &format!("again {i}")).await;
        assert_eq!((status, body["error"]["type"].as_str()), (402, Some("budget_exceeded")), "{body}");
        refused += 1;
    }
    assert_eq!(reported.lock().unwrap().len(), served, "no refused call reached the provider");
    let (_, _, cost) = reported_totals(&reported);
    assert!(cost <= usd("0.02"), "{cost}");
    assert_eq!(meter.usage()["budgetRefusals"], refused);
    // The refused calls reach status as a count with the next report, not as a write each.
    let live = wait_for(
        "the refusals reported",
        TIMEOUT,
        || meter_status(&s.admin, ns, "stubborn"),
        |m: &MeterStatus| m.grants[0].budget_refusals == refused,
    )
    .await;
    // At most a report per --report-seconds (1 s here) and a request for more per 5 s, however
    // many calls the agent makes in that time (one each would be 300).
    let seconds = started.elapsed().as_secs() as i64 + 1;
    let steps = live.grants[0].sequence - steps_at_refusal;
    assert!(
        steps <= seconds + seconds / 5 + 2,
        "{steps} sync requests in {seconds} s for {refused} refused calls: the status write rate is not bounded by the agent"
    );

    // Stopped at its deadline: no report of its own.
    meter.stop().await;
    finish_pod(&s.admin, ns, &pods[0].name_any(), 137, "").await;
    let done = wait_for_job(&s.admin, ns, "stubborn", "Failed", |j| phase(j) == Some("Failed")).await;
    assert_eq!(condition(&done, "Ready").unwrap().reason, "BudgetExhausted");
    let status = done.status.unwrap();
    assert_eq!(usd(&status.usage.unwrap().cost_usd), cost, "its usage is what the meter measured");
    assert_eq!(status.meter.unwrap().grants[0].budget_refusals, refused);
}

// ---------------------------------------------------------------- TLS (controller/meter_tls.rs)

/// The certificate a server on loopback `port` presents to a client trusting `ca` alone, or why
/// the handshake failed. A new connection each time.
async fn served_certificate(port: u16, ca: &[u8]) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

/// A forged meter API: HTTPS on loopback with a certificate for 127.0.0.1 from `material`'s CA
/// (not the operator's), granting $100 to whoever asks. Counts the requests it receives.
async fn forged_meter_api(material: &tls::Material) -> (u16, Arc<Mutex<usize>>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_slice_iter(material.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let requests = Arc::new(Mutex::new(0));
    let counted = requests.clone();
    let app = axum::Router::new().route(
        "/v1/sync",
        axum::routing::post(move || {
            *counted.lock().unwrap() += 1;
            async { axum::Json(json!({"grantedUSD": "100", "availableUSD": "100"})) }
        }),
    );
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let metrics = Arc::new(agentgate::metrics::Metrics::default());
    let listener = agentgate::controller::meter_tls::TlsListener::new(tcp, Arc::new(config).into(), metrics).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, requests)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_meter_api_is_https_with_the_operators_ca_and_meters_refuse_any_other_server() {
    let ns = "meter-grants-tls";
    let s = setup(ns).await;
    let (up, reported) = upstream().await;
    let (_, pods) = running_job(&s, ns, "tls", &["agent", "helper"], "1").await;
    let secret = tls_secret(&s.admin, ns).await;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let ca = secret_text(&secret, tls::CA_CERT_KEY);

    // A meter with the operator's CA draws grants over HTTPS; one call's worth at a time, so
    // every call below asks again.
    let good_token = service_account_token(&s.admin, ns, Some(&pods[0]), AUDIENCE).await;
    let good = MeterProcess::start(s.dir.path(), "tls-good", up, &s.grant(), &good_token, "0.007");
    let (status, body) = chat(good.port, "over https").await;
    assert_eq!(status, 200, "{body}\n{}", good.logs());

    // Attack: a meter trusting another CA refuses the real server. It fails closed: 402, nothing
    // forwarded upstream, nothing granted to its Pod.
    let other = tls::fresh(&tls::names("https://127.0.0.1:1", ns).unwrap(), unix_now()).unwrap();
    let other_ca = s.dir.path().join("other-ca.crt");
    std::fs::write(&other_ca, &other.ca_cert_pem).unwrap();
    let helper_token = service_account_token(&s.admin, ns, Some(&pods[1]), AUDIENCE).await;
    let wrong_ca: Vec<String> =
        vec!["--grant-url".into(), format!("https://127.0.0.1:{}", s.api_port), "--grant-ca-file".into(), other_ca.display().to_string()];
    let wrong = MeterProcess::start(s.dir.path(), "tls-wrong-ca", up, &wrong_ca, &helper_token, "0.007");
    let forwarded = reported.lock().unwrap().len();
    let (status, body) = chat(wrong.port, "with the wrong CA").await;
    assert_eq!((status, body["error"]["type"].as_str()), (402, Some("budget_exceeded")), "{body}");
    assert_eq!(reported.lock().unwrap().len(), forwarded, "a call went upstream without a grant");
    // Another CA of the same name: the signature does not verify (BadSignature); one named
    // otherwise is not found (UnknownIssuer). Either way the meter says why.
    assert!(wrong.logs().contains("invalid peer certificate"), "the meter says why: {}", wrong.logs());
    let helper = pods[1].name_any();
    assert!(meter_status(&s.admin, ns, "tls").await.grants.iter().all(|g| g.pod != helper), "granted over a refused connection");

    // Attack: a forged meter API with a certificate for the very address from another CA, that
    // would grant $100. The meter refuses it before sending anything (its token included).
    let (forged_port, forged_requests) = forged_meter_api(&other).await;
    let to_forged: Vec<String> =
        vec!["--grant-url".into(), format!("https://127.0.0.1:{forged_port}"), "--grant-ca-file".into(), s.ca_file.display().to_string()];
    let fooled = MeterProcess::start(s.dir.path(), "tls-forged", up, &to_forged, &helper_token, "0.007");
    let (status, body) = chat(fooled.port, "to the forged server").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(*forged_requests.lock().unwrap(), 0, "the forged server received a request");
    assert_eq!(reported.lock().unwrap().len(), forwarded);
    // The forged server does answer a client that trusts its CA: the refusal above is the CA's.
    assert!(served_certificate(forged_port, other.ca_cert_pem.as_bytes()).await.is_ok());

    // Attack: plain HTTP. The meter refuses an http:// grant URL unless told it is development...
    let plain: Vec<String> = vec!["--grant-url".into(), format!("http://127.0.0.1:{}", s.api_port)];
    let mut refused = MeterProcess::spawn(s.dir.path(), "tls-plain", up, &plain, &helper_token, "0.007");
    let started = std::time::Instant::now();
    let exit = loop {
        if let Some(status) = refused.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < TIMEOUT, "the plain-HTTP meter runs: {}", refused.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!exit.success() && refused.logs().contains("--grant-insecure-http"), "{}", refused.logs());
    // ...and the meter API answers nothing in plain HTTP: a token sent that way is not served.
    let sent =
        post(&agentgate::meter::client().unwrap(), &format!("http://127.0.0.1:{}/v1/sync", s.api_port), Some(&helper_token), &json!({}))
            .await;
    assert!(sent.is_err(), "a plain-HTTP request was answered: {sent:?}");
    let (_, metrics) = http_get(s.metrics_port, "/metrics");
    assert!(metrics.contains("agentgate_meter_api_requests_total{outcome=\"tls_handshake_failed\"}"), "{metrics}");

    // Both replicas present the same certificate: the standby read the Secret the leader made.
    let standby_port = free_port();
    let _standby = start_operator(ns, standby_port, free_port());
    let leader_cert = served_certificate(s.api_port, ca.as_bytes()).await.unwrap();
    let standby_cert =
        wait_for("the standby's meter API", TIMEOUT, || served_certificate(standby_port, ca.as_bytes()), Result::is_ok).await.unwrap();
    assert_eq!(standby_cert, leader_cert, "the replicas serve different certificates");

    // Renewal: the serving certificate is due (its recorded expiry is near). Both replicas serve
    // the renewed one, signed by the same CA: the meters started before keep working.
    let secrets: Api<Secret> = Api::namespaced(s.admin.clone(), ns);
    let due = json!({"metadata": {"annotations": {tls::ANNOTATION_NOT_AFTER: (unix_now() + 60).to_string()}}});
    secrets.patch(tls::DEFAULT_SECRET, &PatchParams::default(), &Patch::Merge(&due)).await.unwrap();
    for port in [s.api_port, standby_port] {
        let served = wait_for(
            "the renewed certificate served",
            TIMEOUT,
            || served_certificate(port, ca.as_bytes()),
            |c| c.as_ref().is_ok_and(|c| *c != leader_cert),
        )
        .await;
        assert!(served.is_ok(), "the old CA verifies the renewed certificate");
    }
    let renewed = tls_secret(&s.admin, ns).await;
    assert_eq!(secret_text(&renewed, tls::CA_CERT_KEY), ca, "renewal keeps the CA");
    assert_ne!(secret_text(&renewed, tls::CERT_KEY), secret_text(&secret, tls::CERT_KEY));
    assert!(renewed.metadata.annotations.unwrap()[tls::ANNOTATION_NOT_AFTER].parse::<i64>().unwrap() > unix_now() + 80 * 86_400);
    let granted = usd(&meter_status(&s.admin, ns, "tls").await.granted_usd);
    for text in ["after the renewal", "and again"] {
        let (status, body) = chat(good.port, text).await;
        assert_eq!(status, 200, "{body}\n{}", good.logs());
    }
    // A meter started now with the CA it was given before the renewal: a new connection.
    let late = MeterProcess::start(s.dir.path(), "tls-late", up, &s.grant(), &helper_token, "0.007");
    let (status, body) = chat(late.port, "a new meter, the old CA").await;
    assert_eq!(status, 200, "{body}\n{}", late.logs());
    let after = meter_status(&s.admin, ns, "tls").await;
    assert!(usd(&after.granted_usd) > granted, "granted over the renewed certificate: {after:?}");
    assert!(after.grants.iter().any(|g| g.pod == helper), "{after:?}");
}

/// The operator's log, to explain a failure or find a message.
fn operator_log(operator: &OperatorProcess) -> String {
    std::fs::read_to_string(operator.log_path()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provided_certificate_is_served_as_is_and_a_bad_tls_configuration_stops_the_operator() {
    let ns = "meter-grants-provided";
    let cp = ControlPlane::shared();
    cp.namespace(ns).await;
    let admin = cp.client("admin").await;
    let tls_flags = |port: u16, mode: &'static str, scheme: &'static str| -> Vec<String> {
        [
            "--namespace",
            ns,
            "--metrics-addr",
            "127.0.0.1:0",
            "--meter-api-listen",
            &format!("127.0.0.1:{port}"),
            "--meter-grant-url",
            &format!("{scheme}://127.0.0.1:{port}"),
            "--meter-api-tls",
            mode,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let start = |flags: Vec<String>| OperatorProcess::start(cp, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    let exited = |mut operator: OperatorProcess| async move {
        let status = wait_for("the operator to exit", TIMEOUT, || std::future::ready(operator.exit_status()), Option::is_some).await;
        (status.unwrap(), operator_log(&operator))
    };

    // `secret` without the Secret: the operator says which one and stops (after its retries).
    let (status, log) = exited(start(tls_flags(free_port(), "secret", "https"))).await;
    assert!(
        !status.success() && log.contains(&format!("Secret {ns}/{} (--meter-api-tls secret) does not exist", tls::DEFAULT_SECRET)),
        "{log}"
    );
    // TLS off with an https grant URL (or on with an http one): refused at start, before serving.
    let (status, log) = exited(start(tls_flags(free_port(), "off", "https"))).await;
    assert!(!status.success() && log.contains("does not match --meter-api-tls"), "{log}");
    let (status, log) = exited(start(tls_flags(free_port(), "managed", "http"))).await;
    assert!(!status.success() && log.contains("does not match --meter-api-tls"), "{log}");

    // The admin's certificate (as cert-manager writes it: no CA key, no annotations) is served
    // as it is, and the operator never writes it.
    let names = tls::names("https://127.0.0.1:1", ns).unwrap();
    let material = tls::fresh(&names, unix_now()).unwrap();
    let mut provided = tls::to_secret(tls::DEFAULT_SECRET, ns, &material);
    provided.metadata.annotations = None;
    provided.metadata.labels = None;
    provided.data.as_mut().unwrap().remove(tls::CA_KEY_KEY);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let created = secrets.create(&PostParams::default(), &provided).await.unwrap();
    let port = free_port();
    let operator = start(tls_flags(port, "secret", "https"));
    let served =
        wait_for("the provided certificate served", TIMEOUT, || served_certificate(port, material.ca_cert_pem.as_bytes()), Result::is_ok)
            .await
            .unwrap();
    let der = |pem: &str| rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec();
    assert_eq!(served, der(&material.cert_pem));
    // The issuer renews it (same CA): the operator serves the new one, and writes nothing.
    let renewed = tls::renewed(&material, &names, unix_now()).unwrap();
    let mut update = created.clone();
    let data = update.data.as_mut().unwrap();
    data.insert(tls::CERT_KEY.into(), k8s_openapi::ByteString(renewed.cert_pem.clone().into_bytes()));
    data.insert(tls::KEY_KEY.into(), k8s_openapi::ByteString(renewed.key_pem.clone().into_bytes()));
    let written = secrets.replace(tls::DEFAULT_SECRET, &PostParams::default(), &update).await.unwrap();
    wait_for(
        "the renewed certificate served",
        TIMEOUT,
        || served_certificate(port, material.ca_cert_pem.as_bytes()),
        |c| c.as_ref().is_ok_and(|c| *c == der(&renewed.cert_pem)),
    )
    .await
    .unwrap();
    let after = secrets.get(tls::DEFAULT_SECRET).await.unwrap();
    assert_eq!(after.metadata.resource_version, written.metadata.resource_version, "the operator wrote the admin's Secret");
    assert!(!after.data.unwrap().contains_key(tls::CA_KEY_KEY));
    assert!(operator_log(&operator).contains("meter API certificate reloaded"));
}

/// The CA the meter container of `pod` is told to trust.
fn meter_ca_of(pod: &Pod) -> Option<String> {
    let meter = pod.spec.as_ref()?.init_containers.iter().flatten().find(|c| c.name == agentgate::domain::meter_sidecar::CONTAINER)?;
    meter.env.iter().flatten().find(|e| e.name == agentgate::domain::meter_sidecar::GRANT_CA_ENV)?.value.clone()
}

/// The issuer of a provided certificate rotates its CA: the operator serves the new chain and the
/// agent Pods it creates from then on carry the new CA, without an operator restart (before, the
/// CA read at start went into every Pod until a restart, so the new Pods' meters failed closed).
#[tokio::test]
async fn a_rotated_provided_ca_reaches_new_agent_pods_without_an_operator_restart() {
    let ns = "meter-grants-rotated-ca";
    let admin = Env::builder(ns).node("meter-grants-rotated-node", "64", "256Gi", &[]).operator(OperatorMode::Later).build().await.admin;
    let names = tls::names("https://127.0.0.1:1", ns).unwrap();
    let provided = |material: &tls::Material| {
        let mut secret = tls::to_secret(tls::DEFAULT_SECRET, ns, material);
        secret.data.as_mut().unwrap().remove(tls::CA_KEY_KEY);
        secret
    };
    let first = tls::fresh(&names, unix_now()).unwrap();
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    secrets.create(&PostParams::default(), &provided(&first)).await.unwrap();
    let (api_port, metrics_port) = (free_port(), free_port());
    let operator = start_operator_with(ns, api_port, metrics_port, &["--meter-api-tls", "secret"]);

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("meter-api-ca.crt");
    std::fs::write(&ca_file, &first.ca_cert_pem).unwrap();
    let api = pinned_client(first.ca_cert_pem.as_bytes()).unwrap();
    let s = Setup { admin: admin.clone(), operator, api_port, metrics_port, dir, ca_file, api };

    let (_, before) = running_job(&s, ns, "before-rotation", &["scanner"], "1.00").await;
    assert_eq!(meter_ca_of(&before[0]).as_deref(), Some(first.ca_cert_pem.as_str()), "the meter trusts the provided CA");

    // The issuer rotates: a new CA, a new certificate from it.
    let second = tls::fresh(&names, unix_now()).unwrap();
    assert_ne!(second.ca_cert_pem, first.ca_cert_pem);
    let mut rotated = secrets.get(tls::DEFAULT_SECRET).await.unwrap();
    rotated.data = provided(&second).data;
    secrets.replace(tls::DEFAULT_SECRET, &PostParams::default(), &rotated).await.unwrap();
    let der = |pem: &str| rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec();
    wait_for(
        "the certificate from the new CA served",
        TIMEOUT,
        || served_certificate(api_port, second.ca_cert_pem.as_bytes()),
        |c| c.as_ref().is_ok_and(|c| *c == der(&second.cert_pem)),
    )
    .await
    .unwrap();

    let (_, after) = running_job(&s, ns, "after-rotation", &["scanner"], "1.00").await;
    assert_eq!(meter_ca_of(&after[0]).as_deref(), Some(second.ca_cert_pem.as_str()), "a Pod created after the rotation trusts the new CA");
    let log = operator_log(&s.operator);
    assert!(log.contains("the meter API's CA changed"), "{log}");
}
