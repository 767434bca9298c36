//! `metav1.Condition` as the operator holds it: the wire format and CRD schema of k8s-openapi's
//! `Condition`, with its four strings shared. Jobs' conditions repeat across jobs ("all readiness
//! checks passed", "0 of 2 approvals from category bench heads", the same estimate), and three of
//! a waiting job's five carry the same message: as `String`s they were 1.1 KB of each cached job,
//! the largest part after its inline size (README "Memory at 10,000 jobs";
//! `controller::memory` test `what_a_cached_job_awaiting_approval_costs`).

use std::borrow::Borrow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

/// One condition: the same fields, JSON and schema as `k8s_openapi`'s `Condition`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub last_transition_time: Time,
    #[serde(default)]
    pub message: Text,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub reason: Text,
    #[serde(default)]
    pub status: Text,
    #[serde(default, rename = "type")]
    pub type_: Text,
}

/// The CRD schema is k8s-openapi's, unchanged (`make crds` leaves `crds/` as it was).
impl schemars::JsonSchema for Condition {
    fn inline_schema() -> bool {
        <k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition as schemars::JsonSchema>::inline_schema()
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        <k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition as schemars::JsonSchema>::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        <k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition as schemars::JsonSchema>::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition as schemars::JsonSchema>::json_schema(generator)
    }
}

/// An immutable string shared by every value equal to it that was read from JSON (interned) or
/// cloned: one pointer inline and nothing more per copy. Also the status strings that repeat
/// across jobs (readiness checks, estimates, history results, approval summaries). Its schema is
/// a string's. A thin `Arc<Box<str>>`, not an `Arc<str>` (16 bytes): a condition is 64 bytes,
/// not 96, and a job's five fit jemalloc's 320-byte class, not 512 (`controller::memory` test
/// `what_a_cached_job_awaiting_approval_costs`); the extra indirection is paid once per string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Text(Arc<Box<str>>);

impl schemars::JsonSchema for Text {
    fn inline_schema() -> bool {
        <String as schemars::JsonSchema>::inline_schema()
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        <String as schemars::JsonSchema>::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        <String as schemars::JsonSchema>::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <String as schemars::JsonSchema>::json_schema(generator)
    }
}

impl Text {
    pub fn as_str(&self) -> &str {
        &self.0[..]
    }
}

impl Default for Text {
    fn default() -> Self {
        Text::from("")
    }
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        Text(intern(text))
    }
}

impl From<String> for Text {
    fn from(text: String) -> Self {
        Text(intern(&text))
    }
}

impl From<&String> for Text {
    fn from(text: &String) -> Self {
        Text::from(text.as_str())
    }
}

impl From<Text> for String {
    fn from(text: Text) -> Self {
        text.as_str().to_string()
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// `null` reads as empty, as k8s-openapi's `Condition` reads it.
impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Option::<std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Ok(Text::from(text.as_deref().unwrap_or_default()))
    }
}

/// Every shared string alive. A string no `Text` holds any more is dropped when the set has
/// doubled since the last sweep, so the set stays within twice what is in use (plus
/// `MIN_SWEEP`) and the sweeps cost O(1) per insert amortised.
struct Interner {
    strings: HashSet<Text>,
    sweep_at: usize,
}

const MIN_SWEEP: usize = 4096;

static INTERNER: Mutex<Option<Interner>> = Mutex::new(None);

fn intern(text: &str) -> Arc<Box<str>> {
    let mut guard = INTERNER.lock().unwrap_or_else(PoisonError::into_inner);
    let interner = guard.get_or_insert_with(|| Interner { strings: HashSet::new(), sweep_at: MIN_SWEEP });
    if let Some(shared) = interner.strings.get(text) {
        return shared.0.clone();
    }
    if interner.strings.len() >= interner.sweep_at {
        interner.strings.retain(|s| Arc::strong_count(&s.0) > 1);
        interner.sweep_at = (2 * interner.strings.len()).max(MIN_SWEEP);
    }
    let shared = Arc::new(Box::<str>::from(text));
    interner.strings.insert(Text(shared.clone()));
    shared
}

#[cfg(test)]
mod tests {
    use super::{Condition, Text};
    use serde_json::json;

    #[test]
    fn a_condition_reads_and_writes_as_k8s_openapis_does() {
        let wire = json!({"lastTransitionTime": "2026-11-30T11:33:27Z", "message": "m", "observedGeneration": 3,
            "reason": "R", "status": "True", "type": "Ready", "extra": 1});
        let ours: Condition = serde_json::from_value(wire.clone()).unwrap();
        let theirs: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition = serde_json::from_value(wire).unwrap();
        assert_eq!(serde_json::to_value(&ours).unwrap(), serde_json::to_value(&theirs).unwrap());
        for partial in [
            json!({"lastTransitionTime": "2026-11-30T11:33:27Z"}),
            json!({"lastTransitionTime": "2026-11-30T11:33:27Z", "message": null, "type": "A"}),
        ] {
            let ours: Condition = serde_json::from_value(partial.clone()).unwrap();
            let theirs: k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition = serde_json::from_value(partial).unwrap();
            assert_eq!(serde_json::to_value(&ours).unwrap(), serde_json::to_value(&theirs).unwrap());
        }
        assert!(serde_json::from_value::<Condition>(json!({"type": "A"})).is_err(), "lastTransitionTime is required, as in k8s-openapi");
        assert_eq!(
            schemars::schema_for!(Vec<Condition>),
            schemars::schema_for!(Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>)
        );
    }

    /// Messages carry tenants' names and figures: strings no condition holds any more must not
    /// pile up in the interner.
    #[test]
    fn the_interner_forgets_strings_no_one_holds() {
        let held: Vec<Text> = (0..100).map(|i| Text::from(format!("held {i}"))).collect();
        for i in 0..(4 * super::MIN_SWEEP) {
            drop(Text::from(format!("dropped {i}")));
        }
        let live = super::INTERNER.lock().unwrap().as_ref().map_or(0, |i| i.strings.len());
        assert!(live <= 2 * super::MIN_SWEEP, "{live} strings interned");
        assert!(held.iter().enumerate().all(|(i, t)| *t == format!("held {i}") && std::sync::Arc::strong_count(&t.0) == 2));
    }

    #[test]
    fn equal_texts_read_from_json_share_one_string() {
        let read = |s: &str| serde_json::from_value::<Text>(json!(s)).unwrap();
        let (a, b) = (read("all readiness checks passed"), read("all readiness checks passed"));
        assert!(std::sync::Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(a, "all readiness checks passed");
        assert_ne!(read("other"), a);
    }
}
