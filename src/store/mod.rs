//! Where API keys live.
//!
//! The request path needs two reads, each its own small trait so a handler
//! depends only on what it calls: [`IntegrationKeys`] (one point read by
//! integration ID and key ID) and [`AutojoinKeys`] (find the organization
//! holding a key). The admin CLI needs [`Admin`] (writes) and [`Listing`]
//! (reads). A backend implements all four; [`open`] picks one from the `--store` setting.

mod bounded;
pub mod changes;
pub mod datastore;
mod health;
mod instrumented;
pub mod memory;
pub mod rules;
mod sql;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::api_key::AutojoinApiKey;

pub use bounded::Bounded;
pub use datastore::{DatastoreConfig, DatastoreStore};
pub use health::{FRESHNESS, PROBE_INTERVAL, ReadinessWindows, StoreHealth};
pub use instrumented::Instrumented;
pub use memory::MemoryStore;
pub use sql::{DEFAULT_PG_CONNECTIONS, SqlStore};

/// What the store knows about one integration key. The secret itself is
/// never stored, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrationKeyRecord {
    /// Lowercase hex SHA-256 of the key secret.
    pub key_hash: String,
    /// `active`, or anything else (`revoked`, ...), which is refused.
    pub status: String,
    pub tier: i64,
    /// From this instant on the key is refused; `None`: never.
    pub expires_at: Option<OffsetDateTime>,
}

/// What the store knows about one autojoin key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutojoinKeyRecord {
    /// The organization that holds it.
    pub org: String,
    pub expires_at: Option<OffsetDateTime>,
}

/// The only status that lets a key be exchanged.
pub const STATUS_ACTIVE: &str = "active";

/// A new integration key, as the admin CLI creates it.
#[derive(Debug, Clone)]
pub struct NewIntegrationKey {
    pub integration_id: String,
    /// Used only if the integration does not exist yet.
    pub integration_description: String,
    pub key_id: String,
    pub key_hash: String,
    pub key_description: String,
    pub tier: i64,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    /// The key ID this one replaces (`key rotate`), for the audit log.
    pub replaces: Option<String>,
}

/// A new autojoin key, as the admin CLI creates it.
#[derive(Debug, Clone, Copy)]
pub struct NewAutojoinKey<'a> {
    pub org: &'a str,
    pub key: &'a AutojoinApiKey,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
}

impl<'a> NewAutojoinKey<'a> {
    pub fn new(
        org: &'a str,
        key: &'a AutojoinApiKey,
        created_at: OffsetDateTime,
        expires_at: Option<OffsetDateTime>,
    ) -> Self {
        Self {
            org,
            key,
            created_at,
            expires_at,
        }
    }
}

/// Failures of a store operation. Only [`StoreError::Unavailable`] and
/// [`StoreError::Backend`] can happen on the request path; the HTTP layer
/// turns both into 503, never 401.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time; retrying
    /// later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something we cannot use.
    #[error("store error: {0}")]
    Backend(String),
    /// An admin operation would create something that exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// An admin operation refers to something that does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// A prefix matched more than one thing.
    #[error("{0}")]
    Ambiguous(String),
    /// The `--store` setting names no backend we have.
    #[error("{0}")]
    Config(String),
}

/// Looks up client-integration keys.
#[async_trait]
pub trait IntegrationKeys: Send + Sync {
    /// The record of key `key_id` (with its `ki_` prefix) of integration
    /// `integration_id`, if there is one.
    async fn integration_key(
        &self,
        integration_id: &str,
        key_id: &str,
    ) -> Result<Option<IntegrationKeyRecord>, StoreError>;
}

/// Looks up autojoin keys.
#[async_trait]
pub trait AutojoinKeys: Send + Sync {
    /// The organization that holds `key` and the key's expiry, if any
    /// organization holds it.
    async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<AutojoinKeyRecord>, StoreError>;
}

/// Writes for the admin CLI.
#[async_trait]
pub trait Admin: Send + Sync {
    /// The changes admin commands publish (every write below publishes one
    /// in its own transaction), for a server to follow; polled every
    /// `interval` where the store is polled. Nothing is read until the
    /// feed's first `next`.
    fn change_feed(&self, interval: std::time::Duration) -> Box<dyn changes::ChangeFeed>;

    /// Creates the key, and its integration first if it does not exist, in
    /// one transaction. Returns whether the integration was created.
    /// A key ID already used in that integration is `AlreadyExists`.
    async fn create_integration_key(&self, key: &NewIntegrationKey) -> Result<bool, StoreError>;

    /// Creates an autojoin organization; `AlreadyExists` if it does.
    async fn create_org(&self, name: &str, email: &str, now: OffsetDateTime) -> Result<(), StoreError>;

    /// Adds a key to an existing organization; `NotFound` if there is none.
    async fn create_autojoin_key(&self, new: &NewAutojoinKey<'_>) -> Result<(), StoreError>;

    /// Deletes the key of `org` whose hash starts with `fingerprint`, or
    /// sets or clears its expiry; `NotFound` if no key matches, `Ambiguous`
    /// if several do (ask for a longer prefix).
    async fn change_autojoin_key(
        &self,
        org: &str,
        fingerprint: &str,
        change: rules::AutojoinChange,
    ) -> Result<(), StoreError>;

    /// Sets or clears the expiry of the key of `org` with this fingerprint.
    async fn set_autojoin_expiry(
        &self,
        org: &str,
        fingerprint: &str,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<(), StoreError> {
        self.change_autojoin_key(org, fingerprint, rules::AutojoinChange::Expiry(expires_at))
            .await
    }

    /// Adds servers' token counts and last-use times to their keys. Keys
    /// that no longer exist are skipped.
    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError>;

    /// Deletes an integration and all its keys; `NotFound` if it does not exist.
    async fn delete_integration(&self, integration_id: &str) -> Result<usize, StoreError>;

    /// Changes a key's status or tier, leaving everything else as it is;
    /// `NotFound` if the key does not exist.
    async fn update_integration_key(
        &self,
        integration: &str,
        key_id: &str,
        change: KeyChange,
    ) -> Result<(), StoreError>;

    /// Deletes one key; `NotFound` if it does not exist.
    async fn delete_integration_key(&self, integration_id: &str, key_id: &str) -> Result<(), StoreError>;

    /// Deletes the key of `org` with this fingerprint.
    async fn delete_autojoin_key(&self, org: &str, fingerprint: &str) -> Result<(), StoreError> {
        self.change_autojoin_key(org, fingerprint, rules::AutojoinChange::Delete)
            .await
    }

    /// Deletes an organization and its keys; `NotFound` if it does not exist.
    async fn delete_org(&self, org: &str) -> Result<usize, StoreError>;
}

/// Reads for the admin CLI: what exists, as operators see it (never a
/// secret or a hash).
#[async_trait]
pub trait Listing: Send + Sync {
    /// True when no integration exists yet (used by `serve --dev`).
    async fn is_empty(&self) -> Result<bool, StoreError>;

    /// The audit log, oldest first.
    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError>;

    /// Every integration, by ID.
    async fn list_integrations(&self) -> Result<Vec<IntegrationInfo>, StoreError>;

    /// The keys of an integration, by key ID; `NotFound` if it does not exist.
    async fn list_integration_keys(&self, integration_id: &str) -> Result<Vec<KeyInfo>, StoreError>;

    /// One key; `NotFound` if it (or its integration) does not exist.
    async fn get_integration_key(&self, integration_id: &str, key_id: &str) -> Result<KeyInfo, StoreError>;

    /// Every organization, by name.
    async fn list_orgs(&self) -> Result<Vec<OrgInfo>, StoreError>;

    /// The keys of an organization (fingerprints only); `NotFound` if it
    /// does not exist.
    async fn list_autojoin_keys(&self, org: &str) -> Result<Vec<AutojoinKeyInfo>, StoreError>;
}

/// An integration, as the admin CLI lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IntegrationInfo {
    pub integration_id: String,
    pub description: String,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// An integration key as the admin CLI shows it: never its hash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub status: String,
    pub tier: i64,
    pub created_at: String,
    pub description: String,
    /// RFC 3339; `None`: never expires.
    pub expires_at: Option<String>,
    /// When a server last issued a token for it (RFC 3339), as last
    /// written by a server (at most a minute behind).
    pub last_used_at: Option<String>,
    pub tokens_issued: i64,
}

/// A change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    Status(String),
    Tier(i64),
    /// A new expiry, or none.
    Expiry(Option<OffsetDateTime>),
}

/// Which key a usage count is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UsageKey {
    Integration {
        integration_id: String,
        key_id: String,
    },
    /// By the SHA-256 of the key (lowercase hex): never the key itself.
    Autojoin {
        key_hash: String,
    },
}

/// Tokens a server issued for one key since it last wrote usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key: UsageKey,
    pub last_used_at: OffsetDateTime,
    pub tokens: u64,
}

/// One entry of the audit log: who changed what, from what to what. Never
/// a secret, a hash or a whole key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub at: String,
    pub operator: String,
    /// The admin command, such as `key revoke`.
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integration_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The audited values before and after (status, tier, expiry); `null`
    /// for what did not exist.
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

impl AuditRecord {
    /// A record of `action` by `operator`, now.
    pub fn new(operator: &str, action: &str) -> Self {
        Self {
            at: OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            operator: operator.to_owned(),
            action: action.to_owned(),
            integration_id: None,
            key_id: None,
            org: None,
            fingerprint: None,
            before: None,
            after: None,
        }
    }

    pub fn key(mut self, integration_id: &str, key_id: &str) -> Self {
        self.integration_id = Some(integration_id.to_owned());
        self.key_id = Some(key_id.to_owned());
        self
    }

    pub fn integration(mut self, integration_id: &str) -> Self {
        self.integration_id = Some(integration_id.to_owned());
        self
    }

    pub fn org(mut self, org: &str) -> Self {
        self.org = Some(org.to_owned());
        self
    }

    pub fn fingerprint(mut self, fingerprint: &str) -> Self {
        self.fingerprint = Some(fingerprint.to_owned());
        self
    }

    pub fn change(mut self, before: Option<serde_json::Value>, after: Option<serde_json::Value>) -> Self {
        self.before = before;
        self.after = after;
        self
    }
}

/// RFC 3339 text of an instant, as the stores keep and print it.
pub fn rfc3339(t: OffsetDateTime) -> String {
    // RFC 3339 formatting fails only outside years 0..=9999, which no
    // expiry the CLI accepts can reach.
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Which audit records to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub since: Option<OffsetDateTime>,
    pub integration_id: Option<String>,
    pub org: Option<String>,
}

impl AuditFilter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        let since_ok = self.since.is_none_or(|since| {
            OffsetDateTime::parse(&r.at, &time::format_description::well_known::Rfc3339).is_ok_and(|at| at >= since)
        });
        since_ok
            && self
                .integration_id
                .as_ref()
                .is_none_or(|id| r.integration_id.as_ref() == Some(id))
            && self.org.as_ref().is_none_or(|org| r.org.as_ref() == Some(org))
    }
}

/// An organization, as the admin CLI lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OrgInfo {
    pub org: String,
    pub email: String,
    pub created_at: String,
    pub probability_multiplier: Option<f64>,
}

/// An autojoin key as the admin CLI shows it: a fingerprint, never the key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AutojoinKeyInfo {
    /// The first 12 hex digits of the key's SHA-256.
    pub fingerprint: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub last_used_at: Option<String>,
    pub tokens_issued: i64,
}

/// Status of a key that may no longer be exchanged.
pub const STATUS_REVOKED: &str = "revoked";

/// What a backend says about itself, for metrics and readiness.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The `backend` label of the store metrics.
    fn backend(&self) -> &'static str;

    /// A cheap read that succeeds only if the store answers now.
    async fn ping(&self) -> Result<(), StoreError>;

    /// How many calls the store serves at once (its connections); the
    /// request path never has more outstanding (see [`Bounded`]).
    fn capacity(&self) -> usize;
}

/// The part of a store the request path uses.
pub trait Lookups: IntegrationKeys + AutojoinKeys + Backend {}
impl<T: IntegrationKeys + AutojoinKeys + Backend + ?Sized> Lookups for T {}

/// Everything a backend provides.
pub trait Store: Lookups + Admin + Listing {}
impl<T: Lookups + Admin + Listing + ?Sized> Store for T {}

/// Which store a `--store` setting names, in words fit for a log: never
/// a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite {
        /// Absolute, so the log says which file even when given relative.
        path: PathBuf,
    },
    Postgres {
        host: String,
        port: u16,
        database: String,
    },
    Datastore {
        project: String,
        client_integration_ns: String,
        platform_ns: String,
        /// `DATASTORE_EMULATOR_HOST`, when set.
        emulator: Option<String>,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite { path } => write!(f, "SQLite file {}", path.display()),
            Location::Postgres { host, port, database } => {
                write!(f, "PostgreSQL database {database} on {host}:{port}")
            }
            Location::Datastore {
                project,
                client_integration_ns,
                platform_ns,
                emulator,
            } => {
                write!(
                    f,
                    "Datastore project {project}, namespaces {client_integration_ns} (integrations) \
                     and {platform_ns} (autojoin)"
                )?;
                match emulator {
                    Some(host) => write!(f, ", emulator at {host}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Which store to open and how: built by `config` from the flags and the
/// environment. `Debug` shows the [`Location`], never the URL, which may
/// hold a password.
#[derive(Clone)]
pub struct StoreSettings {
    /// `datastore`, `sqlite:PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB`.
    pub url: String,
    /// Google Cloud project of the Datastore store.
    pub project_id: String,
    /// Datastore namespace of autojoin organizations and keys.
    pub platform_ns: String,
    /// Datastore namespace of client integrations and their keys.
    pub client_integration_ns: String,
    /// Datastore namespace of this service's own kinds.
    pub own_ns: String,
    /// Limit on each store call.
    pub timeout: std::time::Duration,
    /// Who the audit log names for changes made through this store: the
    /// OS user of an admin command (and more, where known).
    pub operator: String,
    /// Most PostgreSQL connections from this process.
    pub max_connections: u32,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store = match locate(self) {
            Ok(location) => location.to_string(),
            Err(_) => "(unrecognised)".to_owned(),
        };
        f.debug_struct("StoreSettings")
            .field("store", &store)
            .field("timeout", &self.timeout)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// PostgreSQL's default port, used when a URL names none.
const POSTGRES_PORT: u16 = 5432;

/// Reads the `--store` setting: `datastore`, `sqlite:PATH` or
/// `postgres://...`.
pub fn locate(settings: &StoreSettings) -> Result<Location, StoreError> {
    let store = settings.url.as_str();
    if let Some(path) = store.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            return Err(StoreError::Config(
                "--store sqlite: needs a file path, e.g. sqlite:token-exchange.db".into(),
            ));
        }
        let path = std::path::absolute(path).map_err(|e| StoreError::Config(format!("--store sqlite:{path}: {e}")))?;
        return Ok(Location::Sqlite { path });
    }
    if store.starts_with("postgres://") || store.starts_with("postgresql://") {
        // Only the parts a log may show; the URL's error text could quote it.
        let url = url::Url::parse(store)
            .map_err(|e| StoreError::Config(format!("--store postgres://...: not a valid URL ({e})")))?;
        let query = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
        let host = match url.host_str().filter(|h| !h.is_empty()) {
            Some(host) => host.to_owned(),
            None => query("host").unwrap_or_else(|| "localhost".to_owned()),
        };
        let port = url
            .port()
            .or_else(|| query("port")?.parse().ok())
            .unwrap_or(POSTGRES_PORT);
        let database = match url.path().trim_start_matches('/') {
            "" => query("dbname").unwrap_or_else(|| match url.username() {
                "" => "postgres".to_owned(),
                user => user.to_owned(),
            }),
            name => name.to_owned(),
        };
        return Ok(Location::Postgres { host, port, database });
    }
    if store == "datastore" {
        return Ok(Location::Datastore {
            project: settings.project_id.clone(),
            client_integration_ns: settings.client_integration_ns.clone(),
            platform_ns: settings.platform_ns.clone(),
            emulator: std::env::var("DATASTORE_EMULATOR_HOST").ok().filter(|h| !h.is_empty()),
        });
    }
    // Only the scheme is echoed: a database URL may hold a password.
    Err(StoreError::Config(format!(
        "unsupported --store {:?}: expected datastore, sqlite:PATH or postgres://USER:PASSWORD@HOST:PORT/DB",
        store.split(':').next().unwrap_or_default()
    )))
}

/// Opens the store named by `--store` (see [`locate`]). SQL stores have
/// their schema brought up to date (a SQLite file is created on first
/// use); Datastore must have credentials to be had.
pub async fn open(settings: impl Into<StoreSettings>) -> Result<Arc<dyn Store>, StoreError> {
    let settings = settings.into();
    match locate(&settings)? {
        Location::Sqlite { path } => Ok(Arc::new(
            SqlStore::open_sqlite(&path, settings.timeout)
                .await?
                .with_operator(&settings.operator),
        )),
        Location::Postgres { .. } => Ok(Arc::new(
            SqlStore::open_postgres(&settings.url, settings.timeout, settings.max_connections)
                .await?
                .with_operator(&settings.operator),
        )),
        Location::Datastore {
            project,
            client_integration_ns,
            platform_ns,
            emulator,
        } => {
            let store = DatastoreStore::new(&DatastoreConfig {
                project_id: project,
                platform_ns,
                client_integration_ns,
                own_ns: settings.own_ns.clone(),
                timeout: settings.timeout,
                emulator_host: emulator,
            })?;
            store.check_credentials().await?;
            Ok(Arc::new(store.with_operator(&settings.operator)))
        }
    }
}

#[cfg(test)]
mod location_tests {
    use super::*;

    fn args(store: &str) -> StoreSettings {
        StoreSettings {
            url: store.to_owned(),
            project_id: "p".into(),
            platform_ns: "platform-credentials".into(),
            client_integration_ns: "client-integration".into(),
            own_ns: "token-exchange".into(),
            timeout: std::time::Duration::from_secs(1),
            operator: "test".into(),
            max_connections: 1,
        }
    }

    #[test]
    fn locations_name_the_store_without_secrets() {
        let pg = locate(&args("postgres://u:hunter2@db.example:6543/keys?sslmode=require")).unwrap();
        assert_eq!(
            pg,
            Location::Postgres {
                host: "db.example".into(),
                port: 6543,
                database: "keys".into()
            }
        );
        assert!(!pg.to_string().contains("hunter2"), "{pg}");
        assert_eq!(
            locate(&args("postgresql://u@h")).unwrap().to_string(),
            "PostgreSQL database u on h:5432"
        );
        assert_eq!(
            locate(&args("postgres:///keys?host=/run/postgresql"))
                .unwrap()
                .to_string(),
            "PostgreSQL database keys on /run/postgresql:5432"
        );
        let Location::Sqlite { path } = locate(&args("sqlite:x/keys.db")).unwrap() else {
            panic!("not sqlite")
        };
        assert!(path.is_absolute() && path.ends_with("x/keys.db"), "{}", path.display());
        let ds = locate(&args("datastore")).unwrap().to_string();
        assert!(
            ds.starts_with(
                "Datastore project p, namespaces client-integration (integrations) and platform-credentials (autojoin)"
            ),
            "{ds}"
        );
        for bad in ["sqlite:", "mysql://u:hunter2@h/db", "postgres://u:hunter2@[bad/db"] {
            let err = locate(&args(bad)).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
