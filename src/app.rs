//! Assembles the service and runs it until it is told to stop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

use crate::http::{AppState, router};

/// How long in-flight requests may take to finish after a stop signal.
/// Matches the Go service; Kubernetes' default grace period is also 30 s.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A bound, not yet running, server.
pub struct Application {
    listener: TcpListener,
    router: Router,
}

impl Application {
    /// Binds `addr` (port 0 picks a free port, for tests) and builds the
    /// router. Nothing is served until [`Application::run_until_stopped`].
    pub async fn build(addr: SocketAddr, state: AppState) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            router: router(state),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        // Unwrap: a bound TCP listener always has a local address.
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets
    /// in-flight requests finish, for at most [`SHUTDOWN_GRACE`].
    pub async fn run_until_stopped<F>(self, shutdown: F) -> io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections, finishing in-flight requests");
            let _ = stopping_tx.send(());
        };
        let server = axum::serve(self.listener, self.router).with_graceful_shutdown(signal);
        let deadline = async move {
            match stopping_rx.await {
                Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
                // The server ended on its own; nothing to time.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            result = server => result,
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
