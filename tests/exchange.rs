//! End to end: keys made with the CLI on a SQLite file, the server on a real
//! socket, and every token checked by an independent verifier (the
//! `jsonwebtoken` crate) using the JWKS fetched from the server.

mod support;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::{Value, json};
use support::{Workspace, spawn_app};

fn verify(token: &str, jwks: &jsonwebtoken::jwk::JwkSet, alg: Algorithm, audience: &str) -> Value {
    let header = decode_header(token).unwrap();
    assert_eq!(header.alg, alg);
    assert_eq!(header.typ, None, "no typ in the header");
    let kid = header.kid.expect("kid in the header");
    let jwk = jwks.find(&kid).expect("token kid is in the JWKS");
    let mut validation = Validation::new(alg);
    validation.set_audience(&[audience]);
    validation.set_issuer(&["token-exchange"]);
    validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud"]);
    validation.validate_nbf = true;
    decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
        .expect("token verifies")
        .claims
}

/// The raw header of a token, to check its exact members.
fn raw_header(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').next().unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

async fn exchange_and_verify(alg_name: &str, alg: Algorithm) {
    let ws = Workspace::new(alg_name);
    let integration_key = ws.integration_key("acme", &["--tier", "2", "--key-description", "test"]);
    let autojoin_key = ws.autojoin_key("mlab-test");
    let app = spawn_app(&ws).await;
    let jwks = app.jwks().await;

    let token = app.token("integration", &integration_key).await;
    let header = raw_header(&token);
    assert_eq!(header.as_object().unwrap().len(), 2, "{header}");
    assert_eq!(header["alg"], alg_name);
    let claims = verify(&token, &jwks, alg, "integration");
    let key_id = integration_key.split('.').nth(2).unwrap();
    assert_eq!(claims["aud"], json!("integration"), "aud is a plain string");
    assert_eq!(claims["int_id"], "acme");
    assert_eq!(claims["key_id"], key_id);
    assert_eq!(claims["tier"], 2);
    assert_eq!(claims["iat"], claims["nbf"]);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        20
    );
    let mut names: Vec<&str> = claims
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "aud", "exp", "iat", "int_id", "iss", "jti", "key_id", "nbf", "tier"
        ]
    );

    let token = app.token("autojoin", &autojoin_key).await;
    let claims = verify(&token, &jwks, alg, "autojoin");
    assert_eq!(claims["aud"], json!("autojoin"));
    assert_eq!(claims["org"], "mlab-test");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
    let mut names: Vec<&str> = claims
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["aud", "exp", "iat", "iss", "jti", "nbf", "org"]);

    // A token for one audience is refused by a verifier of the other.
    let mut validation = Validation::new(alg);
    validation.set_audience(&["integration"]);
    let jwk = jwks
        .find(&decode_header(&token).unwrap().kid.unwrap())
        .unwrap();
    assert!(decode::<Value>(&token, &DecodingKey::from_jwk(jwk).unwrap(), &validation).is_err());

    // Keys of the wrong kind or with a changed secret get the 401.
    let mut tampered = integration_key.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'x' { 'y' } else { 'x' });
    for (route, key) in [
        ("integration", &tampered),
        ("integration", &autojoin_key),
        ("autojoin", &integration_key),
    ] {
        let response = app.exchange(route, key).await;
        assert_eq!(response.status(), 401, "{route}");
        assert_eq!(response.text().await.unwrap(), "Invalid API key\n");
    }
}

#[tokio::test]
async fn rs256_tokens_verify_independently() {
    exchange_and_verify("RS256", Algorithm::RS256).await;
}

#[tokio::test]
async fn es256_tokens_verify_independently() {
    exchange_and_verify("ES256", Algorithm::ES256).await;
}

#[tokio::test]
async fn eddsa_tokens_verify_independently() {
    exchange_and_verify("EdDSA", Algorithm::EdDSA).await;
}

#[tokio::test]
async fn a_key_created_while_the_server_runs_works_at_once() {
    let ws = Workspace::new("EdDSA");
    let app = spawn_app(&ws).await;
    let key = ws.integration_key("late", &[]);
    assert_eq!(app.exchange("integration", &key).await.status(), 200);
}

#[tokio::test]
async fn jwks_over_the_wire() {
    let ws = Workspace::new("RS256");
    let app = spawn_app(&ws).await;
    let response = app
        .client
        .get(format!("{}/.well-known/jwks.json", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        headers["cache-control"],
        "public, max-age=3600, must-revalidate"
    );
    assert_eq!(headers["access-control-allow-origin"], "*");
    let body: Value = response.json().await.unwrap();
    let private: Value = serde_json::from_slice(&std::fs::read(&ws.key_path).unwrap()).unwrap();
    let key = &body["keys"][0];
    assert_eq!(key["kid"], private["kid"]);
    assert_eq!(key["n"], private["n"]);
    assert_eq!(key["e"], private["e"]);
    assert_eq!(key["use"], "sig");
    assert!(key.get("d").is_none() && key.get("p").is_none() && key.get("qi").is_none());

    let health = app
        .client
        .get(format!("{}/health", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    use std::sync::Arc;
    use token_exchange::app::Application;
    use token_exchange::http::AppState;
    use token_exchange::signing::{KeySet, SigningKey};
    use token_exchange::validate::Validator;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("acme", &[]);
    let store = token_exchange::store::open(&ws.store).await.unwrap();
    let state = AppState::new(
        Arc::new(KeySet::new(SigningKey::load(&ws.key_path).unwrap())),
        Validator::new(store.clone(), store),
    );
    let app = Application::build("127.0.0.1:0".parse().unwrap(), state)
        .await
        .unwrap();
    let addr = app.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stop_rx.await;
    }));

    // A request whose body is only half sent when the stop comes.
    let body = format!(r#"{{"api_key":"{key}"}}"#);
    let (first, rest) = body.split_at(10);
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v0/token/integration HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    stop_tx.send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // New connections are refused once stopping...
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    // ...while the one in flight completes.
    conn.write_all(rest.as_bytes()).await.unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let result = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    result.expect("server stopped").unwrap().unwrap();
}
