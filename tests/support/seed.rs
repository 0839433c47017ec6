//! Writes keys straight into a store, bypassing our CLI: for Datastore, the
//! entities M-Lab's Go programs write (some without properties we add, such
//! as `tier`); for SQLite and PostgreSQL, the equivalent rows.

use serde_json::{Value, json};

use super::{Backend, Workspace};

/// A direct connection to a SQL store.
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Runs the same statement on either database.
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match &$db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

pub struct Seeder {
    backend: Backend,
    store: String,
    base: String,
    project: String,
    platform_ns: String,
    ci_ns: String,
    own_ns: String,
}

fn sha256_hex(text: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

const CREATED_AT: &str = "2025-06-01T12:00:00.000001Z";

impl Seeder {
    pub fn new(ws: &Workspace) -> Self {
        let store = ws.store_args.store.clone().unwrap_or_default();
        Self {
            backend: ws.backend,
            store,
            base: format!(
                "http://{}",
                std::env::var("DATASTORE_EMULATOR_HOST").unwrap_or_default()
            ),
            project: ws.store_args.project_id.clone(),
            platform_ns: ws.store_args.platform_ns.clone(),
            ci_ns: ws.store_args.client_integration_ns.clone(),
            own_ns: ws.store_args.own_ns.clone(),
        }
    }

    /// A seeder that writes to the emulator at `host` rather than the shared one.
    pub fn for_emulator(ws: &Workspace, host: &str) -> Self {
        Self {
            base: format!("http://{host}"),
            ..Self::new(ws)
        }
    }

    async fn db(&self) -> Db {
        // The server or CLI creates the schema; make sure it exists.
        let args = token_exchange::config::StoreArgs {
            store: Some(self.store.clone()),
            project_id: String::new(),
            platform_ns: String::new(),
            client_integration_ns: String::new(),
            own_ns: String::new(),
            store_timeout: std::time::Duration::from_secs(2),
            store_max_connections: 1,
        };
        token_exchange::store::open(&args).await.unwrap();
        match self.backend {
            Backend::Sqlite => Db::Sqlite(sqlx::SqlitePool::connect(&self.store).await.unwrap()),
            Backend::Postgres => Db::Postgres(sqlx::PgPool::connect(&self.store).await.unwrap()),
            Backend::Datastore => unreachable!("Datastore is written through its REST API"),
        }
    }

    fn key(&self, ns: &str, path: &[(&str, &str)]) -> Value {
        json!({
            "partitionId": { "projectId": self.project, "namespaceId": ns },
            "path": path.iter().map(|(k, n)| json!({"kind": k, "name": n})).collect::<Vec<_>>(),
        })
    }

    /// Upserts entities with the raw REST API.
    pub async fn datastore_commit(&self, entities: Vec<Value>) {
        let mutations: Vec<Value> = entities.into_iter().map(|e| json!({ "upsert": e })).collect();
        let response = reqwest::Client::new()
            .post(format!("{}/v1/projects/{}:commit", self.base, self.project))
            .json(&json!({ "mode": "NON_TRANSACTIONAL", "mutations": mutations }))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    }

    /// Looks up one entity with the raw REST API.
    pub async fn datastore_lookup(&self, ns_platform: bool, path: &[(&str, &str)]) -> Option<Value> {
        let ns = if ns_platform { &self.platform_ns } else { &self.ci_ns };
        self.lookup_in(ns, path).await
    }

    /// Looks up one entity of this service's own namespace.
    #[allow(dead_code)] // not every test binary reads it
    pub async fn datastore_lookup_own(&self, path: &[(&str, &str)]) -> Option<Value> {
        self.lookup_in(&self.own_ns, path).await
    }

    async fn lookup_in(&self, ns: &str, path: &[(&str, &str)]) -> Option<Value> {
        let response: Value = reqwest::Client::new()
            .post(format!("{}/v1/projects/{}:lookup", self.base, self.project))
            .json(&json!({ "keys": [self.key(ns, path)] }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        response["found"][0].get("entity").cloned()
    }

    /// An integration key with the given status; `tier: None` leaves the
    /// property out, as keys written before tiers existed.
    pub async fn integration_key(
        &self,
        int_id: &str,
        key_id: &str,
        secret: &str,
        status: &str,
        tier: Option<i64>,
    ) -> String {
        let hash = sha256_hex(secret);
        match self.backend {
            Backend::Sqlite | Backend::Postgres => {
                let db = self.db().await;
                on_db!(db, pool => {
                sqlx::query(
                    "INSERT INTO integrations (integration_id, description, created_at) VALUES ($1, '', $2) ON CONFLICT DO NOTHING",
                )
                .bind(int_id)
                .bind(CREATED_AT)
                .execute(pool)
                .await
                .unwrap();
                sqlx::query(
                    "INSERT INTO integration_keys (integration_id, key_id, key_hash, status, tier, description, created_at)
                     VALUES ($1, $2, $3, $4, $5, 'seeded', $6)",
                )
                .bind(int_id)
                .bind(key_id)
                .bind(&hash)
                .bind(status)
                .bind(tier.unwrap_or(0))
                .bind(CREATED_AT)
                .execute(pool)
                .await
                .unwrap();
                });
            }
            Backend::Datastore => {
                let meta = json!({
                    "key": self.key(&self.ci_ns, &[("IntegrationMeta", int_id)]),
                    "properties": {
                        "created_at": {"timestampValue": CREATED_AT},
                        "description": {"stringValue": "seeded"},
                    }
                });
                let mut props = json!({
                    "key_hash": {"stringValue": hash},
                    "created_at": {"timestampValue": CREATED_AT},
                    "description": {"stringValue": "seeded"},
                    "status": {"stringValue": status},
                });
                if let Some(t) = tier {
                    props["tier"] = json!({"integerValue": t.to_string()});
                }
                let key = json!({
                    "key": self.key(&self.ci_ns, &[("IntegrationMeta", int_id), ("IntegrationAPIKey", key_id)]),
                    "properties": props,
                });
                self.datastore_commit(vec![meta, key]).await;
            }
        }
        format!("mlabk.cii_{int_id}.{key_id}.{secret}")
    }

    /// Changes a key's status in place, as an operator editing the store
    /// would (revoking it, say).
    pub async fn set_status(&self, int_id: &str, key_id: &str, secret: &str, status: &str) {
        match self.backend {
            Backend::Sqlite | Backend::Postgres => {
                let db = self.db().await;
                on_db!(db, pool => {
                sqlx::query("UPDATE integration_keys SET status = $1 WHERE integration_id = $2 AND key_id = $3")
                    .bind(status)
                    .bind(int_id)
                    .bind(key_id)
                    .execute(pool)
                    .await
                    .unwrap();
                });
            }
            Backend::Datastore => {
                // Rewritten whole, as the Go programs' Put does.
                self.integration_key(int_id, key_id, secret, status, Some(0)).await;
            }
        }
    }

    /// An organization; `multiplier: None` stores a null, as older entities have.
    pub async fn org(&self, name: &str, multiplier: Option<f64>) {
        match self.backend {
            Backend::Sqlite | Backend::Postgres => {
                let db = self.db().await;
                on_db!(db, pool => {
                sqlx::query("INSERT INTO organizations (name, email, created_at, probability_multiplier) VALUES ($1, 'x@example.org', $2, $3)")
                    .bind(name)
                    .bind(CREATED_AT)
                    .bind(multiplier)
                    .execute(pool)
                    .await
                    .unwrap();
                });
            }
            Backend::Datastore => {
                let multiplier = match multiplier {
                    Some(m) => json!({ "doubleValue": m }),
                    None => json!({ "nullValue": null }),
                };
                self.datastore_commit(vec![json!({
                    "key": self.key(&self.platform_ns, &[("Organization", name)]),
                    "properties": {
                        "name": {"stringValue": name},
                        "email": {"stringValue": "x@example.org"},
                        "created_at": {"timestampValue": CREATED_AT},
                        "probability_multiplier": multiplier,
                    }
                })])
                .await;
            }
        }
    }

    /// An autojoin key held by `org`.
    pub async fn autojoin_key(&self, org: &str, key: &str) {
        match self.backend {
            Backend::Sqlite | Backend::Postgres => {
                let db = self.db().await;
                on_db!(db, pool => {
                sqlx::query("INSERT INTO autojoin_keys (key_hash, org, created_at) VALUES ($1, $2, $3)")
                    .bind(sha256_hex(key))
                    .bind(org)
                    .bind(CREATED_AT)
                    .execute(pool)
                    .await
                    .unwrap();
                });
            }
            Backend::Datastore => {
                self.datastore_commit(vec![json!({
                    "key": self.key(&self.platform_ns, &[("Organization", org), ("APIKey", key)]),
                    "properties": {
                        "created_at": {"timestampValue": CREATED_AT},
                        "key": {"stringValue": key},
                    }
                })])
                .await;
            }
        }
    }
}
