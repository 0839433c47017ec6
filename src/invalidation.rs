//! Follows the changes admin commands publish (see
//! [`crate::store::changes`]) and drops what they made stale from this
//! server's validation cache, so a revoked key is refused within seconds on
//! every replica. The cache TTL stays the bound when the feed is down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::cache::KeyCache;
use crate::metrics::Metrics;
use crate::store::changes::{ChangeFeed, ChangeNotice, Invalidation};

/// Pause after a failed read of the feed, so a store outage costs one
/// attempt a second, not a busy loop.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Longest a feed may take to answer: every feed answers within its poll
/// interval (or heartbeat) plus a store call, so one that takes longer is
/// stuck, and is reported and asked again.
pub const STALL_BOUND: Duration = Duration::from_secs(30);

/// How far ahead of this server's clock a change may be stamped before the
/// stamp is called wrong (clocks a little apart are normal).
const FUTURE_TOLERANCE: time::Duration = time::Duration::seconds(10);

/// Runs until the process ends.
pub async fn follow(mut feed: Box<dyn ChangeFeed>, cache: Arc<KeyCache>, metrics: Arc<Metrics>) {
    let mut failing_since: Option<Instant> = None;
    let mut recoveries = 0;
    // A read that did not answer may have lost changes that no later read
    // repeats: the next success then drops everything.
    let mut stalled = false;
    // Until its first read, a feed has no position: a key cached before it
    // was read may have changed in between, and no later read reports that.
    let mut positioned = false;
    loop {
        let result = match tokio::time::timeout(STALL_BOUND, feed.next()).await {
            Ok(result) => result,
            Err(_) => {
                stalled = true;
                Err(crate::store::StoreError::Unavailable(format!(
                    "the change feed did not answer within {STALL_BOUND:?}"
                )))
            }
        };
        match result {
            Ok(notices) => {
                if let Some(since) = failing_since.take() {
                    tracing::info!(after = ?since.elapsed(), "reading published changes again");
                }
                metrics.change_feed_up.set(1);
                metrics
                    .change_feed_last_read
                    .set(OffsetDateTime::now_utc().unix_timestamp());
                let now = feed.recoveries();
                metrics.change_feed_recoveries.inc_by(now - recoveries);
                recoveries = now;
                if !std::mem::replace(&mut positioned, true)
                    && !notices.iter().any(|n| n.what == Invalidation::Everything)
                {
                    // Not counted as a flush: that series tells of changes
                    // that may have been missed while the feed was down.
                    let dropped = cache.invalidate(&Invalidation::Everything);
                    tracing::debug!(dropped, "dropped the keys cached before the change feed's first read");
                }
                if std::mem::take(&mut stalled) {
                    metrics.change_feed_recoveries.inc();
                    apply(&cache, &metrics, &ChangeNotice::everything());
                }
                for notice in &notices {
                    apply(&cache, &metrics, notice);
                }
            }
            Err(e) => {
                metrics.change_feed_up.set(0);
                if failing_since.is_none() {
                    tracing::warn!(
                        error = %e,
                        "cannot read published changes; until this recovers, a revoked key may work \
                         for up to --key-cache-ttl"
                    );
                    failing_since = Some(Instant::now());
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

fn apply(cache: &KeyCache, metrics: &Metrics, notice: &ChangeNotice) {
    metrics.invalidations_received.inc();
    let dropped = cache.invalidate(&notice.what);
    metrics.invalidations_applied.inc();
    if notice.what == Invalidation::Everything {
        metrics.key_cache_flushes.inc();
    }
    if let Some(at) = notice.at {
        let now = OffsetDateTime::now_utc();
        if at - now > FUTURE_TOLERANCE {
            // Harmless to the feed (it follows sequence numbers, not
            // stamps), but the lag figures and the audit log of that
            // machine are off by as much.
            metrics.change_feed_future_stamps.inc();
            tracing::warn!(
                ahead_seconds = (at - now).whole_seconds(),
                what = ?notice.what,
                "a published change is stamped in the future: the clock of the machine that made it is ahead"
            );
        }
        // A change stamped by a clock ahead of ours counts as no lag.
        let lag = (now - at).as_seconds_f64().max(0.0);
        metrics.invalidation_lag.observe(lag);
    }
    tracing::debug!(what = ?notice.what, dropped, "applied a published change");
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::cache::{CacheSettings, Grant, Verdict, cache_key};
    use crate::claims::Principal;
    use crate::ground::ManualClock;
    use crate::store::{StoreError, UsageKey};

    type Script = Arc<Mutex<VecDeque<Result<Vec<ChangeNotice>, StoreError>>>>;

    /// A feed that gives scripted answers, then waits forever.
    struct Scripted {
        answers: Script,
        recoveries: u64,
    }

    #[async_trait::async_trait]
    impl ChangeFeed for Scripted {
        async fn next(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
            let next = self.answers.lock().unwrap().pop_front();
            match next {
                Some(Err(e)) => {
                    self.recoveries += 1;
                    Err(e)
                }
                Some(answer) => answer,
                None => std::future::pending().await,
            }
        }

        fn recoveries(&self) -> u64 {
            self.recoveries
        }
    }

    fn cache_and_metrics() -> (Arc<KeyCache>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let cache = Arc::new(KeyCache::new(
            CacheSettings::default(),
            Arc::new(ManualClock::new()),
            metrics.clone(),
        ));
        (cache, metrics)
    }

    async fn cache_valid(cache: &KeyCache, key: &str) {
        let grant = Grant {
            principal: Principal::Autojoin { org: "org".into() },
            expires_at: None,
            usage: UsageKey::Autojoin { key_hash: key.into() },
        };
        let verdict = cache
            .verdict(cache_key(b'a', key), || async move { Ok(Verdict::Valid(grant)) })
            .await;
        assert!(matches!(verdict, Ok(Verdict::Valid(_))));
    }

    #[tokio::test]
    async fn a_failing_feed_is_retried_and_its_recovery_flushes_the_cache() {
        let (cache, metrics) = cache_and_metrics();
        cache_valid(&cache, "k1").await;
        cache_valid(&cache, "k2").await;
        let stamped = OffsetDateTime::now_utc() - time::Duration::seconds(2);
        let answers: Script = Arc::new(Mutex::new(VecDeque::from([
            Err(StoreError::Unavailable("the store is down".into())),
            Ok(vec![ChangeNotice {
                what: Invalidation::Everything,
                at: None,
            }]),
            Ok(vec![ChangeNotice {
                what: Invalidation::Organization { org: "nobody".into() },
                at: Some(stamped),
            }]),
        ])));
        let feed = Scripted {
            answers: answers.clone(),
            recoveries: 0,
        };
        let follower = tokio::spawn(follow(Box::new(feed), cache.clone(), metrics.clone()));
        let started = Instant::now();
        while metrics.invalidations_applied.get() < 2 {
            assert!(started.elapsed() < Duration::from_secs(10), "changes not applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // One pause after the failure, not a busy loop.
        assert!(started.elapsed() >= RETRY_PAUSE, "{:?}", started.elapsed());
        assert!(answers.lock().unwrap().is_empty());
        assert_eq!(metrics.invalidations_received.get(), 2);
        assert_eq!(metrics.key_cache_flushes.get(), 1, "only Everything flushes");
        assert_eq!(metrics.change_feed_recoveries.get(), 1);
        // Only the stamped change has a lag, of about 2 s.
        assert_eq!(metrics.invalidation_lag.get_sample_count(), 1);
        let lag = metrics.invalidation_lag.get_sample_sum();
        assert!((2.0..10.0).contains(&lag), "lag {lag}");
        // The flush dropped both cached keys: the next ask reaches the store.
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = asked.clone();
        let _ = cache
            .verdict(cache_key(b'a', "k1"), || async move {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(Verdict::Invalid("gone".into()))
            })
            .await;
        assert!(asked.load(std::sync::atomic::Ordering::SeqCst), "k1 was still cached");
        follower.abort();
    }

    #[tokio::test]
    async fn keys_cached_before_the_feeds_first_read_are_dropped_by_it() {
        let (cache, metrics) = cache_and_metrics();
        cache_valid(&cache, "early").await;
        let answers: Script = Arc::new(Mutex::new(VecDeque::from([Ok(vec![ChangeNotice {
            what: Invalidation::Organization { org: "nobody".into() },
            at: None,
        }])])));
        let feed = Scripted { answers, recoveries: 0 };
        let follower = tokio::spawn(follow(Box::new(feed), cache.clone(), metrics.clone()));
        let started = Instant::now();
        while metrics.invalidations_applied.get() < 1 {
            assert!(started.elapsed() < Duration::from_secs(10), "changes not applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(cache.len().0, 0, "a key cached before the first read survived it");
        assert_eq!(metrics.key_cache_flushes.get(), 0, "start-up is not an outage");
        follower.abort();
    }

    /// A feed whose first read never returns, then answers every second.
    struct Stuck {
        calls: u32,
    }

    #[async_trait::async_trait]
    impl ChangeFeed for Stuck {
        async fn next(&mut self) -> Result<Vec<ChangeNotice>, StoreError> {
            self.calls += 1;
            if self.calls == 1 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(Vec::new())
        }

        fn recoveries(&self) -> u64 {
            0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_feed_that_stops_answering_is_reported_and_its_return_flushes_the_cache() {
        let (cache, metrics) = cache_and_metrics();
        cache_valid(&cache, "k1").await;
        let follower = tokio::spawn(follow(Box::new(Stuck { calls: 0 }), cache.clone(), metrics.clone()));
        let started = tokio::time::Instant::now();
        while metrics.key_cache_flushes.get() == 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if started.elapsed() < STALL_BOUND {
                assert_eq!(metrics.key_cache_flushes.get(), 0, "flushed before the bound");
            }
            assert!(started.elapsed() < STALL_BOUND * 2, "the stall was never reported");
        }
        assert!(started.elapsed() >= STALL_BOUND);
        assert_eq!(metrics.change_feed_recoveries.get(), 1);
        assert_eq!(metrics.change_feed_up.get(), 1, "up again");
        assert!(metrics.change_feed_last_read.get() > 0);
        follower.abort();
    }

    #[test]
    fn a_change_from_a_clock_ahead_of_ours_counts_as_no_lag() {
        let metrics = Metrics::new();
        let cache = KeyCache::new(
            CacheSettings::default(),
            Arc::new(ManualClock::new()),
            Arc::new(Metrics::new()),
        );
        let ahead = ChangeNotice {
            what: Invalidation::Organization { org: "o".into() },
            at: Some(OffsetDateTime::now_utc() + time::Duration::minutes(5)),
        };
        apply(&cache, &metrics, &ahead);
        assert_eq!(metrics.invalidation_lag.get_sample_sum(), 0.0);
        assert_eq!(
            metrics.change_feed_future_stamps.get(),
            1,
            "five minutes ahead is reported"
        );
        let close = ChangeNotice {
            at: Some(OffsetDateTime::now_utc() + time::Duration::seconds(2)),
            ..ahead
        };
        apply(&cache, &metrics, &close);
        assert_eq!(
            metrics.change_feed_future_stamps.get(),
            1,
            "two seconds is a normal difference"
        );
        assert_eq!(metrics.key_cache_flushes.get(), 0);
    }
}
