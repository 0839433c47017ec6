//! The validation cache in front of every store.
//!
//! A busy integration asks for a token per speed test; without a cache each
//! of those is a store read, and each store hiccup a failed test. With it:
//!
//! - A valid key is remembered for `ttl` (`--key-cache-ttl`). That is the
//!   longest a revoked key keeps working.
//! - A key the store refused (unknown, inactive, wrong secret) is remembered
//!   for `negative_ttl`, so repeating a made-up key does not repeat reads.
//! - Entries are keyed by the SHA-256 of the whole presented key: no
//!   plaintext is kept, and a wrong secret is a different entry from the
//!   right one. Refusals live in their own, smaller LRU, so a flood of
//!   made-up keys can only evict other refusals, never a valid key.
//! - Concurrent requests for one uncached key share one store call.
//! - When the store fails, a valid entry that expired less than
//!   `stale_if_error` ago still answers ("stale"); otherwise the caller gets
//!   503. A store failure never becomes a refusal.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::OnceCell;

use crate::claims::Principal;
use crate::ground::Clock;
use crate::metrics::Metrics;
use crate::store::changes::Invalidation;
use crate::store::{StoreError, UsageKey};

/// How long verdicts are kept, and how many.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// How long a valid key is trusted without asking the store again.
    pub ttl: Duration,
    /// How long a refused key is refused without asking the store again.
    pub negative_ttl: Duration,
    /// Entries at most, valid and refused together.
    pub capacity: usize,
    /// How long after expiry a valid entry may still answer while the
    /// store is failing.
    pub stale_if_error: Duration,
}

/// Revoking a key takes effect within this; short enough for an incident,
/// long enough that a busy key costs one store read per half minute.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Made-up keys repeated in a flood cost one read per 5 s each.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// At roughly 200 bytes an entry, about 20 MiB when full.
pub const DEFAULT_CAPACITY: usize = 100_000;
/// Rides out a store outage of a few minutes for keys seen recently.
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(600);

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            capacity: DEFAULT_CAPACITY,
            stale_if_error: DEFAULT_STALE_IF_ERROR,
        }
    }
}

/// What a valid key grants: the identity its tokens speak for, until when
/// (the key's expiry; tokens never outlive it), and which key its usage is
/// counted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub principal: Principal,
    pub expires_at: Option<time::OffsetDateTime>,
    pub usage: UsageKey,
}

/// What the store said about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid(Grant),
    /// Refused; the reason is for the log and never names the key.
    Invalid(String),
}

/// SHA-256 of a presented key, with a prefix per key kind.
pub type CacheKey = [u8; 32];

pub fn cache_key(kind: u8, presented: &str) -> CacheKey {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(&[kind, 0]);
    ctx.update(presented.as_bytes());
    let digest = ctx.finish();
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

struct Entry {
    verdict: Verdict,
    fresh_until: Instant,
    /// Until when it may answer while the store fails (valid entries only).
    stale_until: Instant,
}

/// A store call shared by concurrent requests for the same key.
type Flight = Arc<OnceCell<Result<Verdict, String>>>;

/// One request's share in a flight. The flight leaves the map when its
/// lookup ends, or when the last request waiting on it goes away (a client
/// that hangs up mid-lookup must not leave an entry behind for good).
struct Waiter<'a> {
    cache: &'a KeyCache,
    key: CacheKey,
    flight: Option<Flight>,
}

impl<'a> Waiter<'a> {
    fn join(cache: &'a KeyCache, key: CacheKey) -> Self {
        let mut map = lock(&cache.in_flight);
        let flight = map.entry(key).or_default().clone();
        cache.metrics.key_cache_flights.set(map.len() as i64);
        Self {
            cache,
            key,
            flight: Some(flight),
        }
    }

    fn flight(&self) -> &Flight {
        // Unwrap: taken only in drop.
        self.flight.as_ref().expect("a waiter holds its flight until dropped")
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let Some(flight) = self.flight.take() else { return };
        // Clones of a flight are made and dropped only under this lock, so
        // the count cannot change while it is held: one left means only
        // the map's own.
        let mut map = lock(&self.cache.in_flight);
        let ours = map.get(&self.key).is_some_and(|f| Arc::ptr_eq(f, &flight));
        drop(flight);
        if ours && map.get(&self.key).is_some_and(|f| Arc::strong_count(f) == 1) {
            map.remove(&self.key);
            self.cache.metrics.key_cache_flights.set(map.len() as i64);
        }
    }
}

pub struct KeyCache {
    settings: CacheSettings,
    clock: Arc<dyn Clock>,
    valid: Mutex<LruCache<CacheKey, Entry>>,
    refused: Mutex<LruCache<CacheKey, Entry>>,
    in_flight: Mutex<HashMap<CacheKey, Flight>>,
    /// Bumped by every invalidation. A lookup that started before one may
    /// have read what the change replaced, so its answer is not kept.
    generation: AtomicU64,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves a consistent map
    // (every operation is a single insert, get or remove).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A failure to validate: the store failed and nothing stale could answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

impl KeyCache {
    pub fn new(settings: CacheSettings, clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Self {
        // A quarter for refusals: enough to absorb a flood of made-up keys,
        // while valid keys keep most of the room.
        let refused = (settings.capacity / 4).max(1);
        let valid = settings.capacity.saturating_sub(refused).max(1);
        let size = |n: usize| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        Self {
            settings,
            clock,
            valid: Mutex::new(LruCache::new(size(valid))),
            refused: Mutex::new(LruCache::new(size(refused))),
            in_flight: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            metrics,
        }
    }

    fn count(&self, result: &'static str) {
        self.metrics.key_cache_outcome(result);
    }

    /// The verdict for `key`: from the cache while fresh, else from
    /// `lookup` (shared with concurrent callers for the same key).
    pub async fn verdict<F, Fut>(&self, key: CacheKey, lookup: F) -> Result<Verdict, Unavailable>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Verdict, StoreError>>,
    {
        let now = self.clock.now();
        if let Some(entry) = lock(&self.valid).get(&key).filter(|e| now < e.fresh_until) {
            self.count("hit");
            return Ok(entry.verdict.clone());
        }
        if let Some(entry) = lock(&self.refused).get(&key).filter(|e| now < e.fresh_until) {
            self.count("negative_hit");
            return Ok(entry.verdict.clone());
        }

        let waiter = Waiter::join(self, key);
        let flight = waiter.flight();
        let ran_lookup = AtomicBool::new(false);
        let outcome = flight
            .get_or_init(|| async {
                ran_lookup.store(true, Ordering::Relaxed);
                let generation = self.generation.load(Ordering::SeqCst);
                let result = lookup().await;
                if let Ok(verdict) = &result {
                    // Kept only if no invalidation arrived meanwhile; the
                    // answer itself is still given to this request.
                    if self.generation.load(Ordering::SeqCst) == generation {
                        self.remember(key, verdict);
                    }
                }
                // Later callers must ask the store again, not reuse this.
                let mut in_flight = lock(&self.in_flight);
                if in_flight.get(&key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                    in_flight.remove(&key);
                    self.metrics.key_cache_flights.set(in_flight.len() as i64);
                }
                result.map_err(|e| e.to_string())
            })
            .await
            .clone();
        drop(waiter);
        self.count(if ran_lookup.load(Ordering::Relaxed) {
            "miss"
        } else {
            "coalesced"
        });

        match outcome {
            Ok(verdict) => Ok(verdict),
            Err(why) => {
                let now = self.clock.now();
                if let Some(entry) = lock(&self.valid).get(&key).filter(|e| now < e.stale_until) {
                    self.count("stale");
                    tracing::warn!(error = %why, "store failed; answering from an expired cache entry");
                    return Ok(entry.verdict.clone());
                }
                Err(Unavailable(why))
            }
        }
    }

    fn remember(&self, key: CacheKey, verdict: &Verdict) {
        let now = self.clock.now();
        match verdict {
            Verdict::Valid(_) => {
                lock(&self.refused).pop(&key);
                let fresh_until = now + self.settings.ttl;
                lock(&self.valid).put(
                    key,
                    Entry {
                        verdict: verdict.clone(),
                        fresh_until,
                        stale_until: fresh_until + self.settings.stale_if_error,
                    },
                );
            }
            Verdict::Invalid(_) => {
                // A key the store now refuses (revoked) must not answer
                // from a stale valid entry later.
                lock(&self.valid).pop(&key);
                let fresh_until = now + self.settings.negative_ttl;
                lock(&self.refused).put(
                    key,
                    Entry {
                        verdict: verdict.clone(),
                        fresh_until,
                        stale_until: fresh_until,
                    },
                );
            }
        }
    }

    /// Drops the valid entries `what` covers, and every refusal (they name
    /// no key, and are cheap to learn again), so the next request for an
    /// affected key asks the store. A dropped entry cannot answer stale
    /// later either: a revoked key stays refused through a store outage.
    /// Returns how many valid entries were dropped.
    pub fn invalidate(&self, what: &Invalidation) -> usize {
        self.generation.fetch_add(1, Ordering::SeqCst);
        lock(&self.refused).clear();
        let mut valid = lock(&self.valid);
        if *what == Invalidation::Everything {
            let dropped = valid.len();
            valid.clear();
            return dropped;
        }
        let affected: Vec<CacheKey> = valid
            .iter()
            .filter(|(_, entry)| match &entry.verdict {
                Verdict::Valid(grant) => covers(what, &grant.principal),
                Verdict::Invalid(_) => false,
            })
            .map(|(key, _)| *key)
            .collect();
        for key in &affected {
            valid.pop(key);
        }
        affected.len()
    }

    /// Entries held: (valid, refused).
    pub fn len(&self) -> (usize, usize) {
        (lock(&self.valid).len(), lock(&self.refused).len())
    }

    /// Lookups in flight (each shared by the requests waiting on it).
    pub fn flights(&self) -> usize {
        lock(&self.in_flight).len()
    }
}

/// Whether a change to `what` may alter the verdict for `principal`.
fn covers(what: &Invalidation, principal: &Principal) -> bool {
    match (what, principal) {
        (Invalidation::Everything, _) => true,
        (
            Invalidation::IntegrationKey { integration_id, key_id },
            Principal::Integration {
                int_id, key_id: held, ..
            },
        ) => integration_id == int_id && key_id == held,
        (Invalidation::Integration { integration_id }, Principal::Integration { int_id, .. }) => {
            integration_id == int_id
        }
        (Invalidation::Organization { org }, Principal::Autojoin { org: held }) => org == held,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::ground::ManualClock;

    fn valid(org: &str) -> Verdict {
        Verdict::Valid(Grant {
            principal: Principal::Autojoin { org: org.into() },
            expires_at: None,
            usage: UsageKey::Autojoin {
                key_hash: format!("hash of a key of {org}"),
            },
        })
    }

    struct Fixture {
        cache: Arc<KeyCache>,
        clock: Arc<ManualClock>,
        metrics: Arc<Metrics>,
        calls: Arc<AtomicUsize>,
    }

    fn fixture(capacity: usize) -> Fixture {
        let clock = Arc::new(ManualClock::new());
        let metrics = Arc::new(Metrics::new());
        let settings = CacheSettings {
            capacity,
            ..CacheSettings::default()
        };
        Fixture {
            cache: Arc::new(KeyCache::new(settings, clock.clone(), metrics.clone())),
            clock,
            metrics,
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }

    impl Fixture {
        async fn ask(&self, key: &str, answer: Result<Verdict, &str>) -> Result<Verdict, Unavailable> {
            let calls = self.calls.clone();
            self.cache
                .verdict(cache_key(b'a', key), || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    answer.map_err(|e| StoreError::Unavailable(e.into()))
                })
                .await
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn counted(&self, result: &str) -> u64 {
            self.metrics.key_cache.with_label_values(&[result]).get()
        }
    }

    #[tokio::test]
    async fn requests_that_give_up_leave_no_flight_behind() {
        let f = fixture(100);
        // Lookups that never finish, abandoned by their callers (a client
        // that hung up): 1,000 distinct keys, then nothing may remain.
        for i in 0..1000 {
            let lookup = f.cache.verdict(cache_key(b'a', &format!("k{i}")), std::future::pending);
            let abandoned = tokio::time::timeout(Duration::from_millis(1), lookup).await;
            assert!(abandoned.is_err());
        }
        assert_eq!(f.cache.flights(), 0);

        // A caller that gave up mid-lookup does not strand a later one:
        // it runs its own lookup, and no flight is left afterwards.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = std::sync::Mutex::new(Some(rx));
        let key = cache_key(b'a', "shared");
        let lookup = || async {
            let rx = rx.lock().unwrap().take().expect("one lookup");
            let _ = rx.await;
            Ok(valid("o"))
        };
        let first = f.cache.verdict(key, lookup);
        assert!(tokio::time::timeout(Duration::from_millis(5), first).await.is_err());
        let waiting = tokio::spawn({
            let cache = f.cache.clone();
            async move { cache.verdict(key, || async { Ok(valid("second")) }).await }
        });
        tokio::task::yield_now().await;
        drop(tx);
        // The abandoned lookup cannot finish, so the waiting caller runs its
        // own: a caller that stayed always gets an answer.
        assert_eq!(waiting.await.unwrap().unwrap(), valid("second"));
        assert_eq!(f.cache.flights(), 0);
        assert_eq!(f.metrics.key_cache_flights.get(), 0);
    }

    #[tokio::test]
    async fn valid_entries_live_for_the_ttl() {
        let f = fixture(100);
        for _ in 0..1000 {
            assert_eq!(f.ask("k", Ok(valid("o"))).await.unwrap(), valid("o"));
        }
        assert_eq!(f.calls(), 1);
        assert_eq!((f.counted("miss"), f.counted("hit")), (1, 999));
        f.clock.advance(DEFAULT_TTL - Duration::from_millis(1));
        f.ask("k", Ok(valid("o"))).await.unwrap();
        assert_eq!(f.calls(), 1);
        f.clock.advance(Duration::from_millis(1));
        f.ask("k", Ok(valid("o"))).await.unwrap();
        assert_eq!(f.calls(), 2);
    }

    #[tokio::test]
    async fn refusals_live_for_the_negative_ttl_and_never_displace_valid_keys() {
        let f = fixture(8);
        f.ask("right", Ok(valid("o"))).await.unwrap();
        for i in 0..1000 {
            let verdict = f
                .ask(&format!("wrong-{i}"), Ok(Verdict::Invalid("no".into())))
                .await
                .unwrap();
            assert!(matches!(verdict, Verdict::Invalid(_)));
        }
        let (valid_len, refused_len) = f.cache.len();
        assert_eq!((valid_len, refused_len), (1, 2));
        let calls = f.calls();
        // The right key is still cached, and still valid.
        assert_eq!(f.ask("right", Err("must not be asked")).await.unwrap(), valid("o"));
        assert_eq!(f.calls(), calls);
        // A repeated refusal is answered from the cache until it expires.
        f.ask("wrong-999", Err("must not be asked")).await.unwrap();
        assert_eq!(f.counted("negative_hit"), 1);
        f.clock.advance(DEFAULT_NEGATIVE_TTL);
        f.ask("wrong-999", Ok(Verdict::Invalid("no".into()))).await.unwrap();
        assert_eq!(f.calls(), calls + 1);
    }

    #[tokio::test]
    async fn a_key_refused_later_loses_its_valid_entry() {
        let f = fixture(100);
        f.ask("k", Ok(valid("o"))).await.unwrap();
        f.clock.advance(DEFAULT_TTL);
        assert!(matches!(
            f.ask("k", Ok(Verdict::Invalid("revoked".into()))).await,
            Ok(Verdict::Invalid(_))
        ));
        // Not served stale while the store is down: it was revoked.
        f.clock.advance(DEFAULT_NEGATIVE_TTL);
        assert!(f.ask("k", Err("down")).await.is_err());
    }

    #[tokio::test]
    async fn stale_if_error_within_the_window_only() {
        let f = fixture(100);
        f.ask("k", Ok(valid("o"))).await.unwrap();
        f.clock
            .advance(DEFAULT_TTL + DEFAULT_STALE_IF_ERROR - Duration::from_secs(1));
        assert_eq!(f.ask("k", Err("down")).await.unwrap(), valid("o"));
        assert_eq!(f.counted("stale"), 1);
        f.clock.advance(Duration::from_secs(1));
        assert!(f.ask("k", Err("down")).await.is_err());
        // Never seen: 503, not a refusal.
        assert!(f.ask("other", Err("down")).await.is_err());
        // The store is back.
        assert_eq!(f.ask("k", Ok(valid("o"))).await.unwrap(), valid("o"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_share_one_lookup() {
        let f = Arc::new(fixture(100));
        let (release, released) = tokio::sync::watch::channel(false);
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (f, mut released) = (f.clone(), released.clone());
                tokio::spawn(async move {
                    let calls = f.calls.clone();
                    f.cache
                        .verdict(cache_key(b'a', "shared"), || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            let _ = released.wait_for(|r| *r).await;
                            Ok(valid("o"))
                        })
                        .await
                })
            })
            .collect();
        // Hold the one lookup until every task shares it (bounded wait):
        // the map holds one reference and each waiting task another.
        let sharing = || {
            let in_flight = f.cache.in_flight.lock().unwrap();
            in_flight.get(&cache_key(b'a', "shared")).map_or(0, Arc::strong_count)
        };
        for _ in 0..1000 {
            if sharing() == 101 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(sharing(), 101, "all 100 requests wait on one lookup");
        release.send(true).unwrap();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), valid("o"));
        }
        assert_eq!(f.calls(), 1);
        assert_eq!(f.counted("miss"), 1);
        assert_eq!(f.counted("coalesced") + f.counted("hit"), 99);
    }

    #[test]
    fn keys_depend_on_kind_and_whole_key() {
        assert_ne!(cache_key(b'a', "k"), cache_key(b'i', "k"));
        assert_ne!(
            cache_key(b'i', "mlabk.cii_a.ki_b.s1"),
            cache_key(b'i', "mlabk.cii_a.ki_b.s2")
        );
    }

    fn integration(int_id: &str, key_id: &str) -> Verdict {
        Verdict::Valid(Grant {
            principal: Principal::Integration {
                int_id: int_id.into(),
                key_id: key_id.into(),
                tier: 0,
            },
            expires_at: None,
            usage: UsageKey::Integration {
                integration_id: int_id.into(),
                key_id: key_id.into(),
            },
        })
    }

    /// Each published change drops exactly the entries it covers, plus
    /// every refusal; a dropped entry is asked for again and cannot answer
    /// stale while the store is down.
    #[test]
    fn everything_covers_every_principal() {
        for verdict in [integration("acme", "ki_1"), valid("mlab")] {
            let Verdict::Valid(grant) = verdict else { unreachable!() };
            assert!(covers(&Invalidation::Everything, &grant.principal));
            assert!(!covers(
                &Invalidation::Organization { org: "x".into() },
                &grant.principal
            ));
        }
    }

    #[tokio::test]
    async fn invalidations_drop_what_they_cover_and_no_more() {
        let f = fixture(100);
        let entries = [
            ("a1", integration("acme", "ki_1")),
            ("a2", integration("acme", "ki_2")),
            ("b1", integration("beta", "ki_1")),
            ("o1", valid("mlab")),
            ("o2", valid("other")),
        ];
        for (name, verdict) in &entries {
            f.ask(name, Ok(verdict.clone())).await.unwrap();
        }
        f.ask("refused", Ok(Verdict::Invalid("unknown".into()))).await.unwrap();
        assert_eq!(f.cache.len(), (5, 1));

        let key = |integration_id: &str, key_id: &str| Invalidation::IntegrationKey {
            integration_id: integration_id.into(),
            key_id: key_id.into(),
        };
        assert_eq!(f.cache.invalidate(&key("acme", "ki_1")), 1);
        assert_eq!(f.cache.len(), (4, 0), "refusals go too");
        assert_eq!(f.cache.invalidate(&key("acme", "ki_9")), 0);
        assert_eq!(f.cache.invalidate(&key("beta", "ki_2")), 0);
        let org = Invalidation::Organization { org: "mlab".into() };
        assert_eq!(f.cache.invalidate(&org), 1);
        assert_eq!(f.cache.len(), (3, 0));
        let calls = f.calls();
        assert_eq!(
            f.ask("o2", Err("down")).await.unwrap(),
            valid("other"),
            "another organization's key stays"
        );
        assert_eq!(f.calls(), calls);
        let whole = Invalidation::Integration {
            integration_id: "acme".into(),
        };
        assert_eq!(f.cache.invalidate(&whole), 1);
        assert_eq!(f.cache.len(), (2, 0));

        // What was dropped is asked for again; with the store down it gets
        // 503, not the dropped verdict.
        let calls = f.calls();
        f.clock.advance(Duration::from_secs(1));
        assert!(f.ask("a1", Err("down")).await.is_err());
        assert_eq!(f.calls(), calls + 1);
        // What was kept still answers from the cache.
        assert_eq!(f.ask("b1", Err("down")).await.unwrap(), integration("beta", "ki_1"));
        assert_eq!(f.calls(), calls + 1);

        assert_eq!(f.cache.invalidate(&Invalidation::Everything), 2);
        assert_eq!(f.cache.len(), (0, 0));
    }

    /// A lookup that read the store before a change and answers after it
    /// is given to its caller but not kept: the next request asks again.
    #[tokio::test]
    async fn a_lookup_overtaken_by_an_invalidation_is_not_kept() {
        let f = fixture(100);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let cache = f.cache.clone();
        let slow = tokio::spawn(async move {
            cache
                .verdict(cache_key(b'a', "k"), || async move {
                    let _ = released.await;
                    Ok(integration("acme", "ki_1"))
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        f.cache.invalidate(&Invalidation::IntegrationKey {
            integration_id: "acme".into(),
            key_id: "ki_1".into(),
        });
        release.send(()).unwrap();
        assert_eq!(slow.await.unwrap().unwrap(), integration("acme", "ki_1"));
        assert_eq!(f.cache.len(), (0, 0));
        f.ask("k", Ok(integration("acme", "ki_1"))).await.unwrap();
        assert_eq!(f.calls(), 1, "asked the store again");
        assert_eq!(f.cache.len(), (1, 0));
    }

    /// A caller that gives up leaves the lookup to those still waiting on
    /// it, and later callers join it instead of starting another.
    #[tokio::test]
    async fn one_caller_leaving_keeps_the_flight_for_the_others() {
        let f = fixture(100);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let cache = f.cache.clone();
        let staying = tokio::spawn(async move {
            cache
                .verdict(cache_key(b'a', "k"), || async move {
                    let _ = released.await;
                    Ok(valid("o"))
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let leaving = f
            .cache
            .verdict(cache_key(b'a', "k"), || async { Ok(valid("second lookup")) });
        assert!(tokio::time::timeout(Duration::from_millis(5), leaving).await.is_err());
        assert_eq!(f.cache.flights(), 1, "the first caller still waits on it");
        let cache = f.cache.clone();
        let joining = tokio::spawn(async move {
            cache
                .verdict(cache_key(b'a', "k"), || async { Ok(valid("third lookup")) })
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(()).unwrap();
        assert_eq!(staying.await.unwrap().unwrap(), valid("o"));
        assert_eq!(joining.await.unwrap().unwrap(), valid("o"), "joined the first lookup");
        assert_eq!(f.cache.flights(), 0);
    }
}
