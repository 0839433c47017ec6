//! Router tests: every row of COMPAT.md's "HTTP API" and "Tokens" sections,
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
use crate::signing::{Algorithm, SigningKey};
use crate::store::{AutojoinKeys, IntegrationKeyRecord, IntegrationKeys, StoreError};

/// In-memory keys, with a switch that makes every lookup fail.
#[derive(Default)]
struct FakeStore {
    integration: HashMap<(String, String), IntegrationKeyRecord>,
    autojoin: HashMap<String, String>,
    down: AtomicBool,
    lookups: AtomicUsize,
}

#[async_trait]
impl IntegrationKeys for FakeStore {
    async fn integration_key(
        &self,
        int: &str,
        key: &str,
    ) -> Result<Option<IntegrationKeyRecord>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        Ok(self
            .integration
            .get(&(int.to_owned(), key.to_owned()))
            .cloned())
    }
}

#[async_trait]
impl AutojoinKeys for FakeStore {
    async fn autojoin_org(&self, key: &AutojoinApiKey) -> Result<Option<String>, StoreError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("timeout".into()));
        }
        Ok(self.autojoin.get(key.secret().expose()).cloned())
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
    let mut store = FakeStore::default();
    let mut add = |int: &str, status: &str, tier: i64| {
        let key = IntegrationApiKey::generate(int, None);
        store.integration.insert(
            (int.into(), key.key_id().into()),
            IntegrationKeyRecord {
                key_hash: key.secret().sha256_hex(),
                status: status.into(),
                tier,
            },
        );
        key.to_secret_string().expose().to_owned()
    };
    let active = add("acme", "active", 0);
    let revoked = add("acme", "revoked", 0);
    let tiered = add("bigco", "active", 7);
    let autojoin = AutojoinApiKey::generate().secret().expose().to_owned();
    store.autojoin.insert(autojoin.clone(), "mlab-org".into());
    let store = Arc::new(store);
    let (key, _) = SigningKey::generate(alg, None).unwrap();
    let mut state = AppState::new(
        Arc::new(KeySet::new(key)),
        Validator::new(store.clone(), store.clone()),
    );
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
        .body(body.into())
        .unwrap();
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

async fn exchange(state: &AppState, path: &str, key: &str) -> Answer {
    call(
        state,
        Method::POST,
        path,
        json!({ "api_key": key }).to_string(),
    )
    .await
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
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
}

#[tokio::test]
async fn integration_token_has_the_exact_header_and_claims() {
    for alg in [Algorithm::Rs256, Algorithm::Es256, Algorithm::EdDsa] {
        let f = fixture(alg);
        let (header, claims) =
            token_parts(&exchange(&f.state, "/v0/token/integration", &f.active).await);
        assert_eq!(
            header,
            json!({"alg": alg.as_str(), "kid": f.state.keys.active().kid()})
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
    let (header, claims) =
        token_parts(&exchange(&f.state, "/v0/token/autojoin", &f.autojoin).await);
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
        (
            "unknown integration",
            f.active.replacen("cii_acme", "cii_other", 1),
        ),
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
    for body in [
        "",
        "{",
        "[]",
        r#"{"api_key":123}"#,
        r#"{"api_key":["k"]}"#,
        "\"key\"",
    ] {
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
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(json!({ "api_key": f.active }).to_string()))
        .unwrap();
    let response = router(f.state.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let f = fixture(Algorithm::EdDsa);
    let padded = format!(
        r#"{{"api_key":"{}","pad":"{}"}}"#,
        f.active,
        " ".repeat(MAX_BODY_BYTES)
    );
    let answer = call(&f.state, Method::POST, "/v0/token/integration", padded).await;
    assert_refused(
        &answer,
        StatusCode::PAYLOAD_TOO_LARGE,
        "Request body too large\n",
    );
    // Just under the limit is read.
    let body = json!({ "api_key": f.active }).to_string();
    let fitting = format!("{body}{}", " ".repeat(MAX_BODY_BYTES - body.len()));
    let answer = call(&f.state, Method::POST, "/v0/token/integration", fitting).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn wrong_methods_are_405() {
    let f = fixture(Algorithm::EdDsa);
    for (method, path) in [
        (Method::GET, "/v0/token/autojoin"),
        (Method::GET, "/v0/token/integration"),
        (Method::PUT, "/v0/token/integration"),
        (Method::DELETE, "/v0/token/autojoin"),
        (Method::POST, "/.well-known/jwks.json"),
        (Method::DELETE, "/.well-known/jwks.json"),
    ] {
        let answer = call(&f.state, method.clone(), path, "").await;
        assert_refused(
            &answer,
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed\n",
        );
        assert!(answer.header("allow").is_some(), "{method} {path}");
    }
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
        exchange(&f.state, "/v0/token/integration", &f.active)
            .await
            .status,
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
        assert_eq!(key["kid"], f.state.keys.active().kid());
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
    assert_eq!(
        call(&f.state, Method::GET, "/health", "").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn signing_failure_is_500() {
    use axum::response::IntoResponse as _;
    let response = ApiError::Signing("aws-lc refused".into()).into_response();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"Failed to generate token\n");
}
