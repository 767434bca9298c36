//! `kubectl agentgate` subcommands that live in their own modules: the binary only parses the
//! command line and dispatches here.

pub mod history;
pub mod recommend;
pub mod templates;

use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use crate::api::AgentJob;
use crate::domain::terminal_text;

/// What to do with a job a subcommand made: create it, or print it (for Git and Argo CD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    Create,
    Json,
    Yaml,
}

/// Creates `job` as the caller, or prints it after the apiserver has checked it (a dry-run
/// create: the CRD schema's bounds and the admission policies, as a real create would). A
/// printed job that already exists in the cluster (kept in Git and synced) is printed anyway.
/// Returns whether it was created.
pub async fn create_or_print(client: &Client, job: &AgentJob, emit: Emit) -> anyhow::Result<bool> {
    let namespace = job.namespace().unwrap_or_default();
    let api: Api<AgentJob> = Api::namespaced(client.clone(), &namespace);
    let name = job.name_any();
    let dry_run = emit != Emit::Create;
    match api.create(&PostParams { dry_run, ..PostParams::default() }, job).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 && dry_run => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            anyhow::bail!("agentjob {namespace}/{name} already exists: pass another --name")
        }
        Err(kube::Error::Api(s)) => anyhow::bail!("the apiserver refused agentjob {namespace}/{name}: {}", s.message),
        Err(e) => return Err(anyhow::Error::from(e).context(format!("creating agentjob {namespace}/{name}"))),
    }
    match emit {
        Emit::Create => return Ok(true),
        Emit::Json => println!("{}", json_for_terminal(job)?),
        Emit::Yaml => print!("{}", yaml_for_terminal(job)?),
    }
    Ok(false)
}

/// `value` as pretty JSON with no raw character a terminal would act on (serde_json leaves DEL,
/// C1 controls and bidi or zero-width characters raw): the same document.
pub fn json_for_terminal<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    Ok(terminal_text::json_escaped(&serde_json::to_string_pretty(value)?).into_owned())
}

/// `value` as YAML with no raw character a terminal would act on: serde_saphyr's rendering,
/// unless it holds one (it escapes controls but leaves bidi and zero-width characters raw), then
/// every string quoted in printable ASCII ([`terminal_text::yaml`]): the same document.
pub fn yaml_for_terminal<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    let text = serde_saphyr::to_string(value)?;
    if text.chars().any(|c| c != '\n' && terminal_text::is_hidden(c)) {
        return Ok(terminal_text::yaml(&serde_json::to_value(value)?, 0));
    }
    Ok(text)
}

/// The agent's result (`status.output`) for a terminal: JSON (or YAML with `yaml`), the same
/// document with no raw character a terminal would act on. The status keeps the agent's values
/// as it wrote them (a consumer reading `.status.output` through the API gets its JSON, line
/// breaks, emoji joiners and right-to-left marks included); it is on a screen that an escape
/// sequence in a value clears lines or forges them, so the escaping happens here, where it is shown.
pub fn output_for_terminal(job: &AgentJob, yaml: bool) -> anyhow::Result<String> {
    let status = job.status.as_ref();
    let Some(output) = status.and_then(|s| s.output.as_deref()) else {
        let phase = status.and_then(|s| s.phase).map_or("not started", |p| p.as_str());
        anyhow::bail!("agentjob {}/{} has no output ({phase})", job.namespace().unwrap_or_default(), job.name_any());
    };
    if yaml { yaml_for_terminal(output) } else { Ok(json_for_terminal(output)? + "\n") }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// An agent's output, its own result, may hold whatever its run produced: a captured log's
    /// escape sequences clear the screen and forge lines, a bidi override reorders what follows.
    /// `kubectl agentgate output` shows the same document without one raw character of them, and
    /// plain text (line breaks inside strings, non-ASCII letters) as the same values.
    #[test]
    fn a_jobs_output_is_shown_as_the_same_document_without_raw_controls() {
        let output = json!({
            "log": "done\u{1b}[2J\u{1b}[H  Approvals: 2/2 (alice, bob)\u{9b}31m",
            "verdict": "safe\u{202E}efasnu",
            "lines": "first\nsecond",
            "family": "\u{1F468}\u{200D}\u{1F469}",
            "n": 3,
        });
        let job: crate::api::AgentJob = serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": "scan", "namespace": "team-a"},
            "spec": {"jobType": "scan", "category": "sec", "agents": {"primary": {"name": "a", "image": "i", "model": "gpt-4o-mini"}},
                     "budget": {"maxCostUSD": "0.01"}},
            "status": {"output": output},
        }))
        .unwrap();
        let raw = serde_json::to_string_pretty(&output).unwrap();
        assert!(raw.chars().any(|c| c != '\n' && crate::domain::terminal_text::is_hidden(c)), "the attack reaches a plain rendering");
        let json = super::output_for_terminal(&job, false).unwrap();
        let yaml = super::output_for_terminal(&job, true).unwrap();
        for shown in [&json, &yaml] {
            assert!(!shown.chars().any(|c| c != '\n' && crate::domain::terminal_text::is_hidden(c)), "{shown:?}");
        }
        assert_eq!(serde_json::from_str::<serde_json::Value>(&json).unwrap(), output, "{json}");
        assert_eq!(serde_saphyr::from_str::<serde_json::Value>(&yaml).unwrap(), output, "{yaml}");
        let none: crate::api::AgentJob = serde_json::from_value(json!({
            "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": "scan", "namespace": "team-a"},
            "spec": {"jobType": "scan", "category": "sec", "agents": {"primary": {"name": "a", "image": "i", "model": "gpt-4o-mini"}},
                     "budget": {"maxCostUSD": "0.01"}},
        }))
        .unwrap();
        let err = super::output_for_terminal(&none, false).unwrap_err().to_string();
        assert_eq!(err, "agentjob team-a/scan has no output (not started)");
    }

    #[test]
    fn printed_documents_keep_their_meaning_without_raw_controls() {
        let job = json!({"spec": {"description": "a\u{202E}b\u{200B}\u{9b}c", "agents": [{"command": ["sh", "-c", "x\ny"]}]}});
        let json = super::json_for_terminal(&job).unwrap();
        let yaml = super::yaml_for_terminal(&job).unwrap();
        for shown in [&json, &yaml] {
            assert!(!shown.chars().any(|c| c != '\n' && crate::domain::terminal_text::is_hidden(c)), "{shown:?}");
        }
        assert_eq!(serde_json::from_str::<serde_json::Value>(&json).unwrap(), job, "{json}");
        assert_eq!(serde_saphyr::from_str::<serde_json::Value>(&yaml).unwrap(), job, "{yaml}");
        let plain = json!({"spec": {"category": "sec"}});
        assert_eq!(super::yaml_for_terminal(&plain).unwrap(), serde_saphyr::to_string(&plain).unwrap(), "plain YAML stays as it was");
    }
}
