//! Helpers for end-to-end tests: the real binary for the admin CLI, real
//! stores (a SQLite file, the Datastore emulator), and the server on a real
//! socket (port 0).

#![allow(dead_code)] // each test file uses a different subset

pub mod emulator;
pub mod postgres;
pub mod process;
pub mod seed;
pub mod services;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;
use token_exchange::app::Application;
use token_exchange::config::StoreArgs;
use token_exchange::http::{AppState, ReadinessWindows, Settings};
use token_exchange::signing::{KeySet, SigningKey};

pub use services::{fresh_postgres_database, not_here, unique};

pub const BIN: &str = env!("CARGO_BIN_EXE_token-exchange");

/// The project every Datastore test uses; tests are kept apart by namespace.
pub const TEST_PROJECT: &str = "token-exchange-test";

/// What the binary reads from the environment but tests leave as the
/// run has it: the emulator scripts/test started, and HOME.
const KEPT_ENVIRONMENT: &[&str] = &["DATASTORE_EMULATOR_HOST", "HOME"];

/// Where the metadata server is said to be in tests: a loopback port no one
/// listens on, so a credential lookup fails at once and never leaves the
/// machine.
pub const CLOSED_METADATA_HOST: &str = "127.0.0.1:1";

/// The binary with a clean environment of settings.
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    // Every variable the binary reads (taken from its own flags, so none
    // can be forgotten), so an exported KEY_CACHE_TTL or STORE in a
    // developer's shell cannot change what a test runs.
    for name in token_exchange::cli::environment_variables() {
        if !KEPT_ENVIRONMENT.contains(&name.as_str()) {
            cmd.env_remove(name);
        }
    }
    cmd.env("GCE_METADATA_HOST", CLOSED_METADATA_HOST);
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

/// A store the behaviour suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Datastore,
    Postgres,
}

impl Backend {
    /// The `backend` label of the store metrics.
    pub fn label(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Datastore => "datastore",
            Backend::Postgres => "postgres",
        }
    }
}

/// A temporary folder with a signing key, and a store of one backend.
pub struct Workspace {
    pub dir: TempDir,
    pub backend: Backend,
    pub key_path: PathBuf,
    /// `--store`, `--project-id` and namespace flags for the CLI.
    pub store_flags: Vec<String>,
    pub store_args: StoreArgs,
}

impl Workspace {
    /// A SQLite workspace.
    pub fn new(alg: &str) -> Self {
        Self::with_backend(Backend::Sqlite, alg).expect("SQLite is always available")
    }

    /// A workspace on `backend`; `None` (after saying why) when the backend
    /// is not available here: Datastore tests need `DATASTORE_EMULATOR_HOST`,
    /// PostgreSQL tests `TEST_DATABASE_URL` (scripts/test sets both).
    pub fn with_backend(backend: Backend, alg: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let store_args = match backend {
            Backend::Sqlite => StoreArgs {
                store: Some(format!("sqlite:{}", dir.path().join("store.db").display())),
                project_id: TEST_PROJECT.into(),
                platform_ns: "platform-credentials".into(),
                client_integration_ns: "client-integration".into(),
                own_ns: "token-exchange".into(),
                store_timeout: Duration::from_secs(2),
                store_max_connections: 4,
            },
            Backend::Postgres => {
                let Ok(admin) = std::env::var("TEST_DATABASE_URL") else {
                    not_here("TEST_DATABASE_URL", "scripts/test starts PostgreSQL");
                    return None;
                };
                StoreArgs {
                    store: Some(fresh_postgres_database(&admin)),
                    project_id: TEST_PROJECT.into(),
                    platform_ns: "platform-credentials".into(),
                    client_integration_ns: "client-integration".into(),
                    own_ns: "token-exchange".into(),
                    store_timeout: Duration::from_secs(2),
                    store_max_connections: 4,
                }
            }
            Backend::Datastore => {
                if std::env::var_os("DATASTORE_EMULATOR_HOST").is_none() {
                    not_here("DATASTORE_EMULATOR_HOST", "scripts/test starts the emulator");
                    return None;
                }
                StoreArgs {
                    store: Some("datastore".into()),
                    project_id: TEST_PROJECT.into(),
                    platform_ns: unique("pc"),
                    client_integration_ns: unique("ci"),
                    own_ns: unique("ch"),
                    store_timeout: Duration::from_secs(2),
                    store_max_connections: 4,
                }
            }
        };
        let store_flags = vec![
            "--store".into(),
            store_args.store.clone().unwrap(),
            "--project-id".into(),
            store_args.project_id.clone(),
            "--platform-ns".into(),
            store_args.platform_ns.clone(),
            "--client-integration-ns".into(),
            store_args.client_integration_ns.clone(),
            "--token-exchange-ns".into(),
            store_args.own_ns.clone(),
        ];
        let key_path = dir.path().join("jwk-priv.json");
        run_ok(&["keygen", "--alg", alg, "--out", key_path.to_str().unwrap()]);
        Some(Self {
            dir,
            backend,
            key_path,
            store_flags,
            store_args,
        })
    }

    /// The `--store` value.
    pub fn store_url(&self) -> &str {
        self.store_args.store.as_deref().unwrap()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs an admin command against this workspace's store.
    pub fn admin(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(self.store_flags.iter().map(String::as_str));
        command().args(&all).output().expect("run the binary")
    }

    /// Runs an admin command that must succeed, with `--json`.
    pub fn admin_json(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        all.extend(self.store_flags.iter().map(String::as_str));
        run_json(&all)
    }

    /// Creates an integration key with the CLI; returns the API key.
    pub fn integration_key(&self, integration: &str, extra: &[&str]) -> String {
        let mut args = vec!["integration", "create", "--integration-id", integration];
        args.extend_from_slice(extra);
        self.admin_json(&args)["api_key"].as_str().unwrap().to_owned()
    }

    /// Creates an organization and a key for it with the CLI; returns the key.
    pub fn autojoin_key(&self, org: &str) -> String {
        let out = self.admin(&["autojoin", "create-org", "--org", org, "--email", "ops@example.org"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v = self.admin_json(&["autojoin", "create-key", "--org", org]);
        assert_eq!(v["org"], org);
        v["api_key"].as_str().unwrap().to_owned()
    }

    /// Writes entities directly, the way other programs do.
    pub fn seeder(&self) -> seed::Seeder {
        seed::Seeder::new(self)
    }
}

/// Keys made the way M-Lab's Go tools are run: no `--store` (so Datastore:
/// the emulator of `DATASTORE_EMULATOR_HOST`), the project and the autojoin
/// namespace given, the default integration namespace. The integration and
/// the organization share one fresh name.
pub struct GoStyleKeys {
    pub name: String,
    pub integration: String,
    pub autojoin: String,
}

impl GoStyleKeys {
    /// Creates them; every command must name the emulator as its store on
    /// stderr.
    pub fn create(platform_ns: &str) -> Self {
        let admin = |args: &[&str]| {
            let out = command()
                .args(args)
                .args(["--project-id", TEST_PROJECT, "--platform-ns", platform_ns, "--json"])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&format!("store: Datastore project {TEST_PROJECT}")) && stderr.contains("emulator at"),
                "{stderr}"
            );
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        };
        let name = unique("go");
        let integration = admin(&["integration", "create", "--integration-id", &name, "--tier", "2"]);
        admin(&["autojoin", "create-org", "--org", &name, "--email", "ops@example.org"]);
        let autojoin = admin(&["autojoin", "create-key", "--org", &name]);
        Self {
            integration: integration["api_key"].as_str().unwrap().to_owned(),
            autojoin: autojoin["api_key"].as_str().unwrap().to_owned(),
            name,
        }
    }

    /// Exchanges both keys at `base` (`http://host:port`); returns the two
    /// tokens' claims, integration first.
    pub async fn exchange_both(&self, base: &str) -> [Value; 2] {
        let client = reqwest::Client::new();
        let mut claims = Vec::new();
        for (route, key) in [("integration", &self.integration), ("autojoin", &self.autojoin)] {
            let answer = client
                .post(format!("{base}/v0/token/{route}"))
                .body(format!(r#"{{"api_key":"{key}"}}"#))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 200, "{route}");
            let body: Value = answer.json().await.unwrap();
            let payload = body["token"].as_str().unwrap().split('.').nth(1).unwrap();
            use base64::Engine as _;
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap();
            claims.push(serde_json::from_slice(&payload).unwrap());
        }
        claims.try_into().unwrap()
    }
}

/// Holds an exclusive lock on a SQLite workspace's database (as a backup
/// or a `sqlite3` shell would) until the connection is dropped: every
/// lookup then waits for the busy timeout.
pub async fn lock_sqlite(ws: &Workspace) -> sqlx::SqliteConnection {
    use sqlx::Connection as _;
    let url = ws.store_url();
    let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut conn).await.unwrap();
    sqlx::query("UPDATE integrations SET description = 'locked'")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// GETs `url` and parses its JSON body.
pub async fn get_json(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// A server running in this process on 127.0.0.1 with a free port.
pub struct TestApp {
    pub base: String,
    /// URL of the metrics listener's `/metrics`.
    pub metrics: String,
    pub client: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn spawn_app(ws: &Workspace) -> TestApp {
    spawn_app_with(ws, &ws.store_args).await
}

pub async fn spawn_app_with(ws: &Workspace, store_args: &StoreArgs) -> TestApp {
    let store = token_exchange::store::open(store_args).await.unwrap();
    spawn_app_on(ws, store).await
}

/// The server on a store built by the test.
pub async fn spawn_app_on(ws: &Workspace, store: Arc<dyn token_exchange::store::Store>) -> TestApp {
    spawn_app_full(store, ws, settings(ws)).await
}

/// The service's default settings, with the workspace's store timeout.
pub fn settings(ws: &Workspace) -> Settings {
    Settings {
        store_timeout: ws.store_args.store_timeout,
        ..Settings::default()
    }
}

/// Readiness windows short enough for a test to wait out.
pub fn quick_readiness() -> ReadinessWindows {
    ReadinessWindows {
        freshness: Duration::from_millis(300),
        probe_interval: Duration::from_millis(100),
    }
}

/// Settings whose cache runs on a clock the test moves.
pub fn settings_with_clock(ws: &Workspace, clock: Arc<token_exchange::ground::ManualClock>) -> Settings {
    Settings {
        clock,
        readiness: quick_readiness(),
        ..settings(ws)
    }
}

/// The server on a store built by the test, with given settings.
pub async fn spawn_app_full(
    store: Arc<dyn token_exchange::store::Store>,
    ws: &Workspace,
    settings: Settings,
) -> TestApp {
    let key = SigningKey::load(&ws.key_path).unwrap();
    let state = AppState::new(Arc::new(KeySet::new(key)), store, settings);
    let loopback = "127.0.0.1:0".parse().unwrap();
    let app = Application::build(loopback, loopback, state).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let metrics = format!("http://{}/metrics", app.metrics_addr());
    let task = tokio::spawn(async move {
        app.run_until_stopped(std::future::pending()).await.unwrap();
    });
    TestApp {
        base,
        metrics,
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

    pub async fn status(&self, route: &str, api_key: &str) -> u16 {
        self.exchange(route, api_key).await.status().as_u16()
    }

    pub async fn token(&self, route: &str, api_key: &str) -> String {
        let response = self.exchange(route, api_key).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["token"].as_str().unwrap().to_owned()
    }

    /// The status of `GET path`.
    pub async fn get_status(&self, path: &str) -> u16 {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The metrics text, scraped over HTTP.
    pub async fn scrape(&self) -> String {
        self.client
            .get(&self.metrics)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
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

/// The value of one series in the metrics text; a series that is not there
/// fails the test (a renamed metric must not read as 0).
pub fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
        .unwrap_or_else(|| panic!("no series {name_and_labels}"))
}

/// The API and metrics addresses from the server's "listening" log line,
/// in either log format.
pub fn parse_listening(line: &str) -> Option<(String, String)> {
    if line.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(line).ok()?;
        let fields = &v["fields"];
        if fields["message"] != "listening" {
            return None;
        }
        return Some((
            fields["addr"].as_str()?.to_owned(),
            fields["metrics_addr"].as_str()?.to_owned(),
        ));
    }
    if !line.contains("listening") {
        return None;
    }
    let field = |name: &str| {
        line.split(&format!(" {name}="))
            .nth(1)
            .map(|rest| rest.split_whitespace().next().unwrap().to_owned())
    };
    Some((field("addr")?, field("metrics_addr")?))
}

/// A `serve` process of the real binary: one replica of a deployment.
pub struct Replica {
    child: std::process::Child,
    pub base: String,
    metrics: String,
    client: reqwest::Client,
    log: std::sync::mpsc::Receiver<String>,
}

impl Replica {
    /// Serves `ws`'s key from the store `store_flags` name, with `env` set
    /// and `extra` flags after the rest.
    pub fn start(ws: &Workspace, store_flags: &[String], env: &[(&str, &str)], extra: &[&str]) -> Self {
        let mut cmd = command();
        cmd.args(["serve", "--port", "0", "--metrics-port", "0"])
            .args(["--private-key-path", ws.key_path.to_str().unwrap()])
            .args(store_flags)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("start the server");
        let log = process::lines(child.stderr.take().unwrap());
        let (addr, metrics) = process::listening_addrs(&log);
        let local = |a: String| a.replace("[::]", "127.0.0.1").replace("0.0.0.0", "127.0.0.1");
        Self {
            child,
            base: format!("http://{}", local(addr)),
            metrics: format!("http://{}/metrics", local(metrics)),
            client: reqwest::Client::new(),
            log,
        }
    }

    /// The log lines written since the last call.
    #[allow(dead_code)] // not every test binary reads the log
    pub fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    pub async fn status(&self, route: &str, api_key: &str) -> u16 {
        self.client
            .post(format!("{}/v0/token/{route}", self.base))
            .json(&serde_json::json!({ "api_key": api_key }))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn scrape(&self) -> String {
        self.client
            .get(&self.metrics)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Exchanges `api_key` until it is refused (401), for at most `limit`
    /// after `since`; returns how long after `since` that was.
    pub async fn refused_after(
        &self,
        route: &str,
        api_key: &str,
        since: std::time::Instant,
        limit: Duration,
    ) -> Duration {
        loop {
            let status = self.status(route, api_key).await;
            if status == 401 {
                return since.elapsed();
            }
            assert!(since.elapsed() < limit, "still {status} after {:?}", since.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
