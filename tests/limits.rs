//! Request limits over real sockets: body size, body read timeout, request
//! deadline, header read timeout, and load shedding.

mod support;

use std::time::{Duration, Instant};

use support::{Workspace, settings, spawn_app_full};
use token_exchange::http::Settings;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn app(ws: &Workspace, settings: Settings) -> support::TestApp {
    let store = token_exchange::store::open(&ws.store_args).await.unwrap();
    spawn_app_full(store, ws, settings).await
}

fn addr(app: &support::TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// Reads what the server sends until it closes or `limit` passes.
async fn read_response(conn: &mut TcpStream, limit: Duration) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, conn.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn post_head(len: usize) -> String {
    format!("POST /v0/token/integration HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n")
}

#[tokio::test]
async fn a_huge_body_is_413_without_being_read_and_the_server_keeps_serving() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("big", &[]);
    let app = app(&ws, settings(&ws)).await;

    // Declared size over the limit: refused from the headers alone.
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    conn.write_all(post_head(1 << 20).as_bytes()).await.unwrap();
    let response = read_response(&mut conn, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.ends_with("Request body too large\n"), "{response}");

    // Chunked, no declared size: refused once 4 KiB have arrived.
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    conn.write_all(
        b"POST /v0/token/integration HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 1024, "x".repeat(1024));
    let mut sent = 0;
    for _ in 0..1024 {
        if conn.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        sent += 1024;
        if sent > 64 * 1024 {
            break;
        }
    }
    let response = read_response(&mut conn, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");

    // A 1 MiB body through a normal client, then a normal request.
    let big = format!(r#"{{"api_key":"{key}","pad":"{}"}}"#, "p".repeat(1 << 20));
    let status = app
        .client
        .post(format!("{}/v0/token/integration", app.base))
        .body(big)
        .send()
        .await;
    if let Ok(r) = status {
        assert_eq!(r.status(), 413);
    } // else: the server closed the connection while the client was still sending.
    assert_eq!(app.status("integration", &key).await, 200);
}

#[tokio::test]
async fn a_request_past_its_deadline_is_503() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("slow", &[]);
    let app = app(
        &ws,
        Settings {
            request_timeout: Duration::from_millis(500),
            ..settings(&ws)
        },
    )
    .await;
    // The store is locked for longer than the deadline (busy timeout 2 s).
    let lock = support::lock_sqlite(&ws).await;
    let body = format!(r#"{{"api_key":"{key}"}}"#);
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    conn.write_all(post_head(body.len()).as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    let started = Instant::now();
    let response = read_response(&mut conn, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("retry-after: 1"), "{response}");
    assert!(response.ends_with("Request timed out, retry later\n"), "{response}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    drop(lock);
    assert_eq!(app.status("integration", &key).await, 200);
}

#[tokio::test]
async fn a_trickled_body_gets_408_and_never_holds_a_slot() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("trickle", &[]);
    let app = app(
        &ws,
        Settings {
            max_in_flight: 1,
            body_read_timeout: Duration::from_secs(1),
            ..settings(&ws)
        },
    )
    .await;
    let body = format!(r#"{{"api_key":"{key}"}}"#);
    // Twenty clients send their headers and one byte of body, then stall.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
        conn.write_all(post_head(body.len()).as_bytes()).await.unwrap();
        conn.write_all(&body.as_bytes()[..1]).await.unwrap();
        stalled.push(conn);
    }
    // The one slot is free: a real exchange goes through at once.
    let started = Instant::now();
    assert_eq!(app.status("integration", &key).await, 200);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    // The stalled ones are cut off after the body timeout with 408.
    for mut conn in stalled {
        let response = read_response(&mut conn, Duration::from_secs(5)).await;
        assert!(response.starts_with("HTTP/1.1 408"), "{response}");
        assert!(response.ends_with("Request Timeout\n"), "{response}");
    }
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_client_trickling_headers_is_disconnected() {
    let ws = Workspace::new("EdDSA");
    let app = app(
        &ws,
        Settings {
            header_read_timeout: Duration::from_secs(2),
            ..settings(&ws)
        },
    )
    .await;
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    let started = Instant::now();
    let head =
        b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_after = None;
    // One byte a second: at most 8 s, far beyond the 2 s timeout.
    for byte in head.iter().take(8) {
        if conn.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(1), conn.read(&mut probe)).await {
            // Closed (0 bytes) or reset, or an error response then close.
            Ok(Ok(_)) | Ok(Err(_)) => {
                closed_after = Some(started.elapsed());
                break;
            }
            Err(_) => {}
        }
    }
    let closed_after = closed_after.expect("the server closed the connection");
    assert!(closed_after < Duration::from_secs(4), "closed after {closed_after:?}");
    assert!(
        closed_after >= Duration::from_millis(1500),
        "closed too early: {closed_after:?}"
    );
    assert_eq!(app.get_status("/health").await, 200);
}

#[tokio::test]
async fn requests_beyond_max_in_flight_are_shed_with_503() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("busy", &[]);
    // A store that waits long for a lock, so requests stay in flight.
    let mut store_args = ws.store_args.clone();
    store_args.store_timeout = Duration::from_secs(20);
    let store = token_exchange::store::open(&store_args).await.unwrap();
    let app = spawn_app_full(
        store,
        &ws,
        Settings {
            max_in_flight: 2,
            request_timeout: Duration::from_secs(30),
            store_timeout: Duration::from_secs(20),
            ..settings(&ws)
        },
    )
    .await;
    let lock = support::lock_sqlite(&ws).await;
    let body = format!(r#"{{"api_key":"{key}"}}"#);
    // Ten whole requests while the store is locked.
    let mut conns = Vec::new();
    for _ in 0..10 {
        let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
        conn.write_all(post_head(body.len()).as_bytes()).await.unwrap();
        conn.write_all(body.as_bytes()).await.unwrap();
        conns.push(conn);
        // In order, so the first two are the ones holding the slots.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut shed = 0;
    let mut waiting = Vec::new();
    for mut conn in conns {
        let response = read_response(&mut conn, Duration::from_secs(1)).await;
        if response.starts_with("HTTP/1.1 503") {
            assert!(response.ends_with("Server busy, retry later\n"), "{response}");
            shed += 1;
        } else {
            assert!(response.is_empty(), "{response}");
            waiting.push(conn);
        }
    }
    assert_eq!((shed, waiting.len()), (8, 2));
    // Probes are not limited.
    assert_eq!(app.get_status("/health").await, 200);
    // The two in flight finish normally once the lock is gone.
    drop(lock);
    for mut conn in waiting {
        let response = read_response(&mut conn, Duration::from_secs(5)).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    assert_eq!(app.status("integration", &key).await, 200);
}

#[tokio::test]
async fn a_head_over_16_kib_is_431_and_the_server_keeps_serving() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("heads", &[]);
    let app = app(&ws, settings(&ws)).await;
    // Just under the limit: served.
    let fits = format!(
        "GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(12 * 1024)
    );
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    conn.write_all(fits.as_bytes()).await.unwrap();
    let response = read_response(&mut conn, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // Over it: 431 once 16 KiB are buffered, whatever else is still sent.
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    let head = format!(
        "GET /health HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n",
        "a".repeat(20 * 1024)
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let response = read_response(&mut conn, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert_eq!(app.status("integration", &key).await, 200);
}

#[tokio::test]
async fn clients_that_leave_are_logged_and_counted_as_499_with_their_phase() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("leavers", &[]);
    let app = app(&ws, settings(&ws)).await;
    let body = format!(r#"{{"api_key":"{key}"}}"#);
    // One leaves while sending its body...
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    conn.write_all(post_head(body.len()).as_bytes()).await.unwrap();
    conn.write_all(&body.as_bytes()[..3]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(conn);
    // ...one while its key is being looked up in a locked store.
    let lock = support::lock_sqlite(&ws).await;
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    conn.write_all(post_head(body.len()).as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(conn);
    let series = |text: &str, phase: &str| {
        support::series(
            text,
            &format!(r#"tokenexchange_requests_cancelled_total{{phase="{phase}",route="/v0/token/integration"}}"#),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = reqwest::get(&app.metrics).await.unwrap().text().await.unwrap();
        if series(&text, "handling") >= 1.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(series(&text, "body"), 1.0, "{text}");
    assert_eq!(series(&text, "handling"), 1.0, "{text}");
    assert_eq!(
        support::series(
            &text,
            r#"tokenexchange_http_requests_total{code="499",method="post",route="/v0/token/integration"}"#
        ),
        2.0
    );
    drop(lock);
    assert_eq!(app.status("integration", &key).await, 200);
}

/// Over a real socket: HTTP/1.1 without `Host` (or with two) is a 400 and
/// the connection is closed, as Go answers; HTTP/1.0 needs none.
#[tokio::test]
async fn http_1_1_without_a_host_is_400_over_the_wire() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("hosts", &[]);
    let app = app(&ws, settings(&ws)).await;
    let body = format!(r#"{{"api_key":"{key}"}}"#);
    for head in [
        format!(
            "POST /v0/token/integration HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ),
        format!(
            "POST /v0/token/integration HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ),
    ] {
        let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(body.as_bytes()).await.unwrap();
        let response = read_response(&mut conn, Duration::from_secs(5)).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
        assert!(
            response.to_ascii_lowercase().contains("connection: close"),
            "{response}"
        );
        assert!(response.ends_with("missing required Host header"), "{response}");
        assert!(!response.contains("token"), "{response}");
    }
    let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.0\r\n\r\n").await.unwrap();
    let response = read_response(&mut conn, Duration::from_secs(5)).await;
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
}

/// Over a real socket, the router's edge cases: the target `*`, CONNECT
/// an encoded slash (not a separator) and percent-encoded letters (routed
/// by the unescaped path) answered as Go 1.24 answers them.
#[tokio::test]
async fn the_routers_edge_cases_are_answered_as_go_answers_them() {
    let ws = Workspace::new("EdDSA");
    let key = ws.integration_key("edges", &[]);
    let app = app(&ws, settings(&ws)).await;
    let body = format!(r#"{{"api_key":"{key}"}}"#);
    let post = format!(
        "POST /v0/token/%69ntegration HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for (request, status, tail) in [
        (
            "OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            "200",
            "\r\n\r\n",
        ),
        (
            "GET * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            "400",
            "\r\n\r\n",
        ),
        (
            "CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\nConnection: close\r\n\r\n",
            "404",
            "404 page not found\n",
        ),
        (
            "GET /%68ealth HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            "200",
            "\r\n\r\nok",
        ),
        (
            "GET /%2Fhealth HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            "404",
            "404 page not found\n",
        ),
        (
            "GET //health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            "301",
            "Moved Permanently</a>.\n\n",
        ),
        (post.as_str(), "200", "\"}\n"),
    ] {
        let mut conn = TcpStream::connect(addr(&app)).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let response = read_response(&mut conn, Duration::from_secs(5)).await;
        let first = request.lines().next().unwrap();
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{first}: {response}"
        );
        assert!(response.ends_with(tail), "{first}: {response:?}");
    }
}
