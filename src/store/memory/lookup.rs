//! The request path's reads.

use async_trait::async_trait;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::MemoryStore;
use crate::api_key::AutojoinApiKey;
use crate::store::{AutojoinKeyRecord, AutojoinKeys, Backend, IntegrationKeyRecord, IntegrationKeys, StoreError};

/// Reads back an expiry the rulebook wrote (always RFC 3339).
pub(super) fn instant(text: Option<&str>) -> Option<OffsetDateTime> {
    text.and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
}

#[async_trait]
impl IntegrationKeys for MemoryStore {
    async fn integration_key(
        &self,
        integration_id: &str,
        key_id: &str,
    ) -> Result<Option<IntegrationKeyRecord>, StoreError> {
        let state = self.state()?;
        let Some(key) = state.integrations.get(integration_id).and_then(|i| i.keys.get(key_id)) else {
            return Ok(None);
        };
        Ok(Some(IntegrationKeyRecord {
            key_hash: key.hash.clone(),
            status: key.status.clone(),
            tier: key.tier,
            expires_at: instant(key.expires_at.as_deref()),
        }))
    }
}

#[async_trait]
impl AutojoinKeys for MemoryStore {
    async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<AutojoinKeyRecord>, StoreError> {
        let hash = key.secret().sha256_hex();
        let state = self.state()?;
        for (org, o) in &state.orgs {
            if let Some(k) = o.keys.get(&hash) {
                return Ok(Some(AutojoinKeyRecord {
                    org: org.clone(),
                    expires_at: instant(k.expires_at.as_deref()),
                }));
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl Backend for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.state().map(|_| ())
    }

    fn capacity(&self) -> usize {
        // Calls take the lock for microseconds; a bound is only needed
        // because the request path asks for one.
        64
    }
}
