//! How SQL errors are classified: outages apart from faults.

use super::*;

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
