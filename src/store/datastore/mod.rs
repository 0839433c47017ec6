//! Google Cloud Datastore, in the layout M-Lab's other programs share
//! (COMPAT.md, "Google Cloud Datastore layout").
//!
//! Other programs load these entities into fixed Go structs, and a load
//! fails on a property the struct lacks, so we write exactly the listed
//! properties with exactly their types, and nothing more.

mod client;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use self::client::{CallError, Client};
use self::wire::{Entity, Key, PartitionId, PathElement};
use super::changes::{CHANGE_KIND, ChangeFeed, ChangeNotice, Invalidation, Recovery};
use super::{
    Admin, AutojoinKeyInfo, AutojoinKeys, Backend, IntegrationInfo, IntegrationKeyRecord, IntegrationKeys, KeyChange,
    KeyInfo, NewIntegrationKey, OrgInfo, STATUS_ACTIVE, StoreError, check_fingerprint, key_not_found,
};
use crate::api_key::AutojoinApiKey;

/// Kinds, as the Go programs name them.
pub const INTEGRATION_KIND: &str = "IntegrationMeta";
pub const INTEGRATION_KEY_KIND: &str = "IntegrationAPIKey";
pub const ORGANIZATION_KIND: &str = "Organization";
pub const AUTOJOIN_KEY_KIND: &str = "APIKey";

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
            platform: partition(&config.platform_ns),
            integrations: partition(&config.client_integration_ns),
            own: partition(&config.own_ns),
        })
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

    /// The mutation that publishes `what`, committed with the change itself.
    /// Its key name starts with the time, so names sort like changes; the
    /// random rest keeps two changes in one nanosecond apart.
    fn publish(&self, what: &Invalidation) -> Value {
        let now = OffsetDateTime::now_utc();
        let mut random = [0u8; 8];
        crate::api_key::fill_random(&mut random);
        let name = format!(
            "{:020}-{}",
            now.unix_timestamp_nanos(),
            crate::api_key::hex_lower(&random)
        );
        let (kind, subject, key_id) = what.to_parts();
        let unindexed = |text: &str| json!({ "stringValue": text, "excludeFromIndexes": true });
        insert(
            Self::key(&self.own, &[(CHANGE_KIND, &name)]),
            properties([
                ("at", wire::timestamp(now)),
                ("kind", unindexed(kind)),
                ("subject", unindexed(subject)),
                ("key_id", unindexed(key_id)),
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

fn key_info(e: &Entity) -> KeyInfo {
    KeyInfo {
        key_id: e.key.name().unwrap_or_default().to_owned(),
        status: e.string("status").unwrap_or_default().to_owned(),
        tier: e.integer("tier").unwrap_or(0),
        created_at: e.timestamp("created_at"),
        description: e.string("description").unwrap_or_default().to_owned(),
    }
}

/// The whole SHA-256 (hex) of an autojoin key entity's name, which is the key.
fn fingerprint_of_full(e: &Entity) -> String {
    crate::api_key::sha256_hex(e.key.name().unwrap_or_default().as_bytes())
}

fn fingerprint_of(e: &Entity) -> String {
    crate::api_key::fingerprint_of_hash(&fingerprint_of_full(e))
}

/// Runs of a transaction before giving up on contention.
const TRANSACTION_ATTEMPTS: u32 = 5;

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
        let response = self.client.lookup(std::slice::from_ref(&key), None).await?;
        let Some(found) = response.found.into_iter().next() else {
            return Ok(None);
        };
        let entity = found.entity;
        Ok(Some(IntegrationKeyRecord {
            // A missing hash can never match a computed one.
            key_hash: entity.string("key_hash").unwrap_or_default().to_owned(),
            // A missing status is not "active", so the key is refused.
            status: entity.string("status").unwrap_or_default().to_owned(),
            // Keys written before tiers existed have none: the default tier.
            tier: entity.integer("tier").unwrap_or(0),
        }))
    }
}

#[async_trait]
impl AutojoinKeys for DatastoreStore {
    async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<String>, StoreError> {
        // Two results are enough to detect a key held by two organizations.
        let query = wire::equality_query(AUTOJOIN_KEY_KIND, "key", wire::string(key.secret().expose()), 2);
        let response = self.client.run_query(&self.platform, query).await.map_err(|e| {
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
            Some(parent) if parent.kind == ORGANIZATION_KIND && parent.name.is_some() => Ok(parent.name.clone()),
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
            since: None,
            seen: HashMap::new(),
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
        match self.client.commit(None, vec![mutation]).await {
            Err(CallError::AlreadyExists(_)) => Err(StoreError::AlreadyExists(format!("organization {name}"))),
            other => Ok(other?),
        }
    }

    async fn create_autojoin_key(
        &self,
        org: &str,
        key: &AutojoinApiKey,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let org_key = Self::key(&self.platform, &[(ORGANIZATION_KIND, org)]);
        let plaintext = key.secret().expose();
        let key_key = Self::key(
            &self.platform,
            &[(ORGANIZATION_KIND, org), (AUTOJOIN_KEY_KIND, plaintext)],
        );
        let result = self
            .in_transaction(|tx| {
                let (org_key, key_key) = (org_key.clone(), key_key.clone());
                async move {
                    if !self.exists(&org_key, &tx).await? {
                        return Err(TxError::Store(StoreError::NotFound(format!("organization {org}"))));
                    }
                    let mutation = insert(
                        key_key,
                        properties([("created_at", wire::timestamp(now)), ("key", wire::string(plaintext))]),
                    );
                    Ok(((), vec![mutation]))
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
        let mut keys: Vec<KeyInfo> = entities.iter().map(key_info).collect();
        keys.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        Ok(keys)
    }

    async fn get_integration_key(&self, integration_id: &str, key_id: &str) -> Result<KeyInfo, StoreError> {
        let key = self.integration_key_path(integration_id, key_id);
        let found = self.client.lookup(std::slice::from_ref(&key), None).await?;
        found
            .found
            .first()
            .map(|r| key_info(&r.entity))
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
                let mut mutations: Vec<Value> = keys.into_iter().map(|e| json!({ "delete": e.key })).collect();
                mutations.push(json!({ "delete": meta }));
                mutations.push(self.publish(&Invalidation::Integration {
                    integration_id: integration_id.to_owned(),
                }));
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
        self.in_transaction(|tx| {
            let (key, change) = (key.clone(), change.clone());
            async move {
                let found = self.client.lookup(std::slice::from_ref(&key), Some(&tx)).await?;
                let Some(result) = found.found.into_iter().next() else {
                    return Err(TxError::Store(key_not_found(integration_id, key_id)));
                };
                // Everything else stays exactly as stored, including any
                // property another program wrote.
                let mut entity = result.entity;
                match change {
                    KeyChange::Status(status) => entity.properties.insert("status".into(), wire::string(&status)),
                    KeyChange::Tier(tier) => entity.properties.insert("tier".into(), wire::integer(tier)),
                };
                let published = self.publish(&Invalidation::IntegrationKey {
                    integration_id: integration_id.to_owned(),
                    key_id: key_id.to_owned(),
                });
                Ok(((), vec![json!({ "update": entity }), published]))
            }
        })
        .await
    }

    async fn delete_integration_key(&self, integration_id: &str, key_id: &str) -> Result<(), StoreError> {
        let key = self.integration_key_path(integration_id, key_id);
        self.in_transaction(|tx| {
            let key = key.clone();
            async move {
                if !self.exists(&key, &tx).await? {
                    return Err(TxError::Store(key_not_found(integration_id, key_id)));
                }
                let published = self.publish(&Invalidation::IntegrationKey {
                    integration_id: integration_id.to_owned(),
                    key_id: key_id.to_owned(),
                });
                Ok(((), vec![json!({ "delete": key }), published]))
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
        let mut keys: Vec<AutojoinKeyInfo> = self
            .org_keys(org, None)
            .await?
            .iter()
            .map(|e| AutojoinKeyInfo {
                fingerprint: fingerprint_of(e),
                created_at: e.timestamp("created_at"),
            })
            .collect();
        keys.sort_by(|a, b| (&a.created_at, &a.fingerprint).cmp(&(&b.created_at, &b.fingerprint)));
        Ok(keys)
    }

    async fn delete_autojoin_key(&self, org: &str, fingerprint: &str) -> Result<(), StoreError> {
        check_fingerprint(fingerprint)?;
        self.in_transaction(|tx| async move {
            let keys = self.org_keys(org, Some(&tx)).await?;
            let matches: Vec<&Entity> = keys
                .iter()
                .filter(|e| fingerprint_of_full(e).starts_with(fingerprint))
                .collect();
            match matches.as_slice() {
                [] => Err(TxError::Store(StoreError::NotFound(format!(
                    "a key with fingerprint {fingerprint} in organization {org}"
                )))),
                [one] => Ok((
                    (),
                    vec![
                        json!({ "delete": one.key }),
                        self.publish(&Invalidation::Organization { org: org.to_owned() }),
                    ],
                )),
                _ => Err(TxError::Store(StoreError::Ambiguous(format!(
                    "{} keys of organization {org} start with {fingerprint}; give more of the fingerprint",
                    matches.len()
                )))),
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
                let mut mutations: Vec<Value> = keys.into_iter().map(|e| json!({ "delete": e.key })).collect();
                mutations.push(json!({ "delete": org_key }));
                mutations.push(self.publish(&Invalidation::Organization { org: org.to_owned() }));
                Ok((count, mutations))
            }
        })
        .await
    }
}

/// How far apart the clocks of admin machines may be: each poll reads back
/// this far before the newest change seen, so a change stamped a little
/// earlier by a slower clock is not skipped (repeats are recognised by name).
const CLOCK_OVERLAP: Duration = Duration::from_secs(10);
/// Changes read in one poll at most; the rest come with the next.
const CHANGES_PER_POLL: i64 = 500;

/// Polls the change kind by its `at` timestamp.
struct DatastoreFeed {
    client: Arc<Client>,
    partition: PartitionId,
    interval: Duration,
    /// The newest change seen; `None` until the first read.
    since: Option<OffsetDateTime>,
    /// Changes seen within the overlap, by key name.
    seen: HashMap<String, OffsetDateTime>,
    recovery: Recovery,
}

impl DatastoreFeed {
    fn query(&self, filter: Option<OffsetDateTime>, direction: &str, limit: i64) -> Value {
        let mut query = json!({
            "kind": [{ "name": CHANGE_KIND }],
            "order": [{ "property": { "name": "at" }, "direction": direction }],
            "limit": limit,
        });
        if let Some(from) = filter {
            query["filter"] = json!({ "propertyFilter": {
                "property": { "name": "at" },
                "op": "GREATER_THAN_OR_EQUAL",
                "value": wire::timestamp(from),
            } });
        }
        query
    }

    async fn poll(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
        let at =
            |e: &Entity| OffsetDateTime::parse(&e.timestamp("at"), &time::format_description::well_known::Rfc3339).ok();
        let Some(since) = self.since else {
            // Start at the newest change: the cache is empty, nothing older matters.
            let newest = self
                .client
                .run_query(&self.partition, self.query(None, "DESCENDING", 1))
                .await?;
            let newest = newest.batch.entity_results.first().and_then(|r| at(&r.entity));
            self.since = Some(newest.unwrap_or(OffsetDateTime::UNIX_EPOCH));
            return Ok(Vec::new());
        };
        let from = since - CLOCK_OVERLAP;
        let page = self
            .client
            .run_query(&self.partition, self.query(Some(from), "ASCENDING", CHANGES_PER_POLL))
            .await?;
        let mut notices = Vec::new();
        let mut newest = since;
        for result in page.batch.entity_results {
            let entity = result.entity;
            let Some(name) = entity.key.name().map(str::to_owned) else {
                continue;
            };
            if self.seen.contains_key(&name) {
                continue;
            }
            let changed_at = at(&entity);
            let text = |field: &str| entity.string(field).unwrap_or_default().to_owned();
            notices.push(ChangeNotice {
                what: Invalidation::from_parts(&text("kind"), &text("subject"), &text("key_id")),
                at: changed_at,
            });
            let changed_at = changed_at.unwrap_or(newest);
            newest = newest.max(changed_at);
            self.seen.insert(name, changed_at);
        }
        self.since = Some(newest);
        self.seen.retain(|_, at| *at >= newest - CLOCK_OVERLAP);
        Ok(notices)
    }
}

#[async_trait]
impl ChangeFeed for DatastoreFeed {
    async fn next(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
        if self.since.is_some() {
            tokio::time::sleep(self.interval).await;
        }
        let result = self.poll().await;
        self.recovery.observe(result)
    }

    fn recoveries(&self) -> u64 {
        self.recovery.count()
    }
}
