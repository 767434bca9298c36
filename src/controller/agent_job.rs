//! AgentJob reconciler: dereference → decide → build → apply → report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::error::{ApplyError, ObserveError};
use super::snapshot::{self, pod_need, tool_view, vote_view};
use super::{Caches, Context, Error, Result, UNSYNCED_RETRY, approval_vote};
use crate::api::{AgentJob, AgentJobStatus, AttemptResult, JobPhase};
use crate::domain::conditions::set_condition;
use crate::domain::decide::{self, Observed, Plan, approvals_required, condition, job_type};
use crate::domain::readiness::{self, PodNeed, Readiness, ReadinessInput, ToolNeed};
use crate::domain::tally::{JobIdentity, tally};
use crate::metrics::JobTypeLabels;

// The span covers the whole reconcile, API calls included (kube-runtime's own "reconciling object"
// span is only entered while the future is built); with the `otel` feature it becomes a trace.
#[tracing::instrument(name = "reconcile AgentJob", skip_all, fields(namespace = job.metadata.namespace.as_deref().unwrap_or_default(), job = %job.name_any()))]
pub async fn reconcile(job: Arc<AgentJob>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&job, &ctx).await;
    ctx.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    ctx.metrics.count_reconcile("AgentJob", result.as_ref().map(|_| ()).map_err(Error::metric_label));
    result
}

pub fn error_policy(job: Arc<AgentJob>, error: &Error, _ctx: Arc<Context>) -> Action {
    let conflict = error.is_conflict();
    if conflict {
        // Our cached copy was stale; the watch brings the new one and triggers us again.
        tracing::debug!(job = %job.name_any(), "status write raced a newer version; retrying");
    } else {
        tracing::warn!(job = %job.name_any(), namespace = ?job.namespace(), error = error.metric_label(), "reconcile failed: {error}");
    }
    Action::requeue(std::time::Duration::from_secs(if conflict { 1 } else { 5 }))
}

async fn reconcile_inner(job: &AgentJob, ctx: &Context) -> Result<Action> {
    if !ctx.caches.synced() || !ctx.identity.verified() {
        return Ok(Action::requeue(UNSYNCED_RETRY));
    }
    if job.metadata.deletion_timestamp.is_some() {
        // Pods go with the job through their owner reference; a foreground deletion waits for
        // them, so their usage finalizer goes now (nothing of a deleted job is recorded). An
        // orphaning delete would leave them running with no job: those still running are
        // stopped first, whichever the propagation (lost_pods.rs; the sweep stops those the
        // garbage collector took the owner off before this reconcile saw them).
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let namespace = job.namespace().unwrap_or_default();
        let owned: Vec<_> = pod_candidates(&ctx.caches, &namespace, &uid).filter(|p| snapshot::is_job_pod(p, &namespace, &uid)).collect();
        for pod in &owned {
            super::lost_pods::stop(ctx, pod).await?;
        }
        super::pod_finalizer::release_settled(ctx, job, &owned, &old_status_of(job)).await?;
        ctx.pod_expectations.forget(&uid);
        ctx.stored_revisions.forget(&uid);
        return Ok(Action::await_change());
    }
    let namespace = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let uid = job.metadata.uid.clone().unwrap_or_default();
    if ctx.status_writes.predates_own_write(&uid, job.resource_version().as_deref()) {
        // A vote or Pod event woke us before the watch delivered our own last status write: any
        // decision now would be made on a stale copy and refused with a 409. That write's watch
        // event triggers the reconcile that counts; the requeue is only a safety net.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    // Its Pods that lost their controller ownerReference are taken back before anything reads
    // its Pods: read without them, the running attempt failed as deleted and a retry started
    // beside a Pod that ran on (lost_pods.rs, tests/gate_attacks.rs).
    let lost: Vec<_> =
        pod_candidates(&ctx.caches, &namespace, &uid).filter(|p| snapshot::lost_job_pod(p, &namespace, &name, &uid)).collect();
    if !lost.is_empty() {
        return super::lost_pods::take_back(job, ctx, &lost).await;
    }
    let fetched;
    let job = match whole(job, ctx).await? {
        Some(Whole::Fetched(whole)) => {
            fetched = whole;
            &*fetched
        }
        Some(Whole::Cached) => job,
        // Deleted, or replaced by a namesake: the watch brings that.
        None => return Ok(Action::await_change()),
    };
    let generation = job.metadata.generation.unwrap_or(1);
    let old_status = job.status.clone().unwrap_or_default();

    // Dereference: everything from the watch caches. Only the objects that matter are taken out
    // (never a whole cache's `state()`): up to `--max-concurrent-reconciles` are in flight, each
    // holding what it took across its API calls.
    // A job's Pods are the Pods in its namespace that it controls (ownerReference), never those
    // that merely carry its uid label: a decoy labelled with a victim's uid must neither start
    // nor finish the victim's job (tests/gate_attacks.rs). Decoys are reported, not read.
    // The index names the candidates (index.rs); the same two predicates decide.
    // The Pods expected are read before the Pod cache: a Pod the watch delivers in between is then
    // in one or the other. Read after it, a Pod delivered meanwhile was in neither, and was
    // POSTed again (0.001 per job in `make bench`).
    let (mut expected_pods, expected_for) = ctx.pod_expectations.pending(&uid, Instant::now());
    let (owned, decoys): (Vec<_>, Vec<_>) = pod_candidates(&ctx.caches, &namespace, &uid)
        .filter(|p| snapshot::is_job_pod(p, &namespace, &uid) || snapshot::claims_job_falsely(p, &namespace, &uid))
        .partition(|p| snapshot::is_job_pod(p, &namespace, &uid));
    let pods: Vec<_> = owned.iter().filter_map(|p| snapshot::pod_view(p)).collect();
    let vote_names = ctx.caches.index.votes().naming(&namespace, &name);
    let votes: Vec<_> = vote_names
        .iter()
        .filter_map(|vote| ctx.caches.votes.get(&ObjectRef::new(vote).within(&namespace)))
        .filter(|v| v.namespace().as_deref() == Some(namespace.as_str()) && v.spec.job_ref.name == name)
        .collect();
    let vote_views: Vec<_> = votes.iter().map(|v| vote_view(v)).collect();
    // The cached job leaves its requester to an index (controller::slim::job); a job read whole
    // from the API carries it.
    // The spec's other editors come with it: both annotations are kept by admission on every
    // write (deploy/admission/identity.yaml).
    let (author, spec_editors, writer_groups) = match job.annotations().get(REQUESTED_BY) {
        Some(author) => {
            let annotation = |key: &str| job.annotations().get(key).cloned().unwrap_or_default();
            (Some(author.clone()), annotation(SPEC_EDITED_BY), annotation(crate::api::WRITER_GROUPS))
        }
        None => {
            let requesters = ctx.caches.index.requesters();
            (requesters.of(&uid), requesters.editors_of(&uid).unwrap_or_default(), requesters.writer_groups_of(&uid).unwrap_or_default())
        }
    };
    let author = author.as_deref();
    let identity = JobIdentity { name: &name, uid: &uid, generation, author, spec_editors: &spec_editors };
    let writers = super::access::Writers { author, editors: &spec_editors, groups: &writer_groups };
    let voters = &ctx.settings.voters;
    // Only votes that could count in some tally below cost SubjectAccessReviews (the head check,
    // and act-as checks against each other): the rest are settled by the tally alone
    // (tests/vote_review_flood.rs).
    let generations: Vec<i64> = std::iter::once(generation)
        .chain(old_status.attempts.iter().map(|a| a.generation))
        .chain(pods.iter().filter_map(|p| p.generation))
        .collect();
    let reviewable: Vec<_> =
        vote_views.iter().filter(|v| crate::domain::tally::may_count(&identity, &generations, v, voters)).cloned().collect();
    let heads = super::access::head_verdicts(job, ctx, &reviewable, &writers).await?;
    let required = approvals_required(&job.spec, ctx.settings.approval_floor);
    // Votes approve where the job's tools point too (tool_pinning.rs): revoked votes are not tallied.
    let endpoints = super::tool_pinning::current(job, &ctx.caches);
    let pinning = super::tool_pinning::before(&old_status, generation, &endpoints, &vote_views);
    let tallied = pinning.tallied(&vote_views);
    // Votes are only as true as the identity admission policies make them (identity_policies.rs).
    let untrusted = ctx.identity.block(author);
    let tally_for = |generation: i64| {
        let mut t = tally(&JobIdentity { generation, ..identity.clone() }, required, &tallied, &heads, voters);
        if let Some((_, why)) = &untrusted {
            super::identity_policies::void_votes(&mut t, why);
        }
        t
    };
    let mut counted = tally_for(generation);
    pinning.mark(&mut counted);
    // The current votes, tallied for every other generation an attempt or a Pod says it runs:
    // Pods are created or adopted only for a generation these approve, never on the word of status.
    // They pass the same filters as the current tally (revoked and unproven votes count nowhere).
    let other_tallies: std::collections::BTreeMap<i64, _> = old_status
        .attempts
        .iter()
        .map(|a| a.generation)
        .chain(pods.iter().filter_map(|p| p.generation))
        .filter(|g| *g != generation)
        .map(|g| (g, tally_for(g)))
        .collect();
    let readiness = if old_status.phase.is_some_and(JobPhase::is_terminal) { Readiness::default() } else { job_readiness(job, ctx) };
    let learned = ctx.learner.state.lock().await.stats(&namespace, &job_type(job));
    // Pods this operator created that the cache does not show yet (pod_expectations.rs).
    expected_pods.retain(|name| !pods.iter().any(|p| &p.name == name));
    let gone_pods = confirm_gone_pods(job, ctx, &pods, &expected_pods).await?;
    let prices = ctx.prices.read().await.clone();

    // Decide.
    let decide_started = Instant::now();
    let mut plan = decide::decide(&Observed {
        job,
        now: now(),
        approval_floor: ctx.settings.approval_floor,
        approval_tiers: &ctx.settings.approval_tiers,
        approval_timeout_seconds: ctx.settings.approval_timeout_seconds,
        prices: &prices,
        learned: learned.as_ref(),
        readiness: &readiness,
        tally: &counted,
        other_tallies: &other_tallies,
        pods: &pods,
        gone_pods: &gone_pods,
        expected_pods: &expected_pods,
    });
    if old_status.estimate.as_ref().map(|e| e.generation) != plan.status.estimate.as_ref().map(|e| e.generation) {
        ctx.metrics.validation_seconds.observe(decide_started.elapsed().as_secs_f64());
    }

    // The identity problem, if any, is the reason given: it must be fixed first.
    if let Some((reason, why)) = &untrusted {
        super::identity_policies::explain(&mut plan, &old_status, reason, why);
    }
    super::tool_pinning::after(&mut plan, &old_status, pinning, endpoints, generation);

    let vote_wait = ctx.vote_lateness.lock().unwrap_or_else(std::sync::PoisonError::into_inner).wait(ctx.settings.vote_wait);
    if let Some(hold) = decide::hold_first_status(&old_status, &plan, job.metadata.creation_timestamp.as_ref(), &now(), &vote_wait) {
        return Ok(Action::requeue(hold));
    }

    // The history entry of this generation goes with this status write; its spec is stored
    // first (spec_history.rs says when it cannot be).
    let history = crate::domain::history::record(&mut plan.status, &old_status, job, &now());
    if let Some(generation) = history.new_generation {
        super::spec_history::store(job, ctx, generation).await?;
    }

    // Build and apply: Pods first, so status never names a Pod that was not created.
    if let Some(attempt) = plan.ensure_attempt {
        match super::agent_pods::ensure_pods(job, ctx, &plan, attempt, &pods, &expected_pods).await {
            Err(Error::Apply(ApplyError::PodNameTaken { pod })) => return pod_name_taken(job, ctx, &old_status, &pod, generation).await,
            other => other?,
        }
    }
    // Usage stored by an earlier write is learned and counted once; the mark goes with this write.
    super::learning_mark::learn_stored(job, ctx, &old_status, &mut plan.status).await;
    super::recommendations::add_on_finish(job, ctx, &old_status, &mut plan.status, &prices);
    if plan.status != old_status {
        write_status(job, ctx, &plan.status).await?;
        ctx.stored_revisions.forget(&uid);
        super::spec_history::prune(job, ctx, &history.dropped).await;
    }
    // How late a started job's approvals came tunes how long new jobs wait for theirs.
    let approvals = plan.status.approval.iter().flat_map(|a| &a.approvers);
    if !plan.status.attempts.is_empty()
        && old_status.attempts.is_empty()
        && let (Some(created), Some(newest)) =
            (&job.metadata.creation_timestamp, approvals.filter_map(|a| a.decided_at.as_ref()).max_by_key(|t| t.0))
    {
        ctx.vote_lateness.lock().unwrap_or_else(std::sync::PoisonError::into_inner).observe(created, newest, ctx.settings.vote_wait);
    }
    if let Some(approval) = &plan.status.approval {
        counted.required = approval.required;
    }
    // Events are queued (sent in the background); the verdicts, sent together, add one round
    // trip to the reconcile instead of one per vote.
    report(job, ctx, &old_status, &plan).await;
    report_decoys(job, ctx, &decoys).await;
    approval_vote::record_verdicts(ctx, &votes, &counted, job).await;
    // Only now that what the Pods told is stored may they go (pod_finalizer.rs). Last, so a
    // failing patch (retried through the error policy) holds up nothing above.
    super::pod_finalizer::release_settled(ctx, job, &owned, &plan.status).await?;
    // Pods still expected are looked at again once their expectation ends, should the watch
    // never show them.
    let expected_for = expected_for.filter(|_| !expected_pods.is_empty());
    Ok(super::resync::next_check_within(&plan.status, ctx.settings.approval_timeout_seconds, expected_for))
}

/// Cached jobs whose `input`, `inputSchema`, `outputSchema`, `description` and agents' `command`,
/// `args` and `env` together take more than this many bytes of JSON are cached without them
/// (`controller::slim::job`).
pub const ELIDE_SPEC_OVER: usize = 1024;
/// Set on such a cached copy only (a tenant's own is not cached); never written to the API.
pub const SPEC_ELIDED: &str = "agentgate.dev/cached-without-input";

enum Whole {
    Cached,
    Fetched(Box<AgentJob>),
}

/// The job with its whole spec, as this reconcile needs it: the cached copy, unless its input and
/// schemas were left out of the cache and it may still read them (to check them against a new
/// generation's estimate, digest and store a new generation's spec, build a Pod). A finished job
/// whose status has seen its generation reads none of them, so it costs no GET on a resync.
/// None: the job is gone or is now another (uid) job of that name.
async fn whole(job: &AgentJob, ctx: &Context) -> Result<Option<Whole>> {
    let status = job.status.as_ref();
    let settled = status.is_some_and(|s| s.phase.is_some_and(JobPhase::is_terminal) && s.observed_generation == job.metadata.generation);
    if !job.annotations().contains_key(SPEC_ELIDED) || settled {
        return Ok(Some(Whole::Cached));
    }
    let (namespace, name) = (job.namespace().unwrap_or_default(), job.name_any());
    // Decoded like the watch (decode.rs): an input nested too deep for serde_json with managedFields.
    let api: Api<super::decode::Decoded<AgentJob>> = Api::namespaced(ctx.client.clone(), &namespace);
    let got =
        api.get_opt(&name).await.map_err(|source| ObserveError::GetJob { namespace: namespace.clone(), job: name.clone(), source })?;
    Ok(got
        .and_then(|decoded| decoded.0.ok())
        .filter(|whole| whole.metadata.uid == job.metadata.uid)
        .map(|whole| Whole::Fetched(Box::new(whole))))
}

/// The cached Pods the index names for the job: those it controls in its namespace and those
/// labelled with its uid anywhere. Callers filter them with `snapshot::is_job_pod`.
fn pod_candidates<'a>(caches: &'a Caches, namespace: &str, uid: &str) -> impl Iterator<Item = Arc<Pod>> + 'a {
    let keys = caches.index.pods().job_candidates(namespace, uid);
    keys.into_iter().filter_map(|key| super::index::cached(&caches.pods, &key))
}

fn old_status_of(job: &AgentJob) -> AgentJobStatus {
    job.status.clone().unwrap_or_default()
}

pub use crate::api::{REQUESTED_BY, SPEC_EDITED_BY};

/// Pods that carry the job's uid label but are not its Pods (another namespace, another or no
/// controller): a Warning Event on the job names them, so an attempt to pose as the job is seen.
async fn report_decoys(job: &AgentJob, ctx: &Context, decoys: &[Arc<Pod>]) {
    if decoys.is_empty() {
        return;
    }
    let names: Vec<String> = decoys.iter().map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())).collect();
    let note = format!(
        "ignored Pod(s) {} carrying this job's uid label: not in the job's namespace or not controlled by the job; \
         they are never adopted or read",
        names.join(", ")
    );
    tracing::warn!(job = %job.name_any(), namespace = ?job.namespace(), pods = ?names, "Pods pose as this job's; ignored");
    ctx.publish_event(&job.object_ref(&()), EventType::Warning, "ForeignPodIgnored", &note, "Reconcile").await;
}

/// Time since the job was created; zero when the clocks disagree or the timestamp is missing.
fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn job_readiness(job: &AgentJob, ctx: &Context) -> Readiness {
    // Only jobs that run or wait for capacity claim nodes, quota or rate limit, and of those only
    // the ones running with the job's tools or waiting at least as urgently can matter here:
    // the index names them; the readiness views filter them as before.
    let jobs = claiming_jobs(job, &ctx.caches);
    let jobs = jobs.as_slice();
    let tools: Vec<(ToolNeed, Option<_>)> = job
        .spec
        .tools
        .iter()
        .map(|t| {
            let need = ToolNeed { name: t.name.clone(), required: t.required, min_rate_limit: t.min_rate_limit };
            let view = ctx.caches.tools.get(&ObjectRef::new(&t.name)).map(|tool| tool_view(&tool, jobs, job));
            (need, view)
        })
        .collect();
    let Some(need) = pod_need(job) else {
        let mut r = Readiness::default();
        r.checks.push(crate::api::ReadinessCheck {
            name: "resources".into(),
            passed: false,
            message: "spec.resources do not parse as quantities".into(),
        });
        r.blocked_reason = Some("InvalidResources");
        return r;
    };
    let nodes: Vec<_> = {
        let pods = ctx.caches.index.pods();
        ctx.caches.nodes.state().iter().map(|node| snapshot::node_view(node, pods.used_on(&node.name_any()))).collect()
    };
    let queued_ahead = queued_ahead_of(job, jobs);
    let namespace = job.namespace().unwrap_or_default();
    let quotas: Vec<_> =
        ctx.caches.index.quotas().in_namespace(&namespace).iter().filter_map(|key| super::index::cached(&ctx.caches.quotas, key)).collect();
    let quotas = snapshot::quota_views(&quotas, &namespace);
    readiness::check(&ReadinessInput { tools: &tools, need: &need, nodes: &nodes, queued_ahead: &queued_ahead, quotas: &quotas })
}

/// Running jobs naming one of `job`'s tools and jobs waiting for resources ahead of it or level.
fn claiming_jobs(job: &AgentJob, caches: &Caches) -> Vec<Arc<AgentJob>> {
    let (priority, created, ..) = snapshot::queue_key(job);
    let keys: std::collections::BTreeSet<_> = {
        let index = caches.index.jobs();
        let running = job.spec.tools.iter().flat_map(|t| index.running_naming(&t.name).collect::<Vec<_>>());
        running.chain(index.waiting_up_to(priority, created)).collect()
    };
    keys.iter().filter_map(|key| super::index::cached(&caches.jobs, key)).collect()
}

fn priority(job: &AgentJob) -> (i32, Option<Time>, String) {
    (job.spec.priority.unwrap_or(500), job.metadata.creation_timestamp.clone(), job.name_any())
}

/// Approved jobs that wait for capacity and go first: more urgent, or as urgent and older, and
/// not kept out by their own namespace's quota (`snapshot::holds_capacity_against`).
fn queued_ahead_of(job: &AgentJob, jobs: &[Arc<AgentJob>]) -> Vec<PodNeed> {
    let mine = priority(job);
    let mut ahead: Vec<(_, PodNeed)> = jobs
        .iter()
        .filter(|j| j.metadata.uid != job.metadata.uid && snapshot::holds_capacity_against(j, job))
        .filter(|j| {
            let s = j.status.as_ref();
            s.and_then(|s| s.phase) == Some(JobPhase::WaitingForResources)
                && s.is_some_and(|s| !s.insufficient_resources.is_empty())
                && s.and_then(|s| crate::domain::conditions::find(&s.conditions, condition::APPROVED)).is_some_and(|c| c.status == "True")
        })
        .filter(|j| {
            let theirs = priority(j);
            (theirs.0, theirs.1.as_ref().map(|t| t.0), &theirs.2) < (mine.0, mine.1.as_ref().map(|t| t.0), &mine.2)
        })
        .filter_map(|j| pod_need(j).map(|n| (priority(j), n)))
        .collect();
    ahead.sort_by(|a, b| (a.0.0, a.0.1.as_ref().map(|t| t.0)).cmp(&(b.0.0, b.0.1.as_ref().map(|t| t.0))));
    ahead.into_iter().map(|(_, n)| n).collect()
}

/// Pods the running attempt recorded but the cache lacks: a GET tells a slow cache from a
/// deleted Pod, so a deleted Pod fails its attempt instead of being created a second time.
/// A Pod this operator created and the watch has yet to show is not looked up: it is on its way.
async fn confirm_gone_pods(job: &AgentJob, ctx: &Context, pods: &[decide::PodView], expected: &[String]) -> Result<Vec<String>> {
    let Some(attempt) = job.status.as_ref().and_then(|s| s.attempts.last()).filter(|a| a.result == AttemptResult::Running) else {
        return Ok(Vec::new());
    };
    let namespace = job.namespace().unwrap_or_default();
    let uid = job.metadata.uid.as_deref().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut gone = Vec::new();
    for name in attempt.pods.iter().filter(|n| !pods.iter().any(|p| &p.name == *n) && !expected.contains(n)) {
        // A Pod of that name the job does not control is not the attempt's: gone as far as the
        // job knows (a forged attempt naming a decoy is dropped, tests/gate_attacks.rs).
        let pod =
            api.get_opt(name).await.map_err(|source| ObserveError::GonePod { namespace: namespace.clone(), pod: name.clone(), source })?;
        if pod.is_none_or(|p| !snapshot::is_job_pod(&p, &namespace, uid)) {
            gone.push(name.clone());
        }
    }
    Ok(gone)
}

/// The job cannot start: its Pod's name belongs to another job's Pod. Said where users look (a
/// condition and a Warning Event), with the rest of the status as it was; looked at again now
/// and then, since the other Pod may go.
async fn pod_name_taken(job: &AgentJob, ctx: &Context, old: &AgentJobStatus, pod: &str, generation: i64) -> Result<Action> {
    let message = ApplyError::PodNameTaken { pod: pod.to_string() }.to_string();
    let mut status = old.clone();
    set_condition(&mut status.conditions, condition::READY, false, "PodNameTaken", message.clone(), generation, &now());
    if status != *old {
        write_status(job, ctx, &status).await?;
        ctx.publish_event(&job.object_ref(&()), EventType::Warning, "PodNameTaken", &message, "CreatePod").await;
    }
    tracing::warn!(job = %job.name_any(), namespace = ?job.namespace(), pod, "Pod name taken by another job's Pod");
    Ok(Action::requeue(Duration::from_secs(60)))
}

async fn write_status(job: &AgentJob, ctx: &Context, status: &AgentJobStatus) -> Result<()> {
    // A PUT of the whole status with the cached resourceVersion: a decision made on a stale copy
    // is refused (409) instead of overwriting newer status, and fields the decision dropped go.
    // The operator is the only writer of status, so nothing is lost by not merging, and an update
    // costs the apiserver less than a server-side apply, which dominated its CPU per job.
    // The status subresource takes only status from the body and keeps the stored spec and
    // metadata, so the body carries nothing else: the apiserver decodes and the network carries
    // a job's input (up to its size limit) once, when it is applied, not on every status write.
    let (namespace, name) = (job.namespace().unwrap_or_default(), job.name_any());
    let resource = ApiResource::erase::<AgentJob>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &namespace, &resource);
    let mut body = DynamicObject::new(&name, &resource).within(&namespace);
    body.metadata.resource_version = job.resource_version();
    body.metadata.uid = job.metadata.uid.clone();
    body.data = serde_json::json!({ "status": status });
    let params = PostParams { field_manager: Some(ctx.settings.field_manager.clone()), ..PostParams::default() };
    // Only the answer's metadata is decoded, and without managedFields: those of a job whose
    // input nests deep pass serde_json's recursion limit (controller/decode.rs), and the write
    // would seem to fail forever though it succeeded.
    let encoded =
        serde_json::to_vec(&body).map_err(|source| ApplyError::EncodeStatus { namespace: namespace.clone(), job: name.clone(), source })?;
    // Answered with metadata only (metadata_answers.rs).
    let written: super::decode::Decoded<kube::core::PartialObjectMeta<AgentJob>> = async {
        let request = kube::core::Request::new(api.resource_url())
            .replace_subresource("status", &name, &params, encoded)
            .map_err(kube::Error::BuildRequest)?;
        ctx.client.request(super::metadata_answers::metadata_only(request)).await
    }
    .await
    .map_err(|source| ApplyError::WriteStatus { namespace, job: name, source })?;
    // A no-op update keeps the version, and the cache would then never move past it.
    if written.meta().resource_version != job.resource_version() {
        ctx.status_writes.wrote_over(job.metadata.uid.as_deref().unwrap_or_default(), job.resource_version());
    }
    Ok(())
}

async fn report(job: &AgentJob, ctx: &Context, old: &AgentJobStatus, plan: &Plan) {
    let reference = job.object_ref(&());
    for e in &plan.events {
        let type_ = if e.warning { EventType::Warning } else { EventType::Normal };
        ctx.publish_event(&reference, type_, &e.reason, &e.note, "Reconcile").await;
    }
    let new = &plan.status;
    let approved =
        |s: &AgentJobStatus| crate::domain::conditions::find(&s.conditions, condition::APPROVED).is_some_and(|c| c.status == "True");
    if approved(new)
        && !approved(old)
        && let Some(created) = &job.metadata.creation_timestamp
    {
        let waited = k8s_openapi::jiff::Timestamp::now().duration_since(created.0).as_secs_f64();
        ctx.metrics.approval_wait_seconds.observe(waited.max(0.0));
    }
    if new.phase != old.phase {
        if let Some(phase) = new.phase.filter(|p| p.is_terminal()) {
            ctx.metrics.count_finished(phase.as_str(), &job.spec.category, approved(new) || approved(old) || new.usage.is_some());
        }
        if let Some(err) = new.usage.as_ref().and_then(|u| u.estimate_error_percent).filter(|_| new.phase == Some(JobPhase::Succeeded)) {
            // A job without a jobType is learned under its own name, but as a metric label that
            // would be a new series per job.
            let job_type = job.spec.job_type.as_deref().map_or_else(|| "unset".to_string(), |t| ctx.metrics.job_type_labels.label(t));
            let labels = JobTypeLabels { job_type };
            ctx.metrics.estimate_error_ratio.get_or_create(&labels).observe(1.0 + err as f64 / 100.0);
        }
        tracing::info!(job = %job.name_any(), namespace = ?job.namespace(), from = ?old.phase, to = ?new.phase, "phase changed");
        // Jobs waiting for the capacity and rate limit this one frees, and its tools' inUse, are
        // looked at again by `requeue_on_transition` once the watch cache shows the new phase:
        // requeued from here, they would read the cache before it does and keep waiting.
    }
}
