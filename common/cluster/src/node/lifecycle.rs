//! The phases of a node's life as a small tree of cancellation tokens and a task tracker:
//! a signal cancels the root token; its child, the admission token, is cancelled with it, so
//! services refuse new work at once; every request runs as a task of the tracker, so the drain
//! can wait for exactly the requests in flight, with a deadline.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a node's services need of its life cycle: whether to take new work, and where to run
/// each request so that the drain waits for it.
#[derive(Clone)]
pub struct RequestTasks {
    admission: CancellationToken,
    tracker: TaskTracker,
}

impl RequestTasks {
    /// Tasks of a node whose shutdown starts when `shutdown` is cancelled.
    pub fn new(shutdown: &CancellationToken) -> Self {
        Self {
            admission: shutdown.child_token(),
            tracker: TaskTracker::new(),
        }
    }

    /// False from the moment shutdown starts.
    pub fn admitting(&self) -> bool {
        !self.admission.is_cancelled()
    }

    /// Runs one request's work as a tracked task.
    pub fn spawn<F>(&self, work: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(work)
    }

    /// Cancelled when shutdown starts: streams that never end on their own stop then.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.admission.clone()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }

    /// Waits until every request task has ended, or `timeout` passes; returns whether they all
    /// ended. No task can be added once this is called.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_stops_admission_and_the_drain_waits_for_tasks_within_its_deadline() {
        let shutdown = CancellationToken::new();
        let tasks = RequestTasks::new(&shutdown);
        assert!(tasks.admitting());
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let _ = wait.await;
        });
        shutdown.cancel();
        assert!(!tasks.admitting());
        assert_eq!(tasks.in_flight(), 1);
        assert!(
            !tasks.drain(Duration::from_millis(20)).await,
            "a task still runs"
        );
        release.send(()).unwrap();
        assert!(tasks.drain(Duration::from_secs(5)).await);
        assert_eq!(tasks.in_flight(), 0);
    }
}
