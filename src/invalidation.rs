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

/// Runs until the process ends.
pub async fn follow(mut feed: Box<dyn ChangeFeed>, cache: Arc<KeyCache>, metrics: Arc<Metrics>) {
    let mut failing_since: Option<Instant> = None;
    let mut recoveries = 0;
    loop {
        match feed.next().await {
            Ok(notices) => {
                if let Some(since) = failing_since.take() {
                    tracing::info!(after = ?since.elapsed(), "reading published changes again");
                }
                let now = feed.recoveries();
                metrics.change_feed_recoveries.inc_by(now - recoveries);
                recoveries = now;
                for notice in &notices {
                    apply(&cache, &metrics, notice);
                }
            }
            Err(e) => {
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
        // A change stamped by a clock ahead of ours counts as no lag.
        let lag = (OffsetDateTime::now_utc() - at).as_seconds_f64().max(0.0);
        metrics.invalidation_lag.observe(lag);
    }
    tracing::debug!(what = ?notice.what, dropped, "applied a published change");
}
