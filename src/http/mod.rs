//! The HTTP API (see COMPAT.md, "HTTP API").
//!
//! [`router`] builds the whole API from an [`AppState`], without a socket, so
//! tests can drive it directly. Each endpoint has its own file; [`error`] is
//! the one place that turns failures into status codes and bodies, and
//! [`observe`] the one layer that logs and measures every request.

mod error;
mod health;
mod jwks;
mod observe;
mod ready;
mod token;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::routing::{any, get, post};

pub use error::ApiError;
pub use observe::{FailureDetail, Issued, REQUEST_ID};
pub use ready::{FRESHNESS, PROBE_INTERVAL, ReadinessWindows, StoreHealth};
pub use token::{DecodeError, decode_token_request};

use crate::metrics::Metrics;
use crate::signing::KeySet;
use crate::store::{Instrumented, Lookups};
use crate::validate::Validator;

/// Largest request body read. A request is `{"api_key":"..."}` with a key of
/// at most 300 bytes; 4 KiB leaves room for whitespace and extra members
/// while keeping a flood of large bodies cheap to refuse (413).
pub const MAX_BODY_BYTES: usize = 4 * 1024;

/// The current time; a function so tests can fix it.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The signing key and the JWKS that publishes it.
    pub keys: Arc<KeySet>,
    /// Checks presented API keys against the (instrumented) store.
    pub validator: Validator,
    /// Source of `iat`; the system clock outside tests.
    pub clock: Clock,
    /// Counters and histograms, served on the metrics port.
    pub metrics: Arc<Metrics>,
    /// Whether the store answers, for `/ready`.
    pub health: Arc<StoreHealth>,
}

impl AppState {
    /// Wires the request path: lookups go through a layer that measures
    /// them and tells readiness that the store answered. `store_timeout`
    /// bounds one store call.
    pub fn new(keys: Arc<KeySet>, store: Arc<dyn Lookups>, store_timeout: Duration) -> Self {
        Self::with_readiness(keys, store, store_timeout, ReadinessWindows::default())
    }

    /// [`AppState::new`], with readiness windows other than the defaults.
    pub fn with_readiness(
        keys: Arc<KeySet>,
        store: Arc<dyn Lookups>,
        store_timeout: Duration,
        windows: ReadinessWindows,
    ) -> Self {
        let metrics = Arc::new(Metrics::new());
        // A probe is one store call, which the store may retry once.
        let probe_timeout = store_timeout * 2 + Duration::from_millis(500);
        let health = Arc::new(StoreHealth::new(store.clone(), probe_timeout, windows));
        let instrumented = Arc::new(Instrumented::new(store, metrics.clone(), health.clone()));
        Self {
            keys,
            validator: Validator::new(instrumented.clone(), instrumented),
            clock: Arc::new(SystemTime::now),
            metrics,
            health,
        }
    }
}

/// The complete API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v0/token/autojoin", post(token::autojoin))
        .route("/v0/token/integration", post(token::integration))
        .route("/.well-known/jwks.json", get(jwks::jwks))
        // Any method, as in the Go service: load balancers differ in what
        // they send to a health check.
        .route("/health", any(health::health))
        .route("/ready", get(ready::ready))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe::observe))
        .with_state(state)
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
