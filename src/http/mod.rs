//! The HTTP API (see docs/compatibility.md, "HTTP API").
//!
//! [`router`] builds the whole API from an [`AppState`], without a socket, so
//! tests can drive it directly. Each endpoint has its own file; [`error`] is
//! the one place that turns failures into status codes and bodies, and
//! [`observe`] the one layer that logs and measures every request.

mod clean_path;
mod error;
mod health;
mod jwks;
mod limits;
mod observe;
mod ready;
mod token;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::routing::{MethodRouter, any, get, post};
use tower::util::MapRequest;

pub use error::ApiError;
pub use observe::{FailureDetail, Issued, Phase, Progress, REQUEST_ID};
// Readiness is the store's; re-exported where the HTTP settings use it.
pub use crate::store::{FRESHNESS, PROBE_INTERVAL, ReadinessWindows, StoreHealth};
pub use token::{DecodeError, decode_token_request};

use tokio::sync::Semaphore;

use crate::cache::CacheSettings;
use crate::ground::{Clock, SystemClock};
use crate::metrics::Metrics;
use crate::rate_limit::{RateLimitSettings, RateLimits};
use crate::signing::SharedKeys;
use crate::validate::Validator;

/// Largest request body read. A request is `{"api_key":"..."}` with a key of
/// at most 300 bytes; 4 KiB leaves room for whitespace and extra members
/// while keeping a flood of large bodies cheap to refuse (413).
pub const MAX_BODY_BYTES: usize = 4 * 1024;

/// The wall-clock time tokens are issued at; a function so tests can fix it.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// How the service behaves; every field has a flag (see `config`).
#[derive(Clone)]
pub struct Settings {
    /// Bound on one store call.
    pub store_timeout: Duration,
    pub readiness: ReadinessWindows,
    pub cache: CacheSettings,
    /// Time for TTLs; the system clock outside tests.
    pub clock: Arc<dyn Clock>,
    /// Time tokens are issued at; the system clock outside tests.
    pub wall_clock: WallClock,
    /// Deadline for one request, from its first body byte to its answer.
    pub request_timeout: Duration,
    /// Requests handled at once; more are refused with 503 at once.
    pub max_in_flight: usize,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body, once its headers are in.
    /// The body is read before the request takes an in-flight slot.
    pub body_read_timeout: Duration,
    /// Open connections at most; past it the server stops accepting until
    /// one closes (the kernel's backlog holds the rest).
    pub max_connections: usize,
    /// Limits on minting; all off by default.
    pub rate_limits: RateLimitSettings,
}

/// Default deadline of a request: a store call, its retry, and signing,
/// with room to spare.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time to send request headers; a real client needs milliseconds.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time to send a body of at most 4 KiB: milliseconds for a real
/// client even on a poor link; a connection that trickles is cut off
/// before it can hold anything for long.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head (request line and headers). API clients send a few
/// hundred bytes; hyper's default (~400 KiB) let 1,000 unfinished heads take
/// 400 MiB. Beyond it the answer is 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default cap on open connections. The worst a connection holds is a full
/// head buffer, a body and the write buffer (about 40 KiB all told, see the
/// README's "Limits under attack"), so 2,048 of them stay under 100 MiB and
/// fit a 256 MiB Cloud Run instance with room for the cache.
pub const DEFAULT_MAX_CONNECTIONS: usize = 2048;

/// Default limit on requests in flight: most of a request's time is spent
/// waiting for the store, so each core can keep a few hundred going; beyond
/// that, queueing only adds latency.
pub fn default_max_in_flight() -> usize {
    256 * std::thread::available_parallelism().map_or(1, usize::from)
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            store_timeout: Duration::from_secs(2),
            readiness: ReadinessWindows::default(),
            cache: CacheSettings::default(),
            clock: Arc::new(SystemClock),
            wall_clock: Arc::new(SystemTime::now),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_in_flight: default_max_in_flight(),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            rate_limits: RateLimitSettings::default(),
        }
    }
}

/// What the handlers share. Built by `AppState::new` in [`crate::app`],
/// which wires the store, cache and validator together.
#[derive(Clone)]
pub struct AppState {
    /// The signing key and the JWKS, swapped whole when keys are reloaded;
    /// a request keeps the set it started with.
    pub keys: SharedKeys,
    /// Checks presented API keys against the (cached, instrumented) store.
    pub validator: Validator,
    /// Source of `iat`; the system clock outside tests.
    pub clock: WallClock,
    /// Counters and histograms, served on the metrics port.
    pub metrics: Arc<Metrics>,
    /// Whether the store answers, for `/ready`.
    pub health: Arc<StoreHealth>,
    /// Requests in flight; a permit per request.
    pub in_flight: Arc<Semaphore>,
    /// Tokens issued per key since usage was last written.
    pub usage: Arc<crate::usage::UsageRecorder>,
    /// Limits on minting; `None` when none is configured.
    pub rate_limits: Option<Arc<RateLimits>>,
    pub settings: Settings,
}

/// `Allow` on a 405 from a token route, as Go's router writes it.
const ALLOW_POST: &str = "POST";
/// `Allow` on a 405 from a GET route: Go serves HEAD wherever it serves GET.
const ALLOW_GET: &str = "GET, HEAD";

/// Answers every other method of `route` with 405 and `allow`.
fn only(route: MethodRouter<Arc<AppState>>, allow: &'static str) -> MethodRouter<Arc<AppState>> {
    route.fallback(move || async move { ApiError::MethodNotAllowed(allow) })
}

/// The complete API.
pub fn router(state: AppState) -> Router {
    // One Arc for every layer and handler: a request clones the state at
    // each of them, and a clone of the whole struct was a dozen atomic
    // increments (and as many decrements) on cache lines all cores share.
    let state = Arc::new(state);
    // Work that can pile up is limited: requests in flight, and each
    // request's time. Probes stay outside, so they answer under load. The
    // limits wrap each route's methods only (MethodRouter::route_layer; a
    // Router-wide route_layer would wrap the 405 fallback too), so a wrong
    // method is answered before anything else, as Go's router does.
    let limits = axum::middleware::from_fn_with_state(state.clone(), limits::limits);
    let limited = |route: MethodRouter<Arc<AppState>>| route.route_layer(limits.clone());
    Router::new()
        .route("/v0/token/autojoin", only(limited(post(token::autojoin)), ALLOW_POST))
        .route(
            "/v0/token/integration",
            only(limited(post(token::integration)), ALLOW_POST),
        )
        .route("/.well-known/jwks.json", only(limited(get(jwks::jwks)), ALLOW_GET))
        // Any method, as in the Go service: load balancers differ in what
        // they send to a health check.
        .route("/health", any(health::health))
        .route("/ready", only(get(ready::ready), ALLOW_GET))
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // `observe` also redirects unclean paths (`//health`) before
        // routing, so they are not 404s, and logs and counts the redirect.
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe::observe))
        .with_state(state)
}

/// The API as served: [`router`] behind the unescaping of paths
/// (`/%68ealth` is `/health`). A Router's own layers run after it has
/// chosen the route, so this wraps it from outside; a Router nested in
/// another for it cost `/health` a tenth of its rate.
pub type Api<B> = MapRequest<Router, fn(axum::http::Request<B>) -> axum::http::Request<B>>;

/// [`Api`] for requests with bodies of type `B`.
pub fn api<B>(state: AppState) -> Api<B> {
    MapRequest::new(router(state), clean_path::route_by_unescaped_path::<B> as fn(_) -> _)
}

/// The metrics listener's one route, `/metrics`, in Prometheus' text format.
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    metrics.render(),
                )
            }
        }),
    )
}

#[cfg(test)]
mod tests;
