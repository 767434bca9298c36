//! How many approvals a job needs: the operator's floor, raised by risk tiers (what the job may
//! spend, category) and by the job itself, never lowered.

use std::str::FromStr;

use super::money::MicroUsd;

/// `minCostUSD=10,required=3[,humanGroup=agentgate:humans][,category=core-security]`:
/// jobs whose budget or p90 estimate ([`tier_cost`]) is at least `minCostUSD` (in `category`, if
/// given) need `required` approvals, one of them from a member of `humanGroup` when it is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalTier {
    pub min_cost: MicroUsd,
    pub required: i32,
    pub human_group: Option<String>,
    pub category: Option<String>,
}

impl FromStr for ApprovalTier {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tier = ApprovalTier { min_cost: MicroUsd(0), required: 0, human_group: None, category: None };
        let mut saw_cost = false;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("tier part {part:?} is not key=value"))?;
            match key {
                "minCostUSD" => {
                    tier.min_cost = MicroUsd::parse(value).ok_or_else(|| format!("minCostUSD {value:?} is not a decimal USD amount"))?;
                    saw_cost = true;
                }
                "required" => {
                    tier.required =
                        value.parse().ok().filter(|n| (1..=10).contains(n)).ok_or_else(|| format!("required {value:?} must be 1 to 10"))?
                }
                "humanGroup" if !value.is_empty() => tier.human_group = Some(value.to_string()),
                "category" if !value.is_empty() => tier.category = Some(value.to_string()),
                _ => return Err(format!("unknown tier key {key:?}: use minCostUSD, required, humanGroup, category")),
            }
        }
        if !saw_cost || tier.required == 0 {
            return Err(format!("tier {s:?} needs minCostUSD and required"));
        }
        Ok(tier)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub required: i32,
    /// At least one counted approver must be in this group.
    pub human_group: Option<String>,
    /// Why more than the floor is needed, for status messages.
    pub because: Option<String>,
}

/// What a tier measures a job by: the larger of its p90 estimate and `budget.maxCostUSD`. The
/// meters let a job spend up to its budget whatever the estimate says, and the author writes
/// both: a small job with a large budget measured by its estimate alone would slip under every
/// tier (tests/approvals.rs a_budget_at_a_risk_tier_needs_the_tier_however_small_the_estimate).
/// None only when neither is known (no estimate and a budget that is not a USD amount).
pub fn tier_cost(cost_p90: Option<MicroUsd>, max_cost_usd: &str) -> Option<MicroUsd> {
    match (cost_p90, MicroUsd::parse(max_cost_usd)) {
        (Some(p90), Some(budget)) => Some(p90.max(budget)),
        (p90, budget) => p90.or(budget),
    }
}

/// The approvals a job needs, with `cost` from [`tier_cost`].
pub fn requirement(floor: i32, tiers: &[ApprovalTier], category: &str, cost: Option<MicroUsd>, job_asks: Option<i32>) -> Requirement {
    let mut r = Requirement { required: floor, human_group: None, because: None };
    for tier in tiers {
        let applies = cost.is_some_and(|c| c >= tier.min_cost) && tier.category.as_deref().is_none_or(|c| c == category);
        if !applies {
            continue;
        }
        if tier.required > r.required {
            r.required = tier.required;
            r.because = Some(format!("its budget or estimated p90 cost is at least ${}", tier.min_cost));
        }
        if tier.human_group.is_some() && r.human_group.is_none() {
            r.human_group = tier.human_group.clone();
            r.because.get_or_insert_with(|| format!("its budget or estimated p90 cost is at least ${}", tier.min_cost));
        }
    }
    if let Some(asked) = job_asks.filter(|a| *a > r.required) {
        r.required = asked;
        r.because = Some("spec.approval.required asks for it".into());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(s: &str) -> ApprovalTier {
        s.parse().unwrap()
    }

    #[test]
    fn parses_tiers_and_names_what_is_wrong() {
        assert_eq!(
            tier("minCostUSD=10,required=3,humanGroup=agentgate:humans,category=core-security"),
            ApprovalTier {
                min_cost: MicroUsd(10_000_000),
                required: 3,
                human_group: Some("agentgate:humans".into()),
                category: Some("core-security".into())
            }
        );
        for (bad, want) in [
            ("required=3", "needs minCostUSD"),
            ("minCostUSD=1e3,required=3", "not a decimal"),
            ("minCostUSD=1,required=11", "1 to 10"),
            ("minCostUSD=1,required=2,colour=red", "unknown tier key"),
            ("minCostUSD", "not key=value"),
        ] {
            let err = bad.parse::<ApprovalTier>().unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn requirement_takes_the_strictest_applicable_rule_and_never_goes_below_the_floor() {
        let tiers = [
            tier("minCostUSD=10,required=3,humanGroup=humans"),
            tier("minCostUSD=100,required=4"),
            tier("minCostUSD=1,required=5,category=finance"),
        ];
        // (name, category, p90 micro-USD, spec.approval.required, want required, want human group)
        type Case<'a> = (&'a str, &'a str, Option<i64>, Option<i32>, i32, Option<&'a str>);
        let cases: &[Case] = &[
            ("cheap job: floor", "core", Some(1_000_000), None, 2, None),
            ("no estimate yet: floor", "core", None, None, 2, None),
            ("over $10: tier 3 with a human", "core", Some(10_000_000), None, 3, Some("humans")),
            ("over $100: 4, human still required", "core", Some(150_000_000), None, 4, Some("humans")),
            ("category tier applies only to its category", "finance", Some(2_000_000), None, 5, None),
            ("job asks for more", "core", Some(1), Some(6), 6, None),
            ("job cannot go below the floor", "core", Some(1), Some(1), 2, None),
            ("job cannot go below a tier", "core", Some(10_000_000), Some(2), 3, Some("humans")),
        ];
        for (name, category, cost, asks, want_required, want_group) in cases {
            let r = requirement(2, &tiers, category, cost.map(MicroUsd), *asks);
            assert_eq!(r.required, *want_required, "{name}");
            assert_eq!(r.human_group.as_deref(), *want_group, "{name}");
        }
    }

    #[test]
    fn a_tier_measures_the_budget_when_the_estimate_is_smaller() {
        let usd = |s: &str| MicroUsd::parse(s).unwrap();
        assert_eq!(tier_cost(Some(usd("0.02")), "500"), Some(usd("500")));
        assert_eq!(tier_cost(Some(usd("7")), "5"), Some(usd("7")), "an estimate over budget (rejected anyway) still counts");
        assert_eq!(tier_cost(None, "500"), Some(usd("500")), "no estimate: the budget");
        assert_eq!(tier_cost(Some(usd("3")), "lots"), Some(usd("3")));
        assert_eq!(tier_cost(None, "lots"), None);
        let r = requirement(2, &[tier("minCostUSD=10,required=3,humanGroup=humans")], "core", tier_cost(Some(usd("0.02")), "500"), None);
        assert_eq!((r.required, r.human_group.as_deref()), (3, Some("humans")));
        assert!(r.because.is_some_and(|b| b.contains("budget")));
    }
}
