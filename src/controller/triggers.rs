//! What the long-lived watches ask to reconcile, handed to the controller of the current term of
//! leadership, or to nobody while this replica stands by.
//!
//! The watches, their stores and indexes live as long as the process (watches.rs); the
//! controllers only while this replica leads (`lead` in mod.rs). Between terms nothing is queued:
//! a new term reconciles every cached job and tool once instead (`lead`), so triggers that
//! arrived while standing by would only repeat that.

use std::sync::{Arc, Mutex, PoisonError};

use futures::Stream;
use kube::runtime::reflector::{Lookup, ObjectRef};
use tokio::sync::mpsc;

/// A send to a replica that stands by (no controller to receive it).
#[derive(Debug)]
pub struct NotLeading;

/// The current term's trigger channel of one controller. Until the first term opens it, what
/// is sent waits for that term (the watches start just before it, main.rs); between terms it
/// is dropped.
pub struct Triggers<K: Lookup>(Arc<Mutex<Channel<K>>>);

struct Channel<K: Lookup> {
    to_term: Option<mpsc::UnboundedSender<ObjectRef<K>>>,
    /// The first term's receiver, until that term claims it.
    unclaimed: Option<mpsc::UnboundedReceiver<ObjectRef<K>>>,
}

impl<K: Lookup> Clone for Triggers<K> {
    fn clone(&self) -> Self {
        Triggers(self.0.clone())
    }
}

impl<K: Lookup> Default for Triggers<K> {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Triggers(Arc::new(Mutex::new(Channel { to_term: Some(tx), unclaimed: Some(rx) })))
    }
}

impl<K: Lookup<DynamicType = ()> + 'static> Triggers<K> {
    /// Hands `object` to the current term's controller; dropped while standing by.
    pub fn send(&self, object: ObjectRef<K>) -> Result<(), NotLeading> {
        match &self.0.lock().unwrap_or_else(PoisonError::into_inner).to_term {
            Some(tx) => tx.send(object).map_err(|_| NotLeading),
            None => Err(NotLeading),
        }
    }

    /// Opens a term: from now on triggers reach the returned stream, until the returned guard
    /// is dropped (the term ends).
    pub fn open(&self) -> (Term<K>, impl Stream<Item = ObjectRef<K>> + Send + 'static + use<K>) {
        let mut channel = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rx = match channel.unclaimed.take() {
            Some(rx) => rx,
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                channel.to_term = Some(tx);
                rx
            }
        };
        (Term(self.clone()), futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}

impl<K: Lookup> Triggers<K> {
    /// From now on triggers go nowhere (this replica stands by), and nothing waits for a first
    /// term any longer: a term that ended before it ever opened must not leave them piling up.
    pub fn close(&self) {
        let mut channel = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        channel.to_term = None;
        channel.unclaimed = None;
    }
}

/// Closes the term's channel when dropped: a standby's triggers go nowhere.
pub struct Term<K: Lookup>(Triggers<K>);

impl<K: Lookup> Drop for Term<K> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AgentJob;
    use futures::StreamExt;

    fn job(name: &str) -> ObjectRef<AgentJob> {
        ObjectRef::new(name).within("ns")
    }

    #[tokio::test]
    async fn triggers_reach_the_first_term_and_then_only_open_ones() {
        let triggers = Triggers::<AgentJob>::default();
        triggers.send(job("before-the-first-term")).unwrap();
        let (term, mut first) = triggers.open();
        triggers.send(job("during")).unwrap();
        assert_eq!(first.next().await.unwrap().name, "before-the-first-term");
        assert_eq!(first.next().await.unwrap().name, "during");
        drop(term);
        assert!(triggers.send(job("standing-by")).is_err(), "term over: dropped");
        assert!(first.next().await.is_none(), "the ended term's stream ends");
        let (_term, mut second) = triggers.open();
        triggers.send(job("second")).unwrap();
        assert_eq!(second.next().await.unwrap().name, "second", "nothing from the standby");
    }

    #[test]
    fn a_first_term_that_never_opened_leaves_nothing_waiting() {
        let triggers = Triggers::<AgentJob>::default();
        triggers.close();
        assert!(triggers.send(job("standing-by")).is_err(), "dropped, not kept for a term");
    }
}
