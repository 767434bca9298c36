//! The budget: every call reserves its worst case before it is forwarded, and the reservation is
//! replaced by the real cost when the response ends. The invariant, kept under one lock:
//! `spent + reserved ≤ budget`, and a call's real cost never exceeds its reservation (the cap it
//! is forwarded with bounds its output; its input is bounded as `wire::RequestFacts` explains),
//! so `spent ≤ budget` however many calls are in flight.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::surcharge::Multiplier;
use crate::api::Usage;
use crate::domain::money::MicroUsd;
use crate::domain::pricing::{CacheWrites, ModelPrice, PerMillion, TokenCounts};

/// Each part of a real cost is rounded half up on its own (`ModelPrice::cost`): the four input
/// parts (fresh, cached, two cache writes) sum to at most the bound's exact cost plus 2, which
/// the bound rounded half up plus 2 always covers (integers: `⌊y + 2⌋ ≤ ⌈y + 1.5⌉`).
const ROUNDING_SLACK: MicroUsd = MicroUsd(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub reserve: MicroUsd,
    /// The cap to set on a request that has none.
    pub inject_cap: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The call's worst case does not fit in what is left.
    Budget { needed: MicroUsd, remaining: MicroUsd },
}

/// What a call may cost at most, and the cap to set when the client set none. Pure: `remaining`
/// is what the budget still allows (`None`: no budget).
pub fn plan(
    price: &ModelPrice,
    input_bound: i64,
    cache_writes: CacheWrites,
    output_cap: Option<i64>,
    choices: i64,
    default_cap: i64,
    remaining: Option<MicroUsd>,
) -> Result<Plan, Refusal> {
    // Every input token may turn out fresh, cached or written to the cache: the bound is priced
    // at the dearest (a cache write bills above input: tests/meter/test_meter.py
    // test_an_agent_writing_its_cache_cannot_spend_past_its_budget).
    let input_rate = price.input_bound_rate(cache_writes);
    let input_cost = input_rate.of(input_bound).saturating_add(ROUNDING_SLACK);
    let output_cost = |cap: i64| price.output_per_million.of(cap.saturating_mul(choices));
    let (cap, inject_cap) = match (output_cap, remaining) {
        (Some(cap), _) => (cap, None),
        (None, None) => (default_cap, Some(default_cap)),
        (None, Some(remaining)) => {
            let left = MicroUsd(remaining.0.saturating_sub(input_cost.0));
            let cap = affordable_tokens(price.output_per_million, left, choices).min(default_cap);
            // A call with no output to give is refused below rather than forwarded with a cap of 0
            // (which providers reject as invalid anyway).
            (cap.max(1), Some(cap.max(1)))
        }
    };
    let reserve = input_cost.saturating_add(output_cost(cap));
    match remaining {
        Some(remaining) if reserve > remaining => Err(Refusal::Budget { needed: reserve, remaining }),
        _ => Ok(Plan { reserve, inject_cap }),
    }
}

/// The most output tokens (per choice) whose cost fits in `left`.
fn affordable_tokens(rate: PerMillion, left: MicroUsd, choices: i64) -> i64 {
    if left.0 <= 0 {
        return 0;
    }
    if rate.0.0 <= 0 {
        return i64::MAX;
    }
    // `of(x)` is `floor((x × rate + 500,000) / 1,000,000)`, so `of(x) ≤ left` exactly when
    // `x × rate ≤ (left + 1) × 1,000,000 − 500,001`: solved for x, then shared among the choices.
    let most = (i128::from(left.0) + 1) * 1_000_000 - 500_001;
    let tokens = most / i128::from(rate.0.0) / i128::from(choices.max(1));
    i64::try_from(tokens).unwrap_or(i64::MAX)
}

/// How a finished call is charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The response reported its usage and ended cleanly.
    Measured(TokenCounts),
    /// Measured, and billed above the list price by the multiplier the response reported
    /// (surcharge.rs): charged at that price.
    MeasuredAbove(TokenCounts, Multiplier),
    /// Usage unknown (the client left mid-stream, the upstream broke off, the usage event never
    /// came): charged the reservation, the most the call can have cost.
    Unmeasured,
    /// Never reached the provider, or the provider refused it (errors are not billed).
    Free,
}

#[derive(Debug, Default)]
struct State {
    budget: Option<MicroUsd>,
    spent: MicroUsd,
    reserved: MicroUsd,
    models: BTreeMap<String, (TokenCounts, MicroUsd)>,
    calls: u64,
    refused_calls: u64,
    budget_refusals: u64,
    unmeasured_calls: u64,
    in_flight: u64,
    /// What the calls in flight reserved, by model, and how many they are.
    in_flight_by_model: BTreeMap<String, (MicroUsd, u64)>,
}

/// Running totals, shared by every call of one meter.
#[derive(Debug)]
pub struct Ledger {
    state: Mutex<State>,
    /// Woken after every settled call, for the report file writer.
    pub changed: tokio::sync::Notify,
}

/// `GET /usage` and the report file: the project's usage shape plus the budget's state.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub usage: Usage,
    #[serde(rename = "budgetUSD", skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<String>,
    #[serde(rename = "reservedUSD")]
    pub reserved_usd: String,
    pub calls: u64,
    pub refused_calls: u64,
    /// Of the refused calls, those refused (402) because the budget could not cover their worst
    /// case: reported to the operator, they end the job `BudgetExhausted`. A call refused only
    /// because the operator could not be reached for more is not one of them.
    pub budget_refusals: u64,
    /// Calls charged their reservation because their usage could not be read.
    pub unmeasured_calls: u64,
    pub in_flight: u64,
}

impl Ledger {
    pub fn new(budget: Option<MicroUsd>) -> Arc<Ledger> {
        Arc::new(Ledger { state: Mutex::new(State { budget, ..State::default() }), changed: tokio::sync::Notify::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the totals half-updated (every update is
        // a few integer additions), so a poisoned lock is still a consistent one.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Plans and reserves atomically: the remaining budget cannot change between the two.
    pub fn reserve(
        self: &Arc<Ledger>,
        model: &str,
        price: ModelPrice,
        plan_for: impl FnOnce(Option<MicroUsd>) -> Result<Plan, Refusal>,
    ) -> Result<(Reservation, Plan), Refusal> {
        let mut state = self.lock();
        let remaining = state.budget.map(|b| MicroUsd(b.0 - state.spent.0 - state.reserved.0));
        match plan_for(remaining) {
            Ok(plan) => {
                state.reserved = state.reserved.saturating_add(plan.reserve);
                state.in_flight += 1;
                let entry = state.in_flight_by_model.entry(model.to_string()).or_default();
                *entry = (entry.0.saturating_add(plan.reserve), entry.1 + 1);
                let reservation =
                    Reservation { ledger: self.clone(), model: model.to_string(), price, amount: plan.reserve, settled: false };
                Ok((reservation, plan))
            }
            Err(refusal) => {
                state.refused_calls += 1;
                Err(refusal)
            }
        }
    }

    /// A call refused (402) because the budget could not cover it (see [`Snapshot::budget_refusals`]).
    pub fn count_budget_refusal(&self) {
        self.lock().budget_refusals += 1;
        self.changed.notify_one();
    }

    /// A call refused before any reservation (unknown model, unbounded input).
    pub fn count_refusal(&self) {
        self.lock().refused_calls += 1;
        self.changed.notify_one();
    }

    fn settle(&self, model: &str, price: &ModelPrice, reserved: MicroUsd, outcome: Outcome) {
        let (tokens, cost) = match outcome {
            Outcome::Measured(tokens) => (tokens, price.cost(&tokens)),
            Outcome::MeasuredAbove(tokens, multiplier) => (tokens, multiplier.of(price).cost(&tokens)),
            Outcome::Unmeasured => (TokenCounts::default(), reserved),
            Outcome::Free => (TokenCounts::default(), MicroUsd(0)),
        };
        let mut state = self.lock();
        state.reserved = MicroUsd(state.reserved.0 - reserved.0);
        state.spent = state.spent.saturating_add(cost);
        state.in_flight -= 1;
        if let Some(entry) = state.in_flight_by_model.get_mut(model) {
            *entry = (MicroUsd(entry.0.0 - reserved.0), entry.1.saturating_sub(1));
            if entry.1 == 0 {
                state.in_flight_by_model.remove(model);
            }
        }
        if cost > reserved {
            // Only possible if the input bound is wrong for some input, or the provider billed the
            // call above what the request pinned (an OpenAI project answering priority to a
            // `default` call): the real cost is still what is recorded, and the log says which
            // model to look at.
            tracing::warn!(model, reserved = %reserved, cost = %cost, "a call cost more than its reservation");
        }
        if outcome != Outcome::Free {
            state.calls += 1;
            if outcome == Outcome::Unmeasured {
                state.unmeasured_calls += 1;
            }
            let entry = state.models.entry(model.to_string()).or_default();
            entry.0 = entry.0.add(&tokens);
            entry.1 = entry.1.saturating_add(cost);
        }
        drop(state);
        self.changed.notify_one();
    }

    /// Raises the budget to `total` (what the operator has granted this meter in all): never
    /// lowers it, so an answer to an older request arriving late changes nothing.
    pub fn raise_budget(&self, total: MicroUsd) {
        let mut state = self.lock();
        state.budget = Some(state.budget.map_or(total, |b| b.max(total)));
    }

    /// Starts this meter process from the totals of the Pod's earlier meter processes (the
    /// state file, meter/state_file.rs): its usage, its reports and its termination message are
    /// then cumulative for the Pod's whole session, and a fixed budget holds across restarts
    /// rather than starting afresh with each process. Called once, before any call.
    pub fn carry(&self, earlier: &Carried) {
        let mut state = self.lock();
        for m in &earlier.usage.models {
            let entry = state.models.entry(m.model.clone()).or_default();
            entry.0 = entry.0.add(&crate::domain::report::model_tokens(m));
            entry.1 = entry.1.saturating_add(MicroUsd::parse(&m.cost_usd).unwrap_or_default());
        }
        state.spent = state.spent.saturating_add(MicroUsd::parse(&earlier.usage.cost_usd).unwrap_or_default());
        state.calls += earlier.calls;
        state.refused_calls += earlier.refused_calls;
        state.budget_refusals += earlier.budget_refusals;
        state.unmeasured_calls += earlier.unmeasured_calls;
        drop(state);
        self.changed.notify_one();
    }

    /// The totals as they would be if every call in flight ended now unmeasured, charged its
    /// reservation (as a dropped [`Reservation`] is): what a later meter process of the Pod
    /// resumes from (meter/state_file.rs). A process killed mid-call cannot charge its calls in
    /// flight, and the provider may have billed them; uncharged, the next process would spend
    /// their reservations a second time.
    pub fn carried_if_stopped_now(&self) -> Carried {
        let state = self.lock();
        let mut models = state.models.clone();
        for (model, (reserved, _)) in &state.in_flight_by_model {
            let entry = models.entry(model.clone()).or_default();
            entry.1 = entry.1.saturating_add(*reserved);
        }
        let mut usage = Usage { cost_usd: state.spent.saturating_add(state.reserved).to_string(), ..Usage::default() };
        for (model, (tokens, cost)) in &models {
            crate::domain::report::add_model_usage(&mut usage, model, tokens, *cost);
        }
        Carried {
            usage,
            calls: state.calls + state.in_flight,
            refused_calls: state.refused_calls,
            budget_refusals: state.budget_refusals,
            unmeasured_calls: state.unmeasured_calls + state.in_flight,
        }
    }

    /// What the budget still allows (`None`: no budget).
    pub fn remaining(&self) -> Option<MicroUsd> {
        let state = self.lock();
        state.budget.map(|b| MicroUsd(b.0 - state.spent.0 - state.reserved.0))
    }

    pub fn spent(&self) -> MicroUsd {
        self.lock().spent
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let mut usage = Usage { cost_usd: state.spent.to_string(), ..Usage::default() };
        for (model, (tokens, cost)) in &state.models {
            crate::domain::report::add_model_usage(&mut usage, model, tokens, *cost);
        }
        Snapshot {
            usage,
            budget_usd: state.budget.map(|b| b.to_string()),
            reserved_usd: state.reserved.to_string(),
            calls: state.calls,
            refused_calls: state.refused_calls,
            budget_refusals: state.budget_refusals,
            unmeasured_calls: state.unmeasured_calls,
            in_flight: state.in_flight,
        }
    }
}

/// What earlier meter processes of the Pod's session left (meter/state_file.rs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Carried {
    pub usage: Usage,
    pub calls: u64,
    pub refused_calls: u64,
    pub budget_refusals: u64,
    pub unmeasured_calls: u64,
}

/// A call's hold on the budget. Dropped without `settle` (the client disconnected, the task was
/// cancelled), it charges the whole reservation: conservative, never zero.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<Ledger>,
    model: String,
    price: ModelPrice,
    amount: MicroUsd,
    settled: bool,
}

impl Reservation {
    /// The model the call is priced as.
    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn settle(mut self, outcome: Outcome) {
        self.settled = true;
        self.ledger.settle(&self.model, &self.price, self.amount, outcome);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.ledger.settle(&self.model, &self.price, self.amount, Outcome::Unmeasured);
        }
    }
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
