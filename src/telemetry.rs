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
        .with((!json).then(|| tracing_subscriber::fmt::layer().with_writer(|| OneLine(std::io::stdout()))));
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

/// A text log line as written: a field may quote what a tenant wrote (an error quoting a spec
/// value, an annotation), and tracing's text format escapes its escape sequences but not line
/// breaks, carriage returns or bidi characters, with which a value forged whole log lines
/// (`tests::a_line_break_in_a_logged_value_stays_on_its_line`). Each event arrives in one write
/// ending in its one line break; everything hidden before it is escaped. Escape sequences are
/// left to tracing, which escapes tenants' and writes its own colours.
struct OneLine<W>(W);

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let (body, end) = text.strip_suffix('\n').map_or((&*text, ""), |body| (body, "\n"));
        if body.chars().any(|c| c != '\x1b' && crate::domain::terminal_text::is_hidden(c)) {
            let shown: String = body.split('\x1b').map(|part| crate::domain::terminal_text::message(part)).collect::<Vec<_>>().join("\x1b");
            self.0.write_all(shown.as_bytes())?;
            self.0.write_all(end.as_bytes())?;
        } else {
            self.0.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::OneLine;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_break_in_a_logged_value_stays_on_its_line() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || OneLine(writer.clone())).finish();
        tracing::subscriber::with_default(subscriber, || {
            let error = "unknown variant `x\n2026-12-01T00:00:00Z  INFO agentgate: became the leader\r\u{202E}`";
            tracing::warn!(%error, "object left out of the cache: it does not decode");
            tracing::info!("plain");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains(r"x\n2026-12-01T00:00:00Z  INFO agentgate: became the leader\r\u202E"), "{text}");
        assert!(text.lines().all(|l| !l.chars().any(crate::domain::terminal_text::is_hidden)), "{text:?}");
    }
}
