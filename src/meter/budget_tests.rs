use super::*;

/// $1 per million input, $0.50 cached, $4 output: 1, 0.5 and 4 micro-dollars per token.
fn price() -> ModelPrice {
    ModelPrice {
        input_per_million: PerMillion(MicroUsd(1_000_000)),
        cached_input_per_million: PerMillion(MicroUsd(500_000)),
        output_per_million: PerMillion(MicroUsd(4_000_000)),
        cache_write_per_million: None,
        cache_write_1h_per_million: None,
    }
}

#[test]
fn reserves_input_bound_and_output_cap_at_the_models_price() {
    let plan = plan(&price(), 1000, CacheWrites::None, Some(100), 1, 16_384, Some(MicroUsd(10_000))).unwrap();
    assert_eq!(plan, Plan { reserve: MicroUsd(1000 + 400 + 2), inject_cap: None });
    // n choices multiply the output.
    let plan = super::plan(&price(), 1000, CacheWrites::None, Some(100), 3, 16_384, Some(MicroUsd(10_000))).unwrap();
    assert_eq!(plan.reserve, MicroUsd(1000 + 1200 + 2));
}

#[test]
fn a_call_that_cannot_fit_is_refused() {
    assert_eq!(
        plan(&price(), 1000, CacheWrites::None, Some(100), 1, 16_384, Some(MicroUsd(1401))),
        Err(Refusal::Budget { needed: MicroUsd(1402), remaining: MicroUsd(1401) })
    );
    assert!(plan(&price(), 1000, CacheWrites::None, Some(100), 1, 16_384, Some(MicroUsd(1402))).is_ok(), "exactly fitting is fine");
    // A forged huge cap is refused, not clamped and not overflowed.
    assert!(plan(&price(), 10, CacheWrites::None, Some(i64::MAX), 128, 16_384, Some(MicroUsd(1_000_000_000))).is_err());
    // The input alone does not fit: refused even before any output.
    assert!(plan(&price(), 5_000, CacheWrites::None, None, 1, 16_384, Some(MicroUsd(4_000))).is_err());
    // Nothing left at all, or overspent (negative remaining).
    assert!(plan(&price(), 1, CacheWrites::None, None, 1, 16_384, Some(MicroUsd(0))).is_err());
    assert!(plan(&price(), 1, CacheWrites::None, None, 1, 16_384, Some(MicroUsd(-5))).is_err());
}

#[test]
fn a_missing_cap_is_set_to_what_the_budget_allows() {
    // 10,000 left, input 1,000 + 2 slack: 8,998 for output at 4 per token → 2,249 tokens.
    let plan = plan(&price(), 1000, CacheWrites::None, None, 1, 16_384, Some(MicroUsd(10_000))).unwrap();
    assert_eq!(plan.inject_cap, Some(2249));
    assert!(plan.reserve <= MicroUsd(10_000));
    // Plenty of budget: the default cap.
    let plan = super::plan(&price(), 1000, CacheWrites::None, None, 1, 16_384, Some(MicroUsd(1_000_000_000))).unwrap();
    assert_eq!(plan.inject_cap, Some(16_384));
    // No budget at all: the default cap too.
    let plan = super::plan(&price(), 1000, CacheWrites::None, None, 1, 16_384, None).unwrap();
    assert_eq!(plan.inject_cap, Some(16_384));
}

#[test]
fn the_injected_cap_always_fits_whatever_the_rates() {
    // Rates that do not divide evenly, rounding half up, several choices: the reservation
    // never exceeds what remains, and one more token would not have fitted.
    for rate in [1, 7, 150_000, 333_333, 2_500_000, 75_000_000] {
        for remaining in [3, 10, 999, 123_457, 10_000_000] {
            for choices in [1, 3] {
                let p = ModelPrice { output_per_million: PerMillion(MicroUsd(rate)), ..price() };
                let Ok(plan) = plan(&p, 0, CacheWrites::None, None, choices, i64::MAX, Some(MicroUsd(remaining))) else { continue };
                assert!(plan.reserve <= MicroUsd(remaining), "rate {rate} remaining {remaining}");
                let cap = plan.inject_cap.unwrap();
                let one_more = p.output_per_million.of((cap + 1) * choices).saturating_add(MicroUsd(2));
                assert!(one_more > MicroUsd(remaining), "rate {rate} remaining {remaining}: cap {cap} is the largest");
            }
        }
    }
    // Free output: the default cap.
    let free = ModelPrice { output_per_million: PerMillion(MicroUsd(0)), ..price() };
    assert_eq!(plan(&free, 0, CacheWrites::None, None, 1, 500, Some(MicroUsd(10))).unwrap().inject_cap, Some(500));
}

#[test]
fn the_real_cost_never_exceeds_the_reservation_when_usage_is_within_the_bounds() {
    // Worst split of the input bound between fresh and cached tokens, output at the cap.
    let p = ModelPrice {
        input_per_million: PerMillion(MicroUsd(150_000)),
        cached_input_per_million: PerMillion(MicroUsd(75_000)),
        output_per_million: PerMillion(MicroUsd(600_000)),
        cache_write_per_million: None,
        cache_write_1h_per_million: None,
    };
    for bound in [1, 3, 7, 10, 1001] {
        let plan = plan(&p, bound, CacheWrites::None, Some(13), 1, 100, None).unwrap();
        for cached in 0..=bound {
            let cost = p.cost(&TokenCounts { input: bound - cached, cached_input: cached, output: 13, ..Default::default() });
            assert!(cost <= plan.reserve, "bound {bound} cached {cached}: {cost} > {}", plan.reserve);
        }
    }
}

/// The same with cache writes: every split of the bound between fresh input, reads and writes of
/// both TTLs costs no more than the reservation made for the writes the request asks for.
#[test]
fn the_reservation_covers_every_split_into_cache_writes() {
    let p = ModelPrice {
        input_per_million: PerMillion(MicroUsd(3_000_000)),
        cached_input_per_million: PerMillion(MicroUsd(300_000)),
        output_per_million: PerMillion(MicroUsd(15_000_000)),
        cache_write_per_million: Some(PerMillion(MicroUsd(3_750_001))),
        cache_write_1h_per_million: Some(PerMillion(MicroUsd(6_000_001))),
    };
    for bound in [1, 2, 3, 7, 10, 101] {
        let five = plan(&p, bound, CacheWrites::FiveMinutes, Some(13), 1, 100, None).unwrap().reserve;
        let hour = plan(&p, bound, CacheWrites::OneHour, Some(13), 1, 100, None).unwrap().reserve;
        for write in 0..=bound {
            for cached in 0..=bound - write {
                let split = |write_1h: i64| TokenCounts {
                    input: bound - write - cached - write_1h,
                    cached_input: cached,
                    output: 13,
                    cache_write: write,
                    cache_write_1h: write_1h,
                };
                assert!(p.cost(&split(0)) <= five, "bound {bound} write {write} cached {cached}");
                for write_1h in 0..=bound - write - cached {
                    assert!(p.cost(&split(write_1h)) <= hour, "bound {bound} write {write} 1h {write_1h} cached {cached}");
                }
            }
        }
    }
    // What the bug let through: a call all cache writes, reserved at the input price.
    let writes = TokenCounts { cache_write: 100_000, ..TokenCounts::default() };
    assert!(p.cost(&writes) > plan(&p, 100_000, CacheWrites::None, Some(0), 1, 1, None).unwrap().reserve);
}

fn tokens(input: i64, output: i64) -> TokenCounts {
    TokenCounts { input, cached_input: 0, output, ..Default::default() }
}

#[test]
fn reservations_settle_to_the_real_cost_or_stay_charged() {
    let ledger = Ledger::new(Some(MicroUsd(10_000)));
    let fixed = |reserve| move |_: Option<MicroUsd>| Ok(Plan { reserve: MicroUsd(reserve), inject_cap: None });
    let (a, _) = ledger.reserve("m", price(), fixed(6_000)).unwrap();
    assert_eq!(ledger.snapshot().reserved_usd, "0.006");
    let (b, _) = ledger.reserve("m", price(), fixed(3_000)).unwrap();
    let planned = |remaining: Option<MicroUsd>| plan(&price(), 1000, CacheWrites::None, Some(100), 1, 1, remaining);
    assert!(ledger.reserve("m", price(), planned).is_err(), "1,000 left cannot hold a 1,402 call");
    a.settle(Outcome::Measured(tokens(100, 10)));
    assert_eq!(ledger.spent(), MicroUsd(140));
    drop(b); // the client went away mid-stream
    assert_eq!(ledger.spent(), MicroUsd(3_140), "an unsettled reservation is charged in full");
    let (c, _) = ledger.reserve("m", price(), fixed(10)).unwrap();
    c.settle(Outcome::Free);
    let s = ledger.snapshot();
    assert_eq!((s.calls, s.refused_calls, s.unmeasured_calls, s.in_flight), (2, 1, 1, 0));
    assert_eq!(s.usage.cost_usd, "0.00314");
    assert_eq!(s.usage.models[0].input_tokens, 100);
    assert_eq!(s.usage.models[0].output_tokens, 10);
    assert_eq!(s.usage.total_tokens, 110);
    assert_eq!(s.reserved_usd, "0.00");
}

#[test]
fn concurrent_calls_never_overspend() {
    let ledger = Ledger::new(Some(MicroUsd(100_000)));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                let mut admitted = 0;
                for i in 0..2_000 {
                    let planned = |remaining| plan(&price(), 100 + (i % 50), CacheWrites::None, Some(20), 1, 1, remaining);
                    if let Ok((r, _)) = ledger.reserve("m", price(), planned) {
                        admitted += 1;
                        // Some use all they may, some part, some vanish.
                        match (t + i) % 3 {
                            0 => r.settle(Outcome::Measured(tokens(100 + (i % 50), 20))),
                            1 => r.settle(Outcome::Measured(tokens(10, 1))),
                            _ => drop(r),
                        }
                    }
                }
                admitted
            })
        })
        .collect();
    let admitted: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(admitted > 0);
    assert!(ledger.spent() <= MicroUsd(100_000), "spent {}", ledger.spent());
    let s = ledger.snapshot();
    assert_eq!(s.in_flight, 0);
    assert!(s.refused_calls > 0, "the budget ran out");
}

#[test]
fn a_granted_budget_only_grows() {
    let ledger = Ledger::new(Some(MicroUsd(0)));
    assert_eq!(ledger.remaining(), Some(MicroUsd(0)));
    ledger.raise_budget(MicroUsd(500));
    ledger.raise_budget(MicroUsd(300));
    assert_eq!(ledger.remaining(), Some(MicroUsd(500)), "a late answer with a smaller total changes nothing");
}
