//! HTTPS for the meter API: the certificate kept in a Secret of the operator's namespace
//! (domain/meter_tls.rs decides what it holds and when it is renewed), loaded into every replica
//! and reloaded when the Secret changes, and the TLS listener the API serves on.
//!
//! Every replica runs [`MeterTls::keep_fresh`]: it reads the Secret every [`REFRESH`], creates
//! it when missing (POST: only one replica's is stored, the other reads it back) and renews it
//! when due (PUT with the resourceVersion it read: a replica that loses the race reads the
//! winner's). So both replicas serve the same certificate (tests/meter_grants.rs).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{PostParams, ResourceExt};
use kube::{Api, Client};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::meter_conn::{Bounded, ConnectionLimits};
use crate::domain::meter_tls::{self as tls, Material, TlsMode};
use crate::metrics::Metrics;

/// How often each replica re-reads the Secret: a renewal by the other replica, or a new
/// certificate from the admin's issuer, is served within this.
pub const REFRESH: Duration = Duration::from_secs(10);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; further connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;
const ATTEMPTS: usize = 5;

/// The certificate the listener presents, swapped whole when the Secret changes.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

/// The CA certificate the meter API serves under now, for the Pods the operator creates.
#[derive(Clone)]
pub struct LiveCa(pub Arc<MeterTls>);

impl LiveCa {
    pub fn pem(&self) -> String {
        self.0.ca_pem()
    }
}

impl std::fmt::Debug for LiveCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCa").field("secret", &self.0.secret).finish_non_exhaustive()
    }
}

pub struct MeterTls {
    client: Client,
    namespace: String,
    secret: String,
    mode: TlsMode,
    names: Vec<String>,
    current: Arc<Current>,
    loaded: Mutex<Material>,
}

fn certified(material: &Material) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_slice_iter(material.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the meter API certificate ({}): {e}", tls::CERT_KEY))?;
    anyhow::ensure!(!chain.is_empty(), "the meter API certificate ({}) holds no certificate", tls::CERT_KEY);
    let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("the meter API key ({}): {e}", tls::KEY_KEY))?;
    let key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| anyhow::anyhow!("the meter API key ({}): {e}", tls::KEY_KEY))?;
    Ok(Arc::new(CertifiedKey::new(chain, key)))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl MeterTls {
    /// Reads (or creates) the Secret and loads its certificate; retried for 20 s (the apiserver
    /// or a provided Secret may not be there yet), then the operator exits with the reason,
    /// before its liveness probe (35 s) would kill it without one.
    pub async fn start(
        client: Client,
        namespace: String,
        secret: String,
        mode: TlsMode,
        names: Vec<String>,
    ) -> anyhow::Result<Arc<MeterTls>> {
        let mut last = None;
        for attempt in 1..=5 {
            match ensure(&client, &namespace, &secret, mode, &names, None).await {
                Ok(material) => {
                    let current = Arc::new(Current(RwLock::new(certified(&material)?)));
                    tracing::info!(secret = %format!("{namespace}/{secret}"), names = ?material.names, not_after = ?material.not_after, "meter API certificate loaded");
                    let loaded = Mutex::new(material);
                    return Ok(Arc::new(MeterTls { client, namespace, secret, mode, names, current, loaded }));
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "meter API certificate; retrying");
                    last = Some(e);
                    if attempt < 5 {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no meter API certificate")))
    }

    /// The CA certificate (PEM) the meters are given to verify the meter API with.
    pub fn ca_pem(&self) -> String {
        self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).ca_cert_pem.clone()
    }

    /// Re-reads the Secret every [`REFRESH`], renewing it when due, until `shutdown`.
    pub async fn keep_fresh(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(REFRESH) => {}
            }
            let known = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            let material = match ensure(&self.client, &self.namespace, &self.secret, self.mode, &self.names, Some(&known)).await {
                Ok(m) => m,
                Err(e) => {
                    // The certificate in memory stays in use; it is valid for weeks yet.
                    tracing::warn!(error = %e, "refreshing the meter API certificate; the loaded one stays in use");
                    continue;
                }
            };
            if material == known {
                continue;
            }
            match certified(&material) {
                Ok(key) => {
                    if material.ca_cert_pem != known.ca_cert_pem {
                        // Meters of Pods created before trust only the old CA: they fail closed
                        // (within what they were granted) until their Pods are replaced.
                        tracing::warn!(secret = %self.secret, "the meter API's CA changed: agent Pods created from now on get it");
                    }
                    *self.current.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = key;
                    tracing::info!(names = ?material.names, not_after = ?material.not_after, "meter API certificate reloaded");
                    *self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = material;
                }
                Err(e) => tracing::warn!(error = %e, "the meter API Secret's new certificate is unusable; the loaded one stays in use"),
            }
        }
    }

    pub fn acceptor(&self) -> anyhow::Result<TlsAcceptor> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// The Secret's material, created or renewed first when it is the operator's to manage. `known`:
/// what this replica serves, recreated (same CA) if the Secret was deleted, so meters running
/// with that CA keep working.
async fn ensure(
    client: &Client,
    namespace: &str,
    name: &str,
    mode: TlsMode,
    names: &[String],
    known: Option<&Material>,
) -> anyhow::Result<Material> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..ATTEMPTS {
        let found = api.get_opt(name).await?;
        if mode == TlsMode::Provided {
            let secret = found.ok_or_else(|| anyhow::anyhow!("Secret {namespace}/{name} (--meter-api-tls secret) does not exist"))?;
            return tls::from_secret(&secret).map_err(anyhow::Error::msg);
        }
        let now = unix_now();
        let Some(secret) = found else {
            let material = match known {
                Some(k) if k.ca_key_pem.is_some() && tls::renewal_due(k, names, now).is_none() => k.clone(),
                Some(k) if k.ca_key_pem.is_some() => tls::renewed(k, names, now).map_err(anyhow::Error::msg)?,
                _ => tls::fresh(names, now).map_err(anyhow::Error::msg)?,
            };
            match api.create(&PostParams::default(), &tls::to_secret(name, namespace, &material)).await {
                Ok(_) => {
                    tracing::info!(secret = %format!("{namespace}/{name}"), "created the meter API certificate");
                    return Ok(material);
                }
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // Renewed from the Secret's CA, else (a Secret someone emptied) from the CA this replica
        // serves, so running meters keep trusting it; a new CA only when neither has one.
        let renew = |from: Option<&Material>| match from.or(known).filter(|m| m.ca_key_pem.is_some()) {
            Some(m) => tls::renewed(m, names, now),
            None => tls::fresh(names, now),
        };
        let (material, why) = match tls::from_secret(&secret) {
            Ok(m) => match tls::renewal_due(&m, names, now) {
                None => return Ok(m),
                Some(why) if m.ca_key_pem.is_some() => (renew(Some(&m)).map_err(anyhow::Error::msg)?, why),
                Some(why) => (renew(None).map_err(anyhow::Error::msg)?, why),
            },
            Err(why) => (renew(None).map_err(anyhow::Error::msg)?, why),
        };
        let mut replacement = tls::to_secret(name, namespace, &material);
        replacement.metadata.resource_version = secret.resource_version();
        match api.replace(name, &PostParams::default(), &replacement).await {
            Ok(_) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), reason = %why, "renewed the meter API certificate");
                return Ok(material);
            }
            // The other replica renewed it first: use theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("Secret {namespace}/{name} kept changing under the operator")
}

/// Accepts TCP connections and completes their TLS handshakes concurrently (a slow or silent
/// client holds up only itself), handing the finished ones to the server (meter_conn.rs `serve`).
/// Connections are bounded in number and idle time (controller/meter_conn.rs), handshakes
/// under way included.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(Bounded<TlsStream<TcpStream>>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor, metrics: Arc<Metrics>) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let limits = ConnectionLimits::new(Some(metrics.clone()));
        tokio::spawn(async move {
            while !tx.is_closed() {
                let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::debug!(error = %e, "meter API: accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Closed at once when its peer, or everyone, has too many open.
                let Some(slot) = limits.admit(peer) else { continue };
                let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            drop(permit);
                            let _ = tx.send((Bounded::new(tls, slot), peer)).await;
                        }
                        // A client speaking plain HTTP, or one that does not trust the CA.
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "meter API: TLS handshake failed");
                            metrics.count_meter_api("tls_handshake_failed");
                        }
                        Err(_) => metrics.count_meter_api("tls_handshake_failed"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = Bounded<TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
