//! Model price table: USD per million tokens, shipped as configuration admins can override.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::money::MicroUsd;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelPrice {
    pub input_per_million: f64,
    pub cached_input_per_million: f64,
    pub output_per_million: f64,
}

/// Token counts of one model, as reported by an agent or predicted by the estimator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub input: i64,
    pub cached_input: i64,
    pub output: i64,
}

impl TokenCounts {
    pub fn total(&self) -> i64 {
        self.input.saturating_add(self.cached_input).saturating_add(self.output)
    }

    pub fn add(&self, other: &TokenCounts) -> TokenCounts {
        TokenCounts {
            input: self.input.saturating_add(other.input),
            cached_input: self.cached_input.saturating_add(other.cached_input),
            output: self.output.saturating_add(other.output),
        }
    }
}

impl ModelPrice {
    pub fn cost(&self, tokens: &TokenCounts) -> MicroUsd {
        MicroUsd::from_usd(
            (tokens.input as f64 * self.input_per_million
                + tokens.cached_input as f64 * self.cached_input_per_million
                + tokens.output as f64 * self.output_per_million)
                / 1e6,
        )
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
        let table: &[(&str, f64, f64, f64)] = &[
            ("gpt-4o", 2.50, 1.25, 10.00),
            ("gpt-4o-mini", 0.15, 0.075, 0.60),
            ("gpt-4.1", 2.00, 0.50, 8.00),
            ("gpt-4.1-mini", 0.40, 0.10, 1.60),
            ("gpt-4.1-nano", 0.10, 0.025, 0.40),
            ("o3", 2.00, 0.50, 8.00),
            ("o4-mini", 1.10, 0.275, 4.40),
            ("claude-opus-4", 15.00, 1.50, 75.00),
            ("claude-sonnet-4", 3.00, 0.30, 15.00),
            ("claude-3-7-sonnet", 3.00, 0.30, 15.00),
            ("claude-3-5-haiku", 0.80, 0.08, 4.00),
            ("gemini-2.5-pro", 1.25, 0.31, 10.00),
            ("gemini-2.5-flash", 0.30, 0.075, 2.50),
            ("gemini-2.0-flash", 0.10, 0.025, 0.40),
        ];
        PriceTable {
            models: table
                .iter()
                .map(|&(id, input, cached, output)| {
                    let price = ModelPrice { input_per_million: input, cached_input_per_million: cached, output_per_million: output };
                    (id.to_string(), price)
                })
                .collect(),
        }
    }

    /// Reads a price table file; entries override the built-in prices, which stay available.
    pub fn with_overrides_from_yaml(yaml: &str) -> Result<PriceTable, String> {
        let overrides: PriceTable = serde_saphyr::from_str(yaml).map_err(|e| format!("price table: {e}"))?;
        for (model, price) in &overrides.models {
            let values = [price.input_per_million, price.cached_input_per_million, price.output_per_million];
            if values.iter().any(|v| !v.is_finite() || *v < 0.0 || *v > 1e6) {
                return Err(format!("price table: model {model:?} has a negative, non-finite or absurd price"));
            }
        }
        let mut table = PriceTable::builtin();
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
        let tokens = TokenCounts { input: 1_000_000, cached_input: 1_000_000, output: 1_000_000 };
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
        let bad =
            PriceTable::with_overrides_from_yaml("models:\n  x: {inputPerMillion: -1, cachedInputPerMillion: 0, outputPerMillion: 0}\n");
        assert!(bad.unwrap_err().contains("\"x\""));
    }
}
