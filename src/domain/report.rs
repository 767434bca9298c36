//! What agents report when they exit: usage per model and output, read from the Pod's
//! termination message. Anything malformed is an error to record, never a number to guess.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::money::MicroUsd;
use super::pricing::{PriceTable, TokenCounts};
use crate::api::{ModelUsage, Usage};

/// Kubelet caps termination messages at 4 KiB; anything far bigger was not written by it.
const MAX_REPORT_BYTES: usize = 16 * 1024;
/// The kubelet's termination-message cap, which `usage` and `output` share.
pub const TERMINATION_MESSAGE_BYTES: usize = 4096;
/// What agents are told `output` may take (`AGENTGATE_OUTPUT_MAX_BYTES`): the rest of the 4 KiB is
/// for `usage` (a few models' entries take ~100 bytes each). An agent that writes `usage` first and
/// keeps `output` within this never loses its usage; one that overruns it loses its output (the
/// kubelet cuts the message) but its usage is still read (`salvage_usage`).
pub const OUTPUT_MAX_BYTES: usize = 3 * 1024;
const MAX_TOKENS_PER_ENTRY: i64 = 1_000_000_000_000;
const MAX_USAGE_ENTRIES: usize = 64;
const MAX_OUTPUT_DEPTH: usize = 32;

#[derive(Clone, Debug, PartialEq)]
pub struct AgentReport {
    pub usage: BTreeMap<String, TokenCounts>,
    pub output: Option<serde_json::Value>,
    /// The message was cut (the kubelet's 4 KiB cap) after a complete `usage`: the usage is read,
    /// the output is lost.
    pub output_truncated: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireReport {
    usage: Vec<WireUsage>,
    #[serde(default)]
    output: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireUsage {
    model: String,
    input_tokens: i64,
    #[serde(default)]
    cached_input_tokens: i64,
    output_tokens: i64,
    #[serde(default)]
    cache_write_input_tokens: i64,
    #[serde(default)]
    cache_write_1h_input_tokens: i64,
}

pub fn parse_report(message: &str) -> Result<AgentReport, String> {
    if message.trim().is_empty() {
        return Err("no termination message".into());
    }
    if message.len() > MAX_REPORT_BYTES {
        return Err(format!("termination message of {} bytes is larger than {MAX_REPORT_BYTES}", message.len()));
    }
    // serde's messages quote the offending value: keep them short, they go into status.
    let (wire, output_truncated) = match serde_json::from_str::<WireReport>(message.trim()) {
        Ok(wire) => (wire, false),
        Err(e) => match salvage_usage(message.trim()).filter(|_| e.is_eof()) {
            Some(usage) => (WireReport { usage, output: None }, true),
            None => return Err(super::validate::bounded(&format!("termination message is not a usage report: {e}"))),
        },
    };
    // The output is stored in the job's status; nested much deeper, the job could no longer be
    // decoded by clients (serde_json stops at 128 levels), the operator's own watch included.
    if let Some(output) = &wire.output
        && json_depth(output) > MAX_OUTPUT_DEPTH
    {
        return Err(format!("output nests deeper than {MAX_OUTPUT_DEPTH} levels"));
    }
    if wire.usage.len() > MAX_USAGE_ENTRIES {
        return Err(format!("usage has {} entries, at most {MAX_USAGE_ENTRIES} allowed", wire.usage.len()));
    }
    let mut usage: BTreeMap<String, TokenCounts> = BTreeMap::new();
    for (i, u) in wire.usage.iter().enumerate() {
        if u.model.is_empty() || u.model.len() > 128 {
            return Err(format!("usage[{i}].model must be 1 to 128 characters"));
        }
        // Kept in status (`attempts[].reportedUsage`), which heads read with `kubectl describe`
        // and dashboards show: no model is named with characters a terminal acts on or hides
        // (decide/tests.rs an_agents_claim_naming_a_model_with_hidden_characters_is_malformed_and_not_stored).
        if u.model.chars().any(super::terminal_text::is_hidden) {
            return Err(format!(
                "usage[{i}].model \"{}\" holds control, invisible or bidi characters",
                super::terminal_text::line(&u.model)
            ));
        }
        for (field, v) in [
            ("inputTokens", u.input_tokens),
            ("cachedInputTokens", u.cached_input_tokens),
            ("outputTokens", u.output_tokens),
            ("cacheWriteInputTokens", u.cache_write_input_tokens),
            ("cacheWrite1hInputTokens", u.cache_write_1h_input_tokens),
        ] {
            if !(0..=MAX_TOKENS_PER_ENTRY).contains(&v) {
                return Err(format!("usage[{i}].{field} = {v} is out of range"));
            }
        }
        let entry = usage.entry(u.model.clone()).or_default();
        *entry = entry.add(&TokenCounts {
            input: u.input_tokens,
            cached_input: u.cached_input_tokens,
            output: u.output_tokens,
            cache_write: u.cache_write_input_tokens,
            cache_write_1h: u.cache_write_1h_input_tokens,
        });
    }
    Ok(AgentReport { usage, output: wire.output, output_truncated })
}

/// A report cut short after its `usage`: `{"usage": [...complete...], "output": ...cut`. Only
/// this exact shape is read (usage first, then a comma); anything else is no report.
fn salvage_usage(message: &str) -> Option<Vec<WireUsage>> {
    let rest = message.strip_prefix('{')?.trim_start().strip_prefix("\"usage\"")?.trim_start().strip_prefix(':')?;
    let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Vec<WireUsage>>();
    let usage = stream.next()?.ok()?;
    let after = rest[stream.byte_offset()..].trim_start();
    (after.is_empty() || after.starts_with(',')).then_some(usage)
}

fn json_depth(value: &serde_json::Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            serde_json::Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            serde_json::Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    max
}

/// Usage of one or more reports priced with the table. Models without a price are listed in
/// the error alongside the usage, so tokens are kept even when cost can't be known.
pub fn price_usage(per_model: &BTreeMap<String, TokenCounts>, prices: &PriceTable) -> (Usage, Vec<String>) {
    let mut unpriced = Vec::new();
    let mut usage = Usage::default();
    let mut total_cost = MicroUsd(0);
    for (model, tokens) in per_model {
        let cost = match prices.get(model) {
            Some(price) => price.cost(tokens),
            None => {
                unpriced.push(model.clone());
                MicroUsd(0)
            }
        };
        total_cost = total_cost.saturating_add(cost);
        add_model_usage(&mut usage, model, tokens, cost);
    }
    usage.cost_usd = total_cost.to_string();
    (usage, unpriced)
}

/// Adds per-model token counts of `more` into `into`.
/// Adds one model's priced tokens to `usage`: its line in `models` and the totals. Shared by the
/// operator (agent reports) and the meter (measured at the wire), so both write the same shape.
pub fn add_model_usage(usage: &mut Usage, model: &str, tokens: &TokenCounts, cost: MicroUsd) {
    usage.input_tokens += tokens.input;
    usage.cached_input_tokens += tokens.cached_input;
    usage.output_tokens += tokens.output;
    usage.cache_write_input_tokens += tokens.cache_write;
    usage.cache_write_1h_input_tokens += tokens.cache_write_1h;
    usage.total_tokens = usage.input_tokens
        + usage.cached_input_tokens
        + usage.output_tokens
        + usage.cache_write_input_tokens
        + usage.cache_write_1h_input_tokens;
    usage.models.push(ModelUsage {
        model: model.to_string(),
        input_tokens: tokens.input,
        cached_input_tokens: tokens.cached_input,
        output_tokens: tokens.output,
        cache_write_input_tokens: tokens.cache_write,
        cache_write_1h_input_tokens: tokens.cache_write_1h,
        cost_usd: cost.to_string(),
    });
}

/// The name under which [`fold_models`] sums the models it does not list one by one. No model
/// has it: a provider's model id has no spaces or parentheses.
pub const OTHER_MODELS: &str = "(other models)";

/// Keeps at most `keep` (at least 1) entries in `usage.models`: the costliest (then by name),
/// and one [`OTHER_MODELS`] entry summing the tokens and cost of the rest. The totals do not
/// change: what a job's status can hold is bounded, its usage never lost
/// (tests/meter_grants.rs sessions_full_of_long_model_names_cannot_grow_the_jobs_status_past_what_etcd_takes).
pub fn fold_models(usage: &mut Usage, keep: usize) {
    let keep = keep.max(1);
    if usage.models.len() <= keep {
        return;
    }
    let cost = |m: &ModelUsage| MicroUsd::parse(&m.cost_usd).unwrap_or_default();
    let mut models = std::mem::take(&mut usage.models);
    // An entry folded before is folded again, whatever its cost.
    models
        .sort_by(|a, b| (a.model == OTHER_MODELS).cmp(&(b.model == OTHER_MODELS)).then(cost(b).cmp(&cost(a))).then(a.model.cmp(&b.model)));
    let rest = models.split_off(keep - 1);
    let mut other = ModelUsage { model: OTHER_MODELS.to_string(), ..ModelUsage::default() };
    let mut other_cost = MicroUsd(0);
    for m in &rest {
        other.input_tokens = other.input_tokens.saturating_add(m.input_tokens);
        other.cached_input_tokens = other.cached_input_tokens.saturating_add(m.cached_input_tokens);
        other.output_tokens = other.output_tokens.saturating_add(m.output_tokens);
        other.cache_write_input_tokens = other.cache_write_input_tokens.saturating_add(m.cache_write_input_tokens);
        other.cache_write_1h_input_tokens = other.cache_write_1h_input_tokens.saturating_add(m.cache_write_1h_input_tokens);
        other_cost = other_cost.saturating_add(cost(m));
    }
    other.cost_usd = other_cost.to_string();
    models.push(other);
    models.sort_by(|a, b| a.model.cmp(&b.model));
    usage.models = models;
}

pub fn accumulate(into: &mut BTreeMap<String, TokenCounts>, more: &BTreeMap<String, TokenCounts>) {
    for (model, tokens) in more {
        let entry = into.entry(model.clone()).or_default();
        *entry = entry.add(tokens);
    }
}

/// Per-model token counts back out of a recorded Usage (to sum attempts).
pub fn tokens_of(usage: &Usage) -> BTreeMap<String, TokenCounts> {
    usage.models.iter().map(|m| (m.model.clone(), model_tokens(m))).collect()
}

/// One model's token counts as recorded in a Usage.
pub fn model_tokens(m: &ModelUsage) -> TokenCounts {
    TokenCounts {
        input: m.input_tokens,
        cached_input: m.cached_input_tokens,
        output: m.output_tokens,
        cache_write: m.cache_write_input_tokens,
        cache_write_1h: m.cache_write_1h_input_tokens,
    }
}

/// (actual - estimate) / estimate, in percent, rounded.
pub fn estimate_error_percent(actual: i64, estimated_p50: i64) -> Option<i64> {
    (estimated_p50 > 0).then(|| (((actual - estimated_p50) as f64 / estimated_p50 as f64) * 100.0).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_keeps_the_costliest_models_and_sums_the_rest_exactly() {
        let mut usage = Usage::default();
        for (model, cost) in [("a", 5), ("b", 50), ("c", 1), ("d", 20), (OTHER_MODELS, 100)] {
            add_model_usage(
                &mut usage,
                model,
                &TokenCounts { input: cost, cached_input: 1, output: 2, ..Default::default() },
                MicroUsd(cost),
            );
        }
        let before = usage.clone();
        fold_models(&mut usage, 5);
        assert_eq!(usage, before, "within the bound: unchanged");
        fold_models(&mut usage, 3);
        let listed: Vec<(&str, i64, &str)> = usage.models.iter().map(|m| (m.model.as_str(), m.input_tokens, m.cost_usd.as_str())).collect();
        // b and d are the costliest; a, c and the entry folded before are summed.
        assert_eq!(listed, [(OTHER_MODELS, 106, "0.000106"), ("b", 50, "0.00005"), ("d", 20, "0.00002")]);
        assert_eq!((usage.input_tokens, usage.total_tokens), (before.input_tokens, before.total_tokens));
        let cached: i64 = usage.models.iter().map(|m| m.cached_input_tokens).sum();
        assert_eq!(cached, 5);
        fold_models(&mut usage, 0);
        assert_eq!(usage.models.len(), 1, "at least one entry, holding everything");
        assert_eq!((usage.models[0].input_tokens, usage.models[0].cost_usd.as_str()), (176, "0.000176"));
    }

    /// An Anthropic agent's report counts its cache writes apart and they are priced at their
    /// rates; a report, or a status, written before they existed reads them as 0.
    #[test]
    fn cache_writes_are_reported_priced_and_default_to_zero() {
        let report = r#"{"usage": [{"model": "claude-sonnet-4", "inputTokens": 1000, "cachedInputTokens": 0, "outputTokens": 0,
                                    "cacheWriteInputTokens": 100000, "cacheWrite1hInputTokens": 50000}]}"#;
        let r = parse_report(report).unwrap();
        let tokens = TokenCounts { input: 1000, cached_input: 0, output: 0, cache_write: 100_000, cache_write_1h: 50_000 };
        assert_eq!(r.usage["claude-sonnet-4"], tokens);
        let (usage, unpriced) = price_usage(&r.usage, &PriceTable::builtin());
        assert!(unpriced.is_empty());
        assert_eq!(usage.cost_usd, "0.678", "$0.003 input + $0.375 5-minute writes + $0.30 1-hour writes");
        assert_eq!((usage.cache_write_input_tokens, usage.cache_write_1h_input_tokens, usage.total_tokens), (100_000, 50_000, 151_000));
        assert_eq!(tokens_of(&usage)["claude-sonnet-4"], tokens, "read back from status as written");
        let negative = r#"{"usage": [{"model": "m", "inputTokens": 1, "outputTokens": 1, "cacheWrite1hInputTokens": -1}]}"#;
        assert!(parse_report(negative).unwrap_err().contains("usage[0].cacheWrite1hInputTokens = -1"));
        let typo = r#"{"usage": [{"model": "m", "inputTokens": 1, "outputTokens": 1, "cacheWriteTokens": 5}]}"#;
        assert!(parse_report(typo).unwrap_err().contains("unknown field `cacheWriteTokens`"));

        // A status of the previous version: no write counts. It loads, and a job with no writes
        // writes none back (its status is unchanged byte for byte).
        let old = serde_json::json!({"inputTokens": 5, "cachedInputTokens": 1, "outputTokens": 2, "totalTokens": 8, "costUSD": "0.01",
            "models": [{"model": "gpt-4o", "inputTokens": 5, "cachedInputTokens": 1, "outputTokens": 2, "costUSD": "0.01"}]});
        let read: Usage = serde_json::from_value(old.clone()).unwrap();
        assert_eq!((read.cache_write_input_tokens, read.models[0].cache_write_1h_input_tokens), (0, 0));
        assert_eq!(serde_json::to_value(&read).unwrap(), old);
    }

    #[test]
    fn parses_reports_and_rejects_garbage() {
        let ok = r#"{"usage": [{"model": "gpt-4o-mini", "inputTokens": 1200, "cachedInputTokens": 100, "outputTokens": 300},
                              {"model": "gpt-4o-mini", "inputTokens": 10, "outputTokens": 5}], "output": {"findings": 3}}"#;
        let r = parse_report(ok).unwrap();
        assert_eq!(r.usage["gpt-4o-mini"], TokenCounts { input: 1210, cached_input: 100, output: 305, ..Default::default() });
        assert_eq!(r.output, Some(serde_json::json!({"findings": 3})));

        let bad: &[(&str, &str)] = &[
            ("", "no termination message"),
            ("Traceback (most recent call last):", "not a usage report"),
            (r#"{"usage": [{"model": "x", "inputTokens": -5, "outputTokens": 1}]}"#, "usage[0].inputTokens = -5"),
            (r#"{"usage": [{"model": "", "inputTokens": 5, "outputTokens": 1}]}"#, "usage[0].model"),
            (
                r#"{"usage": [{"model": "gpt-4o\u001b[2J\u202e", "inputTokens": 5, "outputTokens": 1}]}"#,
                r#"usage[0].model "gpt-4o\u001B[2J\u202E" holds control, invisible or bidi characters"#,
            ),
            (r#"{"usage": "lots"}"#, "not a usage report"),
            (r#"{"output": {}}"#, "missing field `usage`"),
            (r#"{"usage": [], "extra": 1}"#, "unknown field `extra`"),
            (r#"{"usage": [{"model": "x", "inputTokens": 1e20, "outputTokens": 1}]}"#, "not a usage report"),
        ];
        for (message, want) in bad {
            let err = parse_report(message).unwrap_err();
            assert!(err.contains(want), "{message:?}: {err}");
        }
        assert!(parse_report(&"x".repeat(20_000)).unwrap_err().contains("larger than"));
        let long_model =
            format!(r#"{{"usage": [{{"model": 5, "inputTokens": 1, "outputTokens": 1}}], "output": "{}"}}"#, "y".repeat(15_000));
        assert!(parse_report(&long_model).unwrap_err().len() < 400);
        let quoted = format!(r#"{{"usage": [{{"model": "m", "inputTokens": "{}", "outputTokens": 1}}]}}"#, "9".repeat(15_000));
        assert!(parse_report(&quoted).unwrap_err().len() < 400);
        let deep = format!(r#"{{"usage": [], "output": {}1{}}}"#, "[".repeat(40), "]".repeat(40));
        assert!(parse_report(&deep).unwrap_err().contains("output nests deeper than 32 levels"));
    }

    #[test]
    fn a_report_cut_by_the_kubelet_keeps_its_usage_and_flags_the_output() {
        let full = format!(
            r#"{{"usage": [{{"model": "gpt-4o-mini", "inputTokens": 1200, "outputTokens": 300}}], "output": {{"text": "{}"}}}}"#,
            "z".repeat(5000)
        );
        // What the kubelet keeps of it.
        let cut = &full[..TERMINATION_MESSAGE_BYTES];
        let r = parse_report(cut).unwrap();
        assert_eq!(r.usage["gpt-4o-mini"], TokenCounts { input: 1200, cached_input: 0, output: 300, ..Default::default() });
        assert_eq!((r.output, r.output_truncated), (None, true));
        // Cut right after the usage.
        let r = parse_report(r#"{"usage": [{"model": "m", "inputTokens": 1, "outputTokens": 2}]"#).unwrap();
        assert!(r.output_truncated && r.usage["m"].output == 2);
        // A whole report is not flagged.
        assert!(!parse_report(r#"{"usage": [], "output": 1}"#).unwrap().output_truncated);
        // A report fitting the advertised output cap fits the kubelet's cap with room for usage.
        let fits = format!(
            r#"{{"usage": [{{"model": "gpt-4o-mini", "inputTokens": 1200, "cachedInputTokens": 0, "outputTokens": 300}}], "output": "{}"}}"#,
            "o".repeat(OUTPUT_MAX_BYTES - 2)
        );
        assert!(fits.len() <= TERMINATION_MESSAGE_BYTES, "{}", fits.len());
    }

    #[test]
    fn nothing_is_salvaged_from_a_cut_usage_or_output_first_or_a_report_that_is_not_cut() {
        let bad = [
            // The usage itself was cut: nothing is known.
            r#"{"usage": [{"model": "m", "inputTokens": 1, "outputTo"#,
            // Output first (the order the cap documentation warns of): the usage was lost.
            r#"{"output": "aaaa", "usage": [{"model": "m", "inpu"#,
            // Not cut but wrong: a bad usage entry is an error, not salvage.
            r#"{"usage": [{"model": "m", "inputTokens": 1, "outputTokens": 1, "x": 1}], "output": "#,
            // Complete but malformed after the usage: not a cut, so no salvage.
            r#"{"usage": [], "output": 1, "extra": 2}"#,
        ];
        for message in bad {
            assert!(parse_report(message).is_err(), "{message}");
        }
    }

    #[test]
    fn prices_usage_and_keeps_unpriced_tokens() {
        let per_model: BTreeMap<String, TokenCounts> = [
            ("gpt-4o-mini".to_string(), TokenCounts { input: 1_000_000, cached_input: 0, output: 0, ..Default::default() }),
            ("my-llm".to_string(), TokenCounts { input: 10, cached_input: 0, output: 10, ..Default::default() }),
        ]
        .into();
        let (usage, unpriced) = price_usage(&per_model, &PriceTable::builtin());
        assert_eq!(usage.total_tokens, 1_000_020);
        assert_eq!(usage.cost_usd, "0.15");
        assert_eq!(unpriced, vec!["my-llm".to_string()]);
    }

    #[test]
    fn estimate_error_is_relative_to_p50() {
        assert_eq!(estimate_error_percent(150, 100), Some(50));
        assert_eq!(estimate_error_percent(50, 100), Some(-50));
        assert_eq!(estimate_error_percent(5, 0), None);
    }
}
