//! Publishes events.k8s.io/v1 Events, folding an identical repeat into the first one's series.
//!
//! kube-runtime's `Recorder` keeps a full copy of every Event it published for six minutes and
//! scans them all on every publish: with 10,000 jobs each announcing its phase, that was ~10,000
//! cached Events (tens of MiB) and O(n) work under a write lock per Event, to fold repeats that
//! never came, since its key holds the object's resourceVersion and every job Event follows a
//! status write that changes it. Here the key is the object's identity without its version, and
//! the note is part of it: an identical warning repeated within the window becomes one Event
//! with a growing count, while a new message (the next attempt's failure, say) is a new Event
//! rather than a count on an Event that shows the old message. What is remembered per series is
//! its key and the Event's name, and at most [`SERIES_CAP`] series are.
//!
//! Like client-go's broadcaster, recording does not wait for the apiserver: [`EventQueue`] hands
//! Events to a background sender, so a reconcile holds its slot for its own writes alone.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Api, Client};
use tokio::sync::mpsc;

/// How long a repeat still joins the earlier Event's series; client-go and kube-runtime use the
/// same window.
pub const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// Series remembered at once. Forgetting one only means its next repeat starts a new Event, so
/// this bounds memory under a burst of one-off Events (one per job) without losing a repeat
/// that comes back soon.
pub const SERIES_CAP: usize = 4096;

/// What makes two Events the same: the object (by identity, any version: a deleted and
/// recreated object of the same name is another one), the type, reason, action and note. Held as
/// one string, the fields joined by NUL, which none of them contains: one allocation per series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key(Box<str>);

impl Key {
    fn new(regarding: &ObjectReference, type_: EventType, reason: &str, action: &str, note: &str) -> Key {
        let r = regarding;
        let fields = [
            r.api_version.as_deref(),
            r.kind.as_deref(),
            r.namespace.as_deref(),
            r.name.as_deref(),
            r.uid.as_deref(),
            Some(if type_ == EventType::Warning { "Warning" } else { "Normal" }),
            Some(reason),
            Some(action),
            Some(note),
        ];
        Key(fields.map(|f| f.unwrap_or_default()).join("\0").into())
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Series {
    /// The Event object carrying the series.
    event: Box<str>,
    count: i32,
    last_observed: Timestamp,
}

/// What to send for one Event.
#[derive(Debug, PartialEq)]
enum Step {
    Create,
    /// Patch `event`'s series to `count` occurrences.
    Count {
        event: String,
        count: i32,
    },
}

/// The series bookkeeping, apart from the API so it can be tested alone.
#[derive(Default)]
struct SeriesBook {
    series: HashMap<Key, Series>,
}

impl SeriesBook {
    fn next(&self, key: &Key, now: Timestamp) -> Step {
        match self.series.get(key) {
            Some(s) if s.last_observed + SERIES_WINDOW > now => Step::Count { event: s.event.to_string(), count: s.count + 1 },
            _ => Step::Create,
        }
    }

    /// Records that the Event for `key` is now `event`, seen `count` times.
    fn observed(&mut self, key: Key, event: String, count: i32, now: Timestamp) {
        if !self.series.contains_key(&key) && self.series.len() >= SERIES_CAP {
            self.make_room(now);
        }
        self.series.insert(key, Series { event: event.into(), count, last_observed: now });
    }

    /// Drops expired series, and if that is not enough the least recently seen quarter or more,
    /// so the scans run once per SERIES_CAP / 4 new series at most.
    fn make_room(&mut self, now: Timestamp) {
        self.series.retain(|_, s| s.last_observed + SERIES_WINDOW > now);
        if self.series.len() < SERIES_CAP * 3 / 4 {
            return;
        }
        let mut seen: Vec<Timestamp> = self.series.values().map(|s| s.last_observed).collect();
        let cut = seen.len() / 4;
        let newest_dropped = *seen.select_nth_unstable(cut).1;
        self.series.retain(|_, s| s.last_observed > newest_dropped);
    }
}

/// Events waiting to be sent. A full queue makes recording wait (and with it the reconcile that
/// records), so a burst slows down rather than dropping Events or growing without bound.
pub const QUEUE_CAP: usize = 1024;

/// Events sent at once.
pub const SENDERS: usize = 32;

struct Pending {
    regarding: ObjectReference,
    type_: EventType,
    reason: String,
    note: String,
    action: &'static str,
    /// When it was recorded: sent later, it still sorts where it happened.
    at: Timestamp,
}

/// Records Events without waiting for the apiserver; a background task sends them, [`SENDERS`]
/// at a time.
#[derive(Clone)]
pub struct EventQueue {
    queue: mpsc::Sender<Pending>,
}

impl EventQueue {
    /// Starts the sender on the current runtime; it ends when every queue handle is dropped.
    pub fn start(publisher: Publisher) -> EventQueue {
        Self::spawn(publisher).0
    }

    /// Like `start`, for one term of leadership: the sender stops, and Events still queued are
    /// dropped, as soon as the returned guard is (the lease was lost: a standby writes nothing).
    pub fn start_for_term(publisher: Publisher) -> (EventQueue, StopOnDrop) {
        let (queue, task) = Self::spawn(publisher);
        (queue, StopOnDrop(task.abort_handle()))
    }

    fn spawn(publisher: Publisher) -> (EventQueue, tokio::task::JoinHandle<()>) {
        use futures::StreamExt;
        let (queue, mut rx) = mpsc::channel::<Pending>(QUEUE_CAP);
        let publisher = std::sync::Arc::new(publisher);
        let pending = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let task = tokio::spawn(pending.for_each_concurrent(SENDERS, move |p| {
            let publisher = publisher.clone();
            async move {
                if let Err(err) = publisher.publish_at(&p.regarding, p.type_, &p.reason, &p.note, p.action, p.at).await {
                    tracing::warn!(object = ?p.regarding.name, reason = p.reason, %err, "could not publish Event");
                }
            }
        }));
        (EventQueue { queue }, task)
    }

    pub async fn record(&self, regarding: &ObjectReference, type_: EventType, reason: &str, note: String, action: &'static str) {
        let note = shown_note(note);
        let pending = Pending { regarding: regarding.clone(), type_, reason: reason.into(), note, action, at: Timestamp::now() };
        // Fails only once the sender is gone, at shutdown.
        let _ = self.queue.send(pending).await;
    }

    /// Like `record`, from code that cannot wait (a watch stream): dropped when the queue is full.
    pub fn try_record(&self, regarding: &ObjectReference, type_: EventType, reason: &str, note: String, action: &'static str) {
        let note = shown_note(note);
        let pending = Pending { regarding: regarding.clone(), type_, reason: reason.into(), note, action, at: Timestamp::now() };
        if self.queue.try_send(pending).is_err() {
            tracing::warn!(object = ?regarding.name, reason, "Event dropped: the Event queue is full");
        }
    }
}

/// Aborts a term's Event sender when dropped (`EventQueue::start_for_term`).
pub struct StopOnDrop(tokio::task::AbortHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A note as published: notes quote what tenants wrote, so one line with nothing a terminal acts
/// on (`domain::terminal_text::message`), cut to the 1 KiB the Events API accepts.
fn shown_note(note: String) -> String {
    match crate::domain::terminal_text::message(&note) {
        std::borrow::Cow::Borrowed(_) if note.len() <= MAX_NOTE_BYTES => note,
        shown => crate::domain::validate::bounded_to(&shown, MAX_NOTE_BYTES),
    }
}

/// Bytes of a note kept (the Events API refuses notes over 1 KiB; the ellipsis fits).
const MAX_NOTE_BYTES: usize = 1000;

pub struct Publisher {
    client: Client,
    controller: String,
    instance: String,
    book: Mutex<SeriesBook>,
}

impl Publisher {
    /// `instance` (the Pod's name) tells replicas apart; the controller's name stands in for it
    /// when unknown.
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Publisher { client, controller: controller.into(), instance: instance.unwrap_or_else(|| controller.into()), book: Mutex::default() }
    }

    pub async fn publish_at(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
        action: &str,
        now: Timestamp,
    ) -> Result<(), kube::Error> {
        let key = Key::new(regarding, type_, reason, action, note);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let step = self.lock().next(&key, now);
        let create = || self.create(&api, regarding, type_, reason, action, note, now);
        let (event, count) = match step {
            Step::Count { event, count } => {
                let series = EventSeries { count, last_observed_time: MicroTime(now) };
                let patch = serde_json::json!({ "series": series });
                match api.patch(&event, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => (event, count),
                    // Deleted meanwhile (the apiserver's event TTL, or someone): start over.
                    Err(kube::Error::Api(e)) if e.code == 404 => (create().await?, 1),
                    Err(e) => return Err(e),
                }
            }
            Step::Create => (create().await?, 1),
        };
        self.lock().observed(key, event, count, now);
        Ok(())
    }

    /// Creates the first Event of a series; returns its name.
    #[allow(clippy::too_many_arguments)]
    async fn create(
        &self,
        api: &Api<Event>,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
        now: Timestamp,
    ) -> Result<String, kube::Error> {
        let name = format!("{}.{:x}", regarding.name.as_deref().unwrap_or(&self.controller), now.as_nanosecond());
        let event = Event {
            metadata: ObjectMeta { name: Some(name.clone()), namespace: regarding.namespace.clone(), ..ObjectMeta::default() },
            event_time: Some(MicroTime(now)),
            type_: Some(if type_ == EventType::Warning { "Warning" } else { "Normal" }.into()),
            reason: Some(reason.into()),
            action: Some(action.into()),
            note: Some(note.into()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        super::metadata_answers::create(api, &PostParams::default(), &event).await?;
        Ok(name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeriesBook> {
        self.book.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, uid: &str, note: &str) -> Key {
        key_at(name, uid, "1", note)
    }

    fn key_at(name: &str, uid: &str, resource_version: &str, note: &str) -> Key {
        let regarding = ObjectReference {
            api_version: Some("agentgate.dev/v1alpha1".into()),
            kind: Some("AgentJob".into()),
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            resource_version: Some(resource_version.into()),
            ..ObjectReference::default()
        };
        Key::new(&regarding, EventType::Warning, "BudgetExceeded", "Reconcile", note)
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    #[test]
    fn identical_repeats_count_on_the_first_event_within_the_window() {
        let mut book = SeriesBook::default();
        let k = key("a", "u1", "over budget");
        assert_eq!(book.next(&k, at(0)), Step::Create);
        book.observed(k.clone(), "a.1".into(), 1, at(0));
        // The status write that came with the first Event changed the job's version.
        assert_eq!(book.next(&key_at("a", "u1", "2", "over budget"), at(10)), Step::Count { event: "a.1".into(), count: 2 });
        book.observed(k.clone(), "a.1".into(), 2, at(10));
        assert_eq!(book.next(&k, at(20)), Step::Count { event: "a.1".into(), count: 3 });
        // The window runs from the last repeat, not the first Event.
        book.observed(k.clone(), "a.1".into(), 3, at(300));
        assert_eq!(book.next(&k, at(600)), Step::Count { event: "a.1".into(), count: 4 });
        assert_eq!(book.next(&k, at(300 + SERIES_WINDOW.as_secs())), Step::Create);
    }

    #[test]
    fn a_new_message_or_a_recreated_object_is_a_new_event() {
        let mut book = SeriesBook::default();
        book.observed(key("a", "u1", "attempt 1 failed"), "a.1".into(), 1, at(0));
        assert_eq!(book.next(&key("a", "u1", "attempt 2 failed"), at(1)), Step::Create);
        assert_eq!(book.next(&key("a", "u2", "attempt 1 failed"), at(1)), Step::Create);
        assert_eq!(book.next(&key("b", "u1", "attempt 1 failed"), at(1)), Step::Create);
    }

    #[test]
    fn the_book_stays_bounded_and_keeps_the_recent_series() {
        let mut book = SeriesBook::default();
        let n = SERIES_CAP * 3;
        for i in 0..n {
            book.observed(key(&format!("job-{i}"), &format!("u{i}"), "n"), format!("e{i}"), 1, at(i as i64 / 100));
            assert!(book.series.len() <= SERIES_CAP, "{} series after {i}", book.series.len());
        }
        let last = n - 1;
        let recent = key(&format!("job-{last}"), &format!("u{last}"), "n");
        assert_eq!(book.next(&recent, at(last as i64 / 100)), Step::Count { event: format!("e{last}"), count: 2 });
        assert_eq!(book.next(&key("job-0", "u0", "n"), at(last as i64 / 100)), Step::Create);
    }

    #[test]
    fn expired_series_go_first() {
        let mut book = SeriesBook::default();
        for i in 0..SERIES_CAP {
            book.observed(key(&format!("job-{i}"), &format!("u{i}"), "n"), format!("e{i}"), 1, at(0));
        }
        let later = at(SERIES_WINDOW.as_secs() + 1);
        book.observed(key("new", "un", "n"), "en".into(), 1, later);
        assert_eq!(book.series.len(), 1, "every series but the new one had expired");
    }
}
