//! Counting ApprovalVotes: which votes count toward a job's approval, and why the others don't.

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
}

#[derive(Clone, Debug, PartialEq)]
pub struct JobIdentity<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub generation: i64,
    /// Who created the job, when known; they may not approve their own job.
    pub author: Option<&'a str>,
}

/// Whether a voter may approve jobs of the job's category: `Err` says why not.
pub trait Eligibility {
    fn check(&self, voter: &str) -> Result<(), String>;
}

/// Until identities are checked against RBAC, every voter is eligible.
pub struct AnyVoter;

impl Eligibility for AnyVoter {
    fn check(&self, _voter: &str) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    pub required: i32,
    pub approvers: Vec<Approver>,
    pub rejected_by: Option<Approver>,
    pub ignored: Vec<IgnoredVote>,
}

impl Tally {
    pub fn approved(&self) -> bool {
        self.rejected_by.is_none() && self.approvers.len() as i32 >= self.required
    }

    /// What the vote's own status should say: counted or not, and why.
    pub fn verdict(&self, vote: &str) -> (bool, String) {
        if let Some(ignored) = self.ignored.iter().find(|i| i.name == vote) {
            return (false, ignored.why.clone());
        }
        let reject = self.rejected_by.as_ref().filter(|r| r.vote == vote);
        if reject.is_some() {
            return (true, "counted: this Reject rejects the job".into());
        }
        (true, format!("counted: {} of {} approvals", self.approvers.len(), self.required))
    }
}

/// Votes count in creation order; a voter's first valid vote is the one that counts.
pub fn tally(job: &JobIdentity, required: i32, votes: &[VoteView], eligibility: &dyn Eligibility) -> Tally {
    let mut ordered: Vec<&VoteView> = votes.iter().filter(|v| v.job_name == job.name).collect();
    ordered.sort_by(|a, b| (a.created.as_ref().map(|t| t.0), &a.name).cmp(&(b.created.as_ref().map(|t| t.0), &b.name)));

    let mut t = Tally { required, ..Tally::default() };
    let mut seen_voters: Vec<&str> = Vec::new();
    for vote in ordered {
        let why_not = if vote.job_uid != job.uid {
            Some(format!("names job uid {} but {} has uid {}", vote.job_uid, job.name, job.uid))
        } else if vote.job_generation != job.generation {
            Some(format!("is for generation {} but the job is at generation {}; vote again", vote.job_generation, job.generation))
        } else if job.author == Some(vote.voter.as_str()) {
            Some(format!("{} created the job and may not approve it", vote.voter))
        } else if seen_voters.contains(&vote.voter.as_str()) {
            Some(format!("{} already has a counted vote on this job", vote.voter))
        } else {
            eligibility.check(&vote.voter).err()
        };
        if let Some(why) = why_not {
            t.ignored.push(IgnoredVote { name: vote.name.clone(), why });
            continue;
        }
        seen_voters.push(&vote.voter);
        let approver = Approver { voter: vote.voter.clone(), vote: vote.name.clone(), decided_at: vote.created.clone(), reason: vote.reason.clone() };
        match vote.decision {
            Decision::Approve => t.approvers.push(approver),
            Decision::Reject if t.rejected_by.is_none() => t.rejected_by = Some(approver),
            Decision::Reject => {}
        }
    }
    t
}
