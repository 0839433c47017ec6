//! The one mapping from failures to HTTP answers.
//!
//! Bodies are the Go service's, byte for byte: short plain text with a
//! trailing newline (what Go's `http.Error` writes). No detail of a failure
//! reaches the body; the detail rides along in the response's extensions
//! to the access log line, so it is logged once, with the request.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::FailureDetail;
use crate::rate_limit::{Refusal, Standing};
use crate::validate::Rejection;

/// Seconds a caller should wait before retrying after a store failure.
/// Short: most store hiccups (a timeout, a failover) pass within a second.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The status logged for a request whose client left before the answer.
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status code"),
};

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The path exists but not for this method; carries the `Allow` value.
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("no such path")]
    NotFound,
    #[error("invalid request body: {0}")]
    BadRequest(String),
    #[error("request body larger than the limit")]
    PayloadTooLarge,
    #[error("{0}")]
    InvalidKey(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("too many requests in flight; shed")]
    Overloaded,
    #[error("request deadline passed")]
    TimedOut,
    #[error("request body not received within the body read timeout")]
    BodyTimedOut,
    #[error("reading the request body failed: {0}")]
    BodyFailed(String),
    /// The client closed the connection before sending its whole body.
    #[error("the client went away while sending its body")]
    ClientGone,
    /// A valid key over its (or its integration's, organization's) limit.
    #[error("{0}")]
    RateLimited(Box<Refusal>),
    /// A method other than OPTIONS on the target `*`.
    #[error("a request for * that is not OPTIONS")]
    AsteriskForm,
    /// An HTTP/1.1 request without exactly one `Host` (RFC 9112, 3.2).
    #[error("HTTP/1.1 request without exactly one Host header")]
    BadHost,
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::Invalid(why) => ApiError::InvalidKey(why),
            Rejection::Unavailable(why) => ApiError::Unavailable(why),
        }
    }
}

impl ApiError {
    fn status_and_body(&self) -> (StatusCode, &'static str) {
        match self {
            // Go's router answers before any handler, with its own text
            // (`http.StatusText`), not the handlers' "Method not allowed".
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "404 page not found\n"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "Invalid request body\n"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "Request body too large\n"),
            ApiError::InvalidKey(_) => (StatusCode::UNAUTHORIZED, "Invalid API key\n"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "Service unavailable, retry later\n"),
            ApiError::Signing(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Failed to generate token\n"),
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "Server busy, retry later\n"),
            ApiError::TimedOut => (StatusCode::SERVICE_UNAVAILABLE, "Request timed out, retry later\n"),
            // The client's fault, not ours: Go's text for 408.
            ApiError::BodyTimedOut => (StatusCode::REQUEST_TIMEOUT, "Request Timeout\n"),
            ApiError::BodyFailed(_) => (StatusCode::BAD_REQUEST, "Invalid request body\n"),
            // Nobody reads it; the status is for the access log and metrics
            // (nginx's "client closed request").
            ApiError::ClientGone => (CLIENT_CLOSED_REQUEST, "Client Closed Request\n"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "Too many requests\n"),
            // Go's router: no body.
            ApiError::AsteriskForm => (StatusCode::BAD_REQUEST, ""),
            // Go's net/http text, which it writes before any handler.
            ApiError::BadHost => (StatusCode::BAD_REQUEST, "400 Bad Request: missing required Host header"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.status_and_body();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        if let ApiError::MethodNotAllowed(allow) = self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if matches!(
            self,
            ApiError::Unavailable(_) | ApiError::Overloaded | ApiError::TimedOut
        ) {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if matches!(self, ApiError::BadHost | ApiError::AsteriskForm) {
            // As Go does: a client this confused is not kept.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ApiError::RateLimited(refusal) = &self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(refusal.retry_after_secs));
            insert_rate_limit_headers(headers, &refusal.standing);
        }
        // The access log (one line per request) carries the detail.
        response.extensions_mut().insert(FailureDetail(self.to_string()));
        response
    }
}

/// The IETF `RateLimit-Policy` and `RateLimit` headers
/// (draft-ietf-httpapi-ratelimit-headers) of a 429.
fn insert_rate_limit_headers(headers: &mut axum::http::HeaderMap, standing: &Standing) {
    const POLICY: header::HeaderName = header::HeaderName::from_static("ratelimit-policy");
    const CURRENT: header::HeaderName = header::HeaderName::from_static("ratelimit");
    // Both are digits, quotes, semicolons and fixed names: always valid.
    if let (Ok(policy), Ok(current)) = (
        HeaderValue::try_from(standing.policy()),
        HeaderValue::try_from(standing.current()),
    ) {
        headers.insert(POLICY, policy);
        headers.insert(CURRENT, current);
    }
}
