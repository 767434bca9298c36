//! A meter killed with SIGKILL mid-run on the real node: the kubelet restarts the native sidecar
//! inside the running agent Pod, the new meter process resumes the Pod's session from its state
//! file (src/meter/state_file.rs, on the `agentgate-meter-state` emptyDir), and the agent's later
//! calls go through it. The job counts every call the stand-in served once, under one session,
//! and a fixed budget holds against the whole Pod's usage, not afresh for the new process.

use std::path::PathBuf;
use std::time::Instant;

use agentgate::domain::meter_sidecar as sidecar;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use serde_json::{Value, json};

use super::support::cluster::job_pods;
use super::support::node::{RealNode, STATE_DIR};
use super::{Call, Env, create_and_approve, job, tokens, wait, wait_phase, wait_pod_done};

/// What the job's meter draws on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Grants from the operator's meter API (a $5 budget: never the limit here).
    Grants,
    /// The job's `maxCostUSD` held by the meter alone (`--budget-usd`): $0.01, which fits a few of
    /// this test's ~$0.0025 calls.
    Fixed,
}

const FIXED_BUDGET: &str = "0.01";

/// The agent: calls `$tag 1` and `$tag 2`; waits for its meter to go (the test kills it) and come
/// back (the kubelet restarts it); then calls `$tag 3`, `$tag 4`, ... up to `$tag {last}`,
/// stopping at the first refused for budget (402). Each prompt is `pad` repeated `2^doublings`
/// times, then the tag and number. Claims no usage itself: what counts is the meter's.
fn agent_script(tag: &str, doublings: u32, last: u32) -> String {
    format!(
        r#"p=pad; i=0; while [ $i -lt {doublings} ]; do p="$p$p"; i=$((i+1)); done
call() {{
  out=$(wget -O /dev/null --header 'Content-Type: application/json' --post-data "{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"$p {tag} $1\"}}],\"max_tokens\":5}}" "$OPENAI_BASE_URL/chat/completions" 2>&1) && return 0
  case "$out" in *402*) return 2;; esac
  echo "call $1: $out" >&2; return 1
}}
call 1 || exit 3
call 2 || exit 3
while wget -q -O /dev/null http://127.0.0.1:{port}/healthz; do sleep 0.05; done
echo "meter gone" >&2
until wget -q -O /dev/null http://127.0.0.1:{port}/healthz; do sleep 0.05; done
echo "meter back" >&2
n=3; refused=0
while [ $n -le {last} ]; do
  call $n; rc=$?
  if [ $rc = 2 ]; then refused=1; break; fi
  [ $rc = 0 ] || exit 3
  n=$((n+1))
done
printf '{{"usage":[],"output":{{"served":%d,"refusedForBudget":%d}}}}' $((n-1)) $refused >/dev/termination-log"#,
        port = sidecar::PORT
    )
}

fn meter_status(pod: &Pod) -> Option<ContainerStatus> {
    pod.status.as_ref()?.init_container_statuses.as_ref()?.iter().find(|c| c.name == sidecar::CONTAINER).cloned()
}

/// The meter's state file as the node holds it: on the Pod's emptyDir under the kubelet's root.
fn state_file_on_the_node(pod: &Pod) -> PathBuf {
    PathBuf::from(STATE_DIR)
        .join("var/kubelet/pods")
        .join(pod.metadata.uid.as_deref().unwrap())
        .join("volumes/kubernetes.io~empty-dir")
        .join(sidecar::STATE_VOLUME)
        .join("state.json")
}

/// The meter's process: the one process in its container's cgroup (found through the Pod's
/// status: its uid and the container's id), checked by its command line to be the meter.
fn meter_pid(node: &RealNode, pod: &Pod) -> u32 {
    let status = meter_status(pod).expect("the meter's status");
    let id = status.container_id.as_deref().and_then(|id| id.strip_prefix("containerd://")).expect("the meter's container id");
    let qos = pod.status.as_ref().unwrap().qos_class.clone().unwrap();
    let procs = node.container_cgroup("memory", &qos, pod.metadata.uid.as_deref().unwrap(), id).join("cgroup.procs");
    let text = std::fs::read_to_string(&procs).unwrap_or_else(|e| panic!("{}: {e}", procs.display()));
    let pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(pids.len(), 1, "one process in the meter's container: {pids:?}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).expect("the meter's command line");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("agentgate meter --listen"), "not the meter: {cmdline}");
    pids[0]
}

/// The kill, the restart, the agent's later calls, and what the job counted.
pub async fn a_meter_killed_mid_run_carries_on_its_session(env: &Env, node: &RealNode, budget: Budget) {
    let (name, tag, doublings, last) = match budget {
        // Short prompts; 4 calls.
        Budget::Grants => ("restart-grants", "restart-grants", 2, 4),
        // 'pad' × 4096 = 12,288 bytes: ~$0.0019 a call at gpt-4o-mini's $0.15/M input, so $0.01
        // fits 5 from $0 and the 6th is refused; up to 20 calls are tried.
        Budget::Fixed => ("restart-fixed", "restart-fixed", 12, 20),
    };
    let script = agent_script(tag, doublings, last);
    let mut patch = json!({"jobType": format!("meter-node-{name}"), "limits": {"maxRetries": 1},
        "agents": {"primary": {"command": ["/bin/sh", "-c", script]}}});
    if budget == Budget::Fixed {
        patch["budget"] = json!({"maxCostUSD": FIXED_BUDGET});
    }
    let ours = |c: &Call| c.prompt.contains(&format!(" {tag} "));
    let j = create_and_approve(env, &job(name, "unused", patch)).await;
    let pods = || async { job_pods(&env.admin, super::NS, &j).await.into_iter().next() };

    // Two calls served, and both on the meter's state file with their measured cost: then the kill.
    let served_two = wait("the stand-in served the first two calls", || async {
        let calls: Vec<Call> = env.calls.lock().unwrap().iter().filter(|c| ours(c)).cloned().collect();
        (calls.len() == 2).then_some(calls)
    })
    .await;
    let pod = pods().await.expect("the agent Pod");
    let state_path = state_file_on_the_node(&pod);
    let (input_two, _) = tokens(&served_two);
    let state = wait("both calls on the meter's state file", || async {
        let state: Value = serde_json::from_str(&std::fs::read_to_string(&state_path).ok()?).ok()?;
        (state["carried"]["usage"]["inputTokens"].as_i64() == Some(input_two) && state["carried"]["calls"] == json!(2)).then_some(state)
    })
    .await;
    let spent_before_kill = state["carried"]["usage"]["costUSD"].as_str().unwrap().to_string();
    let session_on_disk = state["session"].as_str().unwrap().to_string();
    let pid = meter_pid(node, &pod);
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("running kill");
    assert!(killed.success(), "kill -KILL {pid}: {killed}");
    let killed_at = Instant::now();
    println!("restart {name}: SIGKILLed the meter (pid {pid}) after 2 calls, ${spent_before_kill} on its state file");

    // The kubelet restarts it, and the agent's next call goes through the new process. (Not
    // its startup probe's `started`: the agent may finish its calls and exit before the probe
    // reports, and the Pod then stops the meter: the first run's agent was done 0.36 s after the kill.)
    let first_after = wait("the agent's first call through the new meter", || async {
        env.calls.lock().unwrap().iter().find(|c| ours(c) && c.prompt.ends_with(&format!(" {tag} 3"))).map(|c| c.at)
    })
    .await;
    let restarted = wait("the kubelet's restart of the meter in the Pod's status", || async {
        let st = meter_status(&pods().await?)?;
        (st.restart_count >= 1).then_some(st)
    })
    .await;
    println!(
        "figure: restart {name}: SIGKILL → the agent's next call served through the restarted meter (restartCount {}) {:.2?}",
        restarted.restart_count,
        first_after.duration_since(killed_at)
    );
    let last_state = restarted.last_state.as_ref().and_then(|s| s.terminated.clone()).expect("the killed process's end");
    assert_eq!(last_state.exit_code, 137, "killed by SIGKILL: {last_state:?}");

    let done = wait_phase(env, name, if budget == Budget::Fixed { "Failed" } else { "Succeeded" }).await;
    let pod = wait_pod_done(env, &j).await;
    let meter = meter_status(&pod).unwrap();
    assert_eq!(meter.restart_count, 1, "restarted once, by the kill: {meter:?}");
    let calls: Vec<Call> = env.calls.lock().unwrap().iter().filter(|c| ours(c)).cloned().collect();
    let (input, output) = tokens(&calls);
    let status = serde_json::to_value(done.status.as_ref()).unwrap();
    let usage = &status["usage"];
    println!(
        "restart {name}: the stand-in served {} calls ({input} input + {output} output tokens); status.usage {} + {} tokens, ${}",
        calls.len(),
        usage["inputTokens"],
        usage["outputTokens"],
        usage["costUSD"]
    );
    // Every call once: the first process's two (from its state file) and the new process's.
    assert_eq!((usage["inputTokens"].as_i64(), usage["outputTokens"].as_i64()), (Some(input), Some(output)), "{status}");
    assert!(calls.len() >= 3, "a call went through the restarted meter: {calls:?}");

    // One session: the killed process's message and the last one's name the same, which is the
    // one on the state file before the kill.
    let message = |s: Option<&k8s_openapi::api::core::v1::ContainerState>| {
        let text = s.and_then(|s| s.terminated.as_ref()).and_then(|t| t.message.clone()).unwrap_or_default();
        agentgate::domain::meter_message::parse(&text).unwrap_or_else(|e| panic!("the meter's message {text:?}: {e}"))
    };
    let (killed_message, final_message) = (message(meter.last_state.as_ref()), message(meter.state.as_ref()));
    assert_eq!(killed_message.session, final_message.session, "the restarted meter resumed the killed one's session");
    assert_eq!(final_message.session, agentgate::domain::grants::session_key(&session_on_disk), "the state file's session");
    assert_eq!(final_message.usage.input_tokens, input, "the last message is the whole Pod's: {:?}", final_message.usage);
    if budget == Budget::Grants {
        let grants = status["meter"]["grants"].as_array().cloned().unwrap_or_default();
        assert_eq!(grants.len(), 1, "one session drew on the budget: {status}");
        assert_eq!(grants[0]["usage"]["inputTokens"].as_i64(), Some(input), "{status}");
        return;
    }

    // The fixed budget held against the Pod's whole usage: the new process refused the call
    // that would cross $0.01 although by its own spending alone it had room for it.
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").cloned().unwrap();
    assert_eq!(ready["reason"], json!("BudgetExhausted"), "{ready}");
    let served = calls.len();
    assert_eq!(final_message.budget_refusals, 1, "the meter refused the agent's call {} for budget", served + 1);
    let money = |s: &str| agentgate::domain::money::MicroUsd::parse(s).unwrap();
    let (spent, limit) = (money(usage["costUSD"].as_str().unwrap()), money(FIXED_BUDGET));
    assert!(spent <= limit, "spent ${spent} of ${limit}");
    // Calls are all alike, and the run admitted `served` of them from $0 within the budget: a
    // fresh budget would have admitted as many to the new process, which had served
    // `served - 2` when it refused (and the Pod would have spent past $0.01).
    let after_restart = served - 2;
    println!(
        "restart {name}: fixed budget ${limit}: ${spent_before_kill} spent before the kill, {served} calls served (${spent}), call {} refused; \
         the new process served {after_restart} (a fresh $0.01 would have let it serve {served})",
        served + 1
    );
}
