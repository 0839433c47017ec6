//! Opening the stores: pools, their limits, and the schema migrations.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::SqlSafeStr as _;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::{SQLITE_CONNECTIONS, SqlPool, SqlStore, backend};
use crate::store::StoreError;

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
        migration(
            1,
            "initial",
            include_str!("../../../migrations/sqlite/0001_initial.sql"),
        ),
        migration(
            2,
            "changes",
            include_str!("../../../migrations/sqlite/0002_changes.sql"),
        ),
        migration(
            3,
            "expiry usage audit",
            include_str!("../../../migrations/sqlite/0003_expiry_usage_audit.sql"),
        ),
    ])
}

fn postgres_migrator() -> Migrator {
    // PostgreSQL publishes changes with NOTIFY; it needs no table for them.
    Migrator::with_migrations(vec![
        migration(
            1,
            "initial",
            include_str!("../../../migrations/postgres/0001_initial.sql"),
        ),
        migration(
            2,
            "expiry usage audit",
            include_str!("../../../migrations/postgres/0002_expiry_usage_audit.sql"),
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

#[cfg(test)]
mod tests {
    use super::*;

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
