//! Google Cloud Datastore, in the layout M-Lab's other programs share
//! (COMPAT.md, "Google Cloud Datastore layout").
//!
//! Other programs load these entities into fixed Go structs, and a load
//! fails on a property the struct lacks, so we write exactly the listed
//! properties with exactly their types, and nothing more.

mod client;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use self::client::{CallError, Client};
use self::wire::{Entity, Key, PartitionId, PathElement};
use super::changes::{CHANGE_KIND, ChangeFeed, ChangeNotice, Invalidation, Recovery};
use super::{
    Admin, AuditFilter, AuditRecord, AutojoinKeyInfo, AutojoinKeyRecord, AutojoinKeys, Backend, IntegrationInfo,
    IntegrationKeyRecord, IntegrationKeys, KeyChange, KeyInfo, KeyUsage, NewIntegrationKey, OrgInfo, STATUS_ACTIVE,
    STATUS_REVOKED, StoreError, UsageKey, autojoin_key_state, check_fingerprint, key_not_found, key_state, rfc3339,
};
use crate::api_key::AutojoinApiKey;

/// Kinds, as the Go programs name them.
pub const INTEGRATION_KIND: &str = "IntegrationMeta";
pub const INTEGRATION_KEY_KIND: &str = "IntegrationAPIKey";
pub const ORGANIZATION_KIND: &str = "Organization";
pub const AUTOJOIN_KEY_KIND: &str = "APIKey";

/// Kinds of our own, in the `--token-exchange-ns` namespace: Go programs
/// load the kinds above into fixed structs, so what they do not know
/// (expiry, usage, the audit log) lives here. A key's state is keyed by
/// the key's path (integration keys) or its hash (autojoin keys).
pub const INTEGRATION_STATE_PARENT_KIND: &str = "TokenExchangeIntegration";
pub const KEY_STATE_KIND: &str = "TokenExchangeKeyState";
pub const AUDIT_KIND: &str = "TokenExchangeAudit";

/// Datastore calls one replica makes at once on the request path. Each is
/// an HTTPS request of a few milliseconds, so this allows thousands of
/// uncached lookups a second while bounding sockets and memory when
/// Datastore slows down.
const DATASTORE_CALLS: usize = 64;

/// Where the entities live.
#[derive(Debug, Clone)]
pub struct DatastoreConfig {
    pub project_id: String,
    /// Namespace of `Organization` and `APIKey`.
    pub platform_ns: String,
    /// Namespace of `IntegrationMeta` and `IntegrationAPIKey`.
    pub client_integration_ns: String,
    /// Namespace of this service's own kinds, such as [`CHANGE_KIND`].
    pub own_ns: String,
    /// Limit on each call to Datastore.
    pub timeout: Duration,
    /// `host:port` of the emulator (`DATASTORE_EMULATOR_HOST`), if used.
    pub emulator_host: Option<String>,
}

pub struct DatastoreStore {
    /// Shared with the change feed.
    client: Arc<Client>,
    /// Named in the audit log.
    operator: String,
    platform: PartitionId,
    integrations: PartitionId,
    /// This service's own namespace.
    own: PartitionId,
}

impl From<CallError> for StoreError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Transient(m) | CallError::Aborted(m) => StoreError::Unavailable(format!("Datastore: {m}")),
            CallError::AlreadyExists(m) => StoreError::AlreadyExists(m),
            CallError::Permanent(m) => StoreError::Backend(format!("Datastore: {m}")),
        }
    }
}

impl DatastoreStore {
    /// Prepares the client. Nothing is sent until the first operation, so a
    /// Datastore outage at start-up does not stop the server.
    pub fn new(config: &DatastoreConfig) -> Result<Self, StoreError> {
        let client = Client::new(&config.project_id, config.timeout, config.emulator_host.as_deref())
            .map_err(|e| StoreError::Config(format!("Datastore: {e}")))?;
        if client.uses_emulator() {
            tracing::info!(project = %config.project_id, "using the Datastore emulator (DATASTORE_EMULATOR_HOST)");
        }
        let partition = |ns: &str| PartitionId {
            project_id: config.project_id.clone(),
            namespace_id: ns.to_owned(),
        };
        Ok(Self {
            client: Arc::new(client),
            operator: String::new(),
            platform: partition(&config.platform_ns),
            integrations: partition(&config.client_integration_ns),
            own: partition(&config.own_ns),
        })
    }

    /// Names `operator` in the audit records of changes made through this store.
    pub fn with_operator(mut self, operator: &str) -> Self {
        operator.clone_into(&mut self.operator);
        self
    }

    /// Fails at once when no credentials can be had (see
    /// `Client::check_credentials`); an unreachable Datastore is not
    /// checked here, since it may come back.
    pub async fn check_credentials(&self) -> Result<(), StoreError> {
        self.client
            .check_credentials()
            .await
            .map_err(|e| StoreError::Config(format!("Datastore: {e}")))
    }

    fn key(partition: &PartitionId, path: &[(&str, &str)]) -> Key {
        Key {
            partition_id: partition.clone(),
            path: path
                .iter()
                .map(|(kind, name)| PathElement {
                    kind: (*kind).to_owned(),
                    name: Some((*name).to_owned()),
                    id: None,
                })
                .collect(),
        }
    }

    /// The mutations that publish `what`, committed with the change itself:
    /// the feed's head takes the next sequence number, and the change is
    /// stored under it. Reading the head in the transaction makes concurrent
    /// publishers conflict (one is run again), so sequence numbers are
    /// dense, unique and in commit order, whatever the admin machines'
    /// clocks say. `at` (the admin's clock) is kept for the lag histogram
    /// and for servers of earlier versions, which poll by it.
    async fn publish(&self, tx: &str, what: &Invalidation) -> Result<Vec<Value>, TxError> {
        let head_key = feed_head_key(&self.own);
        let found = self.client.lookup(std::slice::from_ref(&head_key), Some(tx)).await?;
        let head = FeedHead::from_entity(found_entity(&found.found, &head_key));
        let next = FeedHead {
            seq: head.seq + 1,
            token: random_token(),
        };
        let (kind, subject, key_id) = what.to_parts();
        let unindexed = |text: &str| json!({ "stringValue": text, "excludeFromIndexes": true });
        // An upsert: after a partial restore (the head from a backup, the
        // changes not) the number may be taken; the head decides.
        let change = upsert(
            Self::key(&self.own, &[(CHANGE_KIND, &change_name(next.seq))]),
            properties([
                ("seq", wire::integer(next.seq)),
                ("token", unindexed(&next.token)),
                ("at", wire::timestamp(OffsetDateTime::now_utc())),
                ("kind", unindexed(kind)),
                ("subject", unindexed(subject)),
                ("key_id", unindexed(key_id)),
            ]),
        );
        let head = upsert(
            head_key,
            properties([
                (
                    "seq",
                    json!({ "integerValue": next.seq.to_string(), "excludeFromIndexes": true }),
                ),
                ("token", unindexed(&next.token)),
            ]),
        );
        Ok(vec![head, change])
    }

    fn integration_state_key(&self, integration_id: &str, key_id: &str) -> Key {
        Self::key(
            &self.own,
            &[
                (INTEGRATION_STATE_PARENT_KIND, integration_id),
                (KEY_STATE_KIND, key_id),
            ],
        )
    }

    fn autojoin_state_key(&self, key_hash: &str) -> Key {
        Self::key(&self.own, &[(KEY_STATE_KIND, &format!("autojoin:{key_hash}"))])
    }

    /// The mutation that appends `record` to the audit log, committed with
    /// the change it records.
    fn audit(&self, record: &AuditRecord) -> Value {
        let mut random = [0u8; 8];
        crate::api_key::fill_random(&mut random);
        let name = format!("{}-{}", record.at, crate::api_key::hex_lower(&random));
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

    fn integration_key_path(&self, integration_id: &str, key_id: &str) -> Key {
        Self::key(
            &self.integrations,
            &[(INTEGRATION_KIND, integration_id), (INTEGRATION_KEY_KIND, key_id)],
        )
    }

    /// Runs `body` in a transaction and commits the mutations it returns.
    /// A transaction that loses to a concurrent one (ABORTED) is run again,
    /// a few times, as Google's own clients do.
    async fn in_transaction<T, F, Fut>(&self, body: F) -> Result<T, StoreError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<(T, Vec<Value>), TxError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_transaction(&body).await {
                Err(TxError::Call(CallError::Aborted(why))) if attempt < TRANSACTION_ATTEMPTS => {
                    tracing::debug!(attempt, %why, "Datastore transaction aborted; running it again");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(TxError::Call(e)) => return Err(e.into()),
                Err(TxError::Store(e)) => return Err(e),
                Ok(value) => return Ok(value),
            }
        }
    }

    async fn try_transaction<T, F, Fut>(&self, body: &F) -> Result<T, TxError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<(T, Vec<Value>), TxError>>,
    {
        let tx = self.client.begin_transaction().await?;
        let (value, mutations) = match body(tx.clone()).await {
            Ok(v) => v,
            Err(e) => {
                self.client.rollback(&tx).await;
                return Err(e);
            }
        };
        self.client.commit(Some(&tx), mutations).await?;
        Ok(value)
    }

    /// The `APIKey` entities of `org`; `NotFound` if the organization does not exist.
    async fn org_keys(&self, org: &str, tx: Option<&str>) -> Result<Vec<Entity>, TxError> {
        let org_key = Self::key(&self.platform, &[(ORGANIZATION_KIND, org)]);
        let found = self.client.lookup(std::slice::from_ref(&org_key), tx).await?;
        if found.found.is_empty() {
            return Err(TxError::Store(StoreError::NotFound(format!("organization {org}"))));
        }
        Ok(self
            .client
            .run_query_all(
                &self.platform,
                wire::ancestor_query(AUTOJOIN_KEY_KIND, &org_key, false),
                tx,
            )
            .await?)
    }

    async fn exists(&self, key: &Key, tx: &str) -> Result<bool, TxError> {
        let found = self.client.lookup(std::slice::from_ref(key), Some(tx)).await?;
        Ok(!found.found.is_empty())
    }
}

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

/// What this service keeps about a key beyond the Go programs' entities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct KeyState {
    expires_at: Option<OffsetDateTime>,
    last_used_at: Option<OffsetDateTime>,
    tokens_issued: i64,
}

impl KeyState {
    fn from_entity(e: Option<&Entity>) -> Self {
        let Some(e) = e else { return Self::default() };
        let time =
            |name: &str| OffsetDateTime::parse(&e.timestamp(name), &time::format_description::well_known::Rfc3339).ok();
        Self {
            expires_at: time("expires_at"),
            last_used_at: time("last_used_at"),
            tokens_issued: e.integer("tokens_issued").unwrap_or(0),
        }
    }

    fn upsert(&self, key: Key) -> Value {
        let time = |t: Option<OffsetDateTime>| match t {
            Some(t) => wire::timestamp(t),
            None => json!({ "nullValue": null }),
        };
        let entity = Entity {
            key,
            properties: properties([
                ("expires_at", time(self.expires_at)),
                ("last_used_at", time(self.last_used_at)),
                ("tokens_issued", wire::integer(self.tokens_issued)),
            ]),
        };
        json!({ "upsert": entity })
    }

    fn expires_text(&self) -> Option<String> {
        self.expires_at.map(rfc3339)
    }
}

/// The entity of `key` among `found`, if it is there.
fn found_entity<'a>(found: &'a [wire::EntityResult], key: &Key) -> Option<&'a Entity> {
    found
        .iter()
        .map(|r| &r.entity)
        .find(|e| e.key.path == key.path && e.key.partition_id.namespace_id == key.partition_id.namespace_id)
}

/// The whole SHA-256 (hex) of an autojoin key entity's name, which is the key.
fn fingerprint_of_full(e: &Entity) -> String {
    crate::api_key::sha256_hex(e.key.name().unwrap_or_default().as_bytes())
}

fn fingerprint_of(e: &Entity) -> String {
    crate::api_key::fingerprint_of_hash(&fingerprint_of_full(e))
}

/// Runs of a transaction before giving up on contention. Every admin write
/// advances the change feed's head, so concurrent operators contend there:
/// eight runs, with the backoff, wait up to about 5 s for a turn.
const TRANSACTION_ATTEMPTS: u32 = 8;

/// Exponential pause with jitter, so contending writers do not collide again.
fn backoff(attempt: u32) -> Duration {
    let mut jitter = [0u8; 1];
    crate::api_key::fill_random(&mut jitter);
    Duration::from_millis(20 * (1 << attempt.min(6)) + u64::from(jitter[0]) / 4)
}

/// Failures inside a transaction: a call that may be retried, or a decision
/// (not found, already exists) that ends it.
enum TxError {
    Call(CallError),
    Store(StoreError),
}

impl From<TxError> for StoreError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::Call(e) => e.into(),
            TxError::Store(e) => e,
        }
    }
}

impl From<CallError> for TxError {
    fn from(e: CallError) -> Self {
        TxError::Call(e)
    }
}

fn insert(key: Key, properties: Map<String, Value>) -> Value {
    json!({ "insert": Entity { key, properties } })
}

fn upsert(key: Key, properties: Map<String, Value>) -> Value {
    json!({ "upsert": Entity { key, properties } })
}

fn properties<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

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
        let response = response.map_err(|e| {
            // The query carries the key; make sure no error text can.
            let text = e.to_string().replace(key.secret().expose(), "<redacted>");
            StoreError::from(match e {
                CallError::Transient(_) => CallError::Transient(text),
                _ => CallError::Permanent(text),
            })
        })?;
        let results = response.batch.entity_results;
        if results.len() > 1 {
            tracing::error!(
                fingerprint = %key.fingerprint(),
                "an autojoin key is held by more than one organization; refusing it until the data is fixed"
            );
            return Ok(None);
        }
        let Some(result) = results.into_iter().next() else {
            return Ok(None);
        };
        match result.entity.key.parent() {
            Some(parent) if parent.kind == ORGANIZATION_KIND && parent.name.is_some() => Ok(Some(AutojoinKeyRecord {
                org: parent.name.clone().unwrap_or_default(),
                expires_at: state.expires_at,
            })),
            _ => {
                tracing::error!(
                    fingerprint = %key.fingerprint(),
                    "an autojoin key entity has no parent organization; refusing it"
                );
                Ok(None)
            }
        }
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

#[async_trait]
impl Admin for DatastoreStore {
    fn change_feed(&self, interval: Duration) -> Box<dyn ChangeFeed> {
        Box::new(DatastoreFeed {
            client: self.client.clone(),
            partition: self.own.clone(),
            interval,
            last: None,
            recovery: Recovery::default(),
        })
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
                        expires_at: new.expires_at,
                        ..KeyState::default()
                    };
                    mutations.push(state.upsert(self.integration_state_key(&new.integration_id, &new.key_id)));
                    let record = new.audit_record(&self.operator, state.expires_text().as_deref());
                    mutations.push(self.audit(&record));
                    Ok((create, mutations))
                }
            })
            .await;
        match result {
            Err(StoreError::AlreadyExists(_)) => Err(StoreError::AlreadyExists(format!(
                "key {} of integration {}",
                new.key_id, new.integration_id
            ))),
            other => other,
        }
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        let response = self
            .client
            .run_query(&self.integrations, wire::keys_only_query(INTEGRATION_KIND, 1))
            .await?;
        Ok(response.batch.entity_results.is_empty())
    }

    async fn create_org(&self, name: &str, email: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        let key = Self::key(&self.platform, &[(ORGANIZATION_KIND, name)]);
        let mutation = insert(
            key,
            properties([
                ("name", wire::string(name)),
                ("email", wire::string(email)),
                ("created_at", wire::timestamp(now)),
                ("probability_multiplier", wire::double(1.0)),
            ]),
        );
        let record = AuditRecord::new(&self.operator, "autojoin create-org")
            .org(name)
            .change(None, Some(json!({ "email": email })));
        match self.client.commit(None, vec![mutation, self.audit(&record)]).await {
            Err(CallError::AlreadyExists(_)) => Err(StoreError::AlreadyExists(format!("organization {name}"))),
            other => Ok(other?),
        }
    }

    async fn create_autojoin_key(
        &self,
        org: &str,
        key: &AutojoinApiKey,
        now: OffsetDateTime,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<(), StoreError> {
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
                        return Err(TxError::Store(StoreError::NotFound(format!("organization {org}"))));
                    }
                    let mutation = insert(
                        key_key,
                        properties([("created_at", wire::timestamp(now)), ("key", wire::string(plaintext))]),
                    );
                    let state = KeyState {
                        expires_at,
                        ..KeyState::default()
                    };
                    let record = AuditRecord::new(&self.operator, "autojoin create-key")
                        .org(org)
                        .fingerprint(&crate::api_key::fingerprint_of_hash(&hash))
                        .change(None, Some(autojoin_key_state(state.expires_text().as_deref())));
                    Ok((
                        (),
                        vec![
                            mutation,
                            state.upsert(self.autojoin_state_key(&hash)),
                            self.audit(&record),
                        ],
                    ))
                }
            })
            .await;
        match result {
            Err(StoreError::AlreadyExists(_)) => Err(StoreError::AlreadyExists("that autojoin key".into())),
            other => other,
        }
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
            .ok_or_else(|| key_not_found(integration_id, key_id))
    }

    async fn delete_integration(&self, integration_id: &str) -> Result<usize, StoreError> {
        let meta = Self::key(&self.integrations, &[(INTEGRATION_KIND, integration_id)]);
        self.in_transaction(|tx| {
            let meta = meta.clone();
            async move {
                if !self.exists(&meta, &tx).await? {
                    return Err(TxError::Store(StoreError::NotFound(format!(
                        "integration {integration_id}"
                    ))));
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
                mutations.extend(
                    self.publish(
                        &tx,
                        &Invalidation::Integration {
                            integration_id: integration_id.to_owned(),
                        },
                    )
                    .await?,
                );
                let record = AuditRecord::new(&self.operator, "integration delete")
                    .integration(integration_id)
                    .change(Some(json!({ "keys": count })), None);
                mutations.push(self.audit(&record));
                Ok((count, mutations))
            }
        })
        .await
    }

    async fn update_integration_key(
        &self,
        integration_id: &str,
        key_id: &str,
        change: KeyChange,
    ) -> Result<(), StoreError> {
        let key = self.integration_key_path(integration_id, key_id);
        let state_key = self.integration_state_key(integration_id, key_id);
        let action = match &change {
            KeyChange::Status(status) if status == STATUS_REVOKED => "key revoke",
            KeyChange::Status(_) => "key activate",
            KeyChange::Tier(_) => "key set-tier",
            KeyChange::Expiry(_) => "key set-expiry",
        };
        self.in_transaction(|tx| {
            let (key, state_key, change) = (key.clone(), state_key.clone(), change.clone());
            async move {
                let found = self.client.lookup(&[key.clone(), state_key.clone()], Some(&tx)).await?;
                let Some(entity) = found_entity(&found.found, &key) else {
                    return Err(TxError::Store(key_not_found(integration_id, key_id)));
                };
                // Everything else stays exactly as stored, including any
                // property another program wrote.
                let mut entity = entity.clone();
                let mut state = KeyState::from_entity(found_entity(&found.found, &state_key));
                let audited = |e: &Entity, s: &KeyState| {
                    key_state(
                        e.string("status").unwrap_or_default(),
                        e.integer("tier").unwrap_or(0),
                        s.expires_text().as_deref(),
                    )
                };
                let before = audited(&entity, &state);
                let mut mutations = Vec::new();
                match change {
                    KeyChange::Status(status) => {
                        entity.properties.insert("status".into(), wire::string(&status));
                    }
                    KeyChange::Tier(tier) => {
                        entity.properties.insert("tier".into(), wire::integer(tier));
                    }
                    KeyChange::Expiry(expires_at) => {
                        state.expires_at = expires_at;
                        mutations.push(state.upsert(state_key));
                    }
                }
                let record = AuditRecord::new(&self.operator, action)
                    .key(integration_id, key_id)
                    .change(Some(before), Some(audited(&entity, &state)));
                mutations.push(json!({ "update": entity }));
                mutations.push(self.audit(&record));
                mutations.extend(
                    self.publish(
                        &tx,
                        &Invalidation::IntegrationKey {
                            integration_id: integration_id.to_owned(),
                            key_id: key_id.to_owned(),
                        },
                    )
                    .await?,
                );
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
                    return Err(TxError::Store(key_not_found(integration_id, key_id)));
                };
                let state = KeyState::from_entity(found_entity(&found.found, &state_key));
                let before = key_state(
                    entity.string("status").unwrap_or_default(),
                    entity.integer("tier").unwrap_or(0),
                    state.expires_text().as_deref(),
                );
                let record = AuditRecord::new(&self.operator, "key delete")
                    .key(integration_id, key_id)
                    .change(Some(before), None);
                let published = self
                    .publish(
                        &tx,
                        &Invalidation::IntegrationKey {
                            integration_id: integration_id.to_owned(),
                            key_id: key_id.to_owned(),
                        },
                    )
                    .await?;
                let mut mutations = vec![
                    json!({ "delete": key }),
                    json!({ "delete": state_key }),
                    self.audit(&record),
                ];
                mutations.extend(published);
                Ok(((), mutations))
            }
        })
        .await
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

    async fn delete_autojoin_key(&self, org: &str, fingerprint: &str) -> Result<(), StoreError> {
        self.change_autojoin_key(org, fingerprint, None).await
    }

    async fn set_autojoin_expiry(
        &self,
        org: &str,
        fingerprint: &str,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<(), StoreError> {
        self.change_autojoin_key(org, fingerprint, Some(expires_at)).await
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
                mutations.extend(
                    self.publish(&tx, &Invalidation::Organization { org: org.to_owned() })
                        .await?,
                );
                let record = AuditRecord::new(&self.operator, "autojoin delete-org")
                    .org(org)
                    .change(Some(json!({ "keys": count })), None);
                mutations.push(self.audit(&record));
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
}

/// Usage of this many keys is written per transaction (well under
/// Datastore's 500 mutations per commit).
const USAGE_BATCH: usize = 200;

impl DatastoreStore {
    /// Looks up any number of keys (in batches of Datastore's limit).
    async fn lookup_all(&self, keys: &[Key]) -> Result<Vec<wire::EntityResult>, StoreError> {
        let mut found = Vec::new();
        for batch in keys.chunks(1000) {
            found.extend(self.client.lookup(batch, None).await?.found);
        }
        Ok(found)
    }

    /// Deletes (`expiry` None) or sets the expiry of (`Some`) the one key of
    /// `org` whose hash starts with `fingerprint`.
    async fn change_autojoin_key(
        &self,
        org: &str,
        fingerprint: &str,
        expiry: Option<Option<OffsetDateTime>>,
    ) -> Result<(), StoreError> {
        check_fingerprint(fingerprint)?;
        self.in_transaction(|tx| async move {
            let keys = self.org_keys(org, Some(&tx)).await?;
            let matches: Vec<&Entity> = keys
                .iter()
                .filter(|e| fingerprint_of_full(e).starts_with(fingerprint))
                .collect();
            let one = match matches.as_slice() {
                [] => {
                    return Err(TxError::Store(StoreError::NotFound(format!(
                        "a key with fingerprint {fingerprint} in organization {org}"
                    ))));
                }
                [one] => *one,
                _ => {
                    return Err(TxError::Store(StoreError::Ambiguous(format!(
                        "{} keys of organization {org} start with {fingerprint}; give more of the fingerprint",
                        matches.len()
                    ))));
                }
            };
            let hash = fingerprint_of_full(one);
            let state_key = self.autojoin_state_key(&hash);
            let found = self.client.lookup(std::slice::from_ref(&state_key), Some(&tx)).await?;
            let mut state = KeyState::from_entity(found_entity(&found.found, &state_key));
            let before = Some(autojoin_key_state(state.expires_text().as_deref()));
            let (record, mut mutations) = match expiry {
                None => (
                    AuditRecord::new(&self.operator, "autojoin delete-key").change(before, None),
                    vec![json!({ "delete": one.key }), json!({ "delete": state_key })],
                ),
                Some(expires_at) => {
                    state.expires_at = expires_at;
                    let after = Some(autojoin_key_state(state.expires_text().as_deref()));
                    (
                        AuditRecord::new(&self.operator, "autojoin set-expiry").change(before, after),
                        vec![state.upsert(state_key)],
                    )
                }
            };
            let record = record.org(org).fingerprint(&crate::api_key::fingerprint_of_hash(&hash));
            mutations.push(self.audit(&record));
            mutations.extend(
                self.publish(&tx, &Invalidation::Organization { org: org.to_owned() })
                    .await?,
            );
            Ok(((), mutations))
        })
        .await
    }
}

/// The kind of the change feed's head: one entity holding the sequence
/// number and token of the newest change.
pub const FEED_HEAD_KIND: &str = "TokenExchangeChangeHead";

fn feed_head_key(own: &PartitionId) -> Key {
    DatastoreStore::key(own, &[(FEED_HEAD_KIND, "head")])
}

/// Change names sort like their sequence numbers; the prefix keeps them
/// apart from the time-named changes of earlier versions.
fn change_name(seq: i64) -> String {
    format!("seq-{seq:020}")
}

fn random_token() -> String {
    let mut random = [0u8; 8];
    crate::api_key::fill_random(&mut random);
    crate::api_key::hex_lower(&random)
}

/// Where the feed stands: the sequence number of a change and its random
/// token, which tells it apart from a change with the same number in
/// another copy of the database (one restored from a backup).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FeedHead {
    seq: i64,
    token: String,
}

impl FeedHead {
    /// `None`: no change was ever published (seq 0).
    fn from_entity(e: Option<&Entity>) -> Self {
        e.map(|e| Self {
            seq: e.integer("seq").unwrap_or(0),
            token: e.string("token").unwrap_or_default().to_owned(),
        })
        .unwrap_or_default()
    }
}

/// Changes asked for per query page.
const CHANGES_PER_PAGE: i64 = 500;
/// Pages read in one poll at most; a feed further behind goes on from
/// there with the next poll.
const PAGES_PER_POLL: usize = 20;

/// Polls the head of the change feed, then reads the changes past the
/// last one seen by their sequence number. Nothing depends on the clocks
/// of the machines that wrote them.
struct DatastoreFeed {
    client: Arc<Client>,
    partition: PartitionId,
    interval: Duration,
    /// The last change seen; `None` until the first read.
    last: Option<FeedHead>,
    recovery: Recovery,
}

impl DatastoreFeed {
    async fn head(&self) -> Result<FeedHead, StoreError> {
        let key = feed_head_key(&self.partition);
        let found = self.client.lookup(std::slice::from_ref(&key), None).await?;
        Ok(FeedHead::from_entity(found_entity(&found.found, &key)))
    }

    /// Gives up the position: the changes between it and `head` cannot be
    /// known, so the whole cache goes.
    fn lost_track(&mut self, head: FeedHead, why: &str) -> Vec<ChangeNotice> {
        tracing::warn!(
            last_seq = self.last.as_ref().map_or(0, |l| l.seq),
            head_seq = head.seq,
            "{why}: dropping the whole cache"
        );
        self.last = Some(head);
        vec![ChangeNotice::everything()]
    }

    async fn poll(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
        let head = self.head().await?;
        let Some(last) = self.last.clone() else {
            // Start at the newest change: the cache is empty, nothing older matters.
            self.last = Some(head);
            return Ok(Vec::new());
        };
        if head == last {
            return Ok(Vec::new());
        }
        if head.seq <= last.seq {
            return Ok(self.lost_track(
                head,
                "the change feed's head went back (the database was restored from a backup or emptied)",
            ));
        }
        // From the last change seen, which must still be there as it was.
        let mut query = json!({
            "kind": [{ "name": CHANGE_KIND }],
            "filter": { "propertyFilter": {
                "property": { "name": "seq" },
                "op": "GREATER_THAN_OR_EQUAL",
                "value": wire::integer(last.seq),
            } },
            "order": [{ "property": { "name": "seq" }, "direction": "ASCENDING" }],
            "limit": CHANGES_PER_PAGE,
        });
        let mut notices = Vec::new();
        let mut position = last.clone();
        let mut pages = 0;
        while position.seq < head.seq && pages < PAGES_PER_POLL {
            pages += 1;
            let batch = self.client.run_query(&self.partition, query.clone()).await?.batch;
            // Datastore may end a batch before the limit (the emulator at
            // 300) and say NOT_FINISHED: only NO_MORE_RESULTS, or an empty
            // batch, means there is nothing after this one.
            let more = !batch.entity_results.is_empty() && batch.more_results.as_deref() != Some("NO_MORE_RESULTS");
            for result in &batch.entity_results {
                let entity = &result.entity;
                let seen = FeedHead::from_entity(Some(entity));
                if seen.seq == last.seq && last.seq > 0 {
                    if seen != last {
                        return Ok(self.lost_track(head, "the change last read was replaced (a restored database)"));
                    }
                    continue;
                }
                if seen.seq != position.seq + 1 {
                    // Only reachable if changes were deleted or the
                    // database replaced: say so rather than skip.
                    notices.push(ChangeNotice::everything());
                }
                let text = |field: &str| entity.string(field).unwrap_or_default().to_owned();
                notices.push(ChangeNotice {
                    what: Invalidation::from_parts(&text("kind"), &text("subject"), &text("key_id")),
                    at: OffsetDateTime::parse(&entity.timestamp("at"), &time::format_description::well_known::Rfc3339)
                        .ok(),
                });
                position = seen;
            }
            match batch.end_cursor {
                Some(cursor) if more => query["startCursor"] = Value::String(cursor),
                _ => break,
            }
        }
        if position.seq < head.seq && pages < PAGES_PER_POLL {
            // The head announces changes the query did not return: rather
            // than stand still (and ask again forever), give them up.
            notices.extend(self.lost_track(head, "changes the feed's head announces cannot be read"));
            return Ok(notices);
        }
        self.last = Some(position);
        Ok(notices)
    }
}

#[async_trait]
impl ChangeFeed for DatastoreFeed {
    async fn next(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
        if self.last.is_some() {
            tokio::time::sleep(self.interval).await;
        }
        let result = self.poll().await;
        self.recovery.observe(result)
    }

    fn recoveries(&self) -> u64 {
        self.recovery.count()
    }
}
