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
//! event loop with its own upstream connection pools, so a request normally
//! stays on its connection's thread. A client pool sends most requests over
//! the few connections it used last, which may all sit on one thread; a
//! thread running at least [`OFFLOAD_MARGIN`] more handlers than the least
//! busy one hands new requests' handlers to that thread (see [`Peers`]).
//! With `workers = 0`, [`serve`] runs them on the caller's work-stealing
//! runtime.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use futures_util::FutureExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use sluice_core::config::ServerLimits;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// The connections still open after the listener stopped.
pub(crate) struct Draining {
    /// Each connection's stop flag.
    stops: Vec<Weak<Signal>>,
    /// The connection tasks: waited for, then aborted when the grace period
    /// runs out (which drops their streams, so each still records its
    /// request).
    tasks: JoinSet<()>,
}

impl Draining {
    /// Tells every connection to finish (an idle one closes at once, a busy
    /// one after its response), lets in-flight requests and streams finish
    /// until `deadline`, then cuts what is left (a cut stream still records
    /// itself); whether all finished in time.
    pub(crate) async fn finish(mut self, deadline: tokio::time::Instant) -> bool {
        for s in self.stops.iter().filter_map(Weak::upgrade) {
            s.raise();
        }
        let tasks = &mut self.tasks;
        let drained = tokio::time::timeout_at(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        drained
    }
}

/// A flag one connection's task waits on: told to stop, or (its
/// watchdog) to close if it is still the one idle longest. The task checks
/// it on each of its polls with two atomic operations on memory of its own;
/// a `tokio::sync::Notify` would take a lock on every poll, and a channel
/// watched by every connection a lock they all share.
#[derive(Default)]
struct Signal {
    raised: std::sync::atomic::AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl Signal {
    /// Raises the flag and wakes the task waiting on it.
    fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Whether the flag is raised (it stays raised); the task is woken when
    /// it is.
    fn raised(&self, cx: &Context<'_>) -> bool {
        self.waker.register(cx.waker());
        self.raised.load(Ordering::Acquire)
    }

    /// Ready once the flag is raised, lowering it again.
    fn taken(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.raised.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

/// How many more request handlers a serving thread must be running than
/// the least busy one before it hands a new request's handler over. Below
/// it a request stays on its connection's thread, where it costs no
/// cross-thread wake-up; at it, the busier thread is falling behind (its
/// handlers wait for the CPU, not only for their upstream) and the other
/// core is idle.
pub(crate) const OFFLOAD_MARGIN: usize = 2;

/// One serving thread as the others see it.
#[derive(Default)]
struct Peer {
    /// Its event loop, once started.
    handle: std::sync::OnceLock<tokio::runtime::Handle>,
    /// Request handlers running on it: its own and those handed to it.
    running: AtomicUsize,
    /// Requests other threads handed to it whose response has not finished
    /// (their upstream connections live on its event loop, so it waits for
    /// them before that loop ends).
    hosted: AtomicUsize,
    /// Its event loop is ending: hand it nothing more.
    closed: std::sync::atomic::AtomicBool,
}

/// Every serving thread, shared by all of them, for handing a request's
/// handler from a thread that falls behind to the least busy one.
///
/// The handler runs on the other thread's event loop with that thread's
/// upstream pools; the connection, its request body and its response body
/// stay where they are. A client that leaves cancels the handler where it
/// runs (so it is recorded as a disconnect, as on its own thread).
pub(crate) struct Peers {
    threads: Vec<Peer>,
    /// Requests whose handler ran on another thread than its connection's.
    offloaded: Arc<AtomicU64>,
}

impl Peers {
    fn new(n: usize, offloaded: Arc<AtomicU64>) -> Peers {
        Peers {
            threads: (0..n).map(|_| Peer::default()).collect(),
            offloaded,
        }
    }

    /// The thread to run a new request's handler on, for a request arriving
    /// on thread `me`; `None`: run it here.
    fn pick(&self, me: usize) -> Option<usize> {
        let mine = self.threads.get(me)?.running.load(Ordering::Relaxed);
        if mine < OFFLOAD_MARGIN {
            return None;
        }
        let (j, least) = self
            .threads
            .iter()
            .enumerate()
            .filter(|(j, p)| *j != me && !p.closed.load(Ordering::Relaxed))
            .map(|(j, p)| (j, p.running.load(Ordering::Relaxed)))
            .min_by_key(|&(_, n)| n)?;
        (least + OFFLOAD_MARGIN <= mine).then_some(j)
    }
}

/// One count on a serving thread, held until dropped: a handler running
/// there (`Peer::running`, until the handler finishes), or a request handed
/// to it (`Peer::hosted`, until its response body has finished: a streamed
/// answer reads its upstream through that thread's connection pool).
struct Counted {
    peers: Arc<Peers>,
    at: usize,
    count: fn(&Peer) -> &AtomicUsize,
}

impl Counted {
    fn running(peers: &Arc<Peers>, at: usize) -> Counted {
        Counted::start(peers, at, |p| &p.running)
    }

    fn hosted(peers: &Arc<Peers>, at: usize) -> Counted {
        Counted::start(peers, at, |p| &p.hosted)
    }

    fn start(peers: &Arc<Peers>, at: usize, count: fn(&Peer) -> &AtomicUsize) -> Counted {
        count(&peers.threads[at]).fetch_add(1, Ordering::SeqCst);
        Counted {
            peers: peers.clone(),
            at,
            count,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.count)(&self.peers.threads[self.at]).fetch_sub(1, Ordering::SeqCst);
    }
}

/// Aborts a handed-over handler when the request that waits on it goes away
/// (the client left), so it ends the way it would on its own thread.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where this thread's handlers may run: `peers.threads[me]` is this thread.
#[derive(Clone)]
struct Offload {
    peers: Arc<Peers>,
    me: usize,
}

/// Starts hyper on accepted connections, with the limits applied, and keeps
/// what a stop needs to drain them.
struct Connections {
    builder: hyper::server::conn::http1::Builder,
    header_timeout: Duration,
    keep_alive_timeout: Duration,
    routes: Routes,
    /// The stop flags of the connections started (pruned as they close).
    stops: Vec<Weak<Signal>>,
    tasks: JoinSet<()>,
    /// Connections handed to this set and not yet closed (counted up by
    /// whoever hands one over, down when it closes), read by the acceptor to
    /// balance load.
    open: Arc<AtomicUsize>,
    /// The other serving threads (only with dedicated serving threads).
    offload: Option<Offload>,
}

impl Connections {
    fn new(routes: Routes, limits: &ServerLimits, open: Arc<AtomicUsize>) -> Connections {
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
            routes,
            stops: Vec::new(),
            tasks: JoinSet::new(),
            open,
            offload: None,
        }
    }

    /// Serves one connection (already counted in `open`) on the current
    /// runtime; `slot`, its place under `max_connections`, is freed when it
    /// closes.
    fn start(&mut self, stream: TcpStream, slot: Slot) {
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new(slot.crowding.clone()));
        let svc = Tracked {
            inner: TowerToHyperService::new(self.routes.router.clone()),
            chat: self.routes.chat.clone(),
            activity: activity.clone(),
            offload: self.offload.clone(),
        };
        let io = Watched {
            io: stream,
            activity: activity.clone(),
        };
        let conn = self.builder.serve_connection(TokioIo::new(io), svc);
        let stop = Arc::new(Signal::default());
        if self.stops.len() == self.stops.capacity() {
            self.stops.retain(|s| s.strong_count() > 0);
        }
        self.stops.push(Arc::downgrade(&stop));
        let conn = async move {
            let mut conn = std::pin::pin!(conn);
            let mut finishing = false;
            std::future::poll_fn(|cx| {
                if !finishing && stop.raised(cx) {
                    finishing = true;
                    conn.as_mut().graceful_shutdown();
                }
                conn.as_mut().poll(cx)
            })
            .await
        };
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
            drop(slot);
        });
    }

    fn draining(self) -> Draining {
        Draining {
            stops: self.stops,
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
    /// The listener's `max_connections` as this connection sees it (`None`:
    /// no cap).
    crowding: Option<Crowding>,
    /// Its place in the listener's [`IdleQueue`] (0: not queued).
    idle_seq: AtomicU64,
    /// Wakes the watchdog to close the connection if it is still the one
    /// idle longest and a place is still wanted.
    evict: Signal,
}

impl Activity {
    fn new(crowding: Option<Crowding>) -> Activity {
        Activity {
            crowding,
            idle_seq: AtomicU64::new(0),
            evict: Signal::default(),
            origin: Instant::now(),
            busy: AtomicUsize::new(0),
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        ms_since(self.origin)
    }

    /// A request head was parsed and handed to the router.
    fn dispatched(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        self.left_idle();
        Busy(self.clone())
    }

    /// The connection is no longer idle (a request head began, or was
    /// dispatched): it leaves the idle queue, and if it was asked to make
    /// room the next idle one is asked instead.
    fn left_idle(&self) {
        if let Some(c) = &self.crowding {
            if c.idle.remove(self) && c.is_crowded() {
                c.idle.nudge_oldest();
            }
        }
    }
}

impl Drop for Activity {
    /// A closed connection (or one whose task was cut at a stop) leaves the
    /// idle queue.
    fn drop(&mut self) {
        if let Some(c) = &self.crowding {
            c.idle.remove(self);
        }
    }
}

/// One request in progress; dropping it (the response body finished, or the
/// request was abandoned) makes the connection idle again.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.now();
        self.0.idle_since.store(now, Ordering::Relaxed);
        let was = self.0.busy.fetch_sub(1, Ordering::Relaxed);
        if let (1, Some(c)) = (was, &self.0.crowding) {
            c.idle.push(&self.0);
            // Queued before reading whether a place is wanted: a new
            // connection waiting for one either finds this one queued or is
            // seen here.
            if c.is_crowded() {
                c.idle.nudge_oldest();
            }
        }
    }
}

/// Resolves when the connection should be closed: a request head not
/// received within `header_timeout` of its first byte (or of connecting),
/// no request for `keep_alive_timeout` after the last answer, or idle
/// between requests longer than any other while the listener is at
/// `max_connections` (making room for a connection waiting to be accepted).
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
            // Idle longest while a new connection waits for a place: this
            // one closes, unless the place was found meanwhile.
            if head == 0
                && idle != 0
                && activity
                    .crowding
                    .as_ref()
                    .is_some_and(|c| c.claim(activity))
            {
                return "idle longest while max_connections was reached";
            }
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
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait.max(1))) => {}
            _ = activity.evict.taken() => {}
        }
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
                a.left_idle();
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
/// response body has been sent, and (on serving threads) running each
/// handler on the thread [`Peers::pick`] chooses.
#[derive(Clone)]
struct Tracked {
    inner: TowerToHyperService<Router>,
    /// The chat route's state, when this listener serves it.
    chat: Option<Arc<crate::AppState>>,
    activity: Arc<Activity>,
    offload: Option<Offload>,
}

type RouterResponse = axum::http::Response<axum::body::Body>;

/// A handler's answer, still to come.
type Answer =
    Pin<Box<dyn Future<Output = Result<RouterResponse, std::convert::Infallible>> + Send>>;

/// What one listener serves: its router and, when the listener serves the
/// chat route, that route's state. A chat request then goes straight to its
/// handler, without the router's matching and extractors: it is the route
/// on every model call's path. Every other request (and a chat path with
/// another method) goes through the router.
#[derive(Clone)]
pub(crate) struct Routes {
    /// Every route of the listener.
    pub(crate) router: Router,
    /// The chat route's state, when the listener serves it.
    pub(crate) chat: Option<Arc<crate::AppState>>,
}

impl From<Router> for Routes {
    fn from(router: Router) -> Self {
        Routes { router, chat: None }
    }
}

impl Tracked {
    /// Runs the request's handler.
    fn answer(&self, req: axum::http::Request<hyper::body::Incoming>) -> Answer {
        if let Some(app) = &self.chat {
            if req.method() == axum::http::Method::POST
                && req.uri().path() == crate::pipeline::CHAT_PATH
            {
                let app = app.clone();
                // Only the headers go on: the rest of the head (its URI
                // shares the connection's read buffer) is dropped here.
                let (parts, body) = req.into_parts();
                let headers = parts.headers;
                // The handler's own future, boxed as it is (no wrapping
                // block around it).
                return Box::pin(
                    crate::pipeline::chat_completions(
                        axum::extract::State(app),
                        headers,
                        axum::body::Body::new(body),
                    )
                    .map(Ok),
                );
            }
        }
        Box::pin(hyper::service::Service::call(&self.inner, req))
    }
}

/// A tracked response still to come: the handler's answer on this
/// thread (no allocation beyond the handler's own), or a handler handed to
/// another thread.
enum Call {
    Here {
        answer: Answer,
        /// `None` once the answer has been returned.
        busy: Option<Busy>,
        /// This thread's count of running handlers, when it has peers.
        running: Option<Counted>,
    },
    Elsewhere(
        Pin<Box<dyn Future<Output = Result<TrackedResponse, std::convert::Infallible>> + Send>>,
    ),
}

type TrackedResponse = axum::http::Response<TrackedBody>;

impl Future for Call {
    type Output = Result<TrackedResponse, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Call::Here {
                answer,
                busy,
                running,
            } => {
                let r = std::task::ready!(answer.as_mut().poll(cx));
                let Ok(resp) = r;
                drop(running.take());
                match busy.take() {
                    Some(busy) => Poll::Ready(Ok(tracked(resp, busy, None))),
                    // Polled again after its answer: hyper never does.
                    None => Poll::Pending,
                }
            }
            Call::Elsewhere(f) => f.as_mut().poll(cx),
        }
    }
}

impl hyper::service::Service<axum::http::Request<hyper::body::Incoming>> for Tracked {
    type Response = TrackedResponse;
    type Error = std::convert::Infallible;
    type Future = Call;

    fn call(&self, req: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        let busy = self.activity.dispatched();
        let answer = self.answer(req);
        let Some(o) = &self.offload else {
            return Call::Here {
                answer,
                busy: Some(busy),
                running: None,
            };
        };
        if let Some(j) = o.peers.pick(o.me) {
            let peer = &o.peers.threads[j];
            // Counted as hosted before `closed` is read: a thread that is
            // ending sets `closed`, then waits for its hosted requests, so
            // either it sees this one or this one sees it closing.
            let hosted = Counted::hosted(&o.peers, j);
            if let (false, Some(handle)) = (peer.closed.load(Ordering::SeqCst), peer.handle.get()) {
                o.peers.offloaded.fetch_add(1, Ordering::Relaxed);
                let running = Counted::running(&o.peers, j);
                let task = handle.spawn(async move {
                    let _running = running;
                    answer.await
                });
                let abort = AbortOnDrop(task.abort_handle());
                return Call::Elsewhere(Box::pin(async move {
                    let resp: RouterResponse = match task.await {
                        Ok(r) => r?,
                        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        // Its event loop ended first (a stop past its grace).
                        Err(_) => axum::response::IntoResponse::into_response(
                            crate::error::ApiError::shutting_down(),
                        ),
                    };
                    drop(abort);
                    Ok(tracked(resp, busy, Some(hosted)))
                }));
            }
            drop(hosted);
        }
        Call::Here {
            answer,
            busy: Some(busy),
            running: Some(Counted::running(&o.peers, o.me)),
        }
    }
}

/// `resp` with its body tracked: busy (and hosted, when handed over) until
/// the body is dropped.
fn tracked(
    resp: RouterResponse,
    busy: Busy,
    hosted: Option<Counted>,
) -> axum::http::Response<TrackedBody> {
    resp.map(|body| TrackedBody {
        body,
        _busy: busy,
        _hosted: hosted,
    })
}

/// A response body that keeps its request busy until it is dropped (and,
/// for a request handed to another thread, counted there).
struct TrackedBody {
    body: axum::body::Body,
    _busy: Busy,
    _hosted: Option<Counted>,
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

/// A connection's place under `max_connections`, freed when it is dropped,
/// and the listener's crowding (both `None` without a cap).
#[derive(Default)]
struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
    crowding: Option<Crowding>,
}

/// A listener at `max_connections` as each of its connections sees it:
/// how many idle connections are still to close for a new one waiting for
/// a place (the listener is crowded while that is not 0), and the idle
/// connections in the order they fell idle. Only the one idle longest is
/// asked to close, and only as many close as are wanted (one per waiting
/// connection); the others stay open for their clients.
#[derive(Clone)]
struct Crowding {
    wanted: Arc<AtomicUsize>,
    idle: Arc<IdleQueue>,
}

impl Crowding {
    /// Whether a new connection waits for a place.
    fn is_crowded(&self) -> bool {
        self.wanted.load(Ordering::Acquire) > 0
    }

    /// Whether `a` closes to make room: it is the connection idle longest
    /// and a close is still wanted (then it takes it and leaves the queue).
    fn claim(&self, a: &Activity) -> bool {
        let mut q = self.idle.lock();
        let seq = a.idle_seq.load(Ordering::Relaxed);
        if seq == 0 || q.by_age.first_key_value().map(|(k, _)| *k) != Some(seq) {
            return false;
        }
        let took = self
            .wanted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1))
            .is_ok();
        if took {
            q.by_age.remove(&seq);
            a.idle_seq.store(0, Ordering::Relaxed);
        }
        took
    }
}

/// The idle kept-alive connections of a listener with `max_connections`, in
/// the order they fell idle. At the cap the one idle longest closes: its
/// client is the least likely to send on it next, so the close is the least
/// likely to cross a request on its way in (nginx reclaims its oldest
/// kept-alive connections the same way).
#[derive(Default)]
struct IdleQueue {
    inner: std::sync::Mutex<IdleInner>,
}

#[derive(Default)]
struct IdleInner {
    /// The last place handed out (places start at 1).
    last: u64,
    /// Idle connections by place, oldest first.
    by_age: BTreeMap<u64, Weak<Activity>>,
}

impl IdleQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdleInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `a`, which just fell idle, as the youngest idle connection.
    fn push(&self, a: &Arc<Activity>) {
        let mut q = self.lock();
        q.last += 1;
        let seq = q.last;
        let old = a.idle_seq.swap(seq, Ordering::Relaxed);
        if old != 0 {
            q.by_age.remove(&old);
        }
        q.by_age.insert(seq, Arc::downgrade(a));
    }

    /// Takes `a` out of the queue; whether it was queued.
    fn remove(&self, a: &Activity) -> bool {
        if a.idle_seq.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut q = self.lock();
        let seq = a.idle_seq.swap(0, Ordering::Relaxed);
        seq != 0 && q.by_age.remove(&seq).is_some()
    }

    /// Asks the connection idle longest to close (it does if a place is
    /// still wanted when its watchdog runs); connections already gone are
    /// dropped from the queue on the way.
    fn nudge_oldest(&self) {
        let mut q = self.lock();
        while let Some((&seq, w)) = q.by_age.first_key_value() {
            if let Some(a) = w.upgrade() {
                a.evict.raise();
                return;
            }
            q.by_age.remove(&seq);
        }
    }

    /// How many connections are queued (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_age.len()
    }
}

/// The cap on open client connections of one listener (`max_connections`).
/// While a new connection waits for a place, the listener is crowded: the
/// kept-alive connection idle longest closes to make room (as a server at
/// its connection limit reclaims idle keep-alive connections), or, with
/// none idle, the first busy one to finish its request does; busy
/// connections are never cut.
struct ConnectionCap {
    slots: Option<Arc<Semaphore>>,
    /// What each connection is handed: the closes wanted for the waiting
    /// one, and the idle connections, oldest first.
    crowding: Crowding,
    max: usize,
    origin: Instant,
    /// When the cap's warning was last logged (ms since `origin`, plus
    /// one; 0: never).
    last_warn: AtomicU64,
    /// New connections that waited since then.
    waited: AtomicU64,
}

/// Milliseconds since `origin`, plus one, so that 0 can mean "never".
fn ms_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

/// Least time between two warnings that the connection cap is reached.
const CAP_WARN_EVERY_MS: u64 = 10_000;

/// Whether the cap's warning is due at `now`, last logged at `last` (both
/// ms plus one; `last` 0: never).
fn warn_due(last: u64, now: u64) -> bool {
    last == 0 || now >= last.saturating_add(CAP_WARN_EVERY_MS)
}

impl ConnectionCap {
    fn new(max: usize) -> ConnectionCap {
        ConnectionCap {
            slots: (max > 0).then(|| Arc::new(Semaphore::new(max))),
            crowding: Crowding {
                wanted: Arc::new(AtomicUsize::new(0)),
                idle: Arc::new(IdleQueue::default()),
            },
            max,
            origin: Instant::now(),
            last_warn: AtomicU64::new(0),
            waited: AtomicU64::new(0),
        }
    }

    /// Logs that the cap is reached: the first time at once, then at most
    /// once every [`CAP_WARN_EVERY_MS`] with how many new connections had
    /// to wait meanwhile (past capacity, thousands a second would).
    fn warn_full(&self) {
        let waited = self.waited.fetch_add(1, Ordering::Relaxed) + 1;
        let now = ms_since(self.origin);
        if !warn_due(self.last_warn.load(Ordering::Relaxed), now) {
            return;
        }
        self.last_warn.store(now, Ordering::Relaxed);
        self.waited.store(0, Ordering::Relaxed);
        tracing::warn!(
            waited,
            "{} client connections are open (max_connections): each new one waits in the \
             listen queue until an idle one closes to make room ({waited} waited since the \
             last such warning)",
            self.max
        );
    }

    /// Waits for a free place (at once without a cap).
    async fn take(&self) -> Slot {
        let Some(slots) = self.slots.as_ref() else {
            return Slot::default();
        };
        if slots.available_permits() == 0 {
            self.warn_full();
            // The acceptor takes one connection at a time: one place is
            // wanted. Set before the queue is read: a connection falling
            // idle meanwhile queues itself first, then reads it.
            self.crowding.wanted.store(1, Ordering::Release);
            self.crowding.idle.nudge_oldest();
        }
        // The semaphore is never closed, so acquiring only waits.
        let permit = slots.clone().acquire_owned().await.ok();
        self.crowding.wanted.store(0, Ordering::Release);
        Slot {
            _permit: permit,
            crowding: Some(self.crowding.clone()),
        }
    }
}

/// Accepts the next connection and waits until `cap` has room for it (the
/// connections behind it wait in the listen queue meanwhile), backing off
/// briefly on errors such as running out of file descriptors instead of
/// spinning; `None` once `stop` turns true.
async fn accept(
    listener: &TcpListener,
    cap: &ConnectionCap,
    stop: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, Slot)> {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return None,
        };
        match accepted {
            Ok((s, _)) => {
                let slot = tokio::select! {
                    slot = cap.take() => slot,
                    _ = stop.wait_for(|s| *s) => return None,
                };
                return Some((s, slot));
            }
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
    routes: impl Into<Routes>,
    limits: ServerLimits,
    mut stop: watch::Receiver<bool>,
) -> Draining {
    let mut conns = Connections::new(routes.into(), &limits, Arc::default());
    let cap = ConnectionCap::new(limits.max_connections);
    while let Some((stream, slot)) = accept(&listener, &cap, &mut stop).await {
        conns.open.fetch_add(1, Ordering::Relaxed);
        conns.start(stream, slot);
    }
    conns.draining()
}

/// One serving thread as the acceptor sees it.
struct ServingThread {
    /// New connections for it.
    handoff: mpsc::UnboundedSender<(std::net::TcpStream, Slot)>,
    /// Connections it has open.
    open: Arc<AtomicUsize>,
}

/// Serves `listener` on `threads` serving threads, each running its own
/// single-threaded event loop with its own upstream connection pools
/// (`sluice_providers::use_thread_pool`). An acceptor on the calling runtime
/// hands every new connection to the thread with the fewest open (a shared
/// accept queue would let whichever thread wakes first take nearly all of
/// them). A request is then parsed, judged, forwarded and answered on one
/// thread: no task migrates and no wake-up crosses threads on its path,
/// unless its thread is [`OFFLOAD_MARGIN`] handlers busier than another
/// one, which then runs its handler (see [`Peers`]).
///
/// On stop the acceptor closes the listener; each thread lets its in-flight
/// requests and streams finish for up to `grace`, cuts the rest (a cut
/// stream still records itself), waits (within the same grace) for the
/// handlers other threads handed it, and ends its runtime with every task
/// its requests left behind. Each receiver resolves with whether its thread
/// drained within `grace`. `offloaded` counts the handlers that ran on
/// another thread than their connection's.
pub(crate) fn serve_on_threads(
    listener: TcpListener,
    routes: impl Into<Routes>,
    limits: ServerLimits,
    stop: watch::Receiver<bool>,
    grace: Duration,
    (threads, offloaded): (usize, Arc<AtomicU64>),
) -> std::io::Result<Vec<oneshot::Receiver<std::io::Result<bool>>>> {
    let threads = threads.max(1);
    let routes = routes.into();
    let peers = Arc::new(Peers::new(threads, offloaded));
    let mut serving = Vec::with_capacity(threads);
    let mut done = Vec::with_capacity(threads);
    for i in 0..threads {
        let (handoff, incoming) = mpsc::unbounded_channel();
        let (tx, rx) = oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let (routes, limits, stop, count) =
            (routes.clone(), limits.clone(), stop.clone(), open.clone());
        let offload = Offload {
            peers: peers.clone(),
            me: i,
        };
        std::thread::Builder::new()
            .name(format!("sluice-serve-{i}"))
            .spawn(move || {
                sluice_providers::use_thread_pool(i + 1);
                let thread = ServeThread {
                    incoming,
                    routes,
                    limits,
                    stop,
                    grace,
                    open: count,
                    offload,
                };
                let _ = tx.send(thread.run());
            })?;
        serving.push(ServingThread { handoff, open });
        done.push(rx);
    }
    let cap = ConnectionCap::new(limits.max_connections);
    tokio::spawn(hand_out(listener, serving, cap, stop));
    Ok(done)
}

/// The acceptor: every new connection goes to the serving thread with the
/// fewest open, ties broken in turn.
async fn hand_out(
    listener: TcpListener,
    mut serving: Vec<ServingThread>,
    cap: ConnectionCap,
    mut stop: watch::Receiver<bool>,
) {
    let mut turn = 0usize;
    while let Some((stream, slot)) = accept(&listener, &cap, &mut stop).await {
        let mut conn = match stream.into_std() {
            Ok(s) => (s, slot),
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
            match serving[pick].handoff.send(conn) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => {
                    // That thread is gone (it failed to start): give the
                    // connection to another and stop giving it work.
                    tracing::error!("a serving thread is not running");
                    serving.remove(pick);
                    conn = back;
                }
            }
        }
    }
}

/// One serving thread: see [`serve_on_threads`].
struct ServeThread {
    incoming: mpsc::UnboundedReceiver<(std::net::TcpStream, Slot)>,
    routes: Routes,
    limits: ServerLimits,
    stop: watch::Receiver<bool>,
    grace: Duration,
    open: Arc<AtomicUsize>,
    offload: Offload,
}

impl ServeThread {
    fn run(self) -> std::io::Result<bool> {
        let ServeThread {
            mut incoming,
            routes,
            limits,
            mut stop,
            grace,
            open,
            offload,
        } = self;
        let peers = offload.peers.clone();
        let at = offload.me;
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                peers.threads[at].closed.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        let _ = peers.threads[at].handle.set(rt.handle().clone());
        let drained = rt.block_on(async move {
            let mut conns = Connections::new(routes, &limits, open.clone());
            conns.offload = Some(offload);
            loop {
                let next = tokio::select! {
                    n = incoming.recv() => n,
                    _ = stop.wait_for(|s| *s) => None,
                };
                let Some((stream, slot)) = next else { break };
                match TcpStream::from_std(stream) {
                    Ok(s) => conns.start(s, slot),
                    Err(e) => {
                        open.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!("cannot serve a handed-over connection: {e}");
                    }
                }
            }
            let deadline = tokio::time::Instant::now() + grace;
            let mine = conns.draining().finish(deadline).await;
            // Requests other threads handed over finish here too (their
            // answers, streams included, read their upstream through this
            // loop): hand over nothing new, then wait.
            let me = &peers.threads[at];
            me.closed.store(true, Ordering::SeqCst);
            while me.hosted.load(Ordering::SeqCst) > 0 {
                if tokio::time::Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            mine
        });
        // Tasks requests spawned (mirrors, background records) end here,
        // before the caller flushes the store.
        rt.shutdown_timeout(Duration::from_secs(1));
        Ok(drained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Past capacity thousands of connections a second wait at the cap; the
    /// warning is logged the first time, then at most every ten seconds
    /// with the count of those that waited meanwhile.
    #[test]
    fn the_cap_warning_is_logged_at_most_every_ten_seconds() {
        assert!(warn_due(0, 1));
        assert!(!warn_due(5, 5));
        assert!(!warn_due(5, 5 + CAP_WARN_EVERY_MS - 1));
        assert!(warn_due(5, 5 + CAP_WARN_EVERY_MS));
        let cap = ConnectionCap::new(2);
        cap.warn_full();
        let first = cap.last_warn.load(Ordering::Relaxed);
        assert_ne!(first, 0, "the first wait is logged at once");
        assert_eq!(cap.waited.load(Ordering::Relaxed), 0);
        for _ in 0..1000 {
            cap.warn_full();
        }
        assert_eq!(cap.last_warn.load(Ordering::Relaxed), first, "logged again");
        assert_eq!(cap.waited.load(Ordering::Relaxed), 1000);
    }

    /// At the cap, only the connection idle longest may close, only while
    /// a place is wanted, and only once per place; a connection that
    /// leaves the queue (busy again, or closed) passes its turn on.
    #[test]
    fn the_connection_idle_longest_makes_room_once() {
        let crowding = Crowding {
            wanted: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(IdleQueue::default()),
        };
        let conn = || Arc::new(Activity::new(Some(crowding.clone())));
        let (a, b, c) = (conn(), conn(), conn());
        for x in [&b, &a, &c] {
            crowding.idle.push(x);
        }
        assert!(!crowding.claim(&b), "no place wanted");
        crowding.wanted.store(1, Ordering::Release);
        assert!(!crowding.claim(&a), "a fell idle after b");
        assert!(!crowding.claim(&c));
        // b is asked; it turns busy first, so a is asked instead.
        crowding.idle.nudge_oldest();
        b.left_idle();
        assert!(!crowding.claim(&b), "b is no longer idle");
        assert!(crowding.claim(&a));
        assert!(!crowding.claim(&c), "one place, one close");
        assert_eq!(crowding.idle.len(), 1);
        // Idle again: b is now the youngest.
        crowding.idle.push(&b);
        crowding.wanted.store(1, Ordering::Release);
        assert!(!crowding.claim(&b));
        assert!(crowding.claim(&c));
        // A connection gone leaves the queue (dropped, or skipped if it
        // is being dropped).
        let d = conn();
        crowding.idle.push(&d);
        crowding.idle.remove(&b);
        drop(d);
        crowding.idle.nudge_oldest();
        assert_eq!(crowding.idle.len(), 0);
    }

    /// Sends one keep-alive request on `conn` and returns the body (the
    /// name of the thread that answered).
    async fn ask(conn: &mut TcpStream) -> String {
        ask_at(conn, "/").await
    }

    /// Sends `GET path` on `conn` and returns the body.
    async fn ask_at(conn: &mut TcpStream, path: &str) -> String {
        conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
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

    /// The threads' drain reports.
    type Done = Vec<oneshot::Receiver<std::io::Result<bool>>>;

    /// Serves `router` on `n` serving threads on a loopback port (5 s
    /// grace); returns the address, the stop switch and the drain reports.
    fn start_threads(
        router: Router,
        n: usize,
        offloaded: Arc<AtomicU64>,
    ) -> (std::net::SocketAddr, watch::Sender<bool>, Done) {
        let listener = crate::listen("127.0.0.1:0".parse().expect("addr"), 128).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = watch::channel(false);
        let done = serve_on_threads(
            listener,
            router,
            ServerLimits::default(),
            stop_rx,
            Duration::from_secs(5),
            (n, offloaded),
        )
        .expect("threads start");
        (addr, stop_tx, done)
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
        let (addr, stop_tx, done) = start_threads(router, 3, Arc::default());
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

    /// What the slow handler of [`offload_server`] saw.
    #[derive(Default)]
    struct SlowLog {
        started: AtomicUsize,
        finished: AtomicUsize,
        cancelled: AtomicUsize,
    }

    /// Counts a slow handler dropped before it finished.
    struct Cancelled(Arc<SlowLog>, bool);

    impl Drop for Cancelled {
        fn drop(&mut self) {
            if !self.1 {
                self.0.cancelled.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Two serving threads; `/` answers with the thread's name at once,
    /// `/slow` after 400 ms with the name of the thread its handler ran on,
    /// `/stream` streams `a`, `b`, `c`, `d` 100 ms apart from a task on the
    /// handler's thread (as an upstream connection lives on the thread
    /// whose pool opened it).
    /// Returns the address, the stop switch, the threads' drain reports, the
    /// handed-over counter and the slow handler's log. Three connections are
    /// left open on `sluice-serve-0` and none on the other.
    async fn offload_server() -> (
        Vec<TcpStream>,
        watch::Sender<bool>,
        Done,
        Arc<AtomicU64>,
        Arc<SlowLog>,
    ) {
        let log = Arc::new(SlowLog::default());
        let seen = log.clone();
        let router = Router::new()
            .route(
                "/",
                axum::routing::get(|| async {
                    std::thread::current().name().unwrap_or("?").to_string()
                }),
            )
            .route(
                "/slow",
                axum::routing::get(move || {
                    let log = seen.clone();
                    async move {
                        log.started.fetch_add(1, Ordering::SeqCst);
                        let mut guard = Cancelled(log.clone(), false);
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        guard.1 = true;
                        log.finished.fetch_add(1, Ordering::SeqCst);
                        std::thread::current().name().unwrap_or("?").to_string()
                    }
                }),
            )
            .route(
                "/stream",
                axum::routing::get(|| async {
                    let (tx, rx) = mpsc::channel::<bytes::Bytes>(1);
                    tokio::spawn(async move {
                        for part in ["a", "b", "c", "d"] {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            if tx.send(bytes::Bytes::from(part)).await.is_err() {
                                return;
                            }
                        }
                    });
                    let parts = futures_util::stream::unfold(rx, |mut rx| async move {
                        rx.recv()
                            .await
                            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
                    });
                    axum::body::Body::from_stream(parts)
                }),
            );
        let offloaded = Arc::new(AtomicU64::new(0));
        let (addr, stop_tx, done) = start_threads(router, 2, offloaded.clone());
        let mut on_first = Vec::new();
        let mut others = Vec::new();
        for _ in 0..6 {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            if ask(&mut c).await == "sluice-serve-0" {
                on_first.push(c);
            } else {
                others.push(c);
            }
        }
        assert_eq!(on_first.len(), 3, "connections alternate between threads");
        drop(others);
        (on_first, stop_tx, done, offloaded, log)
    }

    /// Waits up to 5 s for `done` to hold.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts `GET /slow` on `conn` and waits until its handler runs.
    async fn start_slow(mut conn: TcpStream, log: &SlowLog) -> tokio::task::JoinHandle<String> {
        let before = log.started.load(Ordering::SeqCst);
        let task = tokio::spawn(async move { ask_at(&mut conn, "/slow").await });
        until("the slow handler starts", || {
            log.started.load(Ordering::SeqCst) > before
        })
        .await;
        task
    }

    /// A client pool's busy connections can all sit on one serving thread.
    /// Once that thread runs `OFFLOAD_MARGIN` handlers more than the other,
    /// the next request's handler runs on the other; a stop still lets it
    /// finish and answer on its connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thread_that_falls_behind_hands_handlers_to_an_idle_one() {
        let (conns, stop_tx, done, offloaded, log) = offload_server().await;
        let mut answers = Vec::new();
        for c in conns {
            answers.push(start_slow(c, &log).await);
        }
        // Stop while all three are running: each still gets its answer.
        stop_tx.send(true).expect("stop");
        let mut ran_on = Vec::new();
        for a in answers {
            ran_on.push(a.await.expect("answered"));
        }
        assert_eq!(
            ran_on,
            ["sluice-serve-0", "sluice-serve-0", "sluice-serve-1"],
            "two handlers on the connections' own thread, the third handed over"
        );
        assert_eq!(offloaded.load(Ordering::Relaxed), 1);
        assert_eq!(log.finished.load(Ordering::SeqCst), 3);
        for d in done {
            assert!(
                d.await.expect("thread reports").expect("thread ran"),
                "drained"
            );
        }
    }

    /// A client that leaves cancels its handler on the thread it was handed
    /// to, as it would on its own thread (where the request is then recorded
    /// as a disconnect).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_leaving_cancels_its_handed_over_handler() {
        let (mut conns, stop_tx, done, offloaded, log) = offload_server().await;
        let third = conns.pop().expect("three connections");
        let mut answers = Vec::new();
        for c in conns {
            answers.push(start_slow(c, &log).await);
        }
        let leaving = start_slow(third, &log).await;
        assert_eq!(offloaded.load(Ordering::Relaxed), 1, "handed over");
        leaving.abort();
        let _ = leaving.await;
        for a in answers {
            assert_eq!(a.await.expect("answered"), "sluice-serve-0");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while log.cancelled.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the handed-over handler still runs after its client left"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(log.finished.load(Ordering::SeqCst), 2);
        stop_tx.send(true).expect("stop");
        for d in done {
            assert!(d.await.expect("thread reports").expect("thread ran"));
        }
    }

    /// Sends `GET path` on `conn` and reads a chunked answer to its end (or
    /// to the connection's end); returns the body's chunks joined.
    async fn ask_chunked(conn: &mut TcpStream, path: &str) -> String {
        conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.ends_with(b"\r\n0\r\n\r\n") {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        // Chunked framing: size line, data line, ...
        body.split("\r\n")
            .collect::<Vec<_>>()
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| c[1])
            .collect()
    }

    /// A streamed answer handed to another thread reads its source through
    /// that thread's event loop; a stop lets it finish there before that
    /// loop ends, though the thread has no connection of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handed_over_stream_finishes_when_the_server_stops() {
        let (mut conns, stop_tx, done, offloaded, log) = offload_server().await;
        let mut third = conns.pop().expect("three connections");
        let mut slow = Vec::new();
        for c in conns {
            slow.push(start_slow(c, &log).await);
        }
        let stream = tokio::spawn(async move { ask_chunked(&mut third, "/stream").await });
        until("the stream handed over", || {
            offloaded.load(Ordering::Relaxed) == 1
        })
        .await;
        stop_tx.send(true).expect("stop");
        assert_eq!(stream.await.expect("answered"), "abcd", "the whole stream");
        for s in slow {
            assert_eq!(s.await.expect("answered"), "sluice-serve-0");
        }
        for d in done {
            assert!(d.await.expect("thread reports").expect("thread ran"));
        }
    }
}
