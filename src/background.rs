//! The server's background tasks under one owner: the change-feed follower,
//! the usage writer and the key reloader. None of them should ever end
//! while the server runs; one that does (a panic, or a loop that returned)
//! is logged, counted in `tokenexchange_background_task_exits_total`, and
//! ends the server, which then exits non-zero. A replica without its
//! follower would serve revoked keys for a whole cache TTL while looking
//! healthy; exiting lets the platform start a whole one, which failing
//! `/ready` alone would not (a replica out of rotation is never restarted).

use std::future::Future;
use std::sync::Arc;

use tokio::task::{AbortHandle, JoinError, JoinSet};

use crate::metrics::Metrics;

/// The running tasks, and a watcher for each.
pub struct Background {
    watchers: JoinSet<(&'static str, Result<(), JoinError>)>,
    handles: Vec<AbortHandle>,
    metrics: Arc<Metrics>,
}

/// Stops the tasks of a [`Background`] once it has been handed to
/// [`Background::ended`].
pub struct Stopper {
    handles: Vec<AbortHandle>,
}

impl Background {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            watchers: JoinSet::new(),
            handles: Vec::new(),
            metrics,
        }
    }

    /// Runs `task`, named `name` in logs and metrics, until it ends or
    /// [`Stopper::stop`].
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        // The task runs on its own so that its panic is caught by its
        // handle, which the watcher awaits and reports.
        let handle = tokio::spawn(task);
        self.handles.push(handle.abort_handle());
        self.watchers.spawn(async move { (name, handle.await) });
    }

    /// What stops the tasks later (in the order they were spawned).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            handles: self.handles.clone(),
        }
    }

    /// Resolves when a task ends (never, if none does), after logging and
    /// counting it; the task's name.
    pub async fn ended(mut self) -> &'static str {
        let Some(Ok((name, outcome))) = self.watchers.join_next().await else {
            // No tasks, or a watcher aborted (only by the runtime shutting down).
            return std::future::pending().await;
        };
        self.metrics.background_task_exits.with_label_values(&[name]).inc();
        match outcome {
            Err(e) if e.is_panic() => tracing::error!(task = name, "a background task panicked; stopping the server"),
            _ => tracing::error!(task = name, "a background task ended; stopping the server"),
        }
        name
    }
}

impl Stopper {
    pub fn stop(&self) {
        for handle in &self.handles {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_ends_is_reported_counted_and_the_rest_can_be_stopped() {
        let metrics = Arc::new(Metrics::new());
        let mut background = Background::new(metrics.clone());
        let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
        background.spawn("forever", async move {
            let _alive = alive_tx;
            std::future::pending::<()>().await;
        });
        background.spawn("panics", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("broken on purpose");
        });
        let stopper = background.stopper();
        let ended = tokio::time::timeout(Duration::from_secs(10), background.ended()).await;
        assert_eq!(ended.expect("the panic was not reported"), "panics");
        let text = metrics.render();
        assert!(
            text.contains(r#"tokenexchange_background_task_exits_total{task="panics"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"task="forever""#), "{text}");
        // The task still running is stopped: its sender goes with it.
        stopper.stop();
        let closed = tokio::time::timeout(Duration::from_secs(10), alive_rx.recv()).await;
        assert_eq!(closed.expect("the task was not stopped"), None);

        let mut background = Background::new(metrics.clone());
        background.spawn("returns", async {});
        assert_eq!(background.ended().await, "returns");
        assert!(
            metrics
                .render()
                .contains(r#"tokenexchange_background_task_exits_total{task="returns"} 1"#)
        );
    }
}
