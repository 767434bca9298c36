//! A retry must fit the budget too: what the earlier attempts spent plus the estimate of one
//! more attempt (p90, estimated at the retry) must stay within `budget.maxCostUSD` and `budget.maxTokens`.
//! Without this, up to 10 retries could each spend up to the budget. The estimate is the one made
//! at the retry from what the estimator knows then, never the one recorded in status: a tenant who
//! may write status could lower that to buy a retry the budget cannot cover (tests/estimator.rs
//! `a_retry_must_fit_what_was_spent_plus_a_fresh_estimate_not_a_forged_one`).

use super::money::MicroUsd;
use crate::api::{AgentJobSpec, Usage};

/// The p90 of one more attempt: its cost and tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NextAttempt {
    pub cost_p90: MicroUsd,
    pub tokens_p90: i64,
}

/// Ok when one more attempt fits; else why not (goes into the condition and the Event). `next`
/// is `None` when it cannot be estimated (a model without a price: the gate then waits for one).
pub fn next_attempt_fits(spec: &AgentJobSpec, spent: Option<&Usage>, next: Option<NextAttempt>) -> Result<(), String> {
    // An unparsable budget is the approval gate's to report (decide::over_budget); not here.
    let Some(budget) = MicroUsd::parse(&spec.budget.max_cost_usd) else { return Ok(()) };
    let spent_cost = spent.and_then(|u| MicroUsd::parse(&u.cost_usd)).unwrap_or(MicroUsd(0));
    let next_cost = next.map_or(MicroUsd(0), |n| n.cost_p90);
    if spent_cost.saturating_add(next_cost) > budget {
        return Err(format!(
            "earlier attempts spent ${spent_cost}; another attempt (estimated p90 ${next_cost}) would exceed budget.maxCostUSD ${budget}"
        ));
    }
    if let Some(max) = spec.budget.max_tokens {
        let spent_tokens = spent.map_or(0, |u| u.total_tokens);
        let next_tokens = next.map_or(0, |n| n.tokens_p90);
        if spent_tokens.saturating_add(next_tokens) > max {
            return Err(format!(
                "earlier attempts used {spent_tokens} tokens; another attempt (estimated p90 {next_tokens}) would exceed budget.maxTokens {max}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max_cost: &str, max_tokens: Option<i64>) -> AgentJobSpec {
        let mut spec: AgentJobSpec = serde_json::from_value(serde_json::json!({
            "category": "c",
            "agents": {"primary": {"name": "a", "image": "i", "model": "gpt-4o-mini"}},
            "budget": {"maxCostUSD": max_cost},
        }))
        .unwrap();
        spec.budget.max_tokens = max_tokens;
        spec
    }

    fn spent(cost: &str, tokens: i64) -> Usage {
        Usage { cost_usd: cost.into(), total_tokens: tokens, ..Usage::default() }
    }

    fn estimate(cost_p90: &str, tokens_p90: i64) -> NextAttempt {
        NextAttempt { cost_p90: MicroUsd::parse(cost_p90).unwrap(), tokens_p90 }
    }

    #[test]
    fn a_retry_runs_only_while_spent_plus_estimate_fits() {
        let e = estimate("1.00", 1000);
        assert_eq!(next_attempt_fits(&spec("5.00", None), Some(&spent("4.00", 10)), Some(e)), Ok(()), "exactly the budget fits");
        let why = next_attempt_fits(&spec("5.00", None), Some(&spent("4.000001", 10)), Some(e)).unwrap_err();
        assert!(why.contains("spent $4.000001") && why.contains("budget.maxCostUSD $5"), "{why}");
        let why = next_attempt_fits(&spec("5.00", Some(1500)), Some(&spent("0.10", 600)), Some(e)).unwrap_err();
        assert!(why.contains("600 tokens") && why.contains("maxTokens 1500"), "{why}");
        assert_eq!(next_attempt_fits(&spec("5.00", Some(1600)), Some(&spent("0.10", 600)), Some(e)), Ok(()));
    }

    #[test]
    fn nothing_spent_or_unknown_estimate_is_counted_as_zero_and_a_bad_budget_is_left_to_the_gate() {
        assert_eq!(next_attempt_fits(&spec("5.00", None), None, None), Ok(()));
        assert!(next_attempt_fits(&spec("5.00", None), Some(&spent("6.00", 0)), None).is_err(), "overspent already");
        assert_eq!(next_attempt_fits(&spec("lots", None), Some(&spent("6.00", 0)), None), Ok(()));
    }
}
