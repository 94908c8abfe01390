//! The HTTP/1.1 accept loop: every connection is served by hyper with the
//! configured limits against slow and oversized clients, and watched so a
//! stop can drain it.
//!
//! - `header_timeout`: a client that does not finish sending its request
//!   head in time (from connecting, or from the first byte of a later
//!   request) is disconnected (slowloris);
//! - `keep_alive_timeout`: a kept-alive connection idle between requests
//!   for longer is closed. It is longer than client pools keep idle
//!   connections, so a client rarely sends on a connection being closed;
//! - `max_header_bytes`: a larger request head gets `431`;
//! - on stop, the listener closes at once, idle connections close, and
//!   in-flight requests and streams run to their end (the caller bounds the
//!   wait).
//!
//! With `workers = N`, client connections are served by [`serve_on_threads`]:
//! one acceptor hands each new connection to the serving thread with the
//! fewest open ones, and every serving thread runs its own single-threaded
//! event loop with its own upstream connection pools, so a request never
//! changes thread. With `workers = 0`, [`serve`] runs them on the caller's
//! work-stealing runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sluice_core::config::ServerLimits;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

/// The connections still open after the listener stopped.
pub(crate) struct Draining {
    /// Resolves once every connection finished gracefully.
    graceful: GracefulShutdown,
    /// The connection tasks, to abort when the grace period runs out (which
    /// drops their streams, so each still records its request).
    tasks: JoinSet<()>,
}

impl Draining {
    /// Lets in-flight requests and streams finish until `deadline`, then
    /// cuts what is left (a cut stream still records itself); whether all
    /// finished in time.
    pub(crate) async fn finish(mut self, deadline: tokio::time::Instant) -> bool {
        let drained = tokio::time::timeout_at(deadline, self.graceful.shutdown())
            .await
            .is_ok();
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        drained
    }
}

/// Starts hyper on accepted connections, with the limits applied, and keeps
/// what a stop needs to drain them.
struct Connections {
    builder: hyper::server::conn::http1::Builder,
    header_timeout: Duration,
    keep_alive_timeout: Duration,
    router: Router,
    graceful: GracefulShutdown,
    tasks: JoinSet<()>,
    /// Connections handed to this set and not yet closed (counted up by
    /// whoever hands one over, down when it closes), read by the acceptor to
    /// balance load.
    open: Arc<AtomicUsize>,
}

impl Connections {
    fn new(router: Router, limits: &ServerLimits, open: Arc<AtomicUsize>) -> Connections {
        let mut builder = hyper::server::conn::http1::Builder::new();
        // hyper's own header-read timer also runs while a kept-alive
        // connection waits for its next request; each connection's watchdog
        // (below) times heads and idleness separately instead.
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .keep_alive(true);
        Connections {
            builder,
            header_timeout: limits.header_timeout,
            keep_alive_timeout: limits.keep_alive_timeout,
            router,
            graceful: GracefulShutdown::new(),
            tasks: JoinSet::new(),
            open,
        }
    }

    /// Serves one connection (already counted in `open`) on the current
    /// runtime.
    fn start(&mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let svc = Tracked {
            inner: TowerToHyperService::new(self.router.clone()),
            activity: activity.clone(),
        };
        let io = Watched {
            io: stream,
            activity: activity.clone(),
        };
        let conn = self.builder.serve_connection(TokioIo::new(io), svc);
        let conn = self.graceful.watch(conn);
        while self.tasks.try_join_next().is_some() {}
        let open = self.open.clone();
        let (head, idle) = (self.header_timeout, self.keep_alive_timeout);
        self.tasks.spawn(async move {
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!("connection ended with an error: {e}");
                    }
                }
                why = watchdog(&activity, head, idle) => {
                    tracing::debug!("connection closed: {why}");
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }

    fn draining(self) -> Draining {
        Draining {
            graceful: self.graceful,
            tasks: self.tasks,
        }
    }
}

/// What one connection is doing, for its watchdog: written by the I/O
/// wrapper (bytes of a new request head), the service wrapper (requests
/// dispatched) and response bodies (finished). Times are milliseconds since
/// the connection was accepted, plus one (0: not set).
struct Activity {
    origin: Instant,
    /// Requests dispatched whose response body has not finished.
    busy: AtomicUsize,
    /// When the first byte of a request head not yet dispatched arrived.
    head_since: AtomicU64,
    /// When the last response finished (0: none yet).
    idle_since: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            busy: AtomicUsize::new(0),
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// A request head was parsed and handed to the router.
    fn dispatched(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        Busy(self.clone())
    }
}

/// One request in progress; dropping it (the response body finished, or the
/// request was abandoned) makes the connection idle again.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.now();
        self.0.idle_since.store(now, Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves when the connection should be closed: a request head not
/// received within `header_timeout` of its first byte (or of connecting),
/// or no request for `keep_alive_timeout` after the last answer.
async fn watchdog(
    activity: &Activity,
    header_timeout: Duration,
    keep_alive: Duration,
) -> &'static str {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4);
    let (head_ms, idle_ms) = (ms(header_timeout), ms(keep_alive));
    loop {
        let now = activity.now();
        let wait = if activity.busy.load(Ordering::Relaxed) > 0 {
            head_ms.min(idle_ms)
        } else {
            let head = activity.head_since.load(Ordering::Relaxed);
            let idle = activity.idle_since.load(Ordering::Relaxed);
            let (deadline, why) = if head != 0 {
                (
                    head + head_ms,
                    "request head not received within header_timeout",
                )
            } else if idle == 0 {
                (
                    1 + head_ms,
                    "no request within header_timeout of connecting",
                )
            } else {
                (idle + idle_ms, "idle for keep_alive_timeout")
            };
            if now >= deadline {
                return why;
            }
            deadline - now
        };
        tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
    }
}

/// The client socket, noting when bytes of a new request head arrive.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let a = &self.activity;
            if a.busy.load(Ordering::Relaxed) == 0 && a.head_since.load(Ordering::Relaxed) == 0 {
                a.head_since.store(a.now(), Ordering::Relaxed);
            }
        }
        r
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The router as hyper's service, marking each request busy until its
/// response body has been sent.
#[derive(Clone)]
struct Tracked {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

type RouterResponse = axum::http::Response<axum::body::Body>;

impl hyper::service::Service<axum::http::Request<hyper::body::Incoming>> for Tracked {
    type Response = axum::http::Response<TrackedBody>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        let busy = self.activity.dispatched();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let resp: RouterResponse = answer.await?;
            Ok(resp.map(|body| TrackedBody { body, _busy: busy }))
        })
    }
}

/// A response body that keeps its request busy until it is dropped.
struct TrackedBody {
    body: axum::body::Body,
    _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Accepts the next connection, backing off briefly on errors such as
/// running out of file descriptors instead of spinning; `None` once `stop`
/// turns true.
async fn accept(listener: &TcpListener, stop: &mut watch::Receiver<bool>) -> Option<TcpStream> {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return None,
        };
        match accepted {
            Ok((s, _)) => return Some(s),
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Accepts and serves connections on the current runtime until `stop` turns
/// true.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
) -> Draining {
    let mut conns = Connections::new(router, &limits, Arc::default());
    while let Some(stream) = accept(&listener, &mut stop).await {
        conns.open.fetch_add(1, Ordering::Relaxed);
        conns.start(stream);
    }
    conns.draining()
}

/// One serving thread as the acceptor sees it.
struct ServingThread {
    /// New connections for it.
    handoff: mpsc::UnboundedSender<std::net::TcpStream>,
    /// Connections it has open.
    open: Arc<AtomicUsize>,
}

/// Serves `listener` on `threads` serving threads, each running its own
/// single-threaded event loop with its own upstream connection pools
/// (`sluice_providers::use_thread_pool`). An acceptor on the calling runtime
/// hands every new connection to the thread with the fewest open (a shared
/// accept queue would let whichever thread wakes first take nearly all of
/// them). A request is then parsed, judged, forwarded and answered on one
/// thread: no task migrates and no wake-up crosses threads on its path.
///
/// On stop the acceptor closes the listener; each thread lets its in-flight
/// requests and streams finish for up to `grace`, cuts the rest (a cut
/// stream still records itself) and ends its runtime with every task its
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
    let mut serving = Vec::with_capacity(threads);
    let mut done = Vec::with_capacity(threads);
    for i in 0..threads.max(1) {
        let (handoff, incoming) = mpsc::unbounded_channel();
        let (tx, rx) = oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let (router, limits, stop, count) =
            (router.clone(), limits.clone(), stop.clone(), open.clone());
        std::thread::Builder::new()
            .name(format!("sluice-serve-{i}"))
            .spawn(move || {
                sluice_providers::use_thread_pool(i + 1);
                let _ = tx.send(serve_thread(incoming, router, limits, stop, grace, count));
            })?;
        serving.push(ServingThread { handoff, open });
        done.push(rx);
    }
    tokio::spawn(hand_out(listener, serving, stop));
    Ok(done)
}

/// The acceptor: every new connection goes to the serving thread with the
/// fewest open, ties broken in turn.
async fn hand_out(
    listener: TcpListener,
    mut serving: Vec<ServingThread>,
    mut stop: watch::Receiver<bool>,
) {
    let mut turn = 0usize;
    while let Some(stream) = accept(&listener, &mut stop).await {
        let mut stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot hand a connection over: {e}");
                continue;
            }
        };
        turn = turn.wrapping_add(1);
        loop {
            let n = serving.len();
            if n == 0 {
                tracing::error!("no serving thread is running; stopped accepting");
                return;
            }
            let pick = (0..n)
                .map(|k| (turn + k) % n)
                .min_by_key(|&i| serving[i].open.load(Ordering::Relaxed))
                .unwrap_or(0);
            serving[pick].open.fetch_add(1, Ordering::Relaxed);
            match serving[pick].handoff.send(stream) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => {
                    // That thread is gone (it failed to start): give the
                    // connection to another and stop giving it work.
                    tracing::error!("a serving thread is not running");
                    serving.remove(pick);
                    stream = back;
                }
            }
        }
    }
}

/// One serving thread: see [`serve_on_threads`].
fn serve_thread(
    mut incoming: mpsc::UnboundedReceiver<std::net::TcpStream>,
    router: Router,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    open: Arc<AtomicUsize>,
) -> std::io::Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let drained = rt.block_on(async move {
        let mut conns = Connections::new(router, &limits, open.clone());
        loop {
            let next = tokio::select! {
                n = incoming.recv() => n,
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(stream) = next else { break };
            match TcpStream::from_std(stream) {
                Ok(s) => conns.start(s),
                Err(e) => {
                    open.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!("cannot serve a handed-over connection: {e}");
                }
            }
        }
        conns
            .draining()
            .finish(tokio::time::Instant::now() + grace)
            .await
    });
    // Tasks requests spawned (mirrors, background records) end here, before
    // the caller flushes the store.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(drained)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends one keep-alive request on `conn` and returns the body (the
    /// name of the thread that answered).
    async fn ask(conn: &mut TcpStream) -> String {
        conn.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = conn.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed early");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(i) = text.find("\r\n\r\n") {
                let len: usize = text[..i]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse().ok())
                    .expect("content-length");
                if buf.len() >= i + 4 + len {
                    return text[i + 4..i + 4 + len].to_string();
                }
            }
        }
    }

    /// New connections go to the serving thread with the fewest open, each
    /// request is answered on its connection's thread, and a stop drains
    /// every thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_spread_over_the_serving_threads() {
        let router = Router::new().route(
            "/",
            axum::routing::get(|| async {
                std::thread::current().name().unwrap_or("?").to_string()
            }),
        );
        let listener = crate::listen("127.0.0.1:0".parse().expect("addr"), 128).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = watch::channel(false);
        let done = serve_on_threads(
            listener,
            router,
            ServerLimits::default(),
            stop_rx,
            Duration::from_secs(5),
            3,
        )
        .expect("threads start");
        let mut conns = Vec::new();
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..6 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            let first = ask(&mut c).await;
            // Every request on one connection is answered by the same thread.
            for _ in 0..3 {
                assert_eq!(ask(&mut c).await, first);
            }
            *seen.entry(first.clone()).or_default() += 1;
            conns.push((first, c));
        }
        assert_eq!(
            seen,
            std::collections::BTreeMap::from([
                ("sluice-serve-0".to_string(), 2),
                ("sluice-serve-1".to_string(), 2),
                ("sluice-serve-2".to_string(), 2),
            ]),
            "six open connections, two per thread"
        );
        // Once a thread's connections close, new ones go there.
        conns.retain(|(t, _)| t != "sluice-serve-1");
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            assert_eq!(ask(&mut c).await, "sluice-serve-1");
            conns.push((String::new(), c));
        }
        drop(conns);
        stop_tx.send(true).expect("stop");
        for d in done {
            assert!(
                d.await.expect("thread reports").expect("thread ran"),
                "drained"
            );
        }
        // The acceptor is a task of its own: it drops the listener as soon
        // as it sees the stop, which may be just after the threads report.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "listener still open 3 s after stopping"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
