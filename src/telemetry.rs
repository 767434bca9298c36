//! Logging, and with the `otel` cargo feature, OpenTelemetry trace export: when
//! OTEL_EXPORTER_OTLP_ENDPOINT is set, spans go to that collector over OTLP/HTTP (protobuf), batched
//! on a background thread. OTEL_SERVICE_NAME names the service (default `agentgate`); the other
//! standard OTEL_EXPORTER_OTLP_* and OTEL_BSP_* variables apply as the OpenTelemetry SDK reads them.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes and stops the trace exporter when dropped (on a clean shutdown).
pub struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("flushing traces failed: {error}");
        }
    }
}

const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Installs the global subscriber: RUST_LOG-filtered logs on stdout (JSON lines when `json`), and
/// trace export when built with `otel` and OTEL_EXPORTER_OTLP_ENDPOINT is set.
pub fn init(json: bool) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(json.then(|| tracing_subscriber::fmt::layer().json()))
        .with((!json).then(tracing_subscriber::fmt::layer));
    let endpoint = std::env::var(ENDPOINT).ok().filter(|e| !e.is_empty());

    #[cfg(feature = "otel")]
    {
        let provider = endpoint.as_ref().map(|_| tracer_provider()).transpose()?;
        let layer = provider.as_ref().map(|p| {
            use opentelemetry::trace::TracerProvider as _;
            tracing_opentelemetry::layer().with_tracer(p.tracer("agentgate"))
        });
        registry.with(layer).init();
        if let Some(endpoint) = &endpoint {
            tracing::info!(%endpoint, "exporting traces over OTLP/HTTP");
        }
        Ok(Telemetry { provider })
    }
    #[cfg(not(feature = "otel"))]
    {
        registry.init();
        if endpoint.is_some() {
            tracing::warn!("{ENDPOINT} is set, but this build has no trace export (cargo feature `otel`)");
        }
        Ok(Telemetry {})
    }
}

#[cfg(feature = "otel")]
fn tracer_provider() -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "agentgate".into());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}
