//! The operator's tokio tasks: kube-runtime polls every watch a controller was given on the one
//! task that polls its stream (each reconcile is a task of its own), so the two controllers and
//! the Pod watch each get a task of their own and the runtime's worker threads, one per core,
//! can run them on every core. A reconcile that computes for seconds holds a worker thread as
//! long: as many such reconciles as cores stall the operator (domain/validate.rs
//! `MAX_VALIDATION_CHECKS`, domain/tally.rs `Tally::verdicts`).

use tokio::task::JoinHandle;

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
    /// Without controllers (the watches' own tasks, watches.rs) only a feeder's end resolves it.
    pub async fn ended(&mut self) {
        let Tasks { controllers, feeders } = self;
        let feeder = async {
            match feeders.is_empty() {
                true => std::future::pending().await,
                false => drop(futures::future::select_all(feeders.iter_mut()).await),
            }
        };
        if controllers.is_empty() {
            return feeder.await;
        }
        let controllers = futures::future::join_all(controllers.iter_mut());
        futures::future::select(std::pin::pin!(controllers), std::pin::pin!(feeder)).await;
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in self.controllers.iter().chain(&self.feeders) {
            task.abort();
        }
    }
}
