//! Assembles the service and runs it until it is told to stop.

use std::future::{Future, IntoFuture as _};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::http::{AppState, metrics_router, router};

/// How long in-flight requests may take to finish after a stop signal.
/// Matches the Go service; Kubernetes' default grace period is also 30 s.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A bound, not yet running, server: the API and the metrics listener.
pub struct Application {
    api: TcpListener,
    api_router: Router,
    metrics: TcpListener,
    metrics_router: Router,
}

impl Application {
    /// Binds the API on `addr` and the metrics on `metrics_addr` (port 0
    /// picks a free port, for tests). Nothing is served until
    /// [`Application::run_until_stopped`].
    pub async fn build(addr: SocketAddr, metrics_addr: SocketAddr, state: AppState) -> io::Result<Self> {
        let api = TcpListener::bind(addr).await?;
        let metrics = TcpListener::bind(metrics_addr).await?;
        Ok(Self {
            api,
            metrics_router: metrics_router(state.metrics.clone()),
            api_router: router(state),
            metrics,
        })
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
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            // An error means the sender is gone, which also means stop.
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let api = axum::serve(self.api, self.api_router)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future();
        let metrics = axum::serve(self.metrics, self.metrics_router)
            .with_graceful_shutdown(stopped(stop_rx))
            .into_future();
        let servers = async { tokio::try_join!(api, metrics).map(|_| ()) };
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

/// Resolves on SIGTERM (what orchestrators send) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
