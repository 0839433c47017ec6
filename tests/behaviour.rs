//! The behaviour suite: what a caller observes, run unchanged against every
//! store backend. Keys are made with the real CLI or written directly into
//! the store the way other programs write them; the server runs on a real
//! socket; every token is checked by an independent verifier (the
//! `jsonwebtoken` crate) with the JWKS fetched from the server.

mod support;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::{Value, json};
use support::{Backend, Workspace, command, series, spawn_app};

/// Runs each listed test once per backend, in a module named after it.
macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Sqlite).await
            })*
        }
        mod datastore {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Datastore).await
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Backend::Postgres).await
            })*
        }
    };
}

for_each_backend!(
    rs256_tokens_verify_independently,
    es256_tokens_verify_independently,
    eddsa_tokens_verify_independently,
    keys_created_while_the_server_runs_work_at_once,
    keys_written_by_other_programs,
    organizations_written_by_other_programs,
    admin_refusals_change_nothing,
    jwks_over_the_wire,
    metrics_over_the_wire,
    logs_never_contain_keys_tokens_or_private_keys,
    a_hot_key_costs_one_lookup_per_ttl,
    revocation_takes_effect_within_the_ttl_and_not_before,
    made_up_secrets_never_displace_the_real_key,
    concurrent_requests_for_an_uncached_key_share_one_lookup,
    store_outages_serve_recent_keys_then_503_and_recover,
    the_key_lifecycle_from_the_cli,
    the_autojoin_lifecycle_from_the_cli,
    revocation_reaches_every_replica_within_seconds,
    a_change_feed_cut_off_by_an_outage_recovers_and_flushes,
    keys_expire_and_tokens_never_outlive_them,
    usage_is_written_off_the_request_path_and_finds_unused_keys,
    the_audit_log_records_each_change_and_no_secret,
    concurrent_admin_writes_on_one_key_lose_nothing,
    a_burst_of_changes_is_followed_to_its_end,
    changes_from_admin_clocks_far_off_are_followed,
    a_store_restored_from_an_older_copy_flushes_the_cache,
    a_nul_in_a_made_up_key_is_an_unknown_key,
    the_change_feed_in_process_reads_every_change_once_and_owns_up_to_gaps,
);

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
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn claim_names(claims: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = claims.as_object().unwrap().keys().map(String::as_str).collect();
    names.sort_unstable();
    names
}

async fn exchange_and_verify(backend: Backend, alg_name: &str, alg: Algorithm) {
    let Some(ws) = Workspace::with_backend(backend, alg_name) else {
        return;
    };
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
    assert_eq!(claims["iss"], "token-exchange");
    assert_eq!(claims["int_id"], "acme");
    assert_eq!(claims["key_id"], key_id);
    assert_eq!(claims["tier"], 2);
    assert_eq!(claims["iat"], claims["nbf"]);
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 20);
    assert_eq!(
        claim_names(&claims),
        ["aud", "exp", "iat", "int_id", "iss", "jti", "key_id", "nbf", "tier"]
    );

    let token = app.token("autojoin", &autojoin_key).await;
    let claims = verify(&token, &jwks, alg, "autojoin");
    assert_eq!(claims["aud"], json!("autojoin"));
    assert_eq!(claims["org"], "mlab-test");
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 3600);
    assert_eq!(claim_names(&claims), ["aud", "exp", "iat", "iss", "jti", "nbf", "org"]);

    // A token for one audience is refused by a verifier of the other.
    let mut validation = Validation::new(alg);
    validation.set_audience(&["integration"]);
    let jwk = jwks.find(&decode_header(&token).unwrap().kid.unwrap()).unwrap();
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

async fn rs256_tokens_verify_independently(backend: Backend) {
    exchange_and_verify(backend, "RS256", Algorithm::RS256).await;
}

async fn es256_tokens_verify_independently(backend: Backend) {
    exchange_and_verify(backend, "ES256", Algorithm::ES256).await;
}

async fn eddsa_tokens_verify_independently(backend: Backend) {
    exchange_and_verify(backend, "EdDSA", Algorithm::EdDSA).await;
}

async fn keys_created_while_the_server_runs_work_at_once(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let app = spawn_app(&ws).await;
    let first = ws.integration_key("late", &[]);
    assert_eq!(app.status("integration", &first).await, 200);
    // A second key of the same integration: both work.
    let second = ws.integration_key("late", &["--key-id", "ki_second"]);
    assert_eq!(app.status("integration", &second).await, 200);
    assert_eq!(app.status("integration", &first).await, 200);
    let org_key = ws.autojoin_key("late-org");
    assert_eq!(app.status("autojoin", &org_key).await, 200);
}

async fn keys_written_by_other_programs(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let seed = ws.seeder();
    let tier2 = seed
        .integration_key("seeded", "ki_tier2", "secret-tier2", "active", Some(2))
        .await;
    let untiered = seed
        .integration_key("seeded", "ki_untiered", "secret-untiered", "active", None)
        .await;
    let revoked = seed
        .integration_key("seeded", "ki_revoked", "secret-revoked", "revoked", Some(0))
        .await;
    let inactive = seed
        .integration_key("seeded", "ki_inactive", "secret-inactive", "inactive", Some(0))
        .await;
    let blank = seed
        .integration_key("seeded", "ki_blank", "secret-blank", "", Some(0))
        .await;
    let upper = seed
        .integration_key("seeded", "ki_upper", "secret-upper", "ACTIVE", Some(0))
        .await;
    let app = spawn_app(&ws).await;
    let jwks = app.jwks().await;

    let claims = verify(
        &app.token("integration", &tier2).await,
        &jwks,
        Algorithm::EdDSA,
        "integration",
    );
    assert_eq!(
        (claims["int_id"].as_str(), claims["key_id"].as_str()),
        (Some("seeded"), Some("ki_tier2"))
    );
    assert_eq!(claims["tier"], 2);
    let claims = verify(
        &app.token("integration", &untiered).await,
        &jwks,
        Algorithm::EdDSA,
        "integration",
    );
    assert_eq!(claims["tier"], 0, "a key without a tier gets the default tier");

    for (what, key) in [
        ("revoked", revoked),
        ("inactive", inactive),
        ("empty status", blank),
        ("status in upper case", upper),
        ("wrong secret", tier2.replace("secret-tier2", "secret-tier3")),
        ("unknown key ID", tier2.replace("ki_tier2", "ki_nothere")),
        ("unknown integration", tier2.replace("cii_seeded", "cii_nothere")),
    ] {
        let response = app.exchange("integration", &key).await;
        assert_eq!(response.status(), 401, "{what}");
        assert_eq!(response.text().await.unwrap(), "Invalid API key\n", "{what}");
    }
}

async fn organizations_written_by_other_programs(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "RS256") else {
        return;
    };
    let seed = ws.seeder();
    seed.org("legacy-org", None).await;
    seed.org("current-org", Some(1.0)).await;
    seed.autojoin_key("legacy-org", "legacy-org-key-0123456789abcdefghijklmnopq")
        .await;
    seed.autojoin_key("current-org", "current-org-key-0123456789abcdefghijklmnop")
        .await;
    let app = spawn_app(&ws).await;
    let jwks = app.jwks().await;
    for (org, key) in [
        ("legacy-org", "legacy-org-key-0123456789abcdefghijklmnopq"),
        ("current-org", "current-org-key-0123456789abcdefghijklmnop"),
    ] {
        let claims = verify(&app.token("autojoin", key).await, &jwks, Algorithm::RS256, "autojoin");
        assert_eq!(claims["org"], org);
    }
    // A key of the CLI's making for a seeded organization works too.
    let v = ws.admin_json(&["autojoin", "create-key", "--org", "legacy-org"]);
    assert_eq!(app.status("autojoin", v["api_key"].as_str().unwrap()).await, 200);
    assert_eq!(app.status("autojoin", "not-a-known-key").await, 401);
}

async fn admin_refusals_change_nothing(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let original = ws.integration_key("acme", &["--key-id", "ki_fixed"]);
    let out = ws.admin(&[
        "integration",
        "create",
        "--integration-id",
        "acme",
        "--key-id",
        "ki_fixed",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert!(out.stdout.is_empty(), "no key is printed when nothing was created");

    let out = ws.admin(&["autojoin", "create-key", "--org", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    ws.autojoin_key("org-once");
    let out = ws.admin(&[
        "autojoin",
        "create-org",
        "--org",
        "org-once",
        "--email",
        "b@example.org",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    // The refused duplicate did not replace the original key.
    let app = spawn_app(&ws).await;
    assert_eq!(app.status("integration", &original).await, 200);
}

async fn jwks_over_the_wire(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "RS256") else {
        return;
    };
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
    assert_eq!(headers["cache-control"], "public, max-age=3600, must-revalidate");
    assert_eq!(headers["access-control-allow-origin"], "*");
    let body: Value = response.json().await.unwrap();
    let private: Value = serde_json::from_slice(&std::fs::read(&ws.key_path).unwrap()).unwrap();
    let key = &body["keys"][0];
    assert_eq!(key["kid"], private["kid"]);
    assert_eq!(key["n"], private["n"]);
    assert_eq!(key["e"], private["e"]);
    assert_eq!(key["use"], "sig");
    assert!(key.get("d").is_none() && key.get("p").is_none() && key.get("qi").is_none());

    let health = app.client.get(format!("{}/health", app.base)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");
}

/// Series Go's metrics port has that dashboards read: the build's commit,
/// and CPU time fine enough for a `rate()` over a minute (the process
/// collector's own counter moved in whole seconds, so a server that used
/// less than one showed 0).
#[tokio::test]
async fn the_build_commit_and_fine_grained_cpu_time_are_reported() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("cpu", &[]);
    let replica = support::Replica::start(&ws, &ws.store_flags, &[], &[]);
    for _ in 0..20 {
        assert_eq!(replica.status("integration", &key).await, 200);
    }
    let text = replica.scrape().await;
    let cpu = series(&text, "process_cpu_seconds_total");
    assert!(cpu > 0.0 && cpu < 60.0, "{cpu}");
    let commit = text
        .lines()
        .find(|l| l.starts_with("git_short_commit{commit=\""))
        .unwrap_or_else(|| panic!("no git_short_commit in {text}"));
    let (label, value) = commit.rsplit_once(' ').unwrap();
    let label = label
        .trim_start_matches("git_short_commit{commit=\"")
        .trim_end_matches("\"}");
    let expected = u64::from_str_radix(label, 16).map_or(0.0, |n| n as f64);
    assert_eq!(value.parse::<f64>().unwrap(), expected, "{commit}");
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    use std::sync::Arc;
    use token_exchange::app::Application;
    use token_exchange::http::AppState;
    use token_exchange::signing::{KeySet, SigningKey};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("acme", &[]);
    let store = token_exchange::store::open(&ws.store_args).await.unwrap();
    let state = AppState::new(
        Arc::new(KeySet::new(SigningKey::load(&ws.key_path).unwrap())),
        store,
        support::settings(&ws),
    );
    let loopback = "127.0.0.1:0".parse().unwrap();
    let app = Application::build(loopback, loopback, state).await.unwrap();
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
    // New connections are refused once stopping (within 5 s: on a loaded
    // machine the server task may take a while to see the stop)...
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting 5 s after the stop"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // ...while the one in flight completes.
    conn.write_all(rest.as_bytes()).await.unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let result = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    result.expect("server stopped").unwrap().unwrap();
}

async fn metrics_over_the_wire(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let good = ws.integration_key("metered", &["--tier", "1"]);
    let org_key = ws.autojoin_key("metered-org");
    let app = spawn_app(&ws).await;
    for _ in 0..3 {
        assert_eq!(app.status("integration", &good).await, 200);
    }
    assert_eq!(app.status("integration", &format!("{good}x")).await, 401);
    assert_eq!(app.status("integration", "not even a key").await, 401);
    assert_eq!(app.status("autojoin", &org_key).await, 200);
    assert_eq!(app.status("autojoin", "unknown-key").await, 401);
    app.jwks().await;

    let response = app.client.get(&app.metrics).send().await.unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    let m = |s: &str| series(&text, s);
    let name = backend.label();
    assert_eq!(
        m(r#"tokenexchange_integration_requests_total{code="200",method="post"}"#),
        3.0
    );
    assert_eq!(
        m(r#"tokenexchange_integration_requests_total{code="401",method="post"}"#),
        2.0
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
        m(r#"tokenexchange_tokens_issued_total{audience="integration",tier="1"}"#),
        3.0
    );
    assert_eq!(m(r#"tokenexchange_integration_tokens_total{int_id="metered"}"#), 3.0);
    let lookups = |kind: &str, result: &str| {
        m(&format!(
            r#"tokenexchange_store_lookups_total{{backend="{name}",kind="{kind}",result="{result}"}}"#
        ))
    };
    // The good key once (then cached), the wrong secret once.
    assert_eq!(lookups("integration", "found"), 2.0);
    assert_eq!(lookups("autojoin", "found"), 1.0);
    assert_eq!(lookups("autojoin", "not_found"), 1.0);
    assert_eq!(m(r#"tokenexchange_signing_duration_seconds_count{alg="EdDSA"}"#), 4.0);
    assert_eq!(m("tokenexchange_jwks_requests_total"), 1.0);
    assert!(m("process_resident_memory_bytes") > 0.0);
    assert_eq!(app.get_status("/ready").await, 200);
}

/// Keys, secrets, tokens and private key members must not reach the log at
/// any level, whatever the request does with them.
async fn logs_never_contain_keys_tokens_or_private_keys(backend: Backend) {
    use support::process::{signal, start_server, wait_exit};

    let Some(ws) = Workspace::with_backend(backend, "ES256") else {
        return;
    };
    let mut cli_logs = Vec::new();
    let mut admin = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--json", "--log-level", "trace"]);
        all.extend(ws.store_flags.iter().map(String::as_str));
        let out = command().args(&all).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        cli_logs.push(String::from_utf8_lossy(&out.stderr).into_owned());
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let real = admin(&["integration", "create", "--integration-id", "quiet"])["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    admin(&[
        "autojoin",
        "create-org",
        "--org",
        "quiet-org",
        "--email",
        "q@example.org",
    ]);
    let real_org = admin(&["autojoin", "create-key", "--org", "quiet-org"])["api_key"]
        .as_str()
        .unwrap()
        .to_owned();

    let secret = real.rsplit('.').next().unwrap().to_owned();
    let wrong_secret = format!("{}.WRONGsecretWRONGsecretWRONGsecret", real.rsplit_once('.').unwrap().0);
    let unknown = "mlabk.cii_quiet.ki_ffffffffffffffff.UNKNOWNsecretUNKNOWNsecret".to_owned();
    let fake_org = "FAKEautojoinKEYfakeAUTOJOINkey0123456789ab".to_owned();
    let presented = [
        real.clone(),
        real_org.clone(),
        wrong_secret.clone(),
        unknown.clone(),
        fake_org.clone(),
    ];

    let (mut child, addr, stderr) = start_server(
        command()
            .args(["serve", "--port", "0", "--metrics-port", "0", "--log-level", "trace"])
            .args(["--private-key-path", ws.key_path.to_str().unwrap()])
            .args(&ws.store_flags),
    );
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://{addr}{path}");
    let mut tokens = Vec::new();
    for key in &presented {
        for route in ["/v0/token/integration", "/v0/token/autojoin"] {
            let bodies = [
                json!({ "api_key": key }).to_string(),
                format!(r#"{{"api_key":"{key}","api_key":"{key}"}}"#),
                json!({ "api_key": [key] }).to_string(),
                json!({ "wrong": key }).to_string(),
                // A JSON string, not an object: serde_json would quote it.
                json!(key).to_string(),
                json!({ "api_key": { "nested": key } }).to_string(),
                key.clone(),
                format!(r#"{{"api_key":"{key}""#),
            ];
            for body in bodies {
                let response = client.post(url(route)).body(body).send().await.unwrap();
                if response.status() == 200 {
                    let v: Value = response.json().await.unwrap();
                    tokens.push(v["token"].as_str().unwrap().to_owned());
                }
            }
            client
                .get(url(route))
                .body(json!({ "api_key": key }).to_string())
                .send()
                .await
                .unwrap();
        }
        client.get(url(&format!("/v0/token/{key}"))).send().await.unwrap();
        client.get(url(&format!("/health?api_key={key}"))).send().await.unwrap();
    }
    for path in ["/.well-known/jwks.json", "/health", "/ready"] {
        assert!(
            client.get(url(path)).send().await.unwrap().status().is_success(),
            "{path}"
        );
    }
    assert_eq!(tokens.len(), 2, "the two real keys each got a token");

    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    let mut log: Vec<String> = cli_logs;
    while let Ok(line) = stderr.recv_timeout(std::time::Duration::from_secs(5)) {
        log.push(line);
    }
    let text = log.join("\n");
    // Nothing we use logs at trace; debug lines show the filter let everything through.
    assert!(
        text.contains("\"level\":\"DEBUG\"") || text.contains("DEBUG"),
        "the log has debug lines"
    );
    assert!(
        text.contains("\"status\":401") && text.contains("\"status\":200"),
        "access lines are there"
    );

    let private: Value = serde_json::from_slice(&std::fs::read(&ws.key_path).unwrap()).unwrap();
    let mut forbidden: Vec<String> = presented.to_vec();
    forbidden.push(secret);
    forbidden.push("WRONGsecretWRONGsecretWRONGsecret".into());
    forbidden.push(private["d"].as_str().unwrap().to_owned());
    for token in &tokens {
        forbidden.push(token.clone());
        // The signature alone identifies a token too.
        forbidden.push(token.rsplit('.').next().unwrap().to_owned());
    }
    for needle in &forbidden {
        if let Some(line) = log.iter().find(|l| l.contains(needle.as_str())) {
            panic!("the log contains a secret ({} bytes): {line}", needle.len());
        }
    }
}

use std::sync::Arc;
use std::time::Duration;

use token_exchange::cache::{DEFAULT_STALE_IF_ERROR, DEFAULT_TTL};
use token_exchange::ground::ManualClock;

/// The server with its cache on a clock the test moves.
async fn app_with_clock(ws: &Workspace) -> (support::TestApp, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let store = token_exchange::store::open(&ws.store_args).await.unwrap();
    let app = support::spawn_app_full(store, ws, support::settings_with_clock(ws, clock.clone())).await;
    (app, clock)
}

fn lookups(text: &str, backend: Backend, kind: &str) -> f64 {
    let name = backend.label();
    ["found", "not_found", "error"]
        .iter()
        .map(|r| {
            series(
                text,
                &format!(r#"tokenexchange_store_lookups_total{{backend="{name}",kind="{kind}",result="{r}"}}"#),
            )
        })
        .sum()
}

async fn a_hot_key_costs_one_lookup_per_ttl(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let key = ws.integration_key("hot", &[]);
    let org_key = ws.autojoin_key("hot-org");
    let (app, clock) = app_with_clock(&ws).await;
    for _ in 0..1000 {
        assert_eq!(app.status("integration", &key).await, 200);
    }
    for _ in 0..100 {
        assert_eq!(app.status("autojoin", &org_key).await, 200);
    }
    let text = app.scrape().await;
    assert_eq!(lookups(&text, backend, "integration"), 1.0);
    assert_eq!(lookups(&text, backend, "autojoin"), 1.0);
    assert_eq!(series(&text, r#"tokenexchange_key_cache_total{result="hit"}"#), 1098.0);
    assert_eq!(series(&text, r#"tokenexchange_key_cache_total{result="miss"}"#), 2.0);

    clock.advance(DEFAULT_TTL);
    for _ in 0..10 {
        assert_eq!(app.status("integration", &key).await, 200);
    }
    assert_eq!(lookups(&app.scrape().await, backend, "integration"), 2.0);
}

async fn revocation_takes_effect_within_the_ttl_and_not_before(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let seed = ws.seeder();
    let key = seed
        .integration_key("revoke", "ki_doomed", "doomed-secret", "active", Some(0))
        .await;
    let (app, clock) = app_with_clock(&ws).await;
    assert_eq!(app.status("integration", &key).await, 200);

    seed.set_status("revoke", "ki_doomed", "doomed-secret", "revoked").await;
    clock.advance(DEFAULT_TTL - Duration::from_secs(1));
    assert_eq!(
        app.status("integration", &key).await,
        200,
        "still cached before the TTL"
    );
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        app.status("integration", &key).await,
        401,
        "refused once the TTL has passed"
    );
    // And not revived by the store failing later: a revoked key has no
    // valid entry left to serve stale.
    clock.advance(Duration::from_secs(60));
    assert_eq!(app.status("integration", &key).await, 401);

    // A new key works at once.
    let fresh = ws.integration_key("revoke", &[]);
    assert_eq!(app.status("integration", &fresh).await, 200);
}

async fn made_up_secrets_never_displace_the_real_key(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let real = ws.integration_key("flood", &["--key-id", "ki_target"]);
    let (app, _clock) = app_with_clock(&ws).await;
    assert_eq!(app.status("integration", &real).await, 200);
    let prefix = real.rsplit_once('.').unwrap().0;
    for i in 0..1000 {
        let fake = format!("{prefix}.madeUpSecret{i:04}");
        assert_eq!(app.status("integration", &fake).await, 401);
    }
    let text = app.scrape().await;
    let before = lookups(&text, backend, "integration");
    assert_eq!(
        app.status("integration", &real).await,
        200,
        "the real key is still valid"
    );
    let text = app.scrape().await;
    assert_eq!(lookups(&text, backend, "integration"), before, "and still cached");
    // Repeating a made-up key is answered from the cache.
    assert_eq!(
        app.status("integration", &format!("{prefix}.madeUpSecret0999")).await,
        401
    );
    assert_eq!(
        series(
            &app.scrape().await,
            r#"tokenexchange_key_cache_total{result="negative_hit"}"#
        ),
        1.0
    );
}

async fn concurrent_requests_for_an_uncached_key_share_one_lookup(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let key = ws.integration_key("crowd", &[]);
    let (app, _clock) = app_with_clock(&ws).await;
    let app = Arc::new(app);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (app, key) = (app.clone(), key.clone());
            tokio::spawn(async move { app.status("integration", &key).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let text = app.scrape().await;
    assert_eq!(lookups(&text, backend, "integration"), 1.0);
    let shared = series(&text, r#"tokenexchange_key_cache_total{result="coalesced"}"#)
        + series(&text, r#"tokenexchange_key_cache_total{result="hit"}"#);
    assert_eq!(shared, 99.0);
}

/// A store outage: the Datastore emulator stopped, or for SQLite another
/// process holding an exclusive lock past the store timeout (file modes do
/// not stop a process running as root).
enum Outage {
    Sqlite {
        path: String,
        locker: Option<sqlx::SqliteConnection>,
    },
    Datastore {
        emulator: support::emulator::Emulator,
        port: u16,
    },
    Postgres(support::postgres::Postgres),
}

impl Outage {
    async fn begin(&mut self) {
        use sqlx::Connection as _;
        match self {
            Outage::Sqlite { path, locker } => {
                let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite:{path}"))
                    .await
                    .unwrap();
                sqlx::query("BEGIN EXCLUSIVE").execute(&mut conn).await.unwrap();
                sqlx::query("UPDATE integrations SET description = 'locked'")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                *locker = Some(conn);
            }
            Outage::Datastore { emulator, .. } => emulator.stop(),
            Outage::Postgres(pg) => pg.stop(),
        }
    }

    async fn end(&mut self) {
        use sqlx::Connection as _;
        match self {
            Outage::Sqlite { locker, .. } => {
                let mut conn = locker.take().unwrap();
                sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
            Outage::Datastore { emulator, port } => {
                *emulator = support::emulator::Emulator::start(*port).await;
            }
            Outage::Postgres(pg) => pg.start_again(),
        }
    }
}

async fn store_outages_serve_recent_keys_then_503_and_recover(backend: Backend) {
    let Some(mut ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    ws.store_args.store_timeout = Duration::from_millis(300);
    let clock = Arc::new(ManualClock::new());
    // Datastore: an emulator of this test's own, to stop and start.
    let (store, seed, mut outage): (Arc<dyn token_exchange::store::Store>, support::seed::Seeder, Outage) =
        match backend {
            Backend::Sqlite => (
                token_exchange::store::open(&ws.store_args).await.unwrap(),
                ws.seeder(),
                Outage::Sqlite {
                    path: ws.store_url().trim_start_matches("sqlite:").to_owned(),
                    locker: None,
                },
            ),
            Backend::Datastore => {
                let port = support::emulator::free_port();
                let emulator = support::emulator::Emulator::start(port).await;
                let host = format!("127.0.0.1:{port}");
                let config = token_exchange::store::DatastoreConfig {
                    project_id: support::TEST_PROJECT.into(),
                    platform_ns: ws.store_args.platform_ns.clone(),
                    client_integration_ns: ws.store_args.client_integration_ns.clone(),
                    own_ns: ws.store_args.own_ns.clone(),
                    timeout: ws.store_args.store_timeout,
                    emulator_host: Some(host.clone()),
                };
                (
                    Arc::new(token_exchange::store::DatastoreStore::new(&config).unwrap()),
                    support::seed::Seeder::for_emulator(&ws, &host),
                    Outage::Datastore { emulator, port },
                )
            }
            Backend::Postgres => {
                // A server of this test's own, to stop and start.
                let pg = support::postgres::Postgres::start();
                ws.store_args.store = Some(pg.url());
                (
                    token_exchange::store::open(&ws.store_args).await.unwrap(),
                    ws.seeder(),
                    Outage::Postgres(pg),
                )
            }
        };
    let recent = seed
        .integration_key("outage", "ki_recent", "recent-secret", "active", Some(1))
        .await;
    let unseen = seed
        .integration_key("outage", "ki_unseen", "unseen-secret", "active", Some(1))
        .await;
    let app = support::spawn_app_full(store, &ws, support::settings_with_clock(&ws, clock.clone())).await;
    assert_eq!(app.status("integration", &recent).await, 200);
    assert_eq!(app.get_status("/ready").await, 200);

    outage.begin().await;
    // Readiness runs on real time: wait out its 300 ms freshness.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(app.get_status("/ready").await, 503, "not ready while the store is out");
    assert_eq!(app.get_status("/health").await, 200, "but alive");

    // Past the TTL, within the stale window: the recent key still works.
    clock.advance(DEFAULT_TTL + Duration::from_secs(1));
    let response = app.exchange("integration", &recent).await;
    assert_eq!(response.status(), 200, "served stale");
    // A key not seen before gets 503, never 401.
    let response = app.exchange("integration", &unseen).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.text().await.unwrap(), "Service unavailable, retry later\n");
    // Past the stale window: 503 for it too.
    clock.advance(DEFAULT_STALE_IF_ERROR);
    assert_eq!(app.status("integration", &recent).await, 503);
    let text = app.scrape().await;
    assert_eq!(series(&text, r#"tokenexchange_key_cache_total{result="stale"}"#), 1.0);
    assert!(lookups(&text, backend, "integration") >= 3.0);

    outage.end().await;
    if backend == Backend::Datastore {
        // The restarted emulator is empty: the data comes back with it.
        seed.integration_key("outage", "ki_recent", "recent-secret", "active", Some(1))
            .await;
        seed.integration_key("outage", "ki_unseen", "unseen-secret", "active", Some(1))
            .await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = app.status("integration", &unseen).await;
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no recovery: still {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.status("integration", &recent).await, 200);
    assert_eq!(app.get_status("/ready").await, 200);
}

/// Runs an admin command that must fail; returns its stderr.
fn admin_fails(ws: &Workspace, args: &[&str]) -> String {
    let out = ws.admin(args);
    assert!(
        !out.status.success(),
        "{args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.stdout.is_empty(),
        "{args:?} printed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn the_key_lifecycle_from_the_cli(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let first = ws.integration_key(
        "life",
        &[
            "--key-id",
            "ki_one",
            "--tier",
            "1",
            "--key-description",
            "first",
            "--integration-description",
            "Life Inc",
        ],
    );
    let second = ws.integration_key("life", &["--key-id", "ki_two"]);
    let (app, clock) = app_with_clock(&ws).await;
    let jwks = app.jwks().await;
    let tier_of = |token: &str| {
        verify(token, &jwks, Algorithm::EdDSA, "integration")["tier"]
            .as_i64()
            .unwrap()
    };

    let list = ws.admin_json(&["integration", "list"]);
    let life = list["integrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["integration_id"] == "life")
        .unwrap();
    assert_eq!(life["description"], "Life Inc");

    let show = ws.admin_json(&["integration", "show", "--integration-id", "life"]);
    let keys = show["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(
        claim_names(&keys[0]),
        [
            "created_at",
            "description",
            "expires_at",
            "key_id",
            "last_used_at",
            "status",
            "tier",
            "tokens_issued"
        ]
    );
    assert_eq!(
        (
            keys[0]["key_id"].as_str(),
            keys[0]["status"].as_str(),
            keys[0]["tier"].as_i64()
        ),
        (Some("ki_one"), Some("active"), Some(1))
    );
    let text = String::from_utf8(ws.admin(&["integration", "show", "--integration-id", "life"]).stdout).unwrap();
    assert!(text.starts_with("KEY") && text.contains("ki_two"), "{text}");
    for secret in [&first, &second] {
        let s = secret.rsplit('.').next().unwrap();
        assert!(!text.contains(s) && !show.to_string().contains(s), "a secret is shown");
    }

    // Tier: the next token (after the cache TTL) carries the new tier.
    assert_eq!(tier_of(&app.token("integration", &first).await), 1);
    ws.admin_json(&[
        "key",
        "set-tier",
        "--integration-id",
        "life",
        "--key-id",
        "ki_one",
        "--tier",
        "3",
    ]);
    clock.advance(DEFAULT_TTL);
    assert_eq!(tier_of(&app.token("integration", &first).await), 3);

    // Revoke, then activate again.
    let v = ws.admin_json(&["key", "revoke", "--integration-id", "life", "--key-id", "ki_one"]);
    assert_eq!(v["status"], "revoked");
    clock.advance(DEFAULT_TTL);
    assert_eq!(app.status("integration", &first).await, 401);
    ws.admin_json(&["key", "activate", "--integration-id", "life", "--key-id", "ki_one"]);
    clock.advance(DEFAULT_TTL);
    assert_eq!(app.status("integration", &first).await, 200);

    // Rotate: a second working key with the same tier and description; the
    // old one keeps working until revoked.
    let rotated = ws.admin_json(&["key", "rotate", "--integration-id", "life", "--key-id", "ki_one"]);
    assert_eq!(rotated["replaces"], "ki_one");
    let new_key = rotated["api_key"].as_str().unwrap();
    let new_id = rotated["key_id"].as_str().unwrap();
    assert_ne!(new_id, "ki_one");
    assert_eq!(tier_of(&app.token("integration", new_key).await), 3);
    assert_eq!(app.status("integration", &first).await, 200);
    let show = ws.admin_json(&["integration", "show", "--integration-id", "life"]);
    let new_info = show["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == new_id)
        .unwrap()
        .clone();
    assert_eq!(
        (new_info["tier"].as_i64(), new_info["description"].as_str()),
        (Some(3), Some("first"))
    );

    // Delete one key.
    ws.admin_json(&["key", "delete", "--integration-id", "life", "--key-id", "ki_two"]);
    clock.advance(DEFAULT_TTL);
    assert_eq!(app.status("integration", &second).await, 401);

    // Anything that does not exist: an error, and nothing changes.
    for args in [
        &["integration", "show", "--integration-id", "nobody"][..],
        &["integration", "delete", "--integration-id", "nobody"],
        &["key", "revoke", "--integration-id", "life", "--key-id", "ki_two"],
        &["key", "activate", "--integration-id", "nobody", "--key-id", "ki_one"],
        &[
            "key",
            "set-tier",
            "--integration-id",
            "life",
            "--key-id",
            "ki_none",
            "--tier",
            "2",
        ],
        &["key", "delete", "--integration-id", "life", "--key-id", "ki_two"],
        &["key", "rotate", "--integration-id", "life", "--key-id", "ki_none"],
    ] {
        assert!(admin_fails(&ws, args).contains("does not exist"), "{args:?}");
    }
    let show = ws.admin_json(&["integration", "show", "--integration-id", "life"]);
    assert_eq!(show["keys"].as_array().unwrap().len(), 2);

    // Delete the integration with its keys.
    let deleted = ws.admin_json(&["integration", "delete", "--integration-id", "life"]);
    assert_eq!(deleted["deleted_keys"], 2);
    clock.advance(DEFAULT_TTL);
    assert_eq!(app.status("integration", new_key).await, 401);
    assert!(admin_fails(&ws, &["integration", "show", "--integration-id", "life"]).contains("does not exist"));
    let list = ws.admin_json(&["integration", "list"]);
    assert!(
        list["integrations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["integration_id"] != "life")
    );
}

async fn the_autojoin_lifecycle_from_the_cli(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let first = ws.autojoin_key("lifeorg");
    let second = ws.admin_json(&["autojoin", "create-key", "--org", "lifeorg"])["api_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (app, clock) = app_with_clock(&ws).await;

    let orgs = ws.admin_json(&["autojoin", "list-orgs"]);
    let org = orgs["organizations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["org"] == "lifeorg")
        .unwrap()
        .clone();
    assert_eq!(
        (org["email"].as_str(), org["probability_multiplier"].as_f64()),
        (Some("ops@example.org"), Some(1.0))
    );

    let listed = ws.admin_json(&["autojoin", "list-keys", "--org", "lifeorg"]);
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let text = listed.to_string()
        + &String::from_utf8(ws.admin(&["autojoin", "list-keys", "--org", "lifeorg"]).stdout).unwrap();
    assert!(!text.contains(&first) && !text.contains(&second), "a key is shown");
    let fingerprint_of = |key: &str| {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
        digest.as_ref()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let fingerprints: Vec<&str> = keys.iter().map(|k| k["fingerprint"].as_str().unwrap()).collect();
    assert!(fingerprints.contains(&fingerprint_of(&first).as_str()));

    assert!(
        admin_fails(
            &ws,
            &["autojoin", "delete-key", "--org", "lifeorg", "--fingerprint", "abc"]
        )
        .contains("fingerprint")
    );
    assert!(
        admin_fails(
            &ws,
            &[
                "autojoin",
                "delete-key",
                "--org",
                "lifeorg",
                "--fingerprint",
                "0000000000ff"
            ]
        )
        .contains("does not exist")
    );
    assert!(
        admin_fails(
            &ws,
            &[
                "autojoin",
                "delete-key",
                "--org",
                "nobody",
                "--fingerprint",
                &fingerprint_of(&first)
            ]
        )
        .contains("does not exist")
    );
    assert_eq!(app.status("autojoin", &first).await, 200);
    ws.admin_json(&[
        "autojoin",
        "delete-key",
        "--org",
        "lifeorg",
        "--fingerprint",
        &fingerprint_of(&first),
    ]);
    clock.advance(DEFAULT_TTL);
    assert_eq!(app.status("autojoin", &first).await, 401);
    assert_eq!(app.status("autojoin", &second).await, 200);

    assert!(admin_fails(&ws, &["autojoin", "delete-org", "--org", "nobody"]).contains("does not exist"));
    let deleted = ws.admin_json(&["autojoin", "delete-org", "--org", "lifeorg"]);
    assert_eq!(deleted["deleted_keys"], 1);
    clock.advance(DEFAULT_TTL);
    assert_eq!(app.status("autojoin", &second).await, 401);
    assert!(admin_fails(&ws, &["autojoin", "list-keys", "--org", "lifeorg"]).contains("does not exist"));
}

/// The bound the README promises for a published change (issue 16).
const REVOCATION_BOUND: Duration = Duration::from_secs(2);

async fn revocation_reaches_every_replica_within_seconds(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let key = ws.integration_key("spread", &[]);
    let key_id = key.split('.').nth(2).unwrap().to_owned();
    let org_key = ws.autojoin_key("spread-org");
    // Two replicas with the default 30 s cache TTL.
    let replicas = [
        support::Replica::start(&ws, &ws.store_flags, &[], &[]),
        support::Replica::start(&ws, &ws.store_flags, &[], &[]),
    ];
    for r in &replicas {
        assert_eq!(r.status("integration", &key).await, 200);
        assert_eq!(r.status("autojoin", &org_key).await, 200);
    }
    // Let the feeds start (their first read) before changing anything.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    ws.admin_json(&["key", "revoke", "--integration-id", "spread", "--key-id", &key_id]);
    let revoked = std::time::Instant::now();
    for r in &replicas {
        let took = r
            .refused_after("integration", &key, revoked, Duration::from_secs(10))
            .await;
        eprintln!("{}: revocation seen after {took:?}", backend.label());
        assert!(took < REVOCATION_BOUND, "{took:?}");
    }
    // Re-activated: accepted again without waiting for the refusal to expire.
    ws.admin_json(&["key", "activate", "--integration-id", "spread", "--key-id", &key_id]);
    let activated = std::time::Instant::now();
    for r in &replicas {
        while r.status("integration", &key).await != 200 {
            assert!(activated.elapsed() < REVOCATION_BOUND, "{:?}", activated.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let listed = ws.admin_json(&["autojoin", "list-keys", "--org", "spread-org"]);
    let fingerprint = listed["keys"][0]["fingerprint"].as_str().unwrap().to_owned();
    ws.admin_json(&[
        "autojoin",
        "delete-key",
        "--org",
        "spread-org",
        "--fingerprint",
        &fingerprint,
    ]);
    let deleted = std::time::Instant::now();
    for r in &replicas {
        let took = r
            .refused_after("autojoin", &org_key, deleted, Duration::from_secs(10))
            .await;
        assert!(took < REVOCATION_BOUND, "{took:?}");
    }

    // Following the feed costs no key reads: a hot key still costs one
    // lookup per TTL while several polls go by.
    let hot = ws.integration_key("spread", &[]);
    let before = lookups(&replicas[0].scrape().await, backend, "integration");
    for round in 0..3 {
        for _ in 0..100 {
            assert_eq!(replicas[0].status("integration", &hot).await, 200);
        }
        if round < 2 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    }
    let text = replicas[0].scrape().await;
    assert_eq!(
        lookups(&text, backend, "integration") - before,
        1.0,
        "one read for 300 exchanges"
    );

    for r in &replicas {
        let text = r.scrape().await;
        let received = series(&text, "tokenexchange_cache_invalidations_received_total");
        assert!(received >= 3.0, "{received}");
        assert_eq!(
            series(&text, "tokenexchange_cache_invalidations_applied_total"),
            received
        );
        assert!(series(&text, "tokenexchange_cache_invalidation_lag_seconds_count") >= 3.0);
        assert_eq!(series(&text, "tokenexchange_key_cache_flushes_total"), 0.0);
    }
}

async fn a_change_feed_cut_off_by_an_outage_recovers_and_flushes(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    // A store of this test's own to stop and start (SQLite: a lock held).
    let (flags, env, mut outage) = match backend {
        Backend::Sqlite => (
            ws.store_flags.clone(),
            Vec::new(),
            Outage::Sqlite {
                path: ws.store_url().trim_start_matches("sqlite:").to_owned(),
                locker: None,
            },
        ),
        Backend::Postgres => {
            let pg = support::postgres::Postgres::start();
            (vec!["--store".to_owned(), pg.url()], Vec::new(), Outage::Postgres(pg))
        }
        Backend::Datastore => {
            let port = support::emulator::free_port();
            let emulator = support::emulator::Emulator::start(port).await;
            (
                ws.store_flags.clone(),
                vec![("DATASTORE_EMULATOR_HOST".to_owned(), format!("127.0.0.1:{port}"))],
                Outage::Datastore { emulator, port },
            )
        }
    };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let admin = |args: &[&str]| -> Value {
        let out = command()
            .args(args)
            .arg("--json")
            .args(&flags)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let created = admin(&["integration", "create", "--integration-id", "cut"]);
    let key = created["api_key"].as_str().unwrap().to_owned();
    // A long TTL, so only a flush can make the replica ask the store again.
    let replica = support::Replica::start(
        &ws,
        &flags,
        &env,
        &["--store-timeout", "300ms", "--key-cache-ttl", "10m"],
    );
    assert_eq!(replica.status("integration", &key).await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    outage.begin().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    outage.end().await;

    // Back: the feed recovers and, not knowing what it missed, drops the
    // whole cache.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = replica.scrape().await;
        if series(&text, "tokenexchange_key_cache_flushes_total") >= 1.0 {
            assert!(series(&text, "tokenexchange_change_feed_recoveries_total") >= 1.0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no flush after the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if backend == Backend::Datastore {
        // The restarted emulator is empty: with the cache dropped, the key
        // that was cached for 10 minutes is now asked for, and is gone.
        assert_eq!(replica.status("integration", &key).await, 401);
        let created = admin(&["integration", "create", "--integration-id", "cut"]);
        let fresh = created["api_key"].as_str().unwrap().to_owned();
        assert_eq!(replica.status("integration", &fresh).await, 200);
        let key_id = fresh.split('.').nth(2).unwrap().to_owned();
        admin(&["key", "revoke", "--integration-id", "cut", "--key-id", &key_id]);
        let revoked = std::time::Instant::now();
        let took = replica
            .refused_after("integration", &fresh, revoked, Duration::from_secs(10))
            .await;
        assert!(took < REVOCATION_BOUND, "{took:?}");
    } else {
        // And follows changes again.
        assert_eq!(replica.status("integration", &key).await, 200);
        let key_id = key.split('.').nth(2).unwrap().to_owned();
        admin(&["key", "revoke", "--integration-id", "cut", "--key-id", &key_id]);
        let revoked = std::time::Instant::now();
        let took = replica
            .refused_after("integration", &key, revoked, Duration::from_secs(10))
            .await;
        assert!(took < REVOCATION_BOUND, "{took:?}");
    }
}

/// The claims of a token, unverified (other tests verify tokens).
fn payload(token: &str) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

async fn token_from(replica: &support::Replica, route: &str, api_key: &str) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{}/v0/token/{route}", replica.base))
        .json(&json!({ "api_key": api_key }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    payload(body["token"].as_str().unwrap())
}

fn rfc3339_in(seconds: i64) -> (String, i64) {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds);
    let at = at.replace_nanosecond(0).unwrap();
    (
        at.format(&time::format_description::well_known::Rfc3339).unwrap(),
        at.unix_timestamp(),
    )
}

/// Waits (up to 5 s) until `route` refuses `api_key` on `replica`.
async fn refused_soon(replica: &support::Replica, route: &str, api_key: &str) {
    let since = std::time::Instant::now();
    replica
        .refused_after(route, api_key, since, Duration::from_secs(5))
        .await;
}

async fn keys_expire_and_tokens_never_outlive_them(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let replica = support::Replica::start(&ws, &ws.store_flags, &[], &[]);
    // Far from its expiry, a key's tokens live their usual 20 s.
    let created = ws.admin_json(&[
        "integration",
        "create",
        "--integration-id",
        "exp",
        "--expires-in",
        "90d",
    ]);
    let key = created["api_key"].as_str().unwrap().to_owned();
    let key_id = created["key_id"].as_str().unwrap().to_owned();
    let expiry = created["expires_at"].as_str().unwrap().to_owned();
    let claims = token_from(&replica, "integration", &key).await;
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 20);
    let shown = ws.admin_json(&["integration", "show", "--integration-id", "exp"]);
    assert_eq!(shown["keys"][0]["expires_at"].as_str().unwrap(), expiry);

    // Close to it, a token ends when the key does.
    let (soon, soon_unix) = rfc3339_in(4);
    ws.admin_json(&[
        "key",
        "set-expiry",
        "--integration-id",
        "exp",
        "--key-id",
        &key_id,
        "--expires-at",
        &soon,
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let claims = token_from(&replica, "integration", &key).await;
    assert_eq!(claims["exp"].as_i64().unwrap(), soon_unix, "capped at the key's expiry");
    // Past it: the usual refusal, even from the cache.
    tokio::time::sleep(Duration::from_secs(3)).await;
    refused_soon(&replica, "integration", &key).await;
    let response = reqwest::Client::new()
        .post(format!("{}/v0/token/integration", replica.base))
        .json(&json!({ "api_key": key }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "Invalid API key\n");
    // Cleared: accepted again.
    ws.admin_json(&[
        "key",
        "set-expiry",
        "--integration-id",
        "exp",
        "--key-id",
        &key_id,
        "--never",
    ]);
    let since = std::time::Instant::now();
    while replica.status("integration", &key).await != 200 {
        assert!(since.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shown = ws.admin_json(&["integration", "show", "--integration-id", "exp"]);
    assert_eq!(shown["keys"][0]["expires_at"], Value::Null);

    // Autojoin keys: the same, for their hour-long tokens.
    ws.admin(&["autojoin", "create-org", "--org", "exp-org", "--email", "a@example.org"]);
    let created = ws.admin_json(&["autojoin", "create-key", "--org", "exp-org", "--expires-in", "30m"]);
    let org_key = created["api_key"].as_str().unwrap().to_owned();
    let expiry = time::OffsetDateTime::parse(
        created["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let claims = token_from(&replica, "autojoin", &org_key).await;
    assert_eq!(claims["exp"].as_i64().unwrap(), expiry.unix_timestamp());
    let listed = ws.admin_json(&["autojoin", "list-keys", "--org", "exp-org"]);
    let fingerprint = listed["keys"][0]["fingerprint"].as_str().unwrap().to_owned();
    assert!(listed["keys"][0]["expires_at"].is_string());
    let (soon, _) = rfc3339_in(2);
    ws.admin_json(&[
        "autojoin",
        "set-expiry",
        "--org",
        "exp-org",
        "--fingerprint",
        &fingerprint,
        "--expires-at",
        &soon,
    ]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    refused_soon(&replica, "autojoin", &org_key).await;

    // Expiries must be in the future.
    let out = ws.admin(&[
        "integration",
        "create",
        "--integration-id",
        "exp",
        "--expires-at",
        "2001-01-01T00:00:00Z",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the future"));
}

async fn usage_is_written_off_the_request_path_and_finds_unused_keys(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let used = ws.admin_json(&["integration", "create", "--integration-id", "use"]);
    let used_key = used["api_key"].as_str().unwrap().to_owned();
    let used_id = used["key_id"].as_str().unwrap().to_owned();
    let idle = ws.admin_json(&["integration", "create", "--integration-id", "use"]);
    let idle_id = idle["key_id"].as_str().unwrap().to_owned();
    let org_key = ws.autojoin_key("use-org");
    let replica = support::Replica::start(&ws, &ws.store_flags, &[], &["--usage-flush-interval", "1s"]);
    // Old enough to count as unused for 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for _ in 0..5 {
        assert_eq!(replica.status("integration", &used_key).await, 200);
    }
    for _ in 0..3 {
        assert_eq!(replica.status("autojoin", &org_key).await, 200);
    }
    let exchanged = time::OffsetDateTime::now_utc();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let shown = loop {
        let shown = ws.admin_json(&["integration", "show", "--integration-id", "use"]);
        if shown["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["tokens_issued"] == 5)
        {
            break shown;
        }
        assert!(std::time::Instant::now() < deadline, "usage not written: {shown}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let key = |id: &str| {
        shown["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == id)
            .unwrap()
            .clone()
    };
    let last = time::OffsetDateTime::parse(
        key(&used_id)["last_used_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(
        (exchanged - last).abs() < time::Duration::minutes(1),
        "{last} vs {exchanged}"
    );
    assert_eq!(key(&idle_id)["tokens_issued"], 0);
    assert_eq!(key(&idle_id)["last_used_at"], Value::Null);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = ws.admin_json(&["autojoin", "list-keys", "--org", "use-org"]);
        if listed["keys"][0]["tokens_issued"] == 3 {
            assert!(listed["keys"][0]["last_used_at"].is_string());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "autojoin usage not written: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Dead keys: the idle one (created 6 s ago, never used), not the used one.
    let unused = ws.admin_json(&["integration", "list", "--unused-for", "5s"]);
    let ids: Vec<&str> = unused["unused_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&idle_id.as_str()), "{unused}");
    assert!(!ids.contains(&used_id.as_str()), "{unused}");
    let unused = ws.admin_json(&["integration", "list", "--unused-for", "30d"]);
    assert_eq!(unused["unused_keys"].as_array().unwrap().len(), 0, "{unused}");
}

async fn the_audit_log_records_each_change_and_no_secret(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let created = ws.admin_json(&["integration", "create", "--integration-id", "aud", "--tier", "1"]);
    let key = created["api_key"].as_str().unwrap().to_owned();
    let key_id = created["key_id"].as_str().unwrap().to_owned();
    ws.admin_json(&["key", "revoke", "--integration-id", "aud", "--key-id", &key_id]);
    ws.admin_json(&[
        "key",
        "set-tier",
        "--integration-id",
        "aud",
        "--key-id",
        &key_id,
        "--tier",
        "2",
    ]);
    let (until, _) = rfc3339_in(3600);
    ws.admin_json(&[
        "key",
        "set-expiry",
        "--integration-id",
        "aud",
        "--key-id",
        &key_id,
        "--expires-at",
        &until,
    ]);
    ws.admin_json(&["key", "delete", "--integration-id", "aud", "--key-id", &key_id]);
    let org_key = ws.autojoin_key("aud-org");
    let fingerprint = ws.admin_json(&["autojoin", "list-keys", "--org", "aud-org"])["keys"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    ws.admin_json(&[
        "autojoin",
        "delete-key",
        "--org",
        "aud-org",
        "--fingerprint",
        &fingerprint,
    ]);

    let log = ws.admin_json(&["audit", "list", "--integration-id", "aud"]);
    let records = log["records"].as_array().unwrap();
    let actions: Vec<&str> = records.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "integration create",
            "key revoke",
            "key set-tier",
            "key set-expiry",
            "key delete"
        ]
    );
    let state = |status: &str, tier: i64, expires: Option<&str>| json!({ "status": status, "tier": tier, "expires_at": expires });
    let changes: Vec<(&Value, &Value)> = records.iter().map(|r| (&r["before"], &r["after"])).collect();
    assert_eq!(changes[0], (&Value::Null, &state("active", 1, None)));
    assert_eq!(changes[1], (&state("active", 1, None), &state("revoked", 1, None)));
    assert_eq!(changes[2], (&state("revoked", 1, None), &state("revoked", 2, None)));
    assert_eq!(
        changes[3],
        (&state("revoked", 2, None), &state("revoked", 2, Some(&until)))
    );
    assert_eq!(changes[4], (&state("revoked", 2, Some(&until)), &Value::Null));
    for r in records {
        assert_eq!(r["integration_id"], "aud");
        assert_eq!(r["key_id"], key_id.as_str());
        assert!(!r["operator"].as_str().unwrap().is_empty());
        assert!(r["at"].is_string());
    }

    let log = ws.admin_json(&["audit", "list", "--org", "aud-org"]);
    let actions: Vec<&str> = log["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["autojoin create-org", "autojoin create-key", "autojoin delete-key"]
    );
    assert_eq!(log["records"][2]["fingerprint"], fingerprint.as_str());

    // Everything, as text and JSON: never a key, a secret or a hash.
    let bad = ws.admin(&["audit", "list", "--since", "soon-ish"]);
    assert!(!bad.status.success(), "a --since that is no time was taken");
    let all = ws.admin(&["audit", "list", "--json"]);
    let text = ws.admin(&["audit", "list"]);
    let secret = key.rsplit('.').next().unwrap();
    let hash = {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
        d.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    for out in [&all.stdout, &text.stdout] {
        let out = String::from_utf8_lossy(out);
        assert!(out.contains("key set-tier"), "{out}");
        for secret in [secret, &hash, &org_key] {
            assert!(!out.contains(secret), "a secret in the audit log: {out}");
        }
    }
    let since = ws.admin_json(&["audit", "list", "--since", "1h", "--integration-id", "aud"]);
    assert_eq!(since["records"].as_array().unwrap().len(), 5);
    let (later, _) = rfc3339_in(60);
    let none = ws.admin_json(&["audit", "list", "--since", &later]);
    assert_eq!(none["records"].as_array().unwrap().len(), 0);

    // A rotation is audited as one, naming the key it replaces.
    let created = ws.admin_json(&["integration", "create", "--integration-id", "aud-rot", "--tier", "4"]);
    let old_id = created["key_id"].as_str().unwrap().to_owned();
    let rotated = ws.admin_json(&["key", "rotate", "--integration-id", "aud-rot", "--key-id", &old_id]);
    let log = ws.admin_json(&["audit", "list", "--integration-id", "aud-rot"]);
    let records = log["records"].as_array().unwrap();
    let actions: Vec<&str> = records.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["integration create", "key rotate"], "{log}");
    assert_eq!(records[1]["key_id"], rotated["key_id"]);
    assert_eq!(records[1]["before"], Value::Null);
    assert_eq!(
        records[1]["after"],
        json!({ "status": "active", "tier": 4, "expires_at": null, "replaces": old_id })
    );
}

/// Holds a write lock on `key_id`'s row in a transaction of its own (as the
/// usage writer does) until `hold` has passed. Datastore has no row locks
/// to hold from outside; there the writers only race each other.
async fn hold_the_row(ws: &Workspace, key_id: &str, hold: Duration) {
    use sqlx::Connection as _;
    let touch = "UPDATE integration_keys SET tokens_issued = tokens_issued WHERE key_id = $1";
    match ws.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(ws.store_url()).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await.unwrap();
            sqlx::query(touch).bind(key_id).execute(&mut conn).await.unwrap();
            tokio::time::sleep(hold).await;
            sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(ws.store_url()).await.unwrap();
            sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
            sqlx::query(touch).bind(key_id).execute(&mut conn).await.unwrap();
            tokio::time::sleep(hold).await;
            sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
        }
        Backend::Datastore => tokio::time::sleep(hold).await,
    }
}

/// Starts an admin command on `ws`'s store without waiting for it.
fn start_admin(ws: &Workspace, args: &[&str]) -> std::process::Child {
    command()
        .args(args)
        .arg("--json")
        .args(&ws.store_flags)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

async fn concurrent_admin_writes_on_one_key_lose_nothing(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let created = ws.admin_json(&["integration", "create", "--integration-id", "race"]);
    let key = created["api_key"].as_str().unwrap().to_owned();
    let key_id = created["key_id"].as_str().unwrap().to_owned();
    let replica = support::Replica::start(&ws, &ws.store_flags, &[], &[]);
    assert_eq!(replica.status("integration", &key).await, 200);
    let state = |status: &str, tier: i64| json!({ "status": status, "tier": tier, "expires_at": null });

    for round in 1..=3_i64 {
        // Both commands read the row while another transaction holds it,
        // then write: without locking, the later write puts back the
        // status the earlier one replaced.
        let holder = hold_the_row(&ws, &key_id, Duration::from_millis(700));
        let tier = round.to_string();
        let commands = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let revoke = start_admin(&ws, &["key", "revoke", "--integration-id", "race", "--key-id", &key_id]);
            let retier = start_admin(
                &ws,
                &[
                    "key",
                    "set-tier",
                    "--integration-id",
                    "race",
                    "--key-id",
                    &key_id,
                    "--tier",
                    &tier,
                ],
            );
            tokio::task::spawn_blocking(move || {
                [revoke.wait_with_output().unwrap(), retier.wait_with_output().unwrap()]
            })
            .await
            .unwrap()
        };
        let ((), outputs) = tokio::join!(holder, commands);
        for out in &outputs {
            assert!(
                out.status.success(),
                "{backend:?} round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let shown = ws.admin_json(&["integration", "show", "--integration-id", "race"]);
        let shown = shown["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == key_id.as_str())
            .unwrap()
            .clone();
        assert_eq!(shown["status"], "revoked", "{backend:?} round {round}: {shown}");
        assert_eq!(shown["tier"], round, "{backend:?} round {round}: {shown}");
        // The audit log chains: each record's "before" is what the other
        // left, and the last "after" is what is stored.
        let log = ws.admin_json(&["audit", "list", "--integration-id", "race"]);
        let records = log["records"].as_array().unwrap();
        let [.., first, second] = records.as_slice() else {
            panic!("{log}")
        };
        assert_eq!(first["after"], second["before"], "{backend:?} round {round}: {log}");
        assert_eq!(
            first["before"],
            state("active", round - 1),
            "{backend:?} round {round}: {log}"
        );
        assert_eq!(
            second["after"],
            state("revoked", round),
            "{backend:?} round {round}: {log}"
        );
        replica
            .refused_after("integration", &key, std::time::Instant::now(), Duration::from_secs(10))
            .await;
        ws.admin_json(&["key", "activate", "--integration-id", "race", "--key-id", &key_id]);
        // Keep the chain simple for the next round: active, this tier.
        let log = ws.admin_json(&["audit", "list", "--integration-id", "race"]);
        let last = log["records"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["after"], state("active", round), "{log}");
    }
}

/// Changes this test makes straight through the store (as a bulk revoke or
/// several operators would), more than one poll's page of them.
const BURST: usize = 600;

async fn a_burst_of_changes_is_followed_to_its_end(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let busy = ws.admin_json(&["integration", "create", "--integration-id", "bulk"]);
    let busy_id = busy["key_id"].as_str().unwrap().to_owned();
    let key = ws.integration_key("bulk", &[]);
    let key_id = key.split('.').nth(2).unwrap().to_owned();
    let replica = support::Replica::start(&ws, &ws.store_flags, &[], &[]);
    assert_eq!(replica.status("integration", &key).await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let store = token_exchange::store::open(&ws.store_args).await.unwrap();
    let started = std::time::Instant::now();
    for i in 0..BURST {
        let tier = i64::try_from(i % 7).unwrap();
        store
            .update_integration_key("bulk", &busy_id, token_exchange::store::KeyChange::Tier(tier))
            .await
            .unwrap();
    }
    eprintln!("{backend:?}: {BURST} changes in {:?}", started.elapsed());
    // The change after the burst still arrives within seconds, and so does
    // every later one.
    for round in 0..2 {
        ws.admin_json(&["key", "revoke", "--integration-id", "bulk", "--key-id", &key_id]);
        let took = replica
            .refused_after("integration", &key, std::time::Instant::now(), Duration::from_secs(10))
            .await;
        assert!(took < REVOCATION_BOUND, "{backend:?} round {round}: {took:?}");
        ws.admin_json(&["key", "activate", "--integration-id", "bulk", "--key-id", &key_id]);
        let since = std::time::Instant::now();
        while replica.status("integration", &key).await != 200 {
            assert!(since.elapsed() < REVOCATION_BOUND, "{backend:?}: not re-activated");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let text = replica.scrape().await;
    let received = series(&text, "tokenexchange_cache_invalidations_received_total");
    assert!(
        received >= (BURST + 4) as f64,
        "{backend:?}: {received} changes received"
    );
    // Read to the end, not given up on: nothing was flushed.
    assert_eq!(
        series(&text, "tokenexchange_key_cache_flushes_total"),
        0.0,
        "{backend:?}"
    );
    assert_eq!(series(&text, "tokenexchange_change_feed_up"), 1.0);
    let last_read = series(&text, "tokenexchange_change_feed_last_read_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - last_read).abs() < 10.0, "last read {last_read}, now {now}");
}

/// Runs an admin command on a clock `offset` away from this machine's
/// (libfaketime); `None` when faketime is not installed.
fn admin_with_clock(ws: &Workspace, offset: &str, args: &[&str]) -> Option<Value> {
    let faketime = ["/usr/bin/faketime", "/usr/local/bin/faketime"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let out = std::process::Command::new(faketime)
        .arg("-f")
        .arg(offset)
        .arg(support::BIN)
        .args(args)
        .arg("--json")
        .args(&ws.store_flags)
        .env("GCE_METADATA_HOST", support::CLOSED_METADATA_HOST)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

async fn changes_from_admin_clocks_far_off_are_followed(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let key = ws.integration_key("skew", &[]);
    let key_id = key.split('.').nth(2).unwrap().to_owned();
    let replica = support::Replica::start(&ws, &ws.store_flags, &[], &[]);
    assert_eq!(replica.status("integration", &key).await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // An admin machine an hour ahead, then one an hour behind, then ours:
    // each change arrives within seconds, and the one from the future is
    // reported.
    for offset in ["+1h", "-1h", "+0"] {
        let Some(_) = admin_with_clock(
            &ws,
            offset,
            &["key", "revoke", "--integration-id", "skew", "--key-id", &key_id],
        ) else {
            panic!("faketime is not installed (scripts/lib/test-env.sh installs it)");
        };
        let took = replica
            .refused_after("integration", &key, std::time::Instant::now(), Duration::from_secs(10))
            .await;
        assert!(took < REVOCATION_BOUND, "{backend:?} {offset}: {took:?}");
        admin_with_clock(
            &ws,
            offset,
            &["key", "activate", "--integration-id", "skew", "--key-id", &key_id],
        );
        let since = std::time::Instant::now();
        while replica.status("integration", &key).await != 200 {
            assert!(
                since.elapsed() < REVOCATION_BOUND,
                "{backend:?} {offset}: not re-activated"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A replica started while the future-stamped change is the newest
    // still hears the next one.
    admin_with_clock(
        &ws,
        "+1h",
        &[
            "key",
            "set-tier",
            "--integration-id",
            "skew",
            "--key-id",
            &key_id,
            "--tier",
            "1",
        ],
    );
    let late = support::Replica::start(&ws, &ws.store_flags, &[], &[]);
    assert_eq!(late.status("integration", &key).await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ws.admin_json(&["key", "revoke", "--integration-id", "skew", "--key-id", &key_id]);
    let took = late
        .refused_after("integration", &key, std::time::Instant::now(), Duration::from_secs(10))
        .await;
    assert!(took < REVOCATION_BOUND, "{backend:?} late replica: {took:?}");

    let text = replica.scrape().await;
    assert!(
        series(&text, "tokenexchange_change_feed_future_stamps_total") >= 2.0,
        "{text}"
    );
    assert_eq!(series(&text, "tokenexchange_key_cache_flushes_total"), 0.0);
    let warned = replica.log_lines().iter().any(|l| l.contains("stamped in the future"));
    assert!(warned, "no warning about the clock ahead");
}

async fn a_store_restored_from_an_older_copy_flushes_the_cache(backend: Backend) {
    // PostgreSQL keeps no feed position: a restore restarts the server,
    // which cuts the listener, and that already flushes (tested above).
    if backend == Backend::Postgres {
        return;
    }
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let key = ws.integration_key("restore", &[]);
    let key_id = key.split('.').nth(2).unwrap().to_owned();
    set_tier(&ws, "restore", &key_id, "1");
    // The backup: the store as it is now.
    let backup = ws.path().join("backup.db");
    let head_path: &[(&str, &str)] = &[("TokenExchangeChangeHead", "head")];
    let seeder = ws.seeder();
    let datastore_head = match backend {
        Backend::Sqlite => {
            std::fs::copy(ws.store_url().trim_start_matches("sqlite:"), &backup).unwrap();
            None
        }
        _ => Some(
            seeder
                .datastore_lookup_own(head_path)
                .await
                .expect("the feed has a head"),
        ),
    };
    let replica = support::Replica::start(&ws, &ws.store_flags, &[], &["--key-cache-ttl", "10m"]);
    assert_eq!(replica.status("integration", &key).await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Changes after the backup, seen by the replica...
    for tier in ["2", "3"] {
        set_tier(&ws, "restore", &key_id, tier);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while series(
        &replica.scrape().await,
        "tokenexchange_cache_invalidations_received_total",
    ) < 2.0
    {
        assert!(std::time::Instant::now() < deadline, "changes not received");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(replica.status("integration", &key).await, 200);
    // ...then the backup put back in place, and one change made on it (so
    // the feed's position exists again, with other contents).
    match datastore_head {
        None => {
            let path = ws.store_url().trim_start_matches("sqlite:").to_owned();
            std::fs::copy(&backup, &path).unwrap();
            // A restore through SQLite (`.restore`, the backup API) moves
            // the file's change counter on, which tells every open
            // connection that its cached pages are stale; a bare copy puts
            // the old counter back. Move it on as the backup API would.
            use sqlx::Connection as _;
            let mut conn = sqlx::SqliteConnection::connect(ws.store_url()).await.unwrap();
            for version in 1..=5 {
                sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA user_version = {version}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
        }
        Some(head) => seeder.datastore_commit(vec![head]).await,
    }
    ws.admin_json(&["key", "revoke", "--integration-id", "restore", "--key-id", &key_id]);
    set_tier(&ws, "restore", &key_id, "5");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while series(&replica.scrape().await, "tokenexchange_key_cache_flushes_total") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{backend:?}: the restore went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = replica.status("integration", &key).await;
    assert_eq!(status, 401, "{backend:?}: {:#?}", replica.log_lines());
}

/// `key set-tier` through the CLI, which must succeed.
fn set_tier(ws: &Workspace, integration: &str, key_id: &str, tier: &str) {
    ws.admin_json(&[
        "key",
        "set-tier",
        "--integration-id",
        integration,
        "--key-id",
        key_id,
        "--tier",
        tier,
    ]);
}

async fn a_nul_in_a_made_up_key_is_an_unknown_key(backend: Backend) {
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let key = ws.integration_key("nul", &[]);
    let replica = support::Replica::start(&ws, &ws.store_flags, &[], &[]);
    // PostgreSQL text cannot hold a NUL: asking it would be a store error
    // (503, paging operators, never cached). No stored name holds one.
    for made_up in ["mlabk.cii_n\u{0}ul.ki_0000.secret", "mlabk.cii_nul.ki_00\u{0}00.secret"] {
        for _ in 0..3 {
            assert_eq!(replica.status("integration", made_up).await, 401, "{backend:?}");
        }
    }
    assert_eq!(replica.status("integration", &key).await, 200);
    let text = replica.scrape().await;
    let errors = format!(
        r#"tokenexchange_store_lookups_total{{backend="{}",kind="integration",result="error"}}"#,
        backend.label()
    );
    assert_eq!(series(&text, &errors), 0.0, "{text}");
}

use token_exchange::store::changes::{ChangeFeed, ChangeNotice, Invalidation};

/// Reads `feed` until `count` changes of one key arrived (or 20 s passed);
/// returns how many `Everything` came with them.
async fn read_changes(feed: &mut Box<dyn ChangeFeed>, count: usize) -> (usize, usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (mut keys, mut everything) = (0, 0);
    while keys < count && std::time::Instant::now() < deadline {
        let notices: Vec<ChangeNotice> = tokio::time::timeout(Duration::from_secs(5), feed.next())
            .await
            .expect("the feed answers")
            .expect("the feed reads");
        for notice in notices {
            match notice.what {
                Invalidation::IntegrationKey { .. } => keys += 1,
                Invalidation::Everything => everything += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    (keys, everything)
}

/// Reads `feed` until it reports `Everything` (or 10 s passed).
async fn lost_track(feed: &mut Box<dyn ChangeFeed>) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let notices = feed.next().await.expect("the feed reads");
        if notices.iter().any(|n| n.what == Invalidation::Everything) {
            return true;
        }
    }
    false
}

/// The feed as a server follows it, in this process: every change once,
/// a burst larger than a page to its end, and (where the store keeps a
/// position) gaps and restores reported as `Everything`.
async fn the_change_feed_in_process_reads_every_change_once_and_owns_up_to_gaps(backend: Backend) {
    use token_exchange::store::KeyChange;
    let Some(ws) = Workspace::with_backend(backend, "EdDSA") else {
        return;
    };
    let created = ws.admin_json(&["integration", "create", "--integration-id", "feed"]);
    let key_id = created["key_id"].as_str().unwrap().to_owned();
    let store = token_exchange::store::open(&ws.store_args).await.unwrap();
    let mut feed = store.change_feed(Duration::from_millis(100));
    assert!(
        feed.next().await.unwrap().is_empty(),
        "the first read only finds its place"
    );
    let change = |tier: i64| {
        let (store, key_id) = (store.clone(), key_id.clone());
        async move {
            store
                .update_integration_key("feed", &key_id, KeyChange::Tier(tier))
                .await
                .unwrap()
        }
    };
    for tier in 1..=3 {
        change(tier).await;
    }
    assert_eq!(read_changes(&mut feed, 3).await, (3, 0), "{backend:?}");
    // A quiet feed answers within its interval (PostgreSQL: a heartbeat).
    let quiet = std::time::Instant::now();
    assert!(feed.next().await.unwrap().is_empty());
    assert!(quiet.elapsed() < Duration::from_secs(3), "{:?}", quiet.elapsed());
    // More than a page (Datastore 500, SQLite 1,000 a poll).
    for i in 0..1_050 {
        change(i % 5).await;
    }
    assert_eq!(read_changes(&mut feed, 1_050).await, (1_050, 0), "{backend:?}");

    match backend {
        Backend::Postgres => {}
        Backend::Sqlite => {
            use sqlx::Connection as _;
            let mut db = sqlx::SqliteConnection::connect(ws.store_url()).await.unwrap();
            // A change missing between two others: reported, the others read.
            for tier in 1..=3 {
                change(tier).await;
            }
            sqlx::query("DELETE FROM changes WHERE seq = (SELECT MAX(seq) - 1 FROM changes)")
                .execute(&mut db)
                .await
                .unwrap();
            assert_eq!(read_changes(&mut feed, 2).await, (2, 1));
            // The change last read, gone (an older copy put back).
            sqlx::query("DELETE FROM changes WHERE seq = (SELECT MAX(seq) FROM changes)")
                .execute(&mut db)
                .await
                .unwrap();
            assert!(lost_track(&mut feed).await, "the restore went unnoticed");
            // And it follows changes again (past the rows deleted here,
            // which it reports once more).
            change(4).await;
            let (keys, everything) = read_changes(&mut feed, 1).await;
            assert_eq!(keys, 1);
            assert!(everything <= 1);
        }
        Backend::Datastore => {
            let seeder = ws.seeder();
            let own = |path: Value, properties: Value| {
                json!({
                    "key": {
                        "partitionId": { "projectId": ws.store_args.project_id, "namespaceId": ws.store_args.own_ns },
                        "path": path,
                    },
                    "properties": properties,
                })
            };
            let head_path: &[(&str, &str)] = &[("TokenExchangeChangeHead", "head")];
            let head_seq = || async {
                let head = seeder.datastore_lookup_own(head_path).await.unwrap();
                head["properties"]["seq"]["integerValue"]
                    .as_str()
                    .unwrap()
                    .parse::<i64>()
                    .unwrap()
            };
            let set_head = |seq: i64| {
                own(
                    json!([{ "kind": "TokenExchangeChangeHead", "name": "head" }]),
                    json!({ "seq": { "integerValue": seq.to_string() }, "token": { "stringValue": "put-back" } }),
                )
            };
            // The head put back (a restored backup).
            let seq = head_seq().await;
            seeder.datastore_commit(vec![set_head(seq - 5)]).await;
            assert!(lost_track(&mut feed).await, "a head that went back went unnoticed");
            // The head ahead of the changes it announces.
            seeder.datastore_commit(vec![set_head(seq + 5)]).await;
            assert!(
                lost_track(&mut feed).await,
                "changes that cannot be read went unnoticed"
            );
            // The change last read replaced by another with its number.
            change(1).await;
            assert_eq!(read_changes(&mut feed, 1).await, (1, 0));
            let seq = head_seq().await;
            let replaced = own(
                json!([{ "kind": "TokenExchangeChange", "name": format!("seq-{seq:020}") }]),
                json!({ "seq": { "integerValue": seq.to_string() }, "token": { "stringValue": "other" } }),
            );
            seeder.datastore_commit(vec![replaced]).await;
            change(2).await;
            assert!(lost_track(&mut feed).await, "a replaced change went unnoticed");
            change(3).await;
            assert_eq!(read_changes(&mut feed, 1).await, (1, 0));
        }
    }
}
