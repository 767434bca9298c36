//! Hostile and malformed manifests against the real apiserver with the operator running.
//!
//! Every file in `tests/data/bad/` says in its leading comment what must become of it:
//! - `# expect: <text>` (one or more): refused when created, the apiserver's message containing
//!   each text, one of which names the field (`spec.…` or `metadata.…`);
//!   `# expect-code: <n>` gives the HTTP status when it is not 422 Unprocessable Entity.
//! - `# expect-status: <phase> <reason>` and `# expect-message: <text>`: admitted (admission
//!   cannot know), then given that phase by the operator with that reason and message on its
//!   Ready condition.
//!
//! Content too big to keep in a file is generated: `# fill: <JSON pointer> <bytes>` puts a string
//! of that many bytes there, `# nest: <JSON pointer> <levels>` an object nested that deep.
//! Afterwards the operator must still be alive, with no panic in its log, and must still serve a
//! well-formed job created after all the hostile ones.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentgate::api::AgentJob;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::cluster::{Env, JobManifest, condition, phase};
use support::controlplane::OperatorProcess;

const NAMESPACE: &str = "bad-input";
/// How long the operator may take to give every admitted hostile job its verdict.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
enum Expect {
    Refused { code: u16, messages: Vec<String> },
    Status { phase: String, reason: String, messages: Vec<String> },
}

#[derive(Debug)]
struct Case {
    file: String,
    object: Value,
    expect: Expect,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bad")
}

/// Reads one corpus file, applying its `fill` and `nest` directives.
fn load(path: &Path) -> Result<Case, String> {
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = fs::read_to_string(path).map_err(|e| format!("{file}: {e}"))?;
    let mut object: Value = serde_saphyr::from_str(&text).map_err(|e| format!("{file}: not YAML: {e}"))?;
    let (mut refused, mut code, mut status, mut messages) = (Vec::new(), None, None, Vec::new());
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        let line = line.trim_start_matches('#').trim();
        let Some((directive, arg)) = line.split_once(':') else { continue };
        let arg = arg.trim();
        match directive {
            "expect" => refused.push(arg.to_string()),
            "expect-code" => code = Some(arg.parse::<u16>().map_err(|e| format!("{file}: expect-code: {e}"))?),
            "expect-status" => status = Some(arg.split_once(' ').ok_or(format!("{file}: expect-status needs a phase and a reason"))?),
            "expect-message" => messages.push(arg.to_string()),
            "fill" | "nest" => {
                let (pointer, n) = arg.split_once(' ').ok_or(format!("{file}: {directive} needs a pointer and a number"))?;
                let n: usize = n.parse().map_err(|e| format!("{file}: {directive}: {e}"))?;
                let value = if directive == "fill" { Value::String("x".repeat(n)) } else { nested(n) };
                *object.pointer_mut(pointer).ok_or(format!("{file}: {directive}: no {pointer} in the manifest"))? = value;
            }
            _ => {}
        }
    }
    let expect = match (refused.is_empty(), status) {
        (false, None) => {
            let code = code.unwrap_or(422);
            // Only requests refused before or after validation (413, storage limits) may leave
            // the field unnamed; the file says why.
            if code < 500 && code != 413 && !refused.iter().any(|m| m.starts_with("spec.") || m.starts_with("metadata.")) {
                return Err(format!("{file}: no `# expect:` line names the field (spec.… or metadata.…)"));
            }
            Expect::Refused { code, messages: refused }
        }
        (true, Some((phase, reason))) => Expect::Status { phase: phase.into(), reason: reason.into(), messages },
        _ => return Err(format!("{file}: needs either `# expect:` lines or one `# expect-status:` line")),
    };
    Ok(Case { file, object, expect })
}

/// `{"a": {"a": … 1 …}}`, `levels` objects deep.
fn nested(levels: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..levels {
        value = json!({ "a": value });
    }
    value
}

fn api_for(client: &Client, object: &Value) -> Api<DynamicObject> {
    let kind = object["kind"].as_str().expect("a kind");
    let gvk = GroupVersionKind::gvk("agentgate.dev", "v1alpha1", kind);
    let resource = ApiResource::from_gvk_with_plural(&gvk, &format!("{}s", kind.to_lowercase()));
    match kind {
        "AgentTool" => Api::all_with(client.clone(), &resource),
        _ => Api::namespaced_with(client.clone(), NAMESPACE, &resource),
    }
}

fn name_of(object: &Value) -> String {
    object["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

/// The job's phase and its Ready condition's reason and message.
fn verdict(job: &AgentJob) -> (String, String, String) {
    let ready = condition(job, "Ready");
    (
        phase(job).unwrap_or_default().to_string(),
        ready.map(|c| c.reason.to_string()).unwrap_or_default(),
        ready.map(|c| c.message.to_string()).unwrap_or_default(),
    )
}

fn healthy_job(name: &str) -> AgentJob {
    JobManifest::new(name).resources("500m", "512Mi").build()
}

/// Creates a well-formed job and waits until the operator has looked at it.
async fn operator_still_serves(admin: &Client, name: &str, failures: &mut Vec<String>) {
    let jobs = Api::<AgentJob>::namespaced(admin.clone(), NAMESPACE);
    jobs.create(&PostParams::default(), &healthy_job(name)).await.expect("creating a well-formed job after the hostile ones");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = jobs.get(name).await.expect("reading the well-formed job");
        if phase(&job) == Some("AwaitingApproval") {
            return;
        }
        if Instant::now() > deadline {
            failures.push(format!("{name}, a well-formed job, was not served within 30s: {:?}", verdict(&job)));
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn assert_alive_without_panic(operator: &OperatorProcess, failures: &mut Vec<String>) {
    let stat = fs::read_to_string(format!("/proc/{}/stat", operator.pid())).unwrap_or_default();
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next().unwrap_or('?')).unwrap_or('?');
    if matches!(state, 'Z' | 'X' | '?') {
        failures.push(format!("the operator exited (process state {state:?})"));
    }
    let log = fs::read_to_string(operator.log_path()).expect("operator log");
    for line in log.lines().filter(|l| l.contains("panicked") || l.contains("RUST_BACKTRACE")) {
        failures.push(format!("operator log: {line:.500}"));
    }
}

#[tokio::test]
async fn hostile_manifests_are_refused_at_admission_or_in_status_and_the_operator_survives() {
    let mut env = Env::builder(NAMESPACE).node("bad-input-node", "64", "256Gi", &[]).without_voting_rights().build().await;
    let admin = env.admin.clone();

    let mut files: Vec<PathBuf> = fs::read_dir(corpus_dir())
        .expect("tests/data/bad")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let cases: Vec<Case> = files.iter().map(|f| load(f).unwrap_or_else(|e| panic!("{e}"))).collect();
    assert!(cases.len() >= 50, "the corpus has {} manifests, at least 50 wanted", cases.len());
    let mut names = BTreeSet::new();
    for case in &cases {
        let key = (case.object["kind"].as_str().unwrap_or_default().to_string(), name_of(&case.object));
        assert!(names.insert(key), "{}: another manifest has the same kind and name", case.file);
    }

    let mut failures = Vec::new();
    let mut admitted = Vec::new();
    let started = Instant::now();
    for case in &cases {
        let object: DynamicObject = serde_json::from_value(case.object.clone()).expect("an object");
        let result = api_for(&admin, &case.object).create(&PostParams::default(), &object).await;
        match (&case.expect, result) {
            (Expect::Refused { code, messages }, Err(kube::Error::Api(status))) => {
                eprintln!("{}: {} {:.300}", case.file, status.code, status.message);
                if status.code != *code {
                    failures.push(format!("{}: HTTP {} instead of {code}: {:.500}", case.file, status.code, status.message));
                }
                for m in messages.iter().filter(|m| !status.message.contains(m.as_str())) {
                    failures.push(format!("{}: message lacks {m:?}: {:.500}", case.file, status.message));
                }
            }
            (Expect::Refused { .. }, Ok(_)) => {
                failures.push(format!("{}: admitted, but should have been refused", case.file));
                let _ = api_for(&admin, &case.object).delete(&name_of(&case.object), &DeleteParams::default()).await;
            }
            (Expect::Status { .. }, Ok(_)) => admitted.push(case),
            (_, Err(e)) => failures.push(format!("{}: {e:.500}", case.file)),
        }
    }
    let refused = cases.len() - admitted.len();
    eprintln!(
        "{} manifests submitted in {:.1?}: {refused} refused at admission, {} admitted",
        cases.len(),
        started.elapsed(),
        admitted.len()
    );

    // Each admitted one must reach its verdict; they are all reconciled concurrently.
    let jobs = Api::<AgentJob>::namespaced(admin.clone(), NAMESPACE);
    let deadline = Instant::now() + VERDICT_TIMEOUT;
    let mut pending: Vec<&Case> = admitted.clone();
    let mut last = std::collections::BTreeMap::new();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for case in pending {
            let Expect::Status { phase, reason, messages } = &case.expect else { unreachable!() };
            let got = match jobs.get(&name_of(&case.object)).await {
                Ok(job) => verdict(&job),
                Err(e) => (String::new(), String::new(), format!("reading the job: {e}")),
            };
            let done = &got.0 == phase && &got.1 == reason && messages.iter().all(|m| got.2.contains(m.as_str()));
            if !done {
                still.push(case);
            }
            last.insert(case.file.clone(), got);
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for case in &pending {
        failures.push(format!("{}: expected {:?}, last seen (phase, reason, message) {:?}", case.file, case.expect, last[&case.file]));
    }
    eprintln!("verdicts on {} admitted manifests in {:.1?}", admitted.len() - pending.len(), started.elapsed());

    // The operator took all of that without crashing, still works, and a new one starts and
    // syncs its caches with every hostile object in them (a single undecodable job in a list
    // would keep it from ever syncing).
    operator_still_serves(&admin, "bad-input-after", &mut failures).await;
    assert_alive_without_panic(env.operator(), &mut failures);
    let restarted = env.start_operator();
    operator_still_serves(&admin, "bad-input-after-restart", &mut failures).await;
    assert_alive_without_panic(restarted, &mut failures);

    if !failures.is_empty() {
        let log = fs::read_to_string(restarted.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("last lines of the restarted operator's log:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile manifests were not handled as expected:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
