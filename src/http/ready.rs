//! `/ready`: whether this replica should receive traffic; the store's
//! [`StoreHealth`](crate::store::StoreHealth) decides.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::AppState;

pub(super) async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    // A signing key is always loaded once the server runs (start-up fails
    // without one), so the store is what decides.
    if state.health.is_ready().await {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the key store is not answering\n",
        )
    }
}
