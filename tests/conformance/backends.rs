//! The backends under test, each a fresh, empty store, with what a case
//! needs to put it in the states a production store reaches by accident.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use token_exchange::store::memory::Snapshot;
use token_exchange::store::{DatastoreConfig, DatastoreStore, MemoryStore, SqlStore, Store};

use crate::services::{fresh_postgres_database, not_here, unique};

/// Accidents a backend can be put through; each says `false` where it
/// cannot be (and the case then checks the rest).
#[async_trait]
pub trait Accidents: Send + Sync {
    /// Takes a backup, to be put back by `restore`.
    async fn back_up(&self) -> bool {
        false
    }
    /// Puts the backup back in place, as restoring it does.
    async fn restore(&self) {}
    /// Makes the store stop answering (`true`) or answer again.
    async fn set_down(&self, _down: bool) -> bool {
        false
    }
}

pub struct Fixture {
    pub backend: &'static str,
    pub store: Arc<dyn Store>,
    /// Another handle on the same data, as a second admin machine opens it.
    pub other: Arc<dyn Store>,
    pub accidents: Box<dyn Accidents>,
    _dir: Option<tempfile::TempDir>,
}

const TIMEOUT: Duration = Duration::from_secs(2);

struct MemoryAccidents(MemoryStore, Mutex<Option<Snapshot>>);

#[async_trait]
impl Accidents for MemoryAccidents {
    async fn back_up(&self) -> bool {
        *self.1.lock().unwrap() = Some(self.0.snapshot());
        true
    }
    async fn restore(&self) {
        let copy = self.1.lock().unwrap().take().expect("a backup");
        self.0.restore(copy);
    }
    async fn set_down(&self, down: bool) -> bool {
        self.0.set_unavailable(down);
        true
    }
}

pub fn memory() -> Fixture {
    let store = MemoryStore::new().with_operator("tester");
    Fixture {
        backend: "memory",
        other: Arc::new(store.clone().with_operator("other")),
        accidents: Box::new(MemoryAccidents(store.clone(), Mutex::new(None))),
        store: Arc::new(store),
        _dir: None,
    }
}

struct SqliteAccidents {
    path: std::path::PathBuf,
    /// Another process's connection, holding the write lock.
    holder: tokio::sync::Mutex<Option<sqlx::SqliteConnection>>,
}

impl SqliteAccidents {
    fn url(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }
}

#[async_trait]
impl Accidents for SqliteAccidents {
    async fn back_up(&self) -> bool {
        std::fs::copy(&self.path, self.path.with_extension("backup")).unwrap();
        true
    }
    async fn restore(&self) {
        use sqlx::Connection as _;
        std::fs::copy(self.path.with_extension("backup"), &self.path).unwrap();
        // A restore through SQLite's backup API moves the file's change
        // counter on, which tells open connections their cached pages are
        // stale; a bare copy puts the old one back. Move it on.
        let mut conn = sqlx::SqliteConnection::connect(&self.url()).await.unwrap();
        for version in 1..=5 {
            sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA user_version = {version}")))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
    async fn set_down(&self, down: bool) -> bool {
        use sqlx::Connection as _;
        let mut holder = self.holder.lock().await;
        if down {
            let mut conn = sqlx::SqliteConnection::connect(&self.url()).await.unwrap();
            sqlx::query("BEGIN EXCLUSIVE").execute(&mut conn).await.unwrap();
            *holder = Some(conn);
        } else if let Some(conn) = holder.take() {
            conn.close().await.unwrap();
        }
        true
    }
}

pub async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let open = |operator: &'static str| {
        let path = path.clone();
        async move {
            Arc::new(
                SqlStore::open_sqlite(&path, TIMEOUT)
                    .await
                    .unwrap()
                    .with_operator(operator),
            )
        }
    };
    Fixture {
        backend: "sqlite",
        store: open("tester").await,
        other: open("other").await,
        accidents: Box::new(SqliteAccidents {
            path: path.clone(),
            holder: tokio::sync::Mutex::new(None),
        }),
        _dir: Some(dir),
    }
}

/// PostgreSQL's feed is NOTIFY, which keeps no log: there is no position a
/// restore could move (a restored server restarts, and a listener that
/// loses its connection reports everything: tests/postgres.rs), and an
/// outage is a server stopped (tests/postgres.rs too).
struct NoAccidents;

impl Accidents for NoAccidents {}

pub async fn postgres() -> Option<Fixture> {
    let Ok(admin) = std::env::var("TEST_DATABASE_URL") else {
        not_here("TEST_DATABASE_URL", "scripts/test starts PostgreSQL");
        return None;
    };
    let url = fresh_postgres_database(&admin);
    let open = |operator: &'static str| {
        let url = url.clone();
        async move {
            Arc::new(
                SqlStore::open_postgres(&url, TIMEOUT, 4)
                    .await
                    .unwrap()
                    .with_operator(operator),
            )
        }
    };
    Some(Fixture {
        backend: "postgres",
        store: open("tester").await,
        other: open("other").await,
        accidents: Box::new(NoAccidents),
        _dir: None,
    })
}

/// What a Datastore restore moves for the feed: its head, back to where
/// it was (the change entities after it stay, as after a partial restore).
struct DatastoreAccidents {
    host: String,
    project: String,
    own_ns: String,
    head: Mutex<Option<Value>>,
}

impl DatastoreAccidents {
    async fn call(&self, method: &str, body: Value) -> Value {
        let response = reqwest::Client::new()
            .post(format!("http://{}/v1/projects/{}:{method}", self.host, self.project))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{method}: {}", response.status());
        response.json().await.unwrap()
    }
}

#[async_trait]
impl Accidents for DatastoreAccidents {
    async fn back_up(&self) -> bool {
        let key = json!({
            "partitionId": { "projectId": self.project, "namespaceId": self.own_ns },
            "path": [{ "kind": token_exchange::store::datastore::FEED_HEAD_KIND, "name": "head" }],
        });
        let found = self.call("lookup", json!({ "keys": [key] })).await;
        *self.head.lock().unwrap() = Some(found["found"][0]["entity"].clone());
        true
    }
    async fn restore(&self) {
        let head = self.head.lock().unwrap().take().expect("a backup");
        self.call(
            "commit",
            json!({ "mode": "NON_TRANSACTIONAL", "mutations": [{ "upsert": head }] }),
        )
        .await;
    }
}

pub async fn datastore() -> Option<Fixture> {
    let Ok(host) = std::env::var("DATASTORE_EMULATOR_HOST") else {
        not_here("DATASTORE_EMULATOR_HOST", "scripts/test starts the Datastore emulator");
        return None;
    };
    // Namespaces of its own, so tests sharing the emulator never meet.
    let config = DatastoreConfig {
        project_id: "token-exchange-conformance".into(),
        platform_ns: unique("platform"),
        client_integration_ns: unique("integrations"),
        own_ns: unique("own"),
        timeout: TIMEOUT,
        emulator_host: Some(host.clone()),
    };
    let open = |operator: &str| Arc::new(DatastoreStore::new(&config).unwrap().with_operator(operator));
    Some(Fixture {
        backend: "datastore",
        store: open("tester"),
        other: open("other"),
        accidents: Box::new(DatastoreAccidents {
            host,
            project: config.project_id.clone(),
            own_ns: config.own_ns.clone(),
            head: Mutex::new(None),
        }),
        _dir: None,
    })
}
