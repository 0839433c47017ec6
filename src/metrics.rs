//! Prometheus metrics, served on their own port.
//!
//! The first four series are the Go service's, with its names, labels and
//! buckets, so existing dashboards and alerts keep working. The rest are new.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Everything the service counts. One instance per server, registered in a
/// registry of its own (so tests do not share counters).
pub struct Metrics {
    registry: Registry,
    /// Go: requests to `/v0/token/autojoin`, by status code and method.
    pub autojoin_requests: IntCounterVec,
    pub autojoin_duration: HistogramVec,
    /// Go: requests to `/v0/token/integration`, by status code and method.
    pub integration_requests: IntCounterVec,
    pub integration_duration: HistogramVec,
    /// Every request to the API port, by route (`other` for unknown paths),
    /// method and status: what Go's series leave out (wrong methods,
    /// redirects, probes, 404s).
    pub http_requests: IntCounterVec,
    /// Requests the client abandoned before the answer, by route and the
    /// phase it left in (also counted as code 499 in `http_requests`).
    pub requests_cancelled: IntCounterVec,
    /// Tokens signed and returned, by audience and tier (empty for autojoin).
    pub tokens_issued: IntCounterVec,
    /// Integration tokens by integration. Only valid keys reach it, so its
    /// cardinality is bounded by the registered integrations.
    pub integration_tokens: IntCounterVec,
    /// Calls that reached the store, by backend, key kind and result.
    pub store_lookups: IntCounterVec,
    pub store_lookup_duration: HistogramVec,
    pub signing_duration: HistogramVec,
    pub jwks_requests: IntCounter,
    /// Validation cache outcomes: hit, miss, negative_hit, stale, coalesced.
    pub key_cache: IntCounterVec,
    /// Distinct keys being looked up right now (each shared by the
    /// requests that wait for it).
    pub key_cache_flights: IntGauge,
    /// Signing-key reloads, by result (success, failure).
    pub key_reloads: IntCounterVec,
    /// Changes published by admin commands, received from the store's
    /// change feed, and applied to the cache.
    pub invalidations_received: IntCounter,
    pub invalidations_applied: IntCounter,
    /// From the change's commit (admin's clock) to its application here.
    pub invalidation_lag: Histogram,
    /// Times the change feed reconnected or recovered from a failure.
    pub change_feed_recoveries: IntCounter,
    /// 1 while the change feed reads; 0 once a read failed or stalled.
    pub change_feed_up: IntGauge,
    /// Unix time of the change feed's last successful read.
    pub change_feed_last_read: IntGauge,
    /// Changes stamped ahead of this server's clock by more than the
    /// tolerance: the clock of the machine that made them is off.
    pub change_feed_future_stamps: IntCounter,
    /// Times the whole cache was dropped (after a recovery, or a gap).
    pub key_cache_flushes: IntCounter,
    pub background_task_exits: IntCounterVec,
    /// Exchanges refused by a rate limit, by the key's tier (`autojoin` for
    /// an organization's limit).
    pub rate_limited: IntCounterVec,
    /// Rate limiters held (one per limited key, integration, organization).
    pub rate_limiters: IntGauge,
    /// The children the request path uses most, bound once (see [`Bound`]).
    hot: HotSeries,
}

/// A child of a labelled metric whose labels are known in advance, bound
/// on first use and kept. On the request path a count is then one atomic
/// add, instead of hashing the label values and reading the vector's map
/// under its lock (an atomic write to a cache line every core shares).
/// Bound on first use rather than at start, so a series still appears only
/// once it has something to count, as with Go's client.
struct Bound<T>(OnceLock<T>);

impl<T> Default for Bound<T> {
    fn default() -> Self {
        Self(OnceLock::new())
    }
}

impl<T> Bound<T> {
    fn get(&self, bind: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(bind)
    }
}

/// Routes with children bound for their answers that succeed.
const BOUND_ROUTES: usize = 8;
/// Integration tiers with a bound `tokens_issued` child; higher tiers take
/// the lookup.
const BOUND_TIERS: usize = 8;
/// Validation cache outcomes, in the order [`Metrics::key_cache_outcome`]
/// numbers them.
const CACHE_OUTCOMES: [&str; 5] = ["hit", "negative_hit", "miss", "coalesced", "stale"];

#[derive(Default)]
struct HotSeries {
    /// `http_requests` for (route, GET or POST, 200).
    http_ok: [[Bound<IntCounter>; 2]; BOUND_ROUTES],
    /// Go's series for (200, post): autojoin, then integration.
    token_ok: [Bound<(IntCounter, Histogram)>; 2],
    /// `tokens_issued`: autojoin, then integration tiers 0 to 7.
    issued: [Bound<IntCounter>; 1 + BOUND_TIERS],
    /// `signing_duration` by algorithm.
    signing: [Bound<Histogram>; 3],
    key_cache: [Bound<IntCounter>; CACHE_OUTCOMES.len()],
}

/// The short commit this binary was built from (`GIT_SHORT_COMMIT` at build
/// time, as the Dockerfile passes it), or Go's placeholder.
fn build_commit() -> &'static str {
    option_env!("GIT_SHORT_COMMIT")
        .filter(|c| !c.is_empty())
        .unwrap_or("No commit specified")
}

/// The standard process series, with `process_cpu_seconds_total` in the
/// kernel's clock ticks (hundredths of a second) rather than whole seconds
/// as the crate reports it: a `rate()` over a minute of a lightly loaded
/// replica is otherwise all steps.
#[cfg(target_os = "linux")]
struct ProcessMetrics(prometheus::process_collector::ProcessCollector);

#[cfg(target_os = "linux")]
impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.0.collect();
        let seconds = procfs::process::Process::myself()
            .and_then(|p| p.stat())
            .map(|stat| (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64);
        if let Ok(seconds) = seconds {
            for family in families.iter_mut().filter(|f| f.name() == "process_cpu_seconds_total") {
                for metric in family.mut_metric() {
                    let mut counter = prometheus::proto::Counter::default();
                    counter.set_value(seconds);
                    metric.set_counter(counter);
                }
            }
        }
        families
    }
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric definition");
    registry.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn int_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

/// Seconds from a change to its application: polling puts most near the
/// poll interval; the tail shows a slow or failing feed.
const LAG_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0];

/// Buckets for in-process work measured in microseconds (signing, a cached
/// or local store read), which Prometheus' defaults (5 ms and up) cannot
/// tell apart.
const FINE_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5,
];

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
        .expect("valid metric definition");
    registry.register(Box::new(h.clone())).expect("metric registered once");
    h
}

impl Metrics {
    // The expects below fail only on a malformed definition or a name
    // registered twice, both fixed in this function; tests exercise it.
    pub fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(ProcessMetrics(
                prometheus::process_collector::ProcessCollector::for_self(),
            )))
            .expect("process collector registered once");
        // Go's prometheusx series, which M-Lab's dashboards read to tell
        // which build runs where: the commit as its label and, read as
        // hexadecimal, as its value (0 when it is not hexadecimal).
        {
            let commit = build_commit();
            let g = prometheus::GaugeVec::new(
                Opts::new("git_short_commit", "The git commit interpreted as a number."),
                &["commit"],
            )
            .expect("valid metric definition");
            g.with_label_values(&[commit])
                .set(u64::from_str_radix(commit, 16).map_or(0.0, |n| n as f64));
            registry.register(Box::new(g)).expect("metric registered once");
        }
        let go = prometheus::DEFAULT_BUCKETS;
        let jwks_requests = IntCounter::new("tokenexchange_jwks_requests_total", "Total number of JWKS requests.")
            .expect("valid metric definition");
        registry
            .register(Box::new(jwks_requests.clone()))
            .expect("metric registered once");
        let metrics = Self {
            autojoin_requests: counter(
                &registry,
                "tokenexchange_autojoin_requests_total",
                "Total number of autojoin token requests.",
                &["code", "method"],
            ),
            autojoin_duration: histogram(
                &registry,
                "tokenexchange_autojoin_request_duration_seconds",
                "Duration of autojoin token requests.",
                &["code", "method"],
                go,
            ),
            integration_requests: counter(
                &registry,
                "tokenexchange_integration_requests_total",
                "Total number of integration token requests.",
                &["code", "method"],
            ),
            integration_duration: histogram(
                &registry,
                "tokenexchange_integration_request_duration_seconds",
                "Duration of integration token requests.",
                &["code", "method"],
                go,
            ),
            http_requests: counter(
                &registry,
                "tokenexchange_http_requests_total",
                "Requests to the API port, by route, method and status code.",
                &["route", "method", "code"],
            ),
            requests_cancelled: counter(
                &registry,
                "tokenexchange_requests_cancelled_total",
                "Requests whose client went away before the answer, by route and phase (body, handling).",
                &["route", "phase"],
            ),
            tokens_issued: counter(
                &registry,
                "tokenexchange_tokens_issued_total",
                "Tokens issued, by audience and tier.",
                &["audience", "tier"],
            ),
            integration_tokens: counter(
                &registry,
                "tokenexchange_integration_tokens_total",
                "Integration tokens issued, by integration ID.",
                &["int_id"],
            ),
            store_lookups: counter(
                &registry,
                "tokenexchange_store_lookups_total",
                "Key lookups that reached the store, by backend, key kind and result (found, not_found, error).",
                &["backend", "kind", "result"],
            ),
            store_lookup_duration: histogram(
                &registry,
                "tokenexchange_store_lookup_duration_seconds",
                "Duration of key lookups in the store.",
                &["backend", "kind"],
                FINE_BUCKETS,
            ),
            signing_duration: histogram(
                &registry,
                "tokenexchange_signing_duration_seconds",
                "Time to sign one token.",
                &["alg"],
                FINE_BUCKETS,
            ),
            key_cache: counter(
                &registry,
                "tokenexchange_key_cache_total",
                "Validation cache outcomes: hit, miss, negative_hit, stale, coalesced.",
                &["result"],
            ),
            key_reloads: counter(
                &registry,
                "tokenexchange_signing_key_reloads_total",
                "Signing-key reloads, by result (success, failure).",
                &["result"],
            ),
            rate_limited: counter(
                &registry,
                "tokenexchange_rate_limited_total",
                "Exchanges refused with 429 by a rate limit, by tier (autojoin for organizations).",
                &["tier"],
            ),
            rate_limiters: int_gauge(
                &registry,
                "tokenexchange_rate_limiters",
                "Rate limiters held: one per limited key, integration and organization seen.",
            ),
            key_cache_flights: int_gauge(
                &registry,
                "tokenexchange_key_cache_lookups_in_flight",
                "Distinct keys being looked up in the store right now.",
            ),
            invalidations_received: int_counter(
                &registry,
                "tokenexchange_cache_invalidations_received_total",
                "Changes published by admin commands and received from the store.",
            ),
            invalidations_applied: int_counter(
                &registry,
                "tokenexchange_cache_invalidations_applied_total",
                "Published changes applied to the validation cache.",
            ),
            invalidation_lag: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "tokenexchange_cache_invalidation_lag_seconds",
                        "Time from a published change's commit to its application to the cache.",
                    )
                    .buckets(LAG_BUCKETS.to_vec()),
                )
                .expect("valid metric definition");
                registry.register(Box::new(h.clone())).expect("metric registered once");
                h
            },
            change_feed_recoveries: int_counter(
                &registry,
                "tokenexchange_change_feed_recoveries_total",
                "Times the change feed reconnected (PostgreSQL listener) or recovered from a failed poll.",
            ),
            change_feed_up: int_gauge(
                &registry,
                "tokenexchange_change_feed_up",
                "1 while the change feed reads; 0 once a read failed or did not answer in time.",
            ),
            change_feed_last_read: int_gauge(
                &registry,
                "tokenexchange_change_feed_last_read_timestamp_seconds",
                "Unix time of the change feed's last successful read (a poll, or a heartbeat of the PostgreSQL listener).",
            ),
            change_feed_future_stamps: int_counter(
                &registry,
                "tokenexchange_change_feed_future_stamps_total",
                "Changes received stamped more than 10 s ahead of this server's clock (the admin machine's clock is off).",
            ),
            background_task_exits: counter(
                &registry,
                "tokenexchange_background_task_exits_total",
                "Background tasks (change-feed follower, usage writer, key reloader) that ended or panicked while the server ran; the server then stops and exits non-zero.",
                &["task"],
            ),
            key_cache_flushes: int_counter(
                &registry,
                "tokenexchange_key_cache_flushes_total",
                "Times the whole validation cache was dropped because changes may have been missed.",
            ),
            jwks_requests,
            registry,
            hot: HotSeries::default(),
        };
        // Series with a known, small set of labels exist from the start, at
        // 0: a rate over a series that appears with its first event misses
        // that event, and "none yet" must not look like a renamed metric.
        for result in ["success", "failure"] {
            metrics.key_reloads.with_label_values(&[result]);
        }
        for result in CACHE_OUTCOMES {
            metrics.key_cache.with_label_values(&[result]);
        }
        metrics
    }

    /// Counts a request in `http_requests`. `route` is the index of `path`
    /// among the routes the caller serves (the first eight are bound), `None`
    /// for any other path.
    pub fn http_request(&self, path: &str, route: Option<usize>, method: &Method, status: StatusCode) {
        let slot = match *method {
            Method::GET => Some(0),
            Method::POST => Some(1),
            _ => None,
        };
        let labels = || [path, method_label(method), status.as_str()];
        match (route, slot) {
            (Some(route), Some(slot)) if status == StatusCode::OK && route < BOUND_ROUTES => self.hot.http_ok[route]
                [slot]
                .get(|| self.http_requests.with_label_values(&labels()))
                .inc(),
            _ => self.http_requests.with_label_values(&labels()).inc(),
        }
    }

    /// Counts a POST that reached a token handler in Go's series.
    pub fn token_request(&self, autojoin: bool, status: StatusCode, elapsed: Duration) {
        let (counter, histogram) = if autojoin {
            (&self.autojoin_requests, &self.autojoin_duration)
        } else {
            (&self.integration_requests, &self.integration_duration)
        };
        let labels = [status.as_str(), "post"];
        if status == StatusCode::OK {
            let (count, duration) = self.hot.token_ok[usize::from(!autojoin)]
                .get(|| (counter.with_label_values(&labels), histogram.with_label_values(&labels)));
            count.inc();
            duration.observe(elapsed.as_secs_f64());
        } else {
            counter.with_label_values(&labels).inc();
            histogram.with_label_values(&labels).observe(elapsed.as_secs_f64());
        }
    }

    /// Counts a token in `tokens_issued`: `tier` is `None` for autojoin.
    pub fn token_issued(&self, tier: Option<i64>) {
        let slot = match tier {
            None => Some(0),
            Some(t) => usize::try_from(t).ok().filter(|t| *t < BOUND_TIERS).map(|t| t + 1),
        };
        let child = || {
            let (audience, tier) = match tier {
                None => ("autojoin", String::new()),
                Some(t) => ("integration", t.to_string()),
            };
            self.tokens_issued.with_label_values(&[audience, tier.as_str()])
        };
        match slot {
            Some(slot) => self.hot.issued[slot].get(child).inc(),
            None => child().inc(),
        }
    }

    /// Records the time one signature took with `alg`.
    pub fn signing(&self, alg: crate::signing::Algorithm, elapsed: Duration) {
        use crate::signing::Algorithm;
        let slot = match alg {
            Algorithm::Rs256 => 0,
            Algorithm::Es256 => 1,
            Algorithm::EdDsa => 2,
        };
        self.hot.signing[slot]
            .get(|| self.signing_duration.with_label_values(&[alg.as_str()]))
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a validation cache outcome: one of `hit`, `negative_hit`,
    /// `miss`, `coalesced`, `stale`.
    pub fn key_cache_outcome(&self, outcome: &'static str) {
        match CACHE_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(slot) => self.hot.key_cache[slot]
                .get(|| self.key_cache.with_label_values(&[outcome]))
                .inc(),
            None => self.key_cache.with_label_values(&[outcome]).inc(),
        }
    }

    /// The Prometheus text format (version 0.0.4), as Go's client writes it.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into memory fails only on a metric family without
        // metrics, which the registry never yields.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding of gathered metrics");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `method` label as Go's promhttp writes it: lower case. Methods
/// outside the standard set share one label value, so a client inventing
/// methods cannot grow the series without bound.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "get",
        Method::POST => "post",
        Method::PUT => "put",
        Method::DELETE => "delete",
        Method::HEAD => "head",
        Method::OPTIONS => "options",
        Method::PATCH => "patch",
        Method::CONNECT => "connect",
        Method::TRACE => "trace",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_series_keep_their_buckets_and_format() {
        let m = Metrics::new();
        m.integration_requests.with_label_values(&["200", "post"]).inc();
        m.integration_duration
            .with_label_values(&["200", "post"])
            .observe(0.003);
        let text = m.render();
        assert!(
            text.contains("tokenexchange_integration_requests_total{code=\"200\",method=\"post\"} 1\n"),
            "{text}"
        );
        let buckets: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tokenexchange_integration_request_duration_seconds_bucket"))
            .map(|l| l.split("le=\"").nth(1).unwrap().split('"').next().unwrap())
            .collect();
        // Go's prometheus.DefBuckets.
        assert_eq!(
            buckets,
            [
                "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf"
            ]
        );
        assert!(text.contains("# TYPE tokenexchange_integration_request_duration_seconds histogram"));
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn bound_children_count_the_same_series_as_lookups() {
        let m = Metrics::new();
        for _ in 0..2 {
            m.http_request("/health", Some(3), &Method::GET, StatusCode::OK);
            m.http_request("/health", Some(3), &Method::HEAD, StatusCode::OK);
            m.http_request("/health", Some(3), &Method::GET, StatusCode::NOT_FOUND);
            m.http_request("other", None, &Method::GET, StatusCode::OK);
            m.token_request(false, StatusCode::OK, Duration::from_millis(1));
            m.token_request(true, StatusCode::OK, Duration::from_millis(1));
            m.token_request(false, StatusCode::UNAUTHORIZED, Duration::from_millis(1));
            m.token_issued(None);
            m.token_issued(Some(0));
            m.token_issued(Some(7));
            m.token_issued(Some(8));
            m.token_issued(Some(-1));
            m.signing(crate::signing::Algorithm::EdDsa, Duration::from_micros(10));
            m.key_cache_outcome("hit");
            m.key_cache_outcome("stale");
        }
        let http = |labels: [&str; 3]| m.http_requests.with_label_values(&labels).get();
        assert_eq!(http(["/health", "get", "200"]), 2);
        assert_eq!(http(["/health", "head", "200"]), 2);
        assert_eq!(http(["/health", "get", "404"]), 2);
        assert_eq!(http(["other", "get", "200"]), 2);
        assert_eq!(m.integration_requests.with_label_values(&["200", "post"]).get(), 2);
        assert_eq!(m.integration_requests.with_label_values(&["401", "post"]).get(), 2);
        assert_eq!(m.autojoin_requests.with_label_values(&["200", "post"]).get(), 2);
        assert_eq!(
            m.integration_duration
                .with_label_values(&["200", "post"])
                .get_sample_count(),
            2
        );
        let issued = |labels: [&str; 2]| m.tokens_issued.with_label_values(&labels).get();
        for tier in ["0", "7", "8", "-1"] {
            assert_eq!(issued(["integration", tier]), 2, "tier {tier}");
        }
        assert_eq!(issued(["autojoin", ""]), 2);
        assert_eq!(m.signing_duration.with_label_values(&["EdDSA"]).get_sample_count(), 2);
        assert_eq!(m.key_cache.with_label_values(&["hit"]).get(), 2);
        assert_eq!(m.key_cache.with_label_values(&["stale"]).get(), 2);
        // Nothing is bound before it is used: no series appears at start.
        assert!(!Metrics::new().render().contains("tokenexchange_tokens_issued_total{"));
    }

    #[test]
    fn methods_are_lower_case_and_bounded() {
        assert_eq!(method_label(&axum::http::Method::POST), "post");
        let odd = axum::http::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&odd), "unknown");
    }
}
