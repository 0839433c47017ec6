//! PostgreSQL only: several replicas on one database, and the `migrate`
//! subcommand. (Everything else runs in the shared behaviour suite.)

mod support;

use std::process::Child;
use std::time::{Duration, Instant};

use support::process::{signal, start_server, wait_exit};
use support::{Backend, Workspace, command};

fn replica(ws: &Workspace) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let (child, addr, stderr) = start_server(
        command()
            .args(["serve", "--port", "0", "--metrics-port", "0", "--key-cache-ttl", "1s"])
            .args(["--private-key-path", ws.key_path.to_str().unwrap()])
            .args(&ws.store_flags),
    );
    (child, format!("http://{addr}"), stderr)
}

async fn status(client: &reqwest::Client, base: &str, key: &str) -> u16 {
    client
        .post(format!("{base}/v0/token/integration"))
        .json(&serde_json::json!({ "api_key": key }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn two_replicas_share_one_database() {
    let Some(ws) = Workspace::with_backend(Backend::Postgres, "EdDSA") else {
        return;
    };
    let (mut a, base_a, _log_a) = replica(&ws);
    let (mut b, base_b, _log_b) = replica(&ws);
    let client = reqwest::Client::new();

    // Created with the CLI while both run: both accept it at once.
    let key = ws.integration_key("shared", &[]);
    let doomed = ws.integration_key("shared", &["--key-id", "ki_doomed"]);
    for base in [&base_a, &base_b] {
        assert_eq!(status(&client, base, &key).await, 200);
        assert_eq!(status(&client, base, &doomed).await, 200);
    }

    // Revoked with the CLI: both refuse it within their cache TTL (1 s here).
    let out = ws.admin(&["key", "revoke", "--integration-id", "shared", "--key-id", "ki_doomed"]);
    assert!(out.status.success());
    let revoked_at = Instant::now();
    for base in [&base_a, &base_b] {
        loop {
            if status(&client, base, &doomed).await == 401 {
                break;
            }
            assert!(
                revoked_at.elapsed() < Duration::from_secs(3),
                "{base} still accepts a revoked key"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // 10,000 exchanges spread across both, 20 at a time: no error.
    let bases = [base_a.clone(), base_b.clone()];
    let tasks: Vec<_> = (0..20)
        .map(|t| {
            let (client, key, bases) = (client.clone(), key.clone(), bases.clone());
            tokio::spawn(async move {
                let mut failures = 0;
                for i in 0..500 {
                    if status(&client, &bases[(t + i) % 2], &key).await != 200 {
                        failures += 1;
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = 0;
    for task in tasks {
        failures += task.await.unwrap();
    }
    assert_eq!(failures, 0);

    for child in [&mut a, &mut b] {
        signal(child, "TERM");
        assert_eq!(wait_exit(child).code(), Some(0));
    }
}

#[test]
fn migrate_creates_the_schema_and_is_idempotent() {
    let Ok(admin) = std::env::var("TEST_DATABASE_URL") else {
        support::not_here("TEST_DATABASE_URL", "scripts/test starts PostgreSQL");
        return;
    };
    let url = support::fresh_postgres_database(&admin);
    for _ in 0..2 {
        let out = command().args(["migrate", "--store", &url]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let out = std::process::Command::new("psql")
        .args([
            url.as_str(),
            "-At",
            "-c",
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
        ])
        .output()
        .unwrap();
    let tables = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        tables.lines().collect::<Vec<_>>(),
        [
            "_sqlx_migrations",
            "audit_log",
            "autojoin_keys",
            "integration_keys",
            "integrations",
            "organizations"
        ]
    );
    // An unreachable server is a clear error, not a hang.
    let started = Instant::now();
    let out = command()
        .args([
            "migrate",
            "--store",
            "postgres://postgres:hunter2@127.0.0.1:1/none",
            "--store-timeout",
            "1s",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("PostgreSQL"), "{err}");
    assert!(!err.contains("hunter2"), "the password leaked: {err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A TCP relay to PostgreSQL that can go silent on the change listener's
/// connections (application name `token-exchange-changes`), as a middlebox
/// that drops an idle connection without a FIN or an RST does: from then
/// on what either side sends is taken and never delivered, and nothing is
/// closed. Connections made after that pass as usual.
struct Relay {
    port: u16,
    /// Listener connections numbered up to this go silent.
    silence_before: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Connections accepted so far.
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: String) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silence_before = std::sync::Arc::new(AtomicU64::new(0));
        let silence = silence_before.clone();
        let accepted = std::sync::Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let index = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let silence = silence.clone();
                let is_listener = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let silent = {
                    let is_listener = is_listener.clone();
                    move || is_listener.load(Ordering::SeqCst) && index <= silence.load(Ordering::SeqCst)
                };
                let up_silent = silent.clone();
                let marker = is_listener.clone();
                tokio::spawn(pipe(client_read, server_write, Some(marker), up_silent));
                tokio::spawn(pipe(server_read, client_write, None, silent));
            }
        });
        Self {
            port,
            silence_before,
            accepted,
            task,
        }
    }

    /// Silences the listener connections open now.
    fn silence(&self) {
        use std::sync::atomic::Ordering;
        self.silence_before
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until either ends, dropping what arrives while
/// `silent()`. With `marker`, sets it once the bytes name the listener.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    marker: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    silent: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else { return };
        if n == 0 {
            return;
        }
        if let Some(marker) = &marker {
            let named = buf[..n].windows(22).any(|w| w == b"token-exchange-changes");
            if named {
                marker.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        if silent() {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// Several threads: the relay must run while the test waits for the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_connection_dropped_without_a_fin_is_noticed_and_replaced() {
    let Some(ws) = Workspace::with_backend(Backend::Postgres, "EdDSA") else {
        return;
    };
    let created = support::run_json(
        &[
            &["integration", "create", "--integration-id", "silent", "--json"][..],
            &ws.store_flags.iter().map(String::as_str).collect::<Vec<_>>()[..],
        ]
        .concat(),
    );
    let key = created["api_key"].as_str().unwrap().to_owned();
    let key_id = created["key_id"].as_str().unwrap().to_owned();

    let mut url = url::Url::parse(ws.store_url()).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let relay = Relay::start(upstream).await;
    url.set_port(Some(relay.port)).unwrap();
    let flags = ["--store".to_owned(), url.to_string()];
    let replica = support::Replica::start(&ws, &flags, &[], &["--key-cache-ttl", "10m", "--store-timeout", "1s"]);
    let client = reqwest::Client::new();
    assert_eq!(status(&client, &replica.base, &key).await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The listener's connection goes silent; the lookups' pool is not
    // named as the listener and keeps working, and so does a new listener.
    relay.silence();
    let out = ws.admin(&["key", "revoke", "--integration-id", "silent", "--key-id", &key_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let revoked = Instant::now();
    let took = replica
        .refused_after("integration", &key, revoked, Duration::from_secs(15))
        .await;
    eprintln!("revocation through a silenced listener seen after {took:?}");
    let text = replica.scrape().await;
    assert!(
        support::series(&text, "tokenexchange_key_cache_flushes_total") >= 1.0,
        "{text}"
    );
    assert!(support::series(&text, "tokenexchange_change_feed_recoveries_total") >= 1.0);
    let warned = replica
        .log_lines()
        .iter()
        .any(|l| l.contains("did not answer a heartbeat"));
    assert!(warned, "no warning about the dead listener connection");
    // And it follows changes again on its new connection, in milliseconds.
    let out = ws.admin(&["key", "activate", "--integration-id", "silent", "--key-id", &key_id]);
    assert!(out.status.success());
    let since = Instant::now();
    while status(&client, &replica.base, &key).await != 200 {
        assert!(since.elapsed() < Duration::from_secs(2), "not re-activated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The same dead connection, with the feed in this process: the heartbeat
/// fails within the store timeout, the next read reconnects, and the first
/// answer after it says that anything may have changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_heartbeat_fails_on_a_silent_connection_and_the_feed_recovers() {
    use token_exchange::store::changes::Invalidation;
    let Some(ws) = Workspace::with_backend(Backend::Postgres, "EdDSA") else {
        return;
    };
    let mut url = url::Url::parse(ws.store_url()).unwrap();
    let relay = Relay::start(format!("{}:{}", url.host_str().unwrap(), url.port().unwrap())).await;
    url.set_port(Some(relay.port)).unwrap();
    let mut args = ws.store_args.clone();
    args.store = Some(url.to_string());
    args.store_timeout = Duration::from_millis(500);
    let store = token_exchange::store::open(&args).await.unwrap();
    let mut feed = store.change_feed(Duration::from_millis(100));
    assert!(feed.next().await.unwrap().is_empty(), "connected");
    assert!(feed.next().await.unwrap().is_empty(), "a heartbeat answered");
    relay.silence();
    let started = Instant::now();
    let err = feed.next().await.unwrap_err().to_string();
    assert!(err.contains("did not answer a heartbeat"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let back = feed.next().await.unwrap();
    assert_eq!(
        back.first().map(|n| &n.what),
        Some(&Invalidation::Everything),
        "{back:?}"
    );
    assert_eq!(feed.recoveries(), 1);
    // And it hears changes on the new connection.
    let created = support::run_json(
        &[
            &["integration", "create", "--integration-id", "hb", "--json"][..],
            &ws.store_flags.iter().map(String::as_str).collect::<Vec<_>>()[..],
        ]
        .concat(),
    );
    let key_id = created["key_id"].as_str().unwrap();
    let out = ws.admin(&["key", "revoke", "--integration-id", "hb", "--key-id", key_id]);
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let notices = feed.next().await.unwrap();
        if notices
            .iter()
            .any(|n| matches!(&n.what, Invalidation::IntegrationKey { key_id: k, .. } if k == key_id))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the revocation did not arrive");
    }
}
