//! The operator's Kubernetes client: kube 5's own stack (`kube-client`'s
//! `ClientBuilder::try_from(Config)`: timeouts, TLS, base URI, retries, auth, headers, the `HTTP`
//! trace span), rebuilt here for one difference: hyper's connection pool closes a connection
//! idle for `POOL_IDLE_TIMEOUT`, not 90 s. kube 5 has no HTTP/2, so a burst opens one HTTP/1.1
//! connection per request in flight (up to `--max-concurrent-reconciles` per controller, plus the
//! Event sender's 32), each keeping its TLS state and read buffer while it idles: at 10,000 jobs
//! ~9 MiB of the operator's memory was connections the burst had finished with (README "Memory at
//! 10,000 jobs"). A connection in use is never closed by this; one idle longer
//! costs a new TCP and TLS handshake when the next burst comes, a few ms.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::{Body, ConfigExt, retry::RetryPolicy};
use kube::{Client, Config};
use tower::{BoxError, ServiceBuilder, retry::RetryLayer};
use tower_http::{classify::ServerErrorsFailureClass, trace::TraceLayer};
use tracing::Span;

/// How long an idle connection stays open. Long enough for the gaps within a burst of
/// reconciles (milliseconds), short enough that a finished burst's connections go before the
/// next resync.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// `Client::try_default()`, with the pool bound above.
pub async fn connect() -> anyhow::Result<Client> {
    let config = Config::infer().await?;
    build(config)
}

pub fn build(config: Config) -> anyhow::Result<Client> {
    if config.proxy_url.is_some() {
        // kube's own stack handles proxies; its pool keeps the default idle timeout.
        return Ok(Client::try_from(config)?);
    }
    let default_ns = config.default_namespace.clone();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let https = config.rustls_https_connector_with_connector(http)?;
    let mut connector = TimeoutConnector::new(https);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let pool: hyper_util::client::legacy::Client<_, Body> = hyper_util::client::legacy::Builder::new(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.default_retry.then(|| RetryLayer::new(RetryPolicy::server_retry())))
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<Body>| {
                    tracing::debug_span!(
                        "HTTP",
                        http.method = %req.method(),
                        http.url = %req.uri(),
                        http.status_code = tracing::field::Empty,
                        otel.name = req.extensions().get::<&'static str>().unwrap_or(&"HTTP"),
                        otel.kind = "client",
                        otel.status_code = tracing::field::Empty,
                    )
                })
                .on_request(|_: &Request<Body>, _: &Span| tracing::debug!("requesting"))
                .on_response(|res: &Response<Incoming>, _: Duration, span: &Span| {
                    let status = res.status();
                    span.record("http.status_code", status.as_u16());
                    if status.is_client_error() || status.is_server_error() {
                        span.record("otel.status_code", "ERROR");
                    }
                })
                .on_body_chunk(())
                .on_eos(|_: Option<&http::HeaderMap>, _: Duration, _: &Span| tracing::debug!("stream closed"))
                .on_failure(|failure: ServerErrorsFailureClass, _: Duration, span: &Span| {
                    span.record("otel.status_code", "ERROR");
                    match failure {
                        ServerErrorsFailureClass::StatusCode(status) => {
                            span.record("http.status_code", status.as_u16());
                            tracing::error!("failed with status {status}");
                        }
                        ServerErrorsFailureClass::Error(err) => tracing::error!("failed with error {err}"),
                    }
                }),
        )
        .map_err(BoxError::from)
        .service(pool);
    Ok(Client::new(service, default_ns))
}
