//! `agentgate review`: a reviewer loop that votes on each awaiting generation once, by policy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use super::judge::{Judgement, combine};
use super::model::Model;
use super::policy::{Evaluation, Policy, evaluate};
use super::vote::{Ballot, VoteError, cast_vote, whoami};
use crate::api::{AgentJob, JobPhase, REQUESTED_BY, SPEC_EDITED_BY};
use crate::signal::shutdown_signal;

#[derive(clap::Args, Debug)]
pub struct ReviewArgs {
    /// Category whose jobs to review; repeatable or comma-separated. The identity running the
    /// reviewer must be a head of each (RBAC `approve` on `categories`), or its votes won't count.
    #[arg(long = "category", required = true, value_delimiter = ',')]
    pub categories: Vec<String>,
    /// YAML review policy: `maxCostUSD: "1.00"`, optional `allowedTools: [..]`,
    /// `allowedImages: [prefix, ..]`, `maxRetries: N` and `model: {url, model, ...}` (a model
    /// asked, through the agent meter, for a judgement on jobs within those limits).
    #[arg(long)]
    pub policy: PathBuf,
    /// Review jobs in this namespace only (default: all namespaces).
    #[arg(long)]
    pub namespace: Option<String>,
    /// How often to retry votes that failed (seconds).
    #[arg(long, default_value_t = 30)]
    pub retry_seconds: u64,
}

struct Reviewer {
    client: Client,
    me: String,
    policy: Policy,
    /// Asked about jobs within the policy's limits, when the policy names one.
    model: Option<Model>,
    categories: BTreeSet<String>,
    /// (uid, generation) already voted on, or deliberately left alone.
    done: BTreeSet<(String, i64)>,
    /// Jobs whose vote failed and should be tried again: (namespace, name) → latest copy.
    retry: BTreeMap<(String, String), AgentJob>,
    /// Verdicts (uid, generation) whose vote failed to be cast: the retry casts the same one, so
    /// the model is asked, and paid, once per generation.
    judged: BTreeMap<(String, i64), super::policy::Verdict>,
}

impl Reviewer {
    async fn consider(&mut self, job: &AgentJob) {
        let namespace = job.namespace().unwrap_or_default();
        let name = job.name_any();
        let key = (namespace.clone(), name.clone());
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let generation = job.metadata.generation.unwrap_or(1);
        if !self.categories.contains(&job.spec.category) || self.done.contains(&(uid.clone(), generation)) {
            self.retry.remove(&key);
            return;
        }
        if job.status.as_ref().and_then(|s| s.phase) != Some(JobPhase::AwaitingApproval) {
            self.retry.remove(&key);
            return;
        }
        if job.annotations().get(REQUESTED_BY) == Some(&self.me) {
            tracing::info!(job = %name, %namespace, generation, "not reviewing a job this reviewer created: its vote would not count");
            self.done.insert((uid, generation));
            return;
        }
        if job.annotations().get(SPEC_EDITED_BY).is_some_and(|editors| editors.split('\n').any(|e| *e == self.me)) {
            tracing::info!(job = %name, %namespace, generation, "not reviewing a job whose spec this reviewer changed: its vote would not count");
            self.done.insert((uid, generation));
            return;
        }
        let verdict = match evaluate(&self.policy, job) {
            Evaluation::Wait(why) => {
                tracing::debug!(job = %name, %namespace, generation, %why, "not voting yet");
                return;
            }
            Evaluation::Vote(v) => v,
        };
        let judged = self.judged.remove(&(uid.clone(), generation));
        let verdict = match judged {
            // The limits were checked afresh above: only the model's part is reused.
            Some(v) if verdict.decision == crate::api::Decision::Approve => Judgement::Vote(v),
            _ => self.judge(job, verdict).await,
        };
        let verdict = match verdict {
            Judgement::Vote(v) => v,
            Judgement::Abstain(why) => {
                // Fail closed: no approval without a judgement; a human (or a spec change) decides.
                tracing::warn!(job = %name, %namespace, generation, %why, "not voting");
                self.done.insert((uid, generation));
                self.retry.remove(&key);
                return;
            }
        };
        let ballot = Ballot { decision: verdict.decision, reason: Some(verdict.reason.clone()), confidence: Some(verdict.confidence) };
        match cast_vote(&self.client, job, &self.me, &ballot).await {
            Ok(vote) => {
                tracing::info!(job = %name, %namespace, generation, vote = %vote.name_any(), decision = ?verdict.decision,
                    confidence = verdict.confidence, reason = %verdict.reason, "voted");
                self.done.insert((uid, generation));
                self.retry.remove(&key);
            }
            Err(VoteError::AlreadyVoted { vote, decision, .. }) => {
                tracing::info!(job = %name, %namespace, generation, %vote, ?decision, "already voted on this generation");
                self.done.insert((uid, generation));
                self.retry.remove(&key);
            }
            Err(e) => {
                tracing::warn!(job = %name, %namespace, generation, error = %e, "could not vote; will retry");
                self.retry.insert(key, job.clone());
                self.judged.insert((uid, generation), verdict);
            }
        }
    }
}

impl Reviewer {
    /// The policy's verdict, with the model's judgement when the policy names a model and the
    /// job is within its limits (outside them the model is not asked: the limits decide).
    async fn judge(&self, job: &AgentJob, verdict: super::policy::Verdict) -> Judgement {
        let Some(model) = self.model.as_ref().filter(|_| verdict.decision == crate::api::Decision::Approve) else {
            return Judgement::Vote(verdict);
        };
        let opinion = model.ask(job, &verdict.reason).await;
        if let Err(why) = &opinion {
            tracing::warn!(job = %job.name_any(), model = %model.settings.model, error = %why, "the model gave no judgement");
        }
        combine(&verdict, &model.settings, opinion)
    }
}

/// Watches the categories' jobs and votes on each generation awaiting approval, once, until
/// SIGTERM or Ctrl-C.
pub async fn run(args: ReviewArgs) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(&args.policy).map_err(|e| anyhow::anyhow!("reading review policy {}: {e}", args.policy.display()))?;
    let policy = Policy::from_yaml(&text).map_err(anyhow::Error::msg)?;
    let model = policy.model.clone().map(Model::new).transpose()?;
    let categories: BTreeSet<String> = args.categories.iter().map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
    anyhow::ensure!(!categories.is_empty(), "give at least one --category");

    let client = Client::try_default().await?;
    let me = whoami(&client).await?;
    tracing::info!(reviewer = %me, categories = ?categories, namespace = ?args.namespace, max_cost_usd = %policy.max_cost,
        allowed_tools = ?policy.allowed_tools, allowed_images = ?policy.allowed_images, max_retries = ?policy.max_retries,
        model = ?policy.model.as_ref().map(|m| format!("{} at {}", m.model, m.url)), "starting reviewer");

    for category in &categories {
        warn_unless_head(&client, &me, category, args.namespace.as_deref()).await;
    }

    let api: Api<AgentJob> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // One watch per category, filtered by the apiserver on the CRD's selectable field.
    let streams = categories
        .iter()
        .map(|c| watcher(api.clone(), watcher::Config::default().fields(&format!("spec.category={c}"))).default_backoff().boxed());
    let mut events = futures::stream::select_all(streams);
    let mut reviewer =
        Reviewer { client, me, policy, model, categories, done: BTreeSet::new(), retry: BTreeMap::new(), judged: BTreeMap::new() };
    let mut retry = tokio::time::interval(Duration::from_secs(args.retry_seconds.max(1)));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(job) | watcher::Event::InitApply(job))) => reviewer.consider(&job).await,
                Some(Ok(watcher::Event::Delete(job))) => {
                    reviewer.retry.remove(&(job.namespace().unwrap_or_default(), job.name_any()));
                    let uid = job.metadata.uid.unwrap_or_default();
                    reviewer.done.retain(|(u, _)| *u != uid);
                    reviewer.judged.retain(|(u, _), _| *u != uid);
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "watching AgentJobs failed; retrying"),
                None => break,
            },
            _ = retry.tick() => {
                let pending: Vec<AgentJob> = reviewer.retry.values().cloned().collect();
                for job in pending {
                    reviewer.consider(&job).await;
                }
            }
        }
    }
    Ok(())
}

/// A reviewer that is no head of a category casts votes that never count: say so at start.
/// Only a warning, since a RoleBinding may make it a head in some namespaces only.
async fn warn_unless_head(client: &Client, me: &str, category: &str, namespace: Option<&str>) {
    use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(crate::api::GROUP.into()),
                resource: Some("categories".into()),
                verb: Some("approve".into()),
                name: Some(category.into()),
                namespace: namespace.map(str::to_string),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let scope = namespace.map(|ns| format!("in namespace {ns}")).unwrap_or_else(|| "cluster-wide".into());
    match Api::<SelfSubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await {
        Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {
            tracing::info!(%category, %scope, "this reviewer is a head of the category")
        }
        Ok(_) => tracing::warn!(reviewer = %me, %category, %scope,
            "RBAC does not let this reviewer approve categories/{category} {scope}: its votes count only where a RoleBinding makes it a head"),
        Err(e) => tracing::warn!(%category, error = %e, "could not check whether this reviewer is a head of the category"),
    }
}
