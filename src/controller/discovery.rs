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
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use super::{Context, RESYNC, UNSYNCED_RETRY};
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
    Apply { tool: DesiredTool, uid: Option<String>, create: bool },
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
        let keys = || claimants.iter().map(|s| s.key()).collect::<Vec<_>>().join(", ");
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
                        let note = format!(
                            "Services {} all claim AgentTool {name} with label {TOOL_LABEL}: it stays discovered from {from} but is not \
                             Ready until the label is removed from {}",
                            keys(),
                            others.join(", ")
                        );
                        apply(&mut out, svc, Some(tool), Some(note.clone()));
                        out.warnings.extend(claimants.iter().map(|s| warn(s, "ToolNameConflict", note.clone())));
                    }
                    None if claimants.is_empty() => out.writes.push(Write::Delete {
                        name: name.to_string(),
                        uid: tool.uid.clone(),
                        from: from.clone(),
                        why: format!("Service {from} no longer carries label {TOOL_LABEL}={name}"),
                    }),
                    // Never handed over: the claimant may be a squatter waiting for this moment.
                    None => {
                        let note = format!(
                            "AgentTool {name} was discovered from Service {from}, which no longer carries label {TOOL_LABEL}={name}, and \
                             Services {} claim the name: a tool never moves to another Service by itself. It stays, not Ready, until \
                             {from} claims it again or an admin deletes it (kubectl delete agenttool {name}), after which a sole \
                             claimant gets a new one",
                            keys()
                        );
                        keep_orphan(&mut out, tool, &from, note.clone());
                        out.warnings.extend(claimants.iter().map(|s| warn(s, "ToolNameConflict", note.clone())));
                    }
                }
            }
            None => match claimants {
                [] => {}
                [svc] => apply(&mut out, svc, None, None),
                _ => {
                    let note = format!(
                        "Services {} all claim AgentTool {name} with label {TOOL_LABEL}: none is created until only one does",
                        keys()
                    );
                    out.warnings.extend(claimants.iter().map(|s| warn(s, "ToolNameConflict", note.clone())));
                }
            },
        }
    }
    out
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
        out.writes.push(Write::Apply { tool: desired, uid: existing.and_then(|t| t.uid.clone()), create: existing.is_none() });
    }
}

/// Keeps a tool whose Service let go while others claim its name: same Service, same spec, not
/// Ready with `conflict` saying why.
fn keep_orphan(out: &mut Plan, tool: &ExistingTool, from: &str, conflict: String) {
    if tool.discovery_conflict.as_deref() == Some(conflict.as_str()) {
        return;
    }
    let spec = AgentToolSpec { credentials: None, ..tool.spec.clone() };
    let desired = DesiredTool { name: tool.name.clone(), from: from.to_string(), spec, error: tool.discovery_error.clone(), conflict: Some(conflict) };
    out.writes.push(Write::Apply { tool: desired, uid: tool.uid.clone(), create: false });
}

/// Checks a `--discovery-namespace-selector` value: a label selector such as `team=tools`,
/// `env in (prod,staging)`, `!legacy` or `agentgate.dev/discovery`.
pub fn parse_namespace_selector(selector: &str) -> Result<String, String> {
    let selector = selector.trim();
    if selector.is_empty() {
        return Err("the selector is empty; leave the flag out to turn discovery off (`kubernetes.io/metadata.name` matches every namespace)".into());
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

// ---------------------------------------------------------------------------------------------
// The shell.

/// Bursts of watch events (a relist, a `kubectl apply` of many Services) are decided once.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A failed write is tried again after this long.
const RETRY: Duration = Duration::from_secs(5);

/// Runs discovery until dropped. `trigger` is notified by the Service and AgentTool watches.
pub async fn run(ctx: Arc<Context>, trigger: Arc<Notify>) {
    // Opt-in: without a selector no namespace is discovered in, and nothing is touched.
    if ctx.settings.discovery_namespace_selector.is_none() {
        tracing::info!("tool discovery is off (no --discovery-namespace-selector)");
        return std::future::pending().await;
    }
    let namespaces = ctx.settings.discovery_namespace_selector.clone().map(|selector| {
        let (store, writer) = reflector::store::<PartialObjectMeta<Namespace>>();
        // Only the names of matching namespaces are needed: their metadata, selected by the server.
        let stream = watcher(Api::<PartialObjectMeta<Namespace>>::all(ctx.client.clone()), watcher::Config::default().labels(&selector))
            .default_backoff()
            .reflect(writer)
            .touched_objects();
        (store, stream)
    });
    let (store, namespace_watch) = match namespaces {
        Some((store, stream)) => {
            let trigger = trigger.clone();
            let watch = stream.for_each(move |_| {
                trigger.notify_one();
                std::future::ready(())
            });
            (Some(store), futures::FutureExt::boxed(watch))
        }
        None => (None, futures::FutureExt::boxed(futures::future::pending::<()>())),
    };
    tokio::select! {
        _ = namespace_watch => {}
        _ = discover(ctx, trigger, store) => {}
    }
}

async fn discover(ctx: Arc<Context>, trigger: Arc<Notify>, namespaces: Option<Store<PartialObjectMeta<Namespace>>>) {
    let mut memory = Memory::default();
    loop {
        tokio::select! {
            _ = trigger.notified() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
        use futures::FutureExt;
        let ready = |r: Option<Result<(), reflector::store::WriterDropped>>| matches!(r, Some(Ok(())));
        let synced = namespaces.as_ref().is_none_or(|s| ready(s.wait_until_ready().now_or_never()))
            && ready(ctx.caches.services.wait_until_ready().now_or_never())
            && ready(ctx.caches.tools.wait_until_ready().now_or_never());
        if !synced {
            tokio::time::sleep(UNSYNCED_RETRY).await;
            trigger.notify_one();
            continue;
        }
        if !pass(&ctx, namespaces.as_ref(), &mut memory).await {
            let trigger = trigger.clone();
            tokio::spawn(async move {
                tokio::time::sleep(RETRY).await;
                trigger.notify_one();
            });
        }
    }
}

/// What earlier passes did.
#[derive(Default)]
struct Memory {
    /// Warnings already published, per Service, so that each is published once while it lasts.
    reported: BTreeMap<(String, String), BTreeSet<(&'static str, String)>>,
    /// Per tool, the last applied tool and the uid and generation the apply returned. When the
    /// plan asks for the same again and the tool's spec has not changed since, the difference the
    /// plan saw lies in fields another manager owns (a description set by hand, say), which an
    /// apply leaves as they are: applying again would only repeat a no-op on every pass.
    applied: BTreeMap<String, (DesiredTool, Mark)>,
}

/// What discovery sets on a tool, besides its spec, with the generation that tells a spec change.
#[derive(Clone, Debug, PartialEq)]
struct Mark {
    uid: Option<String>,
    generation: Option<i64>,
    discovered: Option<String>,
    from: Option<String>,
    error: Option<String>,
    conflict: Option<String>,
}

impl Mark {
    fn of(tool: &AgentTool) -> Mark {
        Mark {
            uid: tool.metadata.uid.clone(),
            generation: tool.metadata.generation,
            discovered: tool.labels().get(DISCOVERED).cloned(),
            from: tool.annotations().get(DISCOVERED_FROM).cloned(),
            error: tool.annotations().get(DISCOVERY_ERROR).cloned(),
            conflict: tool.annotations().get(DISCOVERY_CONFLICT).cloned(),
        }
    }
}

/// One decision over the caches, applied. False when a write should be tried again.
async fn pass(ctx: &Context, namespaces: Option<&Store<PartialObjectMeta<Namespace>>>, memory: &mut Memory) -> bool {
    let services: Vec<ServiceView> = ctx.caches.services.state().iter().filter_map(|s| ServiceView::of(s)).collect();
    let tools: Vec<ExistingTool> = ctx.caches.tools.state().iter().map(|t| ExistingTool::of(t)).collect();
    let in_scope = |ns: &str| namespaces.is_none_or(|store| store.get(&ObjectRef::new(ns)).is_some());
    let mut plan = plan(&services, &tools, &in_scope);

    let mut all_done = true;
    let api: Api<AgentTool> = Api::all(ctx.client.clone());
    for write in &plan.writes {
        match write {
            Write::Apply { tool, uid, create } => {
                let cached = ctx.caches.tools.get(&ObjectRef::new(&tool.name)).map(|t| Mark::of(&t));
                if cached.is_some()
                    && memory.applied.get(&tool.name).is_some_and(|(last, mark)| last == tool && Some(mark) == cached.as_ref())
                {
                    continue;
                }
                let (namespace, service) = tool.from.split_once('/').unwrap_or_default();
                let mut metadata = json!({
                    "name": tool.name,
                    "labels": {DISCOVERED: "true"},
                    "annotations": {DISCOVERED_FROM: tool.from},
                });
                if let Some(error) = &tool.error {
                    metadata["annotations"][DISCOVERY_ERROR] = json!(error);
                }
                if let Some(conflict) = &tool.conflict {
                    metadata["annotations"][DISCOVERY_CONFLICT] = json!(conflict);
                }
                if let Some(uid) = uid {
                    // Refused (immutable field) if the tool was deleted and recreated meanwhile.
                    metadata["uid"] = json!(uid);
                }
                let patch = json!({"apiVersion": AgentTool::api_version(&()), "kind": AgentTool::kind(&()), "metadata": metadata, "spec": tool.spec});
                match api.patch(&tool.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
                    Ok(applied) => {
                        let mark = Mark::of(&applied);
                        memory.applied.insert(tool.name.clone(), (tool.clone(), mark.clone()));
                        if cached.as_ref() == Some(&mark) {
                            continue; // a no-op
                        }
                        tracing::info!(tool = %tool.name, from = %tool.from, create, "applied discovered AgentTool");
                        let (reason, note) = if *create {
                            ("ToolDiscovered", format!("created AgentTool {} from this Service", tool.name))
                        } else {
                            ("ToolUpdated", format!("updated AgentTool {} from this Service's labels and annotations", tool.name))
                        };
                        publish(ctx, namespace, service, EventType::Normal, reason, note).await;
                    }
                    Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                        // Retrying cannot help; a change to the Service or the tool triggers anew.
                        tracing::warn!(tool = %tool.name, from = %tool.from, error = %s.message, "discovered AgentTool refused");
                        plan.warnings.push(Warning {
                            namespace: namespace.into(),
                            service: service.into(),
                            reason: "ToolApplyFailed",
                            note: format!("AgentTool {} could not be applied: {}", tool.name, s.message),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(tool = %tool.name, from = %tool.from, error = %e, "applying discovered AgentTool failed; retrying");
                        all_done = false;
                    }
                }
            }
            Write::Delete { name, uid, from, why } => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions { uid: uid.clone(), resource_version: None }),
                    ..DeleteParams::default()
                };
                match api.delete(name, &dp).await {
                    Ok(_) => {
                        tracing::info!(tool = %name, %from, %why, "deleted discovered AgentTool");
                        let (namespace, service) = from.split_once('/').unwrap_or_default();
                        publish(ctx, namespace, service, EventType::Normal, "ToolRemoved", format!("deleted AgentTool {name}: {why}"))
                            .await;
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        tracing::warn!(tool = %name, error = %e, "deleting discovered AgentTool failed; retrying");
                        all_done = false;
                    }
                }
            }
        }
    }

    let mut now: BTreeMap<(String, String), BTreeSet<(&'static str, String)>> = BTreeMap::new();
    for w in plan.warnings {
        now.entry((w.namespace, w.service)).or_default().insert((w.reason, w.note));
    }
    for ((namespace, service), warnings) in &now {
        let before = memory.reported.get(&(namespace.clone(), service.clone()));
        for (reason, note) in warnings.iter().filter(|w| before.is_none_or(|b| !b.contains(*w))) {
            tracing::warn!(%namespace, %service, reason, %note, "tool discovery");
            publish(ctx, namespace, service, EventType::Warning, reason, note.clone()).await;
        }
    }
    memory.reported = now;
    memory.applied.retain(|name, _| {
        plan.writes.iter().any(|w| matches!(w, Write::Apply { tool, .. } if &tool.name == name))
            || ctx.caches.tools.get(&ObjectRef::new(name)).is_some()
    });
    all_done
}

/// An Event on the Service, if it still exists. Each is a new Event: the shared Recorder folds
/// Events of one reason about one object into a series that keeps the first note, which would
/// hide, say, a conflict's new state. `pass` publishes each warning once while it lasts.
async fn publish(ctx: &Context, namespace: &str, service: &str, type_: EventType, reason: &str, note: String) {
    let Some(svc) = ctx.caches.services.get(&ObjectRef::<Service>::new(service).within(namespace)) else { return };
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Discover".into(), secondary: None };
    let reporter = Reporter { controller: "agentgate".into(), instance: std::env::var("POD_NAME").ok() };
    if let Err(err) = Recorder::new(ctx.client.clone(), reporter).publish(&event, &svc.object_ref(&())).await {
        tracing::warn!(%namespace, %service, %err, "could not publish Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, tool: &str, annotations: &[(&str, &str)]) -> ServiceView {
        ServiceView {
            namespace: ns.into(),
            name: name.into(),
            tool: tool.into(),
            annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ports: vec![(Some("http".into()), 8080), (Some("metrics".into()), 9090)],
        }
    }

    fn good(ns: &str, name: &str, tool: &str) -> ServiceView {
        svc(ns, name, tool, &[(RATE_LIMIT, "60")])
    }

    fn existing(desired: &DesiredTool, discovered: bool) -> ExistingTool {
        ExistingTool {
            name: desired.name.clone(),
            uid: Some(format!("uid-{}", desired.name)),
            discovered,
            discovered_from: discovered.then(|| desired.from.clone()),
            discovery_error: desired.error.clone(),
            discovery_conflict: desired.conflict.clone(),
            spec: desired.spec.clone(),
        }
    }

    fn everywhere(_: &str) -> bool {
        true
    }

    fn applied(plan: &Plan) -> Vec<(String, String, bool)> {
        plan.writes
            .iter()
            .filter_map(|w| match w {
                Write::Apply { tool, create, .. } => Some((tool.name.clone(), tool.from.clone(), *create)),
                Write::Delete { .. } => None,
            })
            .collect()
    }

    fn deleted(plan: &Plan) -> Vec<String> {
        plan.writes
            .iter()
            .filter_map(|w| match w {
                Write::Delete { name, .. } => Some(name.clone()),
                Write::Apply { .. } => None,
            })
            .collect()
    }

    fn warnings(plan: &Plan) -> Vec<(String, &'static str)> {
        plan.warnings.iter().map(|w| (format!("{}/{}", w.namespace, w.service), w.reason)).collect()
    }

    #[test]
    fn spec_comes_from_the_annotations() {
        let s = svc(
            "tools",
            "bandit",
            "bandit-scanner",
            &[(TOOL_TYPE, "mcp"), (RATE_LIMIT, " 60 "), (PORT, "metrics"), (DESCRIPTION, "Python security scanner")],
        );
        let (d, problems) = desired_tool(&s);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(d.name, "bandit-scanner");
        assert_eq!(d.from, "tools/bandit");
        assert_eq!(d.error, None);
        assert_eq!(d.spec.tool_type, ToolType::Mcp);
        assert_eq!(d.spec.rate_limit, 60);
        assert_eq!(d.spec.description.as_deref(), Some("Python security scanner"));
        assert_eq!(d.spec.endpoint.service, Some(ServiceEndpoint { namespace: "tools".into(), name: "bandit".into(), port: 9090 }));
        assert_eq!(d.spec.endpoint.url, None);
    }

    #[test]
    fn defaults_are_type_service_and_the_first_port() {
        let (d, problems) = desired_tool(&good("tools", "bandit", "bandit"));
        assert!(problems.is_empty());
        assert_eq!(d.spec.tool_type, ToolType::Service);
        assert_eq!(d.spec.endpoint.service.unwrap().port, 8080);
        assert_eq!(d.spec.description, None);
        let (d, _) = desired_tool(&svc("tools", "bandit", "bandit", &[(RATE_LIMIT, "5"), (PORT, "9090")]));
        assert_eq!(d.spec.endpoint.service.unwrap().port, 9090);
    }

    #[test]
    fn bad_annotations_name_the_annotation_and_value_and_fall_back_to_placeholders() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[(RATE_LIMIT, "ten")], "annotation agentgate.dev/rate-limit=\"ten\" is not a whole number from 1 to 1000000"),
            (&[(RATE_LIMIT, "0")], "agentgate.dev/rate-limit=\"0\""),
            (&[(RATE_LIMIT, "-5")], "agentgate.dev/rate-limit=\"-5\""),
            (&[(RATE_LIMIT, "2000000")], "agentgate.dev/rate-limit=\"2000000\""),
            (&[], "annotation agentgate.dev/rate-limit is missing"),
            (&[(RATE_LIMIT, "5"), (TOOL_TYPE, "grpc")], "annotation agentgate.dev/tool-type=\"grpc\" is not one of api, service, mcp"),
            (
                &[(RATE_LIMIT, "5"), (PORT, "7000")],
                "annotation agentgate.dev/port=\"7000\" names no port of the Service (its ports: http=8080, metrics=9090)",
            ),
            (&[(RATE_LIMIT, "5"), (PORT, "grpc")], "annotation agentgate.dev/port=\"grpc\" names no port"),
        ];
        for (annotations, fragment) in cases {
            let (d, problems) = desired_tool(&svc("tools", "bandit", "bandit", annotations));
            assert_eq!(problems.len(), 1, "{annotations:?}: {problems:?}");
            assert!(problems[0].contains(fragment), "{annotations:?}: {:?} lacks {fragment:?}", problems[0]);
            let error = d.error.expect("error set");
            assert!(error.starts_with("Service tools/bandit: ") && error.contains(fragment), "{error}");
            assert!(d.spec.rate_limit >= 1);
            assert!(d.spec.endpoint.service.unwrap().port >= 1);
        }
        let mut no_ports = good("tools", "headless", "headless");
        no_ports.ports.clear();
        let (d, problems) = desired_tool(&no_ports);
        assert!(problems[0].contains("the Service has no ports"), "{problems:?}");
        assert_eq!(d.spec.endpoint.service.unwrap().port, 1);
    }

    #[test]
    fn a_long_description_is_cut_to_what_the_schema_allows() {
        let long = "é".repeat(2000);
        let (d, problems) = desired_tool(&svc("tools", "t", "t", &[(RATE_LIMIT, "1"), (DESCRIPTION, &long)]));
        assert!(problems.is_empty());
        assert_eq!(d.spec.description.unwrap().chars().count(), 1024);
    }

    #[test]
    fn a_labelled_service_yields_a_tool_and_nothing_more_once_it_matches() {
        let s = good("tools", "bandit", "bandit");
        let plan1 = plan(std::slice::from_ref(&s), &[], &everywhere);
        assert_eq!(applied(&plan1), vec![("bandit".into(), "tools/bandit".into(), true)]);
        assert!(plan1.warnings.is_empty());
        let (d, _) = desired_tool(&s);
        let plan2 = plan(std::slice::from_ref(&s), &[existing(&d, true)], &everywhere);
        assert_eq!(plan2, Plan::default(), "nothing to do when the tool already matches");
    }

    #[test]
    fn annotation_changes_are_followed() {
        let s = good("tools", "bandit", "bandit");
        let (d, _) = desired_tool(&s);
        let mut changed = s.clone();
        changed.annotations.insert(RATE_LIMIT.into(), "120".into());
        let p = plan(&[changed], &[existing(&d, true)], &everywhere);
        match p.writes.as_slice() {
            [Write::Apply { tool, uid, create: false }] => {
                assert_eq!(tool.spec.rate_limit, 120);
                assert_eq!(uid.as_deref(), Some("uid-bandit"), "an update is guarded by the uid seen");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_annotation_yields_a_tool_marked_with_the_error_and_a_warning() {
        let s = svc("tools", "bandit", "bandit", &[(RATE_LIMIT, "ten")]);
        let p = plan(&[s], &[], &everywhere);
        match p.writes.as_slice() {
            [Write::Apply { tool, .. }] => assert!(tool.error.as_deref().unwrap().contains("rate-limit=\"ten\"")),
            other => panic!("{other:?}"),
        }
        assert_eq!(warnings(&p), vec![("tools/bandit".to_string(), "InvalidToolAnnotation")]);
        assert!(
            p.warnings[0].note.contains("agentgate.dev/rate-limit=\"ten\"") && p.warnings[0].note.contains("AgentTool bandit is not Ready"),
            "{}",
            p.warnings[0].note
        );
    }

    #[test]
    fn a_label_value_that_cannot_be_a_tool_name_yields_nothing_but_a_warning() {
        let p = plan(&[good("tools", "bandit", "Bandit_Scanner")], &[], &everywhere);
        assert!(p.writes.is_empty());
        assert_eq!(warnings(&p), vec![("tools/bandit".to_string(), "InvalidToolName")]);
        assert!(p.warnings[0].note.contains("\"Bandit_Scanner\""));
        for (name, ok) in
            [("a", true), ("bandit-2", true), ("", false), ("-a", false), ("a-", false), ("a.b", false), (&"a".repeat(64), false)]
        {
            assert_eq!(valid_tool_name(name), ok, "{name:?}");
        }
    }

    #[test]
    fn the_tool_goes_when_the_label_or_the_service_does() {
        let s = good("tools", "bandit", "bandit");
        let (d, _) = desired_tool(&s);
        let p = plan(&[], &[existing(&d, true)], &everywhere);
        assert_eq!(
            p.writes,
            vec![Write::Delete {
                name: "bandit".into(),
                uid: Some("uid-bandit".into()),
                from: "tools/bandit".into(),
                why: "Service tools/bandit no longer carries label agentgate.dev/tool=bandit".into(),
            }]
        );
        // Relabelled to another name: the old tool goes and the new one comes.
        let p = plan(&[good("tools", "bandit", "bandit-v2")], &[existing(&d, true)], &everywhere);
        assert_eq!(deleted(&p), vec!["bandit".to_string()]);
        assert_eq!(applied(&p), vec![("bandit-v2".into(), "tools/bandit".into(), true)]);
    }

    #[test]
    fn a_hand_written_tool_is_never_touched() {
        let s = good("tools", "bandit", "bandit");
        let (d, _) = desired_tool(&s);
        let mut hand = existing(&d, false);
        hand.spec.rate_limit = 7;
        let p = plan(&[s], &[hand.clone()], &everywhere);
        assert!(p.writes.is_empty(), "{:?}", p.writes);
        assert_eq!(warnings(&p), vec![("tools/bandit".to_string(), "ToolNameTaken")]);
        assert!(p.warnings[0].note.contains("name taken by a hand-written AgentTool bandit"));
        // Nor deleted when no Service claims its name.
        assert!(plan(&[], &[hand], &everywhere).writes.is_empty());
    }

    #[test]
    fn two_services_claiming_one_name_create_nothing_and_both_are_told() {
        let p = plan(&[good("a", "x", "shared"), good("b", "y", "shared")], &[], &everywhere);
        assert!(p.writes.is_empty());
        assert_eq!(warnings(&p), vec![("a/x".to_string(), "ToolNameConflict"), ("b/y".to_string(), "ToolNameConflict")]);
        assert!(
            p.warnings[0].note.contains("Services a/x, b/y all claim AgentTool shared") && p.warnings[0].note.contains("none is created")
        );
    }

    #[test]
    fn a_second_claimant_makes_the_tool_not_ready_and_never_takes_it_over() {
        let first = good("a", "x", "shared");
        let (d, _) = desired_tool(&first);
        let mut second = good("b", "y", "shared");
        second.annotations.insert(RATE_LIMIT.into(), "999".into());
        let p = plan(&[second.clone(), first.clone()], &[existing(&d, true)], &everywhere);
        // Still the incumbent's spec, now marked with the conflict (so not Ready).
        let Some(Write::Apply { tool, create: false, .. }) = p.writes.first() else { panic!("{:?}", p.writes) };
        assert_eq!((tool.from.as_str(), &tool.spec), ("a/x", &d.spec));
        let conflict = tool.conflict.clone().expect("conflict marked");
        assert!(conflict.contains("it stays discovered from a/x but is not Ready until the label is removed from b/y"), "{conflict}");
        assert_eq!(warnings(&p), vec![("a/x".to_string(), "ToolNameConflict"), ("b/y".to_string(), "ToolNameConflict")]);
        let marked = ExistingTool { discovery_conflict: Some(conflict), ..existing(&d, true) };
        // The incumbent's own changes are still followed, still in conflict.
        let mut first_changed = first.clone();
        first_changed.annotations.insert(RATE_LIMIT.into(), "61".into());
        let p = plan(&[second.clone(), first_changed], &[marked.clone()], &everywhere);
        assert_eq!(applied(&p), vec![("shared".into(), "a/x".into(), false)]);
        // The squatter lets go: the conflict clears.
        let p = plan(std::slice::from_ref(&first), &[marked.clone()], &everywhere);
        assert!(matches!(p.writes.as_slice(), [Write::Apply { tool, .. }] if tool.conflict.is_none() && tool.from == "a/x"), "{:?}", p.writes);
        assert!(p.warnings.is_empty());

        // The incumbent lets go while the squatter claims: never handed over. The tool stays with
        // a/x, not Ready, and the squatter is told.
        let p = plan(std::slice::from_ref(&second), &[existing(&d, true)], &everywhere);
        let Some(Write::Apply { tool, create: false, .. }) = p.writes.first() else { panic!("{:?}", p.writes) };
        assert_eq!((tool.from.as_str(), &tool.spec), ("a/x", &d.spec), "the tool must not move to b/y");
        let orphaned = tool.conflict.clone().unwrap();
        assert!(orphaned.contains("a tool never moves to another Service by itself") && orphaned.contains("kubectl delete agenttool shared"));
        assert_eq!(warnings(&p), vec![("b/y".to_string(), "ToolNameConflict")]);
        // Once marked, nothing more is written, however often discovery looks.
        let marked = ExistingTool { discovery_conflict: Some(orphaned), ..existing(&d, true) };
        assert!(plan(std::slice::from_ref(&second), &[marked.clone()], &everywhere).writes.is_empty());
        // The owner's Service comes back: it is the tool's again, conflict on.
        let p = plan(&[second.clone(), first.clone()], &[marked], &everywhere);
        assert!(matches!(p.writes.as_slice(), [Write::Apply { tool, .. }] if tool.from == "a/x" && tool.conflict.is_some()));
        // After an admin deleted the tool, a sole claimant gets a new one.
        let p = plan(&[second], &[], &everywhere);
        assert_eq!(applied(&p), vec![("shared".into(), "b/y".into(), true)]);
    }

    #[test]
    fn when_the_source_lets_go_and_several_claim_none_gets_it() {
        let (d, _) = desired_tool(&good("a", "x", "shared"));
        let p = plan(&[good("b", "y", "shared"), good("c", "z", "shared")], &[existing(&d, true)], &everywhere);
        assert!(deleted(&p).is_empty());
        assert!(matches!(p.writes.as_slice(), [Write::Apply { tool, .. }] if tool.from == "a/x" && tool.conflict.is_some()));
        assert_eq!(warnings(&p).len(), 2);
    }

    #[test]
    fn only_namespaces_in_scope_are_discovered_and_tools_from_elsewhere_are_left_alone() {
        let only_tools = |ns: &str| ns == "tools";
        let p = plan(&[good("tools", "a", "a"), good("other", "b", "b")], &[], &only_tools);
        assert_eq!(applied(&p), vec![("a".into(), "tools/a".into(), true)]);
        // A tool discovered from a namespace out of scope is neither deleted nor taken over.
        let (d, _) = desired_tool(&good("other", "b", "b"));
        let p = plan(&[], &[existing(&d, true)], &only_tools);
        assert!(p.writes.is_empty());
        let p = plan(&[good("tools", "c", "b")], &[existing(&d, true)], &only_tools);
        assert!(p.writes.is_empty());
        assert_eq!(warnings(&p), vec![("tools/c".to_string(), "ToolNameTaken")]);
        assert!(p.warnings[0].note.contains("discovered from other/b, outside the namespaces"));
    }

    #[test]
    fn credentials_added_to_a_discovered_tool_by_hand_are_left_alone() {
        let s = good("tools", "bandit", "bandit");
        let (d, _) = desired_tool(&s);
        let mut tool = existing(&d, true);
        tool.spec.credentials = Some(crate::api::ToolCredentials {
            secret_ref: crate::api::NamespacedSecretKey { namespace: "tools".into(), name: "bandit-key".into(), key: "token".into() },
        });
        assert_eq!(plan(&[s], &[tool], &everywhere), Plan::default());
    }

    #[test]
    fn a_fixed_annotation_clears_the_error() {
        let bad = svc("tools", "bandit", "bandit", &[(RATE_LIMIT, "ten")]);
        let (d, _) = desired_tool(&bad);
        let p = plan(&[good("tools", "bandit", "bandit")], &[existing(&d, true)], &everywhere);
        match p.writes.as_slice() {
            [Write::Apply { tool, .. }] => {
                assert_eq!(tool.error, None);
                assert_eq!(tool.spec.rate_limit, 60);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn namespace_selectors_are_checked() {
        for ok in [
            "team=tools",
            "agentgate.dev/discovery",
            "!legacy",
            "env in (prod, staging)",
            "env notin (dev)",
            "a=b,c!=d",
            "a==b",
            "example.com/x=",
            "k in ()",
        ] {
            assert!(parse_namespace_selector(ok).is_ok(), "{ok:?}: {:?}", parse_namespace_selector(ok));
        }
        for bad in ["", "  ", "a=b,", "=b", "a=b c", "Bad_Prefix/x=y", "a in (b", "a in b", "a=-b", "a b"] {
            assert!(parse_namespace_selector(bad).is_err(), "{bad:?} accepted");
        }
    }
}
