//! Hostile input over a real socket: one table, one raw request per row and
//! its exact expected status; after all rows the server still answers.

mod support;

use std::time::Duration;

use support::{Workspace, settings, spawn_app_full};
use token_exchange::http::Settings;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How a row's request is sent.
enum Send {
    /// All at once.
    Whole,
    /// The body in `pieces` parts, `gap` apart.
    Slowly { pieces: usize, gap: Duration },
}

struct Row {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    send: Send,
    status: u16,
}

fn row(what: &'static str, path: &'static str, body: impl Into<Vec<u8>>, status: u16) -> Row {
    Row {
        what,
        method: "POST",
        path,
        content_type: "application/json",
        body: body.into(),
        send: Send::Whole,
        status,
    }
}

const INTEGRATION: &str = "/v0/token/integration";
const AUTOJOIN: &str = "/v0/token/autojoin";

fn body_with_key(key: &[u8]) -> Vec<u8> {
    [&b"{\"api_key\":\""[..], key, b"\"}"].concat()
}

async fn send(addr: &str, row: &Row) -> u16 {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{} {} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        row.method,
        row.path,
        row.content_type,
        row.body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    match row.send {
        Send::Whole => {
            // The server may answer (413) and close before reading it all.
            let _ = conn.write_all(&row.body).await;
        }
        Send::Slowly { pieces, gap } => {
            for chunk in row.body.chunks(row.body.len().div_ceil(pieces).max(1)) {
                tokio::time::sleep(gap).await;
                if conn.write_all(chunk).await.is_err() {
                    break;
                }
            }
        }
    }
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{}: no status line in {text:?}", row.what))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_request_gets_its_status_and_the_server_survives() {
    let ws = Workspace::new("EdDSA");
    let good = ws.integration_key("hostile", &[]);
    let revoked = ws.integration_key("hostile", &["--key-id", "ki_revoked"]);
    let out = ws.admin(&["key", "revoke", "--integration-id", "hostile", "--key-id", "ki_revoked"]);
    assert!(out.status.success());
    let store = token_exchange::store::open(&ws.store_args).await.unwrap();
    let app = spawn_app_full(
        store,
        &ws,
        Settings {
            request_timeout: Duration::from_secs(2),
            ..settings(&ws)
        },
    )
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();

    let mut one_byte_off = good.clone().into_bytes();
    let last = one_byte_off.len() - 1;
    one_byte_off[last] = if one_byte_off[last] == b'A' { b'B' } else { b'A' };
    let big = |n: usize| body_with_key(&vec![b'k'; n]);

    let mut rows = vec![
        row("empty body", INTEGRATION, "", 400),
        row("JSON null", INTEGRATION, "null", 401),
        row("JSON array", INTEGRATION, "[]", 400),
        row("array holding the key", INTEGRATION, format!("[\"{good}\"]"), 400),
        row("empty object", INTEGRATION, "{}", 401),
        row("number as key", INTEGRATION, r#"{"api_key":123}"#, 400),
        row("null key", INTEGRATION, r#"{"api_key":null}"#, 401),
        row(
            "duplicate api_key",
            INTEGRATION,
            format!(r#"{{"api_key":"{good}","api_key":"{good}"}}"#),
            400,
        ),
        row("10 KB key", INTEGRATION, big(10 * 1024), 413),
        row("100 KB key", INTEGRATION, big(100 * 1024), 413),
        row("10 KB autojoin key", AUTOJOIN, big(10 * 1024), 413),
        row(
            "escaped NUL in key",
            INTEGRATION,
            r#"{"api_key":"mlabk.cii_a\u0000.ki_b.secret"}"#,
            401,
        ),
        row(
            "raw NUL in key",
            INTEGRATION,
            body_with_key(b"mlabk.cii_a\0.ki_b.secret"),
            400,
        ),
        row(
            "invalid UTF-8 in key",
            INTEGRATION,
            body_with_key(b"mlabk.cii_a\xff.ki_b.secret"),
            400,
        ),
        row(
            "invalid UTF-8 autojoin key",
            AUTOJOIN,
            body_with_key(b"\xc3\x28\xa0\xa1"),
            400,
        ),
        row("two dots", INTEGRATION, body_with_key(b"mlabk.cii_a.ki_b"), 401),
        row("four dots", INTEGRATION, body_with_key(b"mlabk.cii_a.ki_b.c.d"), 401),
        row(
            "no mlabk. prefix",
            INTEGRATION,
            body_with_key(good.trim_start_matches("mlabk.").as_bytes()),
            401,
        ),
        row(
            "no cii_ prefix",
            INTEGRATION,
            body_with_key(good.replacen("cii_", "", 1).as_bytes()),
            401,
        ),
        row(
            "no ki_ prefix",
            INTEGRATION,
            body_with_key(good.replacen("ki_", "", 1).as_bytes()),
            401,
        ),
        row(
            "one secret byte changed",
            INTEGRATION,
            body_with_key(&one_byte_off),
            401,
        ),
        row("revoked key ID", INTEGRATION, body_with_key(revoked.as_bytes()), 401),
        row(
            "integration key on autojoin",
            AUTOJOIN,
            body_with_key(good.as_bytes()),
            401,
        ),
        row("1 MiB body", INTEGRATION, vec![b' '; 1 << 20], 413),
        row(
            "trailing garbage after the object",
            INTEGRATION,
            format!(r#"{{"api_key":"{good}"}}garbage"#),
            200,
        ),
        row("unknown path", "/v0/token/other", body_with_key(good.as_bytes()), 404),
        row("path with a key in it", "/v0/token/mlabk.cii_a.ki_b.c", "", 404),
    ];
    let mut text_plain = row(
        "wrong content type (accepted, as Go does)",
        INTEGRATION,
        body_with_key(good.as_bytes()),
        200,
    );
    text_plain.content_type = "text/plain";
    rows.push(text_plain);
    let mut form = row(
        "form content type (curl -d)",
        INTEGRATION,
        body_with_key(good.as_bytes()),
        200,
    );
    form.content_type = "application/x-www-form-urlencoded";
    rows.push(form);
    let mut slow = row(
        "body sent slowly, within the deadline",
        INTEGRATION,
        body_with_key(good.as_bytes()),
        200,
    );
    slow.send = Send::Slowly {
        pieces: 5,
        gap: Duration::from_millis(100),
    };
    rows.push(slow);
    let mut too_slow = row(
        "body sent slower than the body read timeout",
        INTEGRATION,
        body_with_key(good.as_bytes()),
        408,
    );
    too_slow.send = Send::Slowly {
        pieces: 10,
        gap: Duration::from_millis(400),
    };
    rows.push(too_slow);
    for (method, path) in [
        ("GET", INTEGRATION),
        ("PUT", INTEGRATION),
        ("DELETE", INTEGRATION),
        ("GET", AUTOJOIN),
        ("PUT", AUTOJOIN),
        ("DELETE", AUTOJOIN),
    ] {
        let mut r = row(
            "wrong method on a POST route",
            path,
            body_with_key(good.as_bytes()),
            405,
        );
        r.method = method;
        rows.push(r);
    }
    let mut jwks_post = row("POST on the JWKS", "/.well-known/jwks.json", "", 405);
    jwks_post.method = "POST";
    rows.push(jwks_post);
    // Go's router answers a wrong method before any handler reads the body.
    let mut big_put = row("PUT with a 1 MiB body", INTEGRATION, vec![b' '; 1 << 20], 405);
    big_put.method = "PUT";
    rows.push(big_put);
    // Unclean paths are redirected for any method, as Go's router does.
    rows.push(row(
        "doubled slash in a token route",
        "/v0//token/integration",
        body_with_key(good.as_bytes()),
        301,
    ));
    rows.push(row("dot-dot in a path", "/v0/token/x/../integration", "", 301));
    let mut get_health = row("doubled slash before health", "//health", "", 301);
    get_health.method = "GET";
    rows.push(get_health);
    // The member name matches in any case, as in Go; two matches are refused.
    rows.push(row(
        "API_KEY in capitals",
        INTEGRATION,
        format!(r#"{{"API_KEY":"{good}"}}"#),
        200,
    ));
    rows.push(row(
        "api_key and API_KEY",
        INTEGRATION,
        format!(r#"{{"api_key":"{good}","API_KEY":"{good}"}}"#),
        400,
    ));

    let mut failures = Vec::new();
    for r in &rows {
        let got = send(&addr, r).await;
        if got != r.status {
            failures.push(format!(
                "{} ({} {}): got {got}, want {}",
                r.what, r.method, r.path, r.status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Still serving, and the good key still works.
    assert_eq!(app.get_status("/health").await, 200);
    assert_eq!(app.status("integration", &good).await, 200);
}
