//! The agent meter on a real node (tests/support/node.rs): the operator injects it into the agent
//! Pods it creates, containerd runs it as a native sidecar from an image of this build, and the
//! reference agent makes a Chat Completions call through OPENAI_BASE_URL with busybox wget. The
//! upstream is a stand-in on the host (no provider is reachable from here) that records what it
//! is sent:
//! - the stand-in sees the key from the namespace's keys Secret, never the agent's dummy key;
//! - the agent container holds no key: its env has the dummy, its spec's secretKeyRef to the
//!   keys was stripped, and the meter's key and token files are not in its filesystem;
//! - the meter's usage (its `/usage`, read by the agent over loopback, and the totals its last log
//!   line holds) equals what the stand-in reported;
//! - an agent OOM-killed, or stopped at its deadline, after a call: the meter outlives it and
//!   its totals stay readable;
//! - the meters draw the job's budget from the operator's meter API over HTTPS (grants,
//!   authenticated by the Pod's projected token; the meter trusts the operator's CA, handed to
//!   it in its container's env, and the certificate names the node IP the meters dial) and the
//!   job's `status.usage` is theirs, also for agents killed before they could report;
//! - the agent container starts only once its meter answers (the meter's startup probe): an
//!   agent's one call, without a retry, goes through;
//! - a budget smaller than the run: the meter refuses the call that would cross it (402), the
//!   agent stops there, spend stays within the budget, and the job ends `BudgetExhausted` with
//!   the output and usage so far, not retried;
//! - a meter cut off from the operator's meter API (a firewall rule on the node dropping its
//!   Pod's packets to the API, as a tenant's NetworkPolicy would) after its first report, or
//!   before it reported any usage, while its agent spends on and then reports 0 itself: the
//!   job's `status.usage` is what the stand-in served, from the meter's termination message;
//! - a meter SIGKILLed mid-run (restart.rs): the kubelet restarts it, the new process resumes the
//!   Pod's session from its state file, every call counts once, and a fixed budget is not renewed.
//!
//! Needs root and runc; otherwise it says SKIPPED loudly (and fails when
//! AGENTGATE_REQUIRE_REAL_NODE is set, as in CI).

#[path = "real_node_meter/restart.rs"]
mod restart;
mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentgate::api::{AgentJob, Decision};
use agentgate::domain::meter_sidecar as sidecar;
use axum::extract::State;
use axum::http::HeaderMap;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{LogParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::{agent_job, grant_voting_rights, job_pods, phase, vote};
use support::controlplane::OperatorProcess;
use support::node::{self, NODE_IP, REFERENCE_AGENT_IMAGE, RealNode};

const NS: &str = "meter-node";
const METER_IMAGE: &str = "local.test/agentgate:debug";
const TIMEOUT: Duration = Duration::from_secs(120);

/// One call the stand-in received.
#[derive(Clone, Debug)]
struct Call {
    authorization: String,
    prompt: String,
    prompt_tokens: i64,
    completion_tokens: i64,
    /// When the stand-in answered it.
    at: Instant,
}

type Calls = Arc<Mutex<Vec<Call>>>;

/// Prompts starting `hold:` are answered once the test puts them here.
type Released = Arc<Mutex<std::collections::HashSet<String>>>;

#[derive(Clone)]
struct StandIn {
    calls: Calls,
    released: Released,
}

/// OpenAI Chat Completions, non-streamed: usage decided from the request (known, and different
/// per prompt), reply fixed.
async fn chat_completion(State(stand_in): State<StandIn>, headers: HeaderMap, body: String) -> axum::Json<Value> {
    let StandIn { calls, released } = stand_in;
    let request: Value = serde_json::from_str(&body).unwrap_or_default();
    let prompt = request["messages"][0]["content"].as_str().unwrap_or_default().to_string();
    while prompt.starts_with("hold:") && !released.lock().unwrap().contains(&prompt) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let call = Call {
        authorization: headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string(),
        prompt_tokens: 7 + prompt.len() as i64,
        completion_tokens: 5,
        prompt,
        at: Instant::now(),
    };
    let reply = json!({"id": "chatcmpl-standin", "object": "chat.completion", "created": 0, "model": request["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello from the stand-in"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
                  "total_tokens": call.prompt_tokens + call.completion_tokens, "prompt_tokens_details": {"cached_tokens": 0}}});
    calls.lock().unwrap().push(call);
    axum::Json(reply)
}

/// The stand-in on every host address (the Pods reach it at the node IP).
async fn start_stand_in() -> (SocketAddr, Calls, Released) {
    let (calls, released) = (Calls::default(), Released::default());
    let state = StandIn { calls: calls.clone(), released: released.clone() };
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(chat_completion)).with_state(state);
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("binding the stand-in");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.expect("the stand-in serves") });
    (addr, calls, released)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_pods_call_their_model_through_the_meter_on_a_real_node() {
    if !node::available_or_skip("real_node_meter") {
        return;
    }
    let node = tokio::task::spawn_blocking(RealNode::start).await.expect("starting the node").unwrap_or_else(|e| panic!("{e:?}"));
    let cp = node.control_plane();
    cp.namespace(NS).await;
    let admin = cp.client("admin").await;
    let built = Instant::now();
    node.import_debug_agentgate_image(std::path::Path::new(env!("CARGO_BIN_EXE_agentgate")), METER_IMAGE)
        .unwrap_or_else(|e| panic!("{e:?}"));
    println!("figure: meter image from the debug build imported in {:.2?}", built.elapsed());

    let (stand_in, calls, released) = start_stand_in().await;
    let real_key = format!("sk-real-{}", std::process::id() as u64 * 7919 + 104_729);
    // The namespace's keys Secret names its upstream: the stand-in. The cluster-wide default
    // points where nothing listens, so a call that reached the stand-in took the namespace's.
    let upstream = format!("http://{NODE_IP}:{}/v1", stand_in.port());
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": sidecar::DEFAULT_KEYS_SECRET,
        "annotations": {sidecar::ANNOTATION_OPENAI_UPSTREAM: upstream}}, "stringData": {"openai": real_key}}))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), NS).create(&PostParams::default(), &secret).await.expect("keys Secret");
    grant_voting_rights(&admin).await;
    let nowhere = format!("http://{NODE_IP}:1/v1");
    // The operator runs on the host: its meter API listens on the node IP, which the Pods reach,
    // and the meters draw the job's budget from it as they would from the in-cluster Service.
    let meter_api = format!("{NODE_IP}:{}", support::http::free_port());
    // HTTPS: the operator's managed certificate names this host (the grant URL's).
    let grant_url = format!("https://{meter_api}");
    // What both operators of this test run with; each adds its budget mode.
    let common =
        ["--namespace", NS, "--metrics-addr", "127.0.0.1:0", "--meter-image", METER_IMAGE, "--meter-openai-upstream", nowhere.as_str()];
    let grants = ["--meter-budget-mode", "grants", "--meter-api-listen", meter_api.as_str(), "--meter-grant-url", grant_url.as_str()];
    let operator = OperatorProcess::start(cp, &[&common[..], &grants[..]].concat());
    let env = Env {
        admin: admin.clone(),
        alice: cp.client("alice").await,
        bob: cp.client("bob").await,
        dave: cp.client("dave").await,
        calls,
        released,
        real_key,
        meter_api_port: meter_api.rsplit_once(':').unwrap().1.parse().unwrap(),
    };

    a_call_goes_through_the_meter_with_the_meters_key(&env).await;
    the_agents_first_call_needs_no_retry(&env).await;
    the_agent_container_holds_no_key(&env).await;
    the_meter_outlives_an_oom_killed_agent(&env).await;
    the_meter_outlives_an_agent_stopped_at_its_deadline(&env).await;
    a_budget_smaller_than_the_run_ends_the_job_budget_exhausted(&env).await;
    a_meter_cut_off_after_its_first_report_is_counted_from_its_termination_message(&env).await;
    a_meter_cut_off_before_it_reported_usage_is_not_counted_from_the_agents_zero(&env).await;
    restart::a_meter_killed_mid_run_carries_on_its_session(&env, &node, restart::Budget::Grants).await;

    // The same with a fixed budget (`--budget-usd`, the job's `maxCostUSD` per meter): another
    // operator, as the budget mode is the cluster's.
    drop(operator);
    let fixed = ["--leader-election", "false", "--meter-budget-mode", "fixed"];
    let operator = OperatorProcess::start(cp, &[&common[..], &fixed[..]].concat());
    restart::a_meter_killed_mid_run_carries_on_its_session(&env, &node, restart::Budget::Fixed).await;

    drop(operator);
    drop(node);
}

struct Env {
    admin: Client,
    alice: Client,
    bob: Client,
    dave: Client,
    calls: Calls,
    released: Released,
    real_key: String,
    /// The port of the operator's meter API on the node IP.
    meter_api_port: u16,
}

impl Env {
    fn calls_with(&self, prompt: &str) -> Vec<Call> {
        self.calls.lock().unwrap().iter().filter(|c| c.prompt == prompt).cloned().collect()
    }
}

fn job(name: &str, prompt: &str, patch: Value) -> AgentJob {
    let base = json!({
        "jobType": "meter-node",
        "category": "meter-node",
        "agents": {"primary": {"name": "agent", "image": REFERENCE_AGENT_IMAGE, "model": "gpt-4o-mini"}},
        "resources": {"cpu": "250m", "memory": "96Mi"},
        "budget": {"maxCostUSD": "5.00"},
        "input": {"chat": prompt},
    });
    let mut job = agent_job(name, base, patch);
    job.metadata.namespace = Some(NS.into());
    job
}

async fn create_and_approve(env: &Env, job: &AgentJob) -> AgentJob {
    let api: Api<AgentJob> = Api::namespaced(env.admin.clone(), NS);
    let created = api.create(&PostParams::default(), job).await.expect("creating job");
    vote(&env.alice, &created, "alice", Decision::Approve).await;
    vote(&env.bob, &created, "bob", Decision::Approve).await;
    created
}

/// Polls every 50 ms until `get` yields, or panics after [`TIMEOUT`].
async fn wait<T, F, Fut>(what: &str, get: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    support::cluster::wait_some(what, TIMEOUT, Duration::from_millis(50), get).await
}

async fn wait_phase(env: &Env, name: &str, want: &str) -> AgentJob {
    let api: Api<AgentJob> = Api::namespaced(env.admin.clone(), NS);
    let done = wait(&format!("job {name} {want}"), || async {
        let j = api.get(name).await.expect("get job");
        (phase(&j) == Some(want) || phase(&j) == Some("Failed")).then_some(j)
    })
    .await;
    if phase(&done) != Some(want) {
        panic!("job {name} {:?}: {:#?}\n{}", phase(&done), done.status, container_logs(env, &done).await);
    }
    done
}

/// The agent's and the meter's logs, to explain a failure.
async fn container_logs(env: &Env, job: &AgentJob) -> String {
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), NS);
    let mut text = String::new();
    for pod in job_pods(&env.admin, NS, job).await {
        for container in ["agent", sidecar::CONTAINER] {
            let params = LogParams { container: Some(container.into()), ..LogParams::default() };
            let logs = pods.logs(&pod.name_any(), &params).await.unwrap_or_else(|e| format!("(no log: {e})"));
            text.push_str(&format!("--- {} {container}:\n{logs}\n", pod.name_any()));
        }
    }
    text
}

/// The Pod once every container, the meter's included, has terminated.
async fn wait_pod_done(env: &Env, job: &AgentJob) -> Pod {
    wait(&format!("the Pod of {} and its meter terminated", job.name_any()), || async {
        let pod = job_pods(&env.admin, NS, job).await.into_iter().next()?;
        let st = pod.status.as_ref()?;
        let terminated = |cs: &Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>| {
            cs.iter().flatten().all(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
                && cs.as_ref().is_some_and(|c| !c.is_empty())
        };
        (terminated(&st.container_statuses) && terminated(&st.init_container_statuses)).then_some(pod)
    })
    .await
}

/// The meter's totals from its last log line ("agentgate meter stopped"), read through the
/// apiserver after the Pod ended.
async fn meter_totals_from_its_log(env: &Env, pod: &Pod) -> Value {
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), NS);
    let params = LogParams { container: Some(sidecar::CONTAINER.into()), ..LogParams::default() };
    let logs = pods.logs(&pod.name_any(), &params).await.expect("the meter's log");
    let line =
        logs.lines().find(|l| l.contains("agentgate meter stopped")).unwrap_or_else(|| panic!("no final line in the meter's log:\n{logs}"));
    let json = line.split_once("usage=").map(|(_, rest)| rest.trim()).unwrap_or_default();
    serde_json::from_str(json).unwrap_or_else(|e| panic!("the meter's totals {json:?}: {e}\n{line}"))
}

fn assert_meter_usage_is_the_stand_ins(what: &str, meter: &Value, calls: &[Call]) {
    let input: i64 = calls.iter().map(|c| c.prompt_tokens).sum();
    let output: i64 = calls.iter().map(|c| c.completion_tokens).sum();
    let usage = &meter["usage"];
    assert_eq!(
        (usage["inputTokens"].as_i64(), usage["cachedInputTokens"].as_i64(), usage["outputTokens"].as_i64()),
        (Some(input), Some(0), Some(output)),
        "{what}: the meter's usage is what the stand-in reported: {meter}"
    );
    assert_eq!(meter["calls"], json!(calls.len()), "{what}: {meter}");
}

/// The job's status: usage as the stand-in reported it, and one settled grant that paid for it.
fn assert_status_usage_is_the_stand_ins(what: &str, job: &AgentJob, calls: &[Call]) {
    let status = serde_json::to_value(job.status.as_ref()).unwrap();
    let input: i64 = calls.iter().map(|c| c.prompt_tokens).sum();
    let output: i64 = calls.iter().map(|c| c.completion_tokens).sum();
    let usage = &status["usage"];
    assert_eq!((usage["inputTokens"].as_i64(), usage["outputTokens"].as_i64()), (Some(input), Some(output)), "{what}: {status}");
    let grants = status["meter"]["grants"].as_array().cloned().unwrap_or_default();
    assert_eq!(grants.len(), 1, "{what}: one meter drew on the budget: {status}");
    assert_eq!(grants[0]["settled"], json!(true), "{what}: the meter settled as it stopped: {status}");
}

async fn a_call_goes_through_the_meter_with_the_meters_key(env: &Env) {
    let prompt = "say hi to the meter";
    let created = Instant::now();
    let j = create_and_approve(env, &job("chat", prompt, json!({}))).await;
    let done = wait_phase(env, "chat", "Succeeded").await;
    println!("figure: AgentJob create (+2 votes)→Succeeded with one call through the meter {:.2?}", created.elapsed());
    let status = serde_json::to_value(done.status.as_ref()).unwrap();
    assert_eq!(status["output"]["reply"], json!("hello from the stand-in"), "the agent got the upstream's answer: {status}");

    let calls = env.calls_with(prompt);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].authorization, format!("Bearer {}", env.real_key), "the stand-in saw the key from the Secret");
    let all = env.calls.lock().unwrap().clone();
    assert!(all.iter().all(|c| !c.authorization.contains(sidecar::DUMMY_KEY)), "the dummy key went upstream: {all:?}");

    // The meter's running totals as the agent read them over loopback, and as the meter left them.
    let live = &status["output"]["meterUsage"];
    assert_meter_usage_is_the_stand_ins("GET /usage", live, &calls);
    let pod = wait_pod_done(env, &j).await;
    assert_eq!(pod.status.as_ref().unwrap().qos_class.as_deref(), Some("Guaranteed"), "the sidecar keeps the Pod Guaranteed");
    assert_meter_usage_is_the_stand_ins("the meter's last line", &meter_totals_from_its_log(env, &pod).await, &calls);
    // What the job records is the meter's measurement, drawn from a grant recorded in status;
    // the agent's own report is kept beside it.
    assert_status_usage_is_the_stand_ins("chat", &done, &calls);
    assert_eq!(status["attempts"][0]["reportedUsage"]["inputTokens"].as_i64(), Some(calls[0].prompt_tokens), "{status}");
    println!("meter: 1 call, stand-in saw the Secret's key; meter /usage = {live}");
}

/// The agent makes its one call at once and never retries: it succeeds only if its meter was
/// already listening when the kubelet started the agent (the meter's startup probe).
async fn the_agents_first_call_needs_no_retry(env: &Env) {
    let prompt = "the very first thing";
    let script = format!(
        r#"body='{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{prompt}"}}],"max_tokens":64}}'
if wget -q -O /dev/null --header "Authorization: Bearer $OPENAI_API_KEY" --header 'Content-Type: application/json'   --post-data "$body" "$OPENAI_BASE_URL/chat/completions"; then first=ok; else first=failed; fi
printf '{{"usage":[],"output":{{"firstCall":"%s"}}}}' "$first" >/dev/termination-log
[ "$first" = ok ]"#
    );
    for round in 0..3 {
        let name = format!("first-{round}");
        let j =
            create_and_approve(env, &job(&name, prompt, json!({"agents": {"primary": {"command": ["/bin/sh", "-c", script.as_str()]}}})))
                .await;
        let done = wait_phase(env, &name, "Succeeded").await;
        let output = &serde_json::to_value(done.status.as_ref()).unwrap()["output"];
        assert_eq!(output["firstCall"], json!("ok"), "round {round}: {output}");
        let pod = wait_pod_done(env, &j).await;
        let meter = &pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
        assert!(meter.startup_probe.is_some(), "the meter has a startup probe");
        let st = pod.status.as_ref().unwrap();
        let started = |c: &k8s_openapi::api::core::v1::ContainerStatus| c.state.as_ref()?.terminated.as_ref()?.started_at.clone();
        let (meter, agent) =
            (started(&st.init_container_statuses.as_ref().unwrap()[0]), started(&st.container_statuses.as_ref().unwrap()[0]));
        println!("figure: round {round}: meter started {meter:?}, agent started {agent:?} (after the meter's startup probe)");
    }
    assert_eq!(env.calls_with(prompt).len(), 3, "one call per agent, each through the meter");
}

/// The author names the keys Secret in the agent's env (they may read it, so admission lets it
/// through): the agent still sees only the dummy key and none of the meter's files.
async fn the_agent_container_holds_no_key(env: &Env) {
    let script = r#"files=$(ls -R /var/run/agentgate 2>/dev/null | tr '\n' ' ')
printf '{"usage":[],"output":{"key":"%s","stolen":"%s","files":"%s","token":"%s"}}' "$OPENAI_API_KEY" "${STOLEN:-}" "$files" \
  "$(ls /var/run/secrets/kubernetes.io/serviceaccount 2>/dev/null | tr '\n' ' ')" >/dev/termination-log"#;
    let keys_ref =
        |name: &str| json!({"name": name, "valueFrom": {"secretKeyRef": {"name": sidecar::DEFAULT_KEYS_SECRET, "key": "openai"}}});
    let j = create_and_approve(
        env,
        &job(
            "steal",
            "unused",
            json!({"agents": {"primary": {"command": ["/bin/sh", "-c", script], "env": [keys_ref("OPENAI_API_KEY"), keys_ref("STOLEN")]}}}),
        ),
    )
    .await;
    let done = wait_phase(env, "steal", "Succeeded").await;
    let output = &serde_json::to_value(done.status.as_ref()).unwrap()["output"];
    println!("what the agent container found: {output}");
    assert_eq!(output["key"], json!(sidecar::DUMMY_KEY));
    assert_eq!(output["stolen"], json!(""), "the keys Secret reached the agent");
    assert_eq!(output["files"], json!(""), "the meter's key or token files are in the agent's filesystem");
    assert_eq!(output["token"], json!(""), "a ServiceAccount token is mounted into the agent");
    assert!(!output.to_string().contains(&env.real_key));
    let pod = &job_pods(&env.admin, NS, &j).await[0];
    let agent = serde_json::to_string(&pod.spec.as_ref().unwrap().containers[0]).unwrap();
    assert!(!agent.contains(sidecar::DEFAULT_KEYS_SECRET), "{agent}");
}

/// The agent calls, reports, then allocates past its memory limit: the kernel kills it, the
/// meter beside it stops after it and leaves its totals.
async fn the_meter_outlives_an_oom_killed_agent(env: &Env) {
    let prompt = "then run out of memory";
    let script = "/agent >/dev/null; exec dd if=/dev/zero of=/dev/null bs=256M count=1";
    let j = create_and_approve(
        env,
        &job(
            "oom",
            prompt,
            json!({"resources": {"cpu": "250m", "memory": "48Mi"}, "agents": {"primary": {"command": ["/bin/sh", "-c", script]}}}),
        ),
    )
    .await;
    wait_phase(env, "oom", "Failed").await;
    let pod = wait_pod_done(env, &j).await;
    let st = pod.status.as_ref().unwrap();
    let agent = st.container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.clone().unwrap();
    let meter = st.init_container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.clone().unwrap();
    println!(
        "OOM: agent {:?} exit {} at {:?}; meter {:?} exit {} at {:?}",
        agent.reason, agent.exit_code, agent.finished_at, meter.reason, meter.exit_code, meter.finished_at
    );
    assert_eq!(agent.exit_code, 137, "the kernel killed the agent");
    assert!(meter.finished_at.as_ref().unwrap().0 >= agent.finished_at.as_ref().unwrap().0, "the meter outlived the agent");
    assert_eq!(meter.exit_code, 0, "the meter stopped cleanly, writing its totals");
    let calls = env.calls_with(prompt);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_meter_usage_is_the_stand_ins("OOM", &meter_totals_from_its_log(env, &pod).await, &calls);
    // The agent died before writing a report: the job's usage is the meter's, not zero.
    let failed = Api::<AgentJob>::namespaced(env.admin.clone(), NS).get("oom").await.expect("get job");
    assert_status_usage_is_the_stand_ins("OOM", &failed, &calls);
}

/// The agent calls, then runs on past `maxExecutionSeconds`: the kubelet stops the Pod, the meter
/// last.
async fn the_meter_outlives_an_agent_stopped_at_its_deadline(env: &Env) {
    let prompt = "then never finish";
    let script = "/agent >/dev/null; trap 'exit 143' TERM; while :; do sleep 1; done";
    let j = create_and_approve(
        env,
        &job("late", prompt, json!({"limits": {"maxExecutionSeconds": 8}, "agents": {"primary": {"command": ["/bin/sh", "-c", script]}}})),
    )
    .await;
    let done = wait_phase(env, "late", "Failed").await;
    let pod = wait_pod_done(env, &j).await;
    assert_eq!(pod.status.as_ref().unwrap().reason.as_deref(), Some("DeadlineExceeded"), "{:#?}", pod.status);
    let st = pod.status.as_ref().unwrap();
    let agent = st.container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.clone().unwrap();
    let meter = st.init_container_statuses.as_ref().unwrap()[0].state.as_ref().unwrap().terminated.clone().unwrap();
    println!(
        "deadline: agent exit {} at {:?}; meter exit {} at {:?}",
        agent.exit_code, agent.finished_at, meter.exit_code, meter.finished_at
    );
    assert!(meter.finished_at.as_ref().unwrap().0 >= agent.finished_at.as_ref().unwrap().0, "the meter outlived the agent");
    let calls = env.calls_with(prompt);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_meter_usage_is_the_stand_ins("deadline", &meter_totals_from_its_log(env, &pod).await, &calls);
    let stopped = Api::<AgentJob>::namespaced(env.admin.clone(), NS).get("late").await.expect("get job");
    assert_status_usage_is_the_stand_ins("deadline", &stopped, &calls);
    println!("deadline: {}", done.status.as_ref().unwrap().conditions.iter().map(|c| c.message.as_str()).collect::<Vec<_>>().join("; "));
}

/// The agent calls until the meter refuses (up to 100 calls of ~$0.0004 each against a $0.01
/// budget: about 25 fit, each reserving ~$0.0006 before it is forwarded), handles the 402, and
/// reports what it has.
async fn a_budget_smaller_than_the_run_ends_the_job_budget_exhausted(env: &Env) {
    // Plain words, no commas or quotes (the reference agent's JSON is hand-made): 2,450 bytes.
    let prompt = "budget ".repeat(350);
    let prompt = prompt.trim_end();
    // A jobType of its own: the prior's p90 ($0.0054) fits the budget whatever ran before.
    let patch = json!({"jobType": "meter-node-budget", "budget": {"maxCostUSD": "0.01"}, "limits": {"maxRetries": 1},
        "input": {"chat": prompt, "calls": 100}});
    let j = create_and_approve(env, &job("over-budget", prompt, patch)).await;
    let done = wait_phase(env, "over-budget", "Failed").await;
    wait_pod_done(env, &j).await;
    let status = done.status.clone().unwrap();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").cloned().unwrap();
    println!("budget: {} ({})", ready.reason, ready.message);
    if ready.reason != "BudgetExhausted" {
        panic!("{ready:?}\n{:#?}\n{}", status, container_logs(env, &done).await);
    }
    let calls: Vec<Call> = env.calls.lock().unwrap().iter().filter(|c| c.prompt.starts_with(prompt)).cloned().collect();
    let output = status.output.clone().expect("the output so far is kept");
    assert_eq!((output["served"].as_u64(), output["refusedForBudget"].as_u64()), (Some(calls.len() as u64), Some(1)), "{output}");
    assert!(calls.len() >= 2 && calls.len() < 100, "the budget ran out part-way: {} calls", calls.len());
    let usage = status.usage.clone().unwrap();
    let spent = agentgate::domain::money::MicroUsd::parse(&usage.cost_usd).unwrap();
    let budget = agentgate::domain::money::MicroUsd::parse("0.01").unwrap();
    assert!(spent <= budget, "spent {spent} of {budget}");
    assert!(spent.0 > budget.0 / 2, "the budget was used, not hoarded: {spent}");
    assert_eq!(usage.input_tokens, calls.iter().map(|c| c.prompt_tokens).sum::<i64>(), "the usage so far is the meter's");
    assert_eq!(status.attempts.len(), 1, "not retried: a retry's calls could not fit either");
    let meter = status.meter.clone().unwrap();
    assert_eq!((meter.grants.len(), meter.grants[0].budget_refusals, meter.grants[0].settled), (1, 1, true), "{meter:?}");
    assert!(ready.message.contains(&format!("spent ${spent} of budget.maxCostUSD $0.01")), "{ready:?}");
    println!("budget: {} calls served, 1 refused, spent ${spent} of $0.01", calls.len());
}

/// A firewall rule on the node dropping one Pod's packets to the operator's meter API, as a
/// tenant's NetworkPolicy denying egress to the operator's namespace would (the node's bridge CNI
/// enforces no NetworkPolicy). Removed when dropped, whatever the test did.
struct CutOff {
    rule: Vec<String>,
}

impl CutOff {
    fn new(pod_ip: &str, port: u16) -> CutOff {
        let rule: Vec<String> =
            ["INPUT", "-s", pod_ip, "-d", NODE_IP, "-p", "tcp", "--dport", &port.to_string(), "-j", "DROP"].map(String::from).to_vec();
        let status = std::process::Command::new("iptables").arg("-I").args(&rule).status().expect("running iptables");
        assert!(status.success(), "iptables -I {rule:?}: {status}");
        CutOff { rule }
    }
}

impl Drop for CutOff {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables").arg("-D").args(&self.rule).status();
    }
}

/// An agent making calls with `prompts`, in order, then claiming it used nothing.
fn calling_then_claiming_zero(prompts: &[&str]) -> String {
    let calls: Vec<String> = prompts
        .iter()
        .map(|p| {
            format!(
                r#"wget -q -O /dev/null --header "Authorization: Bearer $OPENAI_API_KEY" --header 'Content-Type: application/json' --post-data '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{p}"}}],"max_tokens":64}}' "$OPENAI_BASE_URL/chat/completions" || exit 3"#
            )
        })
        .collect();
    format!("{}\nprintf '{{\"usage\":[],\"output\":{{}}}}' >/dev/termination-log", calls.join("\n"))
}

/// The job's only meter session in status, once `ready` holds of it.
async fn wait_session(env: &Env, name: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let api: Api<AgentJob> = Api::namespaced(env.admin.clone(), NS);
    wait(what, || async {
        let j = api.get(name).await.expect("get job");
        let status = serde_json::to_value(j.status.as_ref()).unwrap();
        status["meter"]["grants"].as_array().and_then(|g| g.first().cloned()).filter(|g| ready(g))
    })
    .await
}

async fn pod_ip(env: &Env, job: &AgentJob) -> String {
    wait("the agent Pod's IP", || async { job_pods(&env.admin, NS, job).await.first()?.status.as_ref()?.pod_ip.clone() }).await
}

/// The notes of the job's `UsageFromMeterMessage` Warning Events: the sessions whose termination
/// message said more than the meter API had heard of them.
async fn raised_by_message(env: &Env, job: &AgentJob) -> String {
    use k8s_openapi::api::events::v1::Event;
    let events: Api<Event> = Api::namespaced(env.admin.clone(), NS);
    let uid = job.metadata.uid.clone();
    wait("the job's UsageFromMeterMessage Event", || async {
        let notes: Vec<String> = (events.list(&Default::default()).await.ok()?.items.into_iter())
            .filter(|e| e.reason.as_deref() == Some("UsageFromMeterMessage") && e.regarding.as_ref().and_then(|r| r.uid.clone()) == uid)
            .filter_map(|e| e.note)
            .collect();
        (!notes.is_empty()).then(|| notes.join("\n"))
    })
    .await
}

/// What the meter left in its termination message, from the Pod's status.
fn meter_message(pod: &Pod) -> String {
    let meter = pod.status.as_ref().unwrap().init_container_statuses.as_ref().unwrap().iter().find(|c| c.name == sidecar::CONTAINER);
    meter.and_then(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone()).unwrap_or_default()
}

/// Tokens of `calls` as (input, output).
fn tokens(calls: &[Call]) -> (i64, i64) {
    (calls.iter().map(|c| c.prompt_tokens).sum(), calls.iter().map(|c| c.completion_tokens).sum())
}

/// The meter reports its first call through the meter API; then its Pod is cut off from the API,
/// and the agent makes three more calls, which the meter serves from its grant (fail closed:
/// nothing more than it holds) but can no longer report, and exits claiming nothing. The meter
/// API knows only the first call, and nothing settled the session: before the termination
/// message, that was the job's usage. Now the job counts all four.
async fn a_meter_cut_off_after_its_first_report_is_counted_from_its_termination_message(env: &Env) {
    let prompts = ["cut-mid one", "hold:cut-mid two", "cut-mid three", "cut-mid four"];
    let script = calling_then_claiming_zero(&prompts);
    let j =
        create_and_approve(env, &job("cut-mid", "unused", json!({"agents": {"primary": {"command": ["/bin/sh", "-c", script]}}}))).await;
    let first =
        wait_session(env, "cut-mid", "the meter's report of its first call", |g| g["usage"]["inputTokens"].as_i64().is_some_and(|t| t > 0))
            .await;
    let cut = CutOff::new(&pod_ip(env, &j).await, env.meter_api_port);
    env.released.lock().unwrap().insert(prompts[1].to_string());
    let done = wait_phase(env, "cut-mid", "Succeeded").await;
    drop(cut);
    let calls: Vec<Call> = env.calls.lock().unwrap().iter().filter(|c| c.prompt.contains("cut-mid")).cloned().collect();
    assert_eq!(calls.len(), 4, "every call went through the meter: {calls:?}");
    let status = serde_json::to_value(done.status.as_ref()).unwrap();
    let session = &status["meter"]["grants"][0];
    let (input, output) = tokens(&calls);
    let (first_input, _) = tokens(&calls[..1]);
    // The meter API heard of the first call only (its last report before the cut), and never of
    // the meter's end: the session was raised by the meter's message, which the operator says.
    assert_eq!(first["usage"]["inputTokens"].as_i64(), Some(first_input), "{first}");
    let raised = raised_by_message(env, &done).await;
    assert!(raised.contains(session["session"].as_str().unwrap()), "the cut held: {raised}");
    // The meter stopped cleanly (exit 0): its grant is settled to what its message says it spent.
    let usage = &status["usage"];
    assert_eq!(session["settled"], json!(true), "settled from the termination message: {session}");
    assert_eq!((session["usage"]["inputTokens"].as_i64(), &session["spentUSD"]), (Some(input), &usage["costUSD"]), "{session}");
    println!(
        "cut off: the meter API had {first_input} input tokens (${}), the stand-in served {input} (+{output} output), status.usage says {} (${})",
        first["spentUSD"], usage["inputTokens"], usage["costUSD"]
    );
    assert_eq!((usage["inputTokens"].as_i64(), usage["outputTokens"].as_i64()), (Some(input), Some(output)), "{status}");
    assert_eq!(status["attempts"][0]["reportedUsage"]["totalTokens"].as_i64(), Some(0), "the agent claimed nothing: {status}");
    let pod = wait_pod_done(env, &j).await;
    let message = meter_message(&pod);
    println!("figure: the meter's termination message: {} bytes: {message}", message.len());
    let parsed = agentgate::domain::meter_message::parse(&message).expect("the meter's message");
    assert_eq!(parsed.usage.input_tokens, input);
    assert_eq!(Some(parsed.session.as_str()), session["session"].as_str(), "the message names the session the API knows");
}

/// Cut off once the meter holds its first grant, before it reported any usage (its first call
/// was still at the provider): the meter API knows the session with no usage at all, and the agent
/// claims 0. Before the termination message the job counted 0; now what the stand-in served.
async fn a_meter_cut_off_before_it_reported_usage_is_not_counted_from_the_agents_zero(env: &Env) {
    let prompts = ["hold:cut-early one", "cut-early two"];
    let script = calling_then_claiming_zero(&prompts);
    let j =
        create_and_approve(env, &job("cut-early", "unused", json!({"agents": {"primary": {"command": ["/bin/sh", "-c", script]}}}))).await;
    wait_session(env, "cut-early", "the meter's first grant", |g| g["grantedUSD"].as_str().is_some_and(|u| u != "0.00")).await;
    let cut = CutOff::new(&pod_ip(env, &j).await, env.meter_api_port);
    env.released.lock().unwrap().insert(prompts[0].to_string());
    let done = wait_phase(env, "cut-early", "Succeeded").await;
    drop(cut);
    let calls: Vec<Call> = env.calls.lock().unwrap().iter().filter(|c| c.prompt.contains("cut-early")).cloned().collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let status = serde_json::to_value(done.status.as_ref()).unwrap();
    let session = &status["meter"]["grants"][0];
    // The meter API knew the session with no usage: what counts was raised by the message.
    let raised = raised_by_message(env, &done).await;
    assert!(raised.contains(session["session"].as_str().unwrap()), "the meter API heard of no usage: {raised}");
    let (input, output) = tokens(&calls);
    let usage = &status["usage"];
    assert_eq!((session["settled"].clone(), &session["spentUSD"]), (json!(true), &usage["costUSD"]), "settled from the message: {session}");
    println!(
        "cut off before any usage report: the meter API had 0 tokens, the agent claimed {}, status.usage says {} input (${}); the stand-in served {input}",
        status["attempts"][0]["reportedUsage"]["totalTokens"], usage["inputTokens"], usage["costUSD"]
    );
    assert_eq!((usage["inputTokens"].as_i64(), usage["outputTokens"].as_i64()), (Some(input), Some(output)), "{status}");
    let reported = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "UsageReported").cloned().unwrap();
    assert_eq!(reported["reason"], json!("Metered"), "{reported}");
    a_tenant_cannot_rewrite_the_meters_termination_message(env, &j).await;
}

/// The tenant, `admin` of the namespace (which includes `edit`), tries to write the meter's
/// message in the Pod's status: refused, as neither role grants `pods/status` write. Without a
/// controller-manager nothing aggregates `admin` here, so dave is bound to what it aggregates:
/// the apiserver's own `system:aggregate-to-{view,edit,admin}` ClusterRoles.
async fn a_tenant_cannot_rewrite_the_meters_termination_message(env: &Env, job: &AgentJob) {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    for role in ["view", "edit", "admin"] {
        let binding: RoleBinding = serde_json::from_value(json!({"metadata": {"name": format!("dave-{role}")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("system:aggregate-to-{role}")},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dave"}]}))
        .unwrap();
        Api::<RoleBinding>::namespaced(env.admin.clone(), NS).create(&PostParams::default(), &binding).await.expect("binding dave");
    }
    let pod = wait_pod_done(env, job).await;
    let dave: Api<Pod> = Api::namespaced(env.dave.clone(), NS);
    // dave may read and edit the Pod itself (once the authorizer has the binding), not its status.
    wait("dave reading the Pod as admin of the namespace", || async { dave.get(&pod.name_any()).await.ok() }).await;
    let forged = agentgate::domain::meter_message::encode(
        &agentgate::domain::grants::session_key("forged"),
        &agentgate::api::Usage { cost_usd: "0.00".into(), ..Default::default() },
        0,
    );
    let patch = json!({"status": {"initContainerStatuses": [{"name": sidecar::CONTAINER, "state": {"terminated": {"exitCode": 0, "message": forged}}}]}});
    let refused = dave.patch_status(&pod.name_any(), &kube::api::PatchParams::default(), &kube::api::Patch::Strategic(patch)).await;
    match refused {
        Err(kube::Error::Api(e)) if e.code == 403 => println!("tenant rewriting the meter's message: {} {}", e.code, e.message),
        other => panic!("an admin of the namespace wrote the Pod's status: {other:?}"),
    }
}
