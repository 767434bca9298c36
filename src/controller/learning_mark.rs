//! Each attempt's usage is learned by the estimator and counted by the token and cost counters
//! exactly once, through status: an attempt whose usage is stored and not yet marked `learned`
//! is learned on any reconcile (the learner dedups by attempt key), the estimator state is
//! written back, and only then is the mark written with the rest of the status. A crash or a lost
//! lease anywhere in between leaves the mark unwritten, so the next leader learns the attempt
//! again: before the estimator state was written, nothing of it was kept; after, its key is in
//! the state and the learner skips it. The counters live in the process, so a new process counting
//! the attempt again counts it for the first time.
//!
//! Upgrade: attempts stored by an operator older than the mark have no `learned` at all. That
//! operator learned and counted each attempt in the reconcile that first saw its usage, before
//! the status write, so they are marked without being learned or counted again: learning them
//! would learn twice every one beyond the learner's last 512 keys, and count the whole history
//! again. The one attempt an old operator may have lost (killed between its write and its
//! learning, the bug the mark fixes) stays lost. An attempt an old operator started and this one
//! settles is this one's to learn (`decide` marks its usage `learned: false`).

use super::Context;
use crate::api::{AgentJob, AgentJobStatus, AttemptResult};
use crate::domain::decide::{estimate_input, job_type};
use crate::domain::estimate::prior_tokens;
use crate::domain::report::tokens_of;
use kube::ResourceExt;

/// Indexes of the attempts whose usage is stored but not yet learned. Pure.
pub fn unlearned(stored: &AgentJobStatus) -> Vec<usize> {
    stored.attempts.iter().enumerate().filter(|(_, a)| a.usage.is_some() && a.learned == Some(false)).map(|(i, _)| i).collect()
}

/// Whether the estimator learns an attempt's usage: only what a successful run cost (failed
/// attempts would drag it towards runs that stopped early), and not when some of its usage went
/// unmeasured (it would learn a cost below the real one, lowering the namespace's estimates past
/// cost tiers; domain/meter_message.rs). Its usage is counted either way.
pub fn teaches_the_estimator(attempt: &crate::api::Attempt) -> bool {
    attempt.result == AttemptResult::Succeeded && attempt.unmeasured_pods.is_empty()
}

/// Indexes of the attempts an operator older than the mark stored (and learned). Pure.
pub fn learned_before_the_mark(stored: &AgentJobStatus) -> Vec<usize> {
    stored.attempts.iter().enumerate().filter(|(_, a)| a.usage.is_some() && a.learned.is_none()).map(|(i, _)| i).collect()
}

/// Learns and counts the stored, unmarked attempts and marks them in `next` (the status about to
/// be written). The marks are set only once the estimator state holding them is written back.
pub async fn learn_stored(job: &AgentJob, ctx: &Context, stored: &AgentJobStatus, next: &mut AgentJobStatus) {
    mark(stored, next, &learned_before_the_mark(stored));
    let pending = unlearned(stored);
    if pending.is_empty() {
        return;
    }
    let mut learned = false;
    // One copy of the prices for every pending attempt, for learning and the counters' labels.
    let prices = ctx.prices.read().await.clone();
    let namespace = job.namespace().unwrap_or_default();
    for &i in &pending {
        let attempt = &stored.attempts[i];
        let Some(usage) = &attempt.usage else { continue };
        if teaches_the_estimator(attempt) {
            let key = crate::domain::learning::attempt_key(job.metadata.uid.as_deref().unwrap_or_default(), attempt.attempt);
            let prior = prior_tokens(&estimate_input(job));
            if ctx.learner.state.lock().await.record(&key, &namespace, &job_type(job), &tokens_of(usage), &prior, &prices) {
                ctx.learner.touch();
            }
            // Recorded now or by an earlier reconcile whose write may not have landed yet.
            learned = true;
        }
        for m in &usage.models {
            let labels = ctx.metrics.usage_labels(&m.model, prices.get(&m.model).is_some(), &job.spec.category);
            ctx.metrics.tokens.get_or_create(&labels).inc_by((crate::domain::report::model_tokens(m).total()).max(0) as u64);
            ctx.metrics.cost_usd.get_or_create(&labels).inc_by(m.cost_usd.parse().unwrap_or(0.0));
        }
    }
    if learned && !ctx.learner.flush(&ctx.client).await {
        // Not persisted: no mark, so the next reconcile tries again (the in-memory state dedups).
        tracing::warn!(job = %job.name_any(), namespace = ?job.namespace(), "estimator state not written; the attempt stays unmarked");
        return;
    }
    mark(stored, next, &pending);
}

fn mark(stored: &AgentJobStatus, next: &mut AgentJobStatus, attempts: &[usize]) {
    for &i in attempts {
        if let Some(a) = next.attempts.get_mut(i).filter(|a| a.attempt == stored.attempts[i].attempt) {
            a.learned = Some(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Attempt, Usage};

    fn attempt(n: i32, usage: bool, learned: Option<bool>) -> Attempt {
        Attempt {
            attempt: n,
            generation: 1,
            result: if usage { AttemptResult::Succeeded } else { AttemptResult::Running },
            usage: usage.then(Usage::default),
            learned,
            ..Attempt::default()
        }
    }

    #[test]
    fn an_attempt_with_unmeasured_usage_teaches_the_estimator_nothing() {
        let measured = attempt(1, true, Some(false));
        assert!(teaches_the_estimator(&measured));
        let unmeasured = Attempt { unmeasured_pods: vec!["j-a-1-agentgate".into()], ..measured.clone() };
        assert!(!teaches_the_estimator(&unmeasured));
        assert!(!teaches_the_estimator(&Attempt { result: AttemptResult::Failed, ..measured }));
    }

    #[test]
    fn only_stored_unmarked_usage_is_pending() {
        let status = AgentJobStatus {
            attempts: vec![
                attempt(1, true, Some(true)),
                attempt(2, true, Some(false)),
                attempt(3, false, Some(false)),
                attempt(4, true, None),
            ],
            ..AgentJobStatus::default()
        };
        // Attempt 1 was learned and marked; 2 is stored without the mark (a crash or lost lease
        // after its usage was written): learned now; 3 still runs; 4 was stored (and learned) by
        // an operator older than the mark: marked only.
        assert_eq!(unlearned(&status), vec![1]);
        assert_eq!(learned_before_the_mark(&status), vec![3]);
        // A status read back after the mark was written has nothing pending: never twice.
        let mut marked = status.clone();
        mark(&status, &mut marked, &[1, 3]);
        assert!(unlearned(&marked).is_empty() && learned_before_the_mark(&marked).is_empty());
    }
}
