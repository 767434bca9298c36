//! `--discovery-namespace-selector`: a label selector, checked before the operator starts.

/// Checks a `--discovery-namespace-selector` value: a label selector such as `team=tools`,
/// `env in (prod,staging)`, `!legacy` or `agentgate.dev/discovery`.
pub fn parse_namespace_selector(selector: &str) -> Result<String, String> {
    let selector = selector.trim();
    if selector.is_empty() {
        return Err(
            "the selector is empty; leave the flag out to turn discovery off (`kubernetes.io/metadata.name` matches every namespace)"
                .into(),
        );
    }
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(format!("unbalanced ')' in {selector:?}"));
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced '(' in {selector:?}"));
    }
    terms.push(&selector[start..]);
    for term in terms.iter().map(|t| t.trim()) {
        check_term(term).map_err(|e| format!("{e} in selector {selector:?}"))?;
    }
    Ok(selector.to_string())
}

fn check_term(term: &str) -> Result<(), String> {
    if term.is_empty() {
        return Err("empty requirement".into());
    }
    if let Some(key) = term.strip_prefix('!') {
        return check_key(key.trim());
    }
    for op in ["!=", "==", "="] {
        if let Some((key, value)) = term.split_once(op) {
            check_key(key.trim())?;
            return check_value(value.trim());
        }
    }
    let words: Vec<&str> = term.splitn(2, char::is_whitespace).collect();
    if let [key, rest] = words.as_slice() {
        let rest = rest.trim_start();
        let (op, set) = if let Some(set) = rest.strip_prefix("notin") {
            ("notin", set)
        } else if let Some(set) = rest.strip_prefix("in") {
            ("in", set)
        } else {
            return Err(format!("{term:?} is neither key, !key, key=value, key!=value, key in (...) nor key notin (...)"));
        };
        check_key(key)?;
        let set = set.trim();
        let inner = set
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(|| format!("{op} needs a parenthesised list in {term:?}"))?;
        for value in inner.split(',') {
            check_value(value.trim())?;
        }
        return Ok(());
    }
    check_key(term)
}

fn check_name_part(s: &str, what: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(format!("{what} {s:?} is not a valid label {what}")) }
}

fn check_key(key: &str) -> Result<(), String> {
    match key.split_once('/') {
        Some((prefix, name)) => {
            let prefix_ok = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|part| {
                    let b = part.as_bytes();
                    !b.is_empty()
                        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                        && b[0] != b'-'
                        && b[b.len() - 1] != b'-'
                });
            if !prefix_ok {
                return Err(format!("key prefix {prefix:?} is not a DNS subdomain"));
            }
            check_name_part(name, "key")
        }
        None => check_name_part(key, "key"),
    }
}

fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() { Ok(()) } else { check_name_part(value, "value") }
}
