//! The agent meter: a small LLM-API proxy beside an agent that measures its usage at the wire
//! and holds its budget. `agentgate meter` runs it standalone, against a fixed budget.

pub mod budget;
pub mod buffer_budget;
pub mod grant_client;
pub mod message;
pub mod proxy;
pub(crate) mod server;
/// The sidecar the operator injects is built in the domain (pure, next to the Pod it goes into).
pub use crate::domain::meter_sidecar as sidecar;
pub mod sse;
pub mod state_file;
pub mod surcharge;
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
    /// but unlimited (or granted by the operator, with `--grant-url`).
    #[arg(long, env = "AGENTGATE_METER_BUDGET_USD", value_parser = parse_usd)]
    pub budget_usd: Option<MicroUsd>,
    /// Base URL of the operator's meter API: the budget is then drawn from the job's, in grants
    /// the operator records in the job's status, and usage is reported there. Not with
    /// `--budget-usd`.
    #[arg(long, env = "AGENTGATE_METER_GRANT_URL")]
    pub grant_url: Option<String>,
    /// CA certificate (PEM file) the meter API's certificate must chain to. The meter trusts it
    /// alone for the meter API, never the system's roots. Required with an https grant URL.
    #[arg(long, env = "AGENTGATE_METER_GRANT_CA_FILE", conflicts_with = "grant_ca_pem")]
    pub grant_ca_file: Option<PathBuf>,
    /// The same CA certificate as PEM text (the operator sets it in the meter's environment).
    #[arg(long, env = "AGENTGATE_METER_GRANT_CA_PEM", hide_env_values = true, allow_hyphen_values = true)]
    pub grant_ca_pem: Option<String>,
    /// Allow a plain `http://` grant URL: the meter's token and the operator's grants then cross
    /// the network readable and forgeable. For development only.
    #[arg(long, env = "AGENTGATE_METER_GRANT_INSECURE_HTTP")]
    pub grant_insecure_http: bool,
    /// The meter's projected ServiceAccount token (audience `agentgate.dev/meter`), read again for
    /// every request to the operator (the kubelet rotates it).
    #[arg(long, env = "AGENTGATE_METER_TOKEN_FILE", default_value = "/var/run/agentgate/meter-token/token")]
    pub token_file: PathBuf,
    /// Budget asked of the operator at a time, at least (more when one call's worst case needs it).
    #[arg(long, env = "AGENTGATE_METER_GRANT_CHUNK_USD", default_value = "0.10", value_parser = parse_usd)]
    pub grant_chunk_usd: MicroUsd,
    /// Seconds between usage reports to the operator while usage changes (each is a status write
    /// of the job); the last report is sent when the meter exits.
    #[arg(long, env = "AGENTGATE_METER_REPORT_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub report_seconds: u64,
    /// JSON file rewritten with the running totals (as `GET /usage`) after calls settle.
    #[arg(long, env = "AGENTGATE_METER_REPORT_FILE")]
    pub report_file: Option<PathBuf>,
    /// The container's termination message file (`terminationMessagePath`), kept holding the
    /// cumulative usage, compact and within the kubelet's 4 KiB, from the start and after calls
    /// settle: the kubelet copies it into the Pod's status when the meter stops, where the
    /// operator reads it even if the meter could never reach the meter API
    /// (domain/meter_message.rs). The operator sets it in agent Pods.
    #[arg(long, env = "AGENTGATE_METER_TERMINATION_MESSAGE_PATH")]
    pub termination_message_path: Option<PathBuf>,
    /// File on a volume of the meter's own that survives its container's restarts (the operator
    /// mounts an emptyDir no other container mounts): the session, the grant and the cumulative
    /// usage, from which a restarted meter process carries on the Pod's session (state_file.rs).
    /// Without it each meter process starts a new session from zero.
    #[arg(long, env = "AGENTGATE_METER_STATE_FILE")]
    pub state_file: Option<PathBuf>,
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

/// The client for the meter API: HTTPS trusting the given CA only, or plain HTTP when explicitly
/// allowed. Anything else is refused before the meter starts.
fn grant_transport(url: &str, args: &MeterArgs) -> anyhow::Result<proxy::HttpsClient> {
    let parsed: http::Uri = url.parse().map_err(|e| anyhow::anyhow!("--grant-url {url:?}: {e}"))?;
    let ca = match (&args.grant_ca_file, &args.grant_ca_pem) {
        (Some(path), _) => Some(std::fs::read(path).map_err(|e| anyhow::anyhow!("reading --grant-ca-file {}: {e}", path.display()))?),
        (None, Some(pem)) => Some(pem.clone().into_bytes()),
        (None, None) => None,
    };
    match (parsed.scheme_str(), ca) {
        (Some("https"), Some(ca)) => grant_client::pinned_client(&ca),
        (Some("https"), None) => anyhow::bail!(
            "--grant-url {url:?} needs the meter API's CA certificate (--grant-ca-file or {}): the meter trusts no other",
            crate::domain::meter_sidecar::GRANT_CA_ENV
        ),
        (Some("http"), _) if args.grant_insecure_http => client(),
        (Some("http"), _) => anyhow::bail!(
            "--grant-url {url:?} is plain HTTP: the meter's token and the operator's grants would cross the network readable; \
             use https, or pass --grant-insecure-http for development"
        ),
        _ => anyhow::bail!("--grant-url {url:?} must be an http or https URL"),
    }
}

/// The startup probe (`agentgate meter-probe`): Ok once `url` (http, loopback) answers 200,
/// asking every 20 ms for up to `wait`. Waiting inside the probe, rather than failing and being
/// run again a period later (at least a second), starts the agent within milliseconds of its
/// meter. Blocking and dependency-free: it runs as its own short process in the meter's container.
pub fn probe(url: &str, wait: std::time::Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match probe_once(url) {
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "not yet");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result.map_err(|e| anyhow::anyhow!("the meter at {url}: {e}")),
        }
    }
}

fn probe_once(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow::anyhow!("{url:?}: an http:// URL"))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let addr: SocketAddr = authority.parse().map_err(|e| anyhow::anyhow!("{url:?}: an IP address and port: {e}"))?;
    let timeout = std::time::Duration::from_secs(1);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    anyhow::ensure!(head.starts_with(b"HTTP/1.1 200"), "{url} answered {:?}", String::from_utf8_lossy(&head));
    Ok(())
}

/// One meter process: the proxy, its session and its state file.
pub struct Process {
    pub meter: Arc<Meter>,
    /// The session's id (secret: whoever knows it may speak for the session).
    pub session: String,
    pub state: Option<Arc<state_file::StateFile>>,
}

pub fn build(args: &MeterArgs, prices: PriceTable) -> anyhow::Result<Process> {
    let grants = match (&args.grant_url, args.budget_usd) {
        (Some(_), Some(_)) => anyhow::bail!(
            "--grant-url and --budget-usd exclude each other: with --grant-url the budget is the job's, granted by the operator"
        ),
        (Some(url), None) => Some((url.as_str(), grant_transport(url, args)?)),
        (None, _) => None,
    };
    // Granted: nothing to spend until the operator grants it.
    let ledger = Ledger::new(if grants.is_some() { Some(MicroUsd(0)) } else { args.budget_usd });
    // A restarted meter process carries on its Pod's session (state_file.rs); the Pod's first
    // one, or one after a settled session, opens a new one.
    let resumed = args.state_file.as_deref().and_then(state_file::resume);
    let session = resumed.as_ref().map_or_else(grant_client::new_session_id, |r| r.session.clone());
    let sequence = resumed.as_ref().map_or(0, |r| r.sequence);
    let state = args.state_file.clone().map(|path| Arc::new(state_file::StateFile::new(path, &session, sequence)));
    if let Some(resumed) = &resumed {
        ledger.carry(&resumed.carried);
        // What the operator granted the session is still held for it (the session has not
        // settled): the new process may spend it, as the old one could have. A fixed budget is
        // the flag's, now held against the Pod's whole usage.
        if let (Some(_), Some(granted)) = (&grants, resumed.granted) {
            ledger.raise_budget(granted);
            if let Some(state) = &state {
                state.granted(granted);
            }
        }
        tracing::info!(sequence, spent = %resumed.carried.usage.cost_usd, "resumed the session of the Pod's previous meter process");
    }
    let client = client()?;
    let grants = grants.map(|(url, transport)| {
        grant_client::GrantClient::new(
            url,
            args.token_file.clone(),
            transport,
            ledger.clone(),
            args.grant_chunk_usd,
            grant_client::Resume { session: session.clone(), sequence, state: state.clone() },
        )
    });
    let meter = Arc::new(Meter {
        ledger,
        grants,
        prices,
        openai: Some(upstream(&args.openai_upstream, args.openai_key_file.as_deref(), true)?),
        anthropic: Some(upstream(&args.anthropic_upstream, args.anthropic_key_file.as_deref(), false)?),
        client,
        default_output_cap: args.default_output_cap,
        contexts: Default::default(),
        buffers: Default::default(),
        state: state.clone(),
    });
    Ok(Process { meter, session, state })
}

/// Serves until `shutdown` resolves; the report file is written once more at the end.
pub async fn serve(args: MeterArgs, prices: PriceTable, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let Process { meter, session, state } = build(&args, prices)?;
    // The session's digest: the operator matches the message to the session the meter API knows.
    let message = args.termination_message_path.clone().map(|path| Arc::new(message::TerminationMessage::new(path, &session)));
    // The session on disk before anything else: a process killed from now on is resumed.
    if let Some(state) = &state
        && let Err(e) = state.write(&meter.ledger)
    {
        tracing::error!(error = %e, path = %state.path().display(), "writing the meter's state file");
    }
    // Before the meter listens, so before its agent starts (the startup probe): a meter that ran
    // leaves a figure, zero if its agent made no call. A meter that cannot write it still serves:
    // the operator then has its reports, or counts its Pod `UsageUnmeasured`.
    if let Some(message) = &message
        && let Err(e) = message.write(&meter.ledger)
    {
        tracing::error!(error = %e, path = %message.path().display(), "writing the termination message");
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, budget = ?args.budget_usd.map(|b| b.to_string()), "agentgate meter ready");
    let writer = (args.report_file.is_some() || message.is_some() || state.is_some())
        .then(|| tokio::spawn(write_reports(meter.ledger.clone(), args.report_file.clone(), message.clone(), state.clone())));
    let reporter = meter
        .grants
        .clone()
        .map(|grants| tokio::spawn(grant_client::report_usage(grants, std::time::Duration::from_secs(args.report_seconds))));
    server::serve(listener, proxy::router(meter.clone()), shutdown).await;
    if let Some(writer) = writer {
        writer.abort();
    }
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    // Every call has ended: the final figure, before settling (which may take 20 s and fail).
    if let Some(state) = &state
        && let Err(e) = write_state(state, &meter.ledger).await
    {
        tracing::error!(error = %e, "writing the meter's state file");
    }
    if let Some(message) = &message
        && let Err(e) = write_message(message, &meter.ledger).await
    {
        tracing::error!(error = %e, "writing the termination message");
    }
    if let Some(grants) = &meter.grants {
        // Every call has ended: the final usage, and what was not spent goes back to the job.
        match grants.settle().await {
            Ok(granted) => tracing::info!(granted = %granted, spent = %meter.ledger.spent(), "settled with the operator"),
            Err(e) => tracing::error!(error = %e, "could not settle with the operator: the job's budget holds this meter's whole grant"),
        }
    }
    if let Some(path) = &args.report_file {
        write_report(&meter.ledger, path).await?;
    }
    // The totals outlive the meter in its log (`kubectl logs -c agentgate-meter`), also when the
    // agent beside it was OOM-killed or stopped at its deadline (tests/real_node_meter.rs).
    tracing::info!(usage = %serde_json::to_string(&meter.ledger.snapshot())?, "agentgate meter stopped");
    Ok(())
}

/// Rewrites the report file and the termination message after calls settle. A burst of calls is
/// one write, not one each: the notification coalesces while a write is under way. The message is
/// rewritten on every change, not every report interval: a write of at most 4 KiB costs far less
/// than the call that changed it, and even a meter killed (SIGKILL, OOM, the node) then leaves
/// the figure of its last settled call.
async fn write_reports(
    ledger: Arc<Ledger>,
    path: Option<PathBuf>,
    message: Option<Arc<message::TerminationMessage>>,
    state: Option<Arc<state_file::StateFile>>,
) {
    loop {
        // Before the message: what a restarted process resumes from is never behind it.
        if let Some(state) = &state
            && let Err(e) = write_state(state, &ledger).await
        {
            tracing::warn!(error = %e, "writing the meter's state file");
        }
        if let Some(path) = &path
            && let Err(e) = write_report(&ledger, path).await
        {
            tracing::warn!(error = %e, "writing the meter's report");
        }
        if let Some(message) = &message
            && let Err(e) = write_message(message, &ledger).await
        {
            tracing::warn!(error = %e, "writing the termination message");
        }
        ledger.changed.notified().await;
    }
}

/// Writes the termination message off the runtime's only thread, so a slow disk does not hold
/// up calls.
async fn write_message(message: &Arc<message::TerminationMessage>, ledger: &Arc<Ledger>) -> std::io::Result<()> {
    let (message, ledger) = (message.clone(), ledger.clone());
    tokio::task::spawn_blocking(move || message.write(&ledger)).await.map_err(std::io::Error::other)?
}

/// Writes the state file off the runtime's only thread.
async fn write_state(state: &Arc<state_file::StateFile>, ledger: &Arc<Ledger>) -> std::io::Result<()> {
    let (state, ledger) = (state.clone(), ledger.clone());
    tokio::task::spawn_blocking(move || state.write(&ledger)).await.map_err(std::io::Error::other)?
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        meter: super::MeterArgs,
    }

    fn build(args: &[&str]) -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(std::iter::once("meter").chain(args.iter().copied()))?;
        super::build(&cli.meter, crate::domain::pricing::PriceTable::builtin()).map(|_| ())
    }

    #[test]
    fn a_granted_budget_and_a_fixed_one_exclude_each_other() {
        let err = build(&["--grant-url", "http://agentgate-meter-api.agentgate-system.svc:8444", "--budget-usd", "1"]).unwrap_err();
        assert!(err.to_string().contains("--grant-url and --budget-usd exclude each other"), "{err}");
        assert!(build(&["--grant-url", "ftp://operator"]).unwrap_err().to_string().contains("http or https"));
        build(&["--grant-url", "http://agentgate-meter-api.agentgate-system.svc:8444", "--grant-insecure-http"]).unwrap();
    }

    /// A one-shot server on loopback answering `status_line`; its URL.
    fn answering(status_line: &'static str) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 256];
            while !request.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "the probe hung up mid-request");
                request.extend_from_slice(&chunk[..n]);
            }
            assert!(request.starts_with(b"GET /healthz HTTP/1.1\r\n"), "{}", String::from_utf8_lossy(&request));
            stream.write_all(format!("{status_line}\r\ncontent-length: 2\r\n\r\nok").as_bytes()).unwrap();
        });
        url
    }

    #[test]
    fn the_startup_probe_passes_only_on_a_200() {
        let now = std::time::Duration::ZERO;
        super::probe(&answering("HTTP/1.1 200 OK"), now).unwrap();
        let err = super::probe(&answering("HTTP/1.1 503 Service Unavailable"), now).unwrap_err().to_string();
        assert!(err.contains("503"), "{err}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(super::probe(&format!("http://{closed}/healthz"), now).is_err(), "nothing listens");
        assert!(super::probe("https://127.0.0.1:4000/healthz", now).is_err());
        // Waiting: a meter that starts listening a moment after the probe began passes it.
        let late = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = late.local_addr().unwrap();
        drop(late);
        let started = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let listener = std::net::TcpListener::bind(addr).unwrap();
            let (mut stream, _) = listener.accept().unwrap();
            std::io::Read::read(&mut stream, &mut [0u8; 256]).unwrap();
            std::io::Write::write_all(&mut stream, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
        });
        super::probe(&format!("http://{addr}/healthz"), std::time::Duration::from_secs(5)).unwrap();
        started.join().unwrap();
    }

    #[test]
    fn the_grant_url_is_https_with_a_ca_or_plain_http_only_when_allowed() {
        let url = "https://agentgate-meter-api.agentgate-system.svc:8444";
        let plain = build(&["--grant-url", "http://agentgate-meter-api.agentgate-system.svc:8444"]).unwrap_err().to_string();
        assert!(plain.contains("plain HTTP") && plain.contains("--grant-insecure-http"), "{plain}");
        let no_ca = build(&["--grant-url", url]).unwrap_err().to_string();
        assert!(no_ca.contains("needs the meter API's CA certificate"), "{no_ca}");
        let not_pem = build(&["--grant-url", url, "--grant-ca-pem", "not a certificate"]).unwrap_err().to_string();
        assert!(not_pem.contains("no CA certificate"), "{not_pem}");
        let names = crate::domain::meter_tls::names(url, "agentgate-system").unwrap();
        let ca = crate::domain::meter_tls::fresh(&names, 1_800_000_000).unwrap().ca_cert_pem;
        build(&["--grant-url", url, "--grant-ca-pem", &ca]).unwrap();
    }
}
