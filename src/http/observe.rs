//! The one layer that watches every request: it assigns the request ID,
//! feeds the metrics, and writes the access log line, with the failure
//! detail that handlers leave in the response (never in its body).

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};

use super::AppState;
use crate::claims::Principal;

/// Header carrying the request ID, in and out.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest request ID taken from a caller; longer ones are replaced. Room
/// for a UUID (36) and most tracing IDs, but not for an API key: autojoin
/// keys are 43 characters and integration keys longer, so a key pasted
/// into the header can never reach the log.
const MAX_REQUEST_ID_LEN: usize = 40;
/// The paths the API serves. Any other path is logged as `other`: a path
/// is chosen by the caller, and one that pasted an API key into a URL must
/// not get it written to the log.
pub(super) const ROUTES: &[&str] = &[
    "/v0/token/autojoin",
    "/v0/token/integration",
    "/.well-known/jwks.json",
    "/health",
    "/ready",
];

/// How far a request got; read when its client leaves before the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Routed, nothing read yet.
    Head = 0,
    /// Reading the body.
    Body = 1,
    /// Validating the key (cache, store) and signing.
    Handling = 2,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Head => "head",
            Phase::Body => "body",
            Phase::Handling => "handling",
        }
    }
}

/// A request's [`Phase`], shared through its extensions with the layers
/// that move it on.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<AtomicU8>);

impl Progress {
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::Relaxed);
    }

    fn get(&self) -> Phase {
        match self.0.load(Ordering::Relaxed) {
            1 => Phase::Body,
            2 => Phase::Handling,
            _ => Phase::Head,
        }
    }
}

/// Writes the access line and the counts of a request whose client went
/// away: the request's future is dropped mid-way, and this with it.
struct Abandoned<'a> {
    armed: bool,
    state: &'a AppState,
    method: &'a Method,
    route: Option<usize>,
    id: &'a str,
    started: Instant,
    progress: Progress,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let phase = self.progress.get().label();
        let path = loggable(self.route);
        let metrics = &self.state.metrics;
        metrics.http_request(path, self.route, self.method, super::error::CLIENT_CLOSED_REQUEST);
        metrics.requests_cancelled.with_label_values(&[path, phase]).inc();
        tracing::info!(
            method = self.method.as_str(),
            path,
            status = 499,
            latency_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            request_id = self.id,
            phase,
            "request abandoned by the client"
        );
    }
}

/// Left in a response by the token handlers: who the token was issued to.
#[derive(Debug, Clone)]
pub struct Issued(pub Principal);

/// Left in a response by an error: what went wrong, for the log only.
#[derive(Debug, Clone)]
pub struct FailureDetail(pub String);

/// The caller's request ID if it is short and made of safe characters
/// (letters, digits, `-`, `_`, `.`, `:`) and is not an integration key,
/// else a new one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    let safe = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':');
    headers
        .get(&REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID_LEN)
        .filter(|v| v.as_bytes().iter().all(safe))
        .filter(|v| !v.as_bytes().starts_with(crate::api_key::PREFIX.as_bytes()))
        .cloned()
        .unwrap_or_else(new_request_id)
}

thread_local! {
    /// This thread's request IDs: 128 random bits drawn once, then counted
    /// up from.
    static NEXT_ID: Cell<u128> = Cell::new({
        let mut seed = [0u8; 16];
        crate::ground::fill_random(&mut seed);
        u128::from_le_bytes(seed)
    });
}

/// A new request ID, shaped like a UUID (version 8, "custom").
///
/// An ID must be unique, not secret: a random start per thread and a
/// counter make collisions as unlikely as random UUIDs (two threads or
/// replicas would need starts within a few billion of each other out of
/// 2^122) without a call to the system's random generator per request.
fn new_request_id() -> HeaderValue {
    let id = NEXT_ID.with(|next| {
        let id = next.get();
        next.set(id.wrapping_add(1));
        id
    });
    let uuid = uuid::Builder::from_custom_bytes(id.to_be_bytes()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    // Unwrap: a UUID's text is always a valid header value.
    HeaderValue::from_str(uuid.hyphenated().encode_lower(&mut text)).expect("UUID is a valid header value")
}

/// The index of `path` in [`ROUTES`], if it is one of them.
fn route_of(path: &str) -> Option<usize> {
    ROUTES.iter().position(|r| *r == path)
}

/// RFC 9112 (3.2): a server must answer 400 to an HTTP/1.1 request with
/// no `Host` or more than one, as Go's does; HTTP/1.0 needs none.
fn host_ok(request: &Request) -> bool {
    if request.version() != axum::http::Version::HTTP_11 {
        return true;
    }
    let mut hosts = request.headers().get_all(axum::http::header::HOST).iter();
    hosts.next().is_some() && hosts.next().is_none()
}

/// What Go's server answers, before routing, for a request whose target is
/// not one of our paths: `OPTIONS *` 200 and any other method on `*` 400
/// (net/http), `CONNECT` 404 (its router neither cleans nor redirects
/// those), an unclean path a redirect.
fn not_routed(request: &Request) -> Option<Response> {
    if request.uri().path() == "*" {
        let mut response = if request.method() == Method::OPTIONS {
            (StatusCode::OK, [(axum::http::header::CONTENT_LENGTH, "0")]).into_response()
        } else {
            super::ApiError::AsteriskForm.into_response()
        };
        response.headers_mut().remove(axum::http::header::CONTENT_TYPE);
        return Some(response);
    }
    if request.method() == Method::CONNECT {
        return Some(super::ApiError::NotFound.into_response());
    }
    super::clean_path::redirect_unclean(request)
}

fn loggable(route: Option<usize>) -> &'static str {
    route.map_or("other", |r| ROUTES[r])
}

pub(super) async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let mut request = request;
    let route = route_of(request.uri().path());
    let path = loggable(route);
    let id = request_id(request.headers());
    // Made or checked above to be visible ASCII, so never the default.
    let id_text = id.to_str().unwrap_or_default();

    let progress = Progress::default();
    request.extensions_mut().insert(progress.clone());
    let mut abandoned = Abandoned {
        armed: true,
        state: &state,
        method: &method,
        route,
        id: id_text,
        started,
        progress,
    };
    // The API's own paths are clean; only other paths can need Go's
    // redirect, and only they pay for the check. No span per request: the
    // access line carries the request ID, and a span cost every request an
    // allocation and its fields formatted twice.
    let redirect = match route {
        _ if !host_ok(&request) => Some(super::ApiError::BadHost.into_response()),
        Some(_) => None,
        None => not_routed(&request),
    };
    let mut response = match redirect {
        Some(refused) => refused,
        None => next.run(request).await,
    };
    abandoned.armed = false;
    let phase = abandoned.progress.get();
    drop(abandoned);
    let elapsed = started.elapsed();
    let status = response.status();

    let metrics = &state.metrics;
    // A client that left while sending its body is answered (for the log)
    // rather than dropped; count it with the others that left.
    if status == super::error::CLIENT_CLOSED_REQUEST {
        metrics
            .requests_cancelled
            .with_label_values(&[path, phase.label()])
            .inc();
    }
    metrics.http_request(path, route, &method, status);
    // Go's series count what reaches its token handlers: only POSTs, since
    // its router answers other methods (405) and unclean paths (301, and
    // those never match a route here) before any handler.
    let reached_handler = method == Method::POST;
    match path {
        "/v0/token/autojoin" if reached_handler => metrics.token_request(true, status, elapsed),
        "/v0/token/integration" if reached_handler => metrics.token_request(false, status, elapsed),
        "/.well-known/jwks.json" => metrics.jwks_requests.inc(),
        _ => {}
    }

    let (mut int_id, mut key_id, mut org) = (None, None, None);
    if let Some(Issued(principal)) = response.extensions().get::<Issued>() {
        match principal {
            Principal::Integration {
                int_id: i,
                key_id: k,
                tier,
            } => {
                metrics.integration_tokens.with_label_values(&[i.as_str()]).inc();
                metrics.token_issued(Some(*tier));
                int_id = Some(i.as_str());
                key_id = Some(k.as_str());
            }
            Principal::Autojoin { org: o } => {
                metrics.token_issued(None);
                org = Some(o.as_str());
            }
        }
    }
    let failure = response.extensions().get::<FailureDetail>().map(|f| f.0.as_str());

    macro_rules! access_line {
        ($level:expr) => {
            tracing::event!(
                $level,
                // Strings as strings, not `%` (Display): the JSON writer
                // takes a `&str` as is, and a Display through the
                // formatting machinery, which cost more than the rest.
                method = method.as_str(),
                path,
                status = status.as_u16(),
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                request_id = id_text,
                int_id,
                key_id,
                org,
                error = failure,
                "request"
            )
        };
    }
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        access_line!(tracing::Level::ERROR);
    } else if status.is_server_error() {
        access_line!(tracing::Level::WARN);
    } else {
        access_line!(tracing::Level::INFO);
    }

    response.headers_mut().insert(REQUEST_ID.clone(), id);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut headers = HeaderMap::new();
        let made = request_id(&headers);
        assert_eq!(made.len(), 36);
        // Unique, and UUIDs to anything that parses them.
        let again = request_id(&headers);
        assert_ne!(made, again);
        let parsed = uuid::Uuid::parse_str(again.to_str().unwrap()).unwrap();
        assert_eq!(parsed.get_version_num(), 8);
        let other_thread = std::thread::spawn(new_request_id).join().unwrap();
        assert_ne!(other_thread, again);
        headers.insert(&REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&headers), "abc-123");
        headers.insert(&REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&headers), "has space");
        headers.insert(&REQUEST_ID, HeaderValue::from_str(&"x".repeat(41)).unwrap());
        assert_eq!(request_id(&headers).len(), 36);
        let uuid = "0f8fad5b-d9cb-469f-a165-70867728950e";
        headers.insert(&REQUEST_ID, HeaderValue::from_static(uuid));
        assert_eq!(request_id(&headers), uuid);
        // Keys never pass: too long, or an integration key's prefix, or
        // characters a key separator or a log line could abuse.
        for key in [
            "mlabk.cii_a.ki_b.c",
            "3uJ0rMq2X9c4mVh7lKpQ1sTzA8bN5yWfE6gRoLdIjCu",
            "mlabk.cii_acme.ki_4f1c2a9b7e3d5c60.q2XAAAAAAAAAAAAAAA",
            "a\"b",
            "a b",
            "a/b",
            "{\"x\":1}",
        ] {
            headers.insert(&REQUEST_ID, HeaderValue::from_str(key).unwrap());
            assert_ne!(request_id(&headers), key, "{key}");
        }
    }

    #[test]
    fn only_known_paths_are_logged() {
        let logged = |path: &str| loggable(route_of(path));
        assert_eq!(logged("/health"), "/health");
        assert_eq!(logged("/v0/token/mlabk.cii_a.ki_b.secret"), "other");
        assert_eq!(logged("/health/"), "other");
    }
}
