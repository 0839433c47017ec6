//! Limits on the work a request can make the server hold: how large it is,
//! how long its body may take (408), how many run at once, and for how
//! long. Too many or too long answer 503, like an unavailable store: the
//! caller should try again shortly, perhaps on another replica.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};

use axum::body::Body;
use axum::http::header;

use super::observe::{Phase, Progress};
use super::{ApiError, AppState, MAX_BODY_BYTES};

pub(super) async fn limits(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
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
    // The body first, under its own short deadline and before taking a
    // slot: a client that trickles its body holds a connection for at most
    // the body timeout, and never a slot that legitimate requests need.
    let progress = request.extensions().get::<Progress>().cloned().unwrap_or_default();
    progress.set(Phase::Body);
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(
        state.settings.body_read_timeout,
        axum::body::to_bytes(body, MAX_BODY_BYTES),
    )
    .await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) if is_length_limit(&e) => return ApiError::PayloadTooLarge.into_response(),
        Ok(Err(e)) if is_cut_short(&e) => return ApiError::ClientGone.into_response(),
        Ok(Err(e)) => return ApiError::BodyFailed(e.to_string()).into_response(),
        Err(_) => return ApiError::BodyTimedOut.into_response(),
    };
    let request = Request::from_parts(parts, Body::from(body));
    progress.set(Phase::Handling);

    // Shed at once rather than queue: a queue only adds latency to every
    // request behind it, and the load balancer can retry elsewhere.
    let Ok(_permit) = state.in_flight.try_acquire() else {
        return ApiError::Overloaded.into_response();
    };
    match tokio::time::timeout(state.settings.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut.into_response(),
    }
}

/// Whether reading a body failed because it passed the size limit (as
/// axum's own body extractor tells).
fn is_length_limit(error: &axum::Error) -> bool {
    causes(error).any(|e| e.is::<http_body_util::LengthLimitError>())
}

/// Whether the connection ended before the body did: the client left
/// (hyper reports an unexpected end of file under its body error).
fn is_cut_short(error: &axum::Error) -> bool {
    causes(error).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_incomplete_message)
    })
}

fn causes(error: &axum::Error) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| e.source())
}
