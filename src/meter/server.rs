//! The meter's HTTP server: its router on hyper's HTTP/1 connections, with what `axum::serve`
//! leaves unbounded bounded, since the agent on the other side is the hostile party. Under
//! `axum::serve` each connection could buffer 408 KiB of an unfinished request head, for ever (its
//! header timeout needs a timer axum does not give hyper), and connections were not counted:
//! 200 connections, each sending 400 KB of headers it never finished, took the meter past its
//! container's 64 MiB (tests/meter/test_meter.py
//! test_connections_with_endless_headers_cannot_crash_the_meter).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// What one connection may buffer: a request head larger than this is answered 431. The SDKs'
/// heads are 1–2 KiB; bodies stream through the buffer in reads of at most this.
pub const MAX_CONNECTION_BUFFER: usize = 16 * 1024;
/// Connections served at once: enough for an agent's SDK pools (the OpenAI SDK keeps up to 100
/// idle). More wait in the kernel's backlog until one closes.
pub const MAX_CONNECTIONS: usize = 512;
/// A request head must arrive within this; a connection that trickles one is closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed accept (out of file descriptors), before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Serves `router` until `shutdown` resolves, then lets every connection finish the call it is
/// serving and returns once all have closed (the caller then writes the final figures).
pub async fn serve(listener: TcpListener, router: axum::Router, shutdown: impl Future<Output = ()>) {
    serve_at_most(MAX_CONNECTIONS, listener, router, shutdown).await;
}

/// Drives one connection on a task of its own until it ends or `stopped` says the server is
/// shutting down, then lets it finish the request it is serving; `held` goes with it. The meter's
/// server and the operator's (controller/meter_conn.rs) serve their connections so.
pub(crate) fn spawn_connection<C>(connection: C, mut stopped: watch::Receiver<()>, held: impl Send + 'static)
where
    C: GracefulConnection + Send + 'static,
{
    tokio::spawn(async move {
        let _held = held;
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = stopped.changed() => {}
        }
        connection.as_mut().graceful_shutdown();
        let _ = connection.await;
    });
}

async fn serve_at_most(connections: usize, listener: TcpListener, router: axum::Router, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(connections));
    // Dropping `stop` tells the connections to close after their call; `open` is held by each
    // connection, so its sender sees when the last one has gone.
    let (stop, stopped) = watch::channel(());
    let (open, held) = watch::channel(());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_CONNECTION_BUFFER);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = &mut shutdown => break,
        };
        // The semaphore is never closed.
        let Ok(slot) = slot else { break };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        spawn_connection(connection, stopped.clone(), (slot, held.clone()));
    }
    drop((stop, stopped, held));
    open.closed().await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use std::io::{Read, Write};

    use super::*;

    /// Requests being served, the most ever at once, and the permits that let them finish.
    struct Held {
        now: AtomicUsize,
        most: AtomicUsize,
        started: AtomicUsize,
        release: tokio::sync::Semaphore,
        changed: tokio::sync::Notify,
    }

    #[tokio::test]
    async fn connections_past_the_limit_wait_until_one_closes() {
        let held = Arc::new(Held {
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            release: Semaphore::new(0),
            changed: tokio::sync::Notify::new(),
        });
        let state = held.clone();
        let router = axum::Router::new().route(
            "/hold",
            axum::routing::get(move || {
                let held = state.clone();
                async move {
                    let now = held.now.fetch_add(1, Ordering::SeqCst) + 1;
                    held.most.fetch_max(now, Ordering::SeqCst);
                    held.started.fetch_add(1, Ordering::SeqCst);
                    held.changed.notify_waiters();
                    held.release.acquire().await.expect("never closed").forget();
                    held.now.fetch_sub(1, Ordering::SeqCst);
                    "done"
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_at_most(4, listener, router, async move {
            let _ = stopped.await;
        }));
        // Six clients at once (blocking sockets, on threads of their own), each closing its
        // connection after its answer.
        let clients: Vec<_> = (0..6)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut stream = std::net::TcpStream::connect(address).unwrap();
                    stream.write_all(b"GET /hold HTTP/1.1\r\nhost: meter\r\nconnection: close\r\n\r\n").unwrap();
                    let mut answer = String::new();
                    stream.read_to_string(&mut answer).unwrap();
                    answer
                })
            })
            .collect();
        // Each time four are served, one may finish; until all six have started.
        let mut released = 0;
        while held.started.load(Ordering::SeqCst) < 6 {
            let waiting = held.changed.notified();
            if held.now.load(Ordering::SeqCst) == 4 && released < held.started.load(Ordering::SeqCst) - 3 {
                held.release.add_permits(1);
                released += 1;
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), waiting).await;
        }
        held.release.add_permits(6);
        for client in clients {
            let answer = tokio::task::spawn_blocking(move || client.join().unwrap()).await.unwrap();
            assert!(answer.ends_with("done"), "{answer}");
        }
        assert_eq!(held.most.load(Ordering::SeqCst), 4, "never more than the limit at once, and the limit reached");
        let _ = stop.send(());
        server.await.unwrap();
    }
}
