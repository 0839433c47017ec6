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
