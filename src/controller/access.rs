//! Who is a category head, and who may act as someone (a ServiceAccount or a person) who wrote a
//! job: RBAC facts, asked of the apiserver with SubjectAccessReviews.
//!
//! A head of category C may `approve` resource `categories`, name C, group agentgate.dev, in the
//! job's namespace or cluster-wide, the same model as approving CSRs for a signer. Answers are
//! cached briefly and dropped whenever RBAC that could grant them changes, so revoked rights stop
//! counting at once: a Role or RoleBinding only grants in its own namespace, so its change drops
//! the answers about that namespace; a ClusterRole or ClusterRoleBinding drops them all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use tokio::sync::Semaphore;

use super::{Context, Result};
use crate::api::{AgentJob, JobPhase};
use crate::domain::tally::{HeadVerdicts, VoteView};

const TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Question {
    voter: String,
    groups: Vec<String>,
    right: Right,
}

/// One right asked about: `verb` on `resource` (and `subresource`) of `group`, named `name`, in
/// `namespace`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Right {
    group: &'static str,
    resource: &'static str,
    subresource: Option<&'static str>,
    verb: &'static str,
    name: Option<String>,
    namespace: String,
}

impl Right {
    /// Heading `category` in `namespace`: `approve` on `categories`, that name, agentgate's group.
    fn head_of(category: &str, namespace: &str) -> Right {
        Right {
            group: crate::api::GROUP,
            resource: "categories",
            subresource: None,
            verb: "approve",
            name: Some(category.into()),
            namespace: namespace.into(),
        }
    }

    /// Impersonating the person `user` (`kubectl --as=user`): `impersonate` on `users`, that
    /// name. Cluster-scoped, so asked with no namespace: only cluster RBAC grants it, and only its
    /// change drops the answer. Impersonating a person's groups alone is not asked: the apiserver
    /// refuses `--as-group` without `--as`, so it never writes a job in their name.
    fn impersonating(user: &str) -> Right {
        Right { group: "", resource: "users", subresource: None, verb: "impersonate", name: Some(user.into()), namespace: String::new() }
    }
}

/// Whether the voter has the right, and when the apiserver said so.
type Answer = (bool, Instant);

/// The controllers that run Pods from a template, whose `serviceAccountName` may name any
/// ServiceAccount of the namespace: whoever may create one, or change an existing one's
/// template, runs a Pod as the account as surely as by creating the Pod.
const WORKLOAD_CONTROLLERS: [(&str, &str); 7] = [
    ("apps", "deployments"),
    ("apps", "replicasets"),
    ("apps", "statefulsets"),
    ("apps", "daemonsets"),
    ("batch", "jobs"),
    ("batch", "cronjobs"),
    ("", "replicationcontrollers"),
];

/// The ways to act as a ServiceAccount, each with how the verdict names it, in two rounds. The
/// first holds what `edit` grants every tenant of the namespace (impersonating it, minting its
/// tokens, running a Pod as it: a Pod may name any ServiceAccount of its namespace), so a head
/// with `edit` there costs three reviews. The second holds what a narrower custom role may grant
/// alone: creating or changing a workload controller (tests/vote_attacks.rs
/// a_head_who_may_create_workloads_that_run_as_the_jobs_service_account_cannot_approve_it), or
/// reaching into a running Pod, which holds its account's token (exec, an ephemeral container).
fn acting_as(namespace: &str, name: &str) -> [Vec<(Right, String)>; 2] {
    let right = |group, resource, subresource, verb, name: Option<&str>| Right {
        group,
        resource,
        subresource,
        verb,
        name: name.map(str::to_string),
        namespace: namespace.to_string(),
    };
    let edit = vec![
        (right("", "serviceaccounts", None, "impersonate", Some(name)), "impersonate it".to_string()),
        (right("", "serviceaccounts", Some("token"), "create", Some(name)), "mint its tokens".to_string()),
        (right("", "pods", None, "create", None), "run a Pod as it".to_string()),
    ];
    let mut narrower = Vec::with_capacity(WORKLOAD_CONTROLLERS.len() * 3 + 3);
    for (group, resource) in WORKLOAD_CONTROLLERS {
        let named = if group.is_empty() { resource.to_string() } else { format!("{resource}.{group}") };
        for verb in ["create", "update", "patch"] {
            narrower.push((right(group, resource, None, verb, None), format!("{verb} {named}, which run Pods as it")));
        }
    }
    narrower.push((right("", "pods", Some("exec"), "create", None), "exec into its running Pods".to_string()));
    for verb in ["update", "patch"] {
        narrower.push((right("", "pods", Some("ephemeralcontainers"), verb, None), format!("{verb} ephemeral containers into its Pods")));
    }
    [edit, narrower]
}

pub struct HeadChecker {
    client: Client,
    answers: Mutex<HashMap<Question, Answer>>,
    /// One SubjectAccessReview in flight per question: reconciles asking the same question at
    /// once wait for that answer instead of each sending their own. Without it a burst of jobs
    /// voted on by the same two heads sent 2.3 reviews per job (`make bench` on a loaded machine,
    /// each answer taking seconds, up to `--max-concurrent-reconciles` missing the cache together).
    asking: Mutex<HashMap<Question, Arc<tokio::sync::Mutex<()>>>>,
}

/// The head checker of the current term of leadership, for the RBAC watch, which outlives terms
/// (watches.rs) and drops from it the answers an RBAC change may have changed.
///
/// Each term gets a new, empty checker: no answer cached in one term is used in another. A Role
/// or RoleBinding changed while this replica stood by is then asked about afresh, whether or not
/// the watch saw the change (it may have been disconnected, or the change may still be on its
/// way): a head whose `approve` right was revoked meanwhile does not count in the next term
/// (tests/leader.rs `a_head_whose_right_is_revoked_while_the_replica_stands_by_does_not_count`).
/// What that costs: one review per voter and question again at each new term.
#[derive(Clone, Default)]
pub struct TermHeads(Arc<Mutex<Option<Arc<HeadChecker>>>>);

impl TermHeads {
    /// A term begins: its own checker, empty, which RBAC changes reach until the guard is dropped.
    pub fn open(&self, client: Client) -> (HeadsOfTerm, Arc<HeadChecker>) {
        let heads = Arc::new(HeadChecker::new(client));
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(heads.clone());
        (HeadsOfTerm(self.clone()), heads)
    }

    /// Drops what a change in `scope` may have changed from the current term's answers (while
    /// standing by there are none: the next term starts empty).
    pub fn forget(&self, scope: &RbacScope) {
        let current = self.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(heads) = current {
            heads.forget(scope);
        }
    }
}

/// Ends the term's checker when dropped: nothing reaches or reads it any longer.
pub struct HeadsOfTerm(TermHeads);

impl Drop for HeadsOfTerm {
    fn drop(&mut self) {
        *self.0.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Beyond this many distinct questions asked since the last RBAC change, the in-flight guards are
/// dropped (a guard left out only means one more review, as before).
const MAX_ASKING: usize = 10_000;

impl HeadChecker {
    pub fn new(client: Client) -> Self {
        HeadChecker { client, answers: Mutex::new(HashMap::new()), asking: Mutex::new(HashMap::new()) }
    }

    fn cached(&self, question: &Question) -> Option<bool> {
        let answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        answers.get(question).filter(|(_, at)| at.elapsed() < TTL).map(|(answer, _)| *answer)
    }

    /// `Ok(Err(why))` when the voter is not a head; `Err` when the apiserver could not answer.
    pub async fn is_head(
        &self,
        voter: &str,
        groups: &[String],
        namespace: &str,
        category: &str,
        in_flight: &Semaphore,
    ) -> Result<Result<(), String>, kube::Error> {
        Ok(if self.allowed(voter, groups, Right::head_of(category, namespace), in_flight).await? {
            Ok(())
        } else {
            Err(format!(
                "{voter} is not a head of category {category}: RBAC does not allow them to approve categories/{category} in {namespace}"
            ))
        })
    }

    /// How `voter` may act as `writer`, who created or changed a job (`None` if they may not):
    /// what they wrote as it, they wrote. A ServiceAccount may be acted as in many ways
    /// (tests/vote_attacks.rs
    /// a_head_who_may_act_as_the_service_account_that_wrote_the_job_cannot_approve_it), a person
    /// by impersonating them (a_head_who_may_impersonate_the_jobs_author_cannot_approve_it).
    pub async fn acts_as(
        &self,
        voter: &str,
        groups: &[String],
        writer: &str,
        in_flight: &Semaphore,
    ) -> Result<Option<String>, kube::Error> {
        let rounds: Vec<Vec<(Right, String)>> = match writer.strip_prefix(SERVICE_ACCOUNT_PREFIX).and_then(|sa| sa.split_once(':')) {
            Some((namespace, name)) => acting_as(namespace, name).into(),
            None => vec![vec![(Right::impersonating(writer), "impersonate them".to_string())]],
        };
        for round in rounds {
            // A round's reviews go out together: a head with none of these rights (the usual
            // case) waits for one round trip per round, not one per right.
            let answers =
                futures::future::try_join_all(round.iter().map(|(right, _)| self.allowed(voter, groups, right.clone(), in_flight))).await?;
            if let Some(((_, how), _)) = round.into_iter().zip(answers).find(|(_, allowed)| *allowed) {
                return Ok(Some(how));
            }
        }
        Ok(None)
    }

    /// Whether RBAC gives `voter` (with `groups`) the right, cached. A review sent holds one of
    /// `in_flight`'s permits (its reconcile's) while it waits for the apiserver.
    async fn allowed(&self, voter: &str, groups: &[String], right: Right, in_flight: &Semaphore) -> Result<bool, kube::Error> {
        let question = Question { voter: voter.into(), groups: groups.to_vec(), right };
        if let Some(answer) = self.cached(&question) {
            return Ok(answer);
        }
        let guard = {
            let mut asking = self.asking.lock().unwrap_or_else(PoisonError::into_inner);
            if asking.len() >= MAX_ASKING {
                asking.clear();
            }
            asking.entry(question.clone()).or_default().clone()
        };
        let _asking = guard.lock().await;
        // Answered while this one waited its turn.
        if let Some(answer) = self.cached(&question) {
            return Ok(answer);
        }
        let right = &question.right;
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(voter.into()),
                groups: Some(groups.to_vec()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(right.group.into()),
                    resource: Some(right.resource.into()),
                    subresource: right.subresource.map(str::to_string),
                    verb: Some(right.verb.into()),
                    name: right.name.clone(),
                    namespace: Some(right.namespace.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        // Taken after the question's guard, never held while waiting for one: a permit is only
        // ever held by a review on its way, so reconciles waiting on each other's guards and
        // permits always make progress. (`acquire` fails only on a closed semaphore; none is.)
        let _permit = in_flight.acquire().await.ok();
        let answered = Api::<SubjectAccessReview>::all(self.client.clone()).create(&PostParams::default(), &review).await?;
        let allowed = answered.status.as_ref().is_some_and(|s| s.allowed);
        self.answers.lock().unwrap_or_else(PoisonError::into_inner).insert(question, (allowed, Instant::now()));
        Ok(allowed)
    }

    /// Drops the answers an RBAC change in `scope` may have changed (and their in-flight guards).
    pub fn forget(&self, scope: &RbacScope) {
        let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
        forget_in(&mut answers, scope);
        let mut asking = self.asking.lock().unwrap_or_else(PoisonError::into_inner);
        forget_in(&mut asking, scope);
    }
}

/// What an RBAC change may have changed. A Role can only be bound, and a RoleBinding only grants,
/// in its own namespace, so another namespace's Roles churning cost a job's cached answers
/// nothing (a busy cluster's RBAC churn used to send every voter's reviews again each time).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RbacScope {
    /// A Role or RoleBinding in this namespace changed.
    Namespace(String),
    /// A ClusterRole or ClusterRoleBinding changed, or a relist may have missed anything.
    Cluster,
}

fn forget_in<V>(map: &mut HashMap<Question, V>, scope: &RbacScope) {
    match scope {
        RbacScope::Cluster => map.clear(),
        RbacScope::Namespace(namespace) => map.retain(|question, _| question.right.namespace != *namespace),
    }
}

/// Votes of one reconcile judged at once. Each vote's own questions keep their order (its head
/// check first, the act-as checks only for a head), so no more reviews are asked than one vote
/// after another asked; but eight uncached heads now wait about two round trips, not sixteen
/// (tests/vote_review_flood.rs eight_votes_arriving_at_once_cost_one_review_per_question).
const VOTES_JUDGED_AT_ONCE: usize = 8;

/// SubjectAccessReviews one reconcile has in flight at most: one round of act-as checks
/// (`acting_as`: 24), as much as a single vote held before its votes were judged together, so
/// one tenant's job with many voters holds no more of the apiserver than that.
const REVIEWS_IN_FLIGHT_PER_JOB: usize = 24;

/// Asks RBAC (through the cached SubjectAccessReview checker) whether each vote's voter, with
/// the groups stamped on that vote, is a head of the job's category. Skipped once the job has
/// finished: its votes no longer matter. Per vote, not per voter: the groups of one vote (a stale
/// vote on a deleted job, say) never decide for another (tests/vote_attacks.rs
/// each_vote_is_checked_with_its_own_groups). For each who created or changed the job (`author`,
/// then `editors`, one a line), also whether the voter may act as them.
pub(super) async fn head_verdicts(job: &AgentJob, ctx: &Context, votes: &[VoteView], writers: &Writers<'_>) -> Result<HeadVerdicts> {
    use futures::{StreamExt, TryStreamExt};
    let phase = job.status.as_ref().and_then(|s| s.phase);
    if phase.is_some_and(JobPhase::is_terminal) {
        return Ok(HeadVerdicts(Default::default()));
    }
    let namespace = job.namespace().unwrap_or_default();
    let reviews = Reviews { heads: &ctx.heads, in_flight: Semaphore::new(REVIEWS_IN_FLIGHT_PER_JOB) };
    // The futures are made before the stream runs them: a stream's `map` closure borrowing the
    // votes makes the reconcile's future not provably `Send` (rustc's "FnOnce is not general
    // enough"). A future does nothing until polled.
    let judging: Vec<_> = votes.iter().map(|vote| judge(&reviews, job, &namespace, vote, votes, writers)).collect();
    let verdicts = futures::stream::iter(judging).buffer_unordered(VOTES_JUDGED_AT_ONCE).try_collect().await?;
    Ok(HeadVerdicts(verdicts))
}

/// One reconcile's way to the cached checker: its reviews share `in_flight`.
struct Reviews<'a> {
    heads: &'a HeadChecker,
    in_flight: Semaphore,
}

/// Whether one vote counts as far as RBAC decides: its voter heads the category, may act as
/// none of the job's writers, and (a robot's vote) was cast by nobody who may not approve it.
async fn judge(
    reviews: &Reviews<'_>,
    job: &AgentJob,
    namespace: &str,
    vote: &VoteView,
    votes: &[VoteView],
    writers: &Writers<'_>,
) -> Result<(String, std::result::Result<(), String>)> {
    let (author, editors) = (writers.author, writers.editors);
    let mut answer =
        reviews.heads.is_head(&vote.voter, &vote.groups, namespace, &job.spec.category, &reviews.in_flight).await.map_err(|source| {
            super::error::ObserveError::HeadCheck {
                voter: vote.voter.clone(),
                category: job.spec.category.clone(),
                namespace: namespace.to_string(),
                source,
            }
        })?;
    // A person writer costs each voter one review (may they impersonate them), cached like
    // the head check; a ServiceAccount writer, one or two rounds (acting_as).
    let written = author.into_iter().map(|a| (a, "created")).chain(editors.split('\n').map(|e| (e, "changed")));
    for (writer, did) in written.filter(|(w, _)| !w.is_empty() && *w != vote.voter) {
        if answer.is_err() {
            break;
        }
        let acts =
            reviews.heads.acts_as(&vote.voter, &vote.groups, writer, &reviews.in_flight).await.map_err(|source| {
                super::error::ObserveError::ActAsCheck { voter: vote.voter.clone(), writer: writer.to_string(), source }
            })?;
        if let Some(how) = acts {
            answer = Err(format!(
                "{} may act as {writer}, who {did} this job's spec (RBAC lets them {how}): they may not approve what they wrote in that name",
                vote.voter
            ));
        }
    }
    if answer.is_ok() && vote.voter.starts_with(SERVICE_ACCOUNT_PREFIX) {
        answer = robot_cast_by_another(reviews, vote, votes, writers).await?;
    }
    Ok((vote.name.clone(), answer))
}

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Who wrote a job: its author, its other spec editors (one a line) and the groups admission
/// recorded for each (`agentgate.dev/writer-groups`, domain/writer_groups.rs).
pub(super) struct Writers<'a> {
    pub author: Option<&'a str>,
    pub editors: &'a str,
    pub groups: &'a str,
}

/// A ServiceAccount's vote (a trusted robot's) is cast by whoever may act as the account: not the
/// robot's review but theirs. It does not count when the job's author or an editor may act as it
/// (they would approve what they wrote), nor when another voter on the job may (one person, two
/// approvals) (tests/gate_attacks.rs a_robot_vote_cast_by_the_author_or_another_voter_does_not_count).
/// Each is asked with their groups, as admission recorded them for writers and stamped them on
/// votes: asked as a bare username, a writer whose group may impersonate the robot could not
/// (tests/gate_attacks.rs a_robot_vote_cast_by_the_author_through_her_group_does_not_count). A
/// person whose groups were not recorded (a job written before they were) may be anyone's
/// member: the robot's vote does not count on what they wrote.
async fn robot_cast_by_another(
    reviews: &Reviews<'_>,
    robot: &VoteView,
    votes: &[VoteView],
    writers: &Writers<'_>,
) -> Result<std::result::Result<(), String>> {
    let written = writers.author.into_iter().map(|a| (a, "created this job's spec"));
    let written = written.chain(writers.editors.split('\n').map(|e| (e, "changed this job's spec")));
    let mut actors = Vec::new();
    for (writer, did) in written.filter(|(w, _)| !w.is_empty() && *w != robot.voter) {
        match crate::domain::writer_groups::groups_of(writers.groups, writer) {
            Some(groups) => actors.push((writer.to_string(), groups, did)),
            None => {
                return Ok(Err(format!(
                    "the groups of {writer}, who {did}, were not recorded when they wrote it: whether they may act as {} cannot be \
                     checked (resubmit the job to record them)",
                    robot.voter
                )));
            }
        }
    }
    let others = votes.iter().map(|v| (v.voter.clone(), v.groups.clone(), "also voted on it"));
    let mut seen = std::collections::HashSet::new();
    for (actor, groups, did) in actors.into_iter().chain(others) {
        if actor.is_empty() || actor == robot.voter || !seen.insert((actor.clone(), groups.clone())) {
            continue;
        }
        let acts = reviews
            .heads
            .acts_as(&actor, &groups, &robot.voter, &reviews.in_flight)
            .await
            .map_err(|source| super::error::ObserveError::ActAsCheck { voter: actor.clone(), writer: robot.voter.clone(), source })?;
        if let Some(how) = acts {
            return Ok(Err(format!(
                "{actor}, who {did}, may act as {} (RBAC lets them {how}): the vote would be theirs, not the robot's",
                robot.voter
            )));
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question(voter: &str, right: Right) -> Question {
        Question { voter: voter.into(), groups: vec![], right }
    }

    fn book() -> HashMap<Question, Answer> {
        let now = Instant::now();
        let [edit, _] = acting_as("builders", "ci");
        let impersonate = edit[0].0.clone();
        [
            (question("erin", Right::head_of("ops", "team-a")), (true, now)),
            (question("erin", Right::head_of("ops", "team-b")), (true, now)),
            // Whether erin may act as team-a's job's author, a ServiceAccount of `builders`.
            (question("erin", impersonate), (false, now)),
            // Whether erin may impersonate carol, a person who wrote a job: cluster-scoped.
            (question("erin", Right::impersonating("carol")), (false, now)),
        ]
        .into_iter()
        .collect()
    }

    fn namespaces(map: &HashMap<Question, Answer>) -> std::collections::BTreeSet<&str> {
        map.keys().map(|q| q.right.namespace.as_str()).collect()
    }

    #[test]
    fn a_role_changing_in_one_namespace_drops_only_the_answers_about_that_namespace() {
        let mut answers = book();
        forget_in(&mut answers, &RbacScope::Namespace("team-b".into()));
        assert_eq!(namespaces(&answers), ["", "builders", "team-a"].into());
        // The ServiceAccount's namespace decides whether a head may act as it, wherever its job is.
        forget_in(&mut answers, &RbacScope::Namespace("builders".into()));
        // Only cluster RBAC lets anyone impersonate a person: no namespace's change drops that.
        assert_eq!(namespaces(&answers), ["", "team-a"].into());
    }

    #[test]
    fn the_largest_act_as_round_fits_in_one_jobs_reviews_in_flight() {
        // A round's reviews go out together (acts_as): the per-job bound must not split it into
        // several round trips, nor let one job hold more than one round's worth.
        let largest = acting_as("builders", "ci").iter().map(Vec::len).max().unwrap_or_default();
        assert_eq!(largest, REVIEWS_IN_FLIGHT_PER_JOB);
    }

    #[test]
    fn a_cluster_role_changing_drops_every_answer() {
        let mut answers = book();
        forget_in(&mut answers, &RbacScope::Cluster);
        assert!(answers.is_empty());
    }
}
