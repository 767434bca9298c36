//! /healthz, /readyz and /metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::api::JobPhase;
use crate::metrics::{Metrics, PhaseLabels};
use crate::state::{Health, JobsForMetrics};

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    jobs: JobsForMetrics,
}

pub async fn serve(
    addr: SocketAddr,
    debug_memory: bool,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    jobs: JobsForMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app =
        Router::new().route("/healthz", get(|| async { "ok" })).route("/readyz", get(readyz)).route("/metrics", get(metrics_handler));
    if debug_memory {
        app = app.route("/debug/memory", get(memory_handler));
    }
    let app = app.with_state(AppState { metrics, health, jobs });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // The bound address, not the asked one: with port 0 (tests, `make bench`) it names the port.
    let addr = listener.local_addr()?;
    let also = if debug_memory { " and /debug/memory" } else { "" };
    tracing::info!(%addr, "serving /healthz, /readyz, /metrics{also}");
    // Any Pod may reach this port unless a NetworkPolicy narrows it (Prometheus must, and the
    // kubelet's probes): the meter API's bounds on connections and request heads hold here too.
    // Under `axum::serve`, 1,024 connections from eight addresses each sending 390 KB of headers
    // they never finished were all kept, heads and all (tests/meter_api_flood.rs
    // unfinished_heads_on_the_metrics_port_cannot_fill_the_operators_memory).
    let listener = crate::controller::meter_conn::BoundedTcpListener::new(listener, None);
    crate::controller::meter_conn::serve(listener, app, shutdown).await;
    Ok(())
}

/// Ready once the caches are synced. Missing identity admission policies are named in the body
/// but do not fail the probe: the operator already fails closed on them (no vote counts), and an
/// unready Pod would leave the metrics Service, hiding the gauge that alerts on the problem.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if !state.health.ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "watch caches not synced".to_string());
    }
    let problems = state.health.identity_problems.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    match problems {
        Some(p) if !p.is_empty() => {
            (StatusCode::OK, format!("ok; no vote counts: identity admission policies not in force: {}", p.join("; ")))
        }
        _ => (StatusCode::OK, "ok".to_string()),
    }
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    // Jobs by phase are counted from the cache at scrape time, so the gauge can never drift.
    let store = state.jobs.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    if store.is_none() {
        state.metrics.jobs.clear();
    }
    if let Some(store) = store {
        let jobs = store.state();
        for &phase in JobPhase::ALL {
            let n = jobs.iter().filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(phase)).count();
            state.metrics.jobs.get_or_create(&PhaseLabels { phase: phase.as_str().into() }).set(n as i64);
        }
    }
    state.metrics.refresh_tools();
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
}

/// What the caches hold, estimated object by object (controller/memory.rs), as plain text. One
/// report at a time: it deep-copies every cached object once, one after the other.
async fn memory_handler(State(state): State<AppState>) -> impl IntoResponse {
    static RUNNING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let Ok(_one) = RUNNING.try_lock() else {
        return (StatusCode::TOO_MANY_REQUESTS, "a memory report is being written; ask again".to_string());
    };
    let report = state.health.memory_report.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    match report {
        Some(report) => match tokio::task::spawn_blocking(move || report()).await {
            Ok(text) => (StatusCode::OK, text),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("the memory report failed: {e}")),
        },
        None => (StatusCode::SERVICE_UNAVAILABLE, "not leading: no caches".to_string()),
    }
}
