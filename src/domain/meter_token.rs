//! What the meter API may tell from a bearer token before it asks the apiserver, and what it
//! remembers after (controller/meter_auth.rs).
//!
//! Any Pod can reach the meter API's port, and every token the apiserver had to review cost it
//! a TokenReview: a tenant flooding junk tokens queued every team's meters behind them
//! (tests/meter_api_flood.rs). So a token is first read as what a meter's must be, a projected
//! ServiceAccount JWT for our audience bound to a Pod ([`claims`], unverified: it only decides
//! what is worth reviewing; the TokenReview still decides who the caller is), and tokens are
//! remembered by digest only ([`TokenDigest`]), never as themselves.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// SHA-256 of a bearer token: what the caches key on, so the operator's memory holds no token.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub fn of(token: &str) -> TokenDigest {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        TokenDigest(bytes)
    }
}

/// What a token claims about itself (unverified).
#[derive(Clone, Debug, PartialEq)]
pub struct Claims {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// `exp`, in seconds since the epoch.
    pub expires_unix: i64,
}

/// Why a token is not worth a TokenReview.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ClaimError {
    #[error("the token is not a Kubernetes ServiceAccount token (a JWT)")]
    NotAJwt,
    #[error("the token is not for audience {0}")]
    WrongAudience(String),
    #[error("the token has expired")]
    Expired,
    #[error("the token is not bound to a Pod: the meter's token must be a projected one, which the kubelet binds to its Pod")]
    NotBoundToAPod,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audiences {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Payload {
    aud: Option<Audiences>,
    exp: Option<i64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    pod: Option<PodClaim>,
}

#[derive(Deserialize)]
struct PodClaim {
    name: Option<String>,
    uid: Option<String>,
}

/// A token's own claims, if it has the shape of a meter's: a JWT (header.payload.signature,
/// base64url) for `audience`, not expired at `now_unix` (seconds; a minute's clock skew
/// allowed), naming the namespace, Pod and Pod uid the apiserver bound it to.
pub fn claims(token: &str, audience: &str, now_unix: i64) -> Result<Claims, ClaimError> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(ClaimError::NotAJwt);
    };
    let payload: Payload = base64url(payload).and_then(|bytes| serde_json::from_slice(&bytes).ok()).ok_or(ClaimError::NotAJwt)?;
    let for_us = match &payload.aud {
        Some(Audiences::One(a)) => a == audience,
        Some(Audiences::Many(all)) => all.iter().any(|a| a == audience),
        None => false,
    };
    if !for_us {
        return Err(ClaimError::WrongAudience(audience.to_string()));
    }
    let Some(expires_unix) = payload.exp.filter(|exp| exp + 60 >= now_unix) else {
        return Err(ClaimError::Expired);
    };
    let kubernetes = payload.kubernetes.ok_or(ClaimError::NotBoundToAPod)?;
    let pod = kubernetes.pod.ok_or(ClaimError::NotBoundToAPod)?;
    match (kubernetes.namespace, pod.name, pod.uid) {
        (Some(namespace), Some(pod), Some(pod_uid)) if !namespace.is_empty() && !pod.is_empty() && !pod_uid.is_empty() => {
            Ok(Claims { namespace, pod, pod_uid, expires_unix })
        }
        _ => Err(ClaimError::NotBoundToAPod),
    }
}

/// Unpadded base64url (RFC 4648 §5), as JWTs are encoded; None for anything else.
fn base64url(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    };
    let text = text.trim_end_matches('=').as_bytes();
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        let mut bits = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            bits |= u32::from(value(*c)?) << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// A bounded map from token digests to what the token turned out to be, each entry kept at most
/// `ttl`: at most `cap` entries, the oldest dropped first (so a flood of new entries pushes out
/// old ones, never the whole cache at once).
pub struct DigestCache<V> {
    ttl: Duration,
    cap: usize,
    entries: HashMap<TokenDigest, (V, Instant)>,
    /// Insertion order, each with the expiry it was inserted with.
    order: VecDeque<(TokenDigest, Instant)>,
}

impl<V: Clone> DigestCache<V> {
    pub fn new(ttl: Duration, cap: usize) -> Self {
        DigestCache { ttl, cap: cap.max(1), entries: HashMap::new(), order: VecDeque::new() }
    }

    pub fn get(&self, digest: &TokenDigest, now: Instant) -> Option<V> {
        self.entries.get(digest).filter(|(_, expires)| now < *expires).map(|(v, _)| v.clone())
    }

    pub fn insert(&mut self, digest: TokenDigest, value: V, now: Instant) {
        self.insert_for(digest, value, now, self.ttl);
    }

    /// Kept `for_at_most`, and never beyond the cache's `ttl`.
    pub fn insert_for(&mut self, digest: TokenDigest, value: V, now: Instant, for_at_most: Duration) {
        // Expired entries go first, then the oldest while full. `order` may name an entry since
        // replaced (kept at most `cap` more marks): only the entry inserted with that expiry is
        // removed.
        while let Some((oldest, expires)) = self.order.front().copied() {
            if now < expires && self.entries.len() < self.cap && self.order.len() < 2 * self.cap {
                break;
            }
            self.order.pop_front();
            if self.entries.get(&oldest).is_some_and(|(_, stored)| *stored == expires) {
                self.entries.remove(&oldest);
            }
        }
        let expires = now + for_at_most.min(self.ttl);
        self.entries.insert(digest, (value, expires));
        self.order.push_back((digest, expires));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let mut bits = 0u32;
            for (i, b) in chunk.iter().enumerate() {
                bits |= u32::from(*b) << (16 - 8 * i);
            }
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((bits >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    fn jwt(payload: serde_json::Value) -> String {
        format!("{}.{}.c2lnbmF0dXJl", b64(br#"{"alg":"RS256","kid":"k"}"#), b64(payload.to_string().as_bytes()))
    }

    const NOW: i64 = 1_800_000_000;

    fn meter_payload() -> serde_json::Value {
        serde_json::json!({"aud": ["agentgate.dev/meter"], "exp": NOW + 600, "iat": NOW, "sub": "system:serviceaccount:team-a:default",
            "kubernetes.io": {"namespace": "team-a", "pod": {"name": "job-a-1-agent", "uid": "u-1"}, "serviceaccount": {"name": "default", "uid": "s"}}})
    }

    #[test]
    fn base64url_round_trips_every_length() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64url(&b64(&bytes)), Some(bytes));
        }
        assert_eq!(base64url("a"), None, "one character is no byte");
        assert_eq!(base64url("ab+/"), None, "standard base64 is not base64url");
    }

    #[test]
    fn a_projected_meter_token_names_its_pod() {
        let claims = claims(&jwt(meter_payload()), "agentgate.dev/meter", NOW).unwrap();
        let expected = Claims { namespace: "team-a".into(), pod: "job-a-1-agent".into(), pod_uid: "u-1".into(), expires_unix: NOW + 600 };
        assert_eq!(claims, expected);
        let mut single = meter_payload();
        single["aud"] = "agentgate.dev/meter".into();
        assert!(super::claims(&jwt(single), "agentgate.dev/meter", NOW).is_ok(), "aud may be one string");
    }

    #[test]
    fn junk_other_audiences_expired_and_unbound_tokens_are_not_worth_a_review() {
        let aud = "agentgate.dev/meter";
        for junk in ["", "not-a-token", "a.b", "a.b.c.d", "a.!!!.c", &format!("x.{}.y", b64(b"not json"))] {
            assert_eq!(claims(junk, aud, NOW), Err(ClaimError::NotAJwt), "{junk}");
        }
        let mut other = meter_payload();
        other["aud"] = serde_json::json!(["https://kubernetes.default.svc"]);
        assert!(matches!(claims(&jwt(other), aud, NOW), Err(ClaimError::WrongAudience(_))));
        assert_eq!(claims(&jwt(meter_payload()), aud, NOW + 600 + 61), Err(ClaimError::Expired));
        assert!(claims(&jwt(meter_payload()), aud, NOW + 600 + 59).is_ok(), "a minute's clock skew");
        let mut unbound = meter_payload();
        unbound["kubernetes.io"]["pod"] = serde_json::Value::Null;
        assert_eq!(claims(&jwt(unbound), aud, NOW), Err(ClaimError::NotBoundToAPod));
        let mut no_uid = meter_payload();
        no_uid["kubernetes.io"]["pod"]["uid"] = "".into();
        assert_eq!(claims(&jwt(no_uid), aud, NOW), Err(ClaimError::NotBoundToAPod));
    }

    #[test]
    fn the_cache_keeps_entries_their_ttl_and_drops_the_oldest_when_full() {
        let start = Instant::now();
        let mut cache = DigestCache::new(Duration::from_secs(60), 3);
        for i in 0..5 {
            cache.insert(TokenDigest::of(&format!("t{i}")), i, start + Duration::from_secs(i));
        }
        assert_eq!(cache.len(), 3, "capped");
        let at = start + Duration::from_secs(5);
        assert_eq!(cache.get(&TokenDigest::of("t0"), at), None, "the oldest went first");
        assert_eq!(cache.get(&TokenDigest::of("t4"), at), Some(4));
        assert_eq!(cache.get(&TokenDigest::of("t2"), start + Duration::from_secs(62)), None, "expired");
        // A digest inserted again keeps only its newest entry, and the stale order mark does not
        // remove it.
        cache.insert(TokenDigest::of("t2"), 20, at);
        cache.insert(TokenDigest::of("t5"), 5, at);
        assert_eq!(cache.get(&TokenDigest::of("t2"), at), Some(20));
        assert!(cache.len() <= 3);
        // An entry may be kept less than the cache's TTL, never more.
        cache.insert_for(TokenDigest::of("short"), 6, at, Duration::from_secs(5));
        cache.insert_for(TokenDigest::of("long"), 7, at, Duration::from_secs(600));
        let later = at + Duration::from_secs(10);
        assert_eq!((cache.get(&TokenDigest::of("short"), later), cache.get(&TokenDigest::of("long"), later)), (None, Some(7)));
        assert_eq!(cache.get(&TokenDigest::of("long"), at + Duration::from_secs(61)), None);
    }

    #[test]
    fn the_digest_is_sha256_of_the_token() {
        // sha256("") from coreutils' sha256sum.
        let empty = TokenDigest::of("");
        assert_eq!(empty.0[..4], [0xe3, 0xb0, 0xc4, 0x42]);
        assert_ne!(TokenDigest::of("a"), TokenDigest::of("b"));
    }
}
