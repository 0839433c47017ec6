//! Whether the store answers: what `/ready` reports. Unlike `/health` (is
//! the process alive), readiness means the store has answered recently.
//!
//! Every successful lookup on the request path counts as an answer, so a
//! busy replica never probes the store for readiness. An idle one probes at
//! most once per [`PROBE_INTERVAL`] however often it is asked, so a storm of
//! readiness checks cannot become a storm of store reads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Backend;

/// How recent the store's last answer must be for the replica to be ready.
pub const FRESHNESS: Duration = Duration::from_secs(5);
/// The least time between two probes of the store.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How recent an answer must be, and how often the store may be probed.
#[derive(Debug, Clone, Copy)]
pub struct ReadinessWindows {
    pub freshness: Duration,
    pub probe_interval: Duration,
}

impl Default for ReadinessWindows {
    fn default() -> Self {
        Self {
            freshness: FRESHNESS,
            probe_interval: PROBE_INTERVAL,
        }
    }
}

/// What readiness knows about the store.
pub struct StoreHealth {
    store: Arc<dyn Backend>,
    windows: ReadinessWindows,
    /// Bound on one probe (the store's own timeout, with room for its retry).
    probe_timeout: Duration,
    last_answer: Mutex<Option<Instant>>,
    last_probe: Mutex<Option<Instant>>,
    /// Held while probing, so concurrent checks share one probe.
    probing: tokio::sync::Mutex<()>,
}

fn recent(at: &Mutex<Option<Instant>>, within: Duration) -> bool {
    // A poisoned lock only means another thread panicked mid-update of an
    // Instant; the value is still usable.
    let at = at.lock().unwrap_or_else(|e| e.into_inner());
    at.is_some_and(|t| t.elapsed() < within)
}

impl StoreHealth {
    pub fn new(store: Arc<dyn Backend>, probe_timeout: Duration, windows: ReadinessWindows) -> Self {
        Self {
            store,
            windows,
            probe_timeout,
            last_answer: Mutex::new(None),
            last_probe: Mutex::new(None),
            probing: tokio::sync::Mutex::new(()),
        }
    }

    /// Notes that the store just answered (found or not found).
    pub fn answered(&self) {
        *self.last_answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    pub async fn is_ready(&self) -> bool {
        let ReadinessWindows {
            freshness,
            probe_interval,
        } = self.windows;
        if recent(&self.last_answer, freshness) {
            return true;
        }
        let _probing = self.probing.lock().await;
        // Someone else may have probed while we waited.
        if recent(&self.last_answer, freshness) {
            return true;
        }
        if recent(&self.last_probe, probe_interval) {
            return false;
        }
        *self.last_probe.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        match tokio::time::timeout(self.probe_timeout, self.store.ping()).await {
            Ok(Ok(())) => {
                self.answered();
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readiness probe: the store did not answer");
                false
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.probe_timeout, "readiness probe: the store timed out");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::store::StoreError;

    /// A store whose ping takes `delay` and then answers, or fails if `down`.
    struct Pinged {
        pings: AtomicUsize,
        delay: Duration,
        down: bool,
    }

    #[async_trait]
    impl Backend for Pinged {
        fn backend(&self) -> &'static str {
            "pinged"
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.pings.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.down {
                return Err(StoreError::Unavailable("down".into()));
            }
            Ok(())
        }
        fn capacity(&self) -> usize {
            1
        }
    }

    fn health(delay: Duration, down: bool) -> (Arc<Pinged>, Arc<StoreHealth>) {
        let store = Arc::new(Pinged {
            pings: AtomicUsize::new(0),
            delay,
            down,
        });
        let windows = ReadinessWindows {
            freshness: Duration::from_secs(60),
            probe_interval: Duration::from_millis(200),
        };
        let health = Arc::new(StoreHealth::new(store.clone(), Duration::from_millis(100), windows));
        (store, health)
    }

    #[tokio::test]
    async fn concurrent_checks_share_one_probe() {
        let (store, health) = health(Duration::from_millis(30), false);
        let checks: Vec<_> = (0..10)
            .map(|_| {
                let health = health.clone();
                tokio::spawn(async move { health.is_ready().await })
            })
            .collect();
        for check in checks {
            assert!(check.await.unwrap());
        }
        assert_eq!(store.pings.load(Ordering::SeqCst), 1);
        // Fresh: no probe at all.
        assert!(health.is_ready().await);
        assert_eq!(store.pings.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_slow_or_failing_store_is_not_ready_and_is_probed_at_most_once_per_interval() {
        for (delay, down) in [(Duration::from_secs(5), false), (Duration::ZERO, true)] {
            let (store, health) = health(delay, down);
            let started = Instant::now();
            assert!(!health.is_ready().await);
            assert!(started.elapsed() < Duration::from_secs(2), "the probe is bounded");
            // Asked again within the probe interval: the same verdict, no probe.
            assert!(!health.is_ready().await);
            assert_eq!(store.pings.load(Ordering::SeqCst), 1);
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert!(!health.is_ready().await);
            assert_eq!(store.pings.load(Ordering::SeqCst), 2);
            // A lookup that got an answer makes the replica ready at once.
            health.answered();
            assert!(health.is_ready().await);
            assert_eq!(store.pings.load(Ordering::SeqCst), 2);
        }
    }
}
