//! The request path's reads: one point read per lookup.

use async_trait::async_trait;
use sqlx::Row as _;

use super::{SqlPool, SqlStore, backend, classify, parse_time};
use crate::api_key::AutojoinApiKey;
use crate::store::{AutojoinKeyRecord, AutojoinKeys, Backend, IntegrationKeyRecord, IntegrationKeys, StoreError};

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
