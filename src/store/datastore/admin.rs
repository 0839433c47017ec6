//! The admin writes and reads. Each write runs in a transaction: it reads
//! what the rulebook needs, asks the rulebook, and commits its mutations
//! with the audit record and published change the rulebook returns.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::feed::DatastoreLog;
use super::wire::{self, Entity, Key};
use super::{
    AUDIT_KIND, AUTOJOIN_KEY_KIND, DatastoreStore, INTEGRATION_KEY_KIND, INTEGRATION_KIND,
    INTEGRATION_STATE_PARENT_KIND, KEY_STATE_KIND, KeyState, ORGANIZATION_KIND, TxError, fingerprint_of_full,
    found_entity, insert, properties,
};
use crate::store::changes::{ChangeFeed, PollingFeed};
use crate::store::rules::{self, AutojoinChange, Effects, KeyValues};
use crate::store::{
    Admin, AuditRecord, KeyChange, KeyUsage, NewAutojoinKey, NewIntegrationKey, STATUS_ACTIVE, StoreError, UsageKey,
};

#[async_trait]
impl Admin for DatastoreStore {
    fn change_feed(&self, interval: Duration) -> Box<dyn ChangeFeed> {
        let log = DatastoreLog {
            client: self.client.clone(),
            partition: self.own.clone(),
        };
        Box::new(PollingFeed::new(log, interval))
    }

    async fn change_autojoin_key(&self, org: &str, fingerprint: &str, to: AutojoinChange) -> Result<(), StoreError> {
        let change = to;
        rules::check_fingerprint(fingerprint)?;
        self.in_transaction(|tx| async move {
            let keys = self.org_keys(org, Some(&tx)).await?;
            let hashed = keys.iter().map(|e| (fingerprint_of_full(e), e));
            let (hash, one) =
                rules::pick_by_fingerprint(org, fingerprint, hashed, |(h, _)| h.as_str()).map_err(TxError::Store)?;
            let state_key = self.autojoin_state_key(&hash);
            let found = self.client.lookup(std::slice::from_ref(&state_key), Some(&tx)).await?;
            let mut state = KeyState::from_entity(found_entity(&found.found, &state_key));
            let before = state.expires_text();
            let (after, effects) = rules::change_autojoin_key(&self.operator, org, &hash, before.as_deref(), change);
            let mut mutations = match after {
                None => vec![json!({ "delete": one.key }), json!({ "delete": state_key })],
                Some(expires_at) => {
                    state.expires_at = instant(expires_at.as_deref());
                    vec![state.upsert(state_key)]
                }
            };
            mutations.extend(self.record(&tx, effects).await?);
            Ok(((), mutations))
        })
        .await
    }

    async fn create_integration_key(&self, new: &NewIntegrationKey) -> Result<bool, StoreError> {
        let meta_key = Self::key(&self.integrations, &[(INTEGRATION_KIND, &new.integration_id)]);
        let key_key = self.integration_key_path(&new.integration_id, &new.key_id);
        let result = self
            .in_transaction(|tx| {
                let (meta_key, key_key) = (meta_key.clone(), key_key.clone());
                async move {
                    let mut mutations = Vec::new();
                    let create = !self.exists(&meta_key, &tx).await?;
                    if create {
                        mutations.push(insert(
                            meta_key,
                            properties([
                                ("created_at", wire::timestamp(new.created_at)),
                                ("description", wire::string(&new.integration_description)),
                            ]),
                        ));
                    }
                    mutations.push(insert(
                        key_key,
                        properties([
                            ("key_hash", wire::string(&new.key_hash)),
                            ("created_at", wire::timestamp(new.created_at)),
                            ("description", wire::string(&new.key_description)),
                            ("status", wire::string(STATUS_ACTIVE)),
                            ("tier", wire::integer(new.tier)),
                        ]),
                    ));
                    let state = KeyState {
                        expires_at: new.expires_at.map(rules::expiry_instant),
                        ..KeyState::default()
                    };
                    mutations.push(state.upsert(self.integration_state_key(&new.integration_id, &new.key_id)));
                    let effects = rules::create_integration_key(&self.operator, new);
                    mutations.extend(self.record(&tx, effects).await?);
                    Ok((create, mutations))
                }
            })
            .await;
        match result {
            Err(StoreError::AlreadyExists(_)) => Err(rules::key_exists(&new.integration_id, &new.key_id)),
            other => other,
        }
    }

    async fn create_org(&self, name: &str, email: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        let key = Self::key(&self.platform, &[(ORGANIZATION_KIND, name)]);
        let result = self
            .in_transaction(|tx| {
                let key = key.clone();
                async move {
                    let mut mutations = vec![insert(
                        key,
                        properties([
                            ("name", wire::string(name)),
                            ("email", wire::string(email)),
                            ("created_at", wire::timestamp(now)),
                            ("probability_multiplier", wire::double(1.0)),
                        ]),
                    )];
                    mutations.extend(self.record(&tx, rules::create_org(&self.operator, name, email)).await?);
                    Ok(((), mutations))
                }
            })
            .await;
        match result {
            Err(StoreError::AlreadyExists(_)) => Err(rules::org_exists(name)),
            other => other,
        }
    }

    async fn create_autojoin_key(&self, new: &NewAutojoinKey<'_>) -> Result<(), StoreError> {
        let (org, key, now, expires_at) = (new.org, new.key, new.created_at, new.expires_at);
        let org_key = Self::key(&self.platform, &[(ORGANIZATION_KIND, org)]);
        let hash = key.secret().sha256_hex();
        let plaintext = key.secret().expose();
        let key_key = Self::key(
            &self.platform,
            &[(ORGANIZATION_KIND, org), (AUTOJOIN_KEY_KIND, plaintext)],
        );
        let result = self
            .in_transaction(|tx| {
                let (org_key, key_key, hash) = (org_key.clone(), key_key.clone(), hash.clone());
                async move {
                    if !self.exists(&org_key, &tx).await? {
                        return Err(TxError::Store(rules::org_not_found(org)));
                    }
                    let state = KeyState {
                        expires_at: expires_at.map(rules::expiry_instant),
                        ..KeyState::default()
                    };
                    let mut mutations = vec![
                        insert(
                            key_key,
                            properties([("created_at", wire::timestamp(now)), ("key", wire::string(plaintext))]),
                        ),
                        state.upsert(self.autojoin_state_key(&hash)),
                    ];
                    let effects = rules::create_autojoin_key(&self.operator, org, &hash, expires_at);
                    mutations.extend(self.record(&tx, effects).await?);
                    Ok(((), mutations))
                }
            })
            .await;
        match result {
            Err(StoreError::AlreadyExists(_)) => Err(rules::autojoin_key_exists()),
            other => other,
        }
    }

    async fn delete_integration(&self, integration_id: &str) -> Result<usize, StoreError> {
        let meta = Self::key(&self.integrations, &[(INTEGRATION_KIND, integration_id)]);
        self.in_transaction(|tx| {
            let meta = meta.clone();
            async move {
                if !self.exists(&meta, &tx).await? {
                    return Err(TxError::Store(rules::integration_not_found(integration_id)));
                }
                let keys = self
                    .client
                    .run_query_all(
                        &self.integrations,
                        wire::ancestor_query(INTEGRATION_KEY_KIND, &meta, true),
                        Some(&tx),
                    )
                    .await?;
                let count = keys.len();
                let states = Self::key(&self.own, &[(INTEGRATION_STATE_PARENT_KIND, integration_id)]);
                let states = self
                    .client
                    .run_query_all(
                        &self.own,
                        wire::ancestor_query(KEY_STATE_KIND, &states, true),
                        Some(&tx),
                    )
                    .await?;
                let mut mutations: Vec<Value> = keys
                    .into_iter()
                    .chain(states)
                    .map(|e| json!({ "delete": e.key }))
                    .collect();
                mutations.push(json!({ "delete": meta }));
                let effects = rules::delete_integration(&self.operator, integration_id, count);
                mutations.extend(self.record(&tx, effects).await?);
                Ok((count, mutations))
            }
        })
        .await
    }

    async fn update_integration_key(&self, integration: &str, key_id: &str, to: KeyChange) -> Result<(), StoreError> {
        let (integration_id, change) = (integration, to);
        let key = self.integration_key_path(integration_id, key_id);
        let state_key = self.integration_state_key(integration_id, key_id);
        self.in_transaction(|tx| {
            let (key, state_key, change) = (key.clone(), state_key.clone(), change.clone());
            async move {
                let found = self.client.lookup(&[key.clone(), state_key.clone()], Some(&tx)).await?;
                let Some(entity) = found_entity(&found.found, &key) else {
                    return Err(TxError::Store(rules::key_not_found(integration_id, key_id)));
                };
                // Everything else stays exactly as stored, including any
                // property another program wrote.
                let mut entity = entity.clone();
                let mut state = KeyState::from_entity(found_entity(&found.found, &state_key));
                let before = key_values(&entity, &state);
                let (after, effects) =
                    rules::change_integration_key(&self.operator, integration_id, key_id, &before, &change);
                let mut mutations = Vec::new();
                match change {
                    KeyChange::Status(_) => {
                        entity.properties.insert("status".into(), wire::string(&after.status));
                    }
                    KeyChange::Tier(_) => {
                        entity.properties.insert("tier".into(), wire::integer(after.tier));
                    }
                    KeyChange::Expiry(_) => {
                        state.expires_at = instant(after.expires_at.as_deref());
                        mutations.push(state.upsert(state_key));
                    }
                }
                mutations.push(json!({ "update": entity }));
                mutations.extend(self.record(&tx, effects).await?);
                Ok(((), mutations))
            }
        })
        .await
    }

    async fn delete_integration_key(&self, integration_id: &str, key_id: &str) -> Result<(), StoreError> {
        let key = self.integration_key_path(integration_id, key_id);
        let state_key = self.integration_state_key(integration_id, key_id);
        self.in_transaction(|tx| {
            let (key, state_key) = (key.clone(), state_key.clone());
            async move {
                let found = self.client.lookup(&[key.clone(), state_key.clone()], Some(&tx)).await?;
                let Some(entity) = found_entity(&found.found, &key) else {
                    return Err(TxError::Store(rules::key_not_found(integration_id, key_id)));
                };
                let state = KeyState::from_entity(found_entity(&found.found, &state_key));
                let effects =
                    rules::delete_integration_key(&self.operator, integration_id, key_id, &key_values(entity, &state));
                let mut mutations = vec![json!({ "delete": key }), json!({ "delete": state_key })];
                mutations.extend(self.record(&tx, effects).await?);
                Ok(((), mutations))
            }
        })
        .await
    }

    async fn delete_org(&self, org: &str) -> Result<usize, StoreError> {
        let org_key = Self::key(&self.platform, &[(ORGANIZATION_KIND, org)]);
        self.in_transaction(|tx| {
            let org_key = org_key.clone();
            async move {
                let keys = self.org_keys(org, Some(&tx)).await?;
                let count = keys.len();
                let states: Vec<Value> = keys
                    .iter()
                    .map(|e| json!({ "delete": self.autojoin_state_key(&fingerprint_of_full(e)) }))
                    .collect();
                let mut mutations: Vec<Value> = keys.into_iter().map(|e| json!({ "delete": e.key })).collect();
                mutations.extend(states);
                mutations.push(json!({ "delete": org_key }));
                mutations.extend(self.record(&tx, rules::delete_org(&self.operator, org, count)).await?);
                Ok((count, mutations))
            }
        })
        .await
    }

    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        // A transaction per batch, so concurrent replicas add up instead of
        // overwriting each other's counts.
        for batch in usage.chunks(USAGE_BATCH) {
            let keys: Vec<Key> = batch
                .iter()
                .map(|u| match &u.key {
                    UsageKey::Integration { integration_id, key_id } => {
                        self.integration_state_key(integration_id, key_id)
                    }
                    UsageKey::Autojoin { key_hash } => self.autojoin_state_key(key_hash),
                })
                .collect();
            self.in_transaction(|tx| {
                let keys = keys.clone();
                async move {
                    let found = self.client.lookup(&keys, Some(&tx)).await?;
                    let mutations = batch
                        .iter()
                        .zip(keys)
                        .map(|(u, key)| {
                            let mut state = KeyState::from_entity(found_entity(&found.found, &key));
                            state.tokens_issued = state
                                .tokens_issued
                                .saturating_add(i64::try_from(u.tokens).unwrap_or(i64::MAX));
                            state.last_used_at = state.last_used_at.max(Some(u.last_used_at));
                            state.upsert(key)
                        })
                        .collect();
                    Ok(((), mutations))
                }
            })
            .await?;
        }
        Ok(())
    }
}

/// Usage of this many keys is written per transaction (well under
/// Datastore's 500 mutations per commit).
const USAGE_BATCH: usize = 200;

/// The audited values of an integration key, from its entity and state.
fn key_values(e: &Entity, state: &KeyState) -> KeyValues {
    KeyValues {
        status: e.string("status").unwrap_or_default().to_owned(),
        tier: e.integer("tier").unwrap_or(0),
        expires_at: state.expires_text(),
    }
}

fn instant(text: Option<&str>) -> Option<OffsetDateTime> {
    text.and_then(|t| OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
}

impl DatastoreStore {
    /// The mutations that record what a write does, committed with it: its
    /// audit record, and its published change.
    async fn record(&self, tx: &str, effects: Effects) -> Result<Vec<Value>, TxError> {
        let mut mutations = vec![self.audit(&effects.audit)];
        if let Some(what) = &effects.publish {
            mutations.extend(self.publish(tx, what).await?);
        }
        Ok(mutations)
    }

    /// The mutation that appends `record` to the audit log, committed with
    /// the change it records.
    fn audit(&self, record: &AuditRecord) -> Value {
        let name = format!("{}-{}", record.at, crate::ground::random_hex(8));
        let at = OffsetDateTime::parse(&record.at, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        let text = |v: Option<&str>| match v {
            Some(t) => json!({ "stringValue": t, "excludeFromIndexes": true }),
            None => json!({ "nullValue": null, "excludeFromIndexes": true }),
        };
        let json_text = |v: &Option<Value>| text(v.as_ref().map(Value::to_string).as_deref());
        insert(
            Self::key(&self.own, &[(AUDIT_KIND, &name)]),
            properties([
                ("at", wire::timestamp(at)),
                ("operator", text(Some(&record.operator))),
                ("action", text(Some(&record.action))),
                ("integration_id", text(record.integration_id.as_deref())),
                ("key_id", text(record.key_id.as_deref())),
                ("org", text(record.org.as_deref())),
                ("fingerprint", text(record.fingerprint.as_deref())),
                ("before", json_text(&record.before)),
                ("after", json_text(&record.after)),
            ]),
        )
    }
}
