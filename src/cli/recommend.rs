//! `kubectl agentgate recommend [-n ns] [--job-type T]`: cost advice from the namespace's own
//! finished jobs (domain/recommend.rs), each with its evidence and estimated saving in USD.

use std::fmt::Write as _;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use serde::Serialize;

use crate::api::AgentJob;
use crate::controller::price_table;
use crate::domain::pricing::PriceTable;
use crate::domain::recommend::{self, JobTypeAdvice, MIN_SAMPLES};

#[derive(clap::Args, Debug)]
pub struct RecommendArgs {
    /// Only this jobType.
    #[arg(long)]
    pub job_type: Option<String>,
    /// Namespace the operator runs in (its price table lives there).
    #[arg(long, default_value = "agentgate-system")]
    pub operator_namespace: String,
    /// The price table ConfigMap in that namespace (as the chart names it).
    #[arg(long, default_value = "agentgate-prices")]
    pub price_config_map: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecommendReport {
    pub namespace: String,
    /// Finished jobs any advice rests on, at least.
    pub min_samples: usize,
    pub job_types: Vec<JobTypeAdvice>,
}

/// Lists the namespace's jobs and the cluster's prices, and advises on them.
pub async fn report(client: &Client, namespace: &str, args: &RecommendArgs) -> anyhow::Result<RecommendReport> {
    let jobs = Api::<AgentJob>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await
        .map_err(|e| anyhow::anyhow!("listing AgentJobs in {namespace}: {e}"))?
        .items;
    let prices = prices(client, &args.operator_namespace, &args.price_config_map).await?;
    let jobs: Vec<&AgentJob> = jobs.iter().collect();
    let job_types = recommend::for_namespace(namespace, &jobs, args.job_type.as_deref(), &prices);
    Ok(RecommendReport { namespace: namespace.to_string(), min_samples: MIN_SAMPLES, job_types })
}

/// The operator's prices: the built-in table with its ConfigMap's entries on top. A user who may
/// not read it gets the built-in prices and a warning, as the figures may then differ.
async fn prices(client: &Client, namespace: &str, name: &str) -> anyhow::Result<PriceTable> {
    match Api::<ConfigMap>::namespaced(client.clone(), namespace).get_opt(name).await {
        Ok(cm) => match cm.and_then(|cm| cm.data?.remove(price_table::KEY)) {
            Some(yaml) => PriceTable::with_overrides_from_yaml(&yaml).map_err(anyhow::Error::msg),
            None => Ok(PriceTable::builtin()),
        },
        Err(kube::Error::Api(s)) if s.code == 403 => {
            eprintln!("warning: may not read configmap {namespace}/{name}; using the built-in prices");
            Ok(PriceTable::builtin())
        }
        Err(e) => Err(anyhow::anyhow!("reading configmap {namespace}/{name}: {e}")),
    }
}

/// One table per jobType (saving first), then each recommendation's evidence by its number.
pub fn render(report: &RecommendReport) -> String {
    let mut out = String::new();
    if report.job_types.is_empty() {
        let _ = writeln!(out, "no finished AgentJobs with usage in {}", report.namespace);
        return out;
    }
    for advice in &report.job_types {
        let _ = writeln!(
            out,
            "jobType {} in {}: {} finished job(s), advice on the configuration of {}",
            advice.job_type, report.namespace, advice.finished_jobs, advice.reference_job
        );
        if advice.recommendations.is_empty() {
            let why = if advice.finished_jobs < report.min_samples {
                format!("not enough data: advice needs at least {} finished jobs", report.min_samples)
            } else {
                "nothing to recommend".to_string()
            };
            let _ = writeln!(out, "  {why}\n");
            continue;
        }
        let rows: Vec<Vec<String>> = advice
            .recommendations
            .iter()
            .enumerate()
            .map(|(i, r)| {
                vec![
                    (i + 1).to_string(),
                    format!("{:?}", r.kind),
                    format!("${}", r.saving_per_run_usd),
                    format!("${}", r.saving_over_samples_usd),
                    r.samples.to_string(),
                    r.summary.clone(),
                ]
            })
            .collect();
        out += &crate::plugin::table(&["#", "KIND", "SAVING/RUN", "SAVED OVER SAMPLES", "SAMPLES", "RECOMMENDATION"], &rows);
        for (i, r) in advice.recommendations.iter().enumerate() {
            let _ = writeln!(out, "  {}. evidence: {}", i + 1, r.evidence);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Recommendation, RecommendationKind};

    #[test]
    fn renders_savings_and_evidence_and_says_when_data_is_short() {
        let advice = |job_type: &str, finished_jobs, recommendations| JobTypeAdvice {
            job_type: job_type.into(),
            finished_jobs,
            reference_job: format!("{job_type}-9"),
            recommendations,
        };
        let rec = Recommendation {
            kind: RecommendationKind::CheaperModel,
            summary: "use gpt-4o-mini instead of gpt-4o".into(),
            evidence: "gpt-4o: 5 runs".into(),
            samples: 10,
            saving_per_run_usd: "0.329".into(),
            saving_over_samples_usd: "1.645".into(),
        };
        let report = RecommendReport {
            namespace: "team-a".into(),
            min_samples: 5,
            job_types: vec![advice("scan", 10, vec![rec]), advice("triage", 3, vec![]), advice("lint", 8, vec![])],
        };
        let text = render(&report);
        assert!(text.contains("jobType scan in team-a: 10 finished job(s), advice on the configuration of scan-9"), "{text}");
        let row = text.lines().find(|l| l.starts_with("1 ")).unwrap();
        for cell in ["CheaperModel", "$0.329", "$1.645", "10", "use gpt-4o-mini instead of gpt-4o"] {
            assert!(row.contains(cell), "{row}");
        }
        assert!(text.contains("  1. evidence: gpt-4o: 5 runs"), "{text}");
        assert!(text.contains("not enough data: advice needs at least 5 finished jobs"), "{text}");
        assert!(text.contains("jobType lint in team-a: 8 finished job(s)") && text.contains("nothing to recommend"), "{text}");
        assert_eq!(render(&RecommendReport { job_types: vec![], ..report }), "no finished AgentJobs with usage in team-a\n");
    }
}
