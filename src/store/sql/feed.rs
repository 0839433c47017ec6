//! Following the changes: SQLite's `changes` table, read by the polling
//! feed; PostgreSQL's notifications, on a listening connection of its own.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row as _;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::SqlitePool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{SqlPool, SqlStore, backend, classify};
use crate::store::StoreError;
use crate::store::changes::{
    ChangeFeed, ChangeLog, ChangeNotice, Invalidation, Logged, PG_CHANNEL, PollingFeed, Position, Recovery,
};

impl SqlStore {
    /// SQLite: the `changes` table, polled every `interval`. PostgreSQL: a
    /// listener, checked by a heartbeat after `interval` of quiet.
    pub(super) fn feed(&self, interval: Duration) -> Box<dyn ChangeFeed> {
        match &self.pool {
            SqlPool::Sqlite(pool) => Box::new(PollingFeed::new(SqliteLog(pool.clone()), interval)),
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
}

/// Publishing a change inside the transaction that makes it.
pub(super) trait Publish {
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

/// SQLite's `changes` table. SQLite has one writer at a time, so rows
/// commit in `seq` order and a read never skips one that commits later.
struct SqliteLog(SqlitePool);

fn logged(row: &sqlx::sqlite::SqliteRow) -> Result<Logged, StoreError> {
    let text = |name: &str| row.try_get::<String, _>(name).map_err(backend);
    let at = text("at")?;
    Ok(Logged {
        notice: ChangeNotice {
            what: Invalidation::from_parts(&text("kind")?, &text("subject")?, &text("key_id")?),
            at: parse_at(&at),
        },
        position: Position {
            seq: row.try_get("seq").map_err(backend)?,
            tag: at,
        },
    })
}

#[async_trait]
impl ChangeLog for SqliteLog {
    async fn newest(&self) -> Result<Position, StoreError> {
        let row = sqlx::query("SELECT seq, at FROM changes ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&self.0)
            .await
            .map_err(classify)?;
        match row {
            Some(r) => Ok(Position {
                seq: r.try_get("seq").map_err(backend)?,
                tag: r.try_get("at").map_err(backend)?,
            }),
            None => Ok(Position::default()),
        }
    }

    async fn read_from(&self, from: i64, limit: usize) -> Result<Vec<Logged>, StoreError> {
        let rows =
            sqlx::query("SELECT seq, kind, subject, key_id, at FROM changes WHERE seq >= $1 ORDER BY seq LIMIT $2")
                .bind(from)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.0)
                .await
                .map_err(classify)?;
        rows.iter().map(logged).collect()
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
