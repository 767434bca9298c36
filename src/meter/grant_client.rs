//! The meter's side of the operator's meter API (controller/meter_api.rs): it draws its job's
//! budget in chunks, reports its measured usage while the agent runs, and settles when it exits.
//!
//! Every request of a meter process is one numbered step of one session (`session`, `sequence`):
//! the operator applies each step once, and answers a repeated one with the state it already
//! produced, so a retry after a lost answer never grants or counts twice. The meter sets its
//! budget to the session's granted total the operator answers, never adds to it. Steps are sent
//! one at a time (a lock), so they arrive in order.
//!
//! The operator unreachable: the meter keeps serving within what it holds, and refuses calls that
//! would need more with 402 (fail closed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};

use super::budget::Ledger;
use super::proxy::HttpsClient;
use super::state_file::StateFile;
use crate::domain::grants::{SyncAnswer, SyncBody};
use crate::domain::money::MicroUsd;

/// One try of one step; a step is retried while the operator answers 503 or cannot be reached.
const TRY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call that needs more budget waits for it before it is refused.
const TOP_UP_DEADLINE: Duration = Duration::from_secs(8);
/// How long the meter, exiting, tries to settle (within the Pod's default 30 s grace period).
const SETTLE_DEADLINE: Duration = Duration::from_secs(20);
/// After the operator answered that the job's budget has nothing left, calls that need more are
/// refused without asking again for this long: an agent that ignores 402 and keeps calling costs
/// no status write per call (tests/meter_grants.rs
/// an_agent_ignoring_402_spends_nothing_more_and_writes_status_at_a_bounded_rate). Budget can
/// come back (another meter settles, the budget is raised), so the operator is asked again after.
const EXHAUSTED_RECHECK: Duration = Duration::from_secs(5);

pub struct GrantClient {
    sync_url: String,
    token_file: PathBuf,
    client: HttpsClient,
    ledger: Arc<Ledger>,
    /// What a meter asks for at least when it needs more.
    pub chunk: MicroUsd,
    session: String,
    /// The last sequence number used; held for the whole of a step so steps go one at a time.
    sequence: tokio::sync::Mutex<i64>,
    /// When the operator last answered that the job's budget has nothing left to grant.
    exhausted_at: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Written before each step goes out (state_file.rs).
    state: Option<Arc<StateFile>>,
}

/// The session a meter process speaks for: a new one, or the one the Pod's previous meter
/// process left in its state file (state_file.rs), continued after its last sequence number.
pub struct Resume {
    pub session: String,
    pub sequence: i64,
    pub state: Option<Arc<StateFile>>,
}

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("the operator refused ({status}): {body}")]
    Refused { status: StatusCode, body: String },
    #[error("the operator could not be reached: {0}")]
    Unreachable(String),
    #[error("reading the meter token {path}: {kind}")]
    Token { path: String, kind: std::io::ErrorKind },
}

/// 128 random bits in hex, from the system's generator; the clock and process id should it fail
/// (a meter that cannot start a session cannot meter).
pub fn new_session_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        return format!("{nanos:x}-{:x}", std::process::id());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl GrantClient {
    /// Speaks for `resume`'s session. A new session's id is unique per meter process
    /// ([`new_session_id`]); a restarted meter container carries on its Pod's session only
    /// through the state file, never otherwise, so an old session's grant is never mistaken for
    /// a new one's. Random and never shown (status keeps a digest, domain/grants.rs
    /// `session_key`): whoever knows it may speak for the session with a token minted for this Pod.
    pub fn new(
        grant_url: &str,
        token_file: PathBuf,
        client: HttpsClient,
        ledger: Arc<Ledger>,
        chunk: MicroUsd,
        resume: Resume,
    ) -> Arc<GrantClient> {
        Arc::new(GrantClient {
            sync_url: format!("{}/v1/sync", grant_url.trim_end_matches('/')),
            token_file,
            client,
            ledger,
            chunk,
            session: resume.session,
            sequence: tokio::sync::Mutex::new(resume.sequence),
            exhausted_at: std::sync::Mutex::new(None),
            state: resume.state,
        })
    }

    /// The session's id (secret: whoever knows it may speak for the session).
    pub fn session(&self) -> &str {
        &self.session
    }

    /// Asks for `want` more and raises the ledger's budget to what the session holds then. Ok
    /// means the operator answered (or answered lately that nothing is left): what it did not
    /// grant, the job's budget does not have.
    pub async fn top_up(&self, want: MicroUsd) -> Result<(), GrantError> {
        let exhausted = *self.exhausted_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if exhausted.is_some_and(|at| at.elapsed() < EXHAUSTED_RECHECK) {
            return Ok(());
        }
        self.step(want, false, TOP_UP_DEADLINE).await.map(|_| ())
    }

    /// Reports the usage so far (no grant asked).
    pub async fn report(&self) -> Result<MicroUsd, GrantError> {
        self.step(MicroUsd(0), false, TRY_TIMEOUT * 2).await
    }

    /// The last step: final usage, and the unspent grant goes back to the job. A meter that never
    /// spoke to the operator (its agent made no call) has nothing to settle: no status write.
    pub async fn settle(&self) -> Result<MicroUsd, GrantError> {
        let snapshot = self.ledger.snapshot();
        if *self.sequence.lock().await == 0 && snapshot.usage.models.is_empty() && snapshot.budget_refusals == 0 {
            return Ok(MicroUsd(0));
        }
        self.step(MicroUsd(0), true, SETTLE_DEADLINE).await
    }

    async fn step(&self, want: MicroUsd, last: bool, deadline: Duration) -> Result<MicroUsd, GrantError> {
        let mut sequence = self.sequence.lock().await;
        *sequence += 1;
        // Read under the lock: this step's usage is at least the previous step's.
        let snapshot = self.ledger.snapshot();
        // On disk before it goes out, with figures read after these: a restarted process never
        // resumes behind what the operator heard, nor reuses this number (state_file.rs).
        if let Some(state) = &self.state {
            let (state, ledger, number) = (state.clone(), self.ledger.clone(), *sequence);
            let written = tokio::task::spawn_blocking(move || state.before_step(&ledger, number, last)).await;
            // Failed, the file is gone (state_file.rs): the step still goes out.
            if let Err(e) = written.map_err(std::io::Error::other).and_then(|w| w) {
                tracing::warn!(error = %e, "writing the meter's state file before a step");
            }
        }
        let body = SyncBody {
            pod: None,
            session: self.session.clone(),
            sequence: *sequence,
            usage: snapshot.usage,
            want_usd: (want.0 > 0).then(|| want.to_string()),
            last,
            budget_refusals: i64::try_from(snapshot.budget_refusals).unwrap_or(i64::MAX),
        };
        let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match tokio::time::timeout(TRY_TIMEOUT, self.send(body.clone())).await {
                Ok(Ok(answer)) => {
                    let granted = MicroUsd::parse(&answer.granted_usd).unwrap_or_default();
                    self.ledger.raise_budget(granted);
                    if let Some(state) = &self.state {
                        state.granted(granted);
                    }
                    let nothing_left = MicroUsd::parse(&answer.available_usd).is_some_and(|a| a.0 <= 0);
                    *self.exhausted_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        nothing_left.then(tokio::time::Instant::now);
                    return Ok(granted);
                }
                Ok(Err(e @ (GrantError::Refused { .. } | GrantError::Token { .. }))) if !retryable(&e) => return Err(e),
                Ok(Err(e)) if started.elapsed() + pause >= deadline => return Err(e),
                Err(_) if started.elapsed() + pause >= deadline => {
                    return Err(GrantError::Unreachable(format!("no answer within {TRY_TIMEOUT:?}")));
                }
                _ => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    async fn send(&self, body: Bytes) -> Result<SyncAnswer, GrantError> {
        // Read on every request: the kubelet rotates the projected token.
        let path = self.token_file.clone();
        let token = tokio::task::spawn_blocking(move || std::fs::read_to_string(&path))
            .await
            .map_err(|e| GrantError::Unreachable(e.to_string()))?
            .map_err(|e| GrantError::Token { path: self.token_file.display().to_string(), kind: e.kind() })?;
        let mut authorization = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| GrantError::Token { path: self.token_file.display().to_string(), kind: std::io::ErrorKind::InvalidData })?;
        authorization.set_sensitive(true);
        let request = hyper::Request::post(&self.sync_url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::AUTHORIZATION, authorization)
            .body(Full::new(body))
            .map_err(|e| GrantError::Unreachable(e.to_string()))?;
        let response = self.client.request(request).await.map_err(|e| GrantError::Unreachable(causes(&e)))?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| GrantError::Unreachable(e.to_string()))?.to_bytes();
        if !status.is_success() {
            let body = String::from_utf8_lossy(&bytes).chars().take(512).collect();
            return Err(GrantError::Refused { status, body });
        }
        serde_json::from_slice(&bytes).map_err(|e| GrantError::Unreachable(format!("an answer that is not the meter API's: {e}")))
    }
}

/// HTTPS to the meter API, trusting exactly the CA in `ca_pem` (the operator's, handed to the
/// meter at Pod creation): a server whose certificate does not chain to it, or does not name the
/// grant URL's host, is refused, and so is plain HTTP (tests/meter_grants.rs).
pub fn pinned_client(ca_pem: &[u8]) -> anyhow::Result<HttpsClient> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.map_err(|e| anyhow::anyhow!("the meter API's CA certificate: {e}"))?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "the meter API's CA certificate: no CA certificate in the PEM given");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only().enable_http1().build();
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

/// An error with its causes: "client error (Connect)" alone would hide a refused certificate.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

fn retryable(e: &GrantError) -> bool {
    match e {
        // A standby replica, an apiserver hiccup, a status write that kept conflicting.
        GrantError::Refused { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE || *status == StatusCode::BAD_GATEWAY,
        GrantError::Unreachable(_) => true,
        // The kubelet may not have written the token yet when the meter starts.
        GrantError::Token { kind, .. } => *kind == std::io::ErrorKind::NotFound,
    }
}

/// Reports the usage every `interval` while it changes: the job's status is written at most that
/// often per meter (and once more when it settles).
pub async fn report_usage(grants: Arc<GrantClient>, interval: Duration) {
    let mut last_sent = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // The refusals too: the operator ends the job BudgetExhausted on them.
        let snapshot = grants.ledger.snapshot();
        let sent = (snapshot.usage, snapshot.budget_refusals);
        if last_sent.as_ref() == Some(&sent) || (last_sent.is_none() && sent.0.models.is_empty() && sent.1 == 0) {
            continue;
        }
        match grants.report().await {
            Ok(_) => last_sent = Some(sent),
            Err(e) => tracing::warn!(error = %e, "reporting usage to the operator; retried at the next interval"),
        }
    }
}
