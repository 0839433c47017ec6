//! The store conformance suite: the same store-level tests, unchanged, on
//! every backend (memory, SQLite, PostgreSQL, the Datastore emulator). What
//! one backend does, all must: every admin operation, its audit record and
//! published change, lookups, expiry, usage, the change feed and its
//! recovery, concurrent writers, bursts, and restores wherever a backend can
//! be put in that state.

#[path = "../support/services.rs"]
#[allow(dead_code)]
mod services;

mod backends;
mod cases;

/// Each case, as a test on each backend; a backend whose service is not
/// here skips (or, where the run requires it, fails).
macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $case() { super::cases::$case(&super::backends::memory()).await } )*
        }
        mod sqlite {
            $( #[tokio::test] async fn $case() { super::cases::$case(&super::backends::sqlite().await).await } )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    if let Some(f) = super::backends::postgres().await {
                        super::cases::$case(&f).await
                    }
                }
            )*
        }
        mod datastore {
            $(
                #[tokio::test]
                async fn $case() {
                    if let Some(f) = super::backends::datastore().await {
                        super::cases::$case(&f).await
                    }
                }
            )*
        }
    };
}

on_every_backend!(
    integration_keys_are_created_and_looked_up,
    each_key_change_is_audited_and_published,
    a_write_that_fails_records_and_publishes_nothing,
    deleting_keys_and_integrations_is_audited_and_published,
    organizations_and_their_keys_are_created_and_looked_up,
    autojoin_keys_change_by_fingerprint,
    an_ambiguous_fingerprint_is_refused,
    usage_adds_up_and_keeps_the_later_use,
    the_audit_log_is_in_order_and_filtered,
    lists_are_sorted_and_show_no_secrets,
    a_feed_starts_at_the_newest_change,
    a_burst_of_changes_is_read_in_full_and_in_order,
    two_writers_on_one_row_both_take_effect,
    a_restored_store_is_noticed_by_the_feed,
    an_outage_is_reported_and_the_feed_recovers,
);
