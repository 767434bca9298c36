//! The cost estimator learns from finished runs and keeps what it learned across the deletion
//! of those jobs and an operator restart (state in the ConfigMap `agentgate-estimator`).

mod support;

use std::time::Duration;

use agentgate::api::{AgentJob, Decision};
use agentgate::domain::learning::EstimatorState;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, ObjectList, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::cluster::*;

const JOB_TYPE: &str = "estimator_learning_scan";

fn job_manifest(name: &str) -> AgentJob {
    JobManifest::new(name).job_type(JOB_TYPE).build()
}

async fn estimated(client: &Client, ns: &str, name: &str) -> AgentJob {
    wait_for_job(client, ns, name, "an estimate", |j: &AgentJob| j.status.as_ref().is_some_and(|s| s.estimate.is_some())).await
}

async fn learned_state(client: &Client, ns: &str) -> Option<EstimatorState> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get_opt("agentgate-estimator").await.ok()??;
    let text = cm.data?.remove("state.json")?;
    let (state, warning) = EstimatorState::from_json(Some(&text));
    warning.is_none().then_some(state)
}

#[tokio::test]
async fn learned_usage_survives_job_deletion_and_operator_restart() {
    let ns = "est-learn";
    let mut env = Env::builder(ns).node("estimator-node", "64", "256Gi", &[]).build().await;
    let (client, alice, bob) = (env.admin.clone(), env.alice.clone(), env.bob.clone());
    let jobs: Api<AgentJob> = Api::namespaced(client.clone(), ns);

    // Three runs: the first estimated from the prior, each with a known, much larger usage.
    let runs = [(300_000, 100_000, 50_000), (420_000, 60_000, 70_000), (350_000, 90_000, 40_000)];
    let mut prior = None;
    for (i, (input, cached, output)) in runs.iter().enumerate() {
        let name = format!("run-{i}");
        let job = jobs.create(&PostParams::default(), &job_manifest(&name)).await.expect("create job");
        let estimate = estimated(&client, ns, &name).await.status.unwrap().estimate.unwrap();
        assert_eq!(estimate.samples, i as i64, "run {i} sees the runs before it: {estimate:?}");
        assert_eq!(estimate.method, if i == 0 { "prior" } else { "blend" });
        prior.get_or_insert(estimate);
        vote(&alice, &job, "alice", Decision::Approve).await;
        vote(&bob, &job, "bob", Decision::Approve).await;
        let pod = format!("{name}-scanner-1-agentgate");
        wait_for("the agent Pod", Duration::from_secs(30), || job_pods(&client, ns, &job), |p: &Vec<_>| p.len() == 1).await;
        run_pod(&client, ns, &pod).await;
        finish_pod(&client, ns, &pod, 0, &usage_report("gpt-4o-mini", *input, *cached, *output, json!({}))).await;
        wait_for_job(&client, ns, &name, "Succeeded", |j| phase(j) == Some("Succeeded")).await;
        // The leader writes what it learned within a few seconds.
        wait_for(
            "the learned state in the ConfigMap",
            Duration::from_secs(30),
            || learned_state(&client, ns),
            |s: &Option<EstimatorState>| s.as_ref().and_then(|s| s.job_types.get(JOB_TYPE)?.get(ns).map(|k| k.n)) == Some(i as u64 + 1),
        )
        .await;
    }
    let prior = prior.unwrap();
    assert_eq!((prior.method.as_str(), prior.samples), ("prior", 0));

    // The jobs go, the operator restarts (SIGKILL: nothing more is written on the way down).
    for i in 0..runs.len() {
        jobs.delete(&format!("run-{i}"), &DeleteParams::default()).await.expect("delete job");
    }
    let list = ListParams::default();
    let _ = wait_for(
        "the jobs gone",
        Duration::from_secs(30),
        || jobs.list(&list),
        |l: &Result<ObjectList<AgentJob>, kube::Error>| l.as_ref().is_ok_and(|l| l.items.is_empty()),
    )
    .await;
    env.kill_operator();
    env.start_operator();

    jobs.create(&PostParams::default(), &job_manifest("next")).await.expect("create job");
    let learned = estimated(&client, ns, "next").await.status.unwrap().estimate.unwrap();
    assert_eq!((learned.method.as_str(), learned.samples), ("blend", 3), "{learned:?}");
    // The observed totals are 450k, 550k and 480k tokens; their geometric mean is ~491k.
    let observed = runs.iter().map(|(i, c, o)| ((i + c + o) as f64).ln()).sum::<f64>() / runs.len() as f64;
    let distance = |p50: i64| ((p50 as f64).ln() - observed).abs();
    assert!(
        distance(learned.tokens.p50) < distance(prior.tokens.p50) / 4.0,
        "prior {} learned {} observed ~{:.0}: the estimate moved less than expected",
        prior.tokens.p50,
        learned.tokens.p50,
        observed.exp()
    );
    assert!(learned.tokens.p50 < observed.exp() as i64, "the prior still pulls a little: {}", learned.tokens.p50);
    let usd = |s: &str| s.parse::<f64>().unwrap();
    assert!(usd(&learned.cost_usd.p50) > usd(&prior.cost_usd.p50), "cost follows tokens");

    let state: Value = serde_json::from_str(
        &Api::<ConfigMap>::namespaced(client.clone(), ns).get("agentgate-estimator").await.unwrap().data.unwrap()["state.json"],
    )
    .unwrap();
    assert_eq!(state["version"], 4);
    assert_eq!(state["jobTypes"][JOB_TYPE][ns]["n"], 3, "learned under the job's namespace");
    assert_eq!(state["jobTypes"][JOB_TYPE][ns]["models"]["gpt-4o-mini"]["runs"].as_array().map(Vec::len), Some(3));
    assert_eq!(state["seen"].as_array().map(Vec::len), Some(3), "one key per attempt, never two");
}

/// The price table ConfigMap is watched: a job waiting for an unknown model's price is
/// estimated once an admin adds it, a broken edit is refused with an Event and the previous
/// prices stay, and a price change applies to the next estimate, all without a restart.
#[tokio::test]
async fn price_table_edits_apply_without_a_restart() {
    let ns = "est-prices";
    let env = Env::builder(ns).without_voting_rights().args(&["--price-config-map", "prices"]).build().await;
    let client = env.admin.clone();
    let jobs: Api<AgentJob> = Api::namespaced(client.clone(), ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let local = |name: &str| {
        let mut job = job_manifest(name);
        job.spec.job_type = Some("price_reload".into());
        job.spec.agents.primary.model = "local-llm".into();
        job
    };

    jobs.create(&PostParams::default(), &local("waits-for-a-price")).await.unwrap();
    wait_for_job(&client, ns, "waits-for-a-price", "UnknownModel", |j| {
        condition(j, "Estimated").is_some_and(|c| c.reason == "UnknownModel" && c.message.contains("local-llm"))
    })
    .await;

    let prices = |input: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prices"}, "data": {
            "prices.yaml": format!("models:\n  local-llm: {{inputPerMillion: {input}, cachedInputPerMillion: 0, outputPerMillion: 0}}\n")
        }})
    };
    let apply = |cm: Value| {
        let config_maps = config_maps.clone();
        async move {
            let params = kube::api::PatchParams::apply("test").force();
            config_maps.patch("prices", &params, &kube::api::Patch::Apply(cm)).await.unwrap();
        }
    };

    // A broken table is refused, with the reason where the admin looks.
    apply(prices("-1")).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let all = ListParams::default();
    let refused = wait_for(
        "a PriceTableInvalid Event",
        Duration::from_secs(30),
        || events.list(&all),
        |l: &Result<ObjectList<k8s_openapi::api::events::v1::Event>, kube::Error>| {
            l.as_ref().is_ok_and(|l| l.items.iter().any(|e| e.reason.as_deref() == Some("PriceTableInvalid")))
        },
    )
    .await
    .unwrap();
    let event = refused.items.iter().find(|e| e.reason.as_deref() == Some("PriceTableInvalid")).unwrap();
    assert_eq!(event.regarding.as_ref().and_then(|r| r.name.as_deref()), Some("prices"));
    assert!(event.note.as_deref().unwrap_or_default().contains("not a price"), "{event:?}");
    let still_waiting = jobs.get("waits-for-a-price").await.unwrap();
    assert!(still_waiting.status.unwrap().estimate.is_none());

    // Fixed: the waiting job is estimated at the new price (the prior's 6,000 input tokens at $2
    // per million and 1,500 output tokens at $0: exactly $0.012 at p50).
    apply(prices("2")).await;
    let job =
        wait_for_job(&client, ns, "waits-for-a-price", "an estimate", |j| j.status.as_ref().is_some_and(|s| s.estimate.is_some())).await;
    let estimate = job.status.unwrap().estimate.unwrap();
    assert_eq!(estimate.cost_usd.p50, "0.012");

    // A price change applies to the next estimate.
    apply(prices("4")).await;
    let next = wait_for(
        "an estimate at the new price",
        Duration::from_secs(30),
        || async {
            let name = format!("next-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
            jobs.create(&PostParams::default(), &local(&name)).await.unwrap();
            estimated(&client, ns, &name).await.status.unwrap().estimate.unwrap()
        },
        |e| e.cost_usd.p50 == "0.024",
    )
    .await;
    assert_eq!(next.cost_usd.p90, "0.072");
}

/// What the estimator sees of `job_manifest`: one agent on gpt-4o-mini, no tool calls.
fn one_agent_input() -> agentgate::domain::estimate::EstimateInput {
    agentgate::domain::estimate::EstimateInput { job_type: JOB_TYPE.into(), agent_models: vec!["gpt-4o-mini".into()], tool_calls: vec![] }
}

/// Writes `state` as the estimator's ConfigMap in `ns`, as an operator that learned it earlier
/// would have left it (the tests start their operator after this).
async fn write_learned_state(client: &Client, ns: &str, state: &EstimatorState) {
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "agentgate-estimator"}, "data": {"state.json": state.to_json()}});
    Api::<ConfigMap>::namespaced(client.clone(), ns).create(&PostParams::default(), &serde_json::from_value(cm).unwrap()).await.unwrap();
}

/// The estimate of a job `name` created in `ns` once an operator starts from `state`, as learned
/// earlier (written into its ConfigMap first).
async fn estimate_after_learning(ns: &str, state: &EstimatorState, name: &str) -> agentgate::api::Estimate {
    let mut env = Env::builder(ns).without_voting_rights().operator(OperatorMode::Later).build().await;
    let client = env.admin.clone();
    write_learned_state(&client, ns, state).await;
    env.start_operator();
    Api::<AgentJob>::namespaced(client.clone(), ns).create(&PostParams::default(), &job_manifest(name)).await.expect("create job");
    *estimated(&client, ns, name).await.status.unwrap().estimate.unwrap()
}

/// Another tenant's forty runs of `job_type` at one token each.
fn one_token_runs(job_type: &str) -> EstimatorState {
    let prices = agentgate::domain::pricing::PriceTable::builtin();
    let prior = agentgate::domain::estimate::prior_tokens(&one_agent_input());
    let mut state = EstimatorState::default();
    for i in 0..40 {
        state.record(&format!("theirs/{i}"), "other-team", job_type, &tokens(1), &prior, &prices);
    }
    state
}

/// A run of `total` tokens on gpt-4o-mini, 80 % of them input.
fn tokens(total: i64) -> std::collections::BTreeMap<String, agentgate::domain::pricing::TokenCounts> {
    let input = total * 8 / 10;
    [(
        "gpt-4o-mini".to_string(),
        agentgate::domain::pricing::TokenCounts { input, cached_input: 0, output: total - input, ..Default::default() },
    )]
    .into()
}

/// The operator learns per namespace: another namespace's extreme runs of the same jobType
/// (learned earlier, here written into the ConfigMap before the operator starts) leave this
/// namespace's estimate exactly what it would be had that namespace never run anything.
#[tokio::test]
async fn another_namespaces_extreme_runs_leave_this_namespaces_estimate_unchanged() {
    use agentgate::domain::estimate::{estimate, prior_tokens};
    use agentgate::domain::pricing::PriceTable;
    let ns = "est-isolate";
    // Twelve runs of ours at about 450k tokens; forty of another tenant's at one token each.
    let prices = PriceTable::builtin();
    let input = one_agent_input();
    let prior = prior_tokens(&input);
    let mut ours_only = EstimatorState::default();
    for i in 0..12 {
        ours_only.record(&format!("ours/{i}"), ns, JOB_TYPE, &tokens(420_000 + 5_000 * i), &prior, &prices);
    }
    let mut state = ours_only.clone();
    for i in 0..40 {
        state.record(&format!("theirs/{i}"), "other-team", JOB_TYPE, &tokens(1), &prior, &prices);
    }
    let want = estimate(&input, ours_only.stats(ns, JOB_TYPE).as_ref(), &prices).unwrap();
    let got = estimate_after_learning(ns, &state, "mine").await;
    assert_eq!((got.method.as_str(), got.samples), ("history", 12), "{got:?}");
    assert_eq!((got.tokens.p50, got.tokens.p90), (want.tokens_p50, want.tokens_p90), "{got:?} vs {want:?}");
    assert!(got.tokens.p50 > 400_000, "ours, not the other tenant's one token: {got:?}");
}

/// A new key borrows from other namespaces' runs of its jobType, and a jobType is a name any
/// author picks: with one other namespace, that namespace's runs were the whole of the pooled
/// prior, so a tenant running the jobType at one token (or a billion) set another team's first
/// estimate of it (p50 and p90 of a few tokens, waved past cost tiers and the policy reviewer,
/// or over any budget). A pool of fewer than three namespaces now weighs the spec's own guess as
/// one more vote and counts each namespace within 10x of it.
#[tokio::test]
async fn one_other_namespace_cannot_set_a_new_keys_estimate() {
    use agentgate::domain::estimate::estimate;
    use agentgate::domain::pricing::PriceTable;
    // Another tenant's forty runs of the jobType at one token each; this namespace never ran it.
    let spec = estimate(&one_agent_input(), None, &PriceTable::builtin()).unwrap();
    let got = estimate_after_learning("est-poison", &one_token_runs(JOB_TYPE), "first").await;
    assert_eq!((got.method.as_str(), got.samples), ("pooled", 0), "{got:?}");
    let factor = spec.tokens_p50 as f64 / got.tokens.p50 as f64;
    assert!(factor <= 10f64.sqrt() * 1.01, "one tenant's one-token runs moved the p50 {factor:.1}x below the spec's: {got:?}");
    assert!(got.tokens.p90 >= spec.tokens_p90 - 1, "the p90 fell below the spec's own ({}): {got:?}", spec.tokens_p90);
}

/// A jobType nobody ran starts from the prior across the other jobTypes, one vote per namespace.
/// In a young cluster where one other tenant had run anything, that tenant alone was the prior:
/// its runs of its own jobType at one token made every other team's first estimate of a new
/// jobType a token (p50 and p90). Across fewer than three namespaces each now counts within 10x
/// of the spec's guess, and the p90 stays at least the spec's.
#[tokio::test]
async fn one_other_namespace_cannot_set_a_new_job_types_estimate() {
    use agentgate::domain::estimate::estimate;
    use agentgate::domain::pricing::PriceTable;
    // Another tenant's forty runs of a jobType of its own at one token each; nobody ran JOB_TYPE.
    let spec = estimate(&one_agent_input(), None, &PriceTable::builtin()).unwrap();
    let got = estimate_after_learning("est-poison-new", &one_token_runs("tenant_scan"), "first").await;
    assert_eq!((got.method.as_str(), got.samples), ("pooled", 0), "{got:?}");
    let factor = spec.tokens_p50 as f64 / got.tokens.p50 as f64;
    assert!(factor <= 10.0 * 1.01, "one tenant's one-token runs moved the p50 {factor:.1}x below the spec's: {got:?}");
    assert!(got.tokens.p90 >= spec.tokens_p90 - 1, "the p90 fell below the spec's own ({}): {got:?}", spec.tokens_p90);
}

/// A team's namespace effect (how far its runs sit from other teams' on the jobTypes they share)
/// scales its first estimate of every jobType new to it. The only other namespace sharing its
/// jobTypes ran them at one token, so the team looked ~7,500x bigger than its peers and its
/// first estimate of a new jobType, pooled from three honest teams at the spec's size, came out
/// ~86x the spec's. Another namespace now counts within 10x of the team's own level there.
#[tokio::test]
async fn another_namespace_cannot_skew_a_teams_namespace_effect() {
    use agentgate::domain::estimate::{estimate, prior_tokens};
    use agentgate::domain::pricing::PriceTable;
    let ns = "est-effect";
    let mut env = Env::builder(ns).without_voting_rights().operator(OperatorMode::Later).build().await;
    let client = env.admin.clone();

    let prices = PriceTable::builtin();
    let input = one_agent_input();
    let prior = prior_tokens(&input);
    let spec = estimate(&input, None, &prices).unwrap();
    let mut state = EstimatorState::default();
    for i in 0..5 {
        state.record(&format!("ours/{i}"), ns, "shared_scan", &tokens(spec.tokens_p50), &prior, &prices);
        state.record(&format!("theirs/{i}"), "other-team", "shared_scan", &tokens(1), &prior, &prices);
        for team in ["team-a", "team-b", "team-c"] {
            state.record(&format!("{team}/{i}"), team, JOB_TYPE, &tokens(spec.tokens_p50), &prior, &prices);
        }
    }
    write_learned_state(&client, ns, &state).await;

    env.start_operator();
    Api::<AgentJob>::namespaced(client.clone(), ns).create(&PostParams::default(), &job_manifest("first")).await.expect("create job");
    let got = estimated(&client, ns, "first").await.status.unwrap().estimate.unwrap();
    assert_eq!((got.method.as_str(), got.samples), ("pooled", 0), "{got:?}");
    let factor = got.tokens.p50 as f64 / spec.tokens_p50 as f64;
    assert!(factor > 1.5, "the team's own level was not compared at all ({factor:.2}x): {got:?}");
    assert!(factor <= 10.0, "one tenant's one-token runs scaled this team's first estimate {factor:.1}x: {got:?}");
}

/// The learned state keeps at most `MAX_KEYS` (namespace, jobType) keys, and a jobType is a name
/// any author picks. A namespace that runs ever new jobTypes must evict its own keys, not another
/// team's history: with the least recently updated key going first, its 256th made-up jobType
/// evicted the other team's twelve runs, whose next job was estimated from nothing again.
#[tokio::test]
async fn a_namespace_running_ever_new_job_types_evicts_its_own_keys_not_another_teams() {
    use agentgate::domain::estimate::prior_tokens;
    use agentgate::domain::learning::MAX_KEYS;
    use agentgate::domain::pricing::PriceTable;
    let ns = "est-flood";
    let mut env = Env::builder(ns).node("est-flood-node", "64", "256Gi", &[]).operator(OperatorMode::Later).build().await;
    let client = env.admin.clone();

    // The other team's twelve runs, then this namespace's made-up jobTypes up to the bound.
    let prices = PriceTable::builtin();
    let input = one_agent_input();
    let prior = prior_tokens(&input);
    let mut state = EstimatorState::default();
    for i in 0..12 {
        state.record(&format!("theirs/{i}"), "other-team", JOB_TYPE, &tokens(420_000 + 5_000 * i), &prior, &prices);
    }
    for i in 0..MAX_KEYS - 1 {
        state.record(&format!("flood/{i}"), ns, &format!("made-up-{i}"), &tokens(10_000), &prior, &prices);
    }
    write_learned_state(&client, ns, &state).await;
    env.start_operator();

    // One more made-up jobType, run and learned.
    let job = JobManifest::new("flood-last").job_type("made-up-last").budget("1000").build();
    let (_, pod) = approved_and_running(&env, job).await;
    finish_pod(&client, ns, &pod, 0, &usage_report("gpt-4o-mini", 10_000, 0, 0, json!({}))).await;
    let learned = wait_for(
        "the last made-up jobType in the learned state",
        Duration::from_secs(30),
        || learned_state(&client, ns),
        |s: &Option<EstimatorState>| s.as_ref().is_some_and(|s| s.job_types.get("made-up-last").is_some_and(|k| k.contains_key(ns))),
    )
    .await
    .unwrap();
    let keys: usize = learned.job_types.values().map(|k| k.len()).sum();
    assert_eq!(keys, MAX_KEYS, "bounded");
    let theirs = learned.job_types.get(JOB_TYPE).and_then(|k| k.get("other-team")).map(|s| s.n);
    assert_eq!(theirs, Some(12), "the other team's history evicted by this namespace's made-up jobTypes");
    assert!(!learned.job_types.contains_key("made-up-0"), "this namespace's least recently updated key goes");
}

/// Creates `job`, has alice and bob approve it, and plays the kubelet running its first Pod;
/// returns the created job and that Pod's name.
async fn approved_and_running(env: &Env, job: AgentJob) -> (AgentJob, String) {
    let name = job.metadata.name.clone().unwrap();
    let job = Api::<AgentJob>::namespaced(env.admin.clone(), &env.ns).create(&PostParams::default(), &job).await.expect("create job");
    vote(&env.alice, &job, "alice", Decision::Approve).await;
    vote(&env.bob, &job, "bob", Decision::Approve).await;
    wait_for("the agent Pod", Duration::from_secs(30), || job_pods(&env.admin, &env.ns, &job), |p: &Vec<_>| p.len() == 1).await;
    let pod = format!("{name}-scanner-1-agentgate");
    run_pod(&env.admin, &env.ns, &pod).await;
    (job, pod)
}

/// `runs` jobs of `job_type` in the environment's namespace (budget $1000, so their size is
/// never the question) succeed, each using `input_tokens` of gpt-4o-mini; returns once the
/// operator has learned every one.
async fn history(env: &Env, job_type: &str, runs: usize, input_tokens: i64) {
    let mut pods = Vec::new();
    for i in 0..runs {
        let job = JobManifest::new(&format!("history-{i}")).job_type(job_type).budget("1000").build();
        pods.push(approved_and_running(env, job).await.1);
    }
    for pod in &pods {
        finish_pod(&env.admin, &env.ns, pod, 0, &usage_report("gpt-4o-mini", input_tokens, 0, 0, json!({}))).await;
    }
    for i in 0..runs {
        wait_for_job(&env.admin, &env.ns, &format!("history-{i}"), "the history run learned", |j| {
            phase(j) == Some("Succeeded") && j.status.as_ref().is_some_and(|s| s.attempts.iter().all(|a| a.learned == Some(true)))
        })
        .await;
    }
}

/// What a tenant with status RBAC writes over a running job's recorded estimate: one token, $0.
async fn forge_low_estimate(env: &Env, name: &str) {
    use kube::api::{Patch, PatchParams};
    let forged = json!({"status": {"estimate":
        {"generation": 1, "tokens": {"p50": 1, "p90": 1}, "costUSD": {"p50": "0", "p90": "0"}, "method": "history", "samples": 40}}});
    Api::<AgentJob>::namespaced(env.user("erin").await, &env.ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .expect("erin may write status");
}

/// Waits for the job to end after its first attempt failed, and checks it ended
/// `BudgetExhausted` with `why` in the message, with no second attempt in status or as a Pod.
async fn budget_exhausted_after_one_attempt(env: &Env, job: &AgentJob, why: &str) -> AgentJob {
    let name = job.metadata.name.clone().unwrap();
    let done = wait_for_job(&env.admin, &env.ns, &name, "the job ended", |j| {
        matches!(phase(j), Some("Failed" | "Succeeded")) || j.status.as_ref().is_some_and(|s| s.attempts.len() > 1)
    })
    .await;
    assert_eq!(phase(&done), Some("Failed"), "{name}: {:#?}", done.status);
    let succeeded = condition(&done, "Succeeded").expect("Succeeded condition");
    assert_eq!(succeeded.reason, "BudgetExhausted", "{name}: {succeeded:?}");
    assert!(succeeded.message.contains(why), "{name}: {}", succeeded.message);
    assert_eq!(done.status.as_ref().unwrap().attempts.len(), 1, "{name}: no second attempt");
    let pods = job_pods(&env.admin, &env.ns, job).await;
    assert_eq!(pods.len(), 1, "{name}: no second Pod: {:?}", pods.iter().map(kube::ResourceExt::name_any).collect::<Vec<_>>());
    done
}

/// A job approved on a small estimate whose jobType then turns out to cost more than its budget
/// per run is not retried: its first attempt failed, the estimate made at the retry exceeds the
/// $5 budget, and it ends `Failed`/`BudgetExhausted` (not `Rejected`: it ran). A tenant who may
/// write the job's status and rewrites its recorded estimate to $0 before the retry changes
/// nothing: the estimate that decides is made afresh from what was learned, not read from status.
#[tokio::test]
async fn a_retry_re_estimated_over_budget_ends_budget_exhausted_whatever_status_says() {
    let ns = "est-retry-over";
    let env = Env::builder(ns).node("estimator-retry-node", "64", "256Gi", &[]).build().await;
    grant_status_writing(&env.admin, ns, "erin").await;
    let job_type = "retry_over_budget";
    let victim = |name: &str| JobManifest::new(name).job_type(job_type).spec(json!({"limits": {"maxRetries": 3}})).build();

    // Both approved on the spec's prior (tens of thousands of tokens, well under a cent), both running.
    let (honest, honest_pod) = approved_and_running(&env, victim("honest")).await;
    let (forged, forged_pod) = approved_and_running(&env, victim("forged")).await;
    for name in ["honest", "forged"] {
        let job = Api::<AgentJob>::namespaced(env.admin.clone(), ns).get(name).await.unwrap();
        let recorded = job.status.unwrap().estimate.expect("estimated at approval");
        assert_eq!(recorded.method, "prior", "{recorded:?}");
        assert!(recorded.cost_usd.p90.parse::<f64>().unwrap() < 0.5, "{recorded:?}");
    }

    // Meanwhile the team's runs of the jobType use 40M input tokens each ($6 at $0.15 per million).
    history(&env, job_type, 3, 40_000_000).await;
    // The operator's estimate now exceeds $5: a new job of the jobType is rejected for it.
    let probe = Api::<AgentJob>::namespaced(env.admin.clone(), ns).create(&PostParams::default(), &victim("probe")).await.unwrap();
    let rejected = wait_for_job(&env.admin, ns, "probe", "the probe rejected", |j| phase(j) == Some("Rejected")).await;
    assert_eq!(condition(&rejected, "Ready").map(|c| c.reason.as_str()), Some("BudgetExceeded"), "{:?}", rejected.status);
    assert!(job_pods(&env.admin, ns, &probe).await.is_empty());

    // erin rewrites the second job's recorded estimate to $0, then both first attempts fail cheaply.
    forge_low_estimate(&env, "forged").await;
    for pod in [&honest_pod, &forged_pod] {
        finish_pod(&env.admin, ns, pod, 1, &usage_report("gpt-4o-mini", 1000, 0, 100, json!(null))).await;
    }
    let over = "would exceed budget.maxCostUSD $5";
    let honest = budget_exhausted_after_one_attempt(&env, &honest, over).await;
    let done = budget_exhausted_after_one_attempt(&env, &forged, over).await;
    // Both were judged on the estimate made at the retry (over $5), the same for both.
    let said = |j: &AgentJob| condition(j, "Succeeded").unwrap().message.split("(estimated p90 $").nth(1).map(str::to_string);
    assert_eq!(said(&done), said(&honest), "{:?}", condition(&done, "Succeeded"));
    // The forgery stood when the retry was judged: the operator did not rewrite it, it ignored it.
    assert_eq!(done.status.unwrap().estimate.map(|e| e.tokens.p90), Some(1), "the forged estimate is still in status");
}

/// What was spent plus the retry's estimate must fit the budget, and that estimate too is made
/// afresh: a job whose first attempt spent $4.50 of its $5 budget, on a jobType whose runs cost
/// about $1, is not retried, whether or not a tenant with status RBAC rewrote its recorded
/// estimate to $0 (which, read from status, would have let $4.50 + $0 through).
#[tokio::test]
async fn a_retry_must_fit_what_was_spent_plus_a_fresh_estimate_not_a_forged_one() {
    let ns = "est-retry-spent";
    let env = Env::builder(ns).node("estimator-spent-node", "64", "256Gi", &[]).build().await;
    grant_status_writing(&env.admin, ns, "erin").await;
    let job_type = "retry_spent";

    // The team's runs of the jobType use 6.67M input tokens each (about $1).
    history(&env, job_type, 3, 6_666_667).await;
    let victim = |name: &str| JobManifest::new(name).job_type(job_type).spec(json!({"limits": {"maxRetries": 3}})).build();
    let (honest, honest_pod) = approved_and_running(&env, victim("honest")).await;
    let (forged, forged_pod) = approved_and_running(&env, victim("forged")).await;
    let recorded = Api::<AgentJob>::namespaced(env.admin.clone(), ns).get("honest").await.unwrap().status.unwrap().estimate.unwrap();
    let p90: f64 = recorded.cost_usd.p90.parse().unwrap();
    assert!(recorded.method != "prior" && p90 > 0.5 && p90 < 5.0, "one run fits the budget, not one more after $4.50: {recorded:?}");

    forge_low_estimate(&env, "forged").await;
    // Each first attempt fails having spent $4.50 (30M input tokens).
    for pod in [&honest_pod, &forged_pod] {
        finish_pod(&env.admin, ns, pod, 1, &usage_report("gpt-4o-mini", 30_000_000, 0, 0, json!(null))).await;
    }
    budget_exhausted_after_one_attempt(&env, &honest, "earlier attempts spent $4.5").await;
    let done = budget_exhausted_after_one_attempt(&env, &forged, "earlier attempts spent $4.5").await;
    assert_eq!(done.status.unwrap().estimate.map(|e| e.tokens.p90), Some(1), "the forged estimate is still in status");
}
