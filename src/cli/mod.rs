//! `kubectl agentgate` subcommands that live in their own modules: the binary only parses the
//! command line and dispatches here.

pub mod history;
pub mod recommend;
pub mod templates;

use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use crate::api::AgentJob;

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
        Emit::Json => println!("{}", serde_json::to_string_pretty(job)?),
        Emit::Yaml => print!("{}", serde_saphyr::to_string(job)?),
    }
    Ok(false)
}
