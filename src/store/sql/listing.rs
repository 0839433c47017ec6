//! The admin CLI's reads.

use async_trait::async_trait;
use sqlx::Row as _;

use super::{SqlPool, SqlStore, backend, classify};
use crate::api_key::fingerprint_of_hash;
use crate::store::rules;
use crate::store::{AuditFilter, AuditRecord, AutojoinKeyInfo, IntegrationInfo, KeyInfo, Listing, OrgInfo, StoreError};

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
impl Listing for SqlStore {
    async fn is_empty(&self) -> Result<bool, StoreError> {
        on_pool!(self, pool => {
            let any: Option<String> = sqlx::query_scalar("SELECT integration_id FROM integrations LIMIT 1")
                .fetch_optional(pool)
                .await
                .map_err(classify)?;
            Ok(any.is_none())
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
        .ok_or_else(|| rules::integration_not_found(integration_id))?;
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
            .ok_or_else(|| rules::key_not_found(integration_id, key_id))?;
            Ok(key_info!(row))
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
            .ok_or_else(|| rules::org_not_found(org))?;
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
}

impl SqlStore {
    /// The one text column `sql` selects with `$1 = value`, if a row matches.
    async fn require(&self, sql: &'static str, value: &str) -> Result<Option<String>, StoreError> {
        on_pool!(self, pool => {
            sqlx::query_scalar(sql).bind(value).fetch_optional(pool).await.map_err(classify)
        })
    }
}
