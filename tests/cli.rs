//! The binary itself: admin commands, start-up errors, `serve --dev`,
//! configuration from the environment, and shutdown on a signal.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::process::{lines, listening_addr, signal, start_server, wait_exit, wait_for};
use support::{Workspace, command, run_json, run_ok};

fn stderr_of(args: &[&str]) -> (bool, String) {
    let out = command().args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn keygen_writes_a_private_file_and_prints_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    for alg in ["RS256", "ES256", "EdDSA"] {
        let path = dir.path().join(format!("{alg}.json"));
        let out = run_ok(&["keygen", "--alg", alg, "--out", path.to_str().unwrap()]);
        let public: Value = serde_json::from_slice(&out.stdout).unwrap();
        let private: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(public["kid"], private["kid"]);
        assert_eq!(public["kid"].as_str().unwrap().len(), 44);
        assert_eq!(public["alg"], alg);
        assert!(public.get("d").is_none());
        assert!(private.get("d").is_some());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let path = dir.path().join("custom.json");
    let out = run_ok(&[
        "keygen",
        "--alg",
        "EdDSA",
        "--kid",
        "2026-11",
        "--out",
        path.to_str().unwrap(),
    ]);
    let public: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(public["kid"], "2026-11");
    // An existing file is never replaced.
    let before = std::fs::read(&path).unwrap();
    let (ok, err) = stderr_of(&["keygen", "--alg", "RS256", "--out", path.to_str().unwrap()]);
    assert!(!ok && err.contains("custom.json"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn integration_create_prints_one_json_object() {
    let ws = Workspace::new("EdDSA");
    let v = run_json(&[
        "integration",
        "create",
        "--store",
        ws.store_url(),
        "--integration-id",
        "acme",
        "--key-id",
        "ki_custom",
        "--json",
    ]);
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 3);
    assert_eq!(v["integration_id"], "acme");
    assert_eq!(v["key_id"], "ki_custom");
    let api_key = v["api_key"].as_str().unwrap();
    assert!(api_key.starts_with("mlabk.cii_acme.ki_custom."));
    assert_eq!(api_key.rsplit('.').next().unwrap().len(), 43);

    // The same key ID again is refused and changes nothing.
    let (ok, err) = stderr_of(&[
        "integration",
        "create",
        "--store",
        ws.store_url(),
        "--integration-id",
        "acme",
        "--key-id",
        "ki_custom",
        "--json",
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");

    // Text output shows the key once, on its own line.
    let out = run_ok(&[
        "integration",
        "create",
        "--store",
        ws.store_url(),
        "--integration-id",
        "acme",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().any(|l| l.starts_with("mlabk.cii_acme.ki_")), "{text}");

    for (flag, value) in [
        ("--integration-id", "has.dot"),
        ("--integration-id", ""),
        ("--key-id", "no-prefix"),
        ("--key-id", "ki_"),
        ("--tier", "-1"),
    ] {
        let mut args = vec!["integration", "create", "--store", ws.store_url()];
        if flag != "--integration-id" {
            args.extend(["--integration-id", "acme"]);
        }
        let arg = format!("{flag}={value}");
        args.push(&arg);
        let (ok, err) = stderr_of(&args);
        assert!(!ok, "{flag} {value:?} accepted");
        assert!(
            err.contains(flag.trim_start_matches('-').split('-').next().unwrap()),
            "{err}"
        );
    }
}

#[test]
fn autojoin_commands() {
    let ws = Workspace::new("EdDSA");
    let (ok, err) = stderr_of(&[
        "autojoin",
        "create-key",
        "--store",
        ws.store_url(),
        "--org",
        "nobody",
        "--json",
    ]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    let key = ws.autojoin_key("mlab");
    assert_eq!(key.len(), 43);
    let (ok, err) = stderr_of(&[
        "autojoin",
        "create-org",
        "--store",
        ws.store_url(),
        "--org",
        "mlab",
        "--email",
        "a@b.c",
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, err) = stderr_of(&[
        "autojoin",
        "create-org",
        "--store",
        ws.store_url(),
        "--org",
        "x",
        "--email",
        "nope",
    ]);
    assert!(!ok && err.contains("email"), "{err}");
}

#[test]
fn serve_refuses_missing_or_broken_key_files() {
    let ws = Workspace::new("EdDSA");
    let dir = ws.path();
    let public_only = {
        let mut v: Value = serde_json::from_slice(&std::fs::read(&ws.key_path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("d");
        v.to_string()
    };
    let no_kid = {
        let mut v: Value = serde_json::from_slice(&std::fs::read(&ws.key_path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("kid");
        v.to_string()
    };
    let cases = [
        ("missing.json", None, "No such file"),
        ("garbage.json", Some("this is not json"), "not a JSON object"),
        ("public.json", Some(public_only.as_str()), "public key only"),
        ("nokid.json", Some(no_kid.as_str()), "kid"),
        (
            "hs256.json",
            Some(r#"{"kty":"oct","kid":"k","alg":"HS256","k":"AAAA"}"#),
            "unsupported",
        ),
    ];
    for (name, contents, defect) in cases {
        let path = dir.join(name);
        if let Some(text) = contents {
            std::fs::write(&path, text).unwrap();
        }
        let (ok, err) = stderr_of(&[
            "serve",
            "--port",
            "0",
            "--store",
            ws.store_url(),
            "--private-key-path",
            path.to_str().unwrap(),
        ]);
        assert!(!ok, "{name} accepted");
        assert!(err.contains(name) && err.contains(defect), "{name}: {err}");
    }
    // Without any flag the Go default path is used and named.
    let (ok, err) = stderr_of(&["serve", "--port", "0", "--store", ws.store_url()]);
    assert!(!ok && err.contains("/secrets/jwk-priv.json"), "{err}");
}

#[tokio::test]
async fn serve_reads_the_environment_and_exits_cleanly_on_sigterm() {
    let ws = Workspace::new("ES256");
    let key = ws.integration_key("envco", &[]);
    // Configuration from the environment only, and no subcommand: how the
    // Go service's deployments run it. Port 0 picks a free port.
    let (mut child, addr, _stderr) = start_server(
        command()
            .env("PORT", "0")
            .env("METRICS_PORT", "0")
            .env("STORE", ws.store_url())
            .env("PRIVATE_KEY_PATH", &ws.key_path),
    );
    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://{addr}/v0/token/integration"))
        .body(format!(r#"{{"api_key":"{key}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let jwks: Value = client
        .get(format!("http://{addr}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"][0]["alg"], "ES256");

    signal(&child, "TERM");
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0));
    // The port is released.
    assert!(client.get(format!("http://{addr}/health")).send().await.is_err());
}

#[tokio::test]
async fn a_flag_beats_the_environment() {
    let ws = Workspace::new("EdDSA");
    let mut child = command()
        .args(["serve", "--port", "0", "--metrics-port", "0", "--store", ws.store_url()])
        .env("PORT", "1") // would fail: privileged port
        .env("STORE", "sqlite:/nonexistent-dir/x.db")
        .env("PRIVATE_KEY_PATH", &ws.key_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = lines(child.stderr.take().unwrap());
    let addr = listening_addr(&stderr);
    assert!(!addr.ends_with(":1"));
    signal(&child, "INT");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

/// Runs a `curl -s -X POST URL -d 'BODY'` line that `serve --dev` printed;
/// returns the status.
async fn run_printed_curl(line: &str) -> u16 {
    let body = line.split("-d '").nth(1).unwrap().trim_end_matches('\'');
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap();
    let response = reqwest::Client::new()
        .post(url)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

#[tokio::test]
async fn serve_dev_needs_no_setup_and_prints_a_working_curl() {
    let dir = tempfile::tempdir().unwrap();
    let start = |dir: &std::path::Path| {
        command()
            .args(["serve", "--dev", "--port", "0", "--metrics-port", "0"])
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut kids = Vec::new();
    // Twice: the second start reuses the key, store and demo keys.
    for round in 0..2 {
        let mut child = start(dir.path());
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        if round == 0 {
            wait_for(&stderr, "DEVELOPMENT signing key");
        }
        let addr = listening_addr(&stderr);
        assert!(
            addr.starts_with("127.0.0.1:"),
            "dev mode listens on loopback only: {addr}"
        );
        for route in ["integration", "autojoin"] {
            let status = run_printed_curl(&wait_for(&stdout, &format!("/v0/token/{route} -d"))).await;
            assert_eq!(status, 200, "{route}, round {round}");
        }
        let jwks: Value = reqwest::get(format!("http://{addr}/.well-known/jwks.json"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        kids.push(jwks["keys"][0]["kid"].as_str().unwrap().to_owned());
        assert_eq!(jwks["keys"][0]["alg"], "RS256");
        signal(&child, "TERM");
        assert_eq!(wait_exit(&mut child).code(), Some(0));
    }
    assert_eq!(kids[0], kids[1], "the development key is kept between runs");
    assert!(dir.path().join("token-exchange-dev/jwk-priv.json").exists());
    // Private: the folder and the database in it.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("token-exchange-dev"), 0o700);
    assert_eq!(mode("token-exchange-dev/token-exchange.db"), 0o600);
}

#[tokio::test]
async fn serve_survives_a_closed_log_pipe() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("pipes", &[]);
    let (mut child, addr, stderr) = start_server(
        command()
            .args(["serve", "--port", "0", "--metrics-port", "0", "--store", ws.store_url()])
            .args(["--private-key-path", ws.key_path.to_str().unwrap()])
            .env("RUST_LOG", "debug"),
    );
    // Whoever read the log went away (a crashed log shipper, `| head`).
    drop(stderr);
    std::thread::sleep(Duration::from_millis(200));
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let bad = client
            .post(format!("http://{addr}/v0/token/integration"))
            .body(r#"{"api_key":"bad"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 401);
    }
    let good = client
        .post(format!("http://{addr}/v0/token/integration"))
        .body(format!(r#"{{"api_key":"{key}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 200);
    assert_eq!(child.try_wait().unwrap(), None, "the server is still running");
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

/// Runs an admin command on `ws` in its text form; returns (success, stdout, stderr).
fn text(ws: &Workspace, args: &[&str]) -> (bool, String, String) {
    let out = ws.admin(args);
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Every admin command's human-readable form, on an empty store and a full
/// one, and each command that names something missing: it fails, says what
/// is missing, and prints nothing on stdout.
#[test]
fn admin_commands_in_text_form() {
    let ws = Workspace::new("EdDSA");
    assert_eq!(text(&ws, &["integration", "list"]).1, "No integrations.\n");
    assert_eq!(text(&ws, &["autojoin", "list-orgs"]).1, "No organizations.\n");

    ws.admin_json(&[
        "integration",
        "create",
        "--integration-id",
        "acme",
        "--key-id",
        "ki_one",
        "--tier",
        "2",
        "--integration-description",
        "Acme's backend",
    ]);
    let (ok, out, _) = text(&ws, &["integration", "list"]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("INTEGRATION  CREATED"), "{out}");
    assert!(
        lines[1].starts_with("acme ") && lines[1].ends_with("Acme's backend"),
        "{out}"
    );

    let (ok, out, _) = text(&ws, &["integration", "show", "--integration-id", "acme"]);
    assert!(ok);
    let row = out.lines().nth(1).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..3], ["ki_one", "active", "2"], "{out}");

    let (_, out, _) = text(
        &ws,
        &[
            "key",
            "set-tier",
            "--integration-id",
            "acme",
            "--key-id",
            "ki_one",
            "--tier",
            "0",
        ],
    );
    assert_eq!(out, "Key ki_one of integration acme now has tier 0.\n");
    let (_, out, _) = text(
        &ws,
        &["key", "revoke", "--integration-id", "acme", "--key-id", "ki_one"],
    );
    assert!(
        out.starts_with("Key ki_one of integration acme is now revoked.\n"),
        "{out}"
    );
    assert!(out.contains("--key-cache-ttl"), "the revocation lag is named: {out}");
    let (_, out, _) = text(
        &ws,
        &["key", "activate", "--integration-id", "acme", "--key-id", "ki_one"],
    );
    assert_eq!(out, "Key ki_one of integration acme is now active.\n");

    let (ok, out, _) = text(
        &ws,
        &["key", "rotate", "--integration-id", "acme", "--key-id", "ki_one"],
    );
    assert!(ok);
    assert!(out.contains("(tier 0) to replace ki_one of integration acme"), "{out}");
    assert!(out.contains("ki_one stays active until you revoke it."), "{out}");
    let api_key = out.lines().last().unwrap();
    assert!(api_key.starts_with("mlabk.cii_acme.ki_"), "{out}");
    let new_id = api_key.split('.').nth(2).unwrap();
    let (_, out, _) = text(&ws, &["integration", "show", "--integration-id", "acme"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.contains(new_id) && !out.contains(api_key), "{out}");

    let (_, out, _) = text(
        &ws,
        &["key", "delete", "--integration-id", "acme", "--key-id", "ki_one"],
    );
    assert_eq!(out, "Deleted key ki_one of integration acme.\n");
    let (_, out, _) = text(&ws, &["integration", "delete", "--integration-id", "acme"]);
    assert_eq!(out, "Deleted integration acme and its 1 key(s).\n");
    ws.admin_json(&["integration", "create", "--integration-id", "empty"]);
    let key_id = ws.admin_json(&["integration", "show", "--integration-id", "empty"])["keys"][0]["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    text(
        &ws,
        &["key", "delete", "--integration-id", "empty", "--key-id", &key_id],
    );
    let (_, out, _) = text(&ws, &["integration", "show", "--integration-id", "empty"]);
    assert_eq!(out, "Integration empty has no keys.\n");

    // Missing things: a non-zero exit, the name in the message, no stdout.
    for args in [
        &["integration", "delete", "--integration-id", "nope"][..],
        &["key", "revoke", "--integration-id", "empty", "--key-id", "ki_nope"],
        &[
            "key",
            "set-tier",
            "--integration-id",
            "nope",
            "--key-id",
            "ki_x",
            "--tier",
            "1",
        ],
        &["key", "delete", "--integration-id", "empty", "--key-id", "ki_nope"],
        &["key", "rotate", "--integration-id", "empty", "--key-id", "ki_nope"],
        &["autojoin", "delete-org", "--org", "nope"],
        &["autojoin", "list-keys", "--org", "nope"],
        &["autojoin", "delete-key", "--org", "nope", "--fingerprint", "abcdef01"],
    ] {
        let (ok, out, err) = text(&ws, args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(err.contains("nope") || err.contains("ki_nope"), "{args:?}: {err}");
    }

    ws.autojoin_key("mlab");
    let (_, out, _) = text(&ws, &["autojoin", "list-orgs"]);
    let row = out.lines().nth(1).unwrap();
    assert!(row.starts_with("mlab ") && row.contains("ops@example.org"), "{out}");
    let (_, out, _) = text(&ws, &["autojoin", "list-keys", "--org", "mlab"]);
    assert!(out.starts_with("FINGERPRINT"), "{out}");
    let fingerprint = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let (_, out, _) = text(
        &ws,
        &["autojoin", "delete-key", "--org", "mlab", "--fingerprint", &fingerprint],
    );
    assert_eq!(out, format!("Deleted the key {fingerprint} of organization mlab.\n"));
    let (_, out, _) = text(&ws, &["autojoin", "list-keys", "--org", "mlab"]);
    assert_eq!(out, "Organization mlab has no keys.\n");
    ws.admin_json(&["autojoin", "create-key", "--org", "mlab"]);
    let (_, out, _) = text(&ws, &["autojoin", "delete-org", "--org", "mlab"]);
    assert_eq!(out, "Deleted organization mlab and its 1 key(s).\n");
}

/// `serve --dev` on a store that already has keys and with a key file of
/// one's own: it uses both as they are (no demo keys, no generated key) and
/// says how to make a key instead of printing a demo one.
#[tokio::test]
async fn serve_dev_uses_an_existing_store_and_key_as_they_are() {
    let ws = Workspace::new("EdDSA");
    ws.integration_key("existing", &[]);
    let data_dir = ws.path().join("dev-data");
    let mut child = command()
        .args([
            "serve",
            "--dev",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--store",
            ws.store_url(),
        ])
        .args(["--private-key-path", ws.key_path.to_str().unwrap()])
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = lines(child.stdout.take().unwrap());
    let stderr = lines(child.stderr.take().unwrap());
    let addr = listening_addr(&stderr);
    let hint = wait_for(&stdout, "token-exchange integration create");
    assert!(hint.contains("--integration-id demo"), "{hint}");
    let jwks: Value = reqwest::get(format!("http://{addr}/.well-known/jwks.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        jwks["keys"][0]["alg"], "EdDSA",
        "the configured key, not a generated RS256 one"
    );
    signal(&child, "TERM");
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert!(!data_dir.join("jwk-priv.json").exists());
    assert!(!data_dir.join("demo-integration-key").exists());
}

/// The audit log names the account the process runs as, whatever `$USER`
/// says, and a credentials file only when it is the credential in use;
/// tables never print stored control characters raw.
#[test]
fn the_operator_is_the_real_account_and_tables_escape_control_characters() {
    let ws = Workspace::new("EdDSA");
    let credentials = ws.path().join("sa.json");
    std::fs::write(
        &credentials,
        r#"{"type":"service_account","client_email":"forged\nrow@example.iam.gserviceaccount.com"}"#,
    )
    .unwrap();
    let admin = |args: &[&str]| {
        let out = command()
            .args(args)
            .args(&ws.store_flags)
            .env("USER", "mallory")
            .env("LOGNAME", "mallory")
            .env("GOOGLE_APPLICATION_CREDENTIALS", &credentials)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    admin(&[
        "integration",
        "create",
        "--integration-id",
        "ctl",
        "--integration-description",
        "line one\nctl  2026-01-01T00:00:00Z  forged row\u{1b}[2J",
    ]);
    let log: Value = serde_json::from_str(&admin(&["audit", "list", "--json"])).unwrap();
    let operator = log["records"][0]["operator"].as_str().unwrap().to_owned();
    let me = std::process::Command::new("id").arg("-un").output().unwrap();
    let me = String::from_utf8(me.stdout).unwrap().trim().to_owned();
    // SQLite: no Google credential is in use, so the file is not named.
    assert_eq!(operator, me, "{log}");
    assert!(!operator.contains("mallory"));

    let table = admin(&["integration", "list"]);
    assert_eq!(table.lines().count(), 2, "one header, one row: {table}");
    assert!(table.contains("line one\\nctl"), "{table}");
    assert!(!table.contains('\u{1b}'), "{table:?}");
}

/// Durations that would put an instant past the year 9999 (or before year
/// 0) are refused with a message and exit 1, never a panic.
#[test]
fn durations_past_the_year_9999_are_refused_clearly() {
    let ws = Workspace::new("EdDSA");
    let created = ws.admin_json(&["integration", "create", "--integration-id", "far"]);
    let key_id = created["key_id"].as_str().unwrap().to_owned();
    ws.admin(&[
        "autojoin",
        "create-org",
        "--org",
        "far-org",
        "--email",
        "ops@example.org",
    ]);
    for (args, flag) in [
        (
            vec![
                "integration",
                "create",
                "--integration-id",
                "far",
                "--expires-in",
                "3000000d",
            ],
            "--expires-in",
        ),
        (
            vec![
                "key",
                "set-expiry",
                "--integration-id",
                "far",
                "--key-id",
                &key_id,
                "--expires-in",
                "99999999d",
            ],
            "--expires-in",
        ),
        (
            vec!["autojoin", "create-key", "--org", "far-org", "--expires-in", "3000000d"],
            "--expires-in",
        ),
        (vec!["audit", "list", "--since", "3000000d"], "--since"),
        (vec!["integration", "list", "--unused-for", "3000000d"], "--unused-for"),
    ] {
        let out = ws.admin(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("too far"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // Nothing was changed by the refused commands.
    let shown = ws.admin_json(&["integration", "show", "--integration-id", "far"]);
    assert_eq!(shown["keys"].as_array().unwrap().len(), 1);
    assert_eq!(shown["keys"][0]["expires_at"], Value::Null);
}

/// The SQLite file holds key hashes and e-mail addresses: created private
/// even through a symbolic link to a file not there yet, a file others can
/// read is used with a warning, and what is not a regular file is refused.
#[test]
fn the_sqlite_file_is_private_and_a_readable_one_is_reported() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let list = |path: &std::path::Path| {
        command()
            .args(["integration", "list", "--store"])
            .arg(format!("sqlite:{}", path.display()))
            .output()
            .unwrap()
    };
    let create = |path: &std::path::Path| {
        command()
            .args(["integration", "create", "--integration-id", "p", "--store"])
            .arg(format!("sqlite:{}", path.display()))
            .output()
            .unwrap()
    };
    // Through a link to a file that does not exist yet.
    let target = dir.path().join("real.db");
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = create(&link);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    // Made readable by others: used, and said so.
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = list(&target);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600") && stderr.contains("real.db"), "{stderr}");
    // A FIFO is refused at once, naming the path.
    let fifo = dir.path().join("fifo.db");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let out = list(&fifo);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a regular file") && stderr.contains("fifo.db"),
        "{stderr}"
    );
}
