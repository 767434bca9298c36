//! Votes approve the tool endpoints the job will be given, not just its spec.
//!
//! A job names tools; where a tool points (its Service or URL) is not part of the job's spec and
//! may change after heads approved the job, for instance when a discovered tool's Service is
//! replaced. The agent then sends its input and its tool calls somewhere nobody approved. So:
//! - when a job is approved, the endpoints of its tools are recorded in `status.toolEndpoints`
//!   with the votes that approved it;
//! - until the job's first attempt of that generation starts, a tool that points elsewhere than
//!   recorded revokes those votes (`status.revokedVotes`, each with why): the job goes back to
//!   `AwaitingApproval` with reason `ToolEndpointChanged`, and counts new votes only;
//! - a tool missing at approval is recorded when it appears (the job was waiting for it);
//! - once an attempt started, the record stays as what the job was approved with.

use kube::runtime::reflector::ObjectRef;

use super::Caches;
use crate::api::{AgentJob, AgentJobStatus, ApprovedToolEndpoints, IgnoredVote, ToolEndpointRecord};
use crate::domain::decide::{Plan, condition};
use crate::domain::tally::{Tally, VoteView};

/// Reason on the `Approved` condition of a job whose approving votes were revoked.
pub const TOOL_ENDPOINT_CHANGED: &str = "ToolEndpointChanged";

/// The endpoint of a tool that has no AgentTool (or no endpoint).
const NONE: &str = "none";

/// Where each of the job's tools points now, as the tool cache shows it.
pub fn current(job: &AgentJob, caches: &Caches) -> Vec<ToolEndpointRecord> {
    job.spec
        .tools
        .iter()
        .map(|t| {
            let endpoint = caches.tools.get(&ObjectRef::new(&t.name)).map_or_else(
                || NONE.to_string(),
                |tool| match (&tool.spec.endpoint.service, &tool.spec.endpoint.url) {
                    (Some(s), _) => format!("service {}/{}:{}", s.namespace, s.name, s.port),
                    (None, Some(url)) => format!("url {url}"),
                    (None, None) => NONE.to_string(),
                },
            );
            ToolEndpointRecord { name: t.name.clone(), endpoint }
        })
        .collect()
}

/// The URL an agent is given for `tool` by the approved record, as the tool controller derives
/// it (agent_tool.rs check_endpoint); None when the record has no endpoint for it.
pub fn approved_url(record: &ApprovedToolEndpoints, tool: &str) -> Option<String> {
    let endpoint = record.tools.iter().find(|t| t.name == tool)?.endpoint.as_str();
    if let Some(url) = endpoint.strip_prefix("url ") {
        return Some(url.to_string());
    }
    let (ns_name, port) = endpoint.strip_prefix("service ")?.rsplit_once(':')?;
    let (ns, name) = ns_name.split_once('/')?;
    Some(format!("http://{name}.{ns}.svc:{port}"))
}

/// The URL an agent of the job is given for `tool`. Once the job's endpoints are recorded, only
/// the approved one: a tool recorded as missing (an optional tool absent when the job started) is
/// given to none of its attempts, retries included, whoever registers the name later; it was
/// given to the retries at whatever the newcomer pointed at (tests/tools.rs
/// `an_optional_tool_registered_after_the_job_started_is_given_to_none_of_its_attempts`). `now`,
/// the tool's URL as its status says, only for a job without a record (started by a version
/// before records).
pub fn agent_url(record: Option<&ApprovedToolEndpoints>, tool: &str, now: impl FnOnce() -> Option<String>) -> Option<String> {
    match record {
        Some(record) => approved_url(record, tool),
        None => now(),
    }
}

/// What [`before`] found, for [`after`].
#[derive(Debug, Default, PartialEq)]
pub struct Pinning {
    revoked: Vec<IgnoredVote>,
    record: Option<Box<ApprovedToolEndpoints>>,
    started: bool,
    /// Why the job awaits approval again, while a revoked vote is on the current generation.
    explanation: Option<String>,
}

/// Before the tally: revokes the votes that approved endpoints which have changed since.
pub fn before(status: &AgentJobStatus, generation: i64, now: &[ToolEndpointRecord], votes: &[VoteView]) -> Pinning {
    let present = |name: &str| votes.iter().any(|v| v.name == name);
    // A revoked vote that was deleted is forgotten: votes are immutable, so a new one is new.
    let mut revoked: Vec<IgnoredVote> = status.revoked_votes.iter().filter(|r| present(&r.name)).cloned().collect();
    let started = status.attempts.iter().any(|a| a.generation == generation);
    let mut record = status.tool_endpoints.clone().filter(|r| r.generation == generation);
    let recorded =
        |r: &ApprovedToolEndpoints, name: &str| r.tools.iter().find(|o| o.name == name).map_or(NONE, |o| o.endpoint.as_str()).to_string();
    // A change is a tool that pointed somewhere at approval and now points somewhere else. A tool
    // missing at approval is what the job waits for: when it appears it is recorded, not a
    // change (heads who approve a job naming a missing tool approve whatever admins register
    // under that name). A tool that went missing is not a change yet: the job cannot start.
    let changes: Vec<String> = match &record {
        Some(r) if !started => now
            .iter()
            .filter(|t| t.endpoint != NONE)
            .filter_map(|t| {
                let was = recorded(r, &t.name);
                (was != NONE && was != t.endpoint).then(|| format!("tool {} went from {was} to {}", t.name, t.endpoint))
            })
            .collect(),
        _ => Vec::new(),
    };
    if let Some(r) = record.as_ref().filter(|_| !changes.is_empty()) {
        let why = format!("approved the job's tools at endpoints that changed before it started ({}); vote again", changes.join(", "));
        for name in r.approved_by.iter().filter(|n| present(n)) {
            if !revoked.iter().any(|x| &x.name == name) {
                revoked.push(IgnoredVote { name: name.clone(), why: why.clone() });
            }
        }
        record = None;
    } else if let Some(r) = record.as_mut().filter(|_| !started) {
        for t in r.tools.iter_mut().filter(|t| t.endpoint == NONE) {
            if let Some(appeared) = now.iter().find(|n| n.name == t.name && n.endpoint != NONE) {
                t.endpoint = appeared.endpoint.clone();
            }
        }
    }
    let on_this_generation = |r: &&IgnoredVote| votes.iter().any(|v| v.name == r.name && v.job_generation == generation);
    let explanation =
        revoked.iter().find(on_this_generation).map(|r| format!("a tool endpoint changed after approval: the votes that {}", r.why));
    Pinning { revoked, record, started, explanation }
}

impl Pinning {
    /// The votes to tally: all but the revoked ones. They are left out rather than ignored after
    /// the tally, so a voter's new vote counts where the revoked one would block it as a repeat.
    pub fn tallied(&self, votes: &[VoteView]) -> Vec<VoteView> {
        votes.iter().filter(|v| !self.revoked.iter().any(|r| r.name == v.name)).cloned().collect()
    }

    /// Lists each revoked vote among the tally's ignored votes, with why.
    pub fn mark(&self, tally: &mut Tally) {
        tally.ignored.extend(self.revoked.iter().cloned());
    }
}

/// After the decision: records the endpoints when the job is approved, and says why a job whose
/// votes were revoked awaits approval again.
pub fn after(plan: &mut Plan, old: &AgentJobStatus, pinning: Pinning, now: Vec<ToolEndpointRecord>, generation: i64) {
    let approved = crate::domain::conditions::find(&plan.status.conditions, condition::APPROVED).is_some_and(|c| c.status == "True");
    plan.status.revoked_votes = pinning.revoked;
    plan.status.tool_endpoints = if pinning.started {
        pinning.record.or_else(|| old.tool_endpoints.clone())
    } else if approved && !now.is_empty() {
        let approved_by = plan.status.approval.as_ref().map(|a| a.approvers.iter().map(|x| x.vote.clone()).collect()).unwrap_or_default();
        Some(pinning.record.unwrap_or_else(|| Box::new(ApprovedToolEndpoints { generation, tools: now, approved_by })))
    } else {
        None
    };
    if let Some(why) = pinning.explanation {
        super::identity_policies::explain(plan, old, TOOL_ENDPOINT_CHANGED, &why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Approver, Decision};

    fn endpoint(name: &str, endpoint: &str) -> ToolEndpointRecord {
        ToolEndpointRecord { name: name.into(), endpoint: endpoint.into() }
    }

    fn vote(name: &str, generation: i64) -> VoteView {
        VoteView {
            name: name.into(),
            voter: name.into(),
            decision: Decision::Approve,
            job_name: "job".into(),
            job_uid: "uid".into(),
            job_generation: generation,
            reason: None,
            created: None,
            groups: vec![],
        }
    }

    fn tally_of(votes: &[&str]) -> Tally {
        Tally {
            required: 2,
            approvers: votes
                .iter()
                .map(|v| Approver { voter: v.to_string(), vote: v.to_string(), decided_at: None, reason: None })
                .collect(),
            ..Tally::default()
        }
    }

    fn approved_with(tools: Vec<ToolEndpointRecord>) -> AgentJobStatus {
        AgentJobStatus {
            tool_endpoints: Some(Box::new(ApprovedToolEndpoints { generation: 1, tools, approved_by: vec!["alice".into(), "bob".into()] })),
            ..AgentJobStatus::default()
        }
    }

    /// The votes `before` leaves to the tally, by name.
    fn kept(p: &Pinning, votes: &[VoteView]) -> Vec<String> {
        p.tallied(votes).into_iter().map(|v| v.name).collect()
    }

    #[test]
    fn the_agent_gets_the_url_of_the_approved_endpoint() {
        let record = ApprovedToolEndpoints {
            generation: 1,
            tools: vec![endpoint("a", "service tools/search:8080"), endpoint("b", "url https://x.example/v1"), endpoint("c", "none")],
            approved_by: vec![],
        };
        assert_eq!(approved_url(&record, "a").as_deref(), Some("http://search.tools.svc:8080"));
        assert_eq!(approved_url(&record, "b").as_deref(), Some("https://x.example/v1"));
        assert_eq!(approved_url(&record, "c"), None);
        assert_eq!(approved_url(&record, "d"), None);
        // With a record, what a tool's status says now is never given: c was missing when the job
        // started, and whoever registered it since was approved by nobody.
        let squatter = || Some("https://squatter.example/v1".to_string());
        assert_eq!(agent_url(Some(&record), "c", squatter), None);
        assert_eq!(agent_url(Some(&record), "d", squatter), None);
        assert_eq!(agent_url(Some(&record), "b", squatter).as_deref(), Some("https://x.example/v1"));
        // A job started before records existed: the tool's URL now, as then.
        assert_eq!(agent_url(None, "c", squatter).as_deref(), Some("https://squatter.example/v1"));
    }

    #[test]
    fn unchanged_endpoints_keep_the_votes() {
        let tools = vec![endpoint("search", "service tools/search:8080")];
        let votes = [vote("alice", 1), vote("bob", 1)];
        let p = before(&approved_with(tools.clone()), 1, &tools, &votes);
        assert_eq!(kept(&p, &votes), ["alice", "bob"]);
        assert!(p.revoked.is_empty() && p.explanation.is_none());
        assert_eq!(p.record.map(|r| r.tools), Some(tools));
    }

    #[test]
    fn a_changed_endpoint_before_the_start_revokes_the_approving_votes_only() {
        let was = vec![endpoint("search", "service tools/search:8080")];
        let now = vec![endpoint("search", "service squat/search:8080")];
        let votes = [vote("alice", 1), vote("bob", 1), vote("carol", 1)];
        let p = before(&approved_with(was), 1, &now, &votes);
        assert_eq!(kept(&p, &votes), ["carol"], "carol voted after the change");
        assert_eq!(p.revoked.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["alice", "bob"]);
        assert!(
            p.revoked[0].why.contains("(tool search went from service tools/search:8080 to service squat/search:8080); vote again"),
            "{}",
            p.revoked[0].why
        );
        assert!(p.record.is_none(), "a new approval records the new endpoints");
        assert!(p.explanation.as_deref().unwrap().starts_with("a tool endpoint changed after approval"));
        let mut t = Tally::default();
        p.mark(&mut t);
        assert_eq!(t.ignored, p.revoked);

        // Next reconcile: the revocation holds though the record is gone; new votes count.
        let status = AgentJobStatus { revoked_votes: p.revoked.clone(), ..AgentJobStatus::default() };
        let votes = [vote("alice", 1), vote("bob", 1), vote("alice-again", 1)];
        let p2 = before(&status, 1, &now, &votes);
        assert_eq!(kept(&p2, &votes), ["alice-again"]);
        assert_eq!(p2.revoked, p.revoked);
        // A deleted revoked vote is forgotten.
        let p3 = before(&status, 1, &now, &[vote("bob", 1)]);
        assert_eq!(p3.revoked.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["bob"]);
    }

    #[test]
    fn a_tool_missing_at_approval_is_recorded_when_it_appears_and_a_vanished_one_is_no_change_yet() {
        let votes = [vote("alice", 1), vote("bob", 1)];
        let appeared = vec![endpoint("search", "url https://a.example")];
        let p = before(&approved_with(vec![endpoint("search", "none")]), 1, &appeared, &votes);
        assert!(p.revoked.is_empty());
        assert_eq!(p.record.map(|r| r.tools), Some(appeared.clone()), "filled in");
        let p = before(&approved_with(appeared.clone()), 1, &[endpoint("search", "none")], &votes);
        assert!(p.revoked.is_empty());
        assert_eq!(p.record.map(|r| r.tools), Some(appeared), "kept as approved");
        // Gone and back elsewhere is a change.
        let p = before(
            &approved_with(vec![endpoint("search", "url https://a.example")]),
            1,
            &[endpoint("search", "url https://b.example")],
            &votes,
        );
        assert_eq!(p.revoked.len(), 2);
    }

    #[test]
    fn after_the_start_or_on_a_new_generation_nothing_is_revoked() {
        let was = vec![endpoint("search", "url https://a.example")];
        let now = vec![endpoint("search", "url https://b.example")];
        let mut started = approved_with(was.clone());
        started.attempts.push(crate::api::Attempt { attempt: 1, generation: 1, learned: Some(false), ..Default::default() });
        let votes = [vote("alice", 1), vote("bob", 1)];
        let p = before(&started, 1, &now, &votes);
        assert!(p.revoked.is_empty() && p.started);
        assert_eq!(kept(&p, &votes).len(), 2);
        // A record of generation 1 says nothing about generation 2, whose votes are new anyway.
        let votes = [vote("alice", 2), vote("bob", 2)];
        let p = before(&approved_with(was), 2, &now, &votes);
        assert!(p.revoked.is_empty() && p.record.is_none());
        assert_eq!(kept(&p, &votes).len(), 2);
    }

    #[test]
    fn approval_records_the_endpoints_and_its_votes() {
        let now = vec![endpoint("search", "url https://a.example")];
        let mut plan = Plan { status: AgentJobStatus::default(), ensure_attempt: None, drop_gpu: false, events: vec![] };
        crate::domain::conditions::set_condition(
            &mut plan.status.conditions,
            condition::APPROVED,
            true,
            "Approved",
            "approved by alice, bob",
            1,
            &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        );
        let tally = tally_of(&["alice", "bob"]);
        plan.status.approval = Some(crate::api::ApprovalStatus { approvers: tally.approvers.clone(), ..Default::default() });
        after(&mut plan, &AgentJobStatus::default(), Pinning::default(), now.clone(), 1);
        assert_eq!(
            plan.status.tool_endpoints,
            Some(Box::new(ApprovedToolEndpoints { generation: 1, tools: now, approved_by: vec!["alice".into(), "bob".into()] }))
        );
    }
}
