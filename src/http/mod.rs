//! The HTTP API (see COMPAT.md, "HTTP API").
//!
//! [`router`] builds the whole API from an [`AppState`], without a socket, so
//! tests can drive it directly. Each endpoint has its own file; [`error`] is
//! the one place that turns failures into status codes and bodies.

mod error;
mod health;
mod jwks;
mod token;

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post};

pub use error::ApiError;
pub use token::{DecodeError, decode_token_request};

use crate::signing::KeySet;
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
    /// Checks presented API keys against the store.
    pub validator: Validator,
    /// Source of `iat`; the system clock outside tests.
    pub clock: Clock,
}

impl AppState {
    pub fn new(keys: Arc<KeySet>, validator: Validator) -> Self {
        Self {
            keys,
            validator,
            clock: Arc::new(SystemTime::now),
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
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

#[cfg(test)]
mod tests;
