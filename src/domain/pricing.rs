//! Model price table: USD per million tokens, shipped as configuration admins can override.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::money::MicroUsd;

/// A price in micro-dollars per million tokens, so that `tokens × rate` is integer arithmetic
/// and a cost never drifts: `$2.50` per million is `2_500_000`.
///
/// In YAML it is written as a decimal number of dollars (`2.50`) or the same as a string
/// (`"2.50"`); up to six decimals are kept exactly. A float is read back through its shortest
/// decimal form, which is the text the admin wrote, so `0.15` becomes exactly `150_000`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PerMillion(pub MicroUsd);

impl PerMillion {
    /// Cost of `tokens` at this rate, rounded half up to the micro-dollar.
    pub fn of(self, tokens: i64) -> MicroUsd {
        let micro = (i128::from(tokens.max(0)) * i128::from(self.0.0) + 500_000) / 1_000_000;
        MicroUsd(i64::try_from(micro).unwrap_or(i64::MAX))
    }

    fn parse(text: &str) -> Result<PerMillion, String> {
        MicroUsd::parse(text.trim()).filter(|m| m.0 <= MAX_RATE.0).map(PerMillion).ok_or_else(|| {
            format!("{text:?} is not a price: write USD per million tokens as a decimal between 0 and 1000000 with at most 6 decimals")
        })
    }
}

/// No model costs a million dollars per million tokens: a larger figure is a typo.
const MAX_RATE: MicroUsd = MicroUsd(1_000_000_000_000);

impl Serialize for PerMillion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for PerMillion {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PerMillion;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("USD per million tokens, e.g. 2.50")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PerMillion, E> {
                PerMillion::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PerMillion, E> {
                PerMillion::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PerMillion, E> {
                PerMillion::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<PerMillion, E> {
                // `{}` prints the shortest decimal that reads back as `v`, i.e. what was written.
                PerMillion::parse(&format!("{v}")).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A model's prices. The cache-write prices are optional (a table written before they existed
/// still loads): Anthropic bills a prompt-cache write above fresh input, 1.25 times the input
/// price for the default 5-minute TTL and twice it for the 1-hour TTL, while OpenAI and Gemini
/// report no writes at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelPrice {
    pub input_per_million: PerMillion,
    pub cached_input_per_million: PerMillion,
    pub output_per_million: PerMillion,
    /// 5-minute cache writes; absent: the input price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_per_million: Option<PerMillion>,
    /// 1-hour cache writes; absent: twice the input price, Anthropic's rule for every model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h_per_million: Option<PerMillion>,
}

/// The dearest prompt-cache write a call can be billed for (known from its request), so that
/// the meter reserves its input at that rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheWrites {
    #[default]
    None,
    FiveMinutes,
    OneHour,
}

/// Token counts of one model, as reported by an agent or predicted by the estimator. The four
/// input counts are disjoint, each priced at its own rate: fresh input, cache reads, and cache
/// writes of either TTL (Anthropic's `cache_creation`, OpenAI's `cache_write_tokens` since GPT-5.6:
/// 30 minutes as the short one, 12 hours as the long one; always 0 for Gemini).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub input: i64,
    pub cached_input: i64,
    pub output: i64,
    pub cache_write: i64,
    pub cache_write_1h: i64,
}

impl TokenCounts {
    pub fn total(&self) -> i64 {
        self.input
            .saturating_add(self.cached_input)
            .saturating_add(self.output)
            .saturating_add(self.cache_write)
            .saturating_add(self.cache_write_1h)
    }

    pub fn add(&self, other: &TokenCounts) -> TokenCounts {
        TokenCounts {
            input: self.input.saturating_add(other.input),
            cached_input: self.cached_input.saturating_add(other.cached_input),
            output: self.output.saturating_add(other.output),
            cache_write: self.cache_write.saturating_add(other.cache_write),
            cache_write_1h: self.cache_write_1h.saturating_add(other.cache_write_1h),
        }
    }
}

impl ModelPrice {
    /// Exact: each part is rounded to the micro-dollar on its own, then summed.
    pub fn cost(&self, tokens: &TokenCounts) -> MicroUsd {
        [
            self.input_per_million.of(tokens.input),
            self.cached_input_per_million.of(tokens.cached_input),
            self.output_per_million.of(tokens.output),
            self.cache_write_rate().of(tokens.cache_write),
            self.cache_write_1h_rate().of(tokens.cache_write_1h),
        ]
        .into_iter()
        .sum()
    }

    /// The rate that bounds every input token of a call that may write `writes`: the dearest of
    /// fresh input, cache reads (a table may price them above input) and those writes, since
    /// the split is only known afterwards.
    pub fn input_bound_rate(&self, writes: CacheWrites) -> PerMillion {
        let rate = self.input_per_million.max(self.cached_input_per_million);
        match writes {
            CacheWrites::None => rate,
            CacheWrites::FiveMinutes => rate.max(self.cache_write_rate()),
            CacheWrites::OneHour => rate.max(self.cache_write_rate()).max(self.cache_write_1h_rate()),
        }
    }

    /// What a 5-minute cache write costs: the table's price, else the input price (a model
    /// whose provider reports no writes, or a table written before the field existed).
    pub fn cache_write_rate(&self) -> PerMillion {
        self.cache_write_per_million.unwrap_or(self.input_per_million)
    }

    /// What a 1-hour cache write costs: the table's price, else twice the input price.
    pub fn cache_write_1h_rate(&self) -> PerMillion {
        self.cache_write_1h_per_million.unwrap_or(PerMillion(MicroUsd(self.input_per_million.0.0.saturating_mul(2))))
    }
}

/// The file format (a ConfigMap key in the chart): `models: {<id>: {inputPerMillion, ...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PriceTable {
    pub models: BTreeMap<String, ModelPrice>,
}

impl PriceTable {
    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        self.models.get(model)
    }

    /// Public list prices (USD per 1M tokens) of common hosted models, as published by their
    /// vendors; self-hosted models are added through the configuration file.
    pub fn builtin() -> PriceTable {
        // Anthropic's models also carry their cache-write prices (5-minute, 1-hour), from the
        // "Model pricing" table of platform.claude.com/docs/en/about-claude/pricing.
        let anthropic: &[(&str, &str, &str)] = &[
            ("claude-opus-4", "18.75", "30.00"),
            ("claude-sonnet-4", "3.75", "6.00"),
            ("claude-3-7-sonnet", "3.75", "6.00"),
            ("claude-3-5-haiku", "1.00", "1.60"),
        ];
        let table: &[(&str, &str, &str, &str)] = &[
            ("gpt-4o", "2.50", "1.25", "10.00"),
            ("gpt-4o-mini", "0.15", "0.075", "0.60"),
            ("gpt-4.1", "2.00", "0.50", "8.00"),
            ("gpt-4.1-mini", "0.40", "0.10", "1.60"),
            ("gpt-4.1-nano", "0.10", "0.025", "0.40"),
            ("o3", "2.00", "0.50", "8.00"),
            ("o4-mini", "1.10", "0.275", "4.40"),
            ("claude-opus-4", "15.00", "1.50", "75.00"),
            ("claude-sonnet-4", "3.00", "0.30", "15.00"),
            ("claude-3-7-sonnet", "3.00", "0.30", "15.00"),
            ("claude-3-5-haiku", "0.80", "0.08", "4.00"),
            ("gemini-2.5-pro", "1.25", "0.31", "10.00"),
            ("gemini-2.5-flash", "0.30", "0.075", "2.50"),
            ("gemini-2.0-flash", "0.10", "0.025", "0.40"),
        ];
        PriceTable {
            models: table
                .iter()
                .map(|&(id, input, cached, output)| {
                    let rate = |text: &str| PerMillion::parse(text).expect("the built-in prices are valid decimals");
                    let writes = anthropic.iter().find(|a| a.0 == id);
                    let price = ModelPrice {
                        input_per_million: rate(input),
                        cached_input_per_million: rate(cached),
                        output_per_million: rate(output),
                        cache_write_per_million: writes.map(|w| rate(w.1)),
                        cache_write_1h_per_million: writes.map(|w| rate(w.2)),
                    };
                    (id.to_string(), price)
                })
                .collect(),
        }
    }

    /// Reads a price table file; entries override the built-in prices, which stay available.
    pub fn with_overrides_from_yaml(yaml: &str) -> Result<PriceTable, String> {
        PriceTable::builtin().overridden_by_yaml(yaml)
    }

    /// This table with the entries of a YAML price table added or replaced.
    pub fn overridden_by_yaml(&self, yaml: &str) -> Result<PriceTable, String> {
        let overrides: PriceTable = serde_saphyr::from_str(yaml).map_err(|e| format!("price table: {e}"))?;
        let mut table = self.clone();
        table.models.extend(overrides.models);
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_has_the_common_models() {
        let table = PriceTable::builtin();
        for id in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "claude-sonnet-4",
            "claude-opus-4",
            "claude-3-5-haiku",
            "gemini-2.5-pro",
            "gemini-2.5-flash",
        ] {
            assert!(table.get(id).is_some(), "{id} missing");
        }
    }

    #[test]
    fn cost_uses_all_three_prices() {
        let price = PriceTable::builtin().get("gpt-4o-mini").copied().unwrap();
        let tokens = TokenCounts { input: 1_000_000, cached_input: 1_000_000, output: 1_000_000, ..Default::default() };
        assert_eq!(price.cost(&tokens), MicroUsd(825_000));
    }

    #[test]
    fn overrides_add_self_hosted_models_and_reject_bad_prices() {
        let table = PriceTable::with_overrides_from_yaml(
            "models:\n  llama-3-70b-local: {inputPerMillion: 0.05, cachedInputPerMillion: 0.0, outputPerMillion: 0.1}\n",
        )
        .unwrap();
        assert!(table.get("llama-3-70b-local").is_some());
        assert!(table.get("gpt-4o").is_some());
        for (bad, why) in [
            ("-1", "negative"),
            ("1e9", "absurd"),
            ("NaN", "not a number"),
            (".inf", "infinite"),
            ("0.0000001", "below a micro-dollar"),
            ("\"2,50\"", "comma"),
        ] {
            let yaml = format!("models:\n  x: {{inputPerMillion: {bad}, cachedInputPerMillion: 0, outputPerMillion: 0}}\n");
            let err = PriceTable::with_overrides_from_yaml(&yaml).unwrap_err();
            assert!(err.contains("line 2"), "{why}: the error points at the price: {err}");
        }
        let typo =
            PriceTable::with_overrides_from_yaml("models:\n  x: {inputPerMilion: 1, cachedInputPerMillion: 0, outputPerMillion: 0}\n");
        assert!(typo.unwrap_err().contains("inputPerMilion"), "a misspelt field is named, not ignored");
    }

    /// Anthropic bills a 5-minute cache write at 1.25 times the input price and a 1-hour one at
    /// twice it (the bug: both were priced as input).
    #[test]
    fn cache_writes_are_priced_above_input_by_ttl() {
        let sonnet = PriceTable::builtin().get("claude-sonnet-4").copied().unwrap();
        assert_eq!(
            (sonnet.cache_write_rate(), sonnet.cache_write_1h_rate()),
            (PerMillion(MicroUsd(3_750_000)), PerMillion(MicroUsd(6_000_000)))
        );
        for id in ["claude-opus-4", "claude-sonnet-4", "claude-3-7-sonnet", "claude-3-5-haiku"] {
            let p = PriceTable::builtin().get(id).copied().unwrap();
            assert_eq!(p.cache_write_rate().0.0 * 4, p.input_per_million.0.0 * 5, "{id}: 1.25 times input");
            assert_eq!(p.cache_write_1h_rate().0.0, p.input_per_million.0.0 * 2, "{id}: twice input");
        }
        let million = |f: fn(&mut TokenCounts)| {
            let mut t = TokenCounts::default();
            f(&mut t);
            sonnet.cost(&t)
        };
        assert_eq!(million(|t| t.input = 1_000_000), MicroUsd(3_000_000));
        assert_eq!(million(|t| t.cache_write = 1_000_000), MicroUsd(3_750_000));
        assert_eq!(million(|t| t.cache_write_1h = 1_000_000), MicroUsd(6_000_000));
        // A call that writes 100,000 tokens for 5 minutes, 20,000 for an hour, reads 50,000.
        let call = TokenCounts { input: 1_000, cached_input: 50_000, output: 2_000, cache_write: 100_000, cache_write_1h: 20_000 };
        assert_eq!(sonnet.cost(&call), MicroUsd(3_000 + 15_000 + 30_000 + 375_000 + 120_000));
        assert_eq!(call.total(), 173_000, "writes are tokens of the total");

        // Models without write prices (OpenAI, Gemini, a table written before): 5-minute writes
        // at the input price, 1-hour ones at twice it; their own calls report no writes at all.
        let mini = PriceTable::builtin().get("gpt-4o-mini").copied().unwrap();
        assert_eq!((mini.cache_write_per_million, mini.cache_write_1h_per_million), (None, None));
        assert_eq!((mini.cache_write_rate(), mini.cache_write_1h_rate()), (mini.input_per_million, PerMillion(MicroUsd(300_000))));
        let plain = TokenCounts { input: 1_000_000, cached_input: 1_000_000, output: 1_000_000, ..Default::default() };
        assert_eq!(mini.cost(&plain), MicroUsd(825_000), "unchanged without writes");
    }

    #[test]
    fn input_is_reserved_at_the_dearest_rate_the_call_can_bill() {
        let sonnet = PriceTable::builtin().get("claude-sonnet-4").copied().unwrap();
        assert_eq!(sonnet.input_bound_rate(CacheWrites::None), PerMillion(MicroUsd(3_000_000)));
        assert_eq!(sonnet.input_bound_rate(CacheWrites::FiveMinutes), PerMillion(MicroUsd(3_750_000)));
        assert_eq!(sonnet.input_bound_rate(CacheWrites::OneHour), PerMillion(MicroUsd(6_000_000)));
        // A table may price a write below a read (nothing forbids it): the dearest still binds.
        let odd = ModelPrice { cache_write_per_million: Some(PerMillion(MicroUsd(1))), ..sonnet };
        assert_eq!(odd.input_bound_rate(CacheWrites::FiveMinutes), PerMillion(MicroUsd(3_000_000)));
    }

    #[test]
    fn the_table_file_takes_cache_write_prices_and_still_reads_old_tables() {
        let table = PriceTable::with_overrides_from_yaml(
            "models:\n  local-claude: {inputPerMillion: 2, cachedInputPerMillion: 0.2, outputPerMillion: 10, cacheWritePerMillion: 2.5, cacheWrite1hPerMillion: \"4\"}\n  old: {inputPerMillion: 1, cachedInputPerMillion: 0.1, outputPerMillion: 2}\n",
        )
        .unwrap();
        let local = table.get("local-claude").unwrap();
        assert_eq!(
            (local.cache_write_rate(), local.cache_write_1h_rate()),
            (PerMillion(MicroUsd(2_500_000)), PerMillion(MicroUsd(4_000_000)))
        );
        let old = table.get("old").unwrap();
        assert_eq!((old.cache_write_per_million, old.cache_write_1h_per_million), (None, None), "a table without them still loads");
        for typo in ["cacheWritesPerMillion", "cacheWrite1HPerMillion", "cacheWrite5mPerMillion"] {
            let yaml = format!("models:\n  x: {{inputPerMillion: 1, cachedInputPerMillion: 0, outputPerMillion: 0, {typo}: 2}}\n");
            let err = PriceTable::with_overrides_from_yaml(&yaml).unwrap_err();
            assert!(err.contains(typo), "a misspelt field is named, not ignored: {err}");
        }
        let bad = "models:\n  x: {inputPerMillion: 1, cachedInputPerMillion: 0, outputPerMillion: 0, cacheWritePerMillion: -1}\n";
        assert!(PriceTable::with_overrides_from_yaml(bad).unwrap_err().contains("line 2"));
        // Serialized and read back, an absent price stays absent.
        let yaml = serde_saphyr::to_string(&table).unwrap();
        assert_eq!(PriceTable::with_overrides_from_yaml(&yaml).unwrap().get("old"), Some(old));
    }

    #[test]
    fn prices_read_exactly_whatever_way_they_are_written() {
        let table = PriceTable::with_overrides_from_yaml(
            "models:\n  a: {inputPerMillion: 0.15, cachedInputPerMillion: \"0.075\", outputPerMillion: 3}\n",
        )
        .unwrap();
        let a = table.get("a").unwrap();
        assert_eq!(a.input_per_million, PerMillion(MicroUsd(150_000)));
        assert_eq!(a.cached_input_per_million, PerMillion(MicroUsd(75_000)));
        assert_eq!(a.output_per_million, PerMillion(MicroUsd(3_000_000)));
    }

    #[test]
    fn cost_is_integer_arithmetic_without_drift() {
        let rate = PerMillion(MicroUsd(150_000)); // $0.15 per million = 0.15 micro-dollars per token
        assert_eq!(rate.of(1), MicroUsd(0), "0.15 rounds down");
        assert_eq!(rate.of(4), MicroUsd(1), "0.6 rounds up");
        assert_eq!(rate.of(10), MicroUsd(2), "1.5 rounds half up");
        assert_eq!(rate.of(1_000_000), MicroUsd(150_000));
        assert_eq!(rate.of(-5), MicroUsd(0), "negative counts cost nothing");
        assert_eq!(PerMillion(MAX_RATE).of(i64::MAX), MicroUsd(i64::MAX), "saturates instead of wrapping");
        // A million one-token costs sum to exactly the cost of a million tokens at a round rate.
        let dollar = PerMillion(MicroUsd(1_000_000));
        let summed: MicroUsd = (0..1_000_000).map(|_| dollar.of(1)).sum();
        assert_eq!(summed, dollar.of(1_000_000));
        // 0.1 + 0.2 style: three parts priced separately add up exactly.
        let price = PriceTable::builtin().get("gpt-4.1").copied().unwrap();
        let tokens = TokenCounts { input: 100_000, cached_input: 200_000, output: 300_000, ..Default::default() };
        assert_eq!(price.cost(&tokens), MicroUsd(200_000 + 100_000 + 2_400_000));
    }
}
