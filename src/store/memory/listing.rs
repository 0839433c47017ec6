//! The admin CLI's reads.

use async_trait::async_trait;

use super::{IntegrationKey, MemoryStore, Usage};
use crate::api_key::fingerprint_of_hash;
use crate::store::rules;
use crate::store::{AuditFilter, AuditRecord, AutojoinKeyInfo, IntegrationInfo, KeyInfo, Listing, OrgInfo, StoreError};

fn used_text(usage: &Usage) -> Option<String> {
    usage.last_used_at.map(rules::expiry_text)
}

fn key_info(key_id: &str, k: &IntegrationKey) -> KeyInfo {
    KeyInfo {
        key_id: key_id.to_owned(),
        status: k.status.clone(),
        tier: k.tier,
        created_at: k.created_at.clone(),
        description: k.description.clone(),
        expires_at: k.expires_at.clone(),
        last_used_at: used_text(&k.usage),
        tokens_issued: k.usage.tokens,
    }
}

#[async_trait]
impl Listing for MemoryStore {
    async fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.state()?.integrations.is_empty())
    }

    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let state = self.state()?;
        Ok(state.audit.iter().filter(|r| filter.matches(r)).cloned().collect())
    }

    async fn list_integrations(&self) -> Result<Vec<IntegrationInfo>, StoreError> {
        let state = self.state()?;
        Ok(state
            .integrations
            .iter()
            .map(|(id, i)| IntegrationInfo {
                integration_id: id.clone(),
                description: i.description.clone(),
                created_at: i.created_at.clone(),
            })
            .collect())
    }

    async fn list_integration_keys(&self, integration_id: &str) -> Result<Vec<KeyInfo>, StoreError> {
        let state = self.state()?;
        let integration = state
            .integrations
            .get(integration_id)
            .ok_or_else(|| rules::integration_not_found(integration_id))?;
        Ok(integration.keys.iter().map(|(id, k)| key_info(id, k)).collect())
    }

    async fn get_integration_key(&self, integration_id: &str, key_id: &str) -> Result<KeyInfo, StoreError> {
        let state = self.state()?;
        state
            .integrations
            .get(integration_id)
            .and_then(|i| i.keys.get(key_id))
            .map(|k| key_info(key_id, k))
            .ok_or_else(|| rules::key_not_found(integration_id, key_id))
    }

    async fn list_orgs(&self) -> Result<Vec<OrgInfo>, StoreError> {
        let state = self.state()?;
        Ok(state
            .orgs
            .iter()
            .map(|(name, o)| OrgInfo {
                org: name.clone(),
                email: o.email.clone(),
                created_at: o.created_at.clone(),
                probability_multiplier: Some(1.0),
            })
            .collect())
    }

    async fn list_autojoin_keys(&self, org: &str) -> Result<Vec<AutojoinKeyInfo>, StoreError> {
        let state = self.state()?;
        let o = state.orgs.get(org).ok_or_else(|| rules::org_not_found(org))?;
        let mut keys: Vec<AutojoinKeyInfo> = o
            .keys
            .iter()
            .map(|(hash, k)| AutojoinKeyInfo {
                fingerprint: fingerprint_of_hash(hash),
                created_at: k.created_at.clone(),
                expires_at: k.expires_at.clone(),
                last_used_at: used_text(&k.usage),
                tokens_issued: k.usage.tokens,
            })
            .collect();
        keys.sort_by(|a, b| (&a.created_at, &a.fingerprint).cmp(&(&b.created_at, &b.fingerprint)));
        Ok(keys)
    }
}
