//! The usage writer against a real SQLite store that fails: counts are kept
//! through a locked database and a slow one, and written once it answers.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{Workspace, lock_sqlite};
use time::OffsetDateTime;
use token_exchange::store::{Listing, UsageKey};
use token_exchange::usage::{UsageRecorder, flush, flush_every};

async fn tokens_issued(store: &dyn Listing, integration: &str) -> i64 {
    store.list_integration_keys(integration).await.unwrap()[0].tokens_issued
}

#[tokio::test]
async fn usage_counts_survive_a_locked_store_and_are_written_when_it_answers() {
    let ws = Workspace::new("EdDSA");
    let created = ws.admin_json(&["integration", "create", "--integration-id", "acme"]);
    let key = UsageKey::Integration {
        integration_id: "acme".into(),
        key_id: created["key_id"].as_str().unwrap().to_owned(),
    };
    let mut args = ws.store_args.clone();
    // SQLite's busy timeout is the store timeout: a locked file fails fast.
    args.store_timeout = Duration::from_millis(200);
    let store = token_exchange::store::open(&args).await.unwrap();
    let recorder = Arc::new(UsageRecorder::default());
    for _ in 0..3 {
        recorder.record(&key, OffsetDateTime::now_utc());
    }

    let lock = lock_sqlite(&ws).await;
    // The store answers, with an error: counts kept. (The lock shows as
    // SQLite's "database is locked", or, when the pool had to open a
    // connection, whose set-up waits on the lock too, as its time out.)
    let err = flush(&recorder, store.as_ref(), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.contains("locked") || err.contains("pool timed out"), "{err}");
    // The store does not answer in time: counts kept.
    let err = flush(&recorder, store.as_ref(), Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(err.contains("no answer within"), "{err}");

    // The background writer keeps trying while the store is locked...
    let writer = tokio::spawn(flush_every(
        recorder.clone(),
        store.clone(),
        Duration::from_millis(50),
        Duration::from_secs(1),
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    recorder.record(&key, OffsetDateTime::now_utc());
    drop(lock);
    // ...and writes everything, once, when it answers.
    let started = Instant::now();
    while tokens_issued(store.as_ref(), "acme").await < 4 {
        assert!(started.elapsed() < Duration::from_secs(10), "usage never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tokens_issued(store.as_ref(), "acme").await, 4, "written once");
    assert!(recorder.take().is_empty());
    let shown = store.list_integration_keys("acme").await.unwrap();
    assert!(shown[0].last_used_at.is_some());
    writer.abort();
}
