//! Signing-key rotation on a running server (the real binary): keys
//! published before they sign, kept after, swapped on SIGHUP or file change,
//! with no failed exchange or verification on the way.

mod support;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
use serde_json::Value;
use support::process::{lines, listening_addrs, signal, wait_exit};
use support::{Workspace, command, run_ok, series};

struct Server {
    child: Child,
    base: String,
    metrics: String,
    _stderr: std::sync::mpsc::Receiver<String>,
}

impl Server {
    fn start(ws: &Workspace, active: &std::path::Path, published: &std::path::Path, poll: &str) -> Self {
        let mut child = command()
            .args(["serve", "--port", "0", "--metrics-port", "0", "--store", ws.store_url()])
            .args(["--private-key-path", active.to_str().unwrap()])
            .args(["--public-key-path", published.to_str().unwrap()])
            .args(["--key-reload-interval", poll])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = lines(child.stderr.take().unwrap());
        let (addr, metrics) = listening_addrs(&stderr);
        Self {
            child,
            base: format!("http://{addr}"),
            metrics: format!("http://{metrics}/metrics"),
            _stderr: stderr,
        }
    }

    async fn kids(&self) -> Vec<String> {
        let jwks: Value = reqwest::get(format!("{}/.well-known/jwks.json", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn reloads(&self, result: &str) -> f64 {
        let text = reqwest::get(&self.metrics).await.unwrap().text().await.unwrap();
        series(
            &text,
            &format!(r#"tokenexchange_signing_key_reloads_total{{result="{result}"}}"#),
        )
    }
}

fn keygen(path: &std::path::Path, alg: &str) -> String {
    let out = run_ok(&["keygen", "--alg", alg, "--out", path.to_str().unwrap()]);
    let public: Value = serde_json::from_slice(&out.stdout).unwrap();
    public["kid"].as_str().unwrap().to_owned()
}

/// Writes a file by renaming a complete temporary one over it, as config
/// management does, so a reader never sees half a file.
fn replace(path: &std::path::Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The client side: exchange, and verify each token against a JWKS it
/// re-fetches every 50 ms (a verifier's cache, scaled down).
struct Client {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    fn start(base: String, api_key: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, o, f) = (stop.clone(), ok.clone(), failures.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let fetch = || async {
                http.get(format!("{base}/.well-known/jwks.json"))
                    .send()
                    .await
                    .unwrap()
                    .json::<jsonwebtoken::jwk::JwkSet>()
                    .await
                    .unwrap()
            };
            let mut jwks = fetch().await;
            let mut fetched = std::time::Instant::now();
            while !s.load(Ordering::SeqCst) {
                if fetched.elapsed() > Duration::from_millis(50) {
                    jwks = fetch().await;
                    fetched = std::time::Instant::now();
                }
                let response = http
                    .post(format!("{base}/v0/token/integration"))
                    .json(&serde_json::json!({ "api_key": api_key }))
                    .send()
                    .await
                    .unwrap();
                if response.status() != 200 {
                    f.lock()
                        .unwrap()
                        .push(format!("exchange answered {}", response.status()));
                    continue;
                }
                let body: Value = response.json().await.unwrap();
                let token = body["token"].as_str().unwrap();
                let header = decode_header(token).unwrap();
                let kid = header.kid.unwrap();
                let Some(jwk) = jwks.find(&kid) else {
                    f.lock().unwrap().push(format!("kid {kid} not in the cached JWKS"));
                    continue;
                };
                let mut validation = Validation::new(header.alg);
                validation.set_audience(&["integration"]);
                validation.set_issuer(&["token-exchange"]);
                match decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &validation) {
                    Ok(_) => {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => f.lock().unwrap().push(format!("verification failed: {e}")),
                }
            }
        });
        Self {
            stop,
            ok,
            failures,
            task,
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        (self.ok.load(Ordering::SeqCst), self.failures.lock().unwrap().clone())
    }
}

#[tokio::test]
async fn rotation_under_load_fails_nothing() {
    let ws = Workspace::new("RS256");
    let api_key = ws.integration_key("steady", &[]);
    let dir = ws.path();
    let (active, published) = (dir.join("active.json"), dir.join("published.json"));
    let old_kid = keygen(&active, "RS256");
    let next_kid = keygen(&dir.join("next.json"), "RS256");
    let next = std::fs::read(dir.join("next.json")).unwrap();
    let old = std::fs::read(&active).unwrap();
    replace(&published, b"{\"keys\":[]}");
    // Polling is slow here: each step is made by SIGHUP.
    let server = Server::start(&ws, &active, &published, "1h");
    assert_eq!(server.kids().await, std::slice::from_ref(&old_kid));
    let client = Client::start(server.base.clone(), api_key.clone());
    // The verifier cache is 50 ms; each wait outlasts it.
    let wait = || tokio::time::sleep(Duration::from_millis(300));
    wait().await;

    // 1. Publish the next key.
    replace(&published, &next);
    signal(&server.child, "HUP");
    wait().await;
    assert_eq!(server.kids().await, [old_kid.clone(), next_kid.clone()]);

    // 2. Make it active; keep publishing the old one.
    replace(&active, &next);
    replace(&published, &old);
    signal(&server.child, "HUP");
    wait().await;
    assert_eq!(server.kids().await, [next_kid.clone(), old_kid.clone()]);

    // 3. Retire the old key once its tokens have expired everywhere.
    replace(&published, b"{\"keys\":[]}");
    signal(&server.child, "HUP");
    wait().await;
    assert_eq!(server.kids().await, std::slice::from_ref(&next_kid));

    let (ok, failures) = client.finish().await;
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(ok > 50, "only {ok} exchanges");
    assert_eq!(server.reloads("success").await, 3.0);
    assert_eq!(server.reloads("failure").await, 0.0);

    let mut child = server.child;
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[tokio::test]
async fn changed_files_are_picked_up_and_broken_ones_change_nothing() {
    let ws = Workspace::new("EdDSA");
    let api_key = ws.integration_key("polled", &[]);
    let dir = ws.path();
    let (active, published) = (dir.join("active.json"), dir.join("published.json"));
    let first_kid = keygen(&active, "EdDSA");
    replace(&published, b"{\"keys\":[]}");
    let server = Server::start(&ws, &active, &published, "100ms");
    let client = Client::start(server.base.clone(), api_key);

    // A corrupt active key: the reload fails, the old key keeps signing.
    let good = std::fs::read(&active).unwrap();
    replace(&active, b"{\"kty\":\"OKP\",\"kid\":\"broken\"");
    for _ in 0..50 {
        if server.reloads("failure").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.reloads("failure").await, 1.0);
    assert_eq!(server.kids().await, std::slice::from_ref(&first_kid));
    // A duplicate kid is refused the same way. (The poll may or may not
    // see the moment between the two writes; either way no reload succeeds.)
    replace(&published, &good);
    replace(&active, &good);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(server.reloads("failure").await >= 2.0);
    assert_eq!(server.reloads("success").await, 0.0);
    assert_eq!(server.kids().await, std::slice::from_ref(&first_kid));

    // A good change is picked up by polling, without a signal.
    let second_kid = keygen(&dir.join("second.json"), "ES256");
    replace(&published, &std::fs::read(dir.join("second.json")).unwrap());
    for _ in 0..50 {
        if server.kids().await.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.kids().await, [first_kid, second_kid]);
    assert_eq!(server.reloads("success").await, 1.0);

    let (ok, failures) = client.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 10);
    let mut child = server.child;
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[tokio::test]
async fn a_key_path_that_blocks_never_stops_the_server() {
    let ws = Workspace::new("EdDSA");
    let api_key = ws.integration_key("fifo", &[]);
    let dir = ws.path();
    let (active, published) = (dir.join("active.json"), dir.join("published.json"));
    keygen(&active, "EdDSA");
    replace(&published, b"{\"keys\":[]}");
    let server = Server::start(&ws, &active, &published, "100ms");
    // A FIFO nobody writes to where the published keys were: opening it
    // for reading would wait for a writer for ever.
    std::fs::remove_file(&published).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&published).status().unwrap();
    assert!(made.success());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    for _ in 0..10 {
        let health = http.get(format!("{}/health", server.base)).send().await.unwrap();
        assert_eq!(health.status(), 200);
        let token = http
            .post(format!("{}/v0/token/integration", server.base))
            .json(&serde_json::json!({ "api_key": api_key }))
            .send()
            .await
            .unwrap();
        assert_eq!(token.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failures = server.reloads("failure").await;
    assert!(
        failures >= 1.0,
        "the FIFO was not refused: {failures}, {}",
        server.reloads("success").await
    );
    // A regular file again: picked up.
    std::fs::remove_file(&published).unwrap();
    replace(&published, b"{\"keys\":[]}");
    let second = keygen(&dir.join("second.json"), "ES256");
    replace(&published, &std::fs::read(dir.join("second.json")).unwrap());
    for _ in 0..50 {
        if server.kids().await.contains(&second) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.kids().await.contains(&second));
    // At start-up, a FIFO is refused with the path named, not waited on.
    let fifo = dir.join("fifo.json");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let out = command()
        .args(["serve", "--port", "0", "--metrics-port", "0", "--store", ws.store_url()])
        .args(["--private-key-path", fifo.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a regular file") && stderr.contains("fifo.json"),
        "{stderr}"
    );
}

#[test]
fn start_up_refuses_duplicate_kids_and_bad_public_keys() {
    let ws = Workspace::new("EdDSA");
    let dir = ws.path();
    std::fs::write(dir.join("garbage.json"), "not json").unwrap();
    for (public, defect) in [
        (ws.key_path.clone(), "used by two keys"),
        (dir.join("garbage.json"), "not a JSON object"),
        (dir.join("missing.json"), "No such file"),
    ] {
        let out = command()
            .args(["serve", "--port", "0", "--metrics-port", "0", "--store", ws.store_url()])
            .args(["--private-key-path", ws.key_path.to_str().unwrap()])
            .args(["--public-key-path", public.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(defect), "{public:?}: {err}");
    }
}
