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
        eprintln!("SKIPPED: TEST_DATABASE_URL is not set (scripts/test starts PostgreSQL)");
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
