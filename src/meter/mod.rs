//! The agent meter: a small LLM-API proxy beside an agent that measures its usage at the wire
//! and holds its budget. `agentgate meter` runs it standalone, against a fixed budget.

pub mod budget;
pub mod proxy;
/// The sidecar the operator injects is built in the domain (pure, next to the Pod it goes into).
pub use crate::domain::meter_sidecar as sidecar;
pub mod sse;
pub mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::HeaderValue;

use crate::domain::money::MicroUsd;
use crate::domain::pricing::PriceTable;
use budget::Ledger;
use proxy::{Meter, Upstream};

#[derive(clap::Args, Debug)]
pub struct MeterArgs {
    /// Address to listen on. Loopback by default: the meter spends money for whoever can reach it.
    #[arg(long, env = "AGENTGATE_METER_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,
    /// OpenAI-compatible upstream, as for OPENAI_BASE_URL (ending in /v1).
    #[arg(long, env = "AGENTGATE_METER_OPENAI_UPSTREAM", default_value = "https://api.openai.com/v1")]
    pub openai_upstream: String,
    /// Anthropic upstream, as for ANTHROPIC_BASE_URL (the origin).
    #[arg(long, env = "AGENTGATE_METER_ANTHROPIC_UPSTREAM", default_value = "https://api.anthropic.com")]
    pub anthropic_upstream: String,
    /// File holding the OpenAI API key, sent as `Authorization: Bearer` instead of the client's.
    /// Without it the client's own credentials are forwarded.
    #[arg(long, env = "AGENTGATE_METER_OPENAI_KEY_FILE")]
    pub openai_key_file: Option<PathBuf>,
    /// File holding the Anthropic API key, sent as `x-api-key` instead of the client's.
    #[arg(long, env = "AGENTGATE_METER_ANTHROPIC_KEY_FILE")]
    pub anthropic_key_file: Option<PathBuf>,
    /// YAML price table adding to or overriding the built-in prices, as for `run`.
    #[arg(long, env = "AGENTGATE_PRICE_TABLE")]
    pub price_table: Option<PathBuf>,
    /// Budget in USD (e.g. `5` or `0.25`) that the calls' total cost never exceeds. None: metered
    /// but unlimited.
    #[arg(long, env = "AGENTGATE_METER_BUDGET_USD", value_parser = parse_usd)]
    pub budget_usd: Option<MicroUsd>,
    /// JSON file rewritten with the running totals (as `GET /usage`) after calls settle.
    #[arg(long, env = "AGENTGATE_METER_REPORT_FILE")]
    pub report_file: Option<PathBuf>,
    /// Output cap set on a call that sets none, when the budget does not force a lower one. It
    /// must be one every model accepts (a larger cap than a model allows is a 400 from it).
    #[arg(long, env = "AGENTGATE_METER_DEFAULT_OUTPUT_CAP", default_value_t = 16_384, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub default_output_cap: i64,
}

fn parse_usd(text: &str) -> Result<MicroUsd, String> {
    MicroUsd::parse(text.trim()).ok_or_else(|| format!("{text:?} is not an amount of USD (a decimal with at most 6 decimals)"))
}

/// Reads a key file. Errors name the file, never its content.
fn read_key(path: &Path, bearer: bool) -> anyhow::Result<HeaderValue> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading key file {}: {}", path.display(), e.kind()))?;
    let key = text.trim();
    if key.is_empty() {
        anyhow::bail!("key file {} is empty", path.display());
    }
    let value = if bearer { format!("Bearer {key}") } else { key.to_string() };
    let mut value =
        HeaderValue::from_str(&value).map_err(|_| anyhow::anyhow!("key file {} holds characters a header cannot carry", path.display()))?;
    value.set_sensitive(true);
    Ok(value)
}

fn upstream(base: &str, key_file: Option<&Path>, bearer: bool) -> anyhow::Result<Upstream> {
    let parsed: http::Uri = base.parse().map_err(|e| anyhow::anyhow!("upstream {base:?}: {e}"))?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) {
        anyhow::bail!("upstream {base:?} must be an http or https URL");
    }
    let key = key_file.map(|p| read_key(p, bearer)).transpose()?;
    Ok(Upstream { base: base.trim_end_matches('/').to_string(), key })
}

pub fn client() -> anyhow::Result<proxy::HttpsClient> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| anyhow::anyhow!("loading the system's root certificates: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

pub fn build(args: &MeterArgs, prices: PriceTable) -> anyhow::Result<Arc<Meter>> {
    Ok(Arc::new(Meter {
        ledger: Ledger::new(args.budget_usd),
        prices,
        openai: Some(upstream(&args.openai_upstream, args.openai_key_file.as_deref(), true)?),
        anthropic: Some(upstream(&args.anthropic_upstream, args.anthropic_key_file.as_deref(), false)?),
        client: client()?,
        default_output_cap: args.default_output_cap,
        contexts: Default::default(),
    }))
}

/// Serves until `shutdown` resolves; the report file is written once more at the end.
pub async fn serve(args: MeterArgs, prices: PriceTable, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let meter = build(&args, prices)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, budget = ?args.budget_usd.map(|b| b.to_string()), "agentgate meter ready");
    let writer = args.report_file.clone().map(|path| tokio::spawn(write_reports(meter.ledger.clone(), path)));
    axum::serve(listener, proxy::router(meter.clone())).with_graceful_shutdown(shutdown).await?;
    if let Some(writer) = writer {
        writer.abort();
    }
    if let Some(path) = &args.report_file {
        write_report(&meter.ledger, path).await?;
    }
    // The totals outlive the meter in its log (`kubectl logs -c agentgate-meter`), also when the
    // agent beside it was OOM-killed or stopped at its deadline (tests/real_node_meter.rs).
    tracing::info!(usage = %serde_json::to_string(&meter.ledger.snapshot())?, "agentgate meter stopped");
    Ok(())
}

/// Rewrites the report after calls settle. A burst of calls is one write, not one each: the
/// notification coalesces while a write is under way.
async fn write_reports(ledger: Arc<Ledger>, path: PathBuf) {
    loop {
        if let Err(e) = write_report(&ledger, &path).await {
            tracing::warn!(error = %e, "writing the meter's report");
        }
        ledger.changed.notified().await;
    }
}

async fn write_report(ledger: &Ledger, path: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(&ledger.snapshot())?;
    let path = path.to_path_buf();
    // Written aside and renamed, so a reader never sees half a report; off the runtime's only
    // thread, so a slow disk does not hold up calls.
    tokio::task::spawn_blocking(move || {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, &path)
    })
    .await??;
    Ok(())
}
