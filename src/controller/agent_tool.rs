//! AgentTool reconciler: is the tool reachable, are its credentials there, how much of its rate
//! limit do running jobs claim.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::discovery::{DISCOVERED, DISCOVERED_FROM, DISCOVERY_CONFLICT, DISCOVERY_ERROR};
use super::error::ToolError;
use super::snapshot::rate_limit_claims;
use super::{Caches, Context, Error, RESYNC, Result, UNSYNCED_RETRY};
use crate::api::{AgentTool, AgentToolStatus};
use crate::domain::conditions::{remove_condition, set_condition};

/// Changes to Secrets reach the tools naming them through a watch of Secrets' metadata
/// (`tools_using_secret`). Only while that watch cannot run (RBAC grants `get` on Secrets but not
/// `list`/`watch`, for instance with the chart's `rbac.secrets.namespaces`) are tools with
/// credentials looked at again on this period instead.
const CREDENTIALS_RECHECK: Duration = Duration::from_secs(30);

/// Whether the watch of Secrets' metadata is running: set once it has listed every Secret,
/// cleared when it fails.
#[derive(Default)]
pub struct SecretWatch {
    watching: AtomicBool,
    warned: AtomicBool,
}

impl SecretWatch {
    pub fn is_watching(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }

    /// Follows the watch's events; says once why it fails.
    pub fn observe<K>(&self, event: &std::result::Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>) {
        match event {
            Ok(kube::runtime::watcher::Event::InitDone) => {
                if !self.watching.swap(true, Ordering::Relaxed) {
                    tracing::info!("watching Secrets' metadata: credentials are re-checked when their Secret changes");
                }
                self.warned.store(false, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(error) => {
                self.watching.store(false, Ordering::Relaxed);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "cannot watch Secrets' metadata; re-checking tool credentials every {}s instead", CREDENTIALS_RECHECK.as_secs());
                }
            }
        }
    }
}

pub async fn reconcile(tool: Arc<AgentTool>, ctx: Arc<Context>) -> Result<Action> {
    let result = reconcile_inner(&tool, &ctx).await;
    ctx.metrics.count_reconcile("AgentTool", result.as_ref().map(|_| ()).map_err(Error::metric_label));
    result
}

pub fn error_policy(tool: Arc<AgentTool>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(tool = %tool.name_any(), error = error.metric_label(), "reconcile failed: {error}");
    Action::requeue(Duration::from_secs(5))
}

struct EndpointCheck {
    available: bool,
    reason: &'static str,
    message: String,
    ready_endpoints: i32,
    url: Option<String>,
}

fn check_endpoint(tool: &AgentTool, caches: &Caches) -> EndpointCheck {
    if let Some(url) = &tool.spec.endpoint.url {
        return EndpointCheck {
            available: true,
            reason: "URL",
            message: format!("calls go to {url}"),
            ready_endpoints: 1,
            url: Some(url.clone()),
        };
    }
    let Some(svc_ref) = &tool.spec.endpoint.service else {
        return EndpointCheck {
            available: false,
            reason: "NoEndpoint",
            message: "endpoint names neither service nor url".into(),
            ready_endpoints: 0,
            url: None,
        };
    };
    let (ns, name, port) = (&svc_ref.namespace, &svc_ref.name, svc_ref.port);
    let Some(service) = caches.services.get(&ObjectRef::new(name).within(ns)) else {
        return EndpointCheck {
            available: false,
            reason: "ServiceNotFound",
            message: format!("Service {ns}/{name} does not exist"),
            ready_endpoints: 0,
            url: None,
        };
    };
    let has_port = service.spec.as_ref().and_then(|s| s.ports.as_ref()).is_some_and(|ps| ps.iter().any(|p| p.port == port));
    if !has_port {
        return EndpointCheck {
            available: false,
            reason: "PortNotFound",
            message: format!("Service {ns}/{name} has no port {port}"),
            ready_endpoints: 0,
            url: None,
        };
    }
    let slices = caches.endpoint_slices.state();
    let (ready_endpoints, not_ready) = slices
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(ns.as_str()) && s.labels().get("kubernetes.io/service-name") == Some(name))
        .flat_map(|s| s.endpoints.iter().flatten())
        .fold((0usize, 0usize), |(ready, not_ready), e| {
            if e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true) { (ready + 1, not_ready) } else { (ready, not_ready + 1) }
        });
    let url = Some(format!("http://{name}.{ns}.svc:{port}"));
    if ready_endpoints == 0 {
        // Naming the endpoints that exist but are not ready tells `kubectl describe` readers the
        // Service is there and starting, not missing (and gives tests/tools.rs evidence the
        // not-ready endpoint was seen before it asserts the tool stayed unready).
        let starting = if not_ready > 0 { format!(" ({not_ready} not ready)") } else { String::new() };
        return EndpointCheck {
            available: false,
            reason: "NoReadyEndpoints",
            message: format!("Service {ns}/{name} has no ready endpoints{starting}"),
            ready_endpoints: 0,
            url,
        };
    }
    EndpointCheck {
        available: true,
        reason: "EndpointsReady",
        message: format!("Service {ns}/{name} has {ready_endpoints} ready endpoint(s)"),
        ready_endpoints: ready_endpoints as i32,
        url,
    }
}

/// Whether the Secret exists and holds the key. Only the key names are looked at; the value is
/// never read into a variable that outlives this call, logged or written anywhere.
async fn check_credentials(tool: &AgentTool, ctx: &Context) -> Result<Option<(bool, String)>> {
    let Some(creds) = &tool.spec.credentials else { return Ok(None) };
    let r = &creds.secret_ref;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &r.namespace);
    let verdict = match api.get_opt(&r.name).await {
        Ok(None) => (false, format!("Secret {}/{} does not exist", r.namespace, r.name)),
        Ok(Some(secret)) => {
            let has_key = secret.data.as_ref().is_some_and(|d| d.contains_key(&r.key));
            if has_key {
                (true, format!("Secret {}/{} has key {}", r.namespace, r.name, r.key))
            } else {
                (false, format!("Secret {}/{} has no key {}", r.namespace, r.name, r.key))
            }
        }
        Err(kube::Error::Api(s)) if s.code == 403 => (false, format!("the operator may not read Secret {}/{}", r.namespace, r.name)),
        Err(source) => {
            let (tool, namespace, secret) = (tool.name_any(), r.namespace.clone(), r.name.clone());
            return Err(ToolError::GetCredentials { tool, namespace, secret, source }.into());
        }
    };
    Ok(Some(verdict))
}

async fn reconcile_inner(tool: &AgentTool, ctx: &Context) -> Result<Action> {
    if !ctx.caches.synced() {
        return Ok(Action::requeue(UNSYNCED_RETRY));
    }
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let generation = tool.metadata.generation.unwrap_or(1);
    let old = tool.status.clone().unwrap_or_default();
    let discovered = tool.labels().get(DISCOVERED).is_some_and(|v| v == "true");
    let mut s = AgentToolStatus {
        conditions: old.conditions.clone(),
        discovered_from: tool.annotations().get(DISCOVERED_FROM).cloned().filter(|_| discovered),
        ..AgentToolStatus::default()
    };
    // A discovered tool whose Service's annotations are bad is not Ready until they are fixed.
    let discovery_error = tool.annotations().get(DISCOVERY_ERROR).cloned().filter(|_| discovered);
    // Nor while other Services claim its name (discovery.rs: a tool never changes hands by itself).
    let discovery_conflict = tool.annotations().get(DISCOVERY_CONFLICT).cloned().filter(|_| discovered);
    match (&s.discovered_from, &discovery_error) {
        (Some(_), _) if discovery_conflict.is_some() => set_condition(
            &mut s.conditions,
            "Discovered",
            false,
            "ToolNameConflict",
            discovery_conflict.clone().unwrap_or_default(),
            generation,
            &now,
        ),
        (Some(_), Some(error)) => {
            set_condition(&mut s.conditions, "Discovered", false, "InvalidAnnotation", error.clone(), generation, &now)
        }
        (Some(from), None) => {
            set_condition(&mut s.conditions, "Discovered", true, "FromService", format!("discovered from Service {from}"), generation, &now)
        }
        (None, _) => remove_condition(&mut s.conditions, "Discovered"),
    }

    let endpoint = check_endpoint(tool, &ctx.caches);
    set_condition(&mut s.conditions, "EndpointAvailable", endpoint.available, endpoint.reason, endpoint.message.clone(), generation, &now);
    let credentials = check_credentials(tool, ctx).await?;
    match &credentials {
        Some((ok, msg)) => set_condition(
            &mut s.conditions,
            "CredentialsPresent",
            *ok,
            if *ok { "SecretKeyPresent" } else { "SecretKeyMissing" },
            msg.clone(),
            generation,
            &now,
        ),
        None => set_condition(
            &mut s.conditions,
            "CredentialsPresent",
            true,
            "NoneRequired",
            "the tool declares no credentials",
            generation,
            &now,
        ),
    }
    let credentials_ok = credentials.as_ref().is_none_or(|(ok, _)| *ok);
    s.ready = discovery_error.is_none() && discovery_conflict.is_none() && endpoint.available && credentials_ok;
    let ready_message = match (&discovery_error, &credentials, endpoint.available) {
        _ if discovery_conflict.is_some() => discovery_conflict.clone().unwrap_or_default(),
        (Some(error), _, _) => error.clone(),
        (None, _, false) => endpoint.message.clone(),
        (None, Some((false, msg)), true) => msg.clone(),
        _ => endpoint.message.clone(),
    };
    let ready_reason = if discovery_conflict.is_some() {
        "ToolNameConflict"
    } else if discovery_error.is_some() {
        "InvalidAnnotation"
    } else if !endpoint.available {
        endpoint.reason
    } else if !credentials_ok {
        "CredentialsMissing"
    } else {
        "Ready"
    };
    set_condition(&mut s.conditions, "Ready", s.ready, ready_reason, ready_message, generation, &now);
    s.ready_endpoints = endpoint.ready_endpoints;
    s.url = endpoint.url;
    let running: Vec<_> = {
        let keys: Vec<_> = ctx.caches.index.jobs().running_naming(&tool.name_any()).collect();
        keys.iter().filter_map(|key| super::index::cached(&ctx.caches.jobs, key)).collect()
    };
    s.in_use = rate_limit_claims(&running, &tool.name_any(), None).0;
    s.observed_generation = Some(generation);

    if s != old {
        let api: Api<AgentTool> = Api::all(ctx.client.clone());
        let patch = json!({
            "apiVersion": AgentTool::api_version(&()),
            "kind": AgentTool::kind(&()),
            "status": s,
        });
        api.patch_status(&tool.name_any(), &PatchParams::apply(&ctx.settings.field_manager).force(), &Patch::Apply(&patch))
            .await
            .map_err(|source| ToolError::WriteStatus { tool: tool.name_any(), source })?;
    }
    let recheck = tool.spec.credentials.is_some() && !ctx.secret_watch.is_watching();
    Ok(Action::requeue(if recheck { CREDENTIALS_RECHECK } else { RESYNC }))
}

/// Tools whose credentials name this Secret.
pub fn tools_using_secret(caches: &Caches, namespace: &str, secret: &str) -> Vec<ObjectRef<AgentTool>> {
    caches
        .tools
        .state()
        .iter()
        .filter(|t| t.spec.credentials.as_ref().is_some_and(|c| c.secret_ref.namespace == namespace && c.secret_ref.name == secret))
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

pub fn tools_using_service(caches: &Caches, namespace: &str, service: &str) -> Vec<ObjectRef<AgentTool>> {
    caches
        .tools
        .state()
        .iter()
        .filter(|t| t.spec.endpoint.service.as_ref().is_some_and(|s| s.namespace == namespace && s.name == service))
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}
