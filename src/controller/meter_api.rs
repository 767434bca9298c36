//! The meter API: agent meters draw their job's budget and report their measured usage here
//! (`POST /v1/sync`, on its own listener, `--meter-api-listen`). The arithmetic is
//! domain/grants.rs; this is authentication and the status write.
//!
//! Who may call: only the meter of an agent Pod, for that Pod's job. The meter presents a
//! projected ServiceAccount token with audience [`AUDIENCE`] that the kubelet binds to its Pod;
//! the operator verifies it with a TokenReview (controller/meter_auth.rs, which also bounds what
//! a flood can cost), reads the Pod name and uid the apiserver bound it to, and serves it only if
//! that Pod still exists with that uid and is controlled by an AgentJob (the rule of
//! domain/snapshot.rs `is_job_pod`). Everything else is refused, with the reason in the answer
//! and in `agentgate_meter_api_requests{outcome}`.
//!
//! A grant is in the job's status (a resourceVersion-checked PUT of the status read just before)
//! before the meter hears of it, so total grants never exceed the budget, whichever replica
//! answers and however many times the operator restarts (tests/meter_grants.rs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

use super::meter_auth::{Authenticator, Reviewed};
use super::meter_conn::Peer;
use crate::api::AgentJob;
use crate::domain::grants::{self, MeterIdentity, SyncAnswer, SyncBody};
use crate::domain::money::MicroUsd;
use crate::domain::pod_builder::LABEL_ATTEMPT;
use crate::metrics::Metrics;
use crate::state::Health;

pub use super::meter_auth::AUDIENCE;
/// Pods whose refused terms are remembered for [`MeterApi::warn_once`].
const WARNED_CAP: usize = 4096;
/// A sync body holds at most 64 models of 128-character names: ~30 KB.
const MAX_BODY_BYTES: usize = 256 * 1024;
/// A request's body must arrive within this once its head has (a meter sends both at once).
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Status writes refused for a newer resourceVersion (the controller or another meter wrote
/// first) are retried on a fresh read this many times.
const WRITE_ATTEMPTS: usize = 10;

pub struct MeterApi {
    pub client: Client,
    /// The namespace the operator watches, if only one: Pods elsewhere are not its business.
    pub namespace: Option<String>,
    pub field_manager: String,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    auth: Authenticator,
    events: super::events::EventQueue,
    /// Pods (by uid) whose refused terms have had their Warning Event: their meter asks again
    /// at every call, the job gets one Event.
    warned: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A refusal: its HTTP status, a stable reason (the metric's label) and a message. `quiet` ones
/// (a token refused on its shape alone, or a token's earlier refusal given again) are counted,
/// not logged: a flood of junk tokens would otherwise be a log line per request.
#[derive(Clone, Debug)]
pub(super) struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: String,
    pub quiet: bool,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, axum::Json(serde_json::json!({"error": {"reason": self.reason, "message": self.message}}))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Not leading, or shedding load (controller/meter_auth.rs): the meter retries 503.
            response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            // The retry must be free to reach another replica: the Service picks one per
            // connection, and a kept-alive connection to a standby would be asked again and
            // again (tests/in_cluster.rs a_metered_job_draws_its_budget_from_the_meter_api_by_service_name
            // saw a meter refused by the standby until its agent gave up).
            response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        response
    }
}

pub(super) fn refuse(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { status, reason, message: message.into(), quiet: false }
}

impl MeterApi {
    pub fn new(
        client: Client,
        namespace: Option<String>,
        field_manager: String,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> Arc<MeterApi> {
        let publisher = super::events::Publisher::new(client.clone(), "agentgate", std::env::var("POD_NAME").ok());
        let events = super::events::EventQueue::start(publisher);
        Arc::new(MeterApi {
            auth: Authenticator::new(client.clone(), health.clone()),
            client,
            namespace,
            field_manager,
            health,
            metrics,
            events,
            warned: Default::default(),
        })
    }

    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new().route("/v1/sync", axum::routing::post(sync)).with_state(self)
    }

    /// The Pod the token is bound to, if it still exists as that Pod and is an agent Pod: its
    /// identity, job name, job uid and the budget it was built with (domain/grants.rs
    /// `pod_terms`; a Pod without it gets nothing, with a Warning Event on the job).
    async fn agent_pod(&self, who: &Reviewed) -> Result<(MeterIdentity, String, String, MicroUsd), Refusal> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), &who.namespace)
            .get_opt(&who.pod)
            .await
            .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, "lookup_failed", format!("reading Pod {}: {e}", who.pod)))?
            .ok_or_else(|| refuse(StatusCode::FORBIDDEN, "pod_gone", format!("Pod {}/{} no longer exists", who.namespace, who.pod)))?;
        if pod.metadata.uid.as_deref() != Some(who.pod_uid.as_str()) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "pod_gone",
                format!("Pod {}/{} the token was bound to was replaced", who.namespace, who.pod),
            ));
        }
        let not_agent = || {
            refuse(StatusCode::FORBIDDEN, "not_an_agent_pod", format!("Pod {}/{} is not controlled by an AgentJob", who.namespace, who.pod))
        };
        let job_uid = crate::domain::snapshot::pod_controller_job_uid(&pod).ok_or_else(not_agent)?.to_string();
        let job = pod.owner_references().iter().find(|o| o.uid == job_uid).map(|o| o.name.clone()).ok_or_else(not_agent)?;
        let attempt = pod.labels().get(LABEL_ATTEMPT).and_then(|a| a.parse::<i32>().ok()).filter(|a| *a >= 1).ok_or_else(not_agent)?;
        let terms = grants::pod_terms(&pod, attempt).map_err(|why| {
            let note = format!("the meter of Pod {}/{} gets no budget: {why}", who.namespace, who.pod);
            self.warn_once(&who.pod_uid, &who.namespace, &job, &job_uid, &note);
            refuse(StatusCode::FORBIDDEN, why.reason(), note)
        })?;
        Ok((MeterIdentity { pod: who.pod.clone(), pod_uid: who.pod_uid.clone(), attempt: terms.attempt }, job, job_uid, terms.budget))
    }

    /// A `MeterPodRefused` Warning Event on the job, the first time this Pod is refused so.
    fn warn_once(&self, pod_uid: &str, namespace: &str, job: &str, job_uid: &str, note: &str) {
        {
            let mut warned = self.warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if warned.len() >= WARNED_CAP {
                warned.clear();
            }
            if !warned.insert(pod_uid.to_string()) {
                return;
            }
        }
        let regarding = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(<AgentJob as kube::Resource>::api_version(&()).into_owned()),
            kind: Some(<AgentJob as kube::Resource>::kind(&()).into_owned()),
            namespace: Some(namespace.to_string()),
            name: Some(job.to_string()),
            uid: Some(job_uid.to_string()),
            ..Default::default()
        };
        self.events.try_record(&regarding, kube::runtime::events::EventType::Warning, "MeterPodRefused", note.to_string(), "GrantBudget");
    }

    async fn handle(&self, peer: std::net::IpAddr, headers: &HeaderMap, body: Body) -> Result<SyncAnswer, Refusal> {
        if !self.health.leading.load(Ordering::Relaxed) {
            // The meter retries: another replica leads, or this one will.
            return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "not_leader", "this operator replica is standing by; retry"));
        }
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "no_token", "a meter token is required as Authorization: Bearer"))?;
        let admitted = self.auth.admit(token, self.namespace.as_deref(), peer).await?;
        let who = &admitted.who;
        if let Some(ns) = &self.namespace
            && *ns != who.namespace
        {
            return Err(refuse(StatusCode::FORBIDDEN, "namespace_not_watched", format!("this operator serves namespace {ns} only")));
        }
        let body = read_body(body).await?;
        let body: SyncBody = serde_json::from_slice(&body)
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, "bad_request", crate::domain::validate::bounded(&e.to_string())))?;
        if let Some(pod) = &body.pod
            && *pod != who.pod
        {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "pod_mismatch",
                format!("the token is Pod {}'s; the request speaks for Pod {pod}", who.pod),
            ));
        }
        let request = body.request().map_err(|why| refuse(StatusCode::BAD_REQUEST, "bad_request", why))?;
        let (identity, job_name, job_uid, approved_budget) = self.agent_pod(who).await.inspect_err(|refusal| {
            // Decided by the token's Pod alone: the next request with this token is refused
            // without the Pod lookup.
            if matches!(refusal.reason, "pod_gone" | "not_an_agent_pod") {
                self.auth.remember_rejected(admitted.digest, refusal);
            }
        })?;
        let jobs: Api<AgentJob> = Api::namespaced(self.client.clone(), &who.namespace);
        for _ in 0..WRITE_ATTEMPTS {
            // A list narrowed to the one name rather than a GET: the operator's rights on jobs
            // stay list and watch (charts/agentgate/templates/clusterrole.yaml), and the list is
            // served from etcd like a GET, at its current resourceVersion.
            let job = jobs
                .list(&ListParams::default().fields(&format!("metadata.name={job_name}")))
                .await
                .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, "lookup_failed", format!("reading job {job_name}: {e}")))?
                .items
                .into_iter()
                .find(|j| j.metadata.uid.as_deref() == Some(job_uid.as_str()))
                .ok_or_else(|| refuse(StatusCode::FORBIDDEN, "job_gone", format!("the job of Pod {} no longer exists", who.pod)))?;
            let Some(budget) = MicroUsd::parse(&job.spec.budget.max_cost_usd) else {
                return Err(refuse(StatusCode::CONFLICT, "bad_budget", "the job's budget.maxCostUSD is not a USD amount"));
            };
            // The spec may be a newer generation than the Pod's attempt runs, which nobody has
            // approved: its budget may lower what the attempt draws on, never raise it
            // (tests/meter_grants.rs raising_the_budget_while_an_attempt_runs_grants_it_nothing_more).
            let budget = approved_budget.min(budget);
            let mut status = job.status.clone().unwrap_or_default();
            if grants::attempt_settled(&status, identity.attempt) {
                return Err(refuse(
                    StatusCode::CONFLICT,
                    "attempt_ended",
                    format!("attempt {} of job {job_name} has ended and its usage is final: it takes no grant or report", identity.attempt),
                ));
            }
            let open = !status.phase.is_some_and(crate::api::JobPhase::is_terminal);
            let mut meter = status.meter.take().unwrap_or_default();
            let reply = grants::apply(&mut meter, budget, &identity, &request, open).map_err(|e| {
                let reason = match e {
                    grants::SyncError::BadUsage(_) => "bad_usage",
                    grants::SyncError::SessionOfAnotherPod(_) => "session_of_another_pod",
                    _ => "session_refused",
                };
                refuse(StatusCode::CONFLICT, reason, e.to_string())
            })?;
            let answer = SyncAnswer { granted_usd: reply.granted.to_string(), available_usd: reply.available.to_string() };
            if !reply.changed {
                return Ok(answer);
            }
            status.meter = Some(meter);
            match self.write_status(&job, &status).await {
                Ok(()) => {
                    if reply.granted_now.0 > 0 {
                        tracing::info!(job = %job_name, namespace = %who.namespace, pod = %who.pod, granted = %reply.granted_now, "granted meter budget");
                    }
                    return Ok(answer);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "write_failed", format!("recording the grant: {e}"))),
            }
        }
        Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "write_conflict", "the job's status kept changing; retry"))
    }

    /// PUT of the whole status with the resourceVersion it was read at (as agent_job.rs
    /// `write_status`): a grant decided on a stale read is refused, never written.
    async fn write_status(&self, job: &AgentJob, status: &crate::api::AgentJobStatus) -> Result<(), kube::Error> {
        let resource = ApiResource::erase::<AgentJob>(&());
        let namespace = job.namespace().unwrap_or_default();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &namespace, &resource);
        let mut body = DynamicObject::new(&job.name_any(), &resource).within(&namespace);
        body.metadata.resource_version = job.resource_version();
        body.metadata.uid = job.metadata.uid.clone();
        body.data = serde_json::json!({ "status": status });
        let params = PostParams { field_manager: Some(self.field_manager.clone()), ..PostParams::default() };
        let request = kube::core::Request::new(api.resource_url())
            .replace_subresource("status", &job.name_any(), &params, serde_json::to_vec(&body).map_err(kube::Error::SerdeError)?)
            .map_err(kube::Error::BuildRequest)?;
        let _: super::decode::Decoded<kube::core::PartialObjectMeta<AgentJob>> = self.client.request(request).await?;
        Ok(())
    }
}

/// The request's body, at most [`MAX_BODY_BYTES`], read only once its token is admitted: with
/// axum's `Bytes` extractor every body (up to 2 MiB) was read before the token was looked at,
/// from anyone, and held for as long as its client trickled the rest (tests/meter_api_flood.rs
/// unfinished_heads_and_bodies_from_many_pods_cannot_fill_the_operators_memory). Admitted
/// requests are few (meter_auth.rs), so bodies held at once are bounded too.
async fn read_body(body: Body) -> Result<Bytes, Refusal> {
    use http_body_util::BodyExt;
    let too_large = || refuse(StatusCode::PAYLOAD_TOO_LARGE, "bad_request", "request too large");
    match tokio::time::timeout(BODY_READ_TIMEOUT, http_body_util::Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(refuse(StatusCode::BAD_REQUEST, "bad_request", format!("reading the request: {e}"))),
        Err(_) => Err(refuse(StatusCode::REQUEST_TIMEOUT, "bad_request", "the request body did not arrive in time")),
    }
}

async fn sync(State(api): State<Arc<MeterApi>>, ConnectInfo(Peer(peer)): ConnectInfo<Peer>, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    // A body declared too large is refused before anything else (it is never read).
    let declared = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        api.metrics.count_meter_api("bad_request");
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "bad_request", "request too large").into_response();
    }
    match api.handle(peer.ip(), &parts.headers, body).await {
        Ok(answer) => {
            api.metrics.count_meter_api("ok");
            axum::Json(answer).into_response()
        }
        Err(refusal) => {
            // Neither load shedding nor a token's refusal given again is news.
            if refusal.status != StatusCode::SERVICE_UNAVAILABLE && !refusal.quiet {
                tracing::warn!(reason = refusal.reason, message = %refusal.message, "refused a meter request");
            }
            api.metrics.count_meter_api(refusal.reason);
            refusal.into_response()
        }
    }
}

/// Serves the meter API until `shutdown` resolves: over HTTPS with `tls`
/// (controller/meter_tls.rs), else plain HTTP (`--meter-api-tls off`, for development).
pub async fn serve(
    listen: SocketAddr,
    api: Arc<MeterApi>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("meter API: listening on {listen}: {e}"))?;
    tracing::info!(listen = %listener.local_addr()?, tls = tls.is_some(), "meter API ready");
    match tls {
        Some(acceptor) => {
            let listener = super::meter_tls::TlsListener::new(listener, acceptor, api.metrics.clone())?;
            super::meter_conn::serve(listener, api.router(), shutdown).await;
        }
        None => {
            let listener = super::meter_conn::BoundedTcpListener::new(listener, Some(api.metrics.clone()));
            super::meter_conn::serve(listener, api.router(), shutdown).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_refusal_closes_the_connection_so_that_the_retry_may_reach_another_replica() {
        let standby = refuse(StatusCode::SERVICE_UNAVAILABLE, "not_leader", "standing by").into_response();
        assert_eq!(standby.headers().get(http::header::CONNECTION).and_then(|v| v.to_str().ok()), Some("close"));
        assert_eq!(standby.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("1"));
        // A final answer keeps the connection: the meter's next request goes to the same leader.
        let refused = refuse(StatusCode::FORBIDDEN, "pod_mismatch", "another Pod").into_response();
        assert!(refused.headers().get(http::header::CONNECTION).is_none());
    }
}
