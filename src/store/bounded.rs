//! A layer over any backend that bounds the request path's store calls and
//! never abandons one halfway.
//!
//! Without it, a client that hangs up cancels the lookup it started. For
//! SQLite that leaves a connection's worker thread blocked on a lock while
//! the pool opens a replacement, so aborting clients against a locked
//! database multiply threads and file descriptors. Here each call first
//! takes one of [`Backend::capacity`] permits (waiting at most the store
//! timeout; then the caller gets 503), and then runs as its own task, which
//! finishes and returns the permit whether or not anyone still waits. So
//! there are never more calls outstanding than the store has connections.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{AutojoinKeyRecord, AutojoinKeys, Backend, IntegrationKeyRecord, IntegrationKeys, Lookups, StoreError};
use crate::api_key::AutojoinApiKey;

pub struct Bounded {
    inner: Arc<dyn Lookups>,
    /// One per call the store can serve at once.
    permits: Arc<Semaphore>,
    /// How long a call waits for a permit before giving up (503).
    wait: Duration,
}

impl Bounded {
    pub fn new(inner: Arc<dyn Lookups>, wait: Duration) -> Self {
        let permits = Arc::new(Semaphore::new(inner.capacity().max(1)));
        Self { inner, permits, wait }
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, StoreError> {
        match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a full one.
            Ok(Err(_)) | Err(_) => Err(StoreError::Unavailable(format!(
                "store busy: {} calls outstanding for {:?}",
                self.inner.capacity(),
                self.wait
            ))),
        }
    }

    /// Runs `call` to its end as a task of its own, holding a permit.
    async fn detached<T, F>(&self, call: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let permit = self.permit().await?;
        let task = tokio::spawn(async move {
            let result = call.await;
            drop(permit);
            result
        });
        task.await
            .map_err(|e| StoreError::Backend(format!("store call failed: {e}")))?
    }
}

#[async_trait]
impl IntegrationKeys for Bounded {
    async fn integration_key(
        &self,
        integration_id: &str,
        key_id: &str,
    ) -> Result<Option<IntegrationKeyRecord>, StoreError> {
        let (inner, integration_id, key_id) = (self.inner.clone(), integration_id.to_owned(), key_id.to_owned());
        self.detached(async move { inner.integration_key(&integration_id, &key_id).await })
            .await
    }
}

#[async_trait]
impl AutojoinKeys for Bounded {
    async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<AutojoinKeyRecord>, StoreError> {
        let (inner, key) = (self.inner.clone(), key.clone());
        self.detached(async move { inner.autojoin_org(&key).await }).await
    }
}

#[async_trait]
impl Backend for Bounded {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        self.detached(async move { inner.ping().await }).await
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A store whose lookups hang until released, counting how many run.
    #[derive(Default)]
    struct Slow {
        running: AtomicUsize,
        most: AtomicUsize,
        finished: AtomicUsize,
        release: tokio::sync::Notify,
        /// `ping` panics (a bug in a backend).
        panics: bool,
    }

    #[async_trait]
    impl IntegrationKeys for Slow {
        async fn integration_key(&self, _: &str, _: &str) -> Result<Option<IntegrationKeyRecord>, StoreError> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            self.release.notified().await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            self.finished.fetch_add(1, Ordering::SeqCst);
            Ok(None)
        }
    }

    #[async_trait]
    impl AutojoinKeys for Slow {
        async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<AutojoinKeyRecord>, StoreError> {
            Ok(Some(AutojoinKeyRecord {
                org: format!("org of {}", key.fingerprint()),
                expires_at: None,
            }))
        }
    }

    #[async_trait]
    impl Backend for Slow {
        fn backend(&self) -> &'static str {
            "slow"
        }
        async fn ping(&self) -> Result<(), StoreError> {
            assert!(!self.panics, "a backend bug");
            Ok(())
        }
        fn capacity(&self) -> usize {
            3
        }
    }

    #[tokio::test]
    async fn calls_are_bounded_and_finish_when_their_callers_leave() {
        let slow = Arc::new(Slow::default());
        let bounded = Arc::new(Bounded::new(slow.clone(), Duration::from_millis(50)));
        // Ten callers that give up after 20 ms: three calls start, the
        // others wait for a permit and time out without touching the store.
        for _ in 0..10 {
            let call = bounded.integration_key("i", "ki_k");
            assert!(tokio::time::timeout(Duration::from_millis(20), call).await.is_err());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(slow.most.load(Ordering::SeqCst), 3);
        // A caller now finds the store busy, after the wait, with a 503.
        let busy = bounded.integration_key("i", "ki_k").await.unwrap_err();
        assert!(matches!(busy, StoreError::Unavailable(_)), "{busy}");
        // The abandoned calls were not cancelled: released, they finish and
        // hand back their permits.
        slow.release.notify_waiters();
        for _ in 0..100 {
            if slow.finished.load(Ordering::SeqCst) == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(slow.finished.load(Ordering::SeqCst), 3);
        assert_eq!(bounded.permits.available_permits(), 3);
    }

    #[tokio::test]
    async fn every_call_reaches_the_store_and_a_panic_is_a_store_error() {
        let bounded = Bounded::new(Arc::new(Slow::default()), Duration::from_millis(50));
        assert_eq!((bounded.backend(), bounded.capacity()), ("slow", 3));
        bounded.ping().await.unwrap();
        let key = AutojoinApiKey::generate();
        let org = bounded.autojoin_org(&key).await.unwrap();
        assert_eq!(org.unwrap().org, format!("org of {}", key.fingerprint()));

        let panics = Arc::new(Slow {
            panics: true,
            ..Slow::default()
        });
        let bounded = Bounded::new(panics, Duration::from_millis(50));
        let err = bounded.ping().await.unwrap_err();
        assert!(matches!(err, StoreError::Backend(_)), "{err}");
        // The permit came back with the panicked task.
        assert_eq!(bounded.permits.available_permits(), 3);
    }
}
