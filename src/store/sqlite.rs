//! The embedded store: one SQLite file, no setup.
//!
//! The server and the admin CLI may open the same file at once. Writes are a
//! few rows in a millisecond, so the classic rollback journal is enough:
//! whoever finds the file locked waits (up to `--store-timeout`) instead of
//! failing. It also keeps the store one file at rest (WAL mode would add
//! `-wal` and `-shm` files that must be copied with it), and a lock held too
//! long by another process shows up as what it is: a store that does not
//! answer (503 and not ready), never as a bad key.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlSafeStr as _};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{
    Admin, AutojoinKeyInfo, AutojoinKeys, Backend, IntegrationInfo, IntegrationKeyRecord, IntegrationKeys, KeyChange,
    KeyInfo, NewIntegrationKey, OrgInfo, StoreError, check_fingerprint, key_not_found,
};
use crate::api_key::AutojoinApiKey;
use crate::api_key::FINGERPRINT_LEN;

/// Connections in the pool. SQLite serialises writers anyway; a few readers
/// in parallel are plenty on two cores.
const MAX_CONNECTIONS: u32 = 4;

pub struct SqliteStore {
    pool: SqlitePool,
}

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        "initial".into(),
        MigrationType::Simple,
        include_str!("../../migrations/sqlite/0001_initial.sql").into_sql_str(),
        false,
    )])
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema
    /// up to date. `timeout` (`--store-timeout`) bounds both the wait for a
    /// lock held by another process (the CLI and the server share the file)
    /// and the wait for a pooled connection: past it, a request gets a 503
    /// rather than hanging.
    pub async fn open(path: &Path, timeout: Duration) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(backend)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Delete)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(timeout)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(timeout)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        migrator()
            .run(&pool)
            .await
            .map_err(|e| StoreError::Backend(format!("schema migration of {} failed: {e}", path.display())))?;
        Ok(Self { pool })
    }
}

fn timestamp(t: OffsetDateTime) -> String {
    // Unwrap: RFC 3339 formatting fails only for years outside 0..=9999.
    t.format(&Rfc3339).expect("timestamp within RFC 3339 range")
}

/// Errors that retrying may cure are `Unavailable`; the rest are `Backend`.
fn classify(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("5" | "6")) => {
            // SQLITE_BUSY and SQLITE_LOCKED: another writer held on too long.
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Backend(e.to_string()),
    }
}

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[async_trait]
impl IntegrationKeys for SqliteStore {
    async fn integration_key(
        &self,
        integration_id: &str,
        key_id: &str,
    ) -> Result<Option<IntegrationKeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT key_hash, status, tier FROM integration_keys WHERE integration_id = $1 AND key_id = $2",
        )
        .bind(integration_id)
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        row.map(|r| {
            Ok(IntegrationKeyRecord {
                key_hash: r.try_get("key_hash").map_err(backend)?,
                status: r.try_get("status").map_err(backend)?,
                tier: r.try_get("tier").map_err(backend)?,
            })
        })
        .transpose()
    }
}

#[async_trait]
impl AutojoinKeys for SqliteStore {
    async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT org FROM autojoin_keys WHERE key_hash = $1")
            .bind(key.secret().sha256_hex())
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)
    }
}

#[async_trait]
impl Backend for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A read of a real table, so a lock held by another process shows.
        sqlx::query("SELECT 1 FROM integration_keys LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(())
    }
}

#[async_trait]
impl Admin for SqliteStore {
    async fn create_integration_key(&self, key: &NewIntegrationKey) -> Result<bool, StoreError> {
        let created_at = timestamp(key.created_at);
        let mut tx = self.pool.begin().await.map_err(classify)?;
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
                 (integration_id, key_id, key_hash, status, tier, description, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&key.integration_id)
        .bind(&key.key_id)
        .bind(&key.key_hash)
        .bind(super::STATUS_ACTIVE)
        .bind(key.tier)
        .bind(&key.key_description)
        .bind(&created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::AlreadyExists(format!("key {} of integration {}", key.key_id, key.integration_id))
            } else {
                classify(e)
            }
        })?;
        tx.commit().await.map_err(classify)?;
        Ok(created)
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        let any: Option<i64> = sqlx::query_scalar("SELECT 1 FROM integrations LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        Ok(any.is_none())
    }

    async fn create_org(&self, name: &str, email: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO organizations (name, email, created_at, probability_multiplier)
             VALUES ($1, $2, $3, 1.0)",
        )
        .bind(name)
        .bind(email)
        .bind(timestamp(now))
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::AlreadyExists(format!("organization {name}"))
            } else {
                classify(e)
            }
        })?;
        Ok(())
    }

    async fn create_autojoin_key(
        &self,
        org: &str,
        key: &AutojoinApiKey,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        // INSERT ... SELECT inserts nothing when the organization is missing,
        // which tells "no such organization" apart in one statement.
        let inserted = sqlx::query(
            "INSERT INTO autojoin_keys (key_hash, org, created_at)
             SELECT $1, name, $3 FROM organizations WHERE name = $2",
        )
        .bind(key.secret().sha256_hex())
        .bind(org)
        .bind(timestamp(now))
        .execute(&self.pool)
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
        Ok(())
    }

    async fn list_integrations(&self) -> Result<Vec<IntegrationInfo>, StoreError> {
        let rows =
            sqlx::query("SELECT integration_id, description, created_at FROM integrations ORDER BY integration_id")
                .fetch_all(&self.pool)
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
    }

    async fn list_integration_keys(&self, integration_id: &str) -> Result<Vec<KeyInfo>, StoreError> {
        self.require_integration(integration_id).await?;
        let rows = sqlx::query(
            "SELECT key_id, status, tier, created_at, description FROM integration_keys
             WHERE integration_id = $1 ORDER BY key_id",
        )
        .bind(integration_id)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter().map(key_info).collect()
    }

    async fn get_integration_key(&self, integration_id: &str, key_id: &str) -> Result<KeyInfo, StoreError> {
        let row = sqlx::query(
            "SELECT key_id, status, tier, created_at, description FROM integration_keys
             WHERE integration_id = $1 AND key_id = $2",
        )
        .bind(integration_id)
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?
        .ok_or_else(|| key_not_found(integration_id, key_id))?;
        key_info(&row)
    }

    async fn delete_integration(&self, integration_id: &str) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let keys = sqlx::query("DELETE FROM integration_keys WHERE integration_id = $1")
            .bind(integration_id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
        let deleted = sqlx::query("DELETE FROM integrations WHERE integration_id = $1")
            .bind(integration_id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
        if deleted == 0 {
            // Dropping the transaction rolls it back: nothing changes.
            return Err(StoreError::NotFound(format!("integration {integration_id}")));
        }
        tx.commit().await.map_err(classify)?;
        Ok(usize::try_from(keys).unwrap_or(usize::MAX))
    }

    async fn update_integration_key(
        &self,
        integration_id: &str,
        key_id: &str,
        change: KeyChange,
    ) -> Result<(), StoreError> {
        let query = match &change {
            KeyChange::Status(status) => {
                sqlx::query("UPDATE integration_keys SET status = $1 WHERE integration_id = $2 AND key_id = $3")
                    .bind(status.clone())
            }
            KeyChange::Tier(tier) => {
                sqlx::query("UPDATE integration_keys SET tier = $1 WHERE integration_id = $2 AND key_id = $3")
                    .bind(*tier)
            }
        };
        let updated = query
            .bind(integration_id)
            .bind(key_id)
            .execute(&self.pool)
            .await
            .map_err(classify)?
            .rows_affected();
        if updated == 0 {
            return Err(key_not_found(integration_id, key_id));
        }
        Ok(())
    }

    async fn delete_integration_key(&self, integration_id: &str, key_id: &str) -> Result<(), StoreError> {
        let deleted = sqlx::query("DELETE FROM integration_keys WHERE integration_id = $1 AND key_id = $2")
            .bind(integration_id)
            .bind(key_id)
            .execute(&self.pool)
            .await
            .map_err(classify)?
            .rows_affected();
        if deleted == 0 {
            return Err(key_not_found(integration_id, key_id));
        }
        Ok(())
    }

    async fn list_orgs(&self) -> Result<Vec<OrgInfo>, StoreError> {
        let rows =
            sqlx::query("SELECT name, email, created_at, probability_multiplier FROM organizations ORDER BY name")
                .fetch_all(&self.pool)
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
    }

    async fn list_autojoin_keys(&self, org: &str) -> Result<Vec<AutojoinKeyInfo>, StoreError> {
        self.require_org(org).await?;
        let rows =
            sqlx::query("SELECT key_hash, created_at FROM autojoin_keys WHERE org = $1 ORDER BY created_at, key_hash")
                .bind(org)
                .fetch_all(&self.pool)
                .await
                .map_err(classify)?;
        rows.iter()
            .map(|r| {
                let hash: String = r.try_get("key_hash").map_err(backend)?;
                Ok(AutojoinKeyInfo {
                    fingerprint: hash[..FINGERPRINT_LEN.min(hash.len())].to_owned(),
                    created_at: r.try_get("created_at").map_err(backend)?,
                })
            })
            .collect()
    }

    async fn delete_autojoin_key(&self, org: &str, fingerprint: &str) -> Result<(), StoreError> {
        check_fingerprint(fingerprint)?;
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let matches: Vec<String> =
            sqlx::query_scalar("SELECT key_hash FROM autojoin_keys WHERE org = $1 AND substr(key_hash, 1, $2) = $3")
                .bind(org)
                .bind(i64::try_from(fingerprint.len()).unwrap_or(i64::MAX))
                .bind(fingerprint)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?;
        match matches.as_slice() {
            [] => Err(StoreError::NotFound(format!(
                "a key with fingerprint {fingerprint} in organization {org}"
            ))),
            [hash] => {
                sqlx::query("DELETE FROM autojoin_keys WHERE key_hash = $1")
                    .bind(hash)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                tx.commit().await.map_err(classify)
            }
            _ => Err(StoreError::Ambiguous(format!(
                "{} keys of organization {org} start with {fingerprint}; give more of the fingerprint",
                matches.len()
            ))),
        }
    }

    async fn delete_org(&self, org: &str) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let keys = sqlx::query("DELETE FROM autojoin_keys WHERE org = $1")
            .bind(org)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
        let deleted = sqlx::query("DELETE FROM organizations WHERE name = $1")
            .bind(org)
            .execute(&mut *tx)
            .await
            .map_err(classify)?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound(format!("organization {org}")));
        }
        tx.commit().await.map_err(classify)?;
        Ok(usize::try_from(keys).unwrap_or(usize::MAX))
    }
}

impl SqliteStore {
    async fn require_integration(&self, integration_id: &str) -> Result<(), StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM integrations WHERE integration_id = $1")
            .bind(integration_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        found
            .map(|_| ())
            .ok_or_else(|| StoreError::NotFound(format!("integration {integration_id}")))
    }

    async fn require_org(&self, org: &str) -> Result<(), StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM organizations WHERE name = $1")
            .bind(org)
            .fetch_optional(&self.pool)
            .await
            .map_err(classify)?;
        found
            .map(|_| ())
            .ok_or_else(|| StoreError::NotFound(format!("organization {org}")))
    }
}

fn key_info(r: &sqlx::sqlite::SqliteRow) -> Result<KeyInfo, StoreError> {
    Ok(KeyInfo {
        key_id: r.try_get("key_id").map_err(backend)?,
        status: r.try_get("status").map_err(backend)?,
        tier: r.try_get("tier").map_err(backend)?,
        created_at: r.try_get("created_at").map_err(backend)?,
        description: r.try_get("description").map_err(backend)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api_key::IntegrationApiKey;

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db"), Duration::from_secs(2))
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
            s.create_autojoin_key("mlab", &key, now).await,
            Err(StoreError::NotFound(_))
        ));
        s.create_org("mlab", "ops@example.org", now).await.unwrap();
        assert!(matches!(
            s.create_org("mlab", "x@example.org", now).await,
            Err(StoreError::AlreadyExists(_))
        ));
        s.create_autojoin_key("mlab", &key, now).await.unwrap();
        assert_eq!(s.autojoin_org(&key).await.unwrap().as_deref(), Some("mlab"));
        assert_eq!(s.autojoin_org(&AutojoinApiKey::generate()).await.unwrap(), None);
        // Only the hash is stored.
        let stored: String = sqlx::query_scalar("SELECT key_hash FROM autojoin_keys")
            .fetch_one(&s.pool)
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
            let s = SqliteStore::open(&path, Duration::from_secs(2)).await.unwrap();
            s.create_integration_key(&new_key("acme", &k, 0)).await.unwrap();
        }
        let s = SqliteStore::open(&path, Duration::from_secs(2)).await.unwrap();
        assert!(s.integration_key("acme", k.key_id()).await.unwrap().is_some());
    }
}
