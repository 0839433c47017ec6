//! The SQL stores: SQLite (embedded, one file, no setup) and PostgreSQL
//! (shared by several replicas). Both keep the same tables and run the same
//! statements; only connecting, migrations and a few error codes differ.
//!
//! SQLite: the server and the admin CLI may open the same file at once.
//! Writes are a few rows in a millisecond, so the classic rollback journal is
//! enough: whoever finds the file locked waits (up to `--store-timeout`)
//! instead of failing. It also keeps the store one file at rest (WAL mode
//! would add `-wal` and `-shm` files that must be copied with it), and a lock
//! held too long by another process shows up as what it is: a store that
//! does not answer (503 and not ready), never as a bad key.
//!
//! PostgreSQL: a bounded pool; every statement has the store timeout as its
//! `statement_timeout`, and waiting for a connection is bounded the same way.
//! Broken connections (a database restart) are dropped when next taken from
//! the pool, so service resumes without a restart.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlSafeStr as _};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::changes::{ChangeFeed, ChangeNotice, Invalidation, PG_CHANNEL, Recovery};
use super::{
    Admin, AuditFilter, AuditRecord, AutojoinKeyInfo, AutojoinKeyRecord, AutojoinKeys, Backend, IntegrationInfo,
    IntegrationKeyRecord, IntegrationKeys, KeyChange, KeyInfo, KeyUsage, NewIntegrationKey, OrgInfo, STATUS_REVOKED,
    StoreError, UsageKey, autojoin_key_state, check_fingerprint, key_not_found, key_state,
};
use crate::api_key::{AutojoinApiKey, fingerprint_of_hash};

/// SQLite connections in the pool. SQLite serialises writers anyway; a few
/// readers in parallel are plenty on two cores.
const SQLITE_CONNECTIONS: u32 = 4;
/// PostgreSQL connections per replica: enough for the request path's point
/// reads (a few ms each) at thousands of requests per second, small enough
/// that dozens of replicas stay under the server's `max_connections`.
pub const DEFAULT_PG_CONNECTIONS: u32 = 10;

enum SqlPool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the typed pool: the statements are the
/// same for both databases, the driver types are not.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            SqlPool::Sqlite($pool) => $body,
            SqlPool::Postgres($pool) => $body,
        }
    };
}

pub struct SqlStore {
    pool: SqlPool,
    /// Named in the audit log.
    operator: String,
}

fn migration(version: i64, description: &'static str, sql: &'static str) -> Migration {
    Migration::new(
        version,
        description.into(),
        MigrationType::Simple,
        sql.into_sql_str(),
        false,
    )
}

fn sqlite_migrator() -> Migrator {
    Migrator::with_migrations(vec![
        migration(1, "initial", include_str!("../../migrations/sqlite/0001_initial.sql")),
        migration(2, "changes", include_str!("../../migrations/sqlite/0002_changes.sql")),
        migration(
            3,
            "expiry usage audit",
            include_str!("../../migrations/sqlite/0003_expiry_usage_audit.sql"),
        ),
    ])
}

fn postgres_migrator() -> Migrator {
    // PostgreSQL publishes changes with NOTIFY; it needs no table for them.
    Migrator::with_migrations(vec![
        migration(1, "initial", include_str!("../../migrations/postgres/0001_initial.sql")),
        migration(
            2,
            "expiry usage audit",
            include_str!("../../migrations/postgres/0002_expiry_usage_audit.sql"),
        ),
    ])
}

impl SqlStore {
    /// Opens (creating if needed) a SQLite file and brings its schema up to
    /// date. `timeout` (`--store-timeout`) bounds both the wait for a lock
    /// held by another process and the wait for a pooled connection: past
    /// it, a request gets a 503 rather than hanging.
    pub async fn open_sqlite(path: &Path, timeout: Duration) -> Result<Self, StoreError> {
        prepare_sqlite_file(path)?;
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(backend)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Delete)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(timeout)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(SQLITE_CONNECTIONS)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        sqlite_migrator()
            .run(&pool)
            .await
            .map_err(|e| StoreError::Backend(format!("schema migration of {} failed: {e}", path.display())))?;
        Ok(Self {
            pool: SqlPool::Sqlite(pool),
            operator: String::new(),
        })
    }

    /// Names `operator` in the audit records of changes made through this store.
    pub fn with_operator(mut self, operator: &str) -> Self {
        operator.clone_into(&mut self.operator);
        self
    }

    /// Connects to PostgreSQL at `url` and brings the schema up to date
    /// (concurrent replicas take turns: the migrator holds an advisory lock).
    pub async fn open_postgres(url: &str, timeout: Duration, max_connections: u32) -> Result<Self, StoreError> {
        let statement_timeout = timeout.as_millis().to_string();
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                StoreError::Config(format!(
                    "--store: not a PostgreSQL URL ({})",
                    redact(&e.to_string(), url)
                ))
            })?
            .options([("statement_timeout", statement_timeout.as_str())])
            .application_name("token-exchange");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .min_connections(0)
            .acquire_timeout(timeout)
            // Recycle idle connections, so a pool drained by a database
            // restart refills with fresh ones.
            .idle_timeout(Duration::from_secs(300))
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot connect to PostgreSQL: {}", redact(&e.to_string(), url)))
            })?;
        postgres_migrator()
            .run(&pool)
            .await
            .map_err(|e| StoreError::Backend(format!("schema migration failed: {e}")))?;
        Ok(Self {
            pool: SqlPool::Postgres(pool),
            operator: String::new(),
        })
    }
}

/// Creates the SQLite file, private, before SQLite would create it with the
/// default mode (world-readable under the usual umask): it holds key hashes
/// and e-mail addresses. `O_CREAT` without `O_EXCL` follows a symbolic link,
/// so a link to a file that does not exist yet also gets a private file (an
/// exclusive create would fail on the link and leave the creation to
/// SQLite). The journal takes the file's mode. Only a regular file is
/// accepted: a FIFO or a device at the path would block or misbehave. A
/// file others can read is used, with a warning.
fn prepare_sqlite_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let unusable = |e: std::io::Error| StoreError::Unavailable(format!("cannot create {}: {e}", path.display()));
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Non-blocking, so that whatever appears here meanwhile (a FIFO)
            // cannot stall the open; an empty file is an empty database.
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(NONBLOCK)
                .open(path)
                .map_err(unusable)?
                .metadata()
                .map_err(unusable)?
        }
        Err(e) => return Err(unusable(e)),
    };
    if !metadata.is_file() {
        return Err(StoreError::Unavailable(format!(
            "cannot use {}: not a regular file",
            path.display()
        )));
    }
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", mode & 0o777),
            "the SQLite store can be read by other users of this machine (it holds key hashes and e-mail \
             addresses); make it private: chmod 600"
        );
    }
    Ok(())
}

/// `O_NONBLOCK` on Linux (the standard library has no name for it).
const NONBLOCK: i32 = 0o4000;

/// Error texts must not carry the database password.
fn redact(text: &str, url: &str) -> String {
    match url::Url::parse(url).ok().and_then(|u| u.password().map(str::to_owned)) {
        Some(password) if !password.is_empty() => text.replace(&password, "<redacted>"),
        _ => text.to_owned(),
    }
}

fn timestamp(t: OffsetDateTime) -> String {
    // Unwrap: RFC 3339 formatting fails only for years outside 0..=9999.
    t.format(&Rfc3339).expect("timestamp within RFC 3339 range")
}

/// How a write transaction starts, per database.
///
/// Every admin write reads what it replaces (for the audit record and to
/// decide what to write), so the read must not go stale before the write:
/// otherwise a `key revoke` racing a `key set-tier` can write back the old
/// status and un-revoke the key. SQLite: `BEGIN IMMEDIATE` takes the one
/// write lock before the read, so writers run one after another, and a
/// writer that finds the lock taken waits out the busy timeout (a deferred
/// transaction that holds a read lock and then asks for the write lock is
/// refused at once instead, to avoid a deadlock). PostgreSQL: the read takes
/// row locks (`FOR UPDATE`), and a concurrent writer of the same rows waits
/// for the commit and then reads what it left.
trait WritePool {
    type Db: sqlx::Database;
    /// Appended to the reads a write depends on.
    const LOCK_ROWS: &'static str;
    fn begin_write(&self) -> impl Future<Output = Result<sqlx::Transaction<'static, Self::Db>, StoreError>> + Send;
}

impl WritePool for SqlitePool {
    type Db = sqlx::Sqlite;
    const LOCK_ROWS: &'static str = "";
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.begin_with("BEGIN IMMEDIATE").await.map_err(classify)
    }
}

impl WritePool for PgPool {
    type Db = sqlx::Postgres;
    const LOCK_ROWS: &'static str = " FOR UPDATE";
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        self.begin().await.map_err(classify)
    }
}

/// `select` with the row locks of `P` (see [`WritePool`]).
fn locking<P: WritePool>(_pool: &P, select: &'static str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(format!("{select}{}", P::LOCK_ROWS))
}

/// Errors that retrying may cure are `Unavailable`; the rest are `Backend`.
fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // SQLite: SQLITE_BUSY and SQLITE_LOCKED, another process held a
            // lock past the timeout.
            Some("5" | "6") => StoreError::Unavailable(e.to_string()),
            // PostgreSQL: connection failures (class 08), shutting down or
            // starting up (57P01-57P03), statement timeout (57014), too many
            // connections (53300), serialization failure or deadlock.
            Some(code)
                if code.starts_with("08")
                    || matches!(
                        code,
                        "57P01" | "57P02" | "57P03" | "57014" | "53300" | "40001" | "40P01"
                    ) =>
            {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Backend(e.to_string()),
        },
        _ => StoreError::Backend(e.to_string()),
    }
}

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

macro_rules! key_info {
    ($r:expr) => {
        KeyInfo {
            key_id: $r.try_get("key_id").map_err(backend)?,
            status: $r.try_get("status").map_err(backend)?,
            tier: $r.try_get("tier").map_err(backend)?,
            created_at: $r.try_get("created_at").map_err(backend)?,
            description: $r.try_get("description").map_err(backend)?,
            expires_at: $r.try_get("expires_at").map_err(backend)?,
            last_used_at: $r.try_get("last_used_at").map_err(backend)?,
            tokens_issued: $r.try_get("tokens_issued").map_err(backend)?,
        }
    };
}

#[async_trait]
impl IntegrationKeys for SqlStore {
    async fn integration_key(
        &self,
        integration_id: &str,
        key_id: &str,
    ) -> Result<Option<IntegrationKeyRecord>, StoreError> {
        // No stored name holds a NUL (the CLI allows none, and PostgreSQL
        // text cannot): such a made-up key is unknown, not a store error,
        // which would be a 503 that pages operators and is never cached.
        if integration_id.contains('\0') || key_id.contains('\0') {
            return Ok(None);
        }
        on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT key_hash, status, tier, expires_at FROM integration_keys
                 WHERE integration_id = $1 AND key_id = $2",
            )
            .bind(integration_id)
            .bind(key_id)
            .fetch_optional(pool)
            .await
            .map_err(classify)?;
            match row {
                None => Ok(None),
                Some(r) => Ok(Some(IntegrationKeyRecord {
                    key_hash: r.try_get("key_hash").map_err(backend)?,
                    status: r.try_get("status").map_err(backend)?,
                    tier: r.try_get("tier").map_err(backend)?,
                    expires_at: parse_time(r.try_get("expires_at").map_err(backend)?)?,
                })),
            }
        })
    }
}

#[async_trait]
impl AutojoinKeys for SqlStore {
    async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<AutojoinKeyRecord>, StoreError> {
        let hash = key.secret().sha256_hex();
        on_pool!(self, pool => {
            let row = sqlx::query("SELECT org, expires_at FROM autojoin_keys WHERE key_hash = $1")
                .bind(&hash)
                .fetch_optional(pool)
                .await
                .map_err(classify)?;
            match row {
                None => Ok(None),
                Some(r) => Ok(Some(AutojoinKeyRecord {
                    org: r.try_get("org").map_err(backend)?,
                    expires_at: parse_time(r.try_get("expires_at").map_err(backend)?)?,
                })),
            }
        })
    }
}

#[async_trait]
impl Backend for SqlStore {
    fn backend(&self) -> &'static str {
        match self.pool {
            SqlPool::Sqlite(_) => "sqlite",
            SqlPool::Postgres(_) => "postgres",
        }
    }

    fn capacity(&self) -> usize {
        on_pool!(self, pool => pool.options().get_max_connections() as usize)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A read of a real table, so a lock held by another process shows.
        on_pool!(self, pool => {
            sqlx::query("SELECT key_id FROM integration_keys LIMIT 1")
                .fetch_optional(pool)
                .await
                .map_err(classify)?;
            Ok(())
        })
    }
}

#[async_trait]
impl Admin for SqlStore {
    fn change_feed(&self, interval: Duration) -> Box<dyn ChangeFeed> {
        match &self.pool {
            SqlPool::Sqlite(pool) => Box::new(SqliteFeed {
                pool: pool.clone(),
                interval,
                last: None,
                recovery: Recovery::default(),
            }),
            SqlPool::Postgres(pool) => {
                // A connection of its own, outside the pool that lookups
                // share (a listener holds its connection for good), named
                // so that operators can tell it apart. The server probes it
                // with TCP keepalives, so a peer gone without a FIN frees
                // its server slot; our side is probed by the heartbeat.
                let options = (*pool.connect_options())
                    .clone()
                    .application_name("token-exchange-changes")
                    .options([
                        ("tcp_keepalives_idle", "30"),
                        ("tcp_keepalives_interval", "10"),
                        ("tcp_keepalives_count", "3"),
                    ]);
                let timeout = pool.options().get_acquire_timeout();
                Box::new(PgFeed {
                    options,
                    timeout,
                    heartbeat: interval,
                    listener: None,
                    recovery: Recovery::default(),
                })
            }
        }
    }

    async fn create_integration_key(&self, key: &NewIntegrationKey) -> Result<bool, StoreError> {
        let created_at = timestamp(key.created_at);
        let expires_at = key.expires_at.map(seconds);
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let created = sqlx::query(
                "INSERT INTO integrations (integration_id, description, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (integration_id) DO NOTHING",
            )
            .bind(&key.integration_id)
            .bind(&key.integration_description)
            .bind(&created_at)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected()
                == 1;
            sqlx::query(
                "INSERT INTO integration_keys
                     (integration_id, key_id, key_hash, status, tier, description, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&key.integration_id)
            .bind(&key.key_id)
            .bind(&key.key_hash)
            .bind(super::STATUS_ACTIVE)
            .bind(key.tier)
            .bind(&key.key_description)
            .bind(&created_at)
            .bind(&expires_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists(format!("key {} of integration {}", key.key_id, key.integration_id))
                } else {
                    classify(e)
                }
            })?;
            let record = key.audit_record(&self.operator, expires_at.as_deref());
            (*tx).audit(&record).await?;
            tx.commit().await.map_err(classify)?;
            Ok(created)
        })
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        on_pool!(self, pool => {
            let any: Option<String> = sqlx::query_scalar("SELECT integration_id FROM integrations LIMIT 1")
                .fetch_optional(pool)
                .await
                .map_err(classify)?;
            Ok(any.is_none())
        })
    }

    async fn create_org(&self, name: &str, email: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        let created_at = timestamp(now);
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            sqlx::query(
                "INSERT INTO organizations (name, email, created_at, probability_multiplier)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(name)
            .bind(email)
            .bind(&created_at)
            .bind(1.0_f64)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists(format!("organization {name}"))
                } else {
                    classify(e)
                }
            })?;
            let record = AuditRecord::new(&self.operator, "autojoin create-org")
                .org(name)
                .change(None, Some(serde_json::json!({ "email": email })));
            (*tx).audit(&record).await?;
            tx.commit().await.map_err(classify)
        })
    }

    async fn create_autojoin_key(
        &self,
        org: &str,
        key: &AutojoinApiKey,
        now: OffsetDateTime,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<(), StoreError> {
        let (hash, created_at) = (key.secret().sha256_hex(), timestamp(now));
        let expires_at = expires_at.map(seconds);
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            // INSERT ... SELECT inserts nothing when the organization is
            // missing, which tells "no such organization" apart in one statement.
            let inserted = sqlx::query(
                "INSERT INTO autojoin_keys (key_hash, org, created_at, expires_at)
                 SELECT $1, name, $3, $4 FROM organizations WHERE name = $2",
            )
            .bind(&hash)
            .bind(org)
            .bind(&created_at)
            .bind(&expires_at)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists("that autojoin key".into())
                } else {
                    classify(e)
                }
            })?
            .rows_affected();
            if inserted == 0 {
                return Err(StoreError::NotFound(format!("organization {org}")));
            }
            let record = AuditRecord::new(&self.operator, "autojoin create-key")
                .org(org)
                .fingerprint(&fingerprint_of_hash(&hash))
                .change(None, Some(autojoin_key_state(expires_at.as_deref())));
            (*tx).audit(&record).await?;
            tx.commit().await.map_err(classify)
        })
    }

    async fn list_integrations(&self) -> Result<Vec<IntegrationInfo>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT integration_id, description, created_at FROM integrations ORDER BY integration_id",
            )
            .fetch_all(pool)
            .await
            .map_err(classify)?;
            rows.iter()
                .map(|r| {
                    Ok(IntegrationInfo {
                        integration_id: r.try_get("integration_id").map_err(backend)?,
                        description: r.try_get("description").map_err(backend)?,
                        created_at: r.try_get("created_at").map_err(backend)?,
                    })
                })
                .collect()
        })
    }

    async fn list_integration_keys(&self, integration_id: &str) -> Result<Vec<KeyInfo>, StoreError> {
        self.require(
            "SELECT integration_id FROM integrations WHERE integration_id = $1",
            integration_id,
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("integration {integration_id}")))?;
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT key_id, status, tier, created_at, description, expires_at, last_used_at, tokens_issued
                 FROM integration_keys WHERE integration_id = $1 ORDER BY key_id",
            )
            .bind(integration_id)
            .fetch_all(pool)
            .await
            .map_err(classify)?;
            rows.iter().map(|r| Ok(key_info!(r))).collect()
        })
    }

    async fn get_integration_key(&self, integration_id: &str, key_id: &str) -> Result<KeyInfo, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT key_id, status, tier, created_at, description, expires_at, last_used_at, tokens_issued
                 FROM integration_keys WHERE integration_id = $1 AND key_id = $2",
            )
            .bind(integration_id)
            .bind(key_id)
            .fetch_optional(pool)
            .await
            .map_err(classify)?
            .ok_or_else(|| key_not_found(integration_id, key_id))?;
            Ok(key_info!(row))
        })
    }

    async fn delete_integration(&self, integration_id: &str) -> Result<usize, StoreError> {
        self.delete_with_children(
            "DELETE FROM integration_keys WHERE integration_id = $1",
            "DELETE FROM integrations WHERE integration_id = $1",
            integration_id,
            &Invalidation::Integration {
                integration_id: integration_id.to_owned(),
            },
            AuditRecord::new(&self.operator, "integration delete").integration(integration_id),
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("integration {integration_id}")))
    }

    async fn update_integration_key(
        &self,
        integration_id: &str,
        key_id: &str,
        change: KeyChange,
    ) -> Result<(), StoreError> {
        let published = Invalidation::IntegrationKey {
            integration_id: integration_id.to_owned(),
            key_id: key_id.to_owned(),
        };
        let action = match &change {
            KeyChange::Status(status) if status == STATUS_REVOKED => "key revoke",
            KeyChange::Status(_) => "key activate",
            KeyChange::Tier(_) => "key set-tier",
            KeyChange::Expiry(_) => "key set-expiry",
        };
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let row = sqlx::query(locking(
                pool,
                "SELECT status, tier, expires_at FROM integration_keys WHERE integration_id = $1 AND key_id = $2",
            ))
            .bind(integration_id)
            .bind(key_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?
            .ok_or_else(|| key_not_found(integration_id, key_id))?;
            let mut status: String = row.try_get("status").map_err(backend)?;
            let mut tier: i64 = row.try_get("tier").map_err(backend)?;
            let mut expires_at: Option<String> = row.try_get("expires_at").map_err(backend)?;
            let before = key_state(&status, tier, expires_at.as_deref());
            match change {
                KeyChange::Status(new) => status = new,
                KeyChange::Tier(new) => tier = new,
                KeyChange::Expiry(new) => expires_at = new.map(seconds),
            }
            sqlx::query(
                "UPDATE integration_keys SET status = $1, tier = $2, expires_at = $3
                 WHERE integration_id = $4 AND key_id = $5",
            )
            .bind(&status)
            .bind(tier)
            .bind(&expires_at)
            .bind(integration_id)
            .bind(key_id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            let record = AuditRecord::new(&self.operator, action)
                .key(integration_id, key_id)
                .change(Some(before), Some(key_state(&status, tier, expires_at.as_deref())));
            (*tx).audit(&record).await?;
            (*tx).publish(&published).await?;
            tx.commit().await.map_err(classify)
        })
    }

    async fn delete_integration_key(&self, integration_id: &str, key_id: &str) -> Result<(), StoreError> {
        let published = Invalidation::IntegrationKey {
            integration_id: integration_id.to_owned(),
            key_id: key_id.to_owned(),
        };
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let row = sqlx::query(
                "DELETE FROM integration_keys WHERE integration_id = $1 AND key_id = $2
                 RETURNING status, tier, expires_at",
            )
            .bind(integration_id)
            .bind(key_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(classify)?
            .ok_or_else(|| key_not_found(integration_id, key_id))?;
            let (status, tier, expires_at): (String, i64, Option<String>) = (
                row.try_get("status").map_err(backend)?,
                row.try_get("tier").map_err(backend)?,
                row.try_get("expires_at").map_err(backend)?,
            );
            let record = AuditRecord::new(&self.operator, "key delete")
                .key(integration_id, key_id)
                .change(Some(key_state(&status, tier, expires_at.as_deref())), None);
            (*tx).audit(&record).await?;
            (*tx).publish(&published).await?;
            tx.commit().await.map_err(classify)
        })
    }

    async fn list_orgs(&self) -> Result<Vec<OrgInfo>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT name, email, created_at, probability_multiplier FROM organizations ORDER BY name",
            )
            .fetch_all(pool)
            .await
            .map_err(classify)?;
            rows.iter()
                .map(|r| {
                    Ok(OrgInfo {
                        org: r.try_get("name").map_err(backend)?,
                        email: r.try_get("email").map_err(backend)?,
                        created_at: r.try_get("created_at").map_err(backend)?,
                        probability_multiplier: r.try_get("probability_multiplier").map_err(backend)?,
                    })
                })
                .collect()
        })
    }

    async fn list_autojoin_keys(&self, org: &str) -> Result<Vec<AutojoinKeyInfo>, StoreError> {
        self.require("SELECT name FROM organizations WHERE name = $1", org)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("organization {org}")))?;
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT key_hash, created_at, expires_at, last_used_at, tokens_issued FROM autojoin_keys
                 WHERE org = $1 ORDER BY created_at, key_hash",
            )
            .bind(org)
            .fetch_all(pool)
            .await
            .map_err(classify)?;
            rows.iter()
                .map(|r| {
                    let hash: String = r.try_get("key_hash").map_err(backend)?;
                    Ok(AutojoinKeyInfo {
                        fingerprint: fingerprint_of_hash(&hash),
                        created_at: r.try_get("created_at").map_err(backend)?,
                        expires_at: r.try_get("expires_at").map_err(backend)?,
                        last_used_at: r.try_get("last_used_at").map_err(backend)?,
                        tokens_issued: r.try_get("tokens_issued").map_err(backend)?,
                    })
                })
                .collect()
        })
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

    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for u in usage {
                let used = seconds(u.last_used_at);
                let tokens = i64::try_from(u.tokens).unwrap_or(i64::MAX);
                // Whole-second RFC 3339 text has a fixed width, so the later
                // of two times is the greater text.
                let query = match &u.key {
                    UsageKey::Integration { integration_id, key_id } => sqlx::query(
                        "UPDATE integration_keys SET tokens_issued = tokens_issued + $1,
                             last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < $2 THEN $2
                                                 ELSE last_used_at END
                         WHERE integration_id = $3 AND key_id = $4",
                    )
                    .bind(tokens)
                    .bind(used)
                    .bind(integration_id)
                    .bind(key_id),
                    UsageKey::Autojoin { key_hash } => sqlx::query(
                        "UPDATE autojoin_keys SET tokens_issued = tokens_issued + $1,
                             last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < $2 THEN $2
                                                 ELSE last_used_at END
                         WHERE key_hash = $3",
                    )
                    .bind(tokens)
                    .bind(used)
                    .bind(key_hash),
                };
                query.execute(&mut *tx).await.map_err(classify)?;
            }
            tx.commit().await.map_err(classify)
        })
    }

    async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT at, operator, action, integration_id, key_id, org, fingerprint, before, after
                 FROM audit_log ORDER BY seq",
            )
            .fetch_all(pool)
            .await
            .map_err(classify)?;
            let json = |text: Option<String>| text.and_then(|t| serde_json::from_str(&t).ok());
            let mut records = Vec::new();
            for r in &rows {
                let record = AuditRecord {
                    at: r.try_get("at").map_err(backend)?,
                    operator: r.try_get("operator").map_err(backend)?,
                    action: r.try_get("action").map_err(backend)?,
                    integration_id: r.try_get("integration_id").map_err(backend)?,
                    key_id: r.try_get("key_id").map_err(backend)?,
                    org: r.try_get("org").map_err(backend)?,
                    fingerprint: r.try_get("fingerprint").map_err(backend)?,
                    before: json(r.try_get("before").map_err(backend)?),
                    after: json(r.try_get("after").map_err(backend)?),
                };
                if filter.matches(&record) {
                    records.push(record);
                }
            }
            Ok(records)
        })
    }

    async fn delete_org(&self, org: &str) -> Result<usize, StoreError> {
        self.delete_with_children(
            "DELETE FROM autojoin_keys WHERE org = $1",
            "DELETE FROM organizations WHERE name = $1",
            org,
            &Invalidation::Organization { org: org.to_owned() },
            AuditRecord::new(&self.operator, "autojoin delete-org").org(org),
        )
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("organization {org}")))
    }
}

impl SqlStore {
    /// Deletes a row and its children in one transaction; returns how many
    /// children went, or `None` (and changes nothing) if the row is missing.
    async fn delete_with_children(
        &self,
        children: &'static str,
        parent: &'static str,
        id: &str,
        published: &Invalidation,
        record: AuditRecord,
    ) -> Result<Option<usize>, StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let removed = sqlx::query(children).bind(id).execute(&mut *tx).await.map_err(classify)?.rows_affected();
            let deleted = sqlx::query(parent).bind(id).execute(&mut *tx).await.map_err(classify)?.rows_affected();
            if deleted == 0 {
                // Dropping the transaction rolls it back: nothing changes.
                return Ok(None);
            }
            let record = record.change(Some(serde_json::json!({ "keys": removed })), None);
            (*tx).audit(&record).await?;
            (*tx).publish(published).await?;
            tx.commit().await.map_err(classify)?;
            Ok(Some(usize::try_from(removed).unwrap_or(usize::MAX)))
        })
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
        // The fingerprint is checked to be hex, so it holds no LIKE wildcard.
        let prefix = format!("{fingerprint}%");
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let rows = sqlx::query(locking(
                pool,
                "SELECT key_hash, expires_at FROM autojoin_keys WHERE org = $1 AND key_hash LIKE $2",
            ))
                .bind(org)
                .bind(&prefix)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?;
            let row = match rows.as_slice() {
                [] => {
                    return Err(StoreError::NotFound(format!(
                        "a key with fingerprint {fingerprint} in organization {org}"
                    )));
                }
                [row] => row,
                _ => {
                    return Err(StoreError::Ambiguous(format!(
                        "{} keys of organization {org} start with {fingerprint}; give more of the fingerprint",
                        rows.len()
                    )));
                }
            };
            let hash: String = row.try_get("key_hash").map_err(backend)?;
            let old: Option<String> = row.try_get("expires_at").map_err(backend)?;
            let before = Some(autojoin_key_state(old.as_deref()));
            let record = match expiry {
                None => {
                    sqlx::query("DELETE FROM autojoin_keys WHERE key_hash = $1")
                        .bind(&hash)
                        .execute(&mut *tx)
                        .await
                        .map_err(classify)?;
                    AuditRecord::new(&self.operator, "autojoin delete-key").change(before, None)
                }
                Some(new) => {
                    let new = new.map(seconds);
                    sqlx::query("UPDATE autojoin_keys SET expires_at = $1 WHERE key_hash = $2")
                        .bind(&new)
                        .bind(&hash)
                        .execute(&mut *tx)
                        .await
                        .map_err(classify)?;
                    AuditRecord::new(&self.operator, "autojoin set-expiry")
                        .change(before, Some(autojoin_key_state(new.as_deref())))
                }
            };
            (*tx).audit(&record.org(org).fingerprint(&fingerprint_of_hash(&hash))).await?;
            (*tx).publish(&Invalidation::Organization { org: org.to_owned() }).await?;
            tx.commit().await.map_err(classify)
        })
    }

    /// The one text column `sql` selects with `$1 = value`, if a row matches.
    async fn require(&self, sql: &'static str, value: &str) -> Result<Option<String>, StoreError> {
        on_pool!(self, pool => {
            sqlx::query_scalar(sql).bind(value).fetch_optional(pool).await.map_err(classify)
        })
    }
}

/// An instant as the SQL stores keep it: RFC 3339 in UTC, whole seconds,
/// so that every value has the same width and compares as text.
fn seconds(t: OffsetDateTime) -> String {
    super::rfc3339(t.replace_nanosecond(0).unwrap_or(t))
}

/// Reads an instant written by [`seconds`] (or by hand, in RFC 3339).
fn parse_time(text: Option<String>) -> Result<Option<OffsetDateTime>, StoreError> {
    text.map(|t| {
        OffsetDateTime::parse(&t, &Rfc3339).map_err(|e| StoreError::Backend(format!("unreadable time {t:?}: {e}")))
    })
    .transpose()
}

/// Appending to the audit log inside the transaction of the change.
trait Audit {
    async fn audit(&mut self, record: &AuditRecord) -> Result<(), StoreError>;
}

/// The statement is the same for both databases; only the connection type differs.
macro_rules! impl_audit {
    ($connection:ty) => {
        impl Audit for $connection {
            async fn audit(&mut self, r: &AuditRecord) -> Result<(), StoreError> {
                let json = |v: &Option<serde_json::Value>| v.as_ref().map(serde_json::Value::to_string);
                sqlx::query(
                    "INSERT INTO audit_log
                         (at, operator, action, integration_id, key_id, org, fingerprint, before, after)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&r.at)
                .bind(&r.operator)
                .bind(&r.action)
                .bind(&r.integration_id)
                .bind(&r.key_id)
                .bind(&r.org)
                .bind(&r.fingerprint)
                .bind(json(&r.before))
                .bind(json(&r.after))
                .execute(&mut *self)
                .await
                .map_err(classify)?;
                Ok(())
            }
        }
    };
}

impl_audit!(sqlx::SqliteConnection);
impl_audit!(sqlx::PgConnection);

/// Publishing a change inside the transaction that makes it.
trait Publish {
    async fn publish(&mut self, what: &Invalidation) -> Result<(), StoreError>;
}

/// Rows of `changes` kept; older ones go as new ones come. A server more
/// than this many changes behind sees the gap and drops its whole cache.
const SQLITE_CHANGES_KEPT: i64 = 10_000;

impl Publish for sqlx::SqliteConnection {
    async fn publish(&mut self, what: &Invalidation) -> Result<(), StoreError> {
        let (kind, subject, key_id) = what.to_parts();
        let at = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let seq: i64 =
            sqlx::query_scalar("INSERT INTO changes (kind, subject, key_id, at) VALUES ($1, $2, $3, $4) RETURNING seq")
                .bind(kind)
                .bind(subject)
                .bind(key_id)
                .bind(at)
                .fetch_one(&mut *self)
                .await
                .map_err(classify)?;
        sqlx::query("DELETE FROM changes WHERE seq <= $1")
            .bind(seq - SQLITE_CHANGES_KEPT)
            .execute(&mut *self)
            .await
            .map_err(classify)?;
        Ok(())
    }
}

impl Publish for sqlx::PgConnection {
    async fn publish(&mut self, what: &Invalidation) -> Result<(), StoreError> {
        let (kind, subject, key_id) = what.to_parts();
        let at = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let payload = serde_json::json!({ "kind": kind, "subject": subject, "key_id": key_id, "at": at });
        // Delivered to every listener when (and only if) the transaction commits.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(PG_CHANNEL)
            .bind(payload.to_string())
            .execute(&mut *self)
            .await
            .map_err(classify)?;
        Ok(())
    }
}

fn parse_at(at: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(at, &Rfc3339).ok()
}

/// Polls SQLite's `changes` table.
struct SqliteFeed {
    pool: SqlitePool,
    interval: Duration,
    /// The last change seen, `None` until the first read.
    last: Option<Seen>,
    recovery: Recovery,
}

/// A change a feed has read: its `seq` and its `at`, which tells it apart
/// from a change with the same `seq` in another copy of the database.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    seq: i64,
    at: String,
}

/// Changes read in one poll at most; the rest come with the next.
const CHANGES_PER_POLL: i64 = 1_000;

impl SqliteFeed {
    /// The newest change, or seq 0 for none.
    async fn newest(&self) -> Result<Seen, StoreError> {
        let row = sqlx::query("SELECT seq, at FROM changes ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        match row {
            Some(r) => Ok(Seen {
                seq: r.try_get("seq").map_err(backend)?,
                at: r.try_get("at").map_err(backend)?,
            }),
            None => Ok(Seen {
                seq: 0,
                at: String::new(),
            }),
        }
    }

    async fn poll(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
        let Some(last) = self.last.clone() else {
            // Start at the newest change: the cache is empty, nothing older matters.
            self.last = Some(self.newest().await?);
            return Ok(Vec::new());
        };
        // From the last change seen, which must still be there as it was:
        // if it is not, the file was restored from an older copy or replaced
        // (or pruned past us), and what changed is not known.
        let rows =
            sqlx::query("SELECT seq, kind, subject, key_id, at FROM changes WHERE seq >= $1 ORDER BY seq LIMIT $2")
                .bind(last.seq)
                .bind(CHANGES_PER_POLL + 1)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
        let mut rows = rows.iter().peekable();
        if last.seq > 0 {
            let still_there = match rows.peek() {
                Some(row) => {
                    let seq: i64 = row.try_get("seq").map_err(backend)?;
                    let at: String = row.try_get("at").map_err(backend)?;
                    seq == last.seq && at == last.at
                }
                None => false,
            };
            if !still_there {
                tracing::warn!(
                    last_seq = last.seq,
                    "the change last read is gone from the SQLite store (restored from an older copy, replaced, \
                     or pruned past this server): dropping the whole cache"
                );
                self.last = Some(self.newest().await?);
                return Ok(vec![ChangeNotice::everything()]);
            }
            rows.next();
        }
        let mut notices = Vec::new();
        let mut expected = last.seq + 1;
        for row in rows {
            let seq: i64 = row.try_get("seq").map_err(backend)?;
            if seq != expected {
                // Rows missing in between: changes were missed.
                notices.push(ChangeNotice::everything());
            }
            expected = seq + 1;
            let (kind, subject, key_id, at): (String, String, String, String) = (
                row.try_get("kind").map_err(backend)?,
                row.try_get("subject").map_err(backend)?,
                row.try_get("key_id").map_err(backend)?,
                row.try_get("at").map_err(backend)?,
            );
            notices.push(ChangeNotice {
                what: Invalidation::from_parts(&kind, &subject, &key_id),
                at: parse_at(&at),
            });
            self.last = Some(Seen { seq, at });
        }
        Ok(notices)
    }
}

#[async_trait]
impl ChangeFeed for SqliteFeed {
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

/// Listens for PostgreSQL notifications on its own connection.
///
/// A connection that a middlebox dropped without a FIN or RST looks idle
/// for ever: nothing arrives, and nothing says it never will. So when no
/// notification came for `heartbeat`, the listener runs a query on its
/// connection; no answer within `timeout` means the connection is dead:
/// it is dropped, a new one is made, and (since notifications sent
/// meanwhile are lost) the feed reports `Everything`.
struct PgFeed {
    options: PgConnectOptions,
    /// Bounds connecting and the heartbeat's answer (`--store-timeout`).
    timeout: Duration,
    /// Quiet time after which the connection is checked.
    heartbeat: Duration,
    /// The listener, and the one-connection pool it owns.
    listener: Option<(sqlx::postgres::PgListener, PgPool)>,
    recovery: Recovery,
}

impl PgFeed {
    async fn connect(&self) -> Result<(sqlx::postgres::PgListener, PgPool), StoreError> {
        // A pool per connection: a listener dropped on a dead connection
        // hands it back to its pool from a task that may wait on it until
        // the kernel gives up, and that must not hold up the next one.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.timeout)
            .connect_lazy_with(self.options.clone());
        let connect = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
                .await
                .map_err(classify)?;
            listener.listen(PG_CHANNEL).await.map_err(classify)?;
            Ok::<_, StoreError>(listener)
        };
        let listener = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| StoreError::Unavailable("connecting the change listener timed out".into()))??;
        Ok((listener, pool))
    }

    async fn receive(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
        let Some((listener, _)) = self.listener.as_mut() else {
            self.listener = Some(self.connect().await?);
            // Return at once, so that a feed back from a failure reports it
            // now rather than with the next notification.
            return Ok(Vec::new());
        };
        match tokio::time::timeout(self.heartbeat, listener.try_recv()).await {
            Ok(Ok(Some(notification))) => Ok(vec![notice_from_payload(notification.payload())]),
            // The connection dropped; the listener reconnects, and whatever
            // was sent meanwhile is lost.
            Ok(Ok(None)) => {
                self.recovery.lost_track();
                Ok(Vec::new())
            }
            Ok(Err(e)) => {
                self.listener = None;
                Err(classify(e))
            }
            Err(_quiet) => {
                let answered =
                    tokio::time::timeout(self.timeout, sqlx::query("SELECT 1").execute(&mut *listener)).await;
                match answered {
                    Ok(Ok(_)) => Ok(Vec::new()),
                    Ok(Err(e)) => {
                        self.listener = None;
                        Err(classify(e))
                    }
                    Err(_) => {
                        self.listener = None;
                        Err(StoreError::Unavailable(format!(
                            "the change listener's connection did not answer a heartbeat within {:?}",
                            self.timeout
                        )))
                    }
                }
            }
        }
    }
}

fn notice_from_payload(payload: &str) -> ChangeNotice {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
    let field = |name: &str| v.get(name).and_then(serde_json::Value::as_str).unwrap_or_default();
    ChangeNotice {
        what: Invalidation::from_parts(field("kind"), field("subject"), field("key_id")),
        at: parse_at(field("at")),
    }
}

#[async_trait]
impl ChangeFeed for PgFeed {
    async fn next(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
        let result = self.receive().await;
        self.recovery.observe(result)
    }

    fn recoveries(&self) -> u64 {
        self.recovery.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api_key::IntegrationApiKey;

    async fn store() -> (tempfile::TempDir, SqlStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqlStore::open_sqlite(&dir.path().join("t.db"), Duration::from_secs(2))
            .await
            .unwrap();
        (dir, store)
    }

    fn new_key(int: &str, key: &IntegrationApiKey, tier: i64) -> NewIntegrationKey {
        NewIntegrationKey {
            integration_id: int.into(),
            integration_description: "d".into(),
            key_id: key.key_id().into(),
            key_hash: key.secret().sha256_hex(),
            key_description: "k".into(),
            tier,
            created_at: OffsetDateTime::now_utc(),
            expires_at: None,
            replaces: None,
        }
    }

    #[tokio::test]
    async fn integration_keys_round_trip() {
        let (_dir, s) = store().await;
        assert!(s.is_empty().await.unwrap());
        let k = IntegrationApiKey::generate("acme", None);
        assert!(s.create_integration_key(&new_key("acme", &k, 3)).await.unwrap());
        assert!(!s.is_empty().await.unwrap());
        let rec = s.integration_key("acme", k.key_id()).await.unwrap().unwrap();
        assert_eq!(rec.status, "active");
        assert_eq!(rec.tier, 3);
        assert!(k.secret().matches_hash(&rec.key_hash));
        assert_eq!(s.integration_key("acme", "ki_other").await.unwrap(), None);
        assert_eq!(s.integration_key("other", k.key_id()).await.unwrap(), None);

        // A second key reuses the integration; the same key ID is refused.
        let k2 = IntegrationApiKey::generate("acme", None);
        assert!(!s.create_integration_key(&new_key("acme", &k2, 0)).await.unwrap());
        let dup = IntegrationApiKey::generate("acme", Some(k.key_id()));
        assert!(matches!(
            s.create_integration_key(&new_key("acme", &dup, 0)).await,
            Err(StoreError::AlreadyExists(_))
        ));
        // The refused duplicate did not replace the original.
        let rec = s.integration_key("acme", k.key_id()).await.unwrap().unwrap();
        assert!(k.secret().matches_hash(&rec.key_hash));
    }

    #[tokio::test]
    async fn autojoin_keys_round_trip() {
        let (_dir, s) = store().await;
        let now = OffsetDateTime::now_utc();
        let key = AutojoinApiKey::generate();
        assert!(matches!(
            s.create_autojoin_key("mlab", &key, now, None).await,
            Err(StoreError::NotFound(_))
        ));
        s.create_org("mlab", "ops@example.org", now).await.unwrap();
        assert!(matches!(
            s.create_org("mlab", "x@example.org", now).await,
            Err(StoreError::AlreadyExists(_))
        ));
        s.create_autojoin_key("mlab", &key, now, None).await.unwrap();
        assert_eq!(s.autojoin_org(&key).await.unwrap().unwrap().org, "mlab");
        assert_eq!(s.autojoin_org(&AutojoinApiKey::generate()).await.unwrap(), None);
        // Only the hash is stored.
        let SqlPool::Sqlite(pool) = &s.pool else { unreachable!() };
        let stored: String = sqlx::query_scalar("SELECT key_hash FROM autojoin_keys")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_ne!(stored, key.secret().expose());
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let k = IntegrationApiKey::generate("acme", None);
        {
            let s = SqlStore::open_sqlite(&path, Duration::from_secs(2)).await.unwrap();
            s.create_integration_key(&new_key("acme", &k, 0)).await.unwrap();
        }
        let s = SqlStore::open_sqlite(&path, Duration::from_secs(2)).await.unwrap();
        assert!(s.integration_key("acme", k.key_id()).await.unwrap().is_some());
    }

    /// A database error with only a code, as the drivers report them.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    /// Which failures callers see as an outage (503, retried, stale-if-error)
    /// and which as a fault of ours (500, not retried).
    #[test]
    fn outages_are_told_apart_from_faults() {
        let unavailable = |e: sqlx::Error| matches!(classify(e), StoreError::Unavailable(_));
        assert!(unavailable(sqlx::Error::PoolTimedOut));
        assert!(unavailable(sqlx::Error::PoolClosed));
        assert!(unavailable(sqlx::Error::Io(
            std::io::ErrorKind::ConnectionRefused.into()
        )));
        // SQLite busy / locked; PostgreSQL connection loss, shutdown,
        // statement timeout, too many connections, serialization, deadlock.
        for code in [
            "5", "6", "08006", "08001", "57P01", "57P03", "57014", "53300", "40001", "40P01",
        ] {
            assert!(unavailable(sqlx::Error::Database(Box::new(Coded(code)))), "{code}");
        }
        // Constraint violations, syntax errors, a missing table, and
        // everything that is not the database's answer.
        for code in ["23505", "42601", "42P01", "1", "19"] {
            assert!(!unavailable(sqlx::Error::Database(Box::new(Coded(code)))), "{code}");
        }
        assert!(!unavailable(sqlx::Error::RowNotFound));
        assert!(!unavailable(sqlx::Error::Protocol("bad message".into())));
    }

    #[test]
    fn passwords_are_redacted_from_error_texts() {
        let url = "postgres://app:s3cret-pw@db.example:5432/keys";
        assert_eq!(
            redact("cannot reach postgres://app:s3cret-pw@db.example", url),
            "cannot reach postgres://app:<redacted>@db.example"
        );
        assert_eq!(redact("no password here", "postgres://app@db/keys"), "no password here");
        assert_eq!(redact("not a url", "::"), "not a url");
    }

    #[tokio::test]
    async fn opening_fails_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-folder/t.db");
        let err = SqlStore::open_sqlite(&missing, Duration::from_secs(1))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, StoreError::Unavailable(m) if m.contains("cannot create")),
            "{err}"
        );
        assert!(err.to_string().contains("no-such-folder"), "{err}");

        for url in [
            "postgres://app:pw-123@db:notaport/keys",
            "postgres://app:pw-123@db:5432/keys?sslmode=sometimes",
        ] {
            let err = SqlStore::open_postgres(url, Duration::from_secs(1), 1)
                .await
                .err()
                .unwrap();
            assert!(
                matches!(&err, StoreError::Config(m) if m.contains("not a PostgreSQL URL")),
                "{err}"
            );
            assert!(!err.to_string().contains("pw-123"), "{err}");
        }
    }
}
