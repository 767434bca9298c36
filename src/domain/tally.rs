//! Counting ApprovalVotes: which votes count toward a job's approval, and why the others don't.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{Approver, Decision, IgnoredVote};

#[derive(Clone, Debug, PartialEq)]
pub struct VoteView {
    pub name: String,
    pub voter: String,
    pub decision: Decision,
    pub job_name: String,
    pub job_uid: String,
    pub job_generation: i64,
    pub reason: Option<String>,
    pub created: Option<Time>,
    /// The voter's groups as stamped at admission.
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct JobIdentity<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub generation: i64,
    /// Who created the job, when known; they may not approve their own job.
    pub author: Option<&'a str>,
    /// Everyone else who changed its spec, one a line (`agentgate.dev/spec-edited-by`): they
    /// wrote what they would approve, so they may not approve it either.
    pub spec_editors: &'a str,
}

/// Whether a vote's voter, as that vote shows them (name and groups), may approve jobs of the
/// job's category: `Err` says why not.
pub trait Eligibility {
    fn check(&self, vote: &VoteView) -> Result<(), String>;
}

/// Every voter is eligible: for operators run without category-head checks, and for tests.
pub struct AnyVoter;

impl Eligibility for AnyVoter {
    fn check(&self, _vote: &VoteView) -> Result<(), String> {
        Ok(())
    }
}

/// Answers found beforehand (by SubjectAccessReview) for each vote, by vote name: each vote is
/// judged with its own voterGroups, never with those of another vote by the same voter. A vote
/// nobody asked about is not eligible.
pub struct HeadVerdicts(pub BTreeMap<String, Result<(), String>>);

impl Eligibility for HeadVerdicts {
    fn check(&self, vote: &VoteView) -> Result<(), String> {
        self.0.get(&vote.name).cloned().unwrap_or_else(|| Err(format!("whether {} is a category head could not be checked", vote.voter)))
    }
}

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Which ServiceAccounts' votes count. One human can create ServiceAccounts and bind them as
/// heads, so a ServiceAccount is one head only when the operator is told to trust it, and at
/// most `max_robot_votes` robot votes count per job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoterPolicy {
    /// Usernames (`system:serviceaccount:<namespace>:<name>`) of the trusted robot voters.
    pub robots: std::collections::BTreeSet<String>,
    pub max_robot_votes: usize,
}

impl Default for VoterPolicy {
    fn default() -> Self {
        VoterPolicy { robots: Default::default(), max_robot_votes: 1 }
    }
}

impl VoterPolicy {
    /// From `namespace/name` entries, as `--robot-voters` takes them.
    pub fn new<'a>(robots: impl IntoIterator<Item = &'a str>, max_robot_votes: usize) -> Result<Self, String> {
        let robots = robots
            .into_iter()
            .map(|r| match r.trim().split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Ok(format!("{SERVICE_ACCOUNT_PREFIX}{ns}:{name}"))
                }
                _ => Err(format!("robot voter {r:?} is not namespace/name of a ServiceAccount")),
            })
            .collect::<Result<_, _>>()?;
        Ok(VoterPolicy { robots, max_robot_votes })
    }

    /// `namespace/name` when the voter is a ServiceAccount.
    fn service_account(voter: &str) -> Option<String> {
        voter.strip_prefix(SERVICE_ACCOUNT_PREFIX).map(|sa| sa.replacen(':', "/", 1))
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    pub required: i32,
    pub approvers: Vec<Approver>,
    pub rejected_by: Option<Approver>,
    pub ignored: Vec<IgnoredVote>,
    /// What of `ignored` the job's status lists: one ignored vote per voter (their first on the
    /// job's current uid and generation, else their first), at most
    /// [`MAX_IGNORED_LISTED`], then one line counting the rest. 5,000 junk votes naming a job
    /// must not push its status toward etcd's object limit, nor each cost a vote status write.
    pub listed: Vec<IgnoredVote>,
    /// How many of `ignored` the tally itself ignored; later ones (voided, revoked) were counted
    /// votes, one per voter at most, and are all listed.
    pub tallied_ignored: usize,
    /// Groups of each counted approver, for rules that need a member of a certain group.
    pub approver_groups: BTreeMap<String, Vec<String>>,
}

impl Tally {
    /// Whether a counted approver belongs to `group`.
    pub fn approved_by_member_of(&self, group: &str) -> bool {
        self.approvers.iter().any(|a| self.approver_groups.get(&a.voter).is_some_and(|g| g.iter().any(|x| x == group)))
    }

    pub fn approved(&self) -> bool {
        self.rejected_by.is_none() && self.approvers.len() as i32 >= self.required
    }

    /// The ignored votes the job's status lists (see `listed`), with one line for the rest.
    pub fn ignored_for_status(&self) -> Vec<IgnoredVote> {
        let split = self.tallied_ignored.min(self.ignored.len());
        let mut out = self.listed.clone();
        out.extend(self.ignored[split..].iter().cloned());
        let unlisted = split.saturating_sub(self.listed.len());
        if unlisted > 0 {
            out.push(IgnoredVote {
                name: UNLISTED.into(),
                why: format!(
                    "{unlisted} more ignored vote(s) not listed: at most one per voter and {MAX_IGNORED_LISTED} in all are, \
                     and only those get a verdict in their own status"
                ),
            });
        }
        out
    }

    /// Every vote's verdict, looked up by name. Asking for each vote's verdict by scanning every
    /// ignored vote, as each reconcile of a job did for its votes: 10,000 junk
    /// votes with 246-character names naming one job took 10^8 comparisons, 1.1 s of a worker
    /// thread (there is one per core) at each reconcile of that job, and two jobs flooded with
    /// 12,000 each kept another tenant's job 4.4 s from its first status, 1.0 s now (debug
    /// build; tests::every_verdict_of_20000_junk_votes_is_found_in_linear_time).
    pub fn verdicts(&self) -> Verdicts<'_> {
        let mut ignored = std::collections::HashMap::with_capacity(self.ignored.len());
        for i in &self.ignored {
            // The first reason given for a vote, as a scan in order found it.
            ignored.entry(i.name.as_str()).or_insert(i.why.as_str());
        }
        Verdicts { ignored, rejecting: self.rejected_by.as_ref().map(|r| r.vote.as_str()) }
    }
}

/// Each vote's verdict ([`Tally::verdicts`]).
pub struct Verdicts<'a> {
    ignored: std::collections::HashMap<&'a str, &'a str>,
    rejecting: Option<&'a str>,
}

impl Verdicts<'_> {
    /// What the vote's own status should say: counted or not, and why.
    pub fn of(&self, vote: &str) -> (bool, String) {
        if let Some(why) = self.ignored.get(vote) {
            return (false, why.to_string());
        }
        if self.rejecting == Some(vote) {
            return (true, "counted: this Reject rejects the job".into());
        }
        // No running count here: it would rewrite every earlier vote's status on each new vote.
        (true, "counted toward the job's approval".into())
    }
}

/// Ignored votes listed in a job's status, at most one per voter.
pub const MAX_IGNORED_LISTED: usize = 32;
/// The name of the line counting unlisted ignored votes: not a valid object name, so it never
/// names a vote.
pub const UNLISTED: &str = "(more)";

/// Whether `vote` could count in a tally of the job at one of `generations` (its current one and
/// those its attempts or Pods run), as far as is known without asking RBAC: only such votes are
/// worth a SubjectAccessReview. Every vote this refuses, [`tally`] ignores for the same reason
/// before it asks its [`Eligibility`]: one tenant binding the head role to many ServiceAccounts
/// of theirs cost a head check per account and act-as checks per pair of them, one after
/// another in the reconcile (tests/vote_review_flood.rs).
pub fn may_count(job: &JobIdentity, generations: &[i64], vote: &VoteView, voters: &VoterPolicy) -> bool {
    vote.job_name == job.name
        && vote.job_uid == job.uid
        && generations.contains(&vote.job_generation)
        && job.author != Some(vote.voter.as_str())
        && !job.spec_editors.split('\n').any(|editor| editor == vote.voter)
        && VoterPolicy::service_account(&vote.voter).is_none_or(|_| voters.robots.contains(&vote.voter))
}

/// Votes count in creation order; a voter's first valid vote is the one that counts.
pub fn tally(job: &JobIdentity, required: i32, votes: &[VoteView], eligibility: &dyn Eligibility, voters: &VoterPolicy) -> Tally {
    let mut ordered: Vec<&VoteView> = votes.iter().filter(|v| v.job_name == job.name).collect();
    ordered.sort_by(|a, b| (a.created.as_ref().map(|t| t.0), &a.name).cmp(&(b.created.as_ref().map(|t| t.0), &b.name)));

    let mut t = Tally { required, ..Tally::default() };
    let mut seen_voters: Vec<&str> = Vec::new();
    // Per voter, in order of their first ignored vote: that vote, and their first ignored vote
    // on the job as it is now (the one the voter most likely wants explained).
    let mut listing: Vec<(&str, IgnoredVote, Option<IgnoredVote>)> = Vec::new();
    let mut robot_votes = 0;
    for vote in ordered {
        let robot = VoterPolicy::service_account(&vote.voter);
        let why_not = if vote.job_uid != job.uid {
            // Most likely a vote on a deleted job that had the same name: replaying it would
            // approve a job the voter never saw.
            Some(format!("is for another job named {} (uid {}), not this one (uid {}); vote again", job.name, vote.job_uid, job.uid))
        } else if vote.job_generation != job.generation {
            Some(format!("is for generation {} but the job is at generation {}; vote again", vote.job_generation, job.generation))
        } else if job.author == Some(vote.voter.as_str()) {
            Some(format!("{} created the job and may not approve it", vote.voter))
        } else if job.spec_editors.split('\n').any(|editor| editor == vote.voter) {
            Some(format!("{} changed the job's spec and may not approve it", vote.voter))
        } else if seen_voters.contains(&vote.voter.as_str()) {
            Some(format!("{} already has a counted vote on this job", vote.voter))
        } else if let Some(sa) = robot.as_ref().filter(|_| !voters.robots.contains(&vote.voter)) {
            Some(format!(
                "ServiceAccount {sa} is not a trusted robot voter: a ServiceAccount's vote counts only when the operator \
                 lists it in --robot-voters"
            ))
        } else if robot.is_some() && robot_votes >= voters.max_robot_votes {
            Some(format!(
                "{} robot vote(s) already count on this job, the most that may (--max-robot-votes {})",
                robot_votes, voters.max_robot_votes
            ))
        } else {
            eligibility.check(vote).err()
        };
        if let Some(why) = why_not {
            // Quotes what the vote's author wrote (its jobRef.uid) into the job's status and the
            // vote's own (`kubectl get approvalvotes -o wide`): one inert line
            // (tests::a_vote_quoting_hidden_characters_is_listed_as_one_inert_line).
            let why = super::terminal_text::message(&why).into_owned();
            let entry = IgnoredVote { name: vote.name.clone(), why: why.clone() };
            let on_current = vote.job_uid == job.uid && vote.job_generation == job.generation;
            if let Some((_, _, current)) = listing.iter_mut().find(|(voter, _, _)| *voter == vote.voter.as_str()) {
                if on_current && current.is_none() {
                    *current = Some(entry);
                }
            } else if listing.len() < MAX_IGNORED_LISTED {
                listing.push((&vote.voter, entry.clone(), on_current.then_some(entry)));
            }
            t.ignored.push(IgnoredVote { name: vote.name.clone(), why });
            continue;
        }
        seen_voters.push(&vote.voter);
        robot_votes += usize::from(robot.is_some());
        // The voter's reason reaches the job's `status.approval.approvers`, which the author's
        // and other heads' `kubectl describe` print: one inert line, as the ignore reasons are
        // (tests::a_counted_votes_reason_reaches_status_as_one_inert_line).
        let reason = vote.reason.as_deref().map(|r| super::terminal_text::message(r).into_owned());
        let approver = Approver { voter: vote.voter.clone(), vote: vote.name.clone(), decided_at: vote.created.clone(), reason };
        match vote.decision {
            Decision::Approve => {
                t.approver_groups.insert(vote.voter.clone(), vote.groups.clone());
                t.approvers.push(approver)
            }
            Decision::Reject if t.rejected_by.is_none() => t.rejected_by = Some(approver),
            Decision::Reject => {}
        }
    }
    t.tallied_ignored = t.ignored.len();
    t.listed = listing.into_iter().map(|(_, first, current)| current.unwrap_or(first)).collect();
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    const JOB: JobIdentity<'static> =
        JobIdentity { name: "scan-42", uid: "uid-42", generation: 2, author: Some("mallory"), spec_editors: "trent\nvictor" };

    fn at(minute: i64) -> Option<Time> {
        Some(Time(Timestamp::from_second(1_750_000_000 + minute * 60).unwrap()))
    }

    /// A vote on the current generation of JOB, cast `minute` minutes into the test.
    fn vote(name: &str, voter: &str, decision: Decision, minute: i64) -> VoteView {
        VoteView {
            name: name.into(),
            voter: voter.into(),
            decision,
            job_name: JOB.name.into(),
            job_uid: JOB.uid.into(),
            job_generation: JOB.generation,
            reason: Some(format!("{voter} says so")),
            created: at(minute),
            groups: vec!["agentgate:users".into()],
        }
    }

    use Decision::{Approve, Reject};

    /// A vote naming another uid is ignored, saying which uid it named: a tenant's vote on a
    /// colleague's job, its uid an escape sequence and a forged line, was quoted raw into the
    /// job's `status.approval.ignoredVotes` and the vote's status message.
    #[test]
    fn a_vote_quoting_hidden_characters_is_listed_as_one_inert_line() {
        let forged =
            VoteView { job_uid: "x\u{1b}[2K\r\ncounted toward the job's approval\u{202E}".into(), ..vote("v-eve", "eve", Approve, 1) };
        let t = tally(&JOB, 2, &[forged], &AnyVoter, &VoterPolicy::default());
        let (counted, why) = t.verdicts().of("v-eve");
        assert!(!counted);
        assert!(why.contains(r"(uid x\u001B[2K\r\ncounted toward the job's approval\u202E)"), "{why}");
        let listed = t.ignored_for_status();
        assert!(!listed.iter().any(|i| i.why.chars().any(crate::domain::terminal_text::is_hidden)), "{listed:?}");
    }

    /// A head's vote reason is copied into the job's `status.approval.approvers[].reason`; it was
    /// copied raw, so a reason of an escape sequence and a forged line cleared and rewrote what
    /// the author's or another head's `kubectl describe` showed of the approval.
    #[test]
    fn a_counted_votes_reason_reaches_status_as_one_inert_line() {
        let reason = "fine\u{1b}[2K\r\n  Voter: carol\u{202E}";
        let approve = VoteView { reason: Some(reason.into()), ..vote("v-alice", "alice", Approve, 1) };
        let reject = VoteView { reason: Some(reason.into()), ..vote("v-bob", "bob", Reject, 2) };
        let t = tally(&JOB, 2, &[approve, reject], &AnyVoter, &VoterPolicy::default());
        let shown = |a: Option<&Approver>| a.and_then(|a| a.reason.clone()).unwrap_or_default();
        let want = r"fine\u001B[2K\r\n  Voter: carol\u202E";
        assert_eq!(shown(t.approvers.first()), want, "{t:#?}");
        assert_eq!(shown(t.rejected_by.as_ref()), want, "{t:#?}");
        // Plain text, a backslash and non-ASCII letters included, is kept as the head wrote it.
        let plain = VoteView { reason: Some(r"scope C:\scan is fine, ça va".into()), ..vote("v-alice", "alice", Approve, 1) };
        let t = tally(&JOB, 2, &[plain], &AnyVoter, &VoterPolicy::default());
        assert_eq!(shown(t.approvers.first()), r"scope C:\scan is fine, ça va");
    }

    /// Refuses the voters it names, like a SubjectAccessReview that says no.
    struct Refuse(&'static [&'static str]);

    impl Eligibility for Refuse {
        fn check(&self, vote: &VoteView) -> Result<(), String> {
            let voter = vote.voter.as_str();
            if self.0.contains(&voter) { Err(format!("{voter} may not approve category core-security")) } else { Ok(()) }
        }
    }

    struct Case {
        name: &'static str,
        required: i32,
        votes: Vec<VoteView>,
        eligibility: &'static dyn Eligibility,
        approved: bool,
        /// Counted approvals: (voter, vote) in counting order.
        approvers: &'static [(&'static str, &'static str)],
        rejected_by: Option<(&'static str, &'static str)>,
        /// Ignored votes with a fragment of why.
        ignored: &'static [(&'static str, &'static str)],
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "two distinct approvals approve",
                required: 2,
                votes: vec![vote("v-alice", "alice", Approve, 1), vote("v-bob", "bob", Approve, 2)],
                eligibility: &AnyVoter,
                approved: true,
                approvers: &[("alice", "v-alice"), ("bob", "v-bob")],
                rejected_by: None,
                ignored: &[],
            },
            Case {
                name: "one approval of two is not enough",
                required: 2,
                votes: vec![vote("v-alice", "alice", Approve, 1)],
                eligibility: &AnyVoter,
                approved: false,
                approvers: &[("alice", "v-alice")],
                rejected_by: None,
                ignored: &[],
            },
            Case {
                name: "no votes at all",
                required: 1,
                votes: vec![],
                eligibility: &AnyVoter,
                approved: false,
                approvers: &[],
                rejected_by: None,
                ignored: &[],
            },
            Case {
                name: "a duplicate voter is counted once",
                required: 2,
                votes: vec![vote("v-alice-1", "alice", Approve, 1), vote("v-alice-2", "alice", Approve, 2)],
                eligibility: &AnyVoter,
                approved: false,
                approvers: &[("alice", "v-alice-1")],
                rejected_by: None,
                ignored: &[("v-alice-2", "alice already has a counted vote on this job")],
            },
            Case {
                name: "creation time, not list order, decides which duplicate counts",
                required: 1,
                votes: vec![vote("v-alice-late", "alice", Reject, 9), vote("v-alice-early", "alice", Approve, 1)],
                eligibility: &AnyVoter,
                approved: true,
                approvers: &[("alice", "v-alice-early")],
                rejected_by: None,
                ignored: &[("v-alice-late", "already has a counted vote")],
            },
            Case {
                name: "a vote naming another uid (a recreated job) is ignored",
                required: 1,
                votes: vec![VoteView { job_uid: "uid-old".into(), ..vote("v-alice", "alice", Approve, 1) }],
                eligibility: &AnyVoter,
                approved: false,
                approvers: &[],
                rejected_by: None,
                ignored: &[("v-alice", "is for another job named scan-42 (uid uid-old), not this one (uid uid-42); vote again")],
            },
            Case {
                name: "a vote for an older generation is ignored",
                required: 1,
                votes: vec![VoteView { job_generation: 1, ..vote("v-alice", "alice", Approve, 1) }],
                eligibility: &AnyVoter,
                approved: false,
                approvers: &[],
                rejected_by: None,
                ignored: &[("v-alice", "is for generation 1 but the job is at generation 2; vote again")],
            },
            Case {
                name: "an old-generation vote does not use up the voter's vote",
                required: 1,
                votes: vec![
                    VoteView { job_generation: 1, ..vote("v-alice-1", "alice", Approve, 1) },
                    vote("v-alice-2", "alice", Approve, 2),
                ],
                eligibility: &AnyVoter,
                approved: true,
                approvers: &[("alice", "v-alice-2")],
                rejected_by: None,
                ignored: &[("v-alice-1", "generation 1")],
            },
            Case {
                name: "the author's own vote is ignored",
                required: 2,
                votes: vec![vote("v-mallory", "mallory", Approve, 1), vote("v-bob", "bob", Approve, 2)],
                eligibility: &AnyVoter,
                approved: false,
                approvers: &[("bob", "v-bob")],
                rejected_by: None,
                ignored: &[("v-mallory", "mallory created the job and may not approve it")],
            },
            Case {
                name: "a spec editor's vote is ignored, whichever line names them, and a name within a name is not theirs",
                required: 2,
                votes: vec![
                    vote("v-victor", "victor", Approve, 1),
                    vote("v-trent", "trent", Reject, 2),
                    vote("v-vic", "vic", Approve, 3),
                    vote("v-bob", "bob", Approve, 4),
                ],
                eligibility: &AnyVoter,
                approved: true,
                approvers: &[("vic", "v-vic"), ("bob", "v-bob")],
                rejected_by: None,
                ignored: &[
                    ("v-victor", "victor changed the job's spec and may not approve it"),
                    ("v-trent", "trent changed the job's spec and may not approve it"),
                ],
            },
            Case {
                name: "a counted Reject rejects despite enough approvals",
                required: 2,
                votes: vec![vote("v-alice", "alice", Approve, 1), vote("v-bob", "bob", Approve, 2), vote("v-carol", "carol", Reject, 3)],
                eligibility: &AnyVoter,
                approved: false,
                approvers: &[("alice", "v-alice"), ("bob", "v-bob")],
                rejected_by: Some(("carol", "v-carol")),
                ignored: &[],
            },
            Case {
                name: "the first of two Rejects is the one recorded",
                required: 1,
                votes: vec![vote("v-dave", "dave", Reject, 5), vote("v-carol", "carol", Reject, 3)],
                eligibility: &AnyVoter,
                approved: false,
                approvers: &[],
                rejected_by: Some(("carol", "v-carol")),
                ignored: &[],
            },
            Case {
                name: "a Reject for an old generation does not reject",
                required: 1,
                votes: vec![VoteView { job_generation: 1, ..vote("v-carol", "carol", Reject, 1) }, vote("v-alice", "alice", Approve, 2)],
                eligibility: &AnyVoter,
                approved: true,
                approvers: &[("alice", "v-alice")],
                rejected_by: None,
                ignored: &[("v-carol", "generation 1")],
            },
            Case {
                name: "the author's Reject does not reject either",
                required: 1,
                votes: vec![vote("v-mallory", "mallory", Reject, 1), vote("v-alice", "alice", Approve, 2)],
                eligibility: &AnyVoter,
                approved: true,
                approvers: &[("alice", "v-alice")],
                rejected_by: None,
                ignored: &[("v-mallory", "created the job")],
            },
            Case {
                name: "votes for another job are not considered at all",
                required: 1,
                votes: vec![
                    VoteView { job_name: "other-job".into(), ..vote("v-other-alice", "alice", Approve, 1) },
                    VoteView { job_name: "other-job".into(), ..vote("v-other-carol", "carol", Reject, 1) },
                    vote("v-bob", "bob", Approve, 2),
                ],
                eligibility: &AnyVoter,
                approved: true,
                approvers: &[("bob", "v-bob")],
                rejected_by: None,
                ignored: &[],
            },
            Case {
                name: "an ineligible voter is ignored with the eligibility's reason",
                required: 2,
                votes: vec![vote("v-alice", "alice", Approve, 1), vote("v-eve", "eve", Approve, 2), vote("v-bob", "bob", Approve, 3)],
                eligibility: &Refuse(&["eve"]),
                approved: true,
                approvers: &[("alice", "v-alice"), ("bob", "v-bob")],
                rejected_by: None,
                ignored: &[("v-eve", "eve may not approve category core-security")],
            },
            Case {
                name: "an ineligible voter's Reject does not reject",
                required: 1,
                votes: vec![vote("v-eve", "eve", Reject, 1), vote("v-alice", "alice", Approve, 2)],
                eligibility: &Refuse(&["eve"]),
                approved: true,
                approvers: &[("alice", "v-alice")],
                rejected_by: None,
                ignored: &[("v-eve", "may not approve")],
            },
            Case {
                name: "votes without a creation time count before timed ones, then by name",
                required: 1,
                votes: vec![
                    vote("v-alice-a", "alice", Approve, 1),
                    VoteView { created: None, ..vote("v-alice-c", "alice", Reject, 0) },
                    VoteView { created: None, ..vote("v-alice-b", "alice", Approve, 0) },
                ],
                eligibility: &AnyVoter,
                approved: true,
                approvers: &[("alice", "v-alice-b")],
                rejected_by: None,
                ignored: &[("v-alice-c", "already has a counted vote"), ("v-alice-a", "already has a counted vote")],
            },
        ]
    }

    #[test]
    fn tally_table() {
        let cases = cases();
        assert!(cases.len() >= 10);
        for case in cases {
            let name = case.name;
            let t = tally(&JOB, case.required, &case.votes, case.eligibility, &VoterPolicy::default());
            assert_eq!(t.required, case.required, "{name}: required");
            assert_eq!(t.approved(), case.approved, "{name}: approved(); tally {t:#?}");
            let approvers: Vec<(&str, &str)> = t.approvers.iter().map(|a| (a.voter.as_str(), a.vote.as_str())).collect();
            assert_eq!(approvers, case.approvers, "{name}: approvers");
            assert_eq!(t.rejected_by.as_ref().map(|r| (r.voter.as_str(), r.vote.as_str())), case.rejected_by, "{name}: rejected_by");
            let ignored: Vec<&str> = t.ignored.iter().map(|i| i.name.as_str()).collect();
            let want: Vec<&str> = case.ignored.iter().map(|(n, _)| *n).collect();
            assert_eq!(ignored, want, "{name}: ignored votes");
            for (got, (_, why)) in t.ignored.iter().zip(case.ignored) {
                assert!(got.why.contains(why), "{name}: {} ignored because {:?}, want {why:?}", got.name, got.why);
            }
            // Every counted vote carries its time and reason into status.
            for a in t.approvers.iter().chain(&t.rejected_by) {
                let v = case.votes.iter().find(|v| v.name == a.vote).unwrap();
                assert_eq!((&a.decided_at, &a.reason), (&v.created, &v.reason), "{name}: approver {} copies the vote", a.voter);
            }
        }
    }

    #[test]
    fn verdicts_say_whether_and_why_each_vote_counted() {
        let votes = vec![
            vote("v-alice", "alice", Approve, 1),
            VoteView { job_generation: 1, ..vote("v-bob-old", "bob", Approve, 2) },
            vote("v-carol", "carol", Reject, 3),
            vote("v-alice-2", "alice", Approve, 4),
        ];
        let t = tally(&JOB, 2, &votes, &AnyVoter, &VoterPolicy::default());
        let cases: &[(&str, &str, bool, &str)] = &[
            ("counted approval says so", "v-alice", true, "counted toward the job's approval"),
            (
                "old-generation vote reports why it is ignored",
                "v-bob-old",
                false,
                "is for generation 1 but the job is at generation 2; vote again",
            ),
            ("the counted Reject says it rejects", "v-carol", true, "counted: this Reject rejects the job"),
            ("a duplicate says the voter already voted", "v-alice-2", false, "alice already has a counted vote on this job"),
        ];
        for (name, vote, counted, message) in cases {
            assert_eq!(t.verdicts().of(vote), (*counted, message.to_string()), "{name}");
        }
    }

    const SA_ONE: &str = "system:serviceaccount:team:reviewer-one";
    const SA_TWO: &str = "system:serviceaccount:team:reviewer-two";

    #[test]
    fn service_accounts_count_only_when_trusted_and_at_most_max_robot_votes() {
        let votes = vec![vote("v-one", SA_ONE, Approve, 1), vote("v-two", SA_TWO, Approve, 2), vote("v-alice", "alice", Approve, 3)];
        let ignored = |t: &Tally| t.ignored.iter().map(|i| (i.name.clone(), i.why.clone())).collect::<Vec<_>>();
        let voters = |t: &Tally| t.approvers.iter().map(|a| a.voter.clone()).collect::<Vec<_>>();

        // One head made two ServiceAccounts and bound them as heads: neither counts untrusted.
        let untrusted = tally(&JOB, 2, &votes, &AnyVoter, &VoterPolicy::default());
        assert_eq!(voters(&untrusted), ["alice"]);
        assert!(!untrusted.approved());
        for (name, why) in ignored(&untrusted) {
            assert!(why.contains("is not a trusted robot voter") && why.contains("--robot-voters"), "{name}: {why}");
        }
        assert!(ignored(&untrusted)[0].1.starts_with("ServiceAccount team/reviewer-one "), "{:?}", ignored(&untrusted));

        // A configured robot reviewer counts, with one human: approved.
        let one = VoterPolicy::new(["team/reviewer-one"], 1).unwrap();
        let t = tally(&JOB, 2, &votes, &AnyVoter, &one);
        assert_eq!(voters(&t), [SA_ONE, "alice"]);
        assert!(t.approved());

        // Both trusted, at most one robot vote per job: the second is listed with why.
        let both = VoterPolicy::new(["team/reviewer-one", "team/reviewer-two"], 1).unwrap();
        let t = tally(&JOB, 2, &votes[..2], &AnyVoter, &both);
        assert_eq!(voters(&t), [SA_ONE], "two robots are not two heads");
        assert_eq!(
            ignored(&t),
            [("v-two".to_string(), "1 robot vote(s) already count on this job, the most that may (--max-robot-votes 1)".to_string())]
        );
        // Configured otherwise, both count.
        let two = VoterPolicy { max_robot_votes: 2, ..both };
        assert!(tally(&JOB, 2, &votes[..2], &AnyVoter, &two).approved());
        // A robot's Reject uses up the robot vote too.
        let rejecting = [vote("v-one", SA_ONE, Reject, 1), vote("v-two", SA_TWO, Approve, 2)];
        let t = tally(&JOB, 1, &rejecting, &AnyVoter, &VoterPolicy::new(["team/reviewer-one", "team/reviewer-two"], 1).unwrap());
        assert_eq!(t.rejected_by.map(|r| r.voter), Some(SA_ONE.to_string()));
        assert!(t.approvers.is_empty());
    }

    #[test]
    fn votes_that_cannot_count_are_settled_without_asking_rbac_and_the_tally_is_unchanged() {
        let robots = VoterPolicy::new(["team/reviewer-one"], 1).unwrap();
        let other_uid = VoteView { job_uid: "uid-41".into(), ..vote("v-old-uid", "alice", Approve, 1) };
        let on_generation = |g: i64, name: &str, voter: &str| VoteView { job_generation: g, ..vote(name, voter, Approve, 2) };
        let votes = vec![
            other_uid,
            on_generation(1, "v-bob-g1", "bob"),
            on_generation(7, "v-bob-g7", "bob"),
            vote("v-mallory", "mallory", Approve, 3),
            vote("v-trent", "trent", Approve, 4),
            vote("v-sock", SA_TWO, Approve, 5),
            vote("v-robot", SA_ONE, Approve, 6),
            vote("v-alice", "alice", Approve, 7),
        ];
        // Generation 1 still runs (an attempt or a Pod says so); 7 is nobody's.
        let generations = [JOB.generation, 1];
        let reviewed: Vec<&str> = votes.iter().filter(|v| may_count(&JOB, &generations, v, &robots)).map(|v| v.name.as_str()).collect();
        assert_eq!(reviewed, ["v-bob-g1", "v-robot", "v-alice"]);
        // Everyone asked about is a head: the tallies are those of a tally that asks about everyone.
        let heads = HeadVerdicts(reviewed.iter().map(|name| (name.to_string(), Ok(()))).collect());
        for generation in generations {
            let job = JobIdentity { generation, ..JOB };
            assert_eq!(tally(&job, 2, &votes, &heads, &robots), tally(&job, 2, &votes, &AnyVoter, &robots), "generation {generation}");
        }
    }

    #[test]
    fn robot_voters_are_parsed_from_namespace_slash_name() {
        let p = VoterPolicy::new(["ci/reviewer", " tools/bot "], 1).unwrap();
        assert_eq!(
            p.robots.iter().map(String::as_str).collect::<Vec<_>>(),
            ["system:serviceaccount:ci:reviewer", "system:serviceaccount:tools:bot"]
        );
        for bad in ["reviewer", "/x", "x/", "a/b/c"] {
            assert!(VoterPolicy::new([bad], 1).is_err(), "{bad}");
        }
    }

    /// Like the SubjectAccessReview: a head only with the group `agentgate:heads` on the vote.
    struct HeadByGroup;

    impl Eligibility for HeadByGroup {
        fn check(&self, vote: &VoteView) -> Result<(), String> {
            if vote.groups.iter().any(|g| g == "agentgate:heads") { Ok(()) } else { Err(format!("{} is not a head", vote.voter)) }
        }
    }

    #[test]
    fn each_vote_is_judged_with_its_own_groups() {
        // alice's stale vote (on a deleted job of this name) was cast while she was a head; her
        // vote on this job was cast after she lost the group. The stale one must not vouch for it.
        let stale = VoteView { job_uid: "uid-old".into(), groups: vec!["agentgate:heads".into()], ..vote("v-old", "alice", Approve, 1) };
        let current = VoteView { groups: vec!["agentgate:users".into()], ..vote("v-now", "alice", Approve, 2) };
        let t = tally(&JOB, 1, &[stale.clone(), current.clone()], &HeadByGroup, &VoterPolicy::default());
        assert!(t.approvers.is_empty(), "{t:#?}");
        assert!(t.ignored.iter().any(|i| i.name == "v-now" && i.why == "alice is not a head"), "{:?}", t.ignored);
        // And through HeadVerdicts, the operator's answers keyed by vote.
        let verdicts =
            HeadVerdicts(BTreeMap::from([("v-old".to_string(), Ok(())), ("v-now".to_string(), Err("alice is not a head".to_string()))]));
        let t = tally(&JOB, 1, &[stale, current], &verdicts, &VoterPolicy::default());
        assert!(t.approvers.is_empty(), "{t:#?}");
    }

    /// 20,000 junk votes of one tenant's, names of 246 characters: each vote's verdict, written
    /// to its status on every reconcile of the job, was found by scanning the 20,000 ignored ones
    /// (2×10^8 comparisons, over 3 s in a debug build, on one of the operator's worker threads).
    #[test]
    fn every_verdict_of_20000_junk_votes_is_found_in_linear_time() {
        let prefix = "v".repeat(240);
        let votes: Vec<VoteView> = (0..20_000).map(|i| vote(&format!("{prefix}-{i:05}"), "mallory", Approve, 1)).collect();
        let t = tally(&JOB, 2, &votes, &AnyVoter, &VoterPolicy::default());
        assert_eq!(t.ignored.len(), 20_000, "the author's votes");
        let started = std::time::Instant::now();
        let verdicts = t.verdicts();
        let counted = votes.iter().filter(|v| verdicts.of(&v.name).0).count();
        let took = started.elapsed();
        assert_eq!(counted, 0);
        assert_eq!(verdicts.of(&votes[7].name), (false, "mallory created the job and may not approve it".to_string()));
        assert!(took < std::time::Duration::from_millis(500), "{took:?}");
    }

    /// 5,000 junk votes from 100 voters: the status lists 32, one per voter, and counts the rest.
    #[test]
    fn ignored_votes_are_listed_once_per_voter_and_capped() {
        let mut votes: Vec<VoteView> =
            (0..5000).map(|i| vote(&format!("junk-{i:04}"), &format!("eve-{}", i % 100), Approve, i64::from(i / 100))).collect();
        votes.push(vote("v-alice", "alice", Approve, 100));
        let t = tally(&JOB, 2, &votes, &Refuse(&[]), &VoterPolicy::default());
        assert_eq!(t.ignored.len(), 4900, "every eve's second and later votes");
        let listed = t.ignored_for_status();
        assert_eq!(listed.len(), MAX_IGNORED_LISTED + 1);
        // junk-N is eve-(N mod 100)'s.
        let voters: std::collections::BTreeSet<u32> =
            listed[..MAX_IGNORED_LISTED].iter().map(|i| i.name.trim_start_matches("junk-").parse::<u32>().unwrap() % 100).collect();
        assert_eq!(voters.len(), MAX_IGNORED_LISTED);
        assert_eq!(listed[MAX_IGNORED_LISTED].name, UNLISTED);
        assert!(listed[MAX_IGNORED_LISTED].why.starts_with("4868 more ignored vote(s)"), "{}", listed[MAX_IGNORED_LISTED].why);
        assert_eq!(t.approvers.len(), 101, "each voter's first vote still counts");
    }
}
