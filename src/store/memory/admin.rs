//! The admin writes and reads, each a few map operations under the lock:
//! the rulebook decides, this file only keeps.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{AutojoinKey, Integration, IntegrationKey, MemoryStore, Org, Usage};
use crate::store::changes::{ChangeFeed, PollingFeed};
use crate::store::rules::{self, AutojoinChange, KeyValues};
use crate::store::{
    Admin, KeyChange, KeyUsage, NewAutojoinKey, NewIntegrationKey, STATUS_ACTIVE, StoreError, UsageKey, rfc3339,
};

fn values(k: &IntegrationKey) -> KeyValues {
    KeyValues {
        status: k.status.clone(),
        tier: k.tier,
        expires_at: k.expires_at.clone(),
    }
}

#[async_trait]
impl Admin for MemoryStore {
    fn change_feed(&self, interval: Duration) -> Box<dyn ChangeFeed> {
        Box::new(PollingFeed::new(self.clone(), interval))
    }

    async fn change_autojoin_key(&self, org: &str, fingerprint: &str, to: AutojoinChange) -> Result<(), StoreError> {
        let change = to;
        let mut state = self.state()?;
        let keys = &state.orgs.get(org).ok_or_else(|| rules::org_not_found(org))?.keys;
        let hash = rules::pick_by_fingerprint(org, fingerprint, keys.keys(), |h| h.as_str())?.clone();
        let before = keys[&hash].expires_at.clone();
        let (after, effects) = rules::change_autojoin_key(&self.operator, org, &hash, before.as_deref(), change);
        let keys = &mut state.orgs.get_mut(org).ok_or_else(|| rules::org_not_found(org))?.keys;
        match after {
            None => {
                keys.remove(&hash);
            }
            Some(expires_at) => {
                if let Some(k) = keys.get_mut(&hash) {
                    k.expires_at = expires_at;
                }
            }
        }
        state.apply(effects);
        Ok(())
    }

    async fn create_integration_key(&self, key: &NewIntegrationKey) -> Result<bool, StoreError> {
        let mut state = self.state()?;
        let created = !state.integrations.contains_key(&key.integration_id);
        let integration = state
            .integrations
            .entry(key.integration_id.clone())
            .or_insert_with(|| Integration {
                description: key.integration_description.clone(),
                created_at: rfc3339(key.created_at),
                keys: BTreeMap::new(),
            });
        if integration.keys.contains_key(&key.key_id) {
            if created {
                state.integrations.remove(&key.integration_id);
            }
            return Err(rules::key_exists(&key.integration_id, &key.key_id));
        }
        integration.keys.insert(
            key.key_id.clone(),
            IntegrationKey {
                hash: key.key_hash.clone(),
                status: STATUS_ACTIVE.to_owned(),
                tier: key.tier,
                description: key.key_description.clone(),
                created_at: rfc3339(key.created_at),
                expires_at: key.expires_at.map(rules::expiry_text),
                usage: Usage::default(),
            },
        );
        state.apply(rules::create_integration_key(&self.operator, key));
        Ok(created)
    }

    async fn create_org(&self, name: &str, email: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        let mut state = self.state()?;
        if state.orgs.contains_key(name) {
            return Err(rules::org_exists(name));
        }
        state.orgs.insert(
            name.to_owned(),
            Org {
                email: email.to_owned(),
                created_at: rfc3339(now),
                keys: BTreeMap::new(),
            },
        );
        state.apply(rules::create_org(&self.operator, name, email));
        Ok(())
    }

    async fn create_autojoin_key(&self, new: &NewAutojoinKey<'_>) -> Result<(), StoreError> {
        let (org, key, now, expires_at) = (new.org, new.key, new.created_at, new.expires_at);
        let hash = key.secret().sha256_hex();
        let mut state = self.state()?;
        if state.orgs.values().any(|o| o.keys.contains_key(&hash)) {
            return Err(rules::autojoin_key_exists());
        }
        let keys = &mut state.orgs.get_mut(org).ok_or_else(|| rules::org_not_found(org))?.keys;
        keys.insert(
            hash.clone(),
            AutojoinKey {
                created_at: rfc3339(now),
                expires_at: expires_at.map(rules::expiry_text),
                usage: Usage::default(),
            },
        );
        state.apply(rules::create_autojoin_key(&self.operator, org, &hash, expires_at));
        Ok(())
    }

    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        let mut state = self.state()?;
        for u in usage {
            let found = match &u.key {
                UsageKey::Integration { integration_id, key_id } => state
                    .integrations
                    .get_mut(integration_id)
                    .and_then(|i| i.keys.get_mut(key_id))
                    .map(|k| &mut k.usage),
                UsageKey::Autojoin { key_hash } => state
                    .orgs
                    .values_mut()
                    .find_map(|o| o.keys.get_mut(key_hash))
                    .map(|k| &mut k.usage),
            };
            if let Some(usage) = found {
                (usage.tokens, usage.last_used_at) =
                    rules::add_usage(usage.tokens, usage.last_used_at, u.tokens, u.last_used_at);
            }
        }
        Ok(())
    }

    async fn delete_integration(&self, integration_id: &str) -> Result<usize, StoreError> {
        let mut state = self.state()?;
        let removed = state
            .integrations
            .remove(integration_id)
            .ok_or_else(|| rules::integration_not_found(integration_id))?;
        let keys = removed.keys.len();
        state.apply(rules::delete_integration(&self.operator, integration_id, keys));
        Ok(keys)
    }

    async fn update_integration_key(&self, integration: &str, key_id: &str, to: KeyChange) -> Result<(), StoreError> {
        let (integration_id, change) = (integration, to);
        let mut state = self.state()?;
        let key = state
            .integrations
            .get_mut(integration_id)
            .and_then(|i| i.keys.get_mut(key_id))
            .ok_or_else(|| rules::key_not_found(integration_id, key_id))?;
        let (after, effects) =
            rules::change_integration_key(&self.operator, integration_id, key_id, &values(key), &change);
        (key.status, key.tier, key.expires_at) = (after.status, after.tier, after.expires_at);
        state.apply(effects);
        Ok(())
    }

    async fn delete_integration_key(&self, integration_id: &str, key_id: &str) -> Result<(), StoreError> {
        let mut state = self.state()?;
        let key = state
            .integrations
            .get_mut(integration_id)
            .and_then(|i| i.keys.remove(key_id))
            .ok_or_else(|| rules::key_not_found(integration_id, key_id))?;
        state.apply(rules::delete_integration_key(
            &self.operator,
            integration_id,
            key_id,
            &values(&key),
        ));
        Ok(())
    }

    async fn delete_org(&self, org: &str) -> Result<usize, StoreError> {
        let mut state = self.state()?;
        let removed = state.orgs.remove(org).ok_or_else(|| rules::org_not_found(org))?;
        let keys = removed.keys.len();
        state.apply(rules::delete_org(&self.operator, org, keys));
        Ok(keys)
    }
}
