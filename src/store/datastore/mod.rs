//! Google Cloud Datastore, in the layout M-Lab's other programs share
//! (docs/compatibility.md, "Datastore kinds other programs read" and "The namespace this service owns").
//!
//! Other programs load these entities into fixed Go structs, and a load
//! fails on a property the struct lacks, so we write exactly the listed
//! properties with exactly their types, and nothing more.

mod admin;
mod client;
mod feed;
mod listing;
mod lookup;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use self::client::{CallError, Client};
use self::wire::{Entity, Key, PartitionId, PathElement};
use super::{StoreError, rfc3339};

pub use self::feed::FEED_HEAD_KIND;

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
    /// Namespace of this service's own kinds, such as [`CHANGE_KIND`](crate::store::changes::CHANGE_KIND).
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
    crate::ground::sha256_hex(e.key.name().unwrap_or_default().as_bytes())
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
    crate::ground::fill_random(&mut jitter);
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

/// A failed query's error with `secret` (the autojoin key it carried) cut
/// out of its text.
fn redacted(e: CallError, secret: &str) -> StoreError {
    let text = e.to_string().replace(secret, "<redacted>");
    StoreError::from(match e {
        CallError::Transient(_) => CallError::Transient(text),
        _ => CallError::Permanent(text),
    })
}

/// The organization holding an autojoin key, from the query's results: a
/// key held by two organizations, or by an entity without one, is refused
/// (and logged) until the data is fixed.
fn holder(
    results: Vec<wire::EntityResult>,
    key: &crate::api_key::AutojoinApiKey,
    expires_at: Option<OffsetDateTime>,
) -> Option<super::AutojoinKeyRecord> {
    if results.len() > 1 {
        tracing::error!(
            fingerprint = %key.fingerprint(),
            "an autojoin key is held by more than one organization; refusing it until the data is fixed"
        );
        return None;
    }
    let result = results.into_iter().next()?;
    match result.entity.key.parent() {
        Some(parent) if parent.kind == ORGANIZATION_KIND && parent.name.is_some() => Some(super::AutojoinKeyRecord {
            org: parent.name.clone().unwrap_or_default(),
            expires_at,
        }),
        _ => {
            tracing::error!(
                fingerprint = %key.fingerprint(),
                "an autojoin key entity has no parent organization; refusing it"
            );
            None
        }
    }
}
