//! Decoding watched objects one at a time, so that no object a tenant can store stops a cache.
//!
//! kube's watcher decodes a whole list page (or watch event) as one document: one object that
//! does not decode fails the list, the cache never syncs, and a restarted operator serves nobody.
//! Two ways a tenant gets there: an `input` nested ~118 levels deep is stored by the apiserver,
//! but its managedFields (`fieldsV1` nests a few levels deeper than the object) pass serde_json's
//! recursion limit of 128; and an object written by a newer version (a phase this binary does not
//! know). kube's `DeserializeGuard` only catches the second: it buffers the object through
//! `deserialize_any`, which counts depth against the whole document.
//!
//! [`Decoded`] takes each object as raw JSON text first: serde_json skips a raw value without
//! counting depth. The object is then decoded on its own, its managedFields skipped the same way
//! (no cache reads them), so only the object's own content counts against the limit, and any
//! failure is this object's alone.

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// An object as watched: decoded, or why not (with whatever metadata could be read).
#[derive(Clone, Debug)]
pub struct Decoded<K>(pub Result<K, Box<Undecodable>>);

#[derive(Clone, Debug)]
pub struct Undecodable {
    pub error: String,
    pub metadata: ObjectMeta,
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Decoded<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        Ok(Decoded(decode(raw.get())))
    }
}

/// Decodes one object's JSON text without its managedFields.
pub fn decode<K: DeserializeOwned>(text: &str) -> Result<K, Box<Undecodable>> {
    let undecodable = |error: String| {
        // Metadata is read on its own, so a name is known even when the rest is too deep or unknown.
        let metadata = serde_json::from_str::<MetadataOnly>(text)
            .ok()
            .and_then(|m| m.metadata)
            .and_then(|m| serde_json::from_value::<ObjectMeta>(Value::Object(m.0)).ok())
            .unwrap_or_default();
        Box::new(Undecodable { error, metadata })
    };
    let value = serde_json::from_str::<WithoutManagedFields>(text).map_err(|e| undecodable(e.to_string()))?;
    K::deserialize(Value::Object(value.0)).map_err(|e| undecodable(e.to_string()))
}

#[derive(Deserialize)]
struct MetadataOnly {
    metadata: Option<MetaWithoutManagedFields>,
}

/// A whole object as JSON, its `metadata.managedFields` left out.
struct WithoutManagedFields(Map<String, Value>);
/// An object's metadata as JSON, its `managedFields` left out.
struct MetaWithoutManagedFields(Map<String, Value>);

impl<'de> Deserialize<'de> for WithoutManagedFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MapSkipping { outer: true }).map(WithoutManagedFields)
    }
}

impl<'de> Deserialize<'de> for MetaWithoutManagedFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MapSkipping { outer: false }).map(MetaWithoutManagedFields)
    }
}

/// Collects a JSON object: at the top (`outer`), `metadata` is read without managedFields; in
/// metadata, `managedFields` is skipped (serde_json skips without counting depth).
struct MapSkipping {
    outer: bool,
}

impl<'de> Visitor<'de> for MapSkipping {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match (self.outer, key.as_ref()) {
                (true, "metadata") => {
                    let meta: MetaWithoutManagedFields = map.next_value()?;
                    out.insert(key.into_owned(), Value::Object(meta.0));
                }
                (false, "managedFields") => {
                    map.next_value::<IgnoredAny>()?;
                }
                _ => {
                    let value: Value = map.next_value()?;
                    out.insert(key.into_owned(), value);
                }
            }
        }
        Ok(out)
    }
}

impl<K: Resource> Resource for Decoded<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        self.0.as_ref().map_or_else(|err| &err.metadata, K::meta)
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.as_mut().map_or_else(|err| &mut err.metadata, K::meta_mut)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::AgentJob;

    fn job(input: Value, phase: &str) -> Value {
        json!({"apiVersion": "agentgate.dev/v1alpha1", "kind": "AgentJob",
            "metadata": {"name": "j", "namespace": "team", "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:input": nested(200)}}}]},
            "spec": {"category": "core", "agents": {"primary": {"name": "a", "image": "i", "model": "m"}}, "budget": {"maxCostUSD": "1.00"}, "input": input},
            "status": {"phase": phase}})
    }

    fn nested(levels: usize) -> Value {
        (0..levels).fold(json!(1), |v, _| json!({ "a": v }))
    }

    /// A list as the apiserver sends it: one object too deep, one of a phase this version does not
    /// know (read as none: `api::agent_job_status::known_phase`), one good.
    #[test]
    fn one_bad_object_fails_alone() {
        let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "7"},
            "items": [job(nested(300), "Pending"), job(json!({}), "Paused"), job(nested(100), "Pending")]});
        // `to_string` and `from_str`: serde_json's own writer and reader, no Value recursion.
        let text = serde_json::to_string(&list).unwrap();
        assert!(serde_json::from_str::<kube::core::ObjectList<AgentJob>>(&text).is_err(), "undecodable as one document");
        let decoded: kube::core::ObjectList<Decoded<AgentJob>> = serde_json::from_str(&text).unwrap();
        let results: Vec<_> = decoded.items.into_iter().map(|d| d.0).collect();
        let too_deep = results[0].as_ref().unwrap_err();
        assert!(too_deep.error.contains("recursion limit"), "{}", too_deep.error);
        assert_eq!(too_deep.metadata.name.as_deref(), Some("j"));
        let newer = results[1].as_ref().unwrap();
        assert_eq!(newer.status.as_ref().map(|s| s.phase), Some(None), "an unknown phase is read, as none");
        let good = results[2].as_ref().unwrap();
        assert!(good.metadata.managed_fields.is_none(), "managedFields are never decoded");
    }
}

/// Where an undecodable object is reported: once per object and problem, however many watches
/// see it (AgentTools are watched twice) and however often they relist.
#[derive(Clone)]
pub struct Reporter {
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// The current term of leadership's Event queue; None while standing by. The watches outlive
    /// terms (watches.rs), and a standby writes nothing, Events included.
    events: std::sync::Arc<std::sync::RwLock<Option<super::events::EventQueue>>>,
    /// The problem last reported of each object (kind/namespace/name).
    reported: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
}

impl Reporter {
    /// Beyond this many undecodable objects remembered, forget them all: the worst that costs
    /// is one more report of each.
    const CAP: usize = 10_000;

    pub fn new(metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        Reporter { metrics, events: Default::default(), reported: Default::default() }
    }

    /// Reports through `events` from now on (a term begins), or not at all (None: it ended).
    pub fn lead(&self, events: Option<super::events::EventQueue>) {
        *self.events.write().unwrap_or_else(std::sync::PoisonError::into_inner) = events;
    }

    /// The current term's Event queue (None while standing by), for the other kept watches that
    /// publish Events (the price table's, price_table.rs).
    pub fn term_events(&self) -> Option<super::events::EventQueue> {
        self.events.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// True the first time this problem of this object is seen.
    fn first_time(&self, key: String, problem: &str) -> bool {
        let mut reported = self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if reported.get(&key).is_some_and(|p| p == problem) {
            return false;
        }
        if reported.len() >= Self::CAP {
            reported.clear();
        }
        reported.insert(key, problem.to_string());
        true
    }

    fn report<K: Resource<DynamicType = ()>>(&self, bad: &Undecodable) {
        let kind = K::kind(&());
        let (namespace, name) = (bad.metadata.namespace.as_deref().unwrap_or_default(), bad.metadata.name.as_deref().unwrap_or_default());
        // A standby neither reports nor remembers it: the leader reports it once it changes
        // (what a standby saw is not replayed at a new term).
        let Some(events) = self.events.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone() else {
            return;
        };
        if !self.first_time(format!("{kind}/{namespace}/{name}"), &bad.error) {
            return;
        }
        tracing::warn!(kind = %kind, namespace, name, error = %bad.error, "object left out of the cache: it does not decode");
        self.metrics.count_undecodable(&kind);
        if bad.metadata.name.is_some() {
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some(K::api_version(&()).into_owned()),
                kind: Some(kind.into_owned()),
                namespace: bad.metadata.namespace.clone(),
                name: bad.metadata.name.clone(),
                uid: bad.metadata.uid.clone(),
                ..Default::default()
            };
            let note = format!(
                "The operator cannot read this object and ignores it until it changes: {}. Recreate it within the documented limits, or run the operator version that wrote it.",
                crate::domain::validate::bounded_to(&bad.error, 700)
            );
            events.try_record(&reference, kube::runtime::events::EventType::Warning, "Undecodable", note, "Decode");
        }
    }
}

/// Turns a watch of [`Decoded`] objects into one of the objects that decode: each one that does
/// not is reported and left out, and a cached copy of it (from before it changed) is dropped, so
/// the cache never holds a version the apiserver has replaced.
pub fn decoded_only<K>(
    events: impl futures::Stream<Item = Result<kube::runtime::watcher::Event<Decoded<K>>, kube::runtime::watcher::Error>>,
    cache: kube::runtime::reflector::Store<K>,
    reporter: Reporter,
) -> impl futures::Stream<Item = Result<kube::runtime::watcher::Event<K>, kube::runtime::watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    use futures::StreamExt;
    use kube::runtime::reflector::ObjectRef;
    use kube::runtime::watcher::Event;
    events.filter_map(move |event| {
        let bad = |bad: Undecodable| {
            reporter.report::<K>(&bad);
            let reference = ObjectRef::<K>::new(bad.metadata.name.as_deref().unwrap_or_default())
                .within(bad.metadata.namespace.as_deref().unwrap_or_default());
            cache.get(&reference).map(|cached| Event::Delete(cached.as_ref().clone()))
        };
        let event = match event {
            Err(err) => Some(Err(err)),
            Ok(Event::Init) => Some(Ok(Event::Init)),
            Ok(Event::InitDone) => Some(Ok(Event::InitDone)),
            Ok(Event::InitApply(Decoded(Ok(obj)))) => Some(Ok(Event::InitApply(obj))),
            Ok(Event::Apply(Decoded(Ok(obj)))) => Some(Ok(Event::Apply(obj))),
            Ok(Event::Delete(Decoded(Ok(obj)))) => Some(Ok(Event::Delete(obj))),
            // During a relist the store is rebuilt from InitApply alone: leaving one out drops it.
            Ok(Event::InitApply(Decoded(Err(b)))) => {
                bad(*b);
                None
            }
            Ok(Event::Apply(Decoded(Err(b))) | Event::Delete(Decoded(Err(b)))) => bad(*b).map(Ok),
        };
        std::future::ready(event)
    })
}
