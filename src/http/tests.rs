//! Router tests: every row of docs/compatibility.md's "HTTP API" and "Tokens" sections,
//! driven through the router without a socket, against an in-memory fake
//! store.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::*;
use crate::api_key::{AutojoinApiKey, IntegrationApiKey};
use crate::signing::{Algorithm, KeySet, SigningKey};
use crate::store::{AutojoinKeyRecord, AutojoinKeys, Backend, IntegrationKeyRecord, IntegrationKeys, StoreError};

/// In-memory keys, with a switch that makes every lookup fail.
#[derive(Default)]
struct FakeStore {
    integration: HashMap<(String, String), IntegrationKeyRecord>,
    autojoin: HashMap<String, AutojoinKeyRecord>,
    down: AtomicBool,
    lookups: AtomicUsize,
    pings: AtomicUsize,
}

#[async_trait]
impl IntegrationKeys for FakeStore {
    async fn integration_key(&self, int: &str, key: &str) -> Result<Option<IntegrationKeyRecord>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        Ok(self.integration.get(&(int.to_owned(), key.to_owned())).cloned())
    }
}

#[async_trait]
impl AutojoinKeys for FakeStore {
    async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<AutojoinKeyRecord>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("timeout".into()));
        }
        Ok(self.autojoin.get(key.secret().expose()).cloned())
    }
}

#[async_trait]
impl Backend for FakeStore {
    fn backend(&self) -> &'static str {
        "fake"
    }

    fn capacity(&self) -> usize {
        16
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.pings.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down".into()));
        }
        Ok(())
    }
}

const NOW: u64 = 1_800_000_000;

struct Fixture {
    store: Arc<FakeStore>,
    state: AppState,
    active: String,
    revoked: String,
    tiered: String,
    autojoin: String,
}

fn fixture(alg: Algorithm) -> Fixture {
    fixture_with(alg, |_| {})
}

/// A fixture whose store `more` adds to before it is shared.
fn fixture_with(alg: Algorithm, more: impl FnOnce(&mut FakeStore)) -> Fixture {
    let mut store = FakeStore::default();
    let mut add = |int: &str, status: &str, tier: i64| {
        let key = IntegrationApiKey::generate(int, None);
        store.integration.insert(
            (int.into(), key.key_id().into()),
            IntegrationKeyRecord {
                key_hash: key.secret().sha256_hex(),
                status: status.into(),
                tier,
                expires_at: None,
            },
        );
        key.to_secret_string().expose().to_owned()
    };
    let active = add("acme", "active", 0);
    let revoked = add("acme", "revoked", 0);
    let tiered = add("bigco", "active", 7);
    let autojoin = AutojoinApiKey::generate().secret().expose().to_owned();
    store.autojoin.insert(
        autojoin.clone(),
        AutojoinKeyRecord {
            org: "mlab-org".into(),
            expires_at: None,
        },
    );
    more(&mut store);
    let store = Arc::new(store);
    let (key, _) = SigningKey::generate(alg, None).unwrap();
    let settings = Settings {
        store_timeout: Duration::from_secs(1),
        // These tests are about the router: every lookup reaches the store.
        // The cache has tests of its own, and the end-to-end suite runs both.
        cache: crate::cache::CacheSettings {
            ttl: Duration::ZERO,
            negative_ttl: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            ..Default::default()
        },
        ..Settings::default()
    };
    let mut state = AppState::new(Arc::new(KeySet::new(key)), store.clone(), settings);
    state.clock = Arc::new(|| UNIX_EPOCH + Duration::from_millis(NOW * 1000 + 999));
    Fixture {
        store,
        state,
        active,
        revoked,
        tiered,
        autojoin,
    }
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

async fn call(state: &AppState, method: Method, path: &str, body: impl Into<Body>) -> Answer {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "token-exchange.test")
        .body(body.into())
        .unwrap();
    let response = api(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes().to_vec();
    Answer { status, headers, body }
}

async fn exchange(state: &AppState, path: &str, key: &str) -> Answer {
    call(state, Method::POST, path, json!({ "api_key": key }).to_string()).await
}

fn decode_part(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// Header and claims of a successful answer, after checking its framing.
fn token_parts(answer: &Answer) -> (Value, Value) {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert!(answer.text().ends_with("}\n"));
    let body: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body.as_object().unwrap().len(), 1, "only a token member");
    let token = body["token"].as_str().unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    (decode_part(parts[0]), decode_part(parts[1]))
}

fn assert_refused(answer: &Answer, status: StatusCode, body: &str) {
    assert_eq!(answer.status, status, "{}", answer.text());
    assert_eq!(answer.text(), body);
    assert_eq!(answer.header("content-type"), Some("text/plain; charset=utf-8"));
}

#[tokio::test]
async fn integration_token_has_the_exact_header_and_claims() {
    for alg in [Algorithm::Rs256, Algorithm::Es256, Algorithm::EdDsa] {
        let f = fixture(alg);
        let (header, claims) = token_parts(&exchange(&f.state, "/v0/token/integration", &f.active).await);
        assert_eq!(
            header,
            json!({"alg": alg.as_str(), "kid": f.state.keys.load().active().kid()})
        );
        let key_id = f.active.split('.').nth(2).unwrap();
        let mut claims = claims.as_object().unwrap().clone();
        let jti = claims.remove("jti").unwrap();
        assert_eq!(
            Value::Object(claims),
            json!({"iss": "token-exchange", "aud": "integration", "iat": NOW, "nbf": NOW,
                   "exp": NOW + 20, "int_id": "acme", "key_id": key_id, "tier": 0})
        );
        let jti = uuid::Uuid::parse_str(jti.as_str().unwrap()).unwrap();
        assert_eq!(jti.get_version_num(), 4);
    }
}

#[tokio::test]
async fn integration_tier_comes_from_the_key() {
    let f = fixture(Algorithm::EdDsa);
    let (_, claims) = token_parts(&exchange(&f.state, "/v0/token/integration", &f.tiered).await);
    assert_eq!(claims["tier"], 7);
    assert_eq!(claims["int_id"], "bigco");
}

#[tokio::test]
async fn autojoin_token_has_the_exact_claims() {
    let f = fixture(Algorithm::Rs256);
    let (header, claims) = token_parts(&exchange(&f.state, "/v0/token/autojoin", &f.autojoin).await);
    assert_eq!(header["alg"], "RS256");
    assert!(header.get("typ").is_none());
    let mut claims = claims.as_object().unwrap().clone();
    assert!(claims.remove("jti").unwrap().is_string());
    assert_eq!(
        Value::Object(claims),
        json!({"iss": "token-exchange", "aud": "autojoin", "iat": NOW, "nbf": NOW,
               "exp": NOW + 3600, "org": "mlab-org"})
    );
}

#[tokio::test]
async fn every_bad_key_gets_the_same_401() {
    let f = fixture(Algorithm::EdDsa);
    let mut wrong_secret = f.active.clone();
    let last = wrong_secret.pop().unwrap();
    wrong_secret.push(if last == 'A' { 'B' } else { 'A' });
    let unknown_key_id = IntegrationApiKey::generate("acme", None).to_secret_string();
    let cases = [
        ("malformed", "not-a-key".to_owned()),
        ("empty", String::new()),
        ("unknown key ID", unknown_key_id.expose().to_owned()),
        ("unknown integration", f.active.replacen("cii_acme", "cii_other", 1)),
        ("revoked", f.revoked.clone()),
        ("wrong secret", wrong_secret),
        ("autojoin key on the integration route", f.autojoin.clone()),
    ];
    for (what, key) in &cases {
        let answer = exchange(&f.state, "/v0/token/integration", key).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_refused(&answer, StatusCode::UNAUTHORIZED, "Invalid API key\n");
    }
    for key in ["", "unknown-autojoin-key", &f.active] {
        let answer = exchange(&f.state, "/v0/token/autojoin", key).await;
        assert_refused(&answer, StatusCode::UNAUTHORIZED, "Invalid API key\n");
    }
}

#[tokio::test]
async fn malformed_keys_never_reach_the_store() {
    let f = fixture(Algorithm::EdDsa);
    for key in ["", "mlabk.cii_a.ki_b", &"x".repeat(301)] {
        exchange(&f.state, "/v0/token/integration", key).await;
    }
    exchange(&f.state, "/v0/token/autojoin", "").await;
    assert_eq!(f.store.lookups.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn bad_bodies_are_400() {
    let f = fixture(Algorithm::EdDsa);
    for body in ["", "{", "[]", r#"{"api_key":123}"#, r#"{"api_key":["k"]}"#, "\"key\""] {
        for path in ["/v0/token/integration", "/v0/token/autojoin"] {
            let answer = call(&f.state, Method::POST, path, body).await;
            assert_refused(&answer, StatusCode::BAD_REQUEST, "Invalid request body\n");
        }
    }
    // A JSON null, an empty object and a null key decode to an empty key: 401.
    for body in ["null", "{}", r#"{"api_key":null}"#] {
        let answer = call(&f.state, Method::POST, "/v0/token/integration", body).await;
        assert_refused(&answer, StatusCode::UNAUTHORIZED, "Invalid API key\n");
    }
}

#[tokio::test]
async fn content_type_is_not_required() {
    let f = fixture(Algorithm::EdDsa);
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v0/token/integration")
        .header(header::HOST, "token-exchange.test")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(json!({ "api_key": f.active }).to_string()))
        .unwrap();
    let response = api(f.state.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let f = fixture(Algorithm::EdDsa);
    let padded = format!(r#"{{"api_key":"{}","pad":"{}"}}"#, f.active, " ".repeat(MAX_BODY_BYTES));
    let answer = call(&f.state, Method::POST, "/v0/token/integration", padded).await;
    assert_refused(&answer, StatusCode::PAYLOAD_TOO_LARGE, "Request body too large\n");
    // Just under the limit is read.
    let body = json!({ "api_key": f.active }).to_string();
    let fitting = format!("{body}{}", " ".repeat(MAX_BODY_BYTES - body.len()));
    let answer = call(&f.state, Method::POST, "/v0/token/integration", fitting).await;
    assert_eq!(answer.status, StatusCode::OK);
}

/// Bodies whose size is not declared (chunked): too long is 413 once the
/// limit is crossed, and one that breaks off mid-stream is 400.
#[tokio::test]
async fn undeclared_bodies_are_cut_off_at_the_limit() {
    let f = fixture(Algorithm::EdDsa);
    let (mut sender, streamed) = http_body_util::channel::Channel::<axum::body::Bytes, std::io::Error>::new(8);
    tokio::spawn(async move {
        for _ in 0..(MAX_BODY_BYTES / 1024 + 2) {
            if sender
                .send_data(axum::body::Bytes::from(vec![b' '; 1024]))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let answer = call(&f.state, Method::POST, "/v0/token/integration", Body::new(streamed)).await;
    assert_refused(&answer, StatusCode::PAYLOAD_TOO_LARGE, "Request body too large\n");

    let (mut sender, broken) = http_body_util::channel::Channel::<axum::body::Bytes, std::io::Error>::new(8);
    tokio::spawn(async move {
        let _ = sender.send_data(axum::body::Bytes::from_static(b"{\"api_key\":")).await;
        sender.abort(std::io::Error::other("connection reset"));
    });
    let answer = call(&f.state, Method::POST, "/v0/token/integration", Body::new(broken)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn wrong_methods_are_405() {
    let f = fixture(Algorithm::EdDsa);
    for (method, path, allow) in [
        (Method::GET, "/v0/token/autojoin", "POST"),
        (Method::GET, "/v0/token/integration", "POST"),
        (Method::HEAD, "/v0/token/integration", "POST"),
        (Method::PUT, "/v0/token/integration", "POST"),
        (Method::DELETE, "/v0/token/autojoin", "POST"),
        (Method::POST, "/.well-known/jwks.json", "GET, HEAD"),
        (Method::DELETE, "/.well-known/jwks.json", "GET, HEAD"),
        (Method::POST, "/ready", "GET, HEAD"),
    ] {
        let answer = call(&f.state, method.clone(), path, "").await;
        assert_eq!(answer.header("allow"), Some(allow), "{method} {path}");
        if method == Method::HEAD {
            assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
        } else {
            // Go's router's text, not the handlers' "Method not allowed".
            assert_refused(&answer, StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
        }
    }
    // The router answers before any limit: a body over the limit, or no
    // request slot left, still gets 405, as from Go's router.
    let big = call(
        &f.state,
        Method::PUT,
        "/v0/token/autojoin",
        "x".repeat(MAX_BODY_BYTES * 4),
    )
    .await;
    assert_eq!(big.status, StatusCode::METHOD_NOT_ALLOWED);
    let all = f.state.in_flight.available_permits() as u32;
    let held = f.state.in_flight.clone().acquire_many_owned(all).await.unwrap();
    let shed = call(&f.state, Method::GET, "/v0/token/integration", "").await;
    assert_eq!(shed.status, StatusCode::METHOD_NOT_ALLOWED);
    drop(held);
    // HEAD is served wherever GET is, as in Go.
    let head = call(&f.state, Method::HEAD, "/.well-known/jwks.json", "").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    // /health answers every method, as Go's pattern without a method does.
    for method in [Method::GET, Method::POST, Method::DELETE] {
        assert_eq!(call(&f.state, method, "/health", "").await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn unclean_paths_are_redirected_as_go_redirects_them() {
    let f = fixture(Algorithm::EdDsa);
    // Cleaned as sent: an encoded slash or dot is part of a segment, so
    // the path is clean, and names no route (Go 1.24: 404 for `/%2Fhealth`).
    for path in ["/%2Fhealth", "/a/%2E%2E/health", "/%2F%2Fhealth"] {
        assert_eq!(
            call(&f.state, Method::GET, path, "").await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    for (method, path, location) in [
        (Method::GET, "//health", "/health"),
        (Method::POST, "/v0//token/autojoin", "/v0/token/autojoin"),
        (Method::POST, "/v0/token/./integration", "/v0/token/integration"),
        (Method::GET, "/a/../health", "/health"),
        (Method::GET, "//.well-known/jwks.json?x=1", "/.well-known/jwks.json?x=1"),
        (Method::DELETE, "//nowhere", "/nowhere"),
        (Method::GET, "/x/../a%20b", "/a%20b"),
    ] {
        let answer = call(&f.state, method.clone(), path, "").await;
        assert_eq!(answer.status, StatusCode::MOVED_PERMANENTLY, "{method} {path}");
        assert_eq!(answer.header("location"), Some(location), "{method} {path}");
        if method == Method::GET {
            assert_eq!(answer.header("content-type"), Some("text/html; charset=utf-8"));
            let html_location = location.replace('&', "&amp;");
            assert_eq!(
                answer.text(),
                format!("<a href=\"{html_location}\">Moved Permanently</a>.\n\n")
            );
        } else {
            assert_eq!(answer.header("content-type"), None);
            assert!(answer.body.is_empty());
        }
    }
    // Clean paths, with or without a trailing slash, are not redirected.
    assert_eq!(
        call(&f.state, Method::GET, "/health/", "").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(call(&f.state, Method::GET, "/health", "").await.status, StatusCode::OK);
    // A redirected POST never reached a handler: Go's series do not count it.
    let text = f.state.metrics.render();
    assert!(!text.contains(r#"tokenexchange_autojoin_requests_total{code="301""#));
    assert_eq!(
        series(
            &text,
            r#"tokenexchange_http_requests_total{code="301",method="post",route="other"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn escaped_letters_reach_their_route_and_are_counted_under_it() {
    let f = fixture(Algorithm::EdDsa);
    for path in ["/%68ealth", "/%68%65alth?x=%2F"] {
        let answer = call(&f.state, Method::GET, path, "").await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
        assert_eq!(answer.text(), "ok");
    }
    let jwks = call(&f.state, Method::GET, "/.well-known/jwks%2Ejson", "").await;
    assert_eq!(jwks.status, StatusCode::OK);
    let wrong = call(&f.state, Method::GET, "/v0/token/%61utojoin", "").await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    let text = f.state.metrics.render();
    assert_eq!(
        series(
            &text,
            r#"tokenexchange_http_requests_total{code="200",method="get",route="/health"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn unknown_paths_are_404() {
    let f = fixture(Algorithm::EdDsa);
    let answer = call(&f.state, Method::GET, "/v0/token", "").await;
    assert_refused(&answer, StatusCode::NOT_FOUND, "404 page not found\n");
}

#[tokio::test]
async fn store_failure_is_503_with_retry_after_never_401() {
    let f = fixture(Algorithm::EdDsa);
    f.store.down.store(true, Ordering::SeqCst);
    for (path, key) in [
        ("/v0/token/integration", &f.active),
        ("/v0/token/autojoin", &f.autojoin),
    ] {
        let answer = exchange(&f.state, path, key).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.header("retry-after"), Some("1"));
    }
    f.store.down.store(false, Ordering::SeqCst);
    assert_eq!(
        exchange(&f.state, "/v0/token/integration", &f.active).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn jwks_publishes_the_public_key_with_cache_headers() {
    for alg in [Algorithm::Rs256, Algorithm::Es256, Algorithm::EdDsa] {
        let f = fixture(alg);
        let answer = call(&f.state, Method::GET, "/.well-known/jwks.json", "").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert_eq!(
            answer.header("cache-control"),
            Some("public, max-age=3600, must-revalidate")
        );
        assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
        let jwks: Value = serde_json::from_slice(&answer.body).unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        let key = keys[0].as_object().unwrap();
        assert_eq!(key["kid"], f.state.keys.load().active().kid());
        assert_eq!(key["alg"], alg.as_str());
        assert_eq!(key["use"], "sig");
        for private in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(!key.contains_key(private));
        }
    }
}

#[tokio::test]
async fn health_answers_ok() {
    let f = fixture(Algorithm::EdDsa);
    for method in [Method::GET, Method::POST] {
        let answer = call(&f.state, method, "/health", "").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "ok");
    }
    // Liveness does not depend on the store.
    f.store.down.store(true, Ordering::SeqCst);
    assert_eq!(call(&f.state, Method::GET, "/health", "").await.status, StatusCode::OK);
}

#[tokio::test]
async fn signing_failure_is_500() {
    use axum::response::IntoResponse as _;
    let response = ApiError::Signing("aws-lc refused".into()).into_response();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"Failed to generate token\n");
}

/// The value of one series in the text format, or 0 if absent.
/// The value of a series; a series that is not there fails the test (a
/// renamed metric must not read as 0).
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
        .unwrap_or_else(|| panic!("no series {name_and_labels}"))
}

#[tokio::test]
async fn metrics_count_exactly() {
    let f = fixture(Algorithm::EdDsa);
    let mut wrong_secret = f.active.clone();
    wrong_secret.push('x');
    for _ in 0..3 {
        assert_eq!(
            exchange(&f.state, "/v0/token/integration", &f.active).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        exchange(&f.state, "/v0/token/integration", &wrong_secret).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        exchange(&f.state, "/v0/token/integration", "malformed").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        exchange(&f.state, "/v0/token/integration", &f.tiered).await.status,
        StatusCode::OK
    );
    assert_eq!(
        exchange(&f.state, "/v0/token/autojoin", &f.autojoin).await.status,
        StatusCode::OK
    );
    assert_eq!(
        exchange(&f.state, "/v0/token/autojoin", "unknown").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&f.state, Method::GET, "/v0/token/integration", "").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    for _ in 0..2 {
        call(&f.state, Method::GET, "/.well-known/jwks.json", "").await;
    }
    call(&f.state, Method::GET, "/health", "").await;
    f.store.down.store(true, Ordering::SeqCst);
    let down = exchange(&f.state, "/v0/token/integration", &f.active).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);

    let text = f.state.metrics.render();
    let m = |s: &str| series(&text, s);
    assert_eq!(
        m(r#"tokenexchange_integration_requests_total{code="200",method="post"}"#),
        4.0
    );
    assert_eq!(
        m(r#"tokenexchange_integration_requests_total{code="401",method="post"}"#),
        2.0
    );
    // Go's router answers the 405 before its instrumented handler; our own
    // series counts it.
    assert!(!text.contains(r#"tokenexchange_integration_requests_total{code="405""#));
    assert_eq!(
        m(r#"tokenexchange_http_requests_total{code="405",method="get",route="/v0/token/integration"}"#),
        1.0
    );
    assert_eq!(
        m(r#"tokenexchange_http_requests_total{code="200",method="post",route="/v0/token/integration"}"#),
        4.0
    );
    assert_eq!(
        m(r#"tokenexchange_integration_requests_total{code="503",method="post"}"#),
        1.0
    );
    assert_eq!(
        m(r#"tokenexchange_autojoin_requests_total{code="200",method="post"}"#),
        1.0
    );
    assert_eq!(
        m(r#"tokenexchange_autojoin_requests_total{code="401",method="post"}"#),
        1.0
    );
    assert_eq!(
        m(r#"tokenexchange_integration_request_duration_seconds_count{code="200",method="post"}"#),
        4.0
    );
    assert_eq!(
        m(r#"tokenexchange_integration_request_duration_seconds_bucket{code="401",method="post",le="+Inf"}"#),
        2.0
    );
    assert_eq!(
        m(r#"tokenexchange_autojoin_request_duration_seconds_count{code="200",method="post"}"#),
        1.0
    );
    assert_eq!(
        m(r#"tokenexchange_tokens_issued_total{audience="integration",tier="0"}"#),
        3.0
    );
    assert_eq!(
        m(r#"tokenexchange_tokens_issued_total{audience="integration",tier="7"}"#),
        1.0
    );
    assert_eq!(
        m(r#"tokenexchange_tokens_issued_total{audience="autojoin",tier=""}"#),
        1.0
    );
    assert_eq!(m(r#"tokenexchange_integration_tokens_total{int_id="acme"}"#), 3.0);
    assert_eq!(m(r#"tokenexchange_integration_tokens_total{int_id="bigco"}"#), 1.0);
    // The malformed key never reached the store; the wrong secret did.
    assert_eq!(
        m(r#"tokenexchange_store_lookups_total{backend="fake",kind="integration",result="found"}"#),
        5.0
    );
    assert_eq!(
        m(r#"tokenexchange_store_lookups_total{backend="fake",kind="integration",result="not_found"}"#),
        0.0
    );
    assert_eq!(
        m(r#"tokenexchange_store_lookups_total{backend="fake",kind="integration",result="error"}"#),
        1.0
    );
    assert_eq!(
        m(r#"tokenexchange_store_lookups_total{backend="fake",kind="autojoin",result="found"}"#),
        1.0
    );
    assert_eq!(
        m(r#"tokenexchange_store_lookups_total{backend="fake",kind="autojoin",result="not_found"}"#),
        1.0
    );
    assert_eq!(
        m(r#"tokenexchange_store_lookup_duration_seconds_count{backend="fake",kind="integration"}"#),
        6.0
    );
    assert_eq!(m(r#"tokenexchange_signing_duration_seconds_count{alg="EdDSA"}"#), 5.0);
    assert_eq!(m("tokenexchange_jwks_requests_total"), 2.0);
    assert_eq!(f.store.lookups.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn ready_follows_the_store() {
    let f = fixture(Algorithm::EdDsa);
    let windows = ReadinessWindows {
        freshness: Duration::from_millis(500),
        probe_interval: Duration::from_millis(1000),
    };
    let settings = Settings {
        store_timeout: Duration::from_millis(100),
        readiness: windows,
        // Every exchange must reach the store in this test.
        cache: crate::cache::CacheSettings {
            ttl: Duration::ZERO,
            ..Default::default()
        },
        ..Settings::default()
    };
    let state = AppState::new(f.state.keys.load_full(), f.store.clone(), settings);
    let ready = call(&state, Method::GET, "/ready", "").await;
    assert_eq!((ready.status, ready.text()), (StatusCode::OK, "ready\n"));
    assert_eq!(f.store.pings.load(Ordering::SeqCst), 1);
    // A storm of readiness checks makes no further probe while fresh.
    // (Bounds depend on how long the storm took: a loaded machine may be
    // slower than the windows.)
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(call(&state, Method::GET, "/ready", "").await.status, StatusCode::OK);
    }
    if started.elapsed() < windows.freshness {
        assert_eq!(f.store.pings.load(Ordering::SeqCst), 1);
    }
    // Answers on the request path count as fresh answers too.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pings = f.store.pings.load(Ordering::SeqCst);
    assert_eq!(
        exchange(&state, "/v0/token/integration", &f.active).await.status,
        StatusCode::OK
    );
    assert_eq!(call(&state, Method::GET, "/ready", "").await.status, StatusCode::OK);
    assert_eq!(f.store.pings.load(Ordering::SeqCst), pings);

    f.store.down.store(true, Ordering::SeqCst);
    // Still ready while the last answer is fresh...
    assert_eq!(call(&state, Method::GET, "/ready", "").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // ...then not, and failed probes are rate-limited too.
    let pings = f.store.pings.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(
            call(&state, Method::GET, "/ready", "").await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let allowed = 1 + (started.elapsed().as_millis() / windows.probe_interval.as_millis()) as usize;
    let probes = f.store.pings.load(Ordering::SeqCst) - pings;
    assert!(
        (1..=allowed).contains(&probes),
        "{probes} probes, at most {allowed} allowed"
    );
    f.store.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call(&state, Method::GET, "/ready", "").await.status, StatusCode::OK);
    // Liveness never depended on it.
    assert_eq!(call(&state, Method::GET, "/health", "").await.status, StatusCode::OK);
}

#[tokio::test]
async fn request_ids_are_returned() {
    let f = fixture(Algorithm::EdDsa);
    let answer = call(&f.state, Method::GET, "/health", "").await;
    assert_eq!(answer.header("x-request-id").unwrap().len(), 36);
    let request = Request::builder()
        .uri("/nowhere")
        .header(header::HOST, "token-exchange.test")
        .header("x-request-id", "trace-42")
        .body(Body::empty())
        .unwrap();
    let response = api(f.state.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.headers()["x-request-id"], "trace-42");
}

/// Every (path, method, status) the router gives, provoked here, must be in
/// openapi.yaml, and everything openapi.yaml lists must be provoked here
/// (but for the one answer no test can cause, named below).
#[tokio::test]
async fn openapi_describes_exactly_what_the_router_serves() {
    use std::collections::BTreeSet;

    let spec: Value = serde_yaml_ng::from_str(include_str!("../../openapi.yaml")).unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    let paths = spec["paths"].as_object().unwrap();
    let documented_paths: BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    let served_paths: BTreeSet<&str> = observe::ROUTES.iter().copied().collect();
    assert_eq!(documented_paths, served_paths);

    const METHODS: [&str; 8] = ["get", "head", "post", "put", "delete", "patch", "options", "trace"];
    let mut documented = BTreeSet::new();
    for (path, item) in paths {
        let methods: Vec<&str> = METHODS.iter().copied().filter(|m| item.get(*m).is_some()).collect();
        for method in &methods {
            for status in item[*method]["responses"].as_object().unwrap().keys() {
                documented.insert((path.clone(), method.to_string(), status.clone()));
            }
        }
        // Methods not documented get 405 with the documented Allow, unless
        // the path takes any method.
        let allow = item["x-allow"].as_str().unwrap();
        let f = fixture(Algorithm::EdDsa);
        for method in METHODS {
            let answer = call(
                &f.state,
                Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                path,
                "",
            )
            .await;
            if allow == "any" || methods.contains(&method) {
                assert!(
                    ![StatusCode::METHOD_NOT_ALLOWED, StatusCode::NOT_FOUND].contains(&answer.status),
                    "{method} {path}: {}",
                    answer.status
                );
            } else {
                assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                assert_eq!(answer.header("allow"), Some(allow), "{method} {path}");
                let listed: Vec<String> = allow.split(", ").map(str::to_lowercase).collect();
                assert_eq!(listed, methods, "x-allow of {path} lists its operations");
            }
        }
    }

    let mut served = BTreeSet::new();
    let mut see = |path: &str, method: &Method, answer: &Answer| {
        served.insert((
            path.to_owned(),
            method.as_str().to_lowercase(),
            answer.status.as_str().to_owned(),
        ));
    };
    for path in ["/v0/token/integration", "/v0/token/autojoin"] {
        let f = fixture(Algorithm::EdDsa);
        let good = if path.ends_with("autojoin") {
            &f.autojoin
        } else {
            &f.active
        };
        see(path, &Method::POST, &exchange(&f.state, path, good).await);
        see(path, &Method::POST, &exchange(&f.state, path, "made-up").await);
        see(path, &Method::POST, &call(&f.state, Method::POST, path, "[1]").await);
        see(
            path,
            &Method::POST,
            &call(&f.state, Method::POST, path, "x".repeat(MAX_BODY_BYTES + 1)).await,
        );
        // A body that never arrives.
        let mut impatient = f.state.clone();
        impatient.settings.body_read_timeout = Duration::from_millis(50);
        let (_sender, stalled) = http_body_util::channel::Channel::<axum::body::Bytes>::new(1);
        see(
            path,
            &Method::POST,
            &call(&impatient, Method::POST, path, Body::new(stalled)).await,
        );
        // Over a rate limit.
        let limited = limited(&f.state, "*=1/h", Some("1/h"));
        exchange(&limited, path, good).await;
        see(path, &Method::POST, &exchange(&limited, path, good).await);
        f.store.down.store(true, Ordering::SeqCst);
        see(path, &Method::POST, &exchange(&f.state, path, good).await);
    }
    let f = fixture(Algorithm::EdDsa);
    for method in [Method::GET, Method::HEAD] {
        see(
            "/.well-known/jwks.json",
            &method,
            &call(&f.state, method.clone(), "/.well-known/jwks.json", "").await,
        );
        see("/ready", &method, &call(&f.state, method.clone(), "/ready", "").await);
    }
    for method in METHODS {
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        see("/health", &method, &call(&f.state, method.clone(), "/health", "").await);
    }
    // At the limit of requests in flight.
    let all = f.state.in_flight.available_permits() as u32;
    let held = f.state.in_flight.clone().acquire_many_owned(all).await.unwrap();
    for method in [Method::GET, Method::HEAD] {
        see(
            "/.well-known/jwks.json",
            &method,
            &call(&f.state, method.clone(), "/.well-known/jwks.json", "").await,
        );
    }
    drop(held);
    // The store down since start: not ready.
    let f = fixture(Algorithm::EdDsa);
    f.store.down.store(true, Ordering::SeqCst);
    for method in [Method::GET, Method::HEAD] {
        see("/ready", &method, &call(&f.state, method.clone(), "/ready", "").await);
    }

    // Signing with an in-memory key does not fail; the 500 is Go's contract.
    let unprovoked: BTreeSet<(String, String, String)> = ["/v0/token/integration", "/v0/token/autojoin"]
        .iter()
        .map(|p| (p.to_string(), "post".to_owned(), "500".to_owned()))
        .collect();
    let expected: BTreeSet<_> = documented.difference(&unprovoked).cloned().collect();
    assert_eq!(served, expected);
}

/// An integration key expiring at `expires_at` (Unix seconds), in `store`.
fn expiring_key(store: &mut FakeStore, expires_at: u64) -> String {
    let key = IntegrationApiKey::generate("acme", None);
    let expiry = time::OffsetDateTime::from_unix_timestamp(i64::try_from(expires_at).unwrap()).unwrap();
    store.integration.insert(
        ("acme".into(), key.key_id().into()),
        IntegrationKeyRecord {
            key_hash: key.secret().sha256_hex(),
            status: "active".into(),
            tier: 0,
            expires_at: Some(expiry),
        },
    );
    key.to_secret_string().expose().to_owned()
}

#[tokio::test]
async fn an_expired_key_is_refused_and_a_token_never_outlives_its_key() {
    let mut keys = Vec::new();
    // The clock reads NOW + 0.999 s.
    let f = fixture_with(Algorithm::EdDsa, |store| {
        for expiry in [NOW + 10, NOW + 3600, NOW, NOW - 1] {
            keys.push(expiring_key(store, expiry));
        }
    });
    let path = "/v0/token/integration";
    let (_, claims) = token_parts(&exchange(&f.state, path, &keys[0]).await);
    assert_eq!(claims["exp"], NOW + 10, "capped at the key's expiry");
    let (_, claims) = token_parts(&exchange(&f.state, path, &keys[1]).await);
    assert_eq!(claims["exp"], NOW + 20, "the usual lifetime when the key outlives it");
    for expired in &keys[2..] {
        assert_refused(
            &exchange(&f.state, path, expired).await,
            StatusCode::UNAUTHORIZED,
            "Invalid API key\n",
        );
    }
}

/// `state` with rate limits: per key by tier, and per organization.
fn limited(state: &AppState, tiers: &str, autojoin: Option<&str>) -> AppState {
    use crate::rate_limit::{Rate, RateLimitSettings, RateLimits, TierLimits};
    let settings = RateLimitSettings {
        tiers: TierLimits::parse(tiers).unwrap(),
        integration: None,
        autojoin: autojoin.map(|rate| Rate::parse(rate).unwrap()),
    };
    let mut state = state.clone();
    state.rate_limits =
        RateLimits::new(settings, 100).map(|l| Arc::new(l.reporting_to(state.metrics.rate_limiters.clone())));
    state
}

#[tokio::test]
async fn a_key_over_its_tier_limit_gets_429_with_retry_after_and_ratelimit_headers() {
    let f = fixture(Algorithm::EdDsa);
    let state = limited(&f.state, "0=1/m:burst=3,7=unlimited", Some("1/h:burst=1"));
    let path = "/v0/token/integration";
    for _ in 0..3 {
        let answer = exchange(&state, path, &f.active).await;
        token_parts(&answer);
        // Only a refusal carries the headers.
        assert_eq!(answer.header("ratelimit-policy"), None);
        assert_eq!(answer.header("ratelimit"), None);
    }
    let answer = exchange(&state, path, &f.active).await;
    assert_refused(&answer, StatusCode::TOO_MANY_REQUESTS, "Too many requests\n");
    let retry: u64 = answer.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(answer.header("ratelimit-policy"), Some("\"key\";q=3;w=180"));
    assert_eq!(
        answer.header("ratelimit"),
        Some(format!("\"key\";r=0;t={retry}").as_str())
    );
    // An unlimited tier, and the refusal of a bad key, are untouched.
    for _ in 0..10 {
        let answer = exchange(&state, path, &f.tiered).await;
        token_parts(&answer);
        assert_eq!(answer.header("ratelimit"), None);
    }
    assert_refused(
        &exchange(&state, path, &f.revoked).await,
        StatusCode::UNAUTHORIZED,
        "Invalid API key\n",
    );
    assert_refused(
        &exchange(&state, path, "made-up").await,
        StatusCode::UNAUTHORIZED,
        "Invalid API key\n",
    );
    // The organization's own limit.
    token_parts(&exchange(&state, "/v0/token/autojoin", &f.autojoin).await);
    let answer = exchange(&state, "/v0/token/autojoin", &f.autojoin).await;
    assert_refused(&answer, StatusCode::TOO_MANY_REQUESTS, "Too many requests\n");
    assert_eq!(answer.header("ratelimit-policy"), Some("\"organization\";q=1;w=3600"));
    let metrics = state.metrics.render();
    assert!(
        metrics.contains("tokenexchange_rate_limited_total{tier=\"0\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tokenexchange_rate_limited_total{tier=\"autojoin\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tokenexchange_rate_limiters 2"), "{metrics}");
    assert!(
        metrics.contains("tokenexchange_integration_requests_total{code=\"429\",method=\"post\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn refused_keys_take_nothing_from_a_limit() {
    let f = fixture(Algorithm::EdDsa);
    let state = limited(&f.state, "*=1/h:burst=1", None);
    // Refusals (bad keys) never take from a limit, and never make a limiter.
    for _ in 0..5 {
        exchange(&state, "/v0/token/integration", &f.revoked).await;
    }
    assert!(state.rate_limits.as_ref().unwrap().is_empty());
    token_parts(&exchange(&state, "/v0/token/integration", &f.active).await);
    assert_eq!(
        exchange(&state, "/v0/token/integration", &f.active).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn without_limits_there_is_no_limiter_and_no_header() {
    let f = fixture(Algorithm::EdDsa);
    assert!(f.state.rate_limits.is_none());
    for _ in 0..50 {
        let answer = exchange(&f.state, "/v0/token/integration", &f.active).await;
        token_parts(&answer);
        assert_eq!(answer.header("ratelimit"), None);
        assert_eq!(answer.header("ratelimit-policy"), None);
    }
    assert!(!f.state.metrics.render().contains("tokenexchange_rate_limited_total{"));
}

/// RFC 9112 (3.2): HTTP/1.1 without exactly one `Host` is a 400 with Go's
/// text, on every path and before any route or redirect; HTTP/1.0 needs
/// none.
#[tokio::test]
async fn http_1_1_without_exactly_one_host_is_refused() {
    let f = fixture(Algorithm::EdDsa);
    let send = |request: Request<Body>| {
        let state = f.state.clone();
        async move { api(state).oneshot(request).await.unwrap() }
    };
    for (path, hosts) in [
        ("/v0/token/integration", 0),
        ("/health", 0),
        ("//health", 0),
        ("/nowhere", 2),
        ("/health", 2),
    ] {
        let mut request = Request::builder().method(Method::POST).uri(path);
        for i in 0..hosts {
            request = request.header(header::HOST, format!("h{i}.test"));
        }
        let response = send(
            request
                .body(Body::from(json!({ "api_key": f.active }).to_string()))
                .unwrap(),
        )
        .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{path} with {hosts} Host headers"
        );
        assert_eq!(response.headers()["connection"], "close");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"400 Bad Request: missing required Host header");
    }
    let old = Request::builder()
        .uri("/health")
        .version(axum::http::Version::HTTP_10)
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(old).await.status(), StatusCode::OK);
}
