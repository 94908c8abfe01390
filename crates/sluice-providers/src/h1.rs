//! Plain-HTTP/1.1 upstream connections driven by the task that uses them.
//!
//! hyper's pooled client runs each connection as a task of its own, so every
//! exchange hands the request to that task and the answer back: two wake-ups
//! per request, often across threads, that cost a busy gateway more than the
//! rest of the client. For `http://` upstreams (inference servers and
//! sidecars nearby, where the gateway's own cost shows most) sluice keeps its
//! own pool of HTTP/1.1 connections, and the request's task drives the
//! connection while it holds it: through the response head in
//! [`Pool::send`], then through the body as it is read ([`Body`]). A
//! connection goes back to the pool when its body has been read to the end;
//! one whose body is dropped early is closed.
//!
//! An idle connection is not driven. When it is taken it is polled once,
//! which notices an upstream that closed it meanwhile; a request that could
//! not be written on a reused connection is sent again on a new one (it never
//! reached the upstream).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Uri};
use http::HeaderValue;
use http_body_util::Full;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::ProviderError;

/// How long an unused connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One upstream connection and the half of it that sends requests.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// The connection's I/O; `None` once it has finished (the connection is
    /// closed). Dropping it fails any request still queued on it, so a
    /// request never waits on a connection that is gone.
    io: Option<Connection<TokioIo<TcpStream>, Full<Bytes>>>,
    authority: Authority,
}

impl Conn {
    /// Lets the connection read and write what it can.
    fn drive(&mut self, cx: &mut Context<'_>) {
        let Some(io) = self.io.as_mut() else { return };
        if let Poll::Ready(r) = Pin::new(io).poll(cx) {
            self.io = None;
            if let Err(e) = r {
                tracing::debug!(error = %e, authority = %self.authority, "upstream connection ended");
            }
        }
    }

    /// Whether a new request may be sent on it.
    fn reusable(&self) -> bool {
        self.io.is_some() && self.sender.is_ready()
    }
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// The in-task HTTP/1.1 connections of one client: one list per serving
/// thread (a connection's socket belongs to the runtime that opened it).
pub(crate) struct Pool {
    slots: Box<[Mutex<VecDeque<Idle>>]>,
    max_idle: usize,
    connect_timeout: Duration,
    /// The `Host` header for the authority last used (a client talks to one).
    host: OnceLock<(Authority, HeaderValue)>,
}

impl Pool {
    /// An empty pool with `slots` per-thread lists.
    pub(crate) fn new(slots: usize, max_idle: usize, connect_timeout: Duration) -> Pool {
        Pool {
            slots: (0..slots).map(|_| Mutex::new(VecDeque::new())).collect(),
            max_idle,
            connect_timeout,
            host: OnceLock::new(),
        }
    }

    /// How many idle connections the thread's list holds.
    #[cfg(test)]
    pub(crate) fn idle(&self, slot: usize) -> usize {
        self.list(slot).len()
    }

    fn list(&self, slot: usize) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.slots[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used live connection to `authority`, if any.
    fn take(&self, slot: usize, authority: &Authority, cx: &mut Context<'_>) -> Option<Box<Conn>> {
        loop {
            let idle = {
                let mut list = self.list(slot);
                let at = list.iter().rposition(|i| i.conn.authority == *authority)?;
                list.remove(at)?
            };
            if idle.since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            let mut conn = idle.conn;
            conn.drive(cx);
            if conn.reusable() {
                return Some(conn);
            }
        }
    }

    /// Keeps a connection whose exchange is over for the next request.
    fn put(&self, slot: usize, conn: Box<Conn>) {
        if !conn.reusable() {
            return;
        }
        let mut list = self.list(slot);
        while list
            .front()
            .is_some_and(|i| i.since.elapsed() > IDLE_TIMEOUT)
        {
            list.pop_front();
        }
        if list.len() < self.max_idle {
            list.push_back(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    fn host_header(&self, authority: &Authority) -> HeaderValue {
        if let Some((a, h)) = self.host.get() {
            if a == authority {
                return h.clone();
            }
        }
        let h = match authority.port() {
            Some(p) => HeaderValue::from_str(&format!("{}:{}", authority.host(), p.as_str())),
            None => HeaderValue::from_str(authority.host()),
        }
        .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        let _ = self.host.set((authority.clone(), h.clone()));
        h
    }

    /// Opens a connection to `authority`.
    async fn connect(
        &self,
        provider: &str,
        authority: &Authority,
    ) -> Result<Box<Conn>, ProviderError> {
        let unreachable = |message: String| ProviderError::Unreachable {
            provider: provider.to_string(),
            message,
            connect: true,
        };
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = authority.port_u16().unwrap_or(80);
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| {
                unreachable(format!(
                    "connecting to {authority} timed out after {:?}",
                    self.connect_timeout
                ))
            })?
            .map_err(|e| unreachable(format!("cannot connect to {authority}: {e}")))?;
        // Requests are written whole; Nagle would only delay them.
        let _ = stream.set_nodelay(true);
        let (sender, io) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(super::http::error_chain(&e)))?;
        // Boxed once for its life, so handing it between pool and body is
        // a pointer move.
        Ok(Box::new(Conn {
            sender,
            io: Some(io),
            authority: authority.clone(),
        }))
    }

    /// Sends `req` (an absolute `http://` URI) on a pooled or new connection
    /// of thread list `slot`, driving the connection until the response head
    /// arrives. The connection then travels with the response's body.
    pub(crate) async fn send(
        self: &Arc<Self>,
        provider: &str,
        slot: usize,
        mut req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Body>, ProviderError> {
        let Some(authority) = req.uri().authority().cloned() else {
            return Err(ProviderError::Unreachable {
                provider: provider.to_string(),
                message: format!("{} has no host", req.uri()),
                connect: true,
            });
        };
        // HTTP/1.1 origin form: the path on the request line, the host in
        // its header.
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = None;
        parts.authority = None;
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"));
        req.headers_mut()
            .insert(http::header::HOST, self.host_header(&authority));

        let (mut conn, mut reused) =
            match poll_fn(|cx| Poll::Ready(self.take(slot, &authority, cx))).await {
                Some(c) => (c, true),
                // Boxed, as is the reconnect below: a new connection is the
                // rare path, and its state would size every exchange's future.
                None => (Box::pin(self.connect(provider, &authority)).await?, false),
            };
        loop {
            let mut answer = pin!(conn.sender.try_send_request(req));
            let r = poll_fn(|cx| {
                conn.drive(cx);
                answer.as_mut().poll(cx)
            })
            .await;
            match r {
                Ok(resp) => {
                    let (head, body) = resp.into_parts();
                    let body = Body::Driven(Driven {
                        body,
                        conn: Some(conn),
                        pool: self.clone(),
                        slot,
                    });
                    return Ok(http::Response::from_parts(head, body));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the upstream closed the idle connection.
                    Some(back) if reused => {
                        req = back;
                        reused = false;
                        conn = Box::pin(self.connect(provider, &authority)).await?;
                    }
                    _ => {
                        let e = e.into_error();
                        return Err(ProviderError::Unreachable {
                            provider: provider.to_string(),
                            message: super::http::error_chain(&e),
                            connect: false,
                        });
                    }
                },
            }
        }
    }
}

/// A response body from either client: hyper's pooled one, or a connection
/// of [`Pool`] that this body drives as it is read.
pub(crate) enum Body {
    /// From hyper's pooled client (HTTPS, HTTP/2).
    Pooled(Incoming),
    /// From an in-task connection.
    Driven(Driven),
}

/// A body with the connection it arrives on.
pub(crate) struct Driven {
    body: Incoming,
    /// Given back to the pool at the end of the body.
    conn: Option<Box<Conn>>,
    pool: Arc<Pool>,
    slot: usize,
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Pooled(b) => Pin::new(b).poll_frame(cx),
            Body::Driven(d) => {
                if let Some(c) = d.conn.as_mut() {
                    c.drive(cx);
                }
                let r = Pin::new(&mut d.body).poll_frame(cx);
                match &r {
                    Poll::Ready(None) => {
                        if let Some(mut c) = d.conn.take() {
                            // Lets the connection settle after the message.
                            c.drive(cx);
                            d.pool.put(d.slot, c);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => d.conn = None,
                    _ => {}
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Pooled(b) => b.is_end_stream(),
            Body::Driven(d) => d.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Pooled(b) => b.size_hint(),
            Body::Driven(d) => d.body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// What the test server does after reading request `n` (from 0, counted
    /// over all its connections).
    #[derive(Clone, Copy)]
    enum Then {
        /// Answers `ok` and keeps the connection.
        Answer,
        /// Answers `ok` and, a moment later, closes the socket without saying so.
        AnswerAndClose,
        /// Answers `ok` with `connection: close` but keeps reading.
        AnswerSayingClose,
        /// Sends a head and part of a chunked body, then waits for more.
        Partial,
    }

    /// Request heads the server saw and connections it accepted.
    #[derive(Default)]
    struct Seen {
        heads: Mutex<Vec<String>>,
        accepted: AtomicUsize,
    }

    /// A loopback HTTP/1.1 server on `bind` acting as `then` says.
    fn server(
        bind: &str,
        then: fn(usize) -> Then,
    ) -> std::io::Result<(std::net::SocketAddr, Arc<Seen>)> {
        let listener = std::net::TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Seen::default());
        let s = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().take(16) {
                let Ok(mut conn) = conn else { return };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let end = loop {
                            if let Some(e) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break e;
                            }
                            match conn.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        let len: usize = head
                            .to_ascii_lowercase()
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            match conn.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        buf.drain(..end + 4 + len);
                        let n = {
                            let mut heads = s.heads.lock().expect("heads");
                            heads.push(head);
                            heads.len() - 1
                        };
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        match then(n) {
                            Then::Answer => {
                                let _ = conn.write_all(ok);
                            }
                            Then::AnswerAndClose => {
                                let _ = conn.write_all(ok);
                                // Closes once the client holds it idle.
                                std::thread::sleep(Duration::from_millis(10));
                                return;
                            }
                            Then::AnswerSayingClose => {
                                let _ = conn.write_all(
                                    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                                );
                            }
                            Then::Partial => {
                                let _ = conn.write_all(
                                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n",
                                );
                            }
                        }
                    }
                });
            }
        });
        Ok((addr, seen))
    }

    fn request(addr: std::net::SocketAddr) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::new(Full::new(Bytes::from_static(b"{}")));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = format!("http://{addr}/v1/chat/completions?x=1")
            .parse()
            .expect("uri");
        req
    }

    /// One request, its body read to the end.
    async fn ask(pool: &Arc<Pool>, addr: std::net::SocketAddr) -> Result<Bytes, ProviderError> {
        let resp = pool.send("o", 1, request(addr)).await?;
        assert_eq!(resp.status(), 200);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ProviderError::Stream {
                provider: "o".into(),
                message: e.to_string(),
            })?;
        Ok(body.to_bytes())
    }

    fn pool(max_idle: usize) -> Arc<Pool> {
        Arc::new(Pool::new(2, max_idle, Duration::from_secs(2)))
    }

    /// Requests go out in origin form with a `Host` header, on one reused
    /// connection.
    #[tokio::test]
    async fn requests_reuse_one_connection_and_name_their_host() {
        let (addr, seen) = server("127.0.0.1:0", |_| Then::Answer).expect("server");
        let pool = pool(8);
        for _ in 0..3 {
            assert_eq!(&ask(&pool, addr).await.expect("answered")[..], b"ok");
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(1), 1);
        let heads = seen.heads.lock().expect("heads").clone();
        assert_eq!(heads.len(), 3);
        for h in heads {
            let mut lines = h.lines();
            assert_eq!(
                lines.next(),
                Some("POST /v1/chat/completions?x=1 HTTP/1.1"),
                "{h}"
            );
            let host = lines
                .find_map(|l| l.strip_prefix("host: "))
                .expect("a host header");
            assert_eq!(host, addr.to_string(), "{h}");
        }
    }

    /// A connection the upstream closed while it sat idle is noticed when
    /// taken, and the request goes out on a new one.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced() {
        let (addr, seen) = server("127.0.0.1:0", |n| {
            if n == 1 || n == 3 {
                Then::AnswerAndClose
            } else {
                Then::Answer
            }
        })
        .expect("server");
        let pool = pool(8);
        for i in 0..5 {
            let r = ask(&pool, addr).await;
            assert_eq!(&r.expect("answered")[..], b"ok", "request {i}");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // Requests 1-2 on the first connection, 3-4 on the second, 5 on a third.
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle(1), 1);
    }

    /// `connection: close` from the upstream is honoured even when it keeps
    /// the socket open.
    #[tokio::test]
    async fn connection_close_is_honoured() {
        let (addr, seen) = server("127.0.0.1:0", |_| Then::AnswerSayingClose).expect("server");
        let pool = pool(8);
        for _ in 0..2 {
            assert_eq!(&ask(&pool, addr).await.expect("answered")[..], b"ok");
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle(1), 0);
    }

    /// A body dropped before its end takes its connection with it; the next
    /// request opens a new one and works.
    #[tokio::test]
    async fn a_body_dropped_early_closes_its_connection() {
        let (addr, seen) = server("127.0.0.1:0", |n| {
            if n == 0 {
                Then::Partial
            } else {
                Then::Answer
            }
        })
        .expect("server");
        let pool = pool(8);
        let resp = pool.send("o", 1, request(addr)).await.expect("head");
        let mut body = resp.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"ok"[..]));
        drop(body);
        assert_eq!(pool.idle(1), 0);
        assert_eq!(&ask(&pool, addr).await.expect("answered")[..], b"ok");
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    }

    /// Connections in use at once all go back, up to the idle limit.
    #[tokio::test]
    async fn idle_connections_are_kept_up_to_the_limit() {
        let (addr, seen) = server("127.0.0.1:0", |_| Then::Answer).expect("server");
        let pool = pool(2);
        let heads =
            futures_util::future::join_all((0..3).map(|_| pool.send("o", 1, request(addr)))).await;
        for h in heads {
            let body = h.expect("head").into_body().collect().await.expect("body");
            assert_eq!(&body.to_bytes()[..], b"ok");
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle(1), 2);
        assert_eq!(pool.idle(0), 0, "kept in the calling slot's list");
    }

    /// Nothing listening: a connect failure, which is safe to retry.
    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        match pool(8).send("o", 1, request(addr)).await {
            Err(ProviderError::Unreachable {
                connect: true,
                message,
                ..
            }) => assert!(message.contains(&addr.to_string()), "{message}"),
            other => panic!("{:?}", other.map(|r| r.status())),
        }
    }

    /// IPv6 literal hosts are connected to without their brackets and named
    /// with them.
    #[tokio::test]
    async fn an_ipv6_loopback_upstream_is_reached() {
        let Ok((addr, seen)) = server("[::1]:0", |_| Then::Answer) else {
            eprintln!("no IPv6 loopback here; nothing to check");
            return;
        };
        let pool = pool(8);
        assert_eq!(&ask(&pool, addr).await.expect("answered")[..], b"ok");
        let heads = seen.heads.lock().expect("heads").clone();
        assert!(
            heads[0].contains(&format!("host: [::1]:{}", addr.port())),
            "{}",
            heads[0]
        );
    }
}
