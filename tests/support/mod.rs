//! Helpers for end-to-end tests: the real binary for the admin CLI, a real
//! SQLite file, and the server on a real socket (port 0).

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::Value;
use tempfile::TempDir;
use token_exchange::app::Application;
use token_exchange::http::AppState;
use token_exchange::signing::{KeySet, SigningKey};
use token_exchange::validate::Validator;

pub const BIN: &str = env!("CARGO_BIN_EXE_token-exchange");

/// Settings a developer's shell might export that would change what the
/// binary does under test.
const ENV_SETTINGS: &[&str] = &[
    "STORE",
    "PORT",
    "PRIVATE_KEY_PATH",
    "PROJECT_ID",
    "PLATFORM_NS",
    "CLIENT_INTEGRATION_NS",
    "DEV",
    "DATA_DIR",
    "RUST_LOG",
];

/// The binary with a clean environment of settings.
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for name in ENV_SETTINGS {
        cmd.env_remove(name);
    }
    cmd
}

/// Runs the binary; panics with its output if it fails.
pub fn run_ok(args: &[&str]) -> Output {
    let out = command().args(args).output().expect("run the binary");
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs an admin command with `--json` and parses its one JSON object.
pub fn run_json(args: &[&str]) -> Value {
    let out = run_ok(args);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout of {args:?} is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A temporary folder with a SQLite store and a signing key.
pub struct Workspace {
    pub dir: TempDir,
    pub store: String,
    pub key_path: PathBuf,
}

impl Workspace {
    pub fn new(alg: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("sqlite:{}", dir.path().join("store.db").display());
        let key_path = dir.path().join("jwk-priv.json");
        run_ok(&["keygen", "--alg", alg, "--out", key_path.to_str().unwrap()]);
        Self {
            dir,
            store,
            key_path,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates an integration key with the CLI; returns the API key.
    pub fn integration_key(&self, integration: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "integration",
            "create",
            "--store",
            &self.store,
            "--integration-id",
            integration,
            "--json",
        ];
        args.extend_from_slice(extra);
        run_json(&args)["api_key"].as_str().unwrap().to_owned()
    }

    /// Creates an organization and a key for it with the CLI; returns the key.
    pub fn autojoin_key(&self, org: &str) -> String {
        run_ok(&[
            "autojoin",
            "create-org",
            "--store",
            &self.store,
            "--org",
            org,
            "--email",
            "ops@example.org",
        ]);
        let v = run_json(&[
            "autojoin",
            "create-key",
            "--store",
            &self.store,
            "--org",
            org,
            "--json",
        ]);
        assert_eq!(v["org"], org);
        v["api_key"].as_str().unwrap().to_owned()
    }
}

/// A server running in this process on 127.0.0.1 with a free port.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn spawn_app(ws: &Workspace) -> TestApp {
    let key = SigningKey::load(&ws.key_path).unwrap();
    let store = token_exchange::store::open(&ws.store).await.unwrap();
    let state = AppState::new(
        Arc::new(KeySet::new(key)),
        Validator::new(store.clone(), store),
    );
    let app = Application::build("127.0.0.1:0".parse().unwrap(), state)
        .await
        .unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let task = tokio::spawn(async move {
        app.run_until_stopped(std::future::pending()).await.unwrap();
    });
    TestApp {
        base,
        client: reqwest::Client::new(),
        task,
    }
}

impl TestApp {
    pub async fn exchange(&self, route: &str, api_key: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/v0/token/{route}", self.base))
            .json(&serde_json::json!({ "api_key": api_key }))
            .send()
            .await
            .unwrap()
    }

    pub async fn token(&self, route: &str, api_key: &str) -> String {
        let response = self.exchange(route, api_key).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["token"].as_str().unwrap().to_owned()
    }

    pub async fn jwks(&self) -> jsonwebtoken::jwk::JwkSet {
        self.client
            .get(format!("{}/.well-known/jwks.json", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}
