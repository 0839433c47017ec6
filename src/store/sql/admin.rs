//! The admin writes and reads. Each write reads what the rulebook needs
//! (locking the rows it replaces), asks the rulebook, writes its rows, and
//! records the rulebook's [`Effects`] in the same transaction.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row as _;
use time::OffsetDateTime;

use super::feed::Publish;
use super::{SqlPool, SqlStore, WritePool as _, backend, classify, is_unique_violation, locking, seconds, timestamp};
use crate::store::changes::ChangeFeed;
use crate::store::rules::{self, AutojoinChange, Effects, KeyValues};
use crate::store::{
    Admin, KeyChange, KeyUsage, NewAutojoinKey, NewIntegrationKey, STATUS_ACTIVE, StoreError, UsageKey,
};

#[async_trait]
impl Admin for SqlStore {
    fn change_feed(&self, interval: Duration) -> Box<dyn ChangeFeed> {
        self.feed(interval)
    }

    async fn change_autojoin_key(&self, org: &str, fingerprint: &str, to: AutojoinChange) -> Result<(), StoreError> {
        let change = to;
        rules::check_fingerprint(fingerprint)?;
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
            let mut keys = Vec::with_capacity(rows.len());
            for row in &rows {
                let hash: String = row.try_get("key_hash").map_err(backend)?;
                let expires_at: Option<String> = row.try_get("expires_at").map_err(backend)?;
                keys.push((hash, expires_at));
            }
            let (hash, before) = rules::pick_by_fingerprint(org, fingerprint, keys, |(h, _)| h.as_str())?;
            let (after, effects) = rules::change_autojoin_key(&self.operator, org, &hash, before.as_deref(), change);
            match after {
                None => sqlx::query("DELETE FROM autojoin_keys WHERE key_hash = $1").bind(&hash),
                Some(expires_at) => sqlx::query("UPDATE autojoin_keys SET expires_at = $1 WHERE key_hash = $2")
                    .bind(expires_at)
                    .bind(&hash),
            }
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            (*tx).record(effects).await?;
            tx.commit().await.map_err(classify)
        })
    }

    async fn create_integration_key(&self, key: &NewIntegrationKey) -> Result<bool, StoreError> {
        let created_at = timestamp(key.created_at);
        let effects = rules::create_integration_key(&self.operator, key);
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
            .bind(STATUS_ACTIVE)
            .bind(key.tier)
            .bind(&key.key_description)
            .bind(&created_at)
            .bind(key.expires_at.map(rules::expiry_text))
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    rules::key_exists(&key.integration_id, &key.key_id)
                } else {
                    classify(e)
                }
            })?;
            (*tx).record(effects).await?;
            tx.commit().await.map_err(classify)?;
            Ok(created)
        })
    }

    async fn create_org(&self, name: &str, email: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        let created_at = timestamp(now);
        let effects = rules::create_org(&self.operator, name, email);
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
            .map_err(|e| if is_unique_violation(&e) { rules::org_exists(name) } else { classify(e) })?;
            (*tx).record(effects).await?;
            tx.commit().await.map_err(classify)
        })
    }

    async fn create_autojoin_key(&self, new: &NewAutojoinKey<'_>) -> Result<(), StoreError> {
        let (org, key, now, expires_at) = (new.org, new.key, new.created_at, new.expires_at);
        let (hash, created_at) = (key.secret().sha256_hex(), timestamp(now));
        let effects = rules::create_autojoin_key(&self.operator, org, &hash, expires_at);
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
            .bind(expires_at.map(rules::expiry_text))
            .execute(&mut *tx)
            .await
            .map_err(|e| if is_unique_violation(&e) { rules::autojoin_key_exists() } else { classify(e) })?
            .rows_affected();
            if inserted == 0 {
                return Err(rules::org_not_found(org));
            }
            (*tx).record(effects).await?;
            tx.commit().await.map_err(classify)
        })
    }

    async fn delete_integration(&self, integration_id: &str) -> Result<usize, StoreError> {
        self.delete_with_children(
            "DELETE FROM integration_keys WHERE integration_id = $1",
            "DELETE FROM integrations WHERE integration_id = $1",
            integration_id,
            |keys| rules::delete_integration(&self.operator, integration_id, keys),
        )
        .await?
        .ok_or_else(|| rules::integration_not_found(integration_id))
    }

    async fn update_integration_key(&self, integration: &str, key_id: &str, to: KeyChange) -> Result<(), StoreError> {
        let (integration_id, change) = (integration, to);
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
            .ok_or_else(|| rules::key_not_found(integration_id, key_id))?;
            let before = key_values(&row)?;
            let (after, effects) = rules::change_integration_key(&self.operator, integration_id, key_id, &before, &change);
            sqlx::query(
                "UPDATE integration_keys SET status = $1, tier = $2, expires_at = $3
                 WHERE integration_id = $4 AND key_id = $5",
            )
            .bind(&after.status)
            .bind(after.tier)
            .bind(&after.expires_at)
            .bind(integration_id)
            .bind(key_id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            (*tx).record(effects).await?;
            tx.commit().await.map_err(classify)
        })
    }

    async fn delete_integration_key(&self, integration_id: &str, key_id: &str) -> Result<(), StoreError> {
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
            .ok_or_else(|| rules::key_not_found(integration_id, key_id))?;
            let before = key_values(&row)?;
            (*tx).record(rules::delete_integration_key(&self.operator, integration_id, key_id, &before)).await?;
            tx.commit().await.map_err(classify)
        })
    }

    async fn record_usage(&self, usage: &[KeyUsage]) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for u in usage {
                let used = seconds(u.last_used_at);
                let tokens = i64::try_from(u.tokens).unwrap_or(i64::MAX);
                // The rulebook's `add_usage` in SQL, so that concurrent
                // replicas add up in the database: whole-second RFC 3339
                // text has a fixed width, so the later time is the greater text.
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

    async fn delete_org(&self, org: &str) -> Result<usize, StoreError> {
        self.delete_with_children(
            "DELETE FROM autojoin_keys WHERE org = $1",
            "DELETE FROM organizations WHERE name = $1",
            org,
            |keys| rules::delete_org(&self.operator, org, keys),
        )
        .await?
        .ok_or_else(|| rules::org_not_found(org))
    }
}

/// The audited values of the integration key `row` holds.
fn key_values<R: sqlx::Row>(row: &R) -> Result<KeyValues, StoreError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(KeyValues {
        status: row.try_get("status").map_err(backend)?,
        tier: row.try_get("tier").map_err(backend)?,
        expires_at: row.try_get("expires_at").map_err(backend)?,
    })
}

impl SqlStore {
    /// Deletes a row and its children in one transaction; returns how many
    /// children went, or `None` (and changes nothing) if the row is missing.
    async fn delete_with_children(
        &self,
        children: &'static str,
        parent: &'static str,
        id: &str,
        effects: impl Fn(usize) -> Effects + Send,
    ) -> Result<Option<usize>, StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let removed = sqlx::query(children).bind(id).execute(&mut *tx).await.map_err(classify)?.rows_affected();
            let deleted = sqlx::query(parent).bind(id).execute(&mut *tx).await.map_err(classify)?.rows_affected();
            if deleted == 0 {
                // Dropping the transaction rolls it back: nothing changes.
                return Ok(None);
            }
            let removed = usize::try_from(removed).unwrap_or(usize::MAX);
            (*tx).record(effects(removed)).await?;
            tx.commit().await.map_err(classify)?;
            Ok(Some(removed))
        })
    }
}

/// Recording what a write does, in its transaction: the audit record and
/// the published change.
trait Record {
    async fn record(&mut self, effects: Effects) -> Result<(), StoreError>;
}

/// The audit statement is the same for both databases; only the connection
/// type differs, and how a change is published (see `feed`).
macro_rules! impl_record {
    ($connection:ty) => {
        impl Record for $connection {
            async fn record(&mut self, effects: Effects) -> Result<(), StoreError> {
                let r = &effects.audit;
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
                if let Some(what) = &effects.publish {
                    self.publish(what).await?;
                }
                Ok(())
            }
        }
    };
}

impl_record!(sqlx::SqliteConnection);
impl_record!(sqlx::PgConnection);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api_key::{AutojoinApiKey, IntegrationApiKey};
    use crate::store::{AutojoinKeys as _, IntegrationKeys as _, Listing as _};

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
            s.create_autojoin_key(&NewAutojoinKey::new("mlab", &key, now, None))
                .await,
            Err(StoreError::NotFound(_))
        ));
        s.create_org("mlab", "ops@example.org", now).await.unwrap();
        assert!(matches!(
            s.create_org("mlab", "x@example.org", now).await,
            Err(StoreError::AlreadyExists(_))
        ));
        s.create_autojoin_key(&NewAutojoinKey::new("mlab", &key, now, None))
            .await
            .unwrap();
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
}
