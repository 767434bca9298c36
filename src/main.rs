use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use agentgate::controller::{self, Settings};
use agentgate::domain::approval_policy::ApprovalTier;
use agentgate::domain::pricing::PriceTable;
use agentgate::metrics::Metrics;
use agentgate::state::Health;
use clap::{Parser, Subcommand};
use tokio::sync::RwLock;

#[derive(Parser)]
#[command(
    name = "agentgate",
    version,
    about = "Kubernetes operator for AI-agent jobs: cost, readiness and approval before the run, usage after"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster of the current kubeconfig or service account.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD into a directory.
    Crds {
        /// Write one `<plural>.yaml` per CRD into this directory instead of printing them.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Review jobs of some categories against a policy and vote on them as the current identity
    /// (for instance a category head's ServiceAccount).
    Review(agentgate::review::ReviewArgs),
    /// Evaluate the cost estimator offline.
    #[command(subcommand)]
    Estimator(EstimatorCommand),
    /// Run the agent meter: an LLM-API proxy that measures usage at the wire and holds a budget
    /// (standalone, for a laptop or a test; GET /usage returns the running totals).
    Meter(agentgate::meter::MeterArgs),
    /// Exit 0 if the meter answers at this health URL (the meter sidecar's startup probe: the
    /// kubelet runs it inside the meter's container, which shares the Pod's loopback).
    MeterProbe {
        #[arg(default_value = "http://127.0.0.1:4000/healthz")]
        url: String,
        /// Milliseconds to keep asking before failing (the probe's timeoutSeconds must exceed it).
        #[arg(long, default_value_t = 1500)]
        wait_ms: u64,
    },
}

#[derive(Subcommand)]
enum EstimatorCommand {
    /// Replay a trace of finished jobs (JSON lines) in order: predict each from its spec, then
    /// learn its usage. Prints a table per jobType next to a naive reference, and as the last line
    /// `records=N coverage_p90=F mdape_p50=F mdape_p50_after_warmup=F cold_start_ratio=F sharpness_p90=F`.
    Eval {
        /// Trace of finished jobs, one JSON object a line, as `synth` prints it.
        #[arg(long)]
        traces: PathBuf,
        /// Samples of a jobType before its records count towards mdape_p50_after_warmup.
        #[arg(long, default_value_t = 20)]
        warmup: usize,
        /// YAML price table adding to or overriding the built-in prices, as for `run`.
        #[arg(long)]
        price_table: Option<PathBuf>,
    },
    /// Print a synthetic trace (heavy-tailed, drifting usage) in the format `eval` reads.
    Synth {
        /// Records to print.
        #[arg(long, default_value_t = 2000)]
        records: usize,
        /// Distinct jobTypes in the trace (1 to 8).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=8))]
        job_types: u64,
        /// Random seed: the same seed prints the same trace.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The shape of the workload (see the README's estimator section).
        #[arg(long, value_enum, default_value_t = agentgate::evaluation::families::Family::Drift)]
        family: agentgate::evaluation::families::Family,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch AgentJobs and ApprovalVotes in this namespace only (default: all namespaces).
    #[arg(long, env = "AGENTGATE_NAMESPACE")]
    namespace: Option<String>,
    /// Approvals every job needs at least; a job's spec.approval.required can only raise it.
    #[arg(long, env = "AGENTGATE_APPROVAL_FLOOR", default_value_t = 2, value_parser = clap::value_parser!(i32).range(1..=10))]
    approval_floor: i32,
    /// A risk tier, repeatable: `minCostUSD=10,required=3[,humanGroup=G][,category=C]` means jobs
    /// whose budget or p90 estimate reaches $10 (in category C) need 3 approvals, one from a member of G.
    #[arg(long = "approval-tier", env = "AGENTGATE_APPROVAL_TIERS", value_delimiter = ';')]
    approval_tiers: Vec<ApprovalTier>,
    /// Reject jobs that wait longer than this many seconds for their approvals (0: wait forever).
    #[arg(long, env = "AGENTGATE_APPROVAL_TIMEOUT_SECONDS", default_value_t = 0)]
    approval_timeout_seconds: u64,
    /// ServiceAccounts (`namespace/name`, comma-separated) whose votes may count; any other
    /// ServiceAccount's vote is listed as not counted.
    // Why: one human who may create ServiceAccounts and bind them as heads would otherwise be
    // as many heads as accounts.
    #[arg(long, env = "AGENTGATE_ROBOT_VOTERS", value_delimiter = ',')]
    robot_voters: Vec<String>,
    /// Robot (ServiceAccount) votes that count per job at most.
    #[arg(long, env = "AGENTGATE_MAX_ROBOT_VOTES", default_value_t = 1)]
    max_robot_votes: usize,
    /// Milliseconds a new job's first status waits for votes applied together with it (0: never
    /// wait); it stretches to how late recent jobs' approvals came, and approvals still arriving
    /// extend it, at most 4x. Over-budget, invalid, unestimable or rejected jobs are reported at
    /// once.
    // Why: a pre-approved job then gets one status write and one Event instead of two each.
    #[arg(long, env = "AGENTGATE_VOTE_WAIT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    vote_wait_ms: u64,
    /// Reconciles in flight at once, per controller (AgentJobs, AgentTools).
    // Why bounded: unbounded, a burst of thousands of new jobs opened a connection per in-flight
    // request (350 at 10,000 jobs), and the idle ones kept their TLS and HTTP buffers; the
    // apiserver is no faster for it.
    #[arg(long, env = "AGENTGATE_MAX_CONCURRENT_RECONCILES", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..))]
    max_concurrent_reconciles: u16,
    /// YAML price table (`models: {<id>: {inputPerMillion, cachedInputPerMillion, outputPerMillion}}`,
    /// optionally `cacheWritePerMillion` and `cacheWrite1hPerMillion`)
    /// adding to or overriding the built-in list prices.
    #[arg(long, env = "AGENTGATE_PRICE_TABLE")]
    price_table: Option<PathBuf>,
    /// ConfigMap (in the operator's namespace) whose key `prices.yaml`, in the same format, is
    /// watched and applied on top of the other prices: edits take effect without a restart.
    #[arg(long, env = "AGENTGATE_PRICE_CONFIG_MAP")]
    price_config_map: Option<String>,
    /// Address of the meter API, where agent meters draw their job's budget and report usage
    /// (`POST /v1/sync`, authenticated by their Pod-bound tokens; see the README's agent meter).
    #[arg(long, env = "AGENTGATE_METER_API_LISTEN", default_value = "0.0.0.0:8444")]
    meter_api_listen: SocketAddr,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "AGENTGATE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Also serve `GET /debug/memory` on the metrics address: what each cache holds, measured
    /// by copying it object by object. Off by default: whoever reaches the metrics port could
    /// otherwise make the operator copy every cache on demand.
    #[arg(long, env = "AGENTGATE_DEBUG_MEMORY", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    debug_memory: bool,
    /// Discover AgentTools from labelled Services in the namespaces matching this label selector,
    /// e.g. `agentgate.dev/discovery=enabled` (default: no discovery). Whoever may label a
    /// Service in a matching namespace can publish a tool every team's agents call.
    #[arg(long, env = "AGENTGATE_DISCOVERY_NAMESPACE_SELECTOR", value_parser = agentgate::controller::discovery::parse_namespace_selector)]
    discovery_namespace_selector: Option<String>,
    /// Elect a leader among replicas through a Lease, so only one of them reconciles and writes.
    #[arg(long, env = "AGENTGATE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease (default: the watched namespace, else $POD_NAMESPACE, else `default`).
    #[arg(long, env = "AGENTGATE_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "AGENTGATE_LOG_JSON")]
    log_json: bool,
    /// Image of the meter sidecar injected into every agent Pod: the operator's own image (the
    /// chart sets it to the image it runs).
    #[arg(long, env = "AGENTGATE_METER_IMAGE", default_value = concat!("ghcr.io/agentgate/agentgate:", env!("CARGO_PKG_VERSION")))]
    meter_image: String,
    /// Secret, looked up in each job's namespace, whose keys `openai` and `anthropic` the meter
    /// (never the agent) sends upstream; its annotations agentgate.dev/openai-upstream and
    /// agentgate.dev/anthropic-upstream override the upstreams for that namespace.
    #[arg(long, env = "AGENTGATE_METER_KEYS_SECRET", default_value = agentgate::domain::meter_sidecar::DEFAULT_KEYS_SECRET)]
    meter_keys_secret: String,
    /// OpenAI-compatible upstream of every meter (ending in /v1) unless its namespace's keys
    /// Secret names another; default: api.openai.com.
    #[arg(long, env = "AGENTGATE_METER_OPENAI_UPSTREAM")]
    meter_openai_upstream: Option<String>,
    /// Anthropic upstream of every meter unless its namespace's keys Secret names another;
    /// default: api.anthropic.com.
    #[arg(long, env = "AGENTGATE_METER_ANTHROPIC_UPSTREAM")]
    meter_anthropic_upstream: Option<String>,
    /// Where a meter's budget comes from: `fixed`, each meter holds the job's whole maxCostUSD
    /// alone; `grants`, meters draw from the operator's meter API (`--meter-grant-url`), so all
    /// agents of a job share one budget.
    #[arg(long, env = "AGENTGATE_METER_BUDGET_MODE", default_value = "grants", value_parser = parse_budget_mode)]
    meter_budget_mode: agentgate::domain::meter_sidecar::BudgetMode,
    /// URL of the operator's meter API as meters reach it (default:
    /// https://agentgate-meter-api.<operator namespace>.svc:8444). Its host is one of the names
    /// of the managed certificate.
    #[arg(long, env = "AGENTGATE_METER_GRANT_URL")]
    meter_grant_url: Option<String>,
    /// TLS of the meter API: `managed`, the operator makes its own CA and serving certificate and
    /// renews them, in the Secret `--meter-api-tls-secret` of its namespace; `secret`, that Secret
    /// is provided (`tls.crt`, `tls.key`, `ca.crt`, e.g. by cert-manager) and only read; `off`,
    /// plain HTTP, for development only (the meters' tokens and grants cross the network readable).
    #[arg(long, env = "AGENTGATE_METER_API_TLS", default_value = "managed", value_parser = parse_tls_mode)]
    meter_api_tls: agentgate::domain::meter_tls::TlsMode,
    /// Secret, in the operator's namespace, holding the meter API's certificate.
    #[arg(long, env = "AGENTGATE_METER_API_TLS_SECRET", default_value = agentgate::domain::meter_tls::DEFAULT_SECRET)]
    meter_api_tls_secret: String,
}

fn parse_tls_mode(text: &str) -> Result<agentgate::domain::meter_tls::TlsMode, String> {
    text.parse()
}

fn parse_budget_mode(text: &str) -> Result<agentgate::domain::meter_sidecar::BudgetMode, String> {
    text.parse()
}

// glibc's malloc kept ~15% of the operator's RSS at 10,000 cached jobs in freed fragments: the
// caches' many small long-lived strings sit between the request buffers freed around them.
// jemalloc's size classes pack those tighter and give freed pages back.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: one arena (a few threads share it without contention,
/// and one arena fragments less than one per thread), and freed pages returned within a second.
/// `_RJEM_MALLOC_CONF` in the environment still overrides them. Freed pages are in fact returned:
/// at 10,000 jobs anonymous memory is within ~2 MiB of jemalloc's active pages plus metadata
/// (`GET /debug/memory`), so a background purge thread was tried and left out.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 47] = b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { out_dir } => {
            for (plural, crd) in agentgate::api::all_crds() {
                let yaml = agentgate::api::crd_yaml(&crd);
                match &out_dir {
                    Some(dir) => std::fs::write(dir.join(format!("{plural}.yaml")), yaml)?,
                    None => print!("{yaml}"),
                }
            }
            Ok(())
        }
        Command::Estimator(EstimatorCommand::Eval { traces, warmup, price_table }) => {
            let prices = load_prices(price_table.as_deref())?;
            let text = std::fs::read_to_string(&traces).map_err(|e| anyhow::anyhow!("reading {}: {e}", traces.display()))?;
            let records = agentgate::evaluation::parse_traces(&text).map_err(|e| anyhow::anyhow!("{}: {e}", traces.display()))?;
            print!("{}", agentgate::evaluation::evaluate(&records, &prices, warmup).render());
            Ok(())
        }
        Command::Estimator(EstimatorCommand::Synth { records, job_types, seed, family }) => {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for record in family.generate(records, job_types as usize, seed) {
                writeln!(out, "{}", serde_json::to_string(&record)?)?;
            }
            Ok(())
        }
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args)),
        Command::Meter(args) => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
            // No colour codes in a sidecar's log (`kubectl logs`), only on a terminal.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
            let prices = load_prices(args.price_table.as_deref())?;
            // One thread: a meter serves one agent, and a single-threaded runtime keeps its
            // memory and its latency small (no work stealing between cores).
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(agentgate::meter::serve(
                args,
                prices,
                agentgate::signal::shutdown_signal(),
            ))
        }
        Command::MeterProbe { url, wait_ms } => agentgate::meter::probe(&url, std::time::Duration::from_millis(wait_ms)),
        Command::Review(args) => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
            tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).init();
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(agentgate::review::run(args))
        }
    }
}

fn load_prices(path: Option<&std::path::Path>) -> anyhow::Result<PriceTable> {
    let Some(path) = path else { return Ok(PriceTable::builtin()) };
    let yaml = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading price table {}: {e}", path.display()))?;
    PriceTable::with_overrides_from_yaml(&yaml).map_err(anyhow::Error::msg)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let _telemetry = agentgate::telemetry::init(args.log_json)?;

    let prices = load_prices(args.price_table.as_deref())?;
    let client = agentgate::kube_client::connect().await?;
    let lease_namespace = args
        .lease_namespace
        .clone()
        .or_else(|| args.namespace.clone())
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| "default".into());
    let operator_namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| lease_namespace.clone());
    let tls_mode = args.meter_api_tls;
    let grant_url = match args.meter_grant_url.filter(|u| !u.is_empty()) {
        Some(url) => url,
        None => {
            let scheme = if tls_mode == agentgate::domain::meter_tls::TlsMode::Off { "http" } else { "https" };
            format!("{scheme}://{}.{operator_namespace}.svc:8444", agentgate::domain::meter_tls::SERVICE)
        }
    };
    // The meters are told to use plain HTTP exactly when the API serves it.
    let wants_tls = tls_mode != agentgate::domain::meter_tls::TlsMode::Off;
    if grant_url.starts_with("https://") != wants_tls {
        anyhow::bail!("--meter-grant-url {grant_url:?} does not match --meter-api-tls {tls_mode:?}: https with TLS, http only with `off`");
    }
    let meter_tls = match wants_tls {
        true => {
            let names = agentgate::domain::meter_tls::names(&grant_url, &operator_namespace).map_err(anyhow::Error::msg)?;
            Some(
                controller::meter_tls::MeterTls::start(
                    client.clone(),
                    operator_namespace.clone(),
                    args.meter_api_tls_secret.clone(),
                    tls_mode,
                    names,
                )
                .await?,
            )
        }
        false => {
            tracing::warn!("the meter API serves plain HTTP (--meter-api-tls off): for development only");
            None
        }
    };
    let settings = Settings {
        namespace: args.namespace,
        approval_floor: args.approval_floor,
        approval_tiers: args.approval_tiers,
        approval_timeout_seconds: (args.approval_timeout_seconds > 0).then_some(args.approval_timeout_seconds as i64),
        field_manager: "agentgate".into(),
        discovery_namespace_selector: args.discovery_namespace_selector,
        state_namespace: lease_namespace.clone(),
        price_config_map: args.price_config_map,
        vote_wait: std::time::Duration::from_millis(args.vote_wait_ms),
        max_concurrent_reconciles: args.max_concurrent_reconciles,
        voters: agentgate::domain::tally::VoterPolicy::new(
            args.robot_voters.iter().map(String::as_str).filter(|r| !r.trim().is_empty()),
            args.max_robot_votes,
        )
        .map_err(|e| anyhow::anyhow!("--robot-voters: {e}"))?,
        meter: agentgate::domain::meter_sidecar::MeterConfig {
            image: args.meter_image,
            keys_secret: args.meter_keys_secret,
            openai_upstream: args.meter_openai_upstream.filter(|u| !u.is_empty()),
            anthropic_upstream: args.meter_anthropic_upstream.filter(|u| !u.is_empty()),
            budget_mode: args.meter_budget_mode,
            grant_url,
        },
        meter_api_tls: meter_tls.clone().map(controller::meter_tls::LiveCa),
    };
    tracing::info!(namespace = ?settings.namespace, approval_floor = settings.approval_floor, models = prices.models.len(), "starting agentgate");

    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        }
    };
    let stop_tx = Arc::new(stop_tx);
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            agentgate::signal::shutdown_signal().await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        }
    });

    let jobs_store = Arc::new(std::sync::RwLock::new(None));
    let server =
        agentgate::server::serve(args.metrics_addr, args.debug_memory, metrics.clone(), health.clone(), jobs_store.clone(), shutdown());
    // Every replica listens; only the leader grants (a standby answers 503 and the meter retries,
    // reaching the leader through the Service's other endpoint).
    let meter_api = controller::meter_api::MeterApi::new(
        client.clone(),
        settings.namespace.clone(),
        settings.field_manager.clone(),
        health.clone(),
        metrics.clone(),
    );
    let acceptor = meter_tls.as_ref().map(|t| t.acceptor()).transpose()?;
    if let Some(tls) = meter_tls {
        tokio::spawn(tls.keep_fresh(shutdown()));
    }
    let meter_api = controller::meter_api::serve(args.meter_api_listen, meter_api, acceptor, shutdown());
    let operator = async {
        // Replicas watching one namespace elect among themselves; cluster-wide ones share one lease.
        let lease = match &settings.namespace {
            Some(ns) => format!("agentgate-{ns}"),
            None => "agentgate".to_string(),
        };
        let identity = agentgate::leader::identity();
        let mut campaign = match args.leader_election {
            true => Some(agentgate::leader::campaign(&lease, &lease_namespace, &identity).await?),
            false => None,
        };
        // The price ConfigMap's edits apply on top of these, the prices the operator started with.
        let base_prices = prices.clone();
        let prices = Arc::new(RwLock::new(prices));
        // One term of leadership per turn. A leader that loses its lease (it could not renew it
        // through an apiserver outage, say) stops writing at once and stands by again, rather than
        // exiting: the process, its health endpoint and its metrics stay up, and it leads again
        // once the lease is free. The watches and their caches, started at the first term, stay
        // up in between (controller/watches.rs says why not before it), so a new term relists
        // nothing.
        let mut watches: Option<controller::watches::Watches> = None;
        loop {
            if let Some(campaign) = campaign.as_mut() {
                tracing::info!(%identity, lease = %format!("{lease_namespace}/{lease}"), "standing by for leadership");
                let watches_ended = async {
                    match watches.as_mut() {
                        Some(watches) => watches.ended().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    won = campaign.leading.wait_for(|leads| *leads) => { won?; }
                    _ = shutdown() => break,
                    () = watches_ended => anyhow::bail!("a watch task stopped"),
                }
                tracing::info!(%identity, "became the leader");
            }
            let mut leading = campaign.as_ref().map(|c| c.leading.clone());
            let lost = async {
                let Some(leading) = leading.as_mut() else { return std::future::pending::<()>().await };
                // An error means the lease manager stopped: the lease will lapse just the same.
                let _ = leading.wait_for(|leads| !*leads).await;
            };
            health.leading.store(true, std::sync::atomic::Ordering::Relaxed);
            let replay = watches.is_some();
            let kept = watches.get_or_insert_with(|| {
                controller::watches::Watches::start(
                    &client,
                    &settings,
                    metrics.clone(),
                    health.clone(),
                    prices.clone(),
                    base_prices.clone(),
                )
            });
            let run = controller::lead(
                client.clone(),
                settings.clone(),
                prices.clone(),
                metrics.clone(),
                health.clone(),
                jobs_store.clone(),
                kept,
                replay,
                futures::FutureExt::shared(Box::pin(shutdown())),
            );
            // Losing the lease drops the controllers mid-flight: no write may start after it.
            let lost_leadership = tokio::select! {
                () = run => false,
                () = lost => true,
            };
            health.leading.store(false, std::sync::atomic::Ordering::Relaxed);
            kept.stand_by();
            *jobs_store.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            *health.memory_report.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            *health.agent_pods.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            metrics.forget_leader_state();
            if !lost_leadership || *stop_rx.borrow() {
                break;
            }
            tracing::error!("lost the leader lease; stopped writing so that only one replica writes");
        }
        if let Some(campaign) = campaign {
            campaign.resign().await;
        }
        anyhow::Ok(())
    };
    let (served, metered, operated) = tokio::join!(server, meter_api, operator);
    served?;
    metered?;
    operated?;
    tracing::info!("stopped");
    Ok(())
}
