//! What a provider bills a call above the model's list price (the only price the table holds),
//! and how the meter charges it: at the dearer price it knows, or for a value it does not know,
//! at the dearest it knows for that provider. Fail closed: what the meter counts is never less
//! than what the provider bills (tests/meter/test_meter.py
//! test_a_call_billed_above_the_list_price_is_charged_at_that_price).

use serde_json::Value;

use super::wire::Api;
use crate::domain::money::MicroUsd;
use crate::domain::pricing::{ModelPrice, PerMillion};

/// A price multiplier in thousandths: 1,000 is the list price.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Multiplier(pub i64);

impl Multiplier {
    pub const LIST: Multiplier = Multiplier(1_000);
    /// OpenAI's priority processing: twice the standard price on the GPT-5 family (1.7 times on
    /// GPT-4o), so twice bounds it.
    pub const OPENAI_PRIORITY: Multiplier = Multiplier(2_000);
    /// Anthropic's US-only inference (`inference_geo: us`), Opus 4.6 and newer.
    pub const ANTHROPIC_US_ONLY: Multiplier = Multiplier(1_100);
    /// Anthropic's fast mode (`speed: fast`), six times the price on Opus 4.6.
    pub const ANTHROPIC_FAST: Multiplier = Multiplier(6_000);

    /// The dearest the meter knows a provider to bill a call: what a value it does not know is
    /// charged at. OpenAI's `scale` tier (committed capacity) has no per-token price it knows.
    pub fn worst(api: Api) -> Multiplier {
        match api {
            Api::AnthropicMessages => Multiplier::ANTHROPIC_FAST.times(Multiplier::ANTHROPIC_US_ONLY),
            _ => Multiplier::OPENAI_PRIORITY,
        }
    }

    fn times(self, other: Multiplier) -> Multiplier {
        Multiplier(self.0.saturating_mul(other.0) / 1_000)
    }

    /// Every rate of `price` times this, rounded up to the micro-dollar per million.
    pub fn of(self, price: &ModelPrice) -> ModelPrice {
        if self == Multiplier::LIST {
            return *price;
        }
        let scale = |rate: PerMillion| {
            let scaled = (i128::from(rate.0.0) * i128::from(self.0) + 999) / 1_000;
            PerMillion(MicroUsd(i64::try_from(scaled).unwrap_or(i64::MAX)))
        };
        ModelPrice {
            input_per_million: scale(price.input_per_million),
            cached_input_per_million: scale(price.cached_input_per_million),
            output_per_million: scale(price.output_per_million),
            cache_write_per_million: Some(scale(price.cache_write_rate())),
            cache_write_1h_per_million: Some(scale(price.cache_write_1h_rate())),
        }
    }
}

/// What a response says it was billed at above the list price, and the multiplier the meter
/// charges it: a `service_tier` other than the standard one (OpenAI's top-level field, or in a
/// Responses API event its `response`'s; Anthropic's `usage.service_tier`), an Anthropic
/// `usage.inference_geo` other than `global` or `usage.speed` other than `standard`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Surcharge {
    /// The fields as the response gave them, for the Warning.
    pub billed_at: String,
    pub multiplier: Multiplier,
}

pub fn of_response(api: Api, service_tier: Option<&Value>, usage: Option<&Value>) -> Option<Surcharge> {
    let shown = |v: &Value| v.to_string().chars().take(64).collect::<String>();
    let mut found = Vec::new();
    let mut known = Multiplier::LIST;
    let mut unknown = false;
    // Each field: its value if set and not list-priced, and the multiplier it is known at.
    let mut check = |field: &str, value: Option<&Value>, list: &[&str], priced: &[(&str, Multiplier)]| {
        let Some(value) = value.filter(|v| !v.is_null() && !v.as_str().is_some_and(|s| list.contains(&s))) else { return };
        found.push(format!("{field}: {}", shown(value)));
        match priced.iter().find(|(name, _)| value.as_str() == Some(*name)) {
            Some((_, multiplier)) => known = known.times(*multiplier),
            None => unknown = true,
        }
    };
    match api {
        Api::AnthropicMessages => {
            let usage = usage?;
            // Priority Tier draws on capacity the organisation committed to, at the list prices'
            // relative rates (the service-tiers page): flagged, charged at the list price.
            check("service_tier", usage.get("service_tier"), &["standard", "batch"], &[("priority", Multiplier::LIST)]);
            check("inference_geo", usage.get("inference_geo"), &["global"], &[("us", Multiplier::ANTHROPIC_US_ONLY)]);
            check("speed", usage.get("speed"), &["standard"], &[("fast", Multiplier::ANTHROPIC_FAST)]);
        }
        Api::ChatCompletions | Api::Responses => {
            check("service_tier", service_tier, &["default", "flex"], &[("priority", Multiplier::OPENAI_PRIORITY)]);
        }
        Api::Embeddings => {}
    }
    let multiplier = if unknown { Multiplier::worst(api) } else { known };
    (!found.is_empty()).then(|| Surcharge { billed_at: found.join(", "), multiplier })
}

/// The multiplier a call is reserved at: the dearest its response can report where the request
/// cannot pin the price. An Anthropic call that names no `inference_geo` runs at its workspace's
/// default geo, which may be US-only (1.1 times): the meter cannot see that default, nor pin
/// `global` (models before Opus 4.6 refuse the field, and it would override the workspace's
/// data-residency choice). OpenAI calls are pinned (`wire::rewrite`: `service_tier: default`).
pub fn reserved_at(api: Api, request: &Value) -> Multiplier {
    match api {
        Api::AnthropicMessages if request.get("inference_geo").and_then(Value::as_str) != Some("global") => Multiplier::ANTHROPIC_US_ONLY,
        _ => Multiplier::LIST,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// tests/meter/test_meter.py test_a_call_billed_above_the_list_price_is_charged_at_that_price.
    #[test]
    fn responses_billed_above_the_list_price_are_recognised_and_priced_in_every_format() {
        let anthropic = |usage: Value| of_response(Api::AnthropicMessages, None, Some(&usage));
        let s = anthropic(json!({"service_tier": "priority", "inference_geo": "us"})).unwrap();
        assert_eq!(s.billed_at, r#"service_tier: "priority", inference_geo: "us""#);
        assert_eq!(s.multiplier, Multiplier(1_100));
        assert_eq!(anthropic(json!({"speed": "fast", "inference_geo": "us"})).unwrap().multiplier, Multiplier(6_600));
        // Unknown values: the dearest the meter knows for the provider.
        assert_eq!(anthropic(json!({"inference_geo": "eu"})).unwrap().multiplier, Multiplier(6_600));
        assert_eq!(anthropic(json!({"service_tier": "turbo"})).unwrap().multiplier, Multiplier(6_600));
        for listed in [
            json!({"service_tier": "standard", "inference_geo": "global", "speed": "standard"}),
            json!({"service_tier": null}),
            json!({}),
            json!("junk"),
        ] {
            assert_eq!(anthropic(listed.clone()), None, "{listed}");
        }
        for api in [Api::ChatCompletions, Api::Responses] {
            let s = of_response(api, Some(&json!("priority")), None).unwrap();
            assert_eq!((s.billed_at.as_str(), s.multiplier), (r#"service_tier: "priority""#, Multiplier(2_000)));
            assert_eq!(of_response(api, Some(&json!("scale")), None).unwrap().multiplier, Multiplier(2_000));
            for listed in [Some(json!("default")), Some(json!("flex")), Some(json!(null)), None] {
                assert_eq!(of_response(api, listed.as_ref(), None), None, "{listed:?}");
            }
        }
    }

    #[test]
    fn a_multiplier_scales_every_rate_rounding_up() {
        let price = ModelPrice {
            input_per_million: PerMillion(MicroUsd(3_000_000)),
            cached_input_per_million: PerMillion(MicroUsd(300_001)),
            output_per_million: PerMillion(MicroUsd(15_000_000)),
            cache_write_per_million: None,
            cache_write_1h_per_million: None,
        };
        let us = Multiplier::ANTHROPIC_US_ONLY.of(&price);
        assert_eq!(us.input_per_million, PerMillion(MicroUsd(3_300_000)));
        assert_eq!(us.cached_input_per_million, PerMillion(MicroUsd(330_002)), "rounded up");
        assert_eq!(us.output_per_million, PerMillion(MicroUsd(16_500_000)));
        assert_eq!(us.cache_write_rate(), PerMillion(MicroUsd(3_300_000)));
        assert_eq!(us.cache_write_1h_rate(), PerMillion(MicroUsd(6_600_000)));
        assert_eq!(Multiplier::LIST.of(&price), price);
    }

    #[test]
    fn an_anthropic_call_is_reserved_at_us_only_unless_it_pins_global() {
        assert_eq!(reserved_at(Api::AnthropicMessages, &json!({"model": "m"})), Multiplier(1_100));
        assert_eq!(reserved_at(Api::AnthropicMessages, &json!({"inference_geo": "global"})), Multiplier::LIST);
        assert_eq!(reserved_at(Api::ChatCompletions, &json!({"model": "m"})), Multiplier::LIST);
    }
}
