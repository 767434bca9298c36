//! The apply step's Pods: an attempt's agent Pods created once each, from the spec of the
//! attempt's own generation, with the endpoints its heads approved.

use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::error::ApplyError;
use super::snapshot::{self, gpu_resource_name};
use super::{Context, Result};
use crate::api::AgentJob;
use crate::domain::decide::{self, Plan};
use crate::domain::pod_builder::{DEFAULT_CPU, DEFAULT_MEMORY, PodPlan, build_pod, is_agent_pod_name};

/// Creates the Pods of `attempt` that neither the cache shows (`existing`) nor are `expected`.
pub(super) async fn ensure_pods(
    job: &AgentJob,
    ctx: &Context,
    plan: &Plan,
    attempt: i32,
    existing: &[decide::PodView],
    expected: &[String],
) -> Result<()> {
    let namespace = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let spec = &job.spec;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let tool_urls: Vec<(String, String)> = spec
        .tools
        .iter()
        .filter_map(|t| {
            // The endpoint the heads approved, once recorded, and no other (tool_pinning::agent_url).
            let tool = ctx.caches.tools.get(&ObjectRef::new(&t.name))?;
            let record = plan.status.tool_endpoints.as_deref();
            Some((t.name.clone(), super::tool_pinning::agent_url(record, &t.name, || tool.status.as_ref()?.url.clone())?))
        })
        .collect();
    let input_json = spec.input.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "{}".into());
    let (cpu, memory) =
        spec.resources.as_ref().map(|r| (r.cpu.clone(), r.memory.clone())).unwrap_or_else(|| (DEFAULT_CPU.into(), DEFAULT_MEMORY.into()));
    let gpu_name = gpu_resource_name(job);
    let gpu = spec.resources.as_ref().and_then(|r| r.gpu).filter(|g| *g > 0 && !plan.drop_gpu);
    let deadline = spec.limits.as_ref().and_then(|l| l.max_execution_seconds).unwrap_or(crate::api::DEFAULT_MAX_EXECUTION_SECONDS);
    // The attempt's generation as the plan records it: a Pod of a running attempt re-created after
    // a spec change still belongs to the generation its attempt runs.
    let job_generation =
        plan.status.attempts.iter().find(|a| a.attempt == attempt).map_or_else(|| job.metadata.generation.unwrap_or(1), |a| a.generation);
    // Pods are built only from the spec of the attempt's own generation. After a spec change
    // the spec at hand is one nobody approved for this attempt: an agent added to it would run
    // inside the approved attempt (tests/gate_attacks.rs an_agent_added_while_an_attempt_runs_gets_no_pod).
    // A Pod of the attempt missing then is confirmed gone and fails it, as a deleted one does.
    if job.metadata.generation.unwrap_or(1) != job_generation {
        return Ok(());
    }
    let agents: Vec<_> = std::iter::once(&spec.agents.primary).chain(&spec.agents.supporting).collect();
    let exists = |agent: &str| {
        let of_agent = |pod: &str| is_agent_pod_name(pod, &name, agent, attempt);
        existing.iter().any(|p| of_agent(&p.name)) || expected.iter().any(|p| of_agent(p))
    };
    let missing = agents.iter().any(|a| !exists(&a.name));
    if !missing {
        return Ok(());
    }
    let keys = super::meter_keys::of_namespace(ctx, &namespace).await?;
    let (mut meter, warnings) = ctx.settings.meter.plan(&namespace, keys.as_ref(), &spec.budget.max_cost_usd);
    // The CA served now, not at start: a rotated one reaches new Pods without a restart
    // (meter_grants a_rotated_provided_ca_reaches_new_agent_pods_without_an_operator_restart).
    meter.grant_ca_pem = ctx.settings.meter_api_tls.as_ref().map(super::meter_tls::LiveCa::pem);
    for w in &warnings {
        ctx.publish_event(&job.object_ref(&()), EventType::Warning, w.reason, &w.message, "CreatePod").await;
    }
    for agent in agents {
        let pod = build_pod(&PodPlan {
            job_name: &name,
            namespace: &namespace,
            job_uid: &uid,
            job_generation,
            agent,
            attempt,
            cpu: &cpu,
            memory: &memory,
            gpu: gpu.map(|g| (gpu_name.as_str(), g)),
            deadline_seconds: deadline,
            budget_usd: &spec.budget.max_cost_usd,
            input_json: &input_json,
            tool_urls: &tool_urls,
            meter: &meter,
        });
        if exists(&agent.name) {
            continue;
        }
        let pod_name = pod.name_any();
        // Expected before the POST, so that the watch event, which may come first, ends it.
        ctx.pod_expectations.creating(&uid, attempt, &pod_name, Instant::now());
        let params = PostParams { field_manager: Some(ctx.settings.field_manager.clone()), ..PostParams::default() };
        match super::metadata_answers::create(&api, &params, &pod).await {
            Ok(_) => {
                ctx.metrics.pods_created.inc();
                tracing::info!(job = %name, %namespace, pod = %pod_name, attempt, "created agent Pod");
            }
            // Created by an earlier reconcile whose status write or cache update we have not seen
            // yet, unless another job's Pod has the same name (job `a-b` + agent `c` and job `a` +
            // agent `b-c`): that one is not ours to adopt.
            // Ours means controlled by this job: a Pod pre-created with the name and the job's
            // labels is someone else's and is never adopted (tests/gate_attacks.rs).
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let holder = api.get_opt(&pod_name).await.map_err(|source| ApplyError::GetTakenPod {
                    namespace: namespace.clone(),
                    pod: pod_name.clone(),
                    source,
                })?;
                if holder.as_ref().is_none_or(|p| !snapshot::is_job_pod(p, &namespace, &uid)) {
                    ctx.pod_expectations.observed(&uid, &pod_name);
                }
                if holder.as_ref().is_some_and(|p| !snapshot::is_job_pod(p, &namespace, &uid)) {
                    return Err(ApplyError::PodNameTaken { pod: pod_name }.into());
                }
            }
            // Not expected after any other failure, a timeout included (it may or may not have
            // been created): status records an attempt on the strength of its expectation, and
            // a recorded Pod missing from the API fails its attempt as deleted.
            Err(source) => {
                ctx.pod_expectations.observed(&uid, &pod_name);
                return Err(ApplyError::CreatePod { namespace: namespace.clone(), pod: pod_name, source }.into());
            }
        }
    }
    Ok(())
}
