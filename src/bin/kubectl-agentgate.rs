//! `kubectl agentgate`: vote on AgentJobs as yourself and see how the votes were counted; ask
//! what a job would cost before you submit it; see the tools, capacity and quotas jobs wait on;
//! and what the cluster's jobs used.
//!
//! Installed on the PATH as `kubectl-agentgate`, kubectl runs it as `kubectl agentgate ...`.
//! The voter is never typed: it is the username the apiserver authenticates you as (a
//! SelfSubjectReview), which is what the admission policy demands of `spec.voter`.

use agentgate::api::{AgentJob, AgentTool, Decision, JobPhase};
use agentgate::controller::{estimator_store, price_table};
use agentgate::domain::learning::EstimatorState;
use agentgate::domain::pricing::PriceTable;
use agentgate::plugin;
use agentgate::review::{Ballot, VoteError, cast_vote, get_job, render_votes, vote_rows, votes_on, whoami};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ResourceQuota};
use kube::Api;
use kube::api::ListParams;
use kube::{Client, ResourceExt};

#[derive(Parser)]
#[command(
    name = "kubectl-agentgate",
    bin_name = "kubectl agentgate",
    version,
    about = "Vote on agentgate AgentJobs, estimate them before submitting, and see infrastructure and usage",
    after_help = "Uses your kubeconfig (KUBECONFIG or ~/.kube/config) and its current context."
)]
struct Cli {
    /// Namespace of the job (default: the kubeconfig context's namespace, else "default").
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Output of estimate, infra, stats, recommend and history: a table, or the report as JSON or
    /// YAML; new and rerun print the job as JSON or YAML instead of creating it.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Approve the job's current generation, shown with its spec before the vote is created.
    Approve {
        job: String,
        /// The generation you reviewed: the vote is refused if the job is at another one.
        #[arg(long)]
        generation: Option<i64>,
        #[arg(long)]
        reason: Option<String>,
        /// How sure you are, in percent.
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..=100))]
        confidence: Option<i32>,
    },
    /// Reject the job's current generation; one counted Reject rejects the job.
    Reject {
        job: String,
        /// The generation you reviewed: the vote is refused if the job is at another one.
        #[arg(long)]
        generation: Option<i64>,
        #[arg(long)]
        reason: String,
        /// How sure you are, in percent.
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..=100))]
        confidence: Option<i32>,
    },
    /// List the job's votes: who voted, whether each counts and why.
    Votes { job: String },
    /// The agent's result (`status.output`) as JSON, or YAML with -o yaml: the same document,
    /// with every character a terminal would act on escaped.
    Output { job: String },
    /// What a job would cost, estimated as the operator would: the cluster's price table and
    /// what it learned from earlier runs of the same jobType. Nothing is created.
    Estimate {
        /// The AgentJob manifest (YAML or JSON); `-` reads standard input.
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
        /// Namespace the operator runs in (its price table and learned state live there).
        #[arg(long, default_value = "agentgate-system")]
        operator_namespace: String,
        /// The price table ConfigMap in that namespace (as the chart names it).
        #[arg(long, default_value = "agentgate-prices")]
        price_config_map: String,
    },
    /// Tools with their readiness and rate limit in use, node capacity left for CPU, memory and
    /// GPUs, and namespace quotas (of the namespace, or all with -A).
    Infra {
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Jobs by phase; tokens and USD by category and model; estimate accuracy and approval
    /// latency, over jobs that finished (or were approved) within the window.
    Stats {
        /// How far back: 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = agentgate::plugin::parse_window)]
        since: i64,
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Cost advice from the namespace's finished jobs: a cheaper model that did as well, unused
    /// prompt caching, budgets far from what runs cost, retries and supporting agents that burn
    /// the spend; each with its evidence and estimated saving.
    Recommend(agentgate::cli::recommend::RecommendArgs),
    /// Render an AgentJobTemplate into a complete AgentJob and create it as you; with -o yaml or
    /// json, print it instead (for Git and Argo CD).
    New(agentgate::cli::templates::NewArgs),
    /// A job's spec generations: digest, approvals, attempts, usage and result of each.
    History(agentgate::cli::history::HistoryArgs),
    /// Create a new job from a recorded generation of a job (-o yaml|json prints it); being a
    /// new job, it needs its own approvals.
    Rerun(agentgate::cli::history::RerunArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

fn print_report<R: serde::Serialize>(output: Output, report: &R, table: impl FnOnce(&R) -> String) -> anyhow::Result<()> {
    match output {
        Output::Table => print!("{}", table(report)),
        Output::Json => println!("{}", agentgate::cli::json_for_terminal(report)?),
        Output::Yaml => print!("{}", agentgate::cli::yaml_for_terminal(report)?),
    }
    Ok(())
}

/// new and rerun create unless asked for JSON or YAML; history prints a table unless asked.
fn emit(output: Output) -> agentgate::cli::Emit {
    match output {
        Output::Table => agentgate::cli::Emit::Create,
        Output::Json => agentgate::cli::Emit::Json,
        Output::Yaml => agentgate::cli::Emit::Yaml,
    }
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("starting the tokio runtime");
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {}", agentgate::domain::terminal_text::lines(&format!("{e:#}")));
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| anyhow::anyhow!("loading kubeconfig: {e}"))?;
    let namespace = cli.namespace.unwrap_or_else(|| client.default_namespace().to_string());
    match cli.command {
        Command::Approve { job, generation, reason, confidence } => {
            vote(&client, &namespace, &job, generation, Ballot { decision: Decision::Approve, reason, confidence }).await
        }
        Command::Reject { job, generation, reason, confidence } => {
            vote(&client, &namespace, &job, generation, Ballot { decision: Decision::Reject, reason: Some(reason), confidence }).await
        }
        Command::Votes { job } => {
            let job = get_job(&client, &namespace, &job).await?;
            let votes = votes_on(&client, &namespace, &job.name_any()).await?;
            print!("{}", render_votes(&job, &vote_rows(&job, &votes)));
            Ok(())
        }
        Command::Output { job } => {
            let job = get_job(&client, &namespace, &job).await?;
            print!("{}", agentgate::cli::output_for_terminal(&job, matches!(cli.output, Output::Yaml))?);
            Ok(())
        }
        Command::Estimate { file, operator_namespace, price_config_map } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?
            };
            let job: AgentJob = serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not an AgentJob: {e}", file.display()))?;
            let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &operator_namespace);
            async fn data(api: &Api<ConfigMap>, name: &str, key: &str) -> anyhow::Result<Option<String>> {
                match api.get_opt(name).await {
                    Ok(cm) => Ok(cm.and_then(|cm| cm.data?.remove(key))),
                    Err(e) => Err(anyhow::anyhow!("reading configmap {}/{name}: {e}", api.namespace().unwrap_or_default())),
                }
            }
            let prices = match data(&config_maps, &price_config_map, price_table::KEY).await? {
                Some(yaml) => PriceTable::with_overrides_from_yaml(&yaml).map_err(anyhow::Error::msg)?,
                None => PriceTable::builtin(),
            };
            let (state, warning) =
                EstimatorState::from_json(data(&config_maps, estimator_store::CONFIG_MAP, estimator_store::KEY).await?.as_deref());
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            let report = plugin::estimate_report(&job, &state, &prices).map_err(|e| anyhow::anyhow!("{e}"))?;
            print_report(cli.output, &report, plugin::EstimateReport::render)
        }
        Command::Infra { all_namespaces } => {
            let tools = Api::<AgentTool>::all(client.clone()).list(&Default::default()).await?.items;
            let nodes = Api::<Node>::all(client.clone()).list(&Default::default()).await?.items;
            let pods = Api::<Pod>::all(client.clone())
                .list(&ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed"))
                .await?
                .items;
            let quota_api =
                if all_namespaces { Api::<ResourceQuota>::all(client.clone()) } else { Api::namespaced(client.clone(), &namespace) };
            let quotas = quota_api.list(&Default::default()).await?.items;
            fn arcs<T>(v: Vec<T>) -> Vec<std::sync::Arc<T>> {
                v.into_iter().map(std::sync::Arc::new).collect()
            }
            let report = plugin::infra_report(&tools, &arcs(nodes), &arcs(pods), &arcs(quotas));
            print_report(cli.output, &report, plugin::InfraReport::render)
        }
        Command::New(args) => agentgate::cli::templates::new(&client, &namespace, args, emit(cli.output)).await,
        Command::History(args) => agentgate::cli::history::history(&client, &namespace, args, emit(cli.output)).await,
        Command::Rerun(args) => agentgate::cli::history::rerun(&client, &namespace, args, emit(cli.output)).await,
        Command::Stats { since, all_namespaces } => {
            let api: Api<AgentJob> = if all_namespaces { Api::all(client.clone()) } else { Api::namespaced(client.clone(), &namespace) };
            let jobs = api.list(&Default::default()).await?.items;
            let report = plugin::stats_report(&jobs, k8s_openapi::jiff::Timestamp::now(), since);
            print_report(cli.output, &report, plugin::StatsReport::render)
        }
        Command::Recommend(args) => {
            let report = agentgate::cli::recommend::report(&client, &namespace, &args).await?;
            print_report(cli.output, &report, agentgate::cli::recommend::render)
        }
    }
}

async fn vote(client: &Client, namespace: &str, job_name: &str, reviewed: Option<i64>, ballot: Ballot) -> anyhow::Result<()> {
    let me = whoami(client).await?;
    let job = get_job(client, namespace, job_name).await?;
    // The vote approves what is shown here: the generation it names and that generation's spec.
    plugin::check_vote_target(reviewed, &job, &job).map_err(anyhow::Error::msg)?;
    print!("{}", plugin::vote_preview(&job, &format!("{:?}", ballot.decision)));
    // Read again right before creating: a change since it was shown refuses the vote.
    let again = get_job(client, namespace, job_name).await?;
    let generation = plugin::check_vote_target(reviewed, &job, &again).map_err(anyhow::Error::msg)?;
    match job.status.as_ref().and_then(|s| s.phase) {
        Some(phase) if phase.is_terminal() || phase == JobPhase::Running => {
            eprintln!("note: {namespace}/{job_name} is {}; a vote no longer changes it", phase.as_str())
        }
        _ => {}
    }
    match cast_vote(client, &job, &me, &ballot).await {
        Ok(vote) => {
            println!(
                "approvalvote/{} created: {me} votes {:?} on {namespace}/{job_name} generation {generation} (uid {})",
                vote.name_any(),
                ballot.decision,
                job.metadata.uid.as_deref().unwrap_or("?")
            );
            println!("See whether it counted: kubectl agentgate votes {job_name} -n {namespace}");
            Ok(())
        }
        Err(e @ VoteError::AlreadyVoted { .. }) => Err(e.into()),
        Err(e) => Err(anyhow::Error::from(e).context(format!("voting on {namespace}/{job_name} as {me}"))),
    }
}
