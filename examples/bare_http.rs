//! The fastest HTTP/1.1 server this machine can run with our stack: hyper
//! on tokio's multi-threaded runtime, answering every request with a fixed
//! `ok`, with nothing else (no routing, logs, metrics or limits).
//!
//! `bench/run` builds and loads it in the same run as the service, so our
//! `/health` and our exchanges are reported as fractions of what HTTP
//! alone costs here. Usage: `bare_http PORT` (0 picks a free port; the
//! bound port is printed on stdout).

use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("{}", listener.local_addr()?.port());
    loop {
        let (stream, _) = listener.accept().await?;
        // As the service does: answers are small and go out at once.
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let answer = service_fn(|_: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), answer)
                .await;
        });
    }
}
