//! Deployed the way the Go service is: no arguments, no STORE, Go's
//! environment. The store is Datastore; with no credentials to be had the
//! server refuses to start; its start-up line says what runs; it listens on
//! IPv6 and IPv4; admin commands run like Go's `create-integration` reach
//! Datastore and say so.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::process::{lines, signal, startup_fields, wait_exit};
use support::{GoStyleKeys, TEST_PROJECT, command, get_json, unique};

/// The binary with Go's deployment environment and nothing else of ours:
/// the project and namespace service.yaml sets, Cloud Run's PORT, the
/// metrics address Go's prometheusx reads (port 0: tests run side by side).
fn go_environment(cmd: &mut Command, platform_ns: &str, key_path: &std::path::Path) {
    cmd.env("PROJECT_ID", TEST_PROJECT)
        .env("PLATFORM_NS", platform_ns)
        .env("PORT", "0")
        .env("PROMETHEUSX_LISTEN_ADDRESS", "127.0.0.1:0")
        // Outside a container the key is not at /secrets/jwk-priv.json
        // (tests/runtime_image.rs runs it there, without this variable).
        .env("PRIVATE_KEY_PATH", key_path);
}

/// Makes every way to Google credentials a dead end on loopback: no
/// emulator, no credentials file, an empty HOME, and a metadata server
/// address where nothing listens.
fn no_credentials(cmd: &mut Command, home: &std::path::Path) {
    let closed = support::emulator::free_port();
    cmd.env_remove("DATASTORE_EMULATOR_HOST")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env("HOME", home)
        .env("GCE_METADATA_HOST", format!("127.0.0.1:{closed}"));
}

fn keygen(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("jwk-priv.json");
    support::run_ok(&["keygen", "--alg", "RS256", "--out", path.to_str().unwrap()]);
    path
}

fn start(cmd: &mut Command) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server");
    let stderr = lines(child.stderr.take().unwrap());
    (child, stderr)
}

#[test]
fn without_credentials_the_server_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let home = tempfile::tempdir().unwrap();
    let mut cmd = command();
    go_environment(&mut cmd, "platform-credentials", &key);
    no_credentials(&mut cmd, home.path());
    let started = Instant::now();
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    // It says what to set, and never came up.
    for what in [
        "no Google credentials",
        "DATASTORE_EMULATOR_HOST",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "--store",
    ] {
        assert!(stderr.contains(what), "{what}: {stderr}");
    }
    assert!(!stderr.contains("listening"), "{stderr}");

    // A credentials file that is not there is an error too.
    let mut cmd = command();
    go_environment(&mut cmd, "platform-credentials", &key);
    no_credentials(&mut cmd, home.path());
    cmd.env("GOOGLE_APPLICATION_CREDENTIALS", dir.path().join("missing.json"));
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("missing.json"), "{stderr}");

    // So do admin commands: nothing is printed as created.
    let mut cmd = command();
    no_credentials(&mut cmd, home.path());
    let out = cmd
        .args(["integration", "create", "--integration-id", "nowhere"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Google credentials"));
}

#[tokio::test]
async fn with_go_s_environment_it_serves_datastore_keys() {
    if std::env::var_os("DATASTORE_EMULATOR_HOST").is_none() {
        support::not_here("DATASTORE_EMULATOR_HOST", "scripts/test starts the emulator");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let platform_ns = unique("pc");
    let keys = GoStyleKeys::create(&platform_ns);

    let mut cmd = command();
    go_environment(&mut cmd, &platform_ns, &key);
    let (mut child, stderr) = start(&mut cmd);
    let fields = startup_fields(&stderr);
    let store = fields["store"].as_str().unwrap();
    assert!(
        store.contains(&format!("Datastore project {TEST_PROJECT}"))
            && store.contains("client-integration")
            && store.contains(&platform_ns),
        "{store}"
    );
    assert_eq!(fields["alg"], "RS256");
    let kid = fields["active_kid"].as_str().unwrap();
    assert!(fields["published"].as_str().unwrap().contains(kid), "{fields}");
    // Every interface, as Go's `:8080`.
    let addr = fields["addr"].as_str().unwrap();
    assert!(addr.starts_with("[::]:") || addr.starts_with("0.0.0.0:"), "{addr}");
    let port = addr.rsplit(':').next().unwrap();
    assert!(fields["metrics_addr"].as_str().unwrap().starts_with("127.0.0.1:"));

    let base = format!("http://127.0.0.1:{port}");
    let [integration, autojoin] = keys.exchange_both(&base).await;
    assert_eq!(integration["int_id"], keys.name.as_str());
    assert_eq!(integration["tier"], 2);
    assert_eq!(autojoin["org"], keys.name.as_str());
    let jwks = get_json(&format!("{base}/.well-known/jwks.json")).await;
    assert_eq!(jwks["keys"][0]["kid"], kid);
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[tokio::test]
async fn it_listens_on_ipv6_and_ipv4_and_names_its_store() {
    let ws = support::Workspace::new("EdDSA");
    let mut cmd = command();
    cmd.args(["--store", ws.store_url()])
        .env("PORT", "0")
        .env("PROMETHEUSX_LISTEN_ADDRESS", ":0")
        .env("PRIVATE_KEY_PATH", &ws.key_path);
    let (mut child, stderr) = start(&mut cmd);
    let fields = startup_fields(&stderr);
    let absolute = ws.path().join("store.db");
    assert_eq!(fields["store"], format!("SQLite file {}", absolute.display()));
    assert_eq!(fields["alg"], "EdDSA");

    let client = reqwest::Client::new();
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    for field in ["addr", "metrics_addr"] {
        let addr = fields[field].as_str().unwrap();
        let port = addr.rsplit(':').next().unwrap();
        let path = if field == "addr" { "/health" } else { "/metrics" };
        let mut hosts = vec!["127.0.0.1".to_owned()];
        if ipv6 {
            assert!(addr.starts_with("[::]:"), "{addr}");
            hosts.push("[::1]".to_owned());
        } else {
            eprintln!("no IPv6 on this machine: IPv4 only");
        }
        for host in hosts {
            let answer = client.get(format!("http://{host}:{port}{path}")).send().await;
            assert_eq!(answer.unwrap().status(), 200, "{host} {field}");
        }
    }
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[tokio::test]
async fn the_start_up_line_names_postgres_without_its_password() {
    let Some(ws) = support::Workspace::with_backend(support::Backend::Postgres, "ES256") else {
        return;
    };
    // The test server trusts loopback, so any password connects.
    let mut url = url::Url::parse(ws.store_url()).unwrap();
    url.set_password(Some("hunter2-secret")).unwrap();
    let database = url.path().trim_start_matches('/').to_owned();
    let (host, port) = (url.host_str().unwrap().to_owned(), url.port().unwrap());
    let mut cmd = command();
    cmd.args(["--store", url.as_str(), "--port", "0", "--metrics-port", "0"])
        .env("PRIVATE_KEY_PATH", &ws.key_path);
    let (mut child, stderr) = start(&mut cmd);
    let fields = startup_fields(&stderr);
    assert_eq!(
        fields["store"],
        format!("PostgreSQL database {database} on {host}:{port}")
    );
    assert!(!fields.to_string().contains("hunter2"), "{fields}");
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}
