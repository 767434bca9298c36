//! How every long-running agentgate program learns it should stop.

/// Resolves on SIGTERM (what Kubernetes sends a Pod) or Ctrl-C. Should the SIGTERM handler
/// fail to install, Ctrl-C alone still stops the program rather than it failing to start.
pub async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not install a SIGTERM handler; only Ctrl-C stops this program");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
