//! The request path's reads: one lookup of a key and its state, or the
//! query for an autojoin key with the lookup of its state alongside.

use async_trait::async_trait;

use super::{AUTOJOIN_KEY_KIND, DATASTORE_CALLS, DatastoreStore, KeyState, found_entity, holder, redacted, wire};
use crate::api_key::AutojoinApiKey;
use crate::store::{AutojoinKeyRecord, AutojoinKeys, Backend, IntegrationKeyRecord, IntegrationKeys, StoreError};

#[async_trait]
impl IntegrationKeys for DatastoreStore {
    async fn integration_key(
        &self,
        integration_id: &str,
        key_id: &str,
    ) -> Result<Option<IntegrationKeyRecord>, StoreError> {
        let key = self.integration_key_path(integration_id, key_id);
        let state_key = self.integration_state_key(integration_id, key_id);
        // The key and its state (expiry) in one round trip.
        let response = self.client.lookup(&[key.clone(), state_key.clone()], None).await?;
        let Some(entity) = found_entity(&response.found, &key) else {
            return Ok(None);
        };
        let state = KeyState::from_entity(found_entity(&response.found, &state_key));
        Ok(Some(IntegrationKeyRecord {
            // A missing hash can never match a computed one.
            key_hash: entity.string("key_hash").unwrap_or_default().to_owned(),
            // A missing status is not "active", so the key is refused.
            status: entity.string("status").unwrap_or_default().to_owned(),
            // Keys written before tiers existed have none: the default tier.
            tier: entity.integer("tier").unwrap_or(0),
            expires_at: state.expires_at,
        }))
    }
}

#[async_trait]
impl AutojoinKeys for DatastoreStore {
    async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<AutojoinKeyRecord>, StoreError> {
        // Two results are enough to detect a key held by two organizations.
        let query = wire::equality_query(AUTOJOIN_KEY_KIND, "key", wire::string(key.secret().expose()), 2);
        // The key's state (expiry) in parallel: its path is known from the hash.
        let state_key = self.autojoin_state_key(&key.secret().sha256_hex());
        let (response, state) = tokio::join!(
            self.client.run_query(&self.platform, query),
            self.client.lookup(std::slice::from_ref(&state_key), None)
        );
        let state = KeyState::from_entity(found_entity(&state?.found, &state_key));
        // The query carries the key; no error text may.
        let response = response.map_err(|e| redacted(e, key.secret().expose()))?;
        Ok(holder(response.batch.entity_results, key, state.expires_at))
    }
}

#[async_trait]
impl Backend for DatastoreStore {
    fn backend(&self) -> &'static str {
        "datastore"
    }

    fn capacity(&self) -> usize {
        DATASTORE_CALLS
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // The lookup the request path makes, of a key that need not exist.
        self.integration_key("-", "ki_-").await.map(|_| ())
    }
}
