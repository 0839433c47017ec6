//! A layer over any backend that measures the request-path lookups: one
//! count and one duration per call that reaches the store, and a note for
//! readiness that the store answered.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::{AutojoinKeyRecord, AutojoinKeys, IntegrationKeyRecord, IntegrationKeys, Lookups, StoreError, StoreHealth};
use crate::api_key::AutojoinApiKey;
use crate::metrics::Metrics;

pub struct Instrumented {
    inner: Arc<dyn Lookups>,
    metrics: Arc<Metrics>,
    health: Arc<StoreHealth>,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Lookups>, metrics: Arc<Metrics>, health: Arc<StoreHealth>) -> Self {
        // Every outcome is a series from the start, at 0: a rate over a
        // series that appears with its first error misses that error, and
        // an alert on it cannot tell "none yet" from a renamed metric.
        for kind in ["integration", "autojoin"] {
            for outcome in ["found", "not_found", "error"] {
                metrics
                    .store_lookups
                    .with_label_values(&[inner.backend(), kind, outcome]);
            }
        }
        Self { inner, metrics, health }
    }

    fn record<T>(&self, kind: &str, started: Instant, result: &Result<Option<T>, StoreError>) {
        let backend = self.inner.backend();
        let outcome = match result {
            Ok(Some(_)) => "found",
            Ok(None) => "not_found",
            Err(_) => "error",
        };
        self.metrics
            .store_lookups
            .with_label_values(&[backend, kind, outcome])
            .inc();
        self.metrics
            .store_lookup_duration
            .with_label_values(&[backend, kind])
            .observe(started.elapsed().as_secs_f64());
        if result.is_ok() {
            self.health.answered();
        }
    }
}

#[async_trait]
impl IntegrationKeys for Instrumented {
    async fn integration_key(
        &self,
        integration_id: &str,
        key_id: &str,
    ) -> Result<Option<IntegrationKeyRecord>, StoreError> {
        let started = Instant::now();
        let result = self.inner.integration_key(integration_id, key_id).await;
        self.record("integration", started, &result);
        result
    }
}

#[async_trait]
impl AutojoinKeys for Instrumented {
    async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<AutojoinKeyRecord>, StoreError> {
        let started = Instant::now();
        let result = self.inner.autojoin_org(key).await;
        self.record("autojoin", started, &result);
        result
    }
}
