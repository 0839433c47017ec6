//! Limits on the work a request can make the server hold: how large it is,
//! how many run at once, and for how long. Too many or too long answer 503,
//! like an unavailable store: the caller should try again shortly, perhaps
//! on another replica.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};

use axum::http::header;

use super::{ApiError, AppState, MAX_BODY_BYTES};

pub(super) async fn limits(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // A declared size over the limit is refused before a byte of the body
    // is read. (A body without a declared size is cut off at the limit by
    // the body extractor.)
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return ApiError::PayloadTooLarge.into_response();
    }
    // Shed at once rather than queue: a queue only adds latency to every
    // request behind it, and the load balancer can retry elsewhere.
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        return ApiError::Overloaded.into_response();
    };
    match tokio::time::timeout(state.settings.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut.into_response(),
    }
}
