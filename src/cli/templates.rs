//! `kubectl agentgate new TEMPLATE --name N [--set NAME=VALUE ...] [-o yaml]`: renders an
//! AgentJobTemplate into a self-contained AgentJob (domain/template.rs) and creates it as you,
//! or prints it for Git.

use kube::{Api, Client, ResourceExt};

use super::{Emit, create_or_print};
use crate::api::AgentJobTemplate;
use crate::domain::digest::short;
use crate::domain::template::{parse_sets, render, template_digest};

#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// The AgentJobTemplate (`kubectl get agentjobtemplates` lists them).
    pub template: String,
    /// Name of the job to create.
    #[arg(long)]
    pub name: String,
    /// A template parameter's value; repeat for more. Only the template's parameters exist.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
}

pub async fn new(client: &Client, namespace: &str, args: NewArgs, emit: Emit) -> anyhow::Result<()> {
    let sets = parse_sets(&args.set)?;
    let api: Api<AgentJobTemplate> = Api::all(client.clone());
    let template = match api.get_opt(&args.template).await {
        Ok(Some(t)) => t,
        Ok(None) => anyhow::bail!("no AgentJobTemplate {:?} (`kubectl get agentjobtemplates` lists them)", args.template),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            anyhow::bail!("you may not read AgentJobTemplates (ask for the chart's template-reader role): {}", s.message)
        }
        Err(e) => return Err(anyhow::Error::from(e).context(format!("reading AgentJobTemplate {}", args.template))),
    };
    let job = render(&template, &args.name, namespace, &sets)?;
    if create_or_print(client, &job, emit).await? {
        println!(
            "agentjob/{} created in {namespace} from template {} (generation {}, {})",
            job.name_any(),
            template.name_any(),
            template.metadata.generation.unwrap_or(0),
            short(&template_digest(&template)),
        );
        println!("It runs once approved, like any job: kubectl agentgate approve {} -n {namespace}", job.name_any());
    }
    Ok(())
}
