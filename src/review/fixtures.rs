//! Jobs for the review unit tests.

use serde_json::json;

use crate::api::{AgentJob, AgentJobStatus, CostRange, Estimate, JobPhase, TokenRange};

pub(super) fn job(tools: &[&str], images: &[&str], retries: Option<i32>) -> AgentJob {
    let supporting: Vec<_> = images
        .iter()
        .skip(1)
        .enumerate()
        .map(|(i, img)| json!({"name": format!("helper-{i}"), "image": img, "model": "gpt-4o-mini"}))
        .collect();
    let tools: Vec<_> = tools.iter().map(|t| json!({"name": t})).collect();
    let mut spec = json!({
        "category": "core-security",
        "agents": {"primary": {"name": "scanner", "image": images[0], "model": "gpt-4o-mini"}, "supporting": supporting},
        "tools": tools,
        "budget": {"maxCostUSD": "5"},
    });
    if let Some(r) = retries {
        spec["limits"] = json!({"maxRetries": r});
    }
    let mut job: AgentJob = serde_json::from_value(json!({
        "apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
        "metadata": {"name": "scan", "namespace": "team", "uid": "uid-1", "generation": 2},
        "spec": spec,
    }))
    .unwrap();
    job.status = Some(awaiting("0.40", "history"));
    job
}

pub(super) fn awaiting(p90: &str, method: &str) -> AgentJobStatus {
    AgentJobStatus {
        phase: Some(JobPhase::AwaitingApproval),
        observed_generation: Some(2),
        estimate: Some(Box::new(Estimate {
            generation: 2,
            tokens: TokenRange { p50: 1000, p90: 3000 },
            cost_usd: CostRange { p50: "0.10".into(), p90: p90.into() },
            method: method.into(),
            samples: 3,
            models: vec![],
        })),
        ..AgentJobStatus::default()
    }
}
