//! The stop request of a service process: SIGINT (Ctrl-C) or SIGTERM, which
//! systemd and Kubernetes send to stop a service. Every binary waits on
//! [`shutdown_signal`] so that a normal stop runs its graceful shutdown.

/// Resolves on the first SIGINT or SIGTERM (on other platforms, Ctrl-C).
/// If a handler cannot be installed, that signal is not waited on (the
/// process then keeps the default action for it).
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate() => {}
    }
}

#[cfg(unix)]
async fn terminate() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGTERM");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending::<()>().await;
}
