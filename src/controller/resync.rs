//! When a job's reconcile comes back on the clock, not on a watch event.

use kube::runtime::controller::Action;

use super::RESYNC;
use crate::api::{AgentJobStatus, JobPhase};
use crate::domain::decide::condition;

/// Whether `next_check` schedules a job in this phase again on the clock (it asks this first;
/// the memory report's estimate of kube-runtime's requeue schedule counts these).
pub fn rechecked_on_the_clock(phase: Option<JobPhase>, approval_timeout_seconds: Option<i64>) -> bool {
    match phase {
        Some(p) if p.is_terminal() => false,
        Some(JobPhase::AwaitingApproval) => approval_timeout_seconds.is_some(),
        _ => true,
    }
}

/// As [`next_check`], but no later than `within` when that is set (Pods still expected:
/// pod_expectations.rs).
pub fn next_check_within(status: &AgentJobStatus, approval_timeout_seconds: Option<i64>, within: Option<std::time::Duration>) -> Action {
    match (check_after(status, approval_timeout_seconds), within) {
        (Some(after), Some(within)) => Action::requeue(after.min(within)),
        (after, within) => after.or(within).map_or_else(Action::await_change, Action::requeue),
    }
}

pub fn next_check(status: &AgentJobStatus, approval_timeout_seconds: Option<i64>) -> Action {
    check_after(status, approval_timeout_seconds).map_or_else(Action::await_change, Action::requeue)
}

fn check_after(status: &AgentJobStatus, approval_timeout_seconds: Option<i64>) -> Option<std::time::Duration> {
    // A job awaiting approval has no timed resync, only its approval timeout if one is set.
    // What it waits for reaches it through watches: a vote (the vote watch), a head's rights
    // (the RBAC watch requeues the jobs awaiting approval that have votes; one without votes
    // has nothing to count), the identity policies (requeue every waiting job), its tools,
    // prices and its own spec; a relist of any of them after a lost watch counts as a change.
    // Nothing else in `decide` moves with time while it waits. The resync would hold two
    // copies of each such job's key in kube-runtime's schedule, ~0.5 KB a job: 3.9 MiB at
    // `make bench`'s 8,500 unvoted jobs (README "Memory at 10,000 jobs").
    if !rechecked_on_the_clock(status.phase, approval_timeout_seconds) {
        return None;
    }
    match (status.phase, approval_timeout_seconds) {
        (Some(JobPhase::AwaitingApproval), Some(limit)) => {
            let since = crate::domain::conditions::find(&status.conditions, condition::APPROVED).map(|c| c.last_transition_time.0);
            let remaining = since.map(|since| {
                let waited = k8s_openapi::jiff::Timestamp::now().duration_since(since).as_secs();
                std::time::Duration::from_secs((limit - waited).max(0) as u64 + 1)
            });
            Some(remaining.map_or(RESYNC, |r| r.min(RESYNC)))
        }
        _ => Some(RESYNC),
    }
}

#[cfg(test)]
mod tests {
    use super::{next_check, rechecked_on_the_clock};
    use crate::api::{AgentJobStatus, JobPhase};
    use kube::runtime::controller::Action;

    fn status(phase: JobPhase) -> AgentJobStatus {
        let mut s = AgentJobStatus { phase: Some(phase), ..Default::default() };
        let at = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
        crate::domain::conditions::set_condition(&mut s.conditions, "Approved", false, "AwaitingApproval", "0 of 2", 1, &at);
        s
    }

    /// Only a job awaiting approval without an approval timeout waits for watches alone; every
    /// other unfinished job keeps its resync, and the memory report's estimate agrees.
    #[test]
    fn only_jobs_awaiting_approval_without_a_timeout_leave_the_clock() {
        assert_eq!(next_check(&status(JobPhase::AwaitingApproval), None), Action::await_change());
        assert_eq!(next_check(&status(JobPhase::AwaitingApproval), Some(60)), Action::requeue(std::time::Duration::from_secs(61)));
        for phase in [JobPhase::Pending, JobPhase::WaitingForResources, JobPhase::Running] {
            assert_eq!(next_check(&status(phase), None), Action::requeue(super::RESYNC), "{phase:?}");
        }
        assert_eq!(next_check(&status(JobPhase::Succeeded), Some(60)), Action::await_change());
        for &phase in JobPhase::ALL {
            for timeout in [None, Some(60)] {
                let scheduled = next_check(&status(phase), timeout) != Action::await_change();
                assert_eq!(rechecked_on_the_clock(Some(phase), timeout), scheduled, "{phase:?} {timeout:?}");
            }
        }
    }
}
