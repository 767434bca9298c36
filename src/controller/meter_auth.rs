//! Who is calling the meter API, at a cost to the apiserver that a flood cannot grow.
//!
//! Any Pod can reach the meter API's port. Before this, every bearer token it was sent cost a
//! TokenReview, invalid ones again at every request, and requests had no bound: a tenant
//! flooding junk tokens queued every team's meters behind its reviews
//! (tests/meter_api_flood.rs). Now:
//! - a token that is not shaped like a meter's (domain/meter_token.rs `claims`: a JWT for our
//!   audience, not expired, bound to a Pod of a namespace we serve) is refused without a review;
//! - a token that claims a Pod the operator's Pod cache does not hold is refused likewise;
//! - a token the apiserver (or the Pod lookup) rejected is remembered by its SHA-256 for
//!   [`REJECTED_TTL`], a valid one for [`VERIFIED_TTL`], neither as itself;
//! - at most one review per claimed Pod and [`REVIEWS_IN_FLIGHT`] in all run at once, counted
//!   apart for requests from the claimed Pod's own IP and for those from anywhere else: a
//!   tenant's forgeries naming real agent Pods (their names and uids are no secret in their
//!   namespace) come from other addresses, and cannot hold the slots a meter's rotated token
//!   needs (tests/meter_api_flood.rs
//!   `forgeries_naming_a_real_pod_from_elsewhere_cannot_hold_its_meters_reviews`). Where the
//!   network hides Pods' addresses (SNAT, a mesh), every request is "from elsewhere": as before.
//! - and at
//!   most [`REQUESTS_IN_FLIGHT`] requests reach the apiserver at once, of them at most
//!   [`PER_POD_IN_FLIGHT`] of one verified Pod and [`PER_NAMESPACE_IN_FLIGHT`] of one namespace
//!   (a token minted for one's own agent Pod must not take every other team's place): beyond,
//!   the request is shed with 503 and Retry-After (the meter retries 503 for up to 8 s).

use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::meter_api::{Refusal, refuse};
use super::meter_conn::{KeyedLimit, KeyedSlot};
use crate::domain::meter_token::{self, ClaimError, DigestCache, TokenDigest};

/// The audience of the meters' tokens: a token for the apiserver (or anything else) is refused.
pub const AUDIENCE: &str = "agentgate.dev/meter";
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// A verified token is trusted this long (and never past its own expiry) without asking the
/// apiserver again: a deleted Pod is still caught by the Pod lookup on every request, and a
/// meter's token, rotated by the kubelet every few minutes, costs about one review per
/// rotation, so that a flood of forged tokens holding the review slots delays few meters.
const VERIFIED_TTL: Duration = Duration::from_secs(300);
/// A rejected token stays rejected (a bad signature, an expired token or a deleted Pod's never
/// becomes valid); remembered a minute, so a flood of one junk token costs one review a minute.
const REJECTED_TTL: Duration = Duration::from_secs(60);
const CACHE_CAP: usize = 4096;
/// TokenReviews in flight at once, over all claimed Pods.
const REVIEWS_IN_FLIGHT: usize = 8;
/// Requests past the cheap checks (a review, the Pod lookup, the job's read and status write)
/// in flight at once. Meters sync every 5 s and one sync takes a few round trips to the
/// apiserver: a thousand agent Pods need about a tenth of this.
const REQUESTS_IN_FLIGHT: usize = 64;
/// A meter sends one request at a time.
const PER_POD_IN_FLIGHT: usize = 2;
const PER_NAMESPACE_IN_FLIGHT: usize = 16;

/// Who a verified token says the caller is.
#[derive(Clone, Debug)]
pub(super) struct Reviewed {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
}

/// A request let through to the apiserver: who it is, and its place among those in flight.
pub(super) struct Admitted {
    pub who: Reviewed,
    pub digest: TokenDigest,
    _permit: OwnedSemaphorePermit,
    _places: (KeyedSlot<String>, KeyedSlot<String>),
}

pub(super) struct Authenticator {
    client: Client,
    /// Where the current term of leadership's Pod cache is (`Health::agent_pods`).
    health: Arc<crate::state::Health>,
    verified: Mutex<DigestCache<Reviewed>>,
    rejected: Mutex<DigestCache<Refusal>>,
    requests: Arc<Semaphore>,
    /// TokenReviews in flight for requests from the claimed Pod's own address...
    reviews_from_the_pod: Arc<Semaphore>,
    /// ...and for requests from anywhere else.
    reviews_from_elsewhere: Arc<Semaphore>,
    /// Reviews in flight by claimed Pod uid and whether the request came from that Pod.
    reviewing: KeyedLimit<(String, bool)>,
    /// Verified requests in flight, by Pod uid and by namespace.
    serving: KeyedLimit<String>,
}

fn busy(what: &str) -> Refusal {
    refuse(StatusCode::SERVICE_UNAVAILABLE, "busy", format!("the meter API has too many {what} in flight; retry"))
}

impl Authenticator {
    pub fn new(client: Client, health: Arc<crate::state::Health>) -> Authenticator {
        Authenticator {
            client,
            health,
            verified: Mutex::new(DigestCache::new(VERIFIED_TTL, CACHE_CAP)),
            rejected: Mutex::new(DigestCache::new(REJECTED_TTL, CACHE_CAP)),
            requests: Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT)),
            reviews_from_the_pod: Arc::new(Semaphore::new(REVIEWS_IN_FLIGHT)),
            reviews_from_elsewhere: Arc::new(Semaphore::new(REVIEWS_IN_FLIGHT)),
            reviewing: KeyedLimit::default(),
            serving: KeyedLimit::default(),
        }
    }

    /// The caller, if its token is a meter's, of a Pod in `watched` (all namespaces when None),
    /// and there is room for its request, sent from `peer`.
    pub async fn admit(&self, token: &str, watched: Option<&str>, peer: IpAddr) -> Result<Admitted, Refusal> {
        let digest = TokenDigest::of(token);
        if let Some(refusal) = self.rejected.lock().unwrap_or_else(PoisonError::into_inner).get(&digest, Instant::now()) {
            return Err(refusal);
        }
        let now_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let claims = meter_token::claims(token, AUDIENCE, now_unix).map_err(|e| {
            let refusal = match e {
                ClaimError::NotBoundToAPod => refuse(StatusCode::FORBIDDEN, "not_bound_to_a_pod", e.to_string()),
                _ => refuse(StatusCode::UNAUTHORIZED, "token_rejected", e.to_string()),
            };
            Refusal { quiet: true, ..refusal }
        })?;
        if let Some(ns) = watched
            && ns != claims.namespace
        {
            return Err(refuse(StatusCode::FORBIDDEN, "namespace_not_watched", format!("this operator serves namespace {ns} only")));
        }
        let Some(from_the_pod) = self.claimed_agent_pod(&claims, peer) else {
            // Unverified claims of a Pod nobody runs (a forgery with a made-up uid, or a deleted
            // Pod's token) would each cost a review; a Pod created a moment ago that the cache
            // has not seen yet is asked again.
            let refusal = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "pod_unknown",
                format!("Pod {}/{} is not an agent Pod the operator knows (yet); retry", claims.namespace, claims.pod),
            );
            return Err(Refusal { quiet: true, ..refusal });
        };
        let cached = self.verified.lock().unwrap_or_else(PoisonError::into_inner).get(&digest, Instant::now());
        if let Some(who) = cached {
            // The Pod's and namespace's places first: a Pod over its share never holds one of
            // everyone's, even for an instant.
            let places = self.places(&who)?;
            let permit = self.requests.clone().try_acquire_owned().map_err(|_| busy("requests"))?;
            return Ok(Admitted { who, digest, _permit: permit, _places: places });
        }
        let permit = self.requests.clone().try_acquire_owned().map_err(|_| busy("requests"))?;
        let who = {
            let _slot = self.reviewing.take((claims.pod_uid.clone(), from_the_pod), 1).ok_or_else(|| busy("token reviews for this Pod"))?;
            let lane = if from_the_pod { &self.reviews_from_the_pod } else { &self.reviews_from_elsewhere };
            let _review = lane.clone().try_acquire_owned().map_err(|_| busy("token reviews"))?;
            match self.review(token).await {
                Ok(who) => who,
                Err(refusal) => {
                    self.remember_rejected(digest, &refusal);
                    return Err(refusal);
                }
            }
        };
        let left = Duration::from_secs(claims.expires_unix.saturating_sub(now_unix).max(0) as u64);
        self.verified.lock().unwrap_or_else(PoisonError::into_inner).insert_for(digest, who.clone(), Instant::now(), left);
        let places = self.places(&who)?;
        Ok(Admitted { who, digest, _permit: permit, _places: places })
    }

    /// None if the claimed Pod, by name and uid, is not one the operator's Pod cache holds (its
    /// agent Pods and Pods labelled as a job's), else whether `peer` is that Pod's own address
    /// (Some(false) while there is no synced cache to ask).
    fn claimed_agent_pod(&self, claims: &meter_token::Claims, peer: IpAddr) -> Option<bool> {
        use futures::FutureExt;
        let pods = self.health.agent_pods.read().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(pods) = pods.filter(|p| matches!(p.wait_until_ready().now_or_never(), Some(Ok(())))) else { return Some(false) };
        let key = kube::runtime::reflector::ObjectRef::new(&claims.pod).within(&claims.namespace);
        let pod = pods.get(&key).filter(|pod| pod.metadata.uid.as_deref() == Some(claims.pod_uid.as_str()))?;
        let ips = pod.status.as_ref().and_then(|s| s.pod_ips.as_deref()).unwrap_or_default();
        Some(ips.iter().any(|ip| ip.ip.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical() == peer.to_canonical())))
    }

    /// The verified Pod's and its namespace's places among the requests in flight.
    fn places(&self, who: &Reviewed) -> Result<(KeyedSlot<String>, KeyedSlot<String>), Refusal> {
        let pod = self.serving.take(format!("pod/{}", who.pod_uid), PER_POD_IN_FLIGHT).ok_or_else(|| busy("requests of this Pod"))?;
        let namespace = self
            .serving
            .take(format!("namespace/{}", who.namespace), PER_NAMESPACE_IN_FLIGHT)
            .ok_or_else(|| busy("requests of this namespace"))?;
        Ok((pod, namespace))
    }

    /// Remembers a refusal that the token alone decides (not a failure to reach the apiserver).
    pub fn remember_rejected(&self, digest: TokenDigest, refusal: &Refusal) {
        if refusal.status == StatusCode::UNAUTHORIZED || refusal.status == StatusCode::FORBIDDEN {
            let again = Refusal { quiet: true, ..refusal.clone() };
            self.rejected.lock().unwrap_or_else(PoisonError::into_inner).insert(digest, again, Instant::now());
        }
    }

    /// Verifies the token with a TokenReview for [`AUDIENCE`].
    async fn review(&self, token: &str) -> Result<Reviewed, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), audiences: Some(vec![AUDIENCE.to_string()]) },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| refuse(StatusCode::SERVICE_UNAVAILABLE, "review_failed", format!("could not verify the token: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            // The apiserver's own error names the cause (expired, wrong audience, bad signature).
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "token_rejected",
                format!("the token is not valid for audience {AUDIENCE}: {why}"),
            ));
        }
        if !status.audiences.unwrap_or_default().iter().any(|a| a == AUDIENCE) {
            return Err(refuse(StatusCode::UNAUTHORIZED, "wrong_audience", format!("the token is not for audience {AUDIENCE}")));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some(namespace) =
            username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':')).map(|(ns, _)| ns.to_string())
        else {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "not_a_service_account",
                "only the meter of an agent Pod may call (its ServiceAccount token)",
            ));
        };
        let extra = user.extra.unwrap_or_default();
        let single = |key: &str| extra.get(key).and_then(|values| (values.len() == 1).then(|| values[0].clone()));
        let (Some(pod), Some(pod_uid)) = (single(POD_NAME_EXTRA), single(POD_UID_EXTRA)) else {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "not_bound_to_a_pod",
                "the token is not bound to a Pod: the meter's token must be a projected one, which the kubelet binds to its Pod",
            ));
        };
        Ok(Reviewed { namespace, pod, pod_uid })
    }
}
