//! Assembles the service and runs it until it is told to stop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use arc_swap::ArcSwap;

use crate::cache::KeyCache;
use crate::http::{Api, AppState, MAX_HEADER_BYTES, Settings, metrics_router};
use crate::metrics::Metrics;
use crate::rate_limit::RateLimits;
use crate::signing::KeySet;
use crate::store::{Bounded, Instrumented, Lookups, StoreHealth};
use crate::validate::Validator;

// The wiring of the request path lives here, with the rest of the
// assembly, rather than in the HTTP module that only uses the result.
impl AppState {
    /// Wires the request path: lookups go through the validation cache, then
    /// a layer that measures them and tells readiness the store answered.
    pub fn new(keys: Arc<KeySet>, store: Arc<dyn Lookups>, settings: Settings) -> Self {
        let metrics = Arc::new(Metrics::new());
        // A probe is one store call, which the store may retry once.
        let probe_timeout = settings.store_timeout * 2 + Duration::from_millis(500);
        let health = Arc::new(StoreHealth::new(store.clone(), probe_timeout, settings.readiness));
        // Bounded inside Instrumented: time spent waiting for a store slot
        // counts as store time, and a busy store as a store error.
        let bounded = Arc::new(Bounded::new(store, settings.store_timeout));
        let instrumented = Arc::new(Instrumented::new(bounded, metrics.clone(), health.clone()));
        let cache = Arc::new(KeyCache::new(settings.cache, settings.clock.clone(), metrics.clone()));
        // As many limiters as cached keys: only valid keys get one.
        let rate_limits = RateLimits::new(settings.rate_limits.clone(), settings.cache.capacity)
            .map(|limits| Arc::new(limits.reporting_to(metrics.rate_limiters.clone())));
        Self {
            keys: Arc::new(ArcSwap::new(keys)),
            validator: Validator::new(instrumented.clone(), instrumented, cache),
            clock: settings.wall_clock.clone(),
            metrics,
            health,
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
            usage: Arc::default(),
            rate_limits,
            settings,
        }
    }
}

/// How long in-flight requests may take to finish after a stop signal.
/// Matches the Go service; Kubernetes' default grace period is also 30 s.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// Every interface, IPv6 and IPv4 (`:8080` in Go), or IPv4 alone where
    /// the machine has no IPv6.
    Everywhere(u16),
    /// One `host:port` (a name is resolved; the first address that binds wins).
    Exact(String),
}

impl ListenAddress {
    /// Parses Go's forms: `:PORT` or `HOST:PORT` (`[::1]:PORT` for IPv6).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} is not an address like :9990 or 127.0.0.1:9990"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{text:?}: the port must be a number from 0 to 65535"))?;
        if host.is_empty() {
            Ok(Self::Everywhere(port))
        } else {
            Ok(Self::Exact(text.to_owned()))
        }
    }

    /// Binds a listener here.
    pub async fn bind(&self) -> io::Result<TcpListener> {
        match self {
            Self::Exact(addr) => TcpListener::bind(addr.as_str()).await,
            Self::Everywhere(port) => match bind_dual_stack(*port) {
                Ok(listener) => Ok(listener),
                // No IPv6 on this machine (module absent or disabled). A
                // port in use or not ours would fail on IPv4 too: say so.
                Err(e) if !matches!(e.kind(), io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied) => {
                    tracing::debug!(error = %e, "no IPv6; listening on IPv4 only");
                    TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, *port)).await
                }
                Err(e) => Err(e),
            },
        }
    }
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Everywhere(port) => write!(f, ":{port}"),
            Self::Exact(addr) => f.write_str(addr),
        }
    }
}

/// `[::]:port` accepting IPv4 too (mapped addresses), whatever the
/// system's `bindv6only` default, with the options tokio's own bind sets.
fn bind_dual_stack(port: u16) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// A bound, not yet running, server: the API and the metrics listener.
pub struct Application {
    api: TcpListener,
    api_router: Api<hyper::body::Incoming>,
    metrics: TcpListener,
    metrics_router: Router,
    header_read_timeout: Duration,
    /// Open API connections at most.
    max_connections: usize,
}

/// Open connections to the metrics listener at most: scrapers are few.
const METRICS_CONNECTIONS: usize = 64;

/// How each listener treats its connections.
#[derive(Clone, Copy)]
struct ConnectionLimits {
    header_read_timeout: Duration,
    max_connections: usize,
}

impl Application {
    /// Binds the API on `addr` and the metrics on `metrics_addr` (port 0
    /// picks a free port, for tests). Nothing is served until
    /// [`Application::run_until_stopped`].
    pub async fn build(addr: SocketAddr, metrics_addr: SocketAddr, state: AppState) -> io::Result<Self> {
        let api = TcpListener::bind(addr).await?;
        let metrics = TcpListener::bind(metrics_addr).await?;
        Ok(Self::with_listeners(api, metrics, state))
    }

    /// Serves on listeners bound elsewhere (see [`ListenAddress::bind`]).
    pub fn with_listeners(api: TcpListener, metrics: TcpListener, state: AppState) -> Self {
        Self {
            api,
            header_read_timeout: state.settings.header_read_timeout,
            max_connections: state.settings.max_connections,
            metrics_router: metrics_router(state.metrics.clone()),
            api_router: crate::http::api(state),
            metrics,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        // Unwrap: a bound TCP listener always has a local address.
        self.api.local_addr().expect("bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.local_addr().expect("bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets
    /// in-flight requests finish, for at most [`SHUTDOWN_GRACE`].
    pub async fn run_until_stopped<F>(self, shutdown: F) -> io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let limits = |max_connections| ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            max_connections,
        };
        let api = serve(self.api, self.api_router, limits(self.max_connections), stop_rx.clone());
        let metrics = serve(self.metrics, self.metrics_router, limits(METRICS_CONNECTIONS), stop_rx);
        let servers = async {
            tokio::join!(api, metrics);
            Ok(())
        };
        let deadline = async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, finishing in-flight requests");
            let _ = stop_tx.send(true);
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            result = servers => result,
            () = deadline => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "in-flight requests did not finish in time; exiting");
                Ok(())
            }
        }
    }
}

/// Serves HTTP/1.1 on `listener` until `stop` turns true, then stops
/// accepting and waits for open connections to finish their requests.
///
/// Written on hyper directly rather than `axum::serve` for what a hostile
/// client would otherwise exploit: a header read timeout (a trickled head
/// holds a connection for at most that long), a small head buffer (431
/// beyond [`MAX_HEADER_BYTES`]), and a cap on open connections, enforced
/// before `accept` so the excess waits in the kernel's backlog instead of
/// in our memory.
async fn serve<S>(
    listener: TcpListener,
    router: S,
    limits: ConnectionLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: tower::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
            () = stopped(&mut stop) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of
                    // spinning, then keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        // Tokens are small and answered at once; waiting to batch writes
        // would only add latency.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Resolves when `stop` turns true, or its sender is gone (which also means
/// stop). The guard `wait_for` returns is dropped here, so callers stay `Send`.
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// A future that resolves on SIGTERM (what orchestrators send) or SIGINT
/// (Ctrl-C). The handlers are installed now, when this is called, not when
/// the future is first polled: a signal that arrives in between must stop
/// the server gracefully, not kill it with the default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, signal = name, "cannot listen for a stop signal");
            None
        }
    };
    let mut interrupt = listen(SignalKind::interrupt(), "SIGINT");
    let mut terminate = listen(SignalKind::terminate(), "SIGTERM");
    async move {
        tokio::select! {
            () = received(interrupt.as_mut()) => {}
            () = received(terminate.as_mut()) => {}
        }
    }
}

/// Resolves when `signal` arrives; never, without a handler.
async fn received(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::ListenAddress;

    #[test]
    fn listen_addresses_parse_and_print_as_go_writes_them() {
        for (text, parsed) in [
            (":9990", ListenAddress::Everywhere(9990)),
            ("127.0.0.1:80", ListenAddress::Exact("127.0.0.1:80".into())),
            ("[::1]:0", ListenAddress::Exact("[::1]:0".into())),
            ("localhost:8080", ListenAddress::Exact("localhost:8080".into())),
        ] {
            let got = ListenAddress::parse(text).unwrap();
            assert_eq!(got, parsed);
            assert_eq!(got.to_string(), text);
        }
        for bad in ["9990", ":http", ":65536", "host:-1", ""] {
            let err = ListenAddress::parse(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    /// Only a missing IPv6 falls back to IPv4: a port already taken is an
    /// error, not a silent listener on half the addresses.
    #[tokio::test]
    async fn a_taken_port_is_an_error_not_a_fallback() {
        let first = ListenAddress::Everywhere(0).bind().await.unwrap();
        let port = first.local_addr().unwrap().port();
        let err = ListenAddress::Everywhere(port).bind().await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        let err = ListenAddress::Exact(format!("127.0.0.1:{port}"))
            .bind()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
