//! Text a tenant wrote, made safe to show on someone else's terminal.
//!
//! A job's spec, a vote's reason, an annotation and a condition message are written by whoever
//! may create them, and `kubectl agentgate` prints them to a head deciding whether the job may
//! run. Printed raw, an escape sequence (`\x1b[2K`, `\x1b[1A`, an OSC 8 hyperlink), a carriage
//! return, a backspace, a bidi override (U+202E) or a zero-width character makes the terminal
//! show something other than what the text says, and a line break starts a line that looks like
//! the plugin's own (a forged table row, a forged key). Here every such character is escaped
//! visibly, so the terminal acts on none of it and each line printed is the plugin's.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::Value;

/// Whether a terminal acts on `c` or shows nothing for it: C0 and C1 controls and DEL (escape
/// sequences, `\r`, backspace), line and paragraph separators, bidi marks, embeddings, overrides
/// and isolates, zero-width and other invisible format characters, fillers, variation
/// selectors and tag characters.
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c as u32,
            0x00AD
                | 0x034F
                | 0x061C
                | 0x115F
                | 0x1160
                | 0x17B4
                | 0x17B5
                | 0x180B..=0x180F
                | 0x200B..=0x200F
                | 0x2028..=0x202E
                | 0x2060..=0x206F
                | 0x3164
                | 0xFE00..=0xFE0F
                | 0xFEFF
                | 0xFFA0
                | 0xFFF0..=0xFFFB
                | 0x1D173..=0x1D17A
                | 0xE0000..=0xE0FFF
        )
}

/// `c` as a YAML double-quoted escape (JSON's too, within the Basic Multilingual Plane).
fn push_escape(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\\' => out.push_str("\\\\"),
        '"' => out.push_str("\\\""),
        c if (c as u32) <= 0xFFFF => {
            let _ = write!(out, "\\u{:04X}", c as u32);
        }
        c => {
            let _ = write!(out, "\\U{:08X}", c as u32);
        }
    }
}

/// One line for a table cell or a message: hidden characters and line breaks escaped (`\n`,
/// `\u001B`, `\u202E`), and so backslashes (`\\`), so an escape shown is never one the author
/// typed. Other text, non-ASCII letters included, is shown as written.
pub fn line(text: &str) -> Cow<'_, str> {
    escaped(text, |c| c == '\\' || is_hidden(c))
}

/// A message the operator writes (a condition's, an Event's note) quoting what a tenant wrote:
/// hidden characters and line breaks escaped as in [`line`], backslashes left as they are (JSON
/// Schema errors quote values already JSON-escaped), so `kubectl describe`, `kubectl get -w` and
/// log readers show one line of what was written.
pub fn message(text: &str) -> Cow<'_, str> {
    escaped(text, is_hidden)
}

/// `text` with each character `escape` picks written as its escape; borrowed when none is.
fn escaped(text: &str, escape: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(&escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escape(c) { push_escape(&mut out, c) } else { out.push(c) }
    }
    Cow::Owned(out)
}

/// Text of several lines (an error the apiserver returned, quoting what a tenant wrote): hidden
/// characters but line breaks escaped, as in [`line`].
pub fn lines(text: &str) -> String {
    text.split('\n').map(line).collect::<Vec<_>>().join("\n")
}

/// `text` as a YAML double-quoted scalar of printable ASCII only: every other character is an
/// escape (`\u0430` for a Cyrillic `а` that looks like a Latin `a`), so what is shown is exactly
/// what runs, and parses back to it.
pub fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' || !(' '..='~').contains(&c) { push_escape(&mut out, c) } else { out.push(c) }
    }
    out.push('"');
    out
}

/// A mapping key: plain when it cannot be read as anything else, else [`quoted`].
fn key(text: &str) -> Cow<'_, str> {
    let plain = text.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !matches!(text.to_ascii_lowercase().as_str(), "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n");
    if plain { Cow::Borrowed(text) } else { Cow::Owned(quoted(text)) }
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::Null => Some("null".into()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(quoted(s)),
        Value::Array(a) if a.is_empty() => Some("[]".into()),
        Value::Object(o) if o.is_empty() => Some("{}".into()),
        _ => None,
    }
}

/// `value` as block YAML, each line indented by `indent` spaces, every string [`quoted`] on its
/// line: no line break, escape or look-alike a tenant writes reaches the terminal, and no line
/// of a value can pass for a key. Parses back to `value`.
pub fn yaml(value: &Value, indent: usize) -> String {
    let mut out = String::new();
    write_yaml(&mut out, value, indent);
    out
}

fn write_yaml(out: &mut String, value: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                match scalar(v) {
                    Some(s) => {
                        let _ = writeln!(out, "{pad}{}: {s}", key(k));
                    }
                    None => {
                        let _ = writeln!(out, "{pad}{}:", key(k));
                        write_yaml(out, v, indent + 2);
                    }
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                match scalar(item) {
                    Some(s) => {
                        let _ = writeln!(out, "{pad}- {s}");
                    }
                    None => {
                        // The item's first line carries the dash: `- name: x`.
                        let nested = yaml(item, indent + 2);
                        let _ = write!(out, "{pad}- {}", &nested[indent + 2..]);
                    }
                }
            }
        }
        other => {
            let _ = writeln!(out, "{pad}{}", scalar(other).unwrap_or_default());
        }
    }
}

/// A JSON document (serde_json's rendering) with every hidden character that is still raw in
/// it (serde_json leaves DEL, C1 controls and format characters as they are) written as a JSON
/// `\u` escape: the same document, safe on a terminal. Raw characters only occur inside
/// strings, where the escape means the same character.
pub fn json_escaped(json: &str) -> Cow<'_, str> {
    if !json.chars().any(is_hidden) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if is_hidden(c) && c != '\n' {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
#[path = "terminal_text_tests.rs"]
mod tests;
