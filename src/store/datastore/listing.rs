//! The admin CLI's reads.

use async_trait::async_trait;
use serde_json::json;

use super::wire::{self, Entity, Key};
use super::{
    AUDIT_KIND, DatastoreStore, INTEGRATION_KEY_KIND, INTEGRATION_KIND, KeyState, ORGANIZATION_KIND, fingerprint_of,
    fingerprint_of_full, found_entity,
};
use crate::store::rules;
use crate::store::{
    AuditFilter, AuditRecord, AutojoinKeyInfo, IntegrationInfo, KeyInfo, Listing, OrgInfo, StoreError, rfc3339,
};

fn key_info(e: &Entity, state: &KeyState) -> KeyInfo {
    KeyInfo {
        key_id: e.key.name().unwrap_or_default().to_owned(),
        status: e.string("status").unwrap_or_default().to_owned(),
        tier: e.integer("tier").unwrap_or(0),
        created_at: e.timestamp("created_at"),
        description: e.string("description").unwrap_or_default().to_owned(),
        expires_at: state.expires_at.map(rfc3339),
        last_used_at: state.last_used_at.map(rfc3339),
        tokens_issued: state.tokens_issued,
    }
}

#[async_trait]
impl Listing for DatastoreStore {
    async fn is_empty(&self) -> Result<bool, StoreError> {
        let response = self
            .client
            .run_query(&self.integrations, wire::keys_only_query(INTEGRATION_KIND, 1))
            .await?;
        Ok(response.batch.entity_results.is_empty())
    }

    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let mut query = json!({
            "kind": [{ "name": AUDIT_KIND }],
            "order": [{ "property": { "name": "at" }, "direction": "ASCENDING" }],
        });
        if let Some(since) = filter.since {
            query["filter"] = json!({ "propertyFilter": {
                "property": { "name": "at" },
                "op": "GREATER_THAN_OR_EQUAL",
                "value": wire::timestamp(since),
            } });
        }
        let entities = self.client.run_query_all(&self.own, query, None).await?;
        let records = entities.iter().map(|e| {
            let text = |name: &str| e.string(name).map(str::to_owned);
            let json = |name: &str| e.string(name).and_then(|t| serde_json::from_str(t).ok());
            AuditRecord {
                at: e.timestamp("at"),
                operator: text("operator").unwrap_or_default(),
                action: text("action").unwrap_or_default(),
                integration_id: text("integration_id"),
                key_id: text("key_id"),
                org: text("org"),
                fingerprint: text("fingerprint"),
                before: json("before"),
                after: json("after"),
            }
        });
        Ok(records.filter(|r| filter.matches(r)).collect())
    }

    async fn list_integrations(&self) -> Result<Vec<IntegrationInfo>, StoreError> {
        let entities = self
            .client
            .run_query_all(&self.integrations, wire::kind_query(INTEGRATION_KIND), None)
            .await?;
        let mut list: Vec<IntegrationInfo> = entities
            .iter()
            .map(|e| IntegrationInfo {
                integration_id: e.key.name().unwrap_or_default().to_owned(),
                description: e.string("description").unwrap_or_default().to_owned(),
                created_at: e.timestamp("created_at"),
            })
            .collect();
        list.sort_by(|a, b| a.integration_id.cmp(&b.integration_id));
        Ok(list)
    }

    async fn list_integration_keys(&self, integration_id: &str) -> Result<Vec<KeyInfo>, StoreError> {
        let meta = Self::key(&self.integrations, &[(INTEGRATION_KIND, integration_id)]);
        let found = self.client.lookup(std::slice::from_ref(&meta), None).await?;
        if found.found.is_empty() {
            return Err(StoreError::NotFound(format!("integration {integration_id}")));
        }
        let entities = self
            .client
            .run_query_all(
                &self.integrations,
                wire::ancestor_query(INTEGRATION_KEY_KIND, &meta, false),
                None,
            )
            .await?;
        let state_keys: Vec<Key> = entities
            .iter()
            .map(|e| self.integration_state_key(integration_id, e.key.name().unwrap_or_default()))
            .collect();
        let states = self.lookup_all(&state_keys).await?;
        let mut keys: Vec<KeyInfo> = entities
            .iter()
            .zip(&state_keys)
            .map(|(e, state_key)| key_info(e, &KeyState::from_entity(found_entity(&states, state_key))))
            .collect();
        keys.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        Ok(keys)
    }

    async fn get_integration_key(&self, integration_id: &str, key_id: &str) -> Result<KeyInfo, StoreError> {
        let key = self.integration_key_path(integration_id, key_id);
        let state_key = self.integration_state_key(integration_id, key_id);
        let found = self.client.lookup(&[key.clone(), state_key.clone()], None).await?;
        let state = KeyState::from_entity(found_entity(&found.found, &state_key));
        found_entity(&found.found, &key)
            .map(|e| key_info(e, &state))
            .ok_or_else(|| rules::key_not_found(integration_id, key_id))
    }

    async fn list_orgs(&self) -> Result<Vec<OrgInfo>, StoreError> {
        let entities = self
            .client
            .run_query_all(&self.platform, wire::kind_query(ORGANIZATION_KIND), None)
            .await?;
        let mut list: Vec<OrgInfo> = entities
            .iter()
            .map(|e| OrgInfo {
                org: e.key.name().unwrap_or_default().to_owned(),
                email: e.string("email").unwrap_or_default().to_owned(),
                created_at: e.timestamp("created_at"),
                probability_multiplier: e.double("probability_multiplier"),
            })
            .collect();
        list.sort_by(|a, b| a.org.cmp(&b.org));
        Ok(list)
    }

    async fn list_autojoin_keys(&self, org: &str) -> Result<Vec<AutojoinKeyInfo>, StoreError> {
        let entities = self.org_keys(org, None).await?;
        let state_keys: Vec<Key> = entities
            .iter()
            .map(|e| self.autojoin_state_key(&fingerprint_of_full(e)))
            .collect();
        let states = self.lookup_all(&state_keys).await?;
        let mut keys: Vec<AutojoinKeyInfo> = entities
            .iter()
            .zip(&state_keys)
            .map(|(e, state_key)| {
                let state = KeyState::from_entity(found_entity(&states, state_key));
                AutojoinKeyInfo {
                    fingerprint: fingerprint_of(e),
                    created_at: e.timestamp("created_at"),
                    expires_at: state.expires_text(),
                    last_used_at: state.last_used_at.map(rfc3339),
                    tokens_issued: state.tokens_issued,
                }
            })
            .collect();
        keys.sort_by(|a, b| (&a.created_at, &a.fingerprint).cmp(&(&b.created_at, &b.fingerprint)));
        Ok(keys)
    }
}

impl DatastoreStore {
    /// Looks up any number of keys (in batches of Datastore's limit).
    async fn lookup_all(&self, keys: &[Key]) -> Result<Vec<wire::EntityResult>, StoreError> {
        let mut found = Vec::new();
        for batch in keys.chunks(1000) {
            found.extend(self.client.lookup(batch, None).await?.found);
        }
        Ok(found)
    }
}
