//! The reviewer's policy and [`evaluate`]: pure, everything it needs is in the job.

use serde::Deserialize;

use super::judge::ModelSettings;
use super::vote::truncate_reason;
use crate::api::{AgentJob, Decision, JobPhase};
use crate::domain::money::MicroUsd;

/// What a reviewer approves without a human: anything else it rejects, naming the problem.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Highest p90 estimated cost approved.
    pub max_cost: MicroUsd,
    /// Tools a job may name; `None` allows any.
    pub allowed_tools: Option<Vec<String>>,
    /// Image prefixes every agent's image must be under; `None` allows any.
    pub allowed_images: Option<Vec<String>>,
    /// Highest `spec.limits.maxRetries` approved; `None` allows any.
    pub max_retries: Option<i32>,
    /// A model asked for a judgement on jobs within the limits above; `None`: the limits alone.
    pub model: Option<ModelSettings>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicyFile {
    #[serde(rename = "maxCostUSD")]
    max_cost_usd: String,
    #[serde(default)]
    allowed_tools: Option<Vec<String>>,
    #[serde(default)]
    allowed_images: Option<Vec<String>>,
    #[serde(default)]
    max_retries: Option<i32>,
    #[serde(default)]
    model: Option<ModelSettings>,
}

impl Policy {
    /// Reads `maxCostUSD: "1.00"`, `allowedTools: [...]`, `allowedImages: [prefix, ...]` and
    /// `maxRetries: N`; only maxCostUSD is required.
    pub fn from_yaml(yaml: &str) -> Result<Policy, String> {
        let file: PolicyFile = serde_saphyr::from_str(yaml).map_err(|e| format!("review policy: {e}"))?;
        let max_cost = MicroUsd::parse(file.max_cost_usd.trim())
            .ok_or_else(|| format!("review policy: maxCostUSD {:?} is not a USD amount such as \"1.00\"", file.max_cost_usd))?;
        if file.allowed_images.as_ref().is_some_and(|images| images.iter().any(|p| p.trim().is_empty())) {
            return Err("review policy: an empty allowedImages prefix would allow every image; remove allowedImages instead".into());
        }
        if file.max_retries.is_some_and(|r| r < 0) {
            return Err("review policy: maxRetries must not be negative".into());
        }
        if let Some(model) = &file.model {
            model.check()?;
        }
        Ok(Policy {
            max_cost,
            allowed_tools: file.allowed_tools,
            allowed_images: file.allowed_images,
            max_retries: file.max_retries,
            model: file.model,
        })
    }
}

/// A reviewer's decision on one generation of one job.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    pub reason: String,
    /// Percent.
    pub confidence: i32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Evaluation {
    Vote(Verdict),
    /// Not ready to be judged (no estimate yet, not awaiting approval): no vote, and why.
    Wait(String),
}

/// Whether `image` lies under `prefix`. A prefix not ending in `/`, `:` or `@` must be
/// followed by one of them, so `ghcr.io/acme` allows `ghcr.io/acme/scanner` but not
/// `ghcr.io/acme-evil/scanner`.
pub fn image_allowed(image: &str, prefix: &str) -> bool {
    let Some(rest) = image.strip_prefix(prefix) else { return false };
    prefix.ends_with(['/', ':', '@']) || rest.is_empty() || rest.starts_with(['/', ':', '@'])
}

/// How much an estimate is worth: one learned from this cluster's history more than a prior.
fn estimate_confidence(method: &str) -> i32 {
    match method {
        "history" => 90,
        "blend" => 80,
        _ => 70,
    }
}

/// Judges the job's current generation against the policy. Pure: everything it needs is in
/// the job's spec and status.
pub fn evaluate(policy: &Policy, job: &AgentJob) -> Evaluation {
    let generation = job.metadata.generation.unwrap_or(1);
    let status = job.status.clone().unwrap_or_default();
    if status.phase != Some(JobPhase::AwaitingApproval) {
        return Evaluation::Wait(format!("job is {}, not AwaitingApproval", status.phase.map(JobPhase::as_str).unwrap_or("Pending")));
    }
    if status.observed_generation.is_some_and(|g| g != generation) {
        return Evaluation::Wait(format!(
            "status is for generation {}, the job is at {generation}",
            status.observed_generation.unwrap_or_default()
        ));
    }
    let Some(estimate) = status.estimate.as_ref().filter(|e| e.generation == generation) else {
        return Evaluation::Wait(format!("no estimate for generation {generation} yet"));
    };
    let Some(p90) = MicroUsd::parse(&estimate.cost_usd.p90) else {
        return Evaluation::Wait(format!("estimated p90 cost {:?} is not a USD amount", estimate.cost_usd.p90));
    };

    let spec = &job.spec;
    let mut checked: Vec<String> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut certain_problem = false; // a fact about the spec, not a forecast

    if p90 > policy.max_cost {
        problems.push(format!("p90 estimated cost ${p90} is over the policy maximum ${}", policy.max_cost));
    } else {
        checked.push(format!("p90 estimated cost ${p90} within the policy maximum ${}", policy.max_cost));
    }

    let tools: Vec<&str> = spec.tools.iter().map(|t| t.name.as_str()).collect();
    if let Some(allowed) = &policy.allowed_tools {
        let disallowed: Vec<&str> = tools.iter().copied().filter(|t| !allowed.iter().any(|a| a == t)).collect();
        if disallowed.is_empty() {
            checked.push(if tools.is_empty() { "no tools".into() } else { format!("tools {} allowed", tools.join(", ")) });
        } else {
            certain_problem = true;
            problems.push(format!(
                "tool{} {} not in the policy's allowedTools [{}]",
                if disallowed.len() == 1 { "" } else { "s" },
                disallowed.join(", "),
                allowed.join(", ")
            ));
        }
    }

    if let Some(prefixes) = &policy.allowed_images {
        let agents = std::iter::once(&spec.agents.primary).chain(&spec.agents.supporting);
        let outside: Vec<String> = agents
            .filter(|a| !prefixes.iter().any(|p| image_allowed(&a.image, p)))
            .map(|a| format!("image {} (agent {})", a.image, a.name))
            .collect();
        if outside.is_empty() {
            checked.push(format!("images under {}", prefixes.join(", ")));
        } else {
            certain_problem = true;
            problems.push(format!("{} not under the policy's allowedImages [{}]", outside.join(", "), prefixes.join(", ")));
        }
    }

    if let Some(max) = policy.max_retries {
        let retries = spec.limits.as_ref().and_then(|l| l.max_retries).unwrap_or(0);
        if retries > max {
            certain_problem = true;
            problems.push(format!("maxRetries {retries} is over the policy maximum {max}"));
        } else {
            checked.push(format!("maxRetries {retries} within {max}"));
        }
    }

    let by_estimate = estimate_confidence(&estimate.method);
    let verdict = if problems.is_empty() {
        Verdict { decision: Decision::Approve, reason: format!("within review policy: {}", checked.join("; ")), confidence: by_estimate }
    } else {
        Verdict {
            decision: Decision::Reject,
            reason: format!("outside review policy: {}", problems.join("; ")),
            confidence: if certain_problem { 100 } else { by_estimate },
        }
    };
    Evaluation::Vote(Verdict { reason: truncate_reason(verdict.reason.clone()), ..verdict })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentJobStatus, Estimate};
    use crate::review::fixtures::{awaiting, job};
    use crate::review::vote::MAX_REASON;

    fn policy() -> Policy {
        Policy {
            max_cost: MicroUsd::parse("1.00").unwrap(),
            allowed_tools: Some(vec!["bandit-scanner".into(), "semgrep".into()]),
            allowed_images: Some(vec!["ghcr.io/acme/".into(), "registry.internal/team".into()]),
            max_retries: Some(2),
            model: None,
        }
    }

    enum Want {
        Approve { confidence: i32, mentions: &'static [&'static str] },
        Reject { confidence: i32, mentions: &'static [&'static str] },
        Wait(&'static str),
    }

    struct Case {
        name: &'static str,
        policy: Policy,
        job: AgentJob,
        want: Want,
    }

    fn with_status(mut job: AgentJob, status: AgentJobStatus) -> AgentJob {
        job.status = Some(status);
        job
    }

    fn cases() -> Vec<Case> {
        let scan = || job(&["bandit-scanner"], &["ghcr.io/acme/scanner:2.1"], Some(1));
        vec![
            Case {
                name: "within policy approves and lists what was checked",
                policy: policy(),
                job: scan(),
                want: Want::Approve {
                    confidence: 90,
                    mentions: &[
                        "within review policy",
                        "p90 estimated cost $0.40 within the policy maximum $1.00",
                        "tools bandit-scanner allowed",
                        "images under ghcr.io/acme/",
                        "maxRetries 1 within 2",
                    ],
                },
            },
            Case {
                name: "p90 over the maximum rejects naming both figures",
                policy: policy(),
                job: with_status(scan(), awaiting("1.50", "prior")),
                want: Want::Reject { confidence: 70, mentions: &["p90 estimated cost $1.50 is over the policy maximum $1.00"] },
            },
            Case {
                name: "p90 exactly at the maximum approves",
                policy: policy(),
                job: with_status(scan(), awaiting("1.00", "blend")),
                want: Want::Approve { confidence: 80, mentions: &["$1.00 within the policy maximum $1.00"] },
            },
            Case {
                name: "a disallowed tool rejects naming it",
                policy: policy(),
                job: job(&["bandit-scanner", "shell-exec"], &["ghcr.io/acme/scanner:2.1"], None),
                want: Want::Reject {
                    confidence: 100,
                    mentions: &["tool shell-exec not in the policy's allowedTools [bandit-scanner, semgrep]"],
                },
            },
            Case {
                name: "without allowedTools any tool is fine",
                policy: Policy { allowed_tools: None, ..policy() },
                job: job(&["shell-exec"], &["ghcr.io/acme/scanner:2.1"], None),
                want: Want::Approve { confidence: 90, mentions: &["within review policy"] },
            },
            Case {
                name: "a supporting agent's image outside the prefixes rejects naming it",
                policy: policy(),
                job: job(&[], &["ghcr.io/acme/scanner:2.1", "docker.io/random/fixer:latest"], None),
                want: Want::Reject {
                    confidence: 100,
                    mentions: &["image docker.io/random/fixer:latest (agent helper-0) not under the policy's allowedImages"],
                },
            },
            Case {
                name: "a prefix does not match a longer path segment",
                policy: policy(),
                job: job(&[], &["registry.internal/team-evil/agent:1"], None),
                want: Want::Reject { confidence: 100, mentions: &["image registry.internal/team-evil/agent:1 (agent scanner)"] },
            },
            Case {
                name: "a prefix without a trailing slash matches its own repositories",
                policy: policy(),
                job: job(&[], &["registry.internal/team/agent:1"], None),
                want: Want::Approve { confidence: 90, mentions: &["no tools", "images under"] },
            },
            Case {
                name: "too many retries rejects",
                policy: policy(),
                job: job(&[], &["ghcr.io/acme/scanner:2.1"], Some(5)),
                want: Want::Reject { confidence: 100, mentions: &["maxRetries 5 is over the policy maximum 2"] },
            },
            Case {
                name: "every problem is named at once",
                policy: policy(),
                job: with_status(job(&["shell-exec"], &["quay.io/x/y:1"], None), awaiting("3.00", "history")),
                want: Want::Reject { confidence: 100, mentions: &["$3.00 is over", "tool shell-exec", "image quay.io/x/y:1"] },
            },
            Case {
                name: "no estimate yet means no vote",
                policy: policy(),
                job: with_status(scan(), AgentJobStatus { estimate: None, ..awaiting("0.40", "prior") }),
                want: Want::Wait("no estimate for generation 2 yet"),
            },
            Case {
                name: "an estimate of an older generation means no vote",
                policy: policy(),
                job: with_status(
                    scan(),
                    AgentJobStatus {
                        estimate: Some(Box::new(Estimate { generation: 1, ..*awaiting("0.40", "prior").estimate.unwrap() })),
                        ..awaiting("0.40", "prior")
                    },
                ),
                want: Want::Wait("no estimate for generation 2 yet"),
            },
            Case {
                name: "a job not awaiting approval gets no vote",
                policy: policy(),
                job: with_status(scan(), AgentJobStatus { phase: Some(JobPhase::Running), ..awaiting("0.40", "prior") }),
                want: Want::Wait("job is Running, not AwaitingApproval"),
            },
            Case {
                name: "a job without status gets no vote",
                policy: policy(),
                job: AgentJob { status: None, ..scan() },
                want: Want::Wait("job is Pending"),
            },
        ]
    }

    #[test]
    fn evaluate_table() {
        let cases = cases();
        assert!(cases.len() >= 8);
        for case in cases {
            let name = case.name;
            let got = evaluate(&case.policy, &case.job);
            match (&got, &case.want) {
                (Evaluation::Vote(v), Want::Approve { confidence, mentions })
                | (Evaluation::Vote(v), Want::Reject { confidence, mentions }) => {
                    let want_decision = if matches!(case.want, Want::Approve { .. }) { Decision::Approve } else { Decision::Reject };
                    assert_eq!(v.decision, want_decision, "{name}: {v:?}");
                    assert_eq!(v.confidence, *confidence, "{name}: confidence; {v:?}");
                    for m in *mentions {
                        assert!(v.reason.contains(m), "{name}: reason {:?} should mention {m:?}", v.reason);
                    }
                    assert!(v.reason.len() <= MAX_REASON, "{name}: reason fits the schema");
                }
                (Evaluation::Wait(why), Want::Wait(fragment)) => {
                    assert!(why.contains(fragment), "{name}: waits because {why:?}, want {fragment:?}")
                }
                _ => panic!("{name}: got {got:?}"),
            }
        }
    }

    #[test]
    fn long_reasons_are_cut_to_the_schema_limit() {
        let tools: Vec<String> = (0..100).map(|i| format!("a-rather-long-tool-name-number-{i}")).collect();
        let names: Vec<&str> = tools.iter().map(String::as_str).collect();
        let Evaluation::Vote(v) = evaluate(&policy(), &job(&names, &["ghcr.io/acme/a:1"], None)) else { panic!() };
        assert_eq!(v.decision, Decision::Reject);
        assert!(v.reason.len() <= MAX_REASON && v.reason.ends_with('…'), "{}", v.reason.len());
    }

    #[test]
    fn policy_files() {
        let p = Policy::from_yaml("maxCostUSD: \"1.00\"\nallowedTools: [bandit-scanner]\nallowedImages: [ghcr.io/acme/]\nmaxRetries: 2\n")
            .unwrap();
        assert_eq!(
            p,
            Policy {
                max_cost: MicroUsd(1_000_000),
                allowed_tools: Some(vec!["bandit-scanner".into()]),
                allowed_images: Some(vec!["ghcr.io/acme/".into()]),
                max_retries: Some(2),
                model: None
            }
        );
        let minimal = Policy::from_yaml("maxCostUSD: \"0.25\"\n").unwrap();
        assert_eq!(
            minimal,
            Policy { max_cost: MicroUsd(250_000), allowed_tools: None, allowed_images: None, max_retries: None, model: None }
        );
        let errors: &[(&str, &str)] = &[
            ("maxCostUSD: \"lots\"\n", "not a USD amount"),
            ("allowedTools: [x]\n", "maxCostUSD"),
            ("maxCostUSD: \"1\"\nallowedImages: [\"\"]\n", "empty allowedImages prefix"),
            ("maxCostUSD: \"1\"\nallowedtools: [x]\n", "allowedtools"),
            ("maxCostUSD: \"1\"\nmaxRetries: -1\n", "must not be negative"),
        ];
        for (yaml, fragment) in errors {
            let err = Policy::from_yaml(yaml).unwrap_err();
            assert!(err.contains(fragment), "{yaml:?}: {err}");
        }
    }
}
