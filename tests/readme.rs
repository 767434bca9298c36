//! The README is the contract with users, read against the code: every test, file, flag,
//! environment variable, chart value, make target, metric, printer column and internal link it
//! names must exist, and every metric the operator registers must be in its Metrics table. Pure:
//! it reads files and runs the two binaries' `--help`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The README with its fenced code blocks blanked (lines kept), so that inline code spans pair up.
fn prose(readme: &str) -> String {
    let mut fenced = false;
    let mut out = String::with_capacity(readme.len());
    for line in readme.split_inclusive('\n') {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            out.push('\n');
        } else if fenced {
            out.push('\n');
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Inline code spans of `text`, with the byte offset of each span's opening backtick.
fn code_spans(text: &str) -> Vec<(usize, &str)> {
    let mut spans = Vec::new();
    let mut open = None;
    for (i, c) in text.char_indices() {
        if c == '`' {
            match open.take() {
                None => open = Some(i),
                Some(start) => spans.push((start, &text[start + 1..i])),
            }
        }
    }
    spans
}

fn files_under(dir: &Path, extensions: &[&str], out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, extensions, out);
        } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| extensions.contains(&e)) {
            out.push(path);
        }
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Names defined by `keyword NAME` (e.g. `fn`, `struct`, `def`) in `text`.
fn defined_names<'a>(text: &'a str, keywords: &[&str]) -> BTreeSet<&'a str> {
    let mut names = BTreeSet::new();
    for keyword in keywords {
        let pattern = format!("{keyword} ");
        for (i, _) in text.match_indices(&pattern) {
            if i > 0 && is_ident_char(text[..i].chars().next_back().unwrap()) {
                continue;
            }
            let rest = &text[i + pattern.len()..];
            let end = rest.find(|c: char| !is_ident_char(c)).unwrap_or(rest.len());
            if end > 0 {
                names.insert(&rest[..end]);
            }
        }
    }
    names
}

/// Whether `word` occurs in `text` delimited, not as part of a longer identifier.
fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_ident_char) && !after.is_some_and(is_ident_char)
    })
}

/// A test name as the README cites them: snake_case of four words or more.
fn looks_like_test_name(span: &str) -> bool {
    span.split('_').count() >= 4
        && span.split('_').all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
        && span.starts_with(|c: char| c.is_ascii_lowercase())
        && !span.starts_with("agentgate_")
}

/// The `tests/….rs` (or `src/….rs`) path cited right before a span, as in "tests/x.rs `name`".
fn cited_file(readme: &str, span_start: usize) -> Option<&str> {
    let before = readme[..span_start].trim_end_matches(|c: char| c.is_whitespace() || c == '`' || c == ',');
    if !before.ends_with(".rs") {
        return None;
    }
    let path = before.rsplit(|c: char| c.is_whitespace() || c == '(' || c == '`').next()?;
    (path.starts_with("tests/") || path.starts_with("src/")).then_some(path)
}

#[test]
fn every_test_and_code_item_the_readme_cites_exists() {
    let readme = prose(&read("README.md"));
    let mut rust = Vec::new();
    files_under(&root().join("src"), &["rs"], &mut rust);
    files_under(&root().join("tests"), &["rs"], &mut rust);
    let mut python = Vec::new();
    files_under(&root().join("tests"), &["py"], &mut python);
    let texts: BTreeMap<String, String> = rust
        .iter()
        .chain(&python)
        .map(|p| (p.strip_prefix(root()).unwrap().display().to_string(), fs::read_to_string(p).unwrap()))
        .collect();
    let items = ["fn", "struct", "enum", "type", "const", "trait", "mod", "def"];
    let defined: BTreeSet<&str> = texts.values().flat_map(|t| defined_names(t, &items)).collect();
    let build_scripts = read("Makefile") + &read(".ci/run");
    let literals: String = texts.iter().filter(|(p, _)| p.starts_with("src/")).map(|(_, t)| t.as_str()).collect();

    let mut checked = 0;
    let mut missing = Vec::new();
    for (start, span) in code_spans(&readme) {
        if looks_like_test_name(span) {
            checked += 1;
            // A refusal reason or label value (`not_bound_to_a_pod`) is a string the code emits.
            if !defined.contains(span) && !literals.contains(&format!("\"{span}\"")) {
                missing.push(format!("`{span}`: no fn, def or string literal of that name in src/ or tests/"));
            }
            if let Some(file) = cited_file(&readme, start) {
                let text = texts.get(file).map(String::as_str).unwrap_or_default();
                if !defined_names(text, &["fn", "def"]).contains(span) {
                    missing.push(format!("`{span}` is cited as a test of {file}, which has no fn {span}"));
                }
            }
        } else if let Some(variable) = span.split('=').next().filter(|v| v.starts_with("AGENTGATE_"))
            && variable.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            checked += 1;
            if !texts.values().chain([&build_scripts]).any(|t| contains_word(t, variable)) {
                missing.push(format!("`{variable}`: no code reads or sets it"));
            }
        } else if span.contains("::") && span.split("::").all(|s| !s.is_empty() && s.chars().all(is_ident_char)) {
            checked += 1;
            let item = span.rsplit("::").next().unwrap();
            if !defined.contains(item) {
                missing.push(format!("`{span}`: nothing named {item} is defined in src/ or tests/"));
            }
        }
    }
    assert!(checked >= 30, "found only {checked} cited tests and items: is the README's citation style still `name`?");
    assert!(missing.is_empty(), "the README cites what the code does not have:\n{}", missing.join("\n"));
}

#[test]
fn every_repository_path_the_readme_names_exists() {
    let readme = read("README.md");
    let mut checked = 0;
    let mut missing = Vec::new();
    for token in readme.split(|c: char| !(c.is_ascii_alphanumeric() || "_./-*<>".contains(c))) {
        let token = token.trim_end_matches(['.', '-']);
        let prefixes = ["src/", "tests/", "deploy/", "charts/", "crds/", ".ci/"];
        if !prefixes.iter().any(|p| token.starts_with(p)) || token.contains(['*', '<', '>']) {
            continue;
        }
        checked += 1;
        if !root().join(token).exists() {
            missing.push(token.to_string());
        }
    }
    assert!(checked >= 50, "found only {checked} paths in the README");
    assert!(missing.is_empty(), "the README names paths that do not exist: {missing:?}");
}

/// Every long flag in `--help` of `binary` and of each of its subcommands, recursively.
fn help_flags(binary: &str, args: &mut Vec<String>, flags: &mut BTreeSet<String>) {
    let out = Command::new(binary).args(args.iter()).arg("--help").output().expect("running --help");
    assert!(out.status.success(), "{binary} {args:?} --help: {}", String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8(out.stdout).unwrap();
    flags.extend(flag_tokens(&help));
    let Some(commands) = help.split("\nCommands:\n").nth(1) else { return };
    let subcommands: Vec<String> = commands
        .lines()
        .take_while(|l| l.starts_with("  "))
        // A command's own line; a wrapped description continues further in.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect();
    for sub in subcommands {
        args.push(sub);
        help_flags(binary, args, flags);
        args.pop();
    }
}

/// `--long-flag` tokens of `text`.
fn flag_tokens(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for (i, _) in text.match_indices("--") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-') {
            continue;
        }
        let rest = &text[i + 2..];
        let end = rest.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')).unwrap_or(rest.len());
        if rest.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{}", rest[..end].trim_end_matches('-')));
        }
    }
    flags
}

#[test]
fn every_flag_the_readme_shows_is_one_the_binaries_take() {
    let mut known = BTreeSet::new();
    help_flags(env!("CARGO_BIN_EXE_agentgate"), &mut Vec::new(), &mut known);
    help_flags(env!("CARGO_BIN_EXE_kubectl-agentgate"), &mut Vec::new(), &mut known);
    assert!(known.contains("--approval-floor") && known.contains("--budget-usd") && known.contains("--generation"), "{known:?}");
    // Flags of the other tools the README shows: cargo, docker, helm, kubectl, crane, and the
    // kube-apiserver of the test node.
    let other_tools = [
        "--all-targets",
        "--bin",
        "--path",
        "--features",
        "--release",
        "--target",
        "--build-arg",
        "--create-namespace",
        "--strict",
        "--dry-run",
        "--type",
        "--cascade",
        "--password-stdin",
        "--authorization-mode",
    ];
    let unknown: Vec<String> =
        flag_tokens(&read("README.md")).into_iter().filter(|f| !known.contains(f) && !other_tools.contains(&f.as_str())).collect();
    assert!(unknown.is_empty(), "the README shows flags neither agentgate nor kubectl-agentgate takes: {unknown:?}");
}

#[test]
fn every_chart_value_the_readme_names_is_in_values_yaml() {
    let values: serde_json::Value = serde_saphyr::from_str(&read("charts/agentgate/values.yaml")).expect("values.yaml parses");
    let top = values.as_object().expect("values.yaml is a mapping");
    let chart: serde_json::Value = serde_saphyr::from_str(&read("charts/agentgate/Chart.yaml")).expect("Chart.yaml parses");
    let readme = prose(&read("README.md"));
    let mut checked = 0;
    let mut missing = Vec::new();
    for (start, span) in code_spans(&readme) {
        let path = span.split('=').next().unwrap();
        let segments: Vec<&str> = path.split('.').collect();
        let camel = segments.iter().all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()));
        let file = ["yaml", "json", "rs", "lua", "tar", "io", "dev"].contains(segments.last().unwrap());
        // Dotted paths under a top-level value (`approval.floor`), and anything named "chart `X`"
        // or "the chart's `X`" (a value, or a field of Chart.yaml such as `appVersion`).
        let named_chart_value = readme[..start].ends_with("chart ") || readme[..start].ends_with("chart's ");
        let dotted_value = segments.len() > 1 && top.contains_key(segments[0]) && !file;
        if !camel || !(dotted_value || named_chart_value) {
            continue;
        }
        checked += 1;
        let in_chart_yaml = segments.len() == 1 && chart.get(path).is_some();
        if segments.iter().try_fold(&values, |v, s| v.get(s)).is_none() && !in_chart_yaml {
            missing.push(path.to_string());
        }
    }
    assert!(checked >= 15, "found only {checked} chart values in the README");
    assert!(missing.is_empty(), "the README names chart values charts/agentgate/values.yaml does not have: {missing:?}");
}

#[test]
fn the_metrics_table_lists_exactly_the_metrics_the_operator_registers() {
    let code = read("src/metrics.rs");
    let registered: BTreeSet<String> =
        code.split("registry.register(").skip(1).map(|rest| rest.split('"').nth(1).expect("a metric name literal").to_string()).collect();
    assert!(registered.len() >= 10, "{registered:?}");
    let readme = read("README.md");
    let section = readme.split("\n## Metrics").nth(1).expect("a Metrics section").split("\n## ").next().unwrap();
    let mut documented = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| `agentgate_")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`');
        let base = if cells[2] == "counter" {
            name.strip_suffix("_total").unwrap_or_else(|| panic!("counter {name} is scraped as {name}_total"))
        } else {
            name
        };
        documented.insert(base.strip_prefix("agentgate_").unwrap().to_string());
    }
    let undocumented: Vec<_> = registered.difference(&documented).collect();
    let unregistered: Vec<_> = documented.difference(&registered).collect();
    assert!(undocumented.is_empty(), "src/metrics.rs registers metrics the README's Metrics table omits: {undocumented:?}");
    assert!(unregistered.is_empty(), "the README's Metrics table lists metrics src/metrics.rs does not register: {unregistered:?}");
}

#[test]
fn the_kubectl_get_columns_the_readme_shows_are_the_crds() {
    let crd: serde_json::Value = serde_saphyr::from_str(&read("crds/agentjobs.yaml")).unwrap();
    let columns: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["priority"].as_i64().unwrap_or(0) == 0)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let readme = read("README.md");
    let line = readme.lines().find(|l| l.starts_with("kubectl get aj -n ")).expect("the README shows `kubectl get aj -n …`");
    let shown: Vec<&str> = line.split_once('#').expect("a comment naming the columns").1.split(',').map(str::trim).collect();
    assert_eq!(shown.len(), columns.len(), "README shows {shown:?}, the CRD prints {columns:?}");
    for (shown, column) in shown.iter().zip(&columns) {
        assert!(shown.starts_with(column), "README shows {shown:?} where the CRD prints {column:?}");
    }
}

#[test]
fn the_readmes_links_to_its_own_sections_resolve() {
    let readme = prose(&read("README.md"));
    // GitHub's anchors: lowercase, punctuation dropped, spaces as hyphens.
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            let heading = l.trim_start_matches('#').trim().to_lowercase();
            heading
                .chars()
                .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let links: Vec<&str> = readme.split("](#").skip(1).map(|rest| rest.split(')').next().unwrap()).collect();
    assert!(!links.is_empty());
    let broken: Vec<_> = links.iter().filter(|l| !anchors.contains(**l)).collect();
    assert!(broken.is_empty(), "links to no heading: {broken:?}; headings: {anchors:?}");
}

#[test]
fn the_readme_counts_the_hostile_manifests_there_are() {
    let readme = read("README.md");
    let (before, _) = readme.split_once(" hostile manifests").expect("the README counts the hostile manifests");
    let said: usize = before.rsplit(|c: char| !c.is_ascii_digit()).next().unwrap().parse().expect("a number before it");
    let mut manifests = Vec::new();
    files_under(&root().join("tests/data/bad"), &["yaml"], &mut manifests);
    assert_eq!(said, manifests.len(), "the README says {said} hostile manifests; tests/data/bad has {}", manifests.len());
}

#[test]
fn every_make_target_the_readme_names_is_in_the_makefile() {
    let makefile = read("Makefile");
    let targets: BTreeSet<&str> = makefile
        .lines()
        .filter(|l| !l.starts_with(['\t', '#', '.', ' ']))
        .filter_map(|l| l.split_once(':').map(|(target, _)| target.trim()))
        .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .collect();
    let readme = read("README.md");
    let inline = prose(&readme);
    // Command lines of the code blocks: the lines `prose` blanked.
    let fenced = readme.lines().zip(inline.lines()).filter(|(line, blanked)| blanked.is_empty() && !line.is_empty()).map(|(l, _)| l);
    // `make X` in inline code, and at the start of a code block's line.
    let named: BTreeSet<&str> = code_spans(&inline)
        .into_iter()
        .map(|(_, span)| span)
        .chain(fenced)
        .filter_map(|text| text.strip_prefix("make ")?.split_whitespace().next())
        .collect();
    assert!(named.len() >= 8, "{named:?}");
    let missing: Vec<_> = named.difference(&targets).collect();
    assert!(missing.is_empty(), "the README names make targets the Makefile does not have: {missing:?} (targets: {targets:?})");
}
