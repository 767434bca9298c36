//! `kubectl agentgate`: vote on AgentJobs as yourself, and see how the votes were counted.
//!
//! Installed on the PATH as `kubectl-agentgate`, kubectl runs it as `kubectl agentgate ...`.
//! The voter is never typed: it is the username the apiserver authenticates you as (a
//! SelfSubjectReview), which is what the admission policy demands of `spec.voter`.

use agentgate::api::{Decision, JobPhase};
use agentgate::review::{Ballot, VoteError, cast_vote, get_job, render_votes, vote_rows, votes_on, whoami};
use clap::{Parser, Subcommand};
use kube::{Client, ResourceExt};

#[derive(Parser)]
#[command(
    name = "kubectl-agentgate",
    bin_name = "kubectl agentgate",
    version,
    about = "Vote on agentgate AgentJobs as yourself, and see how the votes were counted",
    after_help = "Uses your kubeconfig (KUBECONFIG or ~/.kube/config) and its current context."
)]
struct Cli {
    /// Namespace of the job (default: the kubeconfig context's namespace, else "default").
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Approve the job's current generation.
    Approve {
        job: String,
        #[arg(long)]
        reason: Option<String>,
        /// How sure you are, in percent.
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..=100))]
        confidence: Option<i32>,
    },
    /// Reject the job's current generation; one counted Reject rejects the job.
    Reject {
        job: String,
        #[arg(long)]
        reason: String,
        /// How sure you are, in percent.
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..=100))]
        confidence: Option<i32>,
    },
    /// List the job's votes: who voted, whether each counts and why.
    Votes { job: String },
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("starting the tokio runtime");
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| anyhow::anyhow!("loading kubeconfig: {e}"))?;
    let namespace = cli.namespace.unwrap_or_else(|| client.default_namespace().to_string());
    match cli.command {
        Command::Approve { job, reason, confidence } => {
            vote(&client, &namespace, &job, Ballot { decision: Decision::Approve, reason, confidence }).await
        }
        Command::Reject { job, reason, confidence } => {
            vote(&client, &namespace, &job, Ballot { decision: Decision::Reject, reason: Some(reason), confidence }).await
        }
        Command::Votes { job } => {
            let job = get_job(&client, &namespace, &job).await?;
            let votes = votes_on(&client, &namespace, &job.name_any()).await?;
            print!("{}", render_votes(&job, &vote_rows(&job, &votes)));
            Ok(())
        }
    }
}

async fn vote(client: &Client, namespace: &str, job_name: &str, ballot: Ballot) -> anyhow::Result<()> {
    let me = whoami(client).await?;
    let job = get_job(client, namespace, job_name).await?;
    let generation = job.metadata.generation.unwrap_or(1);
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
