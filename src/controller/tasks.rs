//! The operator's tokio tasks: kube-runtime polls a controller's reconciles and every watch it
//! was given on the one task that polls its stream, so the two controllers and the Pod watch
//! each get a task of their own and the runtime's worker threads can run them on every core.

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Items a watch task may run ahead of its consumer before it waits for it (backpressure, not
/// loss: a full channel stops the watch task, never drops an event).
const WATCH_BUFFER: usize = 1024;

/// Spawned tasks that end with their owner: dropping this aborts every one. The controllers'
/// future is dropped when the leader lease is lost ("no write may start after it", main.rs), and
/// tasks that outlived it would keep reconciling. An aborted task stops at its next await; a poll
/// already running on another worker finishes that poll first.
#[derive(Default)]
pub struct Tasks {
    /// The controllers: they end on graceful shutdown, each once its reconciles in flight are done.
    controllers: Vec<JoinHandle<()>>,
    /// What feeds them (watches): they never end on their own.
    feeders: Vec<JoinHandle<()>>,
}

impl Tasks {
    pub fn spawn_controller(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.controllers.push(tokio::spawn(task));
    }

    pub fn spawn_feeder(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.feeders.push(tokio::spawn(task));
    }

    /// Resolves once every controller has ended (shut down gracefully), or as soon as a feeder
    /// ends (it panicked: the operator then stops as a whole, as when all of this ran in one
    /// `select!`, rather than go on deaf to a kind of event).
    pub async fn ended(&mut self) {
        let controllers = futures::future::join_all(self.controllers.iter_mut());
        if self.feeders.is_empty() {
            controllers.await;
            return;
        }
        let feeder = futures::future::select_all(self.feeders.iter_mut());
        futures::future::select(std::pin::pin!(controllers), feeder).await;
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in self.controllers.iter().chain(&self.feeders) {
            task.abort();
        }
    }
}

/// Polls `stream` on a task of its own and hands its items over through a bounded channel.
pub fn on_own_task<T: Send + 'static>(
    tasks: &mut Tasks,
    stream: impl Stream<Item = T> + Send + 'static,
) -> impl Stream<Item = T> + Send + 'static {
    let (tx, mut rx) = mpsc::channel(WATCH_BUFFER);
    tasks.spawn_feeder(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if tx.send(item).await.is_err() {
                break;
            }
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
