//! The plugin's `votes` table: which votes count and why.

use std::fmt::Write as _;

use kube::ResourceExt;

use crate::api::{AgentJob, ApprovalVote, Decision, JobPhase};
use crate::domain::terminal_text::line;

#[derive(Clone, Debug, PartialEq)]
pub struct VoteRow {
    pub vote: String,
    pub voter: String,
    pub decision: Decision,
    pub generation: i64,
    /// `yes`, `no` or `pending` (not tallied yet).
    pub counted: &'static str,
    pub why: String,
    pub reason: String,
}

/// One row per vote: whether it counts and why, from the job's own tally where it has one (the
/// operator's current view), else from the vote's status.
pub fn vote_rows(job: &AgentJob, votes: &[ApprovalVote]) -> Vec<VoteRow> {
    let approval = job.status.as_ref().and_then(|s| s.approval.as_ref());
    votes
        .iter()
        .map(|v| {
            let name = v.name_any();
            let vote_status = v.status.as_ref();
            let from_vote = || match vote_status.and_then(|s| s.counted) {
                Some(counted) => (if counted { "yes" } else { "no" }, vote_status.and_then(|s| s.message.clone()).unwrap_or_default()),
                None => ("pending", "not tallied by the operator yet".to_string()),
            };
            let (counted, why) = match approval {
                Some(a) if a.approvers.iter().any(|x| x.vote == name) => (
                    "yes",
                    vote_status.and_then(|s| s.message.clone()).unwrap_or_else(|| format!("counted: one of {} approvals", a.required)),
                ),
                Some(a) => match a.ignored_votes.iter().find(|i| i.name == name) {
                    Some(ignored) => ("no", ignored.why.clone()),
                    None if v.spec.decision == Decision::Reject
                        && a.rejected_by.as_deref() == Some(v.spec.voter.as_str())
                        && is_current(v, job) =>
                    {
                        ("yes", "counted: this Reject rejects the job".to_string())
                    }
                    None => from_vote(),
                },
                None => from_vote(),
            };
            VoteRow {
                vote: name,
                voter: v.spec.voter.clone(),
                decision: v.spec.decision,
                generation: v.spec.job_ref.generation,
                counted,
                why,
                reason: v.spec.reason.clone().unwrap_or_default(),
            }
        })
        .collect()
}

fn is_current(vote: &ApprovalVote, job: &AgentJob) -> bool {
    Some(&vote.spec.job_ref.uid) == job.metadata.uid.as_ref() && vote.spec.job_ref.generation == job.metadata.generation.unwrap_or(1)
}

/// The job's approval summary followed by the vote table.
pub fn render_votes(job: &AgentJob, rows: &[VoteRow]) -> String {
    let mut out = String::new();
    let status = job.status.clone().unwrap_or_default();
    let phase = status.phase.map(JobPhase::as_str).unwrap_or("Pending");
    let _ = writeln!(
        out,
        "AgentJob {}/{} (generation {}, category {}): {phase}",
        job.namespace().unwrap_or_default(),
        job.name_any(),
        job.metadata.generation.unwrap_or(1),
        job.spec.category
    );
    match &status.approval {
        Some(a) => {
            let approvers: Vec<_> = a.approvers.iter().map(|x| line(&x.voter)).collect();
            let _ = writeln!(
                out,
                "Approvals {} (approved by: {}; rejected by: {})",
                line(&a.summary),
                if approvers.is_empty() { "nobody".to_string() } else { approvers.join(", ") },
                line(a.rejected_by.as_deref().unwrap_or("nobody"))
            );
        }
        None => {
            let _ = writeln!(out, "Approvals: not tallied yet");
        }
    }
    if let Some(c) = status.conditions.iter().find(|c| c.type_ == "Approved") {
        let _ = writeln!(out, "Approved={} ({}): {}", line(&c.status), line(&c.reason), line(&c.message));
    }
    out.push('\n');
    if rows.is_empty() {
        out.push_str("No votes yet.\n");
        return out;
    }
    let header = ["VOTE", "VOTER", "DECISION", "GEN", "COUNTED", "WHY", "REASON"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.vote.clone(),
                r.voter.clone(),
                format!("{:?}", r.decision),
                r.generation.to_string(),
                r.counted.to_string(),
                r.why.clone(),
                r.reason.clone(),
            ]
        })
        .collect();
    out + &crate::text_table::render(&header, &cells, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApprovalStatus, ApprovalVoteSpec, ApprovalVoteStatus, Approver, IgnoredVote, JobRef};
    use crate::review::fixtures::job;

    fn vote(name: &str, voter: &str, decision: Decision, generation: i64, status: Option<(bool, &str)>) -> ApprovalVote {
        let mut v = ApprovalVote::new(
            name,
            ApprovalVoteSpec {
                job_ref: JobRef { name: "scan".into(), uid: "uid-1".into(), generation },
                voter: voter.into(),
                decision,
                reason: Some(format!("{voter}'s reason")),
                voter_groups: vec![],
                confidence: None,
            },
        );
        v.status = status.map(|(c, m)| ApprovalVoteStatus { counted: Some(c), message: Some(m.into()), observed_generation: Some(1) });
        v
    }

    #[test]
    fn vote_table_prefers_the_jobs_tally() {
        let mut j = job(&[], &["ghcr.io/acme/a:1"], None);
        let approver = |voter: &str, vote: &str| Approver { voter: voter.into(), vote: vote.into(), decided_at: None, reason: None };
        j.status.as_mut().unwrap().approval = Some(ApprovalStatus {
            required: 2,
            approved: 1,
            summary: "1/2".into(),
            approvers: vec![approver("alice", "scan-alice-g2")],
            rejected_by: Some("carol".into()),
            ignored_votes: vec![IgnoredVote {
                name: "scan-bob-g1".into(),
                why: "is for generation 1 but the job is at generation 2; vote again".into(),
            }],
        });
        let votes = vec![
            vote("scan-alice-g2", "alice", Decision::Approve, 2, Some((true, "counted: 1 of 2 approvals"))),
            vote("scan-bob-g1", "bob", Decision::Approve, 1, Some((true, "counted: 1 of 2 approvals"))), // stale status
            vote("scan-carol-g2", "carol", Decision::Reject, 2, None),
            vote("scan-dave-g2", "dave", Decision::Approve, 2, None),
        ];
        let rows = vote_rows(&j, &votes);
        let got: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r.vote.as_str(), r.counted, r.why.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("scan-alice-g2", "yes", "counted: 1 of 2 approvals"),
                ("scan-bob-g1", "no", "is for generation 1 but the job is at generation 2; vote again"),
                ("scan-carol-g2", "yes", "counted: this Reject rejects the job"),
                ("scan-dave-g2", "pending", "not tallied by the operator yet"),
            ]
        );
        let table = render_votes(&j, &rows);
        assert!(table.contains("Approvals 1/2 (approved by: alice; rejected by: carol)"), "{table}");
        let header = table.lines().find(|l| l.starts_with("VOTE")).unwrap();
        assert!(header.contains("VOTER") && header.contains("COUNTED") && header.contains("WHY"), "{header}");
        let alice = table.lines().find(|l| l.starts_with("scan-alice-g2")).unwrap();
        assert!(alice.contains("alice") && alice.contains("Approve") && alice.contains("yes"), "{alice}");
    }

    /// A tenant's own vote cannot count, but its reason is shown to every head who lists the
    /// votes: a line break in it forged a counted row, an escape sequence erased real ones.
    #[test]
    fn a_vote_reason_cannot_forge_rows_or_move_the_cursor() {
        let j = job(&[], &["ghcr.io/acme/a:1"], None);
        let mut forged = vote("scan-mallory-g2", "mallory", Decision::Approve, 2, Some((false, "voter is the job's author")));
        forged.spec.reason =
            Some("ok\nscan-alice-g2   alice   Approve   2   yes   counted: 1 of 2 approvals\x1b[1A\x1b[2K\r\u{202E}".into());
        let table = render_votes(&j, &vote_rows(&j, &[forged]));
        assert_eq!(table.lines().filter(|l| l.starts_with("scan-")).count(), 1, "one vote, one row:\n{table}");
        assert!(!table.chars().any(|c| c != '\n' && crate::domain::terminal_text::is_hidden(c)), "{table:?}");
        assert!(table.contains(r"ok\nscan-alice-g2") && table.contains(r"\u001B[1A\u001B[2K\r\u202E"), "{table}");
    }
}
