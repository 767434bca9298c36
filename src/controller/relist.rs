//! Triggers from a watch whose objects the reconcile reads from that watch's cache, held back
//! during a relist until the cache holds them.
//!
//! A reflector's store takes a relist in whole: it buffers the `InitApply` objects and swaps them
//! in at `InitDone`. kube-runtime's `touched_objects` and `applied_objects` pass each `InitApply`
//! object on at once, so a reconcile it triggers may run before `InitDone` and read the cache as
//! it was before the relist. With one list page that window is short; with pages it spans every
//! further page's request. So an ApprovalVote created around an apiserver restart and relisted
//! on a first page of 50 woke its job, which read the old cache without the vote, and nothing
//! woke the job again once the cache had it: it stayed at 0/2 approvals (tests/restarts.rs
//! an_apiserver_restart_mid_burst..., 2 runs of 2 with votes paged, when jobs and votes were
//! first paged; the job watch's own relist requeues waiting jobs at its `InitDone`, which rescues
//! them when it comes later, so the test does not catch it every time: it passed 3 runs of 3
//! paged without this). A job relisted on a first page is not even reconciled: the controller
//! drops a trigger whose object its cache lacks. Here a relist's objects are passed on after its
//! `InitDone`, when the cache holds them (a_trigger_from_a_relist_finds_its_object_in_the_cache
//! shows the race every time, through a real reflector).

use futures::{Stream, StreamExt, future, stream};
use kube::runtime::watcher::{Error, Event};

/// Which objects of a watch are triggers.
#[derive(Clone, Copy)]
enum Objects {
    /// Applied and deleted, like `touched_objects`.
    Touched,
    /// Applied only, like `applied_objects`.
    Applied,
}

pub trait OnceStored<K>: Stream<Item = Result<Event<K>, Error>> + Sized {
    /// `touched_objects`, with a relist's objects held back until its `InitDone`.
    fn touched_once_stored(self) -> impl Stream<Item = Result<K, Error>> {
        once_stored(self, Objects::Touched)
    }

    /// `applied_objects`, with a relist's objects held back until its `InitDone`.
    fn applied_once_stored(self) -> impl Stream<Item = Result<K, Error>> {
        once_stored(self, Objects::Applied)
    }
}

impl<K, S: Stream<Item = Result<Event<K>, Error>>> OnceStored<K> for S {}

fn once_stored<K>(events: impl Stream<Item = Result<Event<K>, Error>>, objects: Objects) -> impl Stream<Item = Result<K, Error>> {
    events
        .scan(Vec::new(), move |relisted: &mut Vec<K>, event| {
            let out = match event {
                Ok(Event::Apply(obj)) => vec![Ok(obj)],
                Ok(Event::Delete(obj)) if matches!(objects, Objects::Touched) => vec![Ok(obj)],
                Ok(Event::Delete(_)) => Vec::new(),
                Ok(Event::Init) => {
                    // A relist that failed half-way starts over: what it had listed is listed again.
                    relisted.clear();
                    Vec::new()
                }
                Ok(Event::InitApply(obj)) => {
                    relisted.push(obj);
                    Vec::new()
                }
                Ok(Event::InitDone) => std::mem::take(relisted).into_iter().map(Ok).collect(),
                Err(err) => vec![Err(err)],
            };
            future::ready(Some(stream::iter(out)))
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;
    use kube::runtime::reflector::{self, ObjectRef};
    use kube::runtime::watcher::Event;
    use kube::runtime::{WatchStreamExt, watcher};

    use super::OnceStored;

    fn object(name: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some("ns".into()), ..ObjectMeta::default() },
            ..ConfigMap::default()
        }
    }

    /// A relist of two objects through a real reflector: whether each trigger, when it comes,
    /// finds its object in the cache, as the reconcile it wakes reads it.
    async fn found_in_cache<S>(
        triggers: impl FnOnce(futures::stream::BoxStream<'static, watcher::Result<Event<ConfigMap>>>) -> S,
    ) -> Vec<bool>
    where
        S: futures::Stream<Item = watcher::Result<ConfigMap>>,
    {
        let (cache, writer) = reflector::store::<ConfigMap>();
        let relist = [Event::Init, Event::InitApply(object("a")), Event::InitApply(object("b")), Event::InitDone];
        let events = futures::stream::iter(relist.into_iter().map(Ok)).reflect(writer).boxed();
        triggers(events).map(|obj| cache.get(&ObjectRef::from_obj(&obj.unwrap())).is_some()).collect().await
    }

    #[tokio::test]
    async fn a_trigger_from_a_relist_finds_its_object_in_the_cache() {
        assert_eq!(found_in_cache(|events| events.touched_once_stored()).await, [true, true]);
        // What kube-runtime's own adapter does: the reconcile woken by the first object reads a
        // cache that does not hold it yet.
        assert_eq!(found_in_cache(|events| events.touched_objects()).await, [false, false]);
    }

    #[tokio::test]
    async fn a_relists_objects_come_after_its_init_done() {
        let events = |list: Vec<Event<&'static str>>| futures::stream::iter(list.into_iter().map(Ok));
        let relist = vec![
            Event::Apply("before"),
            Event::Init,
            Event::InitApply("first page"),
            Event::Init,
            Event::InitApply("a"),
            Event::InitApply("b"),
            Event::InitDone,
            Event::Delete("gone"),
            Event::Apply("after"),
        ];
        let touched: Vec<_> = events(relist.clone()).touched_once_stored().map(Result::unwrap).collect().await;
        // "first page" belonged to a relist that started over; it is not passed on twice.
        assert_eq!(touched, ["before", "a", "b", "gone", "after"]);
        let applied: Vec<_> = events(relist).applied_once_stored().map(Result::unwrap).collect().await;
        assert_eq!(applied, ["before", "a", "b", "after"]);
    }
}
