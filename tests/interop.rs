//! Interoperability: tokens from a running server verified by libraries we
//! did not write (Python PyJWT with PyJWKClient, Node's jose with
//! createRemoteJWKSet), each fetching the live JWKS itself; and key files
//! exchanged both ways with Python's jwcrypto.
//!
//! scripts/test installs the pinned packages (interop/requirements.txt in a
//! virtual environment, interop/package-lock.json in interop/node_modules)
//! and sets INTEROP_PYTHON; without it these tests skip.

mod support;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use support::{Workspace, settings, spawn_app, spawn_app_full};

fn python() -> Option<String> {
    let python = std::env::var("INTEROP_PYTHON").ok();
    if python.is_none() {
        support::not_here("INTEROP_PYTHON", "scripts/test installs the verifiers");
    }
    python
}

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop")
}

/// Runs `program args` with `input` on stdin; panics with its output unless
/// it succeeds and prints "ok".
fn run_checker(program: &str, args: &[&str], input: &Value) {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(interop_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("ok"),
        "{program} {args:?}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn verify_everywhere(python: &str, spec: &Value) {
    run_checker(python, &["verify.py"], spec);
    run_checker("node", &["verify.mjs"], spec);
}

async fn cases_for(alg: &str, python: &str) {
    let ws = Workspace::new(alg);
    let integration_key = ws.integration_key("interop", &["--tier", "2"]);
    let autojoin_key = ws.autojoin_key("interop-org");
    let key_id = integration_key.split('.').nth(2).unwrap().to_owned();
    let app = spawn_app(&ws).await;
    // The same keys, on a server whose clock is two hours behind: its
    // tokens are already expired.
    let store = token_exchange::store::open(&ws.store_args).await.unwrap();
    let mut past = settings(&ws);
    past.wall_clock = Arc::new(|| SystemTime::now() - Duration::from_secs(7200));
    let old_app = spawn_app_full(store, &ws, past).await;

    let integration_claims = json!({"iss": "token-exchange", "aud": "integration", "int_id": "interop",
                                    "key_id": key_id, "tier": 2});
    let autojoin_claims = json!({"iss": "token-exchange", "aud": "autojoin", "org": "interop-org"});
    let spec = json!({
        "jwks_url": format!("{}/.well-known/jwks.json", app.base),
        "cases": [
            {"token": app.token("integration", &integration_key).await, "audience": "integration",
             "expect": "valid", "claims": integration_claims, "lifetime": 20},
            {"token": app.token("autojoin", &autojoin_key).await, "audience": "autojoin",
             "expect": "valid", "claims": autojoin_claims, "lifetime": 3600},
            {"token": old_app.token("integration", &integration_key).await, "audience": "integration",
             "expect": "expired", "claims": {}, "lifetime": 20},
            {"token": old_app.token("autojoin", &autojoin_key).await, "audience": "autojoin",
             "expect": "expired", "claims": {}, "lifetime": 3600},
        ],
    });
    verify_everywhere(python, &spec);

    // Our key file, read by jwcrypto; its public part is our JWKS entry.
    let out = Command::new(python)
        .args([
            "keys.py",
            "check",
            ws.key_path.to_str().unwrap(),
            spec["jwks_url"].as_str().unwrap(),
        ])
        .current_dir(interop_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_verify_in_pyjwt_and_jose() {
    let Some(python) = python() else { return };
    cases_for("RS256", &python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_verify_in_pyjwt_and_jose() {
    let Some(python) = python() else { return };
    cases_for("ES256", &python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eddsa_tokens_verify_in_pyjwt_and_jose() {
    let Some(python) = python() else { return };
    cases_for("EdDSA", &python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_made_by_jwcrypto_sign_tokens_pyjwt_accepts() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(&python)
        .args(["keys.py", "generate", dir.path().to_str().unwrap()])
        .current_dir(interop_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for alg in ["RS256", "ES256", "EdDSA"] {
        let mut ws = Workspace::new("EdDSA");
        ws.key_path = dir.path().join(format!("{alg}.json"));
        let key = ws.integration_key("foreign", &[]);
        let key_id = key.split('.').nth(2).unwrap().to_owned();
        let app = spawn_app(&ws).await;
        let token = app.token("integration", &key).await;
        let header: Value = {
            use base64::Engine as _;
            let part = token.split('.').next().unwrap();
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
        };
        assert_eq!(header["alg"], alg);
        let spec = json!({
            "jwks_url": format!("{}/.well-known/jwks.json", app.base),
            "cases": [{"token": token, "audience": "integration", "expect": "valid", "lifetime": 20,
                       "claims": {"iss": "token-exchange", "aud": "integration", "int_id": "foreign",
                                  "key_id": key_id, "tier": 0}}],
        });
        run_checker(&python, &["verify.py"], &spec);
    }
}
