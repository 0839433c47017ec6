//! `GET /.well-known/jwks.json`: the public keys verifiers check tokens with.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::AppState;

/// Verifiers may cache the set for an hour but must revalidate after; the
/// rotation runbook's waits are built on this value.
const CACHE_CONTROL: &str = "public, max-age=3600, must-revalidate";

pub(super) async fn jwks(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, CACHE_CONTROL),
            // Browsers verify tokens too (web speed-test clients).
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        state.keys.load().jwks_json().to_owned(),
    )
}
