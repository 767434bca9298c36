//! Job templates (`kubectl agentgate new`) and a job's history of generations (`kubectl
//! agentgate history`, `rerun`), against the real apiserver, its RBAC and admission policies,
//! and the operator. The plugin runs as dave, a tenant who may edit his namespace (the built-in
//! `edit` role) and create jobs, and is no head.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use agentgate::api::{AgentJob, AgentJobTemplate, Decision, TEMPLATE_DIGEST_ANNOTATION, TEMPLATE_GENERATION_LABEL, TEMPLATE_LABEL};
use agentgate::domain::history::{HISTORY_LIMIT, RERUN_OF_ANNOTATION, revision_name};
use agentgate::domain::template::{parse_sets, render};
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::*;
use support::controlplane::ControlPlane;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_documents(text: &str) -> Vec<Value> {
    text.split("\n---").filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok()).filter(Value::is_object).collect()
}

fn example_template(name: &str) -> AgentJobTemplate {
    let text = std::fs::read_to_string(root().join(format!("deploy/examples/templates/{name}.yaml"))).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("deploy/examples/templates/{name}.yaml: {e}"))
}

fn example_job(file: &str) -> AgentJob {
    serde_saphyr::from_str(&std::fs::read_to_string(root().join("deploy/examples").join(file)).unwrap()).unwrap()
}

/// The shipped templates are the example jobs made reusable: rendered with the example's values
/// they give exactly the example job's spec.
#[test]
fn the_example_templates_render_the_example_jobs() {
    let cases = [
        (
            "security-scan",
            "20-security-scan.yaml",
            vec!["repositoryPath=/src/payments", "description=Scan the payments service for security vulnerabilities and propose fixes"],
        ),
        (
            "content-generation",
            "30-content-generation.yaml",
            vec!["topic=spring launch", "description=Draft three blog posts for the spring launch and publish them as drafts"],
        ),
        (
            "product-import",
            "40-product-import.yaml",
            vec!["feed=s3://supplier-feeds/spring.csv", "description=Import the supplier's spring catalogue and tag product images"],
        ),
    ];
    for (template, file, sets) in cases {
        let example = example_job(file);
        let sets = parse_sets(&sets.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let job = render(&example_template(template), &example.name_any(), &example.namespace().unwrap(), &sets)
            .unwrap_or_else(|e| panic!("{template}: {e}"));
        assert_eq!(job.spec, example.spec, "template {template} does not render {file}");
        assert_eq!(job.labels().get(TEMPLATE_LABEL).map(String::as_str), Some(template));
    }
}

/// The shared [`Env`] and dave, an editor of the namespace.
struct TemplatesEnv {
    env: Env,
    dave: Client,
}

impl std::ops::Deref for TemplatesEnv {
    type Target = Env;
    fn deref(&self) -> &Env {
        &self.env
    }
}

/// The namespace, a node, voting rights, the chart's template RBAC as `make manifests` renders it
/// into deploy/agentgate.yaml, dave as an editor of the namespace, and the operator.
async fn setup(ns: &str) -> TemplatesEnv {
    let mut env =
        Env::builder(ns).node("templates-node", "64", "256Gi", &[("nvidia.com/gpu", "8")]).operator(OperatorMode::Later).build().await;
    let admin = &env.admin;
    let pp = PatchParams::apply("templates-test").force();
    let deploy = std::fs::read_to_string(root().join("deploy/agentgate.yaml")).unwrap();
    let mut applied = 0;
    for doc in yaml_documents(&deploy).into_iter().filter(|d| d["metadata"]["name"].as_str().is_some_and(|n| n.contains("template"))) {
        let name = doc["metadata"]["name"].as_str().unwrap().to_string();
        match doc["kind"].as_str() {
            Some("ClusterRole") => {
                Api::<ClusterRole>::all(admin.clone()).patch(&name, &pp, &Patch::Apply(&doc)).await.unwrap();
            }
            Some("ClusterRoleBinding") => {
                Api::<ClusterRoleBinding>::all(admin.clone()).patch(&name, &pp, &Patch::Apply(&doc)).await.unwrap();
            }
            _ => continue,
        }
        applied += 1;
    }
    assert_eq!(applied, 3, "deploy/agentgate.yaml has the template reader and editor roles and the reader binding");
    // `edit` is aggregated by kube-controller-manager, which this control plane does not run:
    // dave gets the roles it aggregates (view's reads, edit's writes) directly.
    for role in ["system:aggregate-to-view", "system:aggregate-to-edit"] {
        let name = format!("dave-{}", role.trim_start_matches("system:"));
        let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": name, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "dave"}]});
        Api::<RoleBinding>::namespaced(admin.clone(), ns).patch(&name, &pp, &Patch::Apply(&binding)).await.unwrap();
    }
    env.start_operator();
    let dave = env.user("dave").await;
    TemplatesEnv { env, dave }
}

async fn plugin(user: &str, args: &[&str]) -> Output {
    support::plugin::run(&ControlPlane::shared().kubeconfig(user), args).await
}

fn text(output: &Output) -> String {
    support::plugin::describe(output)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn refused(result: Result<impl std::fmt::Debug, kube::Error>, what: &str) {
    match result {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

async fn create_template(admin: &Client, template: &AgentJobTemplate) {
    let api: Api<AgentJobTemplate> = Api::all(admin.clone());
    let _ = api.delete(&template.name_any(), &DeleteParams::default()).await;
    let name = template.name_any();
    wait_for("old template gone", Duration::from_secs(10), || api.get_opt(&name), |t| matches!(t, Ok(None)))
        .await
        .expect("reading the template");
    api.create(&PostParams::default(), template).await.expect("admin creates the template");
}

fn approval_summary(job: &AgentJob) -> Option<String> {
    job.status.as_ref()?.approval.as_ref().map(|a| a.summary.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_renders_a_job_from_a_template_that_only_admins_curate_and_it_needs_two_approvals() {
    let env = setup("templates").await;
    let ns = env.ns.as_str();
    let template = example_template("security-scan");
    create_template(&env.admin, &template).await;
    let templates: Api<AgentJobTemplate> = Api::all(env.dave.clone());

    // Attack: dave, an editor of his namespace, can read templates but not create or change them.
    let mut forged = template.clone();
    forged.metadata = kube::api::ObjectMeta { name: Some("forged-scan".into()), ..Default::default() };
    refused(templates.create(&PostParams::default(), &forged).await, "dave creates a template");
    let cheaper = json!({"spec": {"job": {"spec": {"category": "sandbox"}}}});
    refused(templates.patch("security-scan", &PatchParams::default(), &Patch::Merge(&cheaper)).await, "dave edits a template");
    refused(templates.delete("security-scan", &DeleteParams::default()).await, "dave deletes a template");
    assert_eq!(templates.get("security-scan").await.expect("dave reads templates").spec, template.spec);

    // Bad input is refused naming the parameter, and creates nothing.
    for (args, expected) in [
        (
            vec!["--set", "repositoryPath=/src/api", "--set", "model=gpt-4o"],
            "unknown parameter \"model\": template security-scan has parameters description, repositoryPath",
        ),
        (vec![], "parameter \"repositoryPath\" is required (--set repositoryPath=...)"),
        (vec!["--set", "repositoryPath=/src/api", "--set", "maxRetries=two"], "parameter \"maxRetries\" must be an integer, got \"two\""),
        // Well typed but out of the CRD's bounds: the apiserver names the field.
        (vec!["--set", "repositoryPath=/src/api", "--set", "maxRetries=50"], "spec.limits.maxRetries"),
    ] {
        let mut all = vec!["new", "security-scan", "--name", "bad-scan", "-n", ns];
        all.extend(args);
        let out = plugin("dave", &all).await;
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(expected), "{expected}: {}", text(&out));
    }
    let jobs: Api<AgentJob> = Api::namespaced(env.admin.clone(), ns);
    assert!(jobs.get_opt("bad-scan").await.unwrap().is_none(), "a refused render created a job");

    // -o yaml prints the complete job (for Git) and creates nothing.
    let out =
        plugin("dave", &["new", "security-scan", "--name", "scan-api", "-n", ns, "--set", "repositoryPath=/src/api", "-o", "yaml"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let printed: AgentJob = serde_saphyr::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert!(jobs.get_opt("scan-api").await.unwrap().is_none(), "-o yaml created the job");
    assert_eq!(printed.spec.input.as_deref(), Some(&json!({"repositoryPath": "/src/api", "scanDepth": "full"})));
    assert_eq!(printed.labels().get(TEMPLATE_GENERATION_LABEL).map(String::as_str), Some("1"));

    // Without -o it is created as dave, with the template's name and version.
    let out = plugin("dave", &["new", "security-scan", "--name", "scan-api", "-n", ns, "--set", "repositoryPath=/src/api"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let created = jobs.get("scan-api").await.unwrap();
    assert_eq!(created.spec, printed.spec, "what -o yaml printed is what is created");
    assert_eq!(created.labels().get(TEMPLATE_LABEL).map(String::as_str), Some("security-scan"));
    let digest = created.annotations().get(TEMPLATE_DIGEST_ANNOTATION).cloned().expect("template digest annotation");
    assert_eq!(created.annotations().get(agentgate::api::REQUESTED_BY).map(String::as_str), Some("dave"));

    // The admin edits the template: the rendered job does not change, a new render does.
    let edit = json!({"spec": {"job": {"spec": {"agents": {"primary": {"name": "scanner", "image": "ghcr.io/acme/scanner:3.0", "model": "gpt-4o-mini"}}}}}});
    let edited = Api::<AgentJobTemplate>::all(env.admin.clone())
        .patch("security-scan", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    assert_eq!(edited.metadata.generation, Some(2));
    // The operator has seen the job (its first status), and the job is still what was rendered.
    let job = wait_for_job(&env.admin, ns, "scan-api", "AwaitingApproval 0/2", |j| approval_summary(j).as_deref() == Some("0/2")).await;
    assert_eq!((job.spec.clone(), job.metadata.generation), (created.spec.clone(), Some(1)));
    assert_eq!(job.spec.agents.primary.image, "ghcr.io/acme/scanner:2.1");
    assert_eq!(job.annotations().get(TEMPLATE_DIGEST_ANNOTATION), Some(&digest));
    let out =
        plugin("dave", &["new", "security-scan", "--name", "scan-web", "-n", ns, "--set", "repositoryPath=/src/web", "-o", "json"]).await;
    let again: AgentJob = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(again.spec.agents.primary.image, "ghcr.io/acme/scanner:3.0");
    assert_eq!(again.labels().get(TEMPLATE_GENERATION_LABEL).map(String::as_str), Some("2"));
    assert_ne!(again.annotations().get(TEMPLATE_DIGEST_ANNOTATION), Some(&digest));

    // A rendered job is a job like any other: one approval is not enough, two are.
    vote(&env.alice, &job, "alice", Decision::Approve).await;
    let one = wait_for_job(&env.admin, ns, "scan-api", "1/2", |j| approval_summary(j).as_deref() == Some("1/2")).await;
    assert_eq!(phase(&one), Some("AwaitingApproval"));
    vote(&env.bob, &job, "bob", Decision::Approve).await;
    let approved =
        wait_for_job(&env.admin, ns, "scan-api", "approved", |j| condition(j, "Approved").is_some_and(|c| c.status == "True")).await;
    assert_eq!(approval_summary(&approved).as_deref(), Some("2/2"));
}

async fn revisions(client: &Client, ns: &str, job: &AgentJob) -> Vec<ControllerRevision> {
    let selector = format!("agentgate.dev/job-uid={}", job.metadata.uid.as_deref().unwrap());
    let mut list =
        Api::<ControllerRevision>::namespaced(client.clone(), ns).list(&ListParams::default().labels(&selector)).await.unwrap().items;
    list.sort_by_key(|r| r.revision);
    list
}

fn history_of(job: &AgentJob) -> Vec<(i64, String)> {
    job.status.as_ref().map(|s| s.history.iter().map(|h| (h.generation, h.result.to_string())).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_records_each_generation_and_a_rerun_is_a_new_job_that_needs_fresh_approval() {
    let env = setup("history").await;
    let ns = env.ns.as_str();
    let jobs: Api<AgentJob> = Api::namespaced(env.dave.clone(), ns);

    // Generation 1 runs: approved by two heads, one attempt that uses tokens.
    let job = create_payments_job(&env.dave, ns, "nightly").await;
    vote(&env.alice, &job, "alice", Decision::Approve).await;
    vote(&env.bob, &job, "bob", Decision::Approve).await;
    wait_for_job(&env.admin, ns, "nightly", "Running", |j| phase(j) == Some("Running")).await;
    run_pod(&env.admin, ns, "nightly-agent-1-agentgate").await;
    finish_pod(&env.admin, ns, "nightly-agent-1-agentgate", 0, &usage_report("gpt-4o-mini", 10_000, 0, 2_000, json!({}))).await;
    let done = wait_for_job(&env.admin, ns, "nightly", "Succeeded", |j| phase(j) == Some("Succeeded")).await;
    let g1 = done.status.as_ref().unwrap().history[0].clone();
    assert_eq!((g1.generation, g1.approvals.as_deref(), g1.attempts, g1.result.as_str()), (1, Some("2/2"), 1, "Succeeded"));
    assert_eq!(g1.approved_by, vec!["alice".to_string(), "bob".to_string()]);
    assert_eq!(g1.total_tokens, Some(12_000));
    assert_eq!(g1.cost_usd.as_deref(), done.status.as_ref().unwrap().usage.as_ref().map(|u| u.cost_usd.as_str()));

    // Dave edits the finished job: generation 2 is recorded (it will not run) with its spec.
    let raise = json!({"spec": {"budget": {"maxCostUSD": "7"}}});
    jobs.patch("nightly", &PatchParams::default(), &Patch::Merge(&raise)).await.unwrap();
    let edited = wait_for_job(&env.admin, ns, "nightly", "generation 2 in history", |j| history_of(j).len() == 2).await;
    assert_eq!(history_of(&edited), vec![(1, "Succeeded".to_string()), (2, "NotRun".to_string())]);
    let stored = revisions(&env.dave, ns, &edited).await;
    assert_eq!(stored.iter().map(|r| r.name_any()).collect::<Vec<_>>(), vec!["nightly-g1", "nightly-g2"]);
    assert_eq!(stored[0].data.0["spec"]["budget"]["maxCostUSD"], "5");

    // `history`, as dave.
    let out = plugin("dave", &["history", "nightly", "-n", ns]).await;
    assert!(out.status.success(), "{}", text(&out));
    let table = stdout(&out);
    println!("{table}");
    let line = |generation: &str| table.lines().find(|l| l.split_whitespace().next() == Some(generation)).unwrap_or_default().to_string();
    let first = line("1");
    for expected in ["2/2 (alice, bob)", "12000", "Succeeded", "stored"] {
        assert!(first.contains(expected), "generation 1 line lacks {expected:?}:\n{table}");
    }
    assert!(line("2").contains("NotRun") && line("2").ends_with("current"), "{table}");

    // Rerun generation 1: a new job with generation 1's spec and no approval carried over.
    let out = plugin("dave", &["rerun", "nightly", "--generation", "1", "--name", "nightly-again", "-n", ns]).await;
    assert!(out.status.success(), "{}", text(&out));
    let rerun = jobs.get("nightly-again").await.unwrap();
    assert_eq!(rerun.spec, serde_json::from_value(stored[0].data.0["spec"].clone()).unwrap());
    assert_eq!(rerun.spec.budget.max_cost_usd, "5");
    assert!(rerun.annotations()[RERUN_OF_ANNOTATION].starts_with(&format!("{ns}/nightly generation 1 uid ")));
    let waiting =
        wait_for_job(&env.admin, ns, "nightly-again", "AwaitingApproval 0/2", |j| approval_summary(j).as_deref() == Some("0/2")).await;
    assert_eq!(phase(&waiting), Some("AwaitingApproval"), "the old job's two approvals count for nothing here");
    vote(&env.alice, &waiting, "alice", Decision::Approve).await;
    let one = wait_for_job(&env.admin, ns, "nightly-again", "1/2", |j| approval_summary(j).as_deref() == Some("1/2")).await;
    assert_eq!(phase(&one), Some("AwaitingApproval"));

    // Attack: dave cannot write the stored specs (edit grants no controllerrevisions writes) ...
    let revisions_as_dave: Api<ControllerRevision> = Api::namespaced(env.dave.clone(), ns);
    let tamper = json!({"data": {"spec": {"budget": {"maxCostUSD": "900"}}}});
    refused(revisions_as_dave.patch("nightly-g1", &PatchParams::default(), &Patch::Merge(&tamper)).await, "dave edits a revision");
    let mut planted = stored[0].clone();
    planted.metadata = kube::api::ObjectMeta { name: Some("nightly-g9".into()), ..planted.metadata.clone() };
    planted.metadata.resource_version = None;
    planted.metadata.uid = None;
    refused(revisions_as_dave.create(&PostParams::default(), &planted).await, "dave plants a revision");
    // ... nor can anyone change one (a revision's data is immutable); one replaced by someone
    // who may delete and create revisions, owner and all, is not rerun.
    let admin_revisions: Api<ControllerRevision> = Api::namespaced(env.admin.clone(), ns);
    let immutable = admin_revisions.patch("nightly-g1", &PatchParams::default(), &Patch::Merge(&tamper)).await;
    assert!(matches!(&immutable, Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("immutable")), "{immutable:?}");
    admin_revisions.delete("nightly-g1", &DeleteParams::default()).await.unwrap();
    let mut replaced = stored[0].clone();
    replaced.metadata.resource_version = None;
    replaced.metadata.uid = None;
    replaced.data.0["spec"]["budget"]["maxCostUSD"] = json!("900");
    admin_revisions.create(&PostParams::default(), &replaced).await.unwrap();
    let out = plugin("dave", &["rerun", "nightly", "--generation", "1", "--name", "nightly-forged", "-n", ns]).await;
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("does not hold the spec recorded for generation 1 of nightly"),
        "{}",
        text(&out)
    );
    assert!(jobs.get_opt("nightly-forged").await.unwrap().is_none());
    let out = plugin("dave", &["history", "nightly", "-n", ns]).await;
    assert!(stdout(&out).lines().any(|l| l.starts_with('1') && l.contains("untrusted")), "{}", text(&out));
    let out = plugin("dave", &["rerun", "nightly", "--generation", "7", "-n", ns]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("generation 7 of nightly is not in its history (recorded: 1, 2)"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_stored_specs_are_bounded() {
    let env = setup("history-bound").await;
    let ns = env.ns.as_str();
    let jobs: Api<AgentJob> = Api::namespaced(env.dave.clone(), ns);
    let job = create_payments_job(&env.dave, ns, "edited").await;
    wait_for_job(&env.admin, ns, "edited", "generation 1 recorded", |j| history_of(j).len() == 1).await;
    let last = HISTORY_LIMIT as i64 + 2;
    for generation in 2..=last {
        let edit = json!({"spec": {"budget": {"maxCostUSD": format!("{generation}")}}});
        jobs.patch("edited", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
        wait_for_job(&env.admin, ns, "edited", &format!("generation {generation} recorded"), |j| {
            history_of(j).last().map(|h| h.0) == Some(generation)
        })
        .await;
    }
    let job = jobs.get("edited").await.unwrap_or(job);
    let generations: Vec<i64> = history_of(&job).iter().map(|h| h.0).collect();
    assert_eq!(generations, (3..=last).collect::<Vec<_>>());
    // The revisions of generations 1 and 2 go right after the status write that dropped them.
    let kept = wait_for(
        "revisions of generations 1 and 2 deleted",
        Duration::from_secs(30),
        || revisions(&env.admin, ns, &job),
        |r| r.len() == HISTORY_LIMIT,
    )
    .await;
    assert_eq!(kept.first().map(|r| r.name_any()), Some(revision_name("edited", 3)));
    assert!(kept.iter().all(|r| r.metadata.owner_references.as_ref().is_some_and(|o| o[0].uid == job.metadata.uid.clone().unwrap())));
}

/// Storing old specs never holds a job up: where a ResourceQuota allows no ControllerRevision,
/// the job goes on, a Warning Event says its spec was not stored, and `history` shows it missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_on_revisions_does_not_hold_a_job_up() {
    let env = setup("history-quota").await;
    let ns = env.ns.as_str();
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-revisions"}, "spec": {"hard": {"count/controllerrevisions.apps": "0"}}}))
    .unwrap();
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> = Api::namespaced(env.admin.clone(), ns);
    quotas.create(&PostParams::default(), &quota).await.expect("create quota");
    // The quota controller's part (kube-controller-manager does not run here): the status the
    // apiserver's quota admission enforces.
    let counted = json!({"status": {"hard": {"count/controllerrevisions.apps": "0"}, "used": {"count/controllerrevisions.apps": "0"}}});
    quotas.patch_status("no-revisions", &PatchParams::default(), &Patch::Merge(&counted)).await.expect("quota status");
    let job = create_payments_job(&env.dave, ns, "quota-bound").await;
    let waiting = wait_for_job(&env.admin, ns, "quota-bound", "AwaitingApproval 0/2 with generation 1 recorded", |j| {
        approval_summary(j).as_deref() == Some("0/2") && history_of(j).len() == 1
    })
    .await;
    assert_eq!(phase(&waiting), Some("AwaitingApproval"));
    assert!(revisions(&env.admin, ns, &job).await.is_empty());
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.admin.clone(), ns);
    let all = ListParams::default();
    let warned = wait_for(
        "SpecNotStored Event",
        Duration::from_secs(30),
        || events.list(&all),
        |l| l.as_ref().is_ok_and(|l| l.items.iter().any(|e| e.reason.as_deref() == Some("SpecNotStored"))),
    )
    .await
    .unwrap();
    let note = warned.items.iter().find(|e| e.reason.as_deref() == Some("SpecNotStored")).and_then(|e| e.note.clone()).unwrap();
    assert!(note.contains("the spec of generation 1 was not stored as ControllerRevision quota-bound-g1"), "{note}");
    let out = plugin("dave", &["history", "quota-bound", "-n", ns]).await;
    assert!(stdout(&out).lines().any(|l| l.starts_with('1') && l.ends_with("current")), "{}", text(&out));
    // The current generation's spec is the job's own: it can be rerun all the same.
    let out = plugin("dave", &["rerun", "quota-bound", "-n", ns, "-o", "yaml"]).await;
    assert!(out.status.success(), "{}", text(&out));
}
