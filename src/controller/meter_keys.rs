//! The namespace's side of the meter's configuration (domain/meter_sidecar.rs): what its keys
//! Secret holds, read when an attempt's Pods are created.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use super::error::ApplyError;
use super::{Context, Result};
use crate::domain::meter_sidecar::NamespaceKeys;

/// What the namespace's meter keys Secret offers (key names and upstream annotations; its values
/// are dropped here and never logged), None when it does not exist or the operator may not read
/// it (the chart grants `get` on it by name in every namespace): the meter is then keyless, and the
/// job says so.
///
/// A GET when an attempt starts, remembered per namespace while the watch of Secrets' metadata
/// runs: that watch reports every change to the Secret (its data included), and the answer is
/// forgotten then. Only a Secret found is remembered: one created a moment before a job must not
/// lose the race with its watch event and leave the job's meter keyless. Without the watch
/// (RBAC), every start reads it again. A GET per job cost the apiserver ~0.6 ms of CPU, a tenth
/// of a status write (README "Performance").
pub async fn of_namespace(ctx: &Context, namespace: &str) -> Result<Option<NamespaceKeys>> {
    let watched = ctx.secret_watch.is_watching();
    if watched && let Some(keys) = ctx.meter_keys.get(namespace) {
        return Ok(Some(keys));
    }
    let seen = ctx.meter_keys.changes();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let keys = match api.get_opt(&ctx.settings.meter.keys_secret).await {
        Ok(secret) => secret.map(|s| {
            let data_keys = s.data.iter().flatten().map(|(k, _)| k.as_str()).chain(s.string_data.iter().flatten().map(|(k, _)| k.as_str()));
            NamespaceKeys::from_secret(data_keys, s.metadata.annotations.as_ref().unwrap_or(&Default::default()))
        }),
        Err(kube::Error::Api(s)) if s.code == 403 => None,
        Err(source) => {
            return Err(
                ApplyError::GetMeterKeys { namespace: namespace.into(), secret: ctx.settings.meter.keys_secret.clone(), source }.into()
            );
        }
    };
    if watched && let Some(found) = &keys {
        ctx.meter_keys.remember(namespace, found.clone(), seen);
    }
    Ok(keys)
}

/// The keys Secrets read, by namespace, until the watch says one changed.
#[derive(Default)]
pub struct KeysCache {
    inner: Mutex<Remembered>,
}

#[derive(Default)]
struct Remembered {
    /// Bumped on every change the watch reports: an answer read across one is not remembered,
    /// since it may predate the change.
    changes: u64,
    by_namespace: HashMap<String, NamespaceKeys>,
}

impl KeysCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, namespace: &str) -> Option<NamespaceKeys> {
        self.lock().by_namespace.get(namespace).cloned()
    }

    fn changes(&self) -> u64 {
        self.lock().changes
    }

    fn remember(&self, namespace: &str, keys: NamespaceKeys, read_after: u64) {
        let mut r = self.lock();
        if r.changes == read_after {
            r.by_namespace.insert(namespace.to_string(), keys);
        }
    }

    /// Follows the watch of Secrets' metadata: a keys Secret (`keys_secret`) created, changed or
    /// deleted is forgotten in its namespace; a relist or a failing watch forgets them all.
    pub fn observe<K: kube::Resource>(&self, event: &std::result::Result<watcher::Event<K>, watcher::Error>, keys_secret: &str) {
        let mut r = self.lock();
        match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::Delete(s) | watcher::Event::InitApply(s)) => {
                if s.meta().name.as_deref() == Some(keys_secret) {
                    r.changes += 1;
                    r.by_namespace.remove(&s.namespace().unwrap_or_default());
                }
            }
            Ok(watcher::Event::InitDone) => {}
            Ok(watcher::Event::Init) | Err(_) => {
                r.changes += 1;
                r.by_namespace.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn secret(namespace: &str, name: &str) -> Secret {
        Secret {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some(namespace.into()), ..ObjectMeta::default() },
            ..Secret::default()
        }
    }

    fn openai() -> NamespaceKeys {
        NamespaceKeys { openai: true, ..NamespaceKeys::default() }
    }

    fn anthropic() -> NamespaceKeys {
        NamespaceKeys { anthropic: true, ..NamespaceKeys::default() }
    }

    #[test]
    fn a_change_to_the_keys_secret_forgets_its_namespace_only() {
        let cache = KeysCache::default();
        cache.remember("a", openai(), cache.changes());
        cache.remember("b", anthropic(), cache.changes());
        assert_eq!(cache.get("a"), Some(openai()));
        cache.observe::<Secret>(&Ok(watcher::Event::Apply(secret("a", "other"))), "keys");
        assert_eq!(cache.get("a"), Some(openai()), "another Secret is no change");
        cache.observe::<Secret>(&Ok(watcher::Event::Apply(secret("a", "keys"))), "keys");
        assert_eq!((cache.get("a"), cache.get("b")), (None, Some(anthropic())));
        cache.observe::<Secret>(&Ok(watcher::Event::Delete(secret("b", "keys"))), "keys");
        assert_eq!(cache.get("b"), None);
    }

    #[test]
    fn an_answer_read_across_a_change_is_not_remembered() {
        let cache = KeysCache::default();
        let before = cache.changes();
        // The Secret changes while the GET is in flight: the answer may be the old one.
        cache.observe::<Secret>(&Ok(watcher::Event::Apply(secret("a", "keys"))), "keys");
        cache.remember("a", openai(), before);
        assert_eq!(cache.get("a"), None);
    }

    #[test]
    fn a_relist_or_a_failing_watch_forgets_everything() {
        let cache = KeysCache::default();
        cache.remember("a", openai(), cache.changes());
        cache.observe::<Secret>(&Ok(watcher::Event::Init), "keys");
        assert_eq!(cache.get("a"), None);
        cache.remember("a", openai(), cache.changes());
        cache.observe::<Secret>(&Err(watcher::Error::NoResourceVersion), "keys");
        assert_eq!(cache.get("a"), None);
    }
}
