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
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

/// The connections still open after the listener stopped.
pub(crate) struct Draining {
    /// Resolves once every connection finished gracefully.
    pub graceful: GracefulShutdown,
    /// The connection tasks, to abort when the grace period runs out (which
    /// drops their streams, so each still records its request).
    pub tasks: JoinSet<()>,
}

/// Serves `listener` on `threads` threads, each running its own
/// single-threaded event loop over a handle to the same accept queue, with
/// its own upstream connection pools (`sluice_providers::use_thread_pool`).
/// A request is then parsed, judged, forwarded and answered on one thread:
/// no task migrates and no wake-up crosses threads on the request path.
///
/// Each thread stops accepting when `stop` turns true, lets its in-flight
/// requests and streams finish for up to `grace`, cuts the rest (a cut
/// stream still records itself) and ends its runtime with every task the
/// requests left behind. Each receiver resolves with whether its thread
/// drained within `grace`.
pub(crate) fn serve_on_threads(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    stop: watch::Receiver<bool>,
    grace: Duration,
    threads: usize,
) -> std::io::Result<Vec<oneshot::Receiver<std::io::Result<bool>>>> {
    let shared = listener.into_std()?;
    let mut done = Vec::with_capacity(threads);
    for i in 0..threads.max(1) {
        let handle = shared.try_clone()?;
        let (tx, rx) = oneshot::channel();
        let (router, limits, stop) = (router.clone(), limits.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("sluice-serve-{i}"))
            .spawn(move || {
                sluice_providers::use_thread_pool(i + 1);
                let _ = tx.send(serve_thread(handle, router, limits, stop, grace));
            })?;
        done.push(rx);
    }
    Ok(done)
}

/// One serving thread: see [`serve_on_threads`].
fn serve_thread(
    handle: std::net::TcpListener,
    router: Router,
    limits: ServerLimits,
    stop: watch::Receiver<bool>,
    grace: Duration,
) -> std::io::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let drained = rt.block_on(async move {
        let listener = TcpListener::from_std(handle)?;
        let mut d = serve(listener, router, limits, stop).await;
        let drained = tokio::time::timeout(grace, d.graceful.shutdown())
            .await
            .is_ok();
        // Past the deadline: cut what is left; dropped streams record
        // themselves as cut.
        d.tasks.abort_all();
        while d.tasks.join_next().await.is_some() {}
        Ok::<_, std::io::Error>(drained)
    })?;
    // Tasks requests spawned (mirrors, background records) end here, before
    // the caller flushes the store.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(drained)
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
