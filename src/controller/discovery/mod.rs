//! Discovery: a Service labelled `agentgate.dev/tool: <name>` yields a cluster-scoped AgentTool
//! `<name>`, marked as discovered, that follows the Service and goes when the label or the
//! Service does.
//!
//! [`plan`] decides, over plain views of the Service and AgentTool caches, which AgentTools to
//! apply or delete and what to tell the Services' owners; [`run`] is the thin shell around it: a
//! loop woken by the Service, AgentTool (and Namespace) watches that applies the plan with
//! server-side apply (field manager [`FIELD_MANAGER`]) and publishes Events on the Services.
//!
//! Decisions:
//! - A bad annotation value still yields the AgentTool, not Ready, carrying the problem in
//!   [`DISCOVERY_ERROR`] (its reconciler turns that into `Ready=False`, reason
//!   `InvalidAnnotation`), so that jobs naming the tool say why instead of "has no AgentTool";
//!   the Service gets a Warning Event naming the annotation and its value. Only a label value
//!   that cannot be an AgentTool name yields nothing (and a Warning Event).
//! - An AgentTool without the [`DISCOVERED`] label is hand-written and never touched.
//! - Discovery is opt-in: it runs only with `--discovery-namespace-selector`, in the namespaces
//!   that selector matches. Whoever may label a Service there publishes a tool that every team's
//!   agents may be given, so the cluster admin chooses those namespaces; by default there are none.
//! - Only AgentTools carrying [`DISCOVERED`] with a [`DISCOVERED_FROM`] in a namespace this
//!   operator discovers in are updated or deleted: taking a namespace out of
//!   `--discovery-namespace-selector` leaves its tools alone, and two operators discovering in
//!   different namespaces never delete each other's tools.
//! - A discovered tool never moves to another Service by itself: agents would send their traffic
//!   (and their tool credentials) wherever it points. A second Service claiming the name is a
//!   conflict: the tool stays with its Service but is not Ready ([`DISCOVERY_CONFLICT`], reason
//!   `ToolNameConflict`) until only that Service claims it, and every claimant gets a Warning
//!   Event. When its Service goes or drops the label, the tool is deleted if nobody else claims
//!   the name; if someone does, it stays, not Ready, pointing at the Service that went, until an
//!   admin deletes it (then a sole claimant gets a new tool). Two Services claiming a name no
//!   tool has yet create nothing.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use crate::api::{AgentTool, AgentToolSpec, ServiceEndpoint, ToolEndpoint, ToolType};

/// On a Service: the name of the AgentTool it provides.
pub const TOOL_LABEL: &str = "agentgate.dev/tool";
/// On an AgentTool: created by discovery (`"true"`). Without it a tool is hand-written.
pub const DISCOVERED: &str = "agentgate.dev/discovered";
/// On a discovered AgentTool: `<namespace>/<name>` of its Service.
pub const DISCOVERED_FROM: &str = "agentgate.dev/discovered-from";
/// On a discovered AgentTool: why the Service's annotations do not describe a usable tool.
pub const DISCOVERY_ERROR: &str = "agentgate.dev/discovery-error";
/// On a discovered AgentTool: which other Services claim its name (it is then not Ready).
pub const DISCOVERY_CONFLICT: &str = "agentgate.dev/discovery-conflict";
/// Service annotations read into the AgentTool's spec.
pub const TOOL_TYPE: &str = "agentgate.dev/tool-type";
pub const RATE_LIMIT: &str = "agentgate.dev/rate-limit";
pub const PORT: &str = "agentgate.dev/port";
pub const DESCRIPTION: &str = "agentgate.dev/description";
/// Field manager of discovery's server-side applies.
pub const FIELD_MANAGER: &str = "agentgate-discovery";

const MAX_RATE_LIMIT: i32 = 1_000_000;
/// Claimants of a contested name that a conflict note names; the rest are counted. Beyond this
/// many, each claimant's Warning no longer names the others, so that a new claimant changes no
/// other claimant's note (a changed note is a new Event for that Service).
const MAX_CLAIMANTS_NAMED: usize = 3;
const MAX_DESCRIPTION_CHARS: usize = 1024;

// ---------------------------------------------------------------------------------------------
// The decision, over plain views.

/// A Service carrying [`TOOL_LABEL`], as discovery sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    /// The label's value: the AgentTool name claimed.
    pub tool: String,
    pub annotations: BTreeMap<String, String>,
    /// `(name, port)` of each Service port, in order.
    pub ports: Vec<(Option<String>, i32)>,
}

impl ServiceView {
    /// `None` for a Service without the label or on its way out.
    pub fn of(svc: &Service) -> Option<ServiceView> {
        if svc.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let tool = svc.labels().get(TOOL_LABEL)?.clone();
        Some(ServiceView {
            namespace: svc.namespace().unwrap_or_default(),
            name: svc.name_any(),
            tool,
            annotations: svc.annotations().clone(),
            ports: svc.spec.iter().flat_map(|s| s.ports.iter().flatten()).map(|p| (p.name.clone(), p.port)).collect(),
        })
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// An AgentTool as the cache shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ExistingTool {
    pub name: String,
    pub uid: Option<String>,
    /// Carries `agentgate.dev/discovered: "true"`.
    pub discovered: bool,
    pub discovered_from: Option<String>,
    pub discovery_error: Option<String>,
    pub discovery_conflict: Option<String>,
    pub spec: AgentToolSpec,
}

impl ExistingTool {
    pub fn of(tool: &AgentTool) -> ExistingTool {
        ExistingTool {
            name: tool.name_any(),
            uid: tool.metadata.uid.clone(),
            discovered: tool.labels().get(DISCOVERED).is_some_and(|v| v == "true"),
            discovered_from: tool.annotations().get(DISCOVERED_FROM).cloned(),
            discovery_error: tool.annotations().get(DISCOVERY_ERROR).cloned(),
            discovery_conflict: tool.annotations().get(DISCOVERY_CONFLICT).cloned(),
            spec: tool.spec.clone(),
        }
    }
}

/// The AgentTool a Service describes.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredTool {
    pub name: String,
    /// `<namespace>/<name>` of the Service.
    pub from: String,
    pub spec: AgentToolSpec,
    /// Set when an annotation is bad; the tool is then not Ready.
    pub error: Option<String>,
    /// Set while other Services claim the name; the tool is then not Ready.
    pub conflict: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Server-side apply. `uid` guards an update against a tool deleted and recreated meanwhile.
    Apply { tool: Box<DesiredTool>, uid: Option<String>, create: bool },
    /// Delete, on condition that the uid is still the one discovery saw.
    Delete { name: String, uid: Option<String>, from: String, why: String },
}

/// A Warning for the owner of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Warning {
    pub namespace: String,
    pub service: String,
    pub reason: &'static str,
    pub note: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub writes: Vec<Write>,
    /// Every problem as it stands now; the shell publishes those it has not reported yet.
    pub warnings: Vec<Warning>,
}

/// Whether `name` can be an AgentTool that jobs name: a DNS label.
pub fn valid_tool_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// The AgentTool `svc` describes, and what is wrong with its annotations. A bad value falls back
/// to a placeholder (rate limit 1, the first port, type service) so the tool can still exist,
/// not Ready.
pub fn desired_tool(svc: &ServiceView) -> (DesiredTool, Vec<String>) {
    let mut problems = Vec::new();
    let annotation = |key: &str| svc.annotations.get(key).map(String::as_str);

    let tool_type = match annotation(TOOL_TYPE).map(str::trim) {
        None => ToolType::Service,
        Some("api") => ToolType::Api,
        Some("service") => ToolType::Service,
        Some("mcp") => ToolType::Mcp,
        Some(_) => {
            problems
                .push(format!("annotation {TOOL_TYPE}={:?} is not one of api, service, mcp", annotation(TOOL_TYPE).unwrap_or_default()));
            ToolType::Service
        }
    };

    let rate_limit = match annotation(RATE_LIMIT) {
        None => {
            problems.push(format!("annotation {RATE_LIMIT} is missing: it must give the calls per minute the tool takes, a whole number from 1 to {MAX_RATE_LIMIT}"));
            1
        }
        Some(raw) => match raw.trim().parse::<i32>() {
            Ok(n) if (1..=MAX_RATE_LIMIT).contains(&n) => n,
            _ => {
                problems.push(format!("annotation {RATE_LIMIT}={raw:?} is not a whole number from 1 to {MAX_RATE_LIMIT}"));
                1
            }
        },
    };

    let first_port = svc.ports.first().map(|(_, p)| *p);
    let listed = || {
        svc.ports
            .iter()
            .map(|(name, port)| name.as_ref().map_or(port.to_string(), |n| format!("{n}={port}")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let port = match annotation(PORT) {
        None => first_port.unwrap_or_else(|| {
            problems.push(format!("the Service has no ports; give it one, or name one with annotation {PORT}"));
            1
        }),
        Some(raw) => {
            let wanted = raw.trim();
            let found = match wanted.parse::<i32>() {
                Ok(n) => svc.ports.iter().find(|(_, p)| *p == n),
                Err(_) => svc.ports.iter().find(|(name, _)| name.as_deref() == Some(wanted)),
            };
            match found {
                Some((_, p)) => *p,
                None => {
                    problems.push(format!(
                        "annotation {PORT}={raw:?} names no port of the Service (its ports: {})",
                        if svc.ports.is_empty() { "none".to_string() } else { listed() }
                    ));
                    first_port.unwrap_or(1)
                }
            }
        }
    };

    let description =
        annotation(DESCRIPTION).map(str::trim).filter(|d| !d.is_empty()).map(|d| d.chars().take(MAX_DESCRIPTION_CHARS).collect());

    let spec = AgentToolSpec {
        tool_type,
        endpoint: ToolEndpoint {
            service: Some(ServiceEndpoint { namespace: svc.namespace.clone(), name: svc.name.clone(), port }),
            url: None,
        },
        rate_limit,
        credentials: None,
        description,
    };
    let error = (!problems.is_empty()).then(|| format!("Service {}: {}", svc.key(), problems.join("; ")));
    (DesiredTool { name: svc.tool.clone(), from: svc.key(), spec, error, conflict: None }, problems)
}

fn warn(svc: &ServiceView, reason: &'static str, note: String) -> Warning {
    Warning { namespace: svc.namespace.clone(), service: svc.name.clone(), reason, note }
}

fn namespace_of(key: &str) -> Option<&str> {
    key.split_once('/').map(|(ns, _)| ns)
}

/// What discovery should do, given every labelled Service and every AgentTool. `in_scope` tells
/// whether a namespace is one this operator discovers in.
pub fn plan(services: &[ServiceView], tools: &[ExistingTool], in_scope: &dyn Fn(&str) -> bool) -> Plan {
    let mut out = Plan::default();
    let mut claims: BTreeMap<&str, Vec<&ServiceView>> = BTreeMap::new();
    for svc in services.iter().filter(|s| in_scope(&s.namespace)) {
        if valid_tool_name(&svc.tool) {
            claims.entry(svc.tool.as_str()).or_default().push(svc);
        } else {
            out.warnings.push(warn(
                svc,
                "InvalidToolName",
                format!(
                    "label {TOOL_LABEL}={:?} is not a valid AgentTool name (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters): no AgentTool is discovered from this Service",
                    svc.tool
                ),
            ));
        }
    }
    for list in claims.values_mut() {
        list.sort_by_key(|s| s.key());
    }
    let by_name: BTreeMap<&str, &ExistingTool> = tools.iter().map(|t| (t.name.as_str(), t)).collect();
    let ours = |t: &ExistingTool| t.discovered && t.discovered_from.as_deref().and_then(namespace_of).is_some_and(in_scope);
    let names: BTreeSet<&str> = claims.keys().copied().chain(tools.iter().filter(|t| ours(t)).map(|t| t.name.as_str())).collect();

    for name in names {
        let claimants: &[&ServiceView] = claims.get(name).map(Vec::as_slice).unwrap_or_default();
        let keys = || named(claimants.iter().map(|s| s.key()).collect());
        // Few claimants: each is told who the others are. Many: each is told how to list them, in
        // a note no other claimant's coming or going changes. Listing every claimant in every
        // note cost O(N²) bytes and, on each new claimant, a new Event for every one of them
        // (tests.rs a_thousand_services_claiming_one_name_cost_bounded_notes_and_one_more_tells_only_itself).
        let many = claimants.len() > MAX_CLAIMANTS_NAMED;
        let listing = format!("several Services (kubectl get services -A -l {TOOL_LABEL}={name})");
        match by_name.get(name).copied() {
            Some(tool) if !tool.discovered => {
                for svc in claimants {
                    out.warnings.push(warn(
                        svc,
                        "ToolNameTaken",
                        format!("name taken by a hand-written AgentTool {name} (it has no {DISCOVERED} label): it is left as it is and nothing is discovered from this Service"),
                    ));
                }
            }
            Some(tool) if !ours(tool) => {
                let from = tool.discovered_from.as_deref().unwrap_or("an unknown Service");
                for svc in claimants {
                    out.warnings.push(warn(
                        svc,
                        "ToolNameTaken",
                        format!("name taken by AgentTool {name} discovered from {from}, outside the namespaces this operator discovers in: it is left as it is"),
                    ));
                }
            }
            Some(tool) => {
                let from = tool.discovered_from.clone().unwrap_or_default();
                let incumbent = claimants.iter().find(|s| s.key() == from);
                let others: Vec<String> = claimants.iter().map(|s| s.key()).filter(|k| *k != from).collect();
                match incumbent {
                    Some(svc) if others.is_empty() => apply(&mut out, svc, Some(tool), None),
                    Some(svc) => {
                        let conflict = |who: &str, others: &str| {
                            format!(
                                "{who} all claim AgentTool {name} with label {TOOL_LABEL}: it stays discovered from {from} but is not \
                                 Ready until the label is removed from {others}"
                            )
                        };
                        let note = conflict(&format!("Services {}", keys()), &named(others));
                        apply(&mut out, svc, Some(tool), Some(note.clone()));
                        let told = if many { conflict(&listing, &format!("all but {from}")) } else { note };
                        out.warnings.extend(claimants.iter().map(|s| warn(s, "ToolNameConflict", told.clone())));
                    }
                    None if claimants.is_empty() => out.writes.push(Write::Delete {
                        name: name.to_string(),
                        uid: tool.uid.clone(),
                        from: from.clone(),
                        why: format!("Service {from} no longer carries label {TOOL_LABEL}={name}"),
                    }),
                    // Never handed over: the claimant may be a squatter waiting for this moment.
                    None => {
                        let orphaned = |who: &str| {
                            format!(
                                "AgentTool {name} was discovered from Service {from}, which no longer carries label {TOOL_LABEL}={name}, \
                                 and {who} claim the name: a tool never moves to another Service by itself. It stays, not Ready, until \
                                 {from} claims it again or an admin deletes it (kubectl delete agenttool {name}), after which a sole \
                                 claimant gets a new one"
                            )
                        };
                        let note = orphaned(&format!("Services {}", keys()));
                        keep_orphan(&mut out, tool, &from, note.clone());
                        let told = if many { orphaned(&listing) } else { note };
                        out.warnings.extend(claimants.iter().map(|s| warn(s, "ToolNameConflict", told.clone())));
                    }
                }
            }
            None => match claimants {
                [] => {}
                [svc] => apply(&mut out, svc, None, None),
                _ => {
                    let who = if many { listing.clone() } else { format!("Services {}", keys()) };
                    let note = format!("{who} all claim AgentTool {name} with label {TOOL_LABEL}: none is created until only one does");
                    out.warnings.extend(claimants.iter().map(|s| warn(s, "ToolNameConflict", note.clone())));
                }
            },
        }
    }
    out
}

/// `keys` joined, the first [`MAX_CLAIMANTS_NAMED`] named and the rest counted: a note of one
/// object (the tool's conflict annotation and conditions) stays small however many claim.
fn named(keys: Vec<String>) -> String {
    if keys.len() <= MAX_CLAIMANTS_NAMED {
        return keys.join(", ");
    }
    format!("{} and {} more", keys[..MAX_CLAIMANTS_NAMED].join(", "), keys.len() - MAX_CLAIMANTS_NAMED)
}

/// Applies what `svc` describes (not Ready while `conflict` says who else claims it) unless
/// `existing` already says exactly that, and warns about every bad annotation.
fn apply(out: &mut Plan, svc: &ServiceView, existing: Option<&ExistingTool>, conflict: Option<String>) {
    let (mut desired, problems) = desired_tool(svc);
    desired.conflict = conflict;
    for problem in problems {
        out.warnings.push(warn(
            svc,
            "InvalidToolAnnotation",
            format!("{problem}: AgentTool {} is not Ready until it is fixed", desired.name),
        ));
    }
    // Only what discovery sets is compared: credentials added to a discovered tool by hand are
    // not discovery's to remove, and comparing them would re-apply on every pass.
    let unchanged = existing.is_some_and(|t| {
        t.discovered
            && t.discovered_from.as_deref() == Some(desired.from.as_str())
            && t.discovery_error == desired.error
            && t.discovery_conflict == desired.conflict
            && AgentToolSpec { credentials: None, ..t.spec.clone() } == desired.spec
    });
    if !unchanged {
        out.writes.push(Write::Apply { tool: Box::new(desired), uid: existing.and_then(|t| t.uid.clone()), create: existing.is_none() });
    }
}

/// Keeps a tool whose Service let go while others claim its name: same Service, same spec, not
/// Ready with `conflict` saying why.
fn keep_orphan(out: &mut Plan, tool: &ExistingTool, from: &str, conflict: String) {
    if tool.discovery_conflict.as_deref() == Some(conflict.as_str()) {
        return;
    }
    let spec = AgentToolSpec { credentials: None, ..tool.spec.clone() };
    let desired = DesiredTool {
        name: tool.name.clone(),
        from: from.to_string(),
        spec,
        error: tool.discovery_error.clone(),
        conflict: Some(conflict),
    };
    out.writes.push(Write::Apply { tool: Box::new(desired), uid: tool.uid.clone(), create: false });
}

mod selector;
mod shell;
#[cfg(test)]
mod tests;

pub use selector::parse_namespace_selector;
pub use shell::{run, watch_namespaces};
