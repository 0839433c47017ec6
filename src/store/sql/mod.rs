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

use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::StoreError;

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

// After the macro, which the files below use.
mod admin;
mod connect;
mod feed;
mod listing;
mod lookup;

pub struct SqlStore {
    pool: SqlPool,
    /// Named in the audit log.
    operator: String,
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

#[cfg(test)]
mod tests;
