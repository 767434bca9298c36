//! Connections to the meter API, bounded: any Pod can reach its port, and axum keeps a
//! connection open for as long as its client does (it sets hyper no timer, so no header read
//! timeout applies). Each costs the operator its TLS and HTTP buffers: idle connections opened
//! by the thousand would fill its memory (tests/meter_api_flood.rs
//! idle_connections_from_one_peer_are_bounded_and_a_meter_is_served_meanwhile). So:
//! - at most [`MAX_PER_PEER`] connections per client address and [`MAX_CONNECTIONS`] in all
//!   are open; one beyond is closed at once (a meter uses one or two, and retries);
//! - a connection that neither reads nor writes for [`IDLE_TIMEOUT`] is closed (a meter syncs
//!   every few seconds while it runs);
//! - a connection buffers at most [`MAX_HEAD_BYTES`] of a request head, which must arrive within
//!   [`HEADER_READ_TIMEOUT`] ([`serve`]: under `axum::serve` hyper buffered up to 408 KiB of
//!   each unfinished head, for as long as its client trickled one: tests/meter_api_flood.rs
//!   unfinished_heads_and_bodies_from_many_pods_cannot_fill_the_operators_memory). Bodies are
//!   read only once their token is admitted (meter_api.rs `read_body`).

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

pub const MAX_CONNECTIONS: usize = 1024;
/// Per client address: a Pod's own, or its node's where Pod traffic to Services is masqueraded
/// (then every meter on the node shares it, one connection each).
pub const MAX_PER_PEER: usize = 64;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request head longer than this is answered 431. A meter's is under 2 KiB, its token included.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// A request head must arrive within this, counted from the previous answer on a kept-alive
/// connection (so an idle one is closed then; the meter's client opens another).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Places taken by key, each key up to a cap; a key with none taken holds no entry. Bounds the
/// meter API's connections per client address here and its requests per Pod and namespace
/// (`meter_auth.rs`).
pub(super) struct KeyedLimit<K>(Arc<Mutex<HashMap<K, usize>>>);

impl<K> Clone for KeyedLimit<K> {
    fn clone(&self) -> Self {
        KeyedLimit(self.0.clone())
    }
}

impl<K> Default for KeyedLimit<K> {
    fn default() -> Self {
        KeyedLimit(Arc::default())
    }
}

/// One place under a key, given back on drop.
pub(super) struct KeyedSlot<K: Hash + Eq>(KeyedLimit<K>, K);

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// A place under `key`, or None when it already holds `cap`.
    pub fn take(&self, key: K, cap: usize) -> Option<KeyedSlot<K>> {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(KeyedSlot(self.clone(), key))
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl<K: Hash + Eq> Drop for KeyedSlot<K> {
    fn drop(&mut self) {
        let mut counts = (self.0).0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

/// The connections open now: in all, and per client address.
#[derive(Clone)]
pub struct ConnectionLimits {
    total: Arc<Semaphore>,
    peers: KeyedLimit<IpAddr>,
    /// Where refusals are counted (the meter API's; the metrics port counts none).
    metrics: Option<Arc<Metrics>>,
}

/// One open connection's place, given back when it closes.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _peer: KeyedSlot<IpAddr>,
}

impl ConnectionLimits {
    pub fn new(metrics: Option<Arc<Metrics>>) -> ConnectionLimits {
        ConnectionLimits { total: Arc::new(Semaphore::new(MAX_CONNECTIONS)), peers: KeyedLimit::default(), metrics }
    }

    /// A place for a new connection from `peer`, or None (counted): the caller closes it.
    pub fn admit(&self, peer: SocketAddr) -> Option<Slot> {
        // The peer's place first, then one of everyone's: a peer over its share never holds one.
        let slot = self
            .peers
            .take(peer.ip().to_canonical(), MAX_PER_PEER)
            .and_then(|peer| Some(Slot { _permit: self.total.clone().try_acquire_owned().ok()?, _peer: peer }));
        if slot.is_none()
            && let Some(metrics) = &self.metrics
        {
            metrics.count_meter_api("connection_refused");
        }
        slot
    }
}

/// A connection holding its [`Slot`], closed after [`IDLE_TIMEOUT`] without reading or writing.
pub struct Bounded<S> {
    inner: S,
    _slot: Slot,
    idle: Pin<Box<Sleep>>,
}

impl<S> Bounded<S> {
    pub fn new(inner: S, slot: Slot) -> Bounded<S> {
        Bounded { inner, _slot: slot, idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)) }
    }

    fn active(&mut self) {
        self.idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
    }

    /// Pending I/O: an error once the connection has been idle too long (the timer wakes the
    /// task that waits on it, so a silent client is dropped on time).
    fn pending_or_idle<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "meter API connection idle"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.active();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.pending_or_idle(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(result) => {
                this.active();
                Poll::Ready(result)
            }
            Poll::Pending => this.pending_or_idle(cx),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The plain-HTTP listener (`--meter-api-tls off`, and the metrics port: server.rs), with the
/// same bounds.
pub struct BoundedTcpListener {
    tcp: TcpListener,
    limits: ConnectionLimits,
}

impl BoundedTcpListener {
    pub fn new(tcp: TcpListener, metrics: Option<Arc<Metrics>>) -> BoundedTcpListener {
        BoundedTcpListener { tcp, limits: ConnectionLimits::new(metrics) }
    }
}

/// Where a meter API request came from, for axum's `ConnectInfo` (meter_auth.rs tells a request
/// from the Pod its token claims from one sent from anywhere else).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// Serves `router` on the connections `listener` accepts, over HTTP/1 with the head bounded
/// ([`MAX_HEAD_BYTES`], [`HEADER_READ_TIMEOUT`]; `axum::serve` gives hyper no timer and keeps its
/// 408 KiB buffer), each request carrying its [`Peer`] as `ConnectInfo`. On `shutdown`, stops
/// accepting and lets each connection finish the request it is serving.
pub async fn serve<L>(mut listener: L, router: axum::Router, shutdown: impl Future<Output = ()>)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_HEAD_BYTES);
    // Dropping `stop` tells the connections to close after their request.
    let (stop, stopped) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = tower::ServiceExt::map_request(router.clone(), move |mut request: http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(axum::extract::ConnectInfo(Peer(peer)));
            request
        });
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(io), hyper_util::service::TowerToHyperService::new(service));
        crate::meter::server::spawn_connection(connection, stopped.clone(), ());
    }
    drop(stop);
}

impl axum::serve::Listener for BoundedTcpListener {
    type Io = Bounded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.tcp.accept().await {
                Ok((stream, peer)) => {
                    if let Some(slot) = self.limits.admit(peer) {
                        return (Bounded::new(stream, slot), peer);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "meter API: accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_share_and_gives_it_back() {
        let limits = ConnectionLimits::new(Some(Arc::new(Metrics::default())));
        let (a, b): (SocketAddr, SocketAddr) = ("10.0.0.1:1000".parse().unwrap(), "10.0.0.2:1000".parse().unwrap());
        let held: Vec<Slot> = (0..MAX_PER_PEER).map(|_| limits.admit(a).expect("within the peer's share")).collect();
        assert!(limits.admit(a).is_none(), "one more from the same address is refused");
        assert!(limits.admit(b).is_some(), "another address is not");
        drop(held);
        assert!(limits.admit(a).is_some(), "closed connections give their places back");
        assert!(limits.peers.keys() <= 1, "no entry is kept for a peer with nothing open");
    }
}
