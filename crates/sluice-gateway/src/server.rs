//! The HTTP/1.1 accept loop: every connection is served by hyper with the
//! configured limits against slow and oversized clients, and watched so a
//! stop can drain it.
//!
//! - `header_timeout`: a client that does not finish sending its request
//!   head in time is disconnected (slowloris); idle keep-alive connections
//!   are closed after the same time;
//! - `max_header_bytes`: a larger request head gets `431`;
//! - on stop, the listener closes at once, idle connections close, and
//!   in-flight requests and streams run to their end (the caller bounds the
//!   wait).

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sluice_core::config::ServerLimits;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The connections still open after the listener stopped.
pub(crate) struct Draining {
    /// Resolves once every connection finished gracefully.
    pub graceful: GracefulShutdown,
    /// The connection tasks, to abort when the grace period runs out (which
    /// drops their streams, so each still records its request).
    pub tasks: JoinSet<()>,
}

/// Accepts and serves connections until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
) -> Draining {
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly
                // instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended with an error: {e}");
            }
        });
    }
    Draining { graceful, tasks }
}
