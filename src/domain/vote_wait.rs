//! How long a new job's first status waits for votes applied with it (`decide::hold_first_status`):
//! `--vote-wait-ms`, stretched to how late the approvals of recent pipeline jobs came.
//!
//! A pipeline applies a job and its votes together, and on a quiet apiserver the votes follow
//! within milliseconds. A loaded one queues them (API Priority and Fairness does not exempt
//! voters), and the bench saw a tenth of a burst's jobs get their first approval seconds after
//! the job, past a fixed wait: each then cost a status write more. So the wait follows the
//! longest time after their job that the approvals of the last [`REMEMBERED`] approved jobs took
//! to be complete (a percentile left the tail it cuts off, a tenth of the burst, written twice),
//! never below `--vote-wait-ms` and never past [`MAX_FACTOR`] times it.
//! Jobs approved later than that bound are people voting, not a pipeline, and are not counted.
//! Only approvals that count are observed, so no one but a category head moves the wait, and at
//! most to the bound: it delays the first status of jobs nobody voted on yet, nothing else.

use std::collections::VecDeque;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Approved jobs whose lateness is remembered.
pub const REMEMBERED: usize = 64;

/// The wait is never longer than this many `--vote-wait-ms`, from a job's creation.
pub const MAX_FACTOR: u32 = 4;

/// How long to wait for a job's first votes, and the longest that approvals still arriving may
/// stretch it to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VoteWait {
    pub wait: Duration,
    pub longest: Duration,
}

impl VoteWait {
    /// `--vote-wait-ms` as configured, with nothing learned.
    pub fn configured(vote_wait: Duration) -> VoteWait {
        VoteWait { wait: vote_wait, longest: vote_wait * MAX_FACTOR }
    }
}

#[derive(Debug, Default)]
pub struct VoteLateness {
    recent: VecDeque<Duration>,
}

impl VoteLateness {
    /// Records that a job created at `created` had the approvals it needed, the newest decided at
    /// `approved` (both whole-second timestamps, so the lateness is in whole seconds too, the unit
    /// the wait is counted in).
    pub fn observe(&mut self, created: &Time, approved: &Time, vote_wait: Duration) {
        let lateness: Duration = approved.0.duration_since(created.0).try_into().unwrap_or_default();
        if lateness > vote_wait * MAX_FACTOR {
            return;
        }
        if self.recent.len() == REMEMBERED {
            self.recent.pop_front();
        }
        self.recent.push_back(lateness);
    }

    pub fn wait(&self, vote_wait: Duration) -> VoteWait {
        let configured = VoteWait::configured(vote_wait);
        let latest = self.recent.iter().copied().max().unwrap_or_default();
        VoteWait { wait: latest.clamp(configured.wait, configured.longest), ..configured }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(1_750_000_000 + second).unwrap())
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn nothing_learned_is_the_configured_wait() {
        assert_eq!(VoteLateness::default().wait(SECOND), VoteWait { wait: SECOND, longest: 4 * SECOND });
    }

    #[test]
    fn late_pipelines_stretch_the_wait_to_the_latest_within_the_bound() {
        let mut l = VoteLateness::default();
        for _ in 0..8 {
            l.observe(&at(0), &at(0), SECOND);
        }
        l.observe(&at(0), &at(2), SECOND);
        assert_eq!(l.wait(SECOND).wait, 2 * SECOND, "one late pipeline in nine");
        l.observe(&at(0), &at(4), SECOND);
        assert_eq!(l.wait(SECOND), VoteWait { wait: 4 * SECOND, longest: 4 * SECOND });
        for _ in 0..REMEMBERED {
            l.observe(&at(0), &at(0), SECOND);
        }
        assert_eq!(l.wait(SECOND).wait, SECOND, "only the last {REMEMBERED} count; quiet again, back to --vote-wait-ms");
    }

    #[test]
    fn people_voting_later_than_the_bound_are_not_a_pipeline() {
        let mut l = VoteLateness::default();
        l.observe(&at(0), &at(300), SECOND);
        l.observe(&at(0), &at(5), SECOND);
        assert_eq!(l.wait(SECOND).wait, SECOND);
        assert_eq!(VoteLateness::default().wait(Duration::ZERO), VoteWait { wait: Duration::ZERO, longest: Duration::ZERO }, "0 stays off");
    }
}
