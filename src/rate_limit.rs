//! Limits on minting tokens: per integration key by its tier, per
//! integration (all its keys together), per autojoin organization.
//!
//! Off unless configured, so the service stays a drop-in for Go's. Checked
//! after the key is validated: a flood of made-up keys is refused before it
//! gets here and creates no limiter state. Each subject gets a generic cell
//! rate limiter (`governor`); the limiters live in an LRU as large as the
//! validation cache, so their memory is bounded the same way. An evicted
//! limiter comes back full, which only ever errs towards serving.
//!
//! Each replica keeps its own limiters: with N replicas behind a balancer a
//! subject gets about N times the configured rate (see the README).

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota};
use lru::LruCache;

use crate::claims::Principal;

/// A rate: `count` tokens per `per`, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
    pub burst: NonZeroU32,
}

impl Rate {
    /// Time between two tokens; zero for rates above one a nanosecond,
    /// which [`Rate::parse`] refuses.
    fn period(&self) -> Duration {
        self.per / self.count.get()
    }

    fn quota(&self) -> Quota {
        // The floor keeps a rate built by hand from panicking on the
        // request path; parsed rates never need it.
        Quota::with_period(self.period().max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(self.burst)
    }

    /// Parses `COUNT/UNIT[:burst=N]`, the unit one of `s`, `m`, `h`, `d`
    /// (or spelled out). Without a burst, it is the count: `100/m` allows
    /// 100 at once, then one every 0.6 s.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (rate, burst) = match text.split_once(':') {
            Some((rate, option)) => {
                let value = option
                    .strip_prefix("burst=")
                    .ok_or_else(|| format!("{text:?}: the only option after ':' is burst=N"))?;
                (rate, Some(positive(value, text, "burst")?))
            }
            None => (text, None),
        };
        let (count, unit) = rate
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a rate like 2/s or 100/m:burst=20"))?;
        let count = positive(count, text, "count")?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => return Err(format!("{text:?}: unknown unit {other:?} (s, m, h or d)")),
        };
        let rate = Self {
            count,
            per,
            burst: burst.unwrap_or(count),
        };
        if rate.period().is_zero() {
            return Err(format!(
                "{text:?}: faster than one token a nanosecond (1000000000/s), which cannot be measured"
            ));
        }
        Ok(rate)
    }
}

fn positive(value: &str, text: &str, what: &str) -> Result<NonZeroU32, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: the {what} must be a whole number from 1 to {}", u32::MAX))
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            3600 => "h",
            _ => "d",
        };
        write!(f, "{}/{unit}:burst={}", self.count, self.burst)
    }
}

/// A limit as configured: a rate, or none.
pub type Limit = Option<Rate>;

fn parse_limit(text: &str) -> Result<Limit, String> {
    match text.trim() {
        "unlimited" | "none" => Ok(None),
        rate => Rate::parse(rate).map(Some),
    }
}

/// Per-key limits by tier: `TIER=LIMIT,...`, where LIMIT is a rate or
/// `unlimited`, and the tier `*` stands for every tier not listed (without
/// it, unlisted tiers are unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierLimits {
    pub tiers: BTreeMap<i64, Limit>,
    pub others: Limit,
}

impl TierLimits {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut limits = Self::default();
        let mut others_set = false;
        for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            let (tier, limit) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not TIER=RATE (for example 0=2/s:burst=20)"))?;
            let limit = parse_limit(limit)?;
            if tier.trim() == "*" {
                if std::mem::replace(&mut others_set, true) {
                    return Err("the tier * is given twice".into());
                }
                limits.others = limit;
                continue;
            }
            let tier: i64 = tier
                .trim()
                .parse()
                .map_err(|_| format!("{item:?}: the tier must be a whole number or *"))?;
            if limits.tiers.insert(tier, limit).is_some() {
                return Err(format!("the tier {tier} is given twice"));
            }
        }
        Ok(limits)
    }

    pub fn for_tier(&self, tier: i64) -> Limit {
        self.tiers.get(&tier).copied().unwrap_or(self.others)
    }

    fn is_off(&self) -> bool {
        self.others.is_none() && self.tiers.values().all(Option::is_none)
    }
}

/// Every configured limit; all off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// Each integration key, by its tier.
    pub tiers: TierLimits,
    /// Each integration, all its keys together.
    pub integration: Limit,
    /// Each autojoin organization, all its keys together.
    pub autojoin: Limit,
}

impl RateLimitSettings {
    pub fn is_off(&self) -> bool {
        self.tiers.is_off() && self.integration.is_none() && self.autojoin.is_none()
    }
}

/// Which limit a request was measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Key,
    Integration,
    Organization,
}

impl Scope {
    /// The policy's name in the `RateLimit-Policy` and `RateLimit` headers.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Integration => "integration",
            Scope::Organization => "organization",
        }
    }
}

/// Where a refused subject stands against the limit it met, for the IETF
/// `RateLimit` and `RateLimit-Policy` headers
/// (draft-ietf-httpapi-ratelimit-headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub scope: Scope,
    pub rate: Rate,
    /// Whole seconds until the next token may be taken.
    pub reset_secs: u64,
}

impl Standing {
    /// `"key";q=20;w=10`: the burst, and the seconds it takes to refill.
    pub fn policy(&self) -> String {
        let window = self.rate.per.as_secs_f64() * f64::from(self.rate.burst.get()) / f64::from(self.rate.count.get());
        format!(
            "\"{}\";q={};w={}",
            self.scope.name(),
            self.rate.burst,
            (window.ceil() as u64).max(1)
        )
    }

    /// `"key";r=0;t=9`: nothing left, and when the next token is due.
    pub fn current(&self) -> String {
        format!("\"{}\";r=0;t={}", self.scope.name(), self.reset_secs)
    }
}

/// A request over a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub standing: Standing,
    /// Whole seconds before a retry can succeed, at least 1.
    pub retry_after_secs: u64,
    /// Who was limited, for the access log: IDs and the tier, no secret.
    pub subject: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limited: {} over its {} limit of {}; retry after {} s",
            self.subject,
            self.standing.scope.name(),
            self.standing.rate,
            self.retry_after_secs
        )
    }
}

/// Fewest limiters kept (about 150 bytes each).
pub const MIN_LIMITERS: usize = 10_000;

type Limiter<C> = governor::RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The limiters of one process.
pub struct RateLimits<C: Clock = DefaultClock> {
    settings: RateLimitSettings,
    clock: C,
    limiters: Mutex<LruCache<String, Arc<Limiter<C>>>>,
    /// Told how many limiters are held, when one is added.
    gauge: Option<prometheus::IntGauge>,
}

/// Seconds rounded up, so a caller that waits them is not refused again.
fn whole_secs_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl RateLimits<DefaultClock> {
    /// `None` when every limit is off: then nothing is checked at all.
    /// `capacity` is the validation cache's: each cached key may need two
    /// limiters (its own and its integration's), so twice as many are
    /// kept, and never fewer than [`MIN_LIMITERS`], so that a small or
    /// disabled cache does not make the two evict each other (an evicted
    /// limiter comes back full, and every request would pass).
    pub fn new(settings: RateLimitSettings, capacity: usize) -> Option<Self> {
        Self::with_clock(settings, capacity, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    pub fn with_clock(settings: RateLimitSettings, capacity: usize, clock: C) -> Option<Self> {
        if settings.is_off() {
            return None;
        }
        let capacity = NonZeroUsize::new(capacity.saturating_mul(2).max(MIN_LIMITERS)).unwrap_or(NonZeroUsize::MIN);
        Some(Self {
            settings,
            clock,
            limiters: Mutex::new(LruCache::new(capacity)),
            gauge: None,
        })
    }

    /// Reports the number of limiters held to `gauge`.
    pub fn reporting_to(mut self, gauge: prometheus::IntGauge) -> Self {
        self.gauge = Some(gauge);
        self
    }

    /// Limiters held now.
    pub fn len(&self) -> usize {
        self.limiters.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes one token for `principal` from each limit that applies: its
    /// key's (by tier), then its integration's, or its organization's.
    ///
    /// A request refused by the integration's limit has already counted
    /// against its key's: refusing errs towards less, never more.
    pub fn check(&self, principal: &Principal) -> Result<(), Refusal> {
        match principal {
            Principal::Integration { int_id, key_id, tier } => {
                let subject = || format!("key {key_id} of integration {int_id} (tier {tier})");
                if let Some(rate) = self.settings.tiers.for_tier(*tier) {
                    let name = format!("k\u{0}{int_id}\u{0}{key_id}\u{0}{tier}");
                    self.take(name, Scope::Key, rate, subject)?;
                }
                if let Some(rate) = self.settings.integration {
                    self.take(format!("i\u{0}{int_id}"), Scope::Integration, rate, subject)?;
                }
                Ok(())
            }
            Principal::Autojoin { org } => match self.settings.autojoin {
                Some(rate) => self.take(format!("o\u{0}{org}"), Scope::Organization, rate, || {
                    format!("organization {org}")
                }),
                None => Ok(()),
            },
        }
    }

    fn take(&self, name: String, scope: Scope, rate: Rate, subject: impl FnOnce() -> String) -> Result<(), Refusal> {
        let limiter = {
            let mut limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
            match limiters.get(&name) {
                Some(limiter) => limiter.clone(),
                None => {
                    let limiter = Arc::new(governor::RateLimiter::direct_with_clock(
                        rate.quota(),
                        self.clock.clone(),
                    ));
                    limiters.put(name, limiter.clone());
                    if let Some(gauge) = &self.gauge {
                        gauge.set(i64::try_from(limiters.len()).unwrap_or(i64::MAX));
                    }
                    limiter
                }
            }
        };
        limiter
            .check()
            .map_err(|not_until| self.refusal(&not_until, scope, rate, subject()))
    }

    fn refusal(&self, not_until: &NotUntil<C::Instant>, scope: Scope, rate: Rate, subject: String) -> Refusal {
        let wait = whole_secs_up(not_until.wait_time_from(self.clock.now())).max(1);
        Refusal {
            standing: Standing {
                scope,
                rate,
                reset_secs: wait,
            },
            retry_after_secs: wait,
            subject,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn key(tier: i64, key_id: &str) -> Principal {
        Principal::Integration {
            int_id: "acme".into(),
            key_id: key_id.into(),
            tier,
        }
    }

    fn limits(text: &str) -> (RateLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let settings = RateLimitSettings {
            tiers: TierLimits::parse(text).unwrap(),
            ..Default::default()
        };
        (RateLimits::with_clock(settings, 100, clock.clone()).unwrap(), clock)
    }

    #[test]
    fn rates_parse_with_units_and_bursts() {
        let rate = Rate::parse("2/s:burst=20").unwrap();
        assert_eq!(
            (rate.count.get(), rate.per, rate.burst.get()),
            (2, Duration::from_secs(1), 20)
        );
        let rate = Rate::parse("100/m").unwrap();
        assert_eq!(
            (rate.count.get(), rate.per, rate.burst.get()),
            (100, Duration::from_secs(60), 100)
        );
        assert_eq!(Rate::parse("5/hour").unwrap().per, Duration::from_secs(3600));
        assert_eq!(Rate::parse("5/d").unwrap().per, Duration::from_secs(86_400));
        for (text, shown) in [
            ("7/m:burst=3", "7/m:burst=3"),
            ("2/second", "2/s:burst=2"),
            ("5/h:burst=1", "5/h:burst=1"),
            ("3/day", "3/d:burst=3"),
        ] {
            assert_eq!(Rate::parse(text).unwrap().to_string(), shown);
        }
        for bad in [
            "",
            "2",
            "0/s",
            "2/w",
            "2/s:burst=0",
            "2/s:limit=3",
            "-1/s",
            "x/s",
            "2/s:burst=",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn tier_limits_parse() {
        let limits = TierLimits::parse("0=2/s:burst=20, 1=20/s:burst=200,2=unlimited").unwrap();
        assert_eq!(limits.for_tier(0), Some(Rate::parse("2/s:burst=20").unwrap()));
        assert_eq!(limits.for_tier(1), Some(Rate::parse("20/s:burst=200").unwrap()));
        assert_eq!(limits.for_tier(2), None);
        assert_eq!(limits.for_tier(7), None, "unlisted tiers are unlimited without *");
        let limits = TierLimits::parse("*=1/s,3=unlimited").unwrap();
        assert_eq!(limits.for_tier(7), Some(Rate::parse("1/s").unwrap()));
        assert_eq!(limits.for_tier(3), None);
        assert!(TierLimits::parse("").unwrap().is_off());
        assert!(TierLimits::parse("0=unlimited").unwrap().is_off());
        for bad in ["0", "a=1/s", "0=1/s,0=2/s", "*=1/s,*=2/s", "0=fast"] {
            assert!(TierLimits::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn no_limit_configured_means_no_limiter() {
        assert!(RateLimits::new(RateLimitSettings::default(), 10).is_none());
        let settings = RateLimitSettings {
            tiers: TierLimits::parse("0=unlimited").unwrap(),
            ..Default::default()
        };
        assert!(RateLimits::new(settings, 10).is_none());
    }

    #[test]
    fn a_key_gets_exactly_its_burst_then_refusals_until_a_token_is_due() {
        let (limits, clock) = limits("0=2/s:burst=20");
        for _ in 0..20 {
            limits.check(&key(0, "ki_a")).unwrap();
        }
        let refusal = limits.check(&key(0, "ki_a")).unwrap_err();
        assert_eq!(refusal.retry_after_secs, 1, "one token every 0.5 s, rounded up");
        assert_eq!(refusal.standing.current(), "\"key\";r=0;t=1");
        assert_eq!(refusal.standing.policy(), "\"key\";q=20;w=10");
        assert!(refusal.to_string().contains("key ki_a of integration acme (tier 0)"));
        // Another key of the same tier is not affected.
        assert!(limits.check(&key(0, "ki_b")).is_ok());
        clock.advance(Duration::from_millis(499));
        assert!(limits.check(&key(0, "ki_a")).is_err());
        clock.advance(Duration::from_millis(1));
        assert!(limits.check(&key(0, "ki_a")).is_ok(), "a token is due every 0.5 s");
        assert!(limits.check(&key(0, "ki_a")).is_err());
        // After 10 s the whole burst is back, and no more.
        clock.advance(Duration::from_secs(10));
        let taken = (0..100).take_while(|_| limits.check(&key(0, "ki_a")).is_ok()).count();
        assert_eq!(taken, 20);
    }

    #[test]
    fn a_key_at_or_under_its_rate_is_never_refused() {
        let (limits, clock) = limits("0=2/s:burst=1");
        for _ in 0..1000 {
            assert!(limits.check(&key(0, "ki_a")).is_ok());
            clock.advance(Duration::from_millis(500));
        }
        // Twice as fast: every other request is refused.
        let mut refused = 0;
        for _ in 0..1000 {
            refused += usize::from(limits.check(&key(0, "ki_a")).is_err());
            clock.advance(Duration::from_millis(250));
        }
        assert_eq!(refused, 500);
    }

    #[test]
    fn retry_after_is_whole_seconds_until_the_next_token() {
        let (limits, clock) = limits("0=1/m:burst=2");
        limits.check(&key(0, "ki_a")).unwrap();
        limits.check(&key(0, "ki_a")).unwrap();
        assert_eq!(limits.check(&key(0, "ki_a")).unwrap_err().retry_after_secs, 60);
        // 29.5 s to wait is 30 s: a caller that waits what it is told is
        // not refused again.
        clock.advance(Duration::from_millis(30_500));
        assert_eq!(limits.check(&key(0, "ki_a")).unwrap_err().retry_after_secs, 30);
        clock.advance(Duration::from_millis(29_000));
        assert_eq!(limits.check(&key(0, "ki_a")).unwrap_err().retry_after_secs, 1);
    }

    #[test]
    fn tiers_get_their_own_limits_and_unlimited_tiers_none() {
        let (limits, _clock) = limits("0=1/s:burst=1,1=1/s:burst=3,2=unlimited");
        assert!(limits.check(&key(0, "ki_0")).is_ok());
        assert!(limits.check(&key(0, "ki_0")).is_err());
        assert_eq!((0..10).filter(|_| limits.check(&key(1, "ki_1")).is_ok()).count(), 3);
        for _ in 0..1000 {
            assert_eq!(limits.check(&key(2, "ki_2")), Ok(()));
        }
        assert_eq!(limits.len(), 2, "no limiter for an unlimited tier");
    }

    #[test]
    fn an_integration_limit_covers_all_its_keys() {
        let clock = FakeRelativeClock::default();
        let settings = RateLimitSettings {
            tiers: TierLimits::parse("0=1/s:burst=10").unwrap(),
            integration: Some(Rate::parse("1/s:burst=4").unwrap()),
            autojoin: None,
        };
        let limits = RateLimits::with_clock(settings, 100, clock).unwrap();
        limits.check(&key(0, "ki_a")).unwrap();
        limits.check(&key(0, "ki_b")).unwrap();
        limits.check(&key(0, "ki_c")).unwrap();
        limits.check(&key(0, "ki_a")).unwrap();
        let refusal = limits.check(&key(0, "ki_d")).unwrap_err();
        assert_eq!(refusal.standing.scope, Scope::Integration);
        let other = Principal::Integration {
            int_id: "other".into(),
            key_id: "ki_a".into(),
            tier: 0,
        };
        assert!(limits.check(&other).is_ok(), "another integration has its own limit");
    }

    #[test]
    fn organizations_are_limited_apart() {
        let settings = RateLimitSettings {
            autojoin: Some(Rate::parse("1/h:burst=2").unwrap()),
            ..Default::default()
        };
        let limits = RateLimits::with_clock(settings, 100, FakeRelativeClock::default()).unwrap();
        let org = |name: &str| Principal::Autojoin { org: name.into() };
        assert!(limits.check(&org("a")).is_ok());
        assert!(limits.check(&org("a")).is_ok());
        let refusal = limits.check(&org("a")).unwrap_err();
        assert_eq!(
            (refusal.standing.scope, refusal.retry_after_secs),
            (Scope::Organization, 3600)
        );
        assert!(limits.check(&org("b")).is_ok());
        assert_eq!(limits.check(&key(0, "ki_a")), Ok(()), "no integration limit configured");
        assert_eq!(limits.len(), 2, "and no limiter made for it");
    }

    #[test]
    fn limiters_are_bounded_by_the_capacity() {
        let settings = RateLimitSettings {
            tiers: TierLimits::parse("*=1/s:burst=1").unwrap(),
            ..Default::default()
        };
        let limits = RateLimits::with_clock(settings.clone(), 10, FakeRelativeClock::default()).unwrap();
        assert!(limits.is_empty());
        for i in 0..MIN_LIMITERS + 1000 {
            limits.check(&key(0, &format!("ki_{i}"))).unwrap();
        }
        assert_eq!(limits.len(), MIN_LIMITERS, "never fewer than the floor");
        let large = RateLimits::with_clock(settings, MIN_LIMITERS, FakeRelativeClock::default()).unwrap();
        for i in 0..3 * MIN_LIMITERS {
            large.check(&key(0, &format!("ki_{i}"))).unwrap();
        }
        assert_eq!(large.len(), 2 * MIN_LIMITERS, "twice the cache");
        assert!(!limits.is_empty());
        // A tier change makes a new limiter; it does not inherit the old one.
        assert!(limits.check(&key(0, "ki_10999")).is_err());
        assert!(limits.check(&key(1, "ki_10999")).is_ok());
        assert!(limits.check(&key(1, "ki_10999")).is_err());
    }

    #[test]
    fn a_cache_too_small_to_hold_a_keys_two_limiters_still_limits() {
        // A key's limiter and its integration's, with the cache off (0) or
        // holding one key: they must not evict each other.
        for capacity in [0, 1] {
            let settings = RateLimitSettings {
                tiers: TierLimits::parse("*=1/h:burst=2").unwrap(),
                integration: Some(Rate::parse("1/h:burst=3").unwrap()),
                ..Default::default()
            };
            let limits = RateLimits::with_clock(settings, capacity, FakeRelativeClock::default()).unwrap();
            assert!(limits.check(&key(0, "ki_a")).is_ok());
            assert!(limits.check(&key(0, "ki_a")).is_ok());
            let refused = limits.check(&key(0, "ki_a")).unwrap_err();
            assert_eq!(refused.standing.scope, Scope::Key, "capacity {capacity}");
            assert!(limits.check(&key(0, "ki_b")).is_ok());
            assert_eq!(
                limits.check(&key(0, "ki_b")).unwrap_err().standing.scope,
                Scope::Integration
            );
        }
    }

    #[test]
    fn rates_faster_than_a_nanosecond_are_refused_when_parsed() {
        assert!(Rate::parse("1000000000/s").is_ok());
        for text in ["1000000001/s", "4294967295/s"] {
            let err = Rate::parse(text).unwrap_err();
            assert!(err.contains("nanosecond"), "{err}");
        }
        assert!(TierLimits::parse("0=2000000000/s").is_err());
        // Built by hand, such a rate still limits instead of panicking.
        let fast = Rate {
            count: NonZeroU32::MAX,
            per: Duration::from_secs(1),
            burst: NonZeroU32::MIN,
        };
        let limits = RateLimits::with_clock(
            RateLimitSettings {
                integration: Some(fast),
                ..Default::default()
            },
            1,
            FakeRelativeClock::default(),
        )
        .unwrap();
        assert!(limits.check(&key(0, "ki_a")).is_ok());
    }
}
