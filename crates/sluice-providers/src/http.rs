//! HTTP plumbing shared by the real-protocol providers: client construction,
//! timeouts, upstream error extraction and SSE decoding of response bodies.
//!
//! Providers talk to upstreams through hyper directly: a gateway request
//! costs one pooled HTTP exchange and nothing else, no per-request URL
//! parsing, redirect or retry layers. `http://` upstreams use in-task
//! HTTP/1.1 connections ([`crate::h1`]); HTTPS ones (rustls, HTTP/1.1 or
//! HTTP/2 by ALPN) use hyper's pooled client.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use sluice_core::config::ProviderConfig;
use sluice_core::sse::{SseDecoder, SseEvent};

use crate::{BuildError, ProviderError};
use http::{HeaderMap, HeaderValue, Method, Uri};
use http_body_util::{BodyDataStream, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Largest error body read from an upstream.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Largest non-streamed response accepted from an upstream.
const MAX_RESPONSE_BODY: usize = 64 * 1024 * 1024;

/// An upstream's response, its body still to be read.
pub(crate) type Response = http::Response<crate::h1::Body>;

type Inner = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Most connection pools one client keeps: one per serving thread, plus one
/// shared by every other thread.
const MAX_POOLS: usize = 257;

/// The calling thread's pool slot (see [`use_thread_pool`]).
fn current_slot() -> usize {
    POOL_SLOT.with(|s| s.get())
}

thread_local! {
    /// The pool the current thread uses (0: the shared one).
    static POOL_SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Gives the calling thread its own upstream connection pools: every client
/// then hands it connections whose I/O runs on that thread's runtime, so an
/// exchange never wakes another thread. `slot` 0 (the default) is the pool
/// shared by all threads without one; slots past the last wrap around.
pub fn use_thread_pool(slot: usize) {
    let slot = if slot == 0 {
        0
    } else {
        1 + (slot - 1) % (MAX_POOLS - 1)
    };
    POOL_SLOT.with(|s| s.set(slot));
}

/// A pooled HTTP/1.1 and HTTP/2 client for one provider, with the headers
/// (auth, content type, user agent, extras) it sends on every request.
///
/// It keeps one connection pool per serving thread (see
/// [`use_thread_pool`]), built on the thread's first request: a pooled
/// connection's I/O task lives on the runtime that opened it, and sharing
/// it across threads costs a cross-thread wake-up on every read and write.
#[derive(Clone)]
pub(crate) struct HttpClient {
    pools: std::sync::Arc<Pools>,
    h1: std::sync::Arc<crate::h1::Pool>,
    headers: HeaderMap,
}

/// The per-thread pools of one client and what builds a new one.
struct Pools {
    slots: [std::sync::OnceLock<Inner>; MAX_POOLS],
    connector: hyper_rustls::HttpsConnector<HttpConnector>,
    max_idle: usize,
}

impl Pools {
    /// The calling thread's pool.
    fn current(&self) -> &Inner {
        self.slots[current_slot()].get_or_init(|| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(self.max_idle)
                .pool_timer(TokioTimer::new())
                .build(self.connector.clone())
        })
    }
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Headers hold the API key: never printed.
        f.write_str("HttpClient")
    }
}

impl HttpClient {
    /// A `POST uri` carrying `body`, the provider's headers and `accept`.
    pub(crate) fn post(
        &self,
        uri: &Uri,
        accept: Option<&'static str>,
        body: Vec<u8>,
    ) -> http::Request<Full<Bytes>> {
        let mut req = http::Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = self.headers.clone();
        if let Some(a) = accept {
            req.headers_mut()
                .insert(http::header::ACCEPT, HeaderValue::from_static(a));
        }
        req
    }
}

/// A client for one provider; `headers` (auth, content type, extras) go
/// with every request.
pub(crate) fn build_client(
    cfg: &ProviderConfig,
    mut headers: HeaderMap,
) -> Result<HttpClient, BuildError> {
    headers.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static(concat!("sluice/", env!("CARGO_PKG_VERSION"))),
    );
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(cfg.connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| BuildError {
            provider: cfg.name.clone(),
            message: format!("cannot set up TLS: {e}"),
        })?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    let pools = Pools {
        slots: std::array::from_fn(|_| std::sync::OnceLock::new()),
        connector: https,
        max_idle: cfg.max_idle_connections,
    };
    Ok(HttpClient {
        pools: std::sync::Arc::new(pools),
        h1: std::sync::Arc::new(crate::h1::Pool::new(
            MAX_POOLS,
            cfg.max_idle_connections,
            cfg.connect_timeout,
        )),
        headers,
    })
}

/// One upstream endpoint of a provider: where its requests go, the client
/// that sends them and the waits they are allowed.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// The provider's name, as errors report it.
    pub name: String,
    url: Uri,
    client: HttpClient,
    /// The whole non-streamed exchange.
    pub timeout: Duration,
    /// The waits of a streamed answer.
    pub stream_timeouts: StreamTimeouts,
}

impl Endpoint {
    /// `base_url` + `path` with a client carrying `headers` on every request.
    pub(crate) fn new(
        cfg: &ProviderConfig,
        base_url: &str,
        path: &str,
        headers: HeaderMap,
    ) -> Result<Self, BuildError> {
        Ok(Endpoint {
            name: cfg.name.clone(),
            url: endpoint(&cfg.name, base_url, path)?,
            client: build_client(cfg, headers)?,
            timeout: cfg.timeout,
            stream_timeouts: StreamTimeouts {
                first_byte: cfg.first_byte_timeout,
                idle: cfg.idle_timeout,
                total: cfg.stream_timeout,
            },
        })
    }

    /// POSTs a non-streamed request: its successful response and what is
    /// left of `timeout` for reading the body. A non-2xx answer is the
    /// upstream's error.
    pub(crate) async fn post(&self, body: Vec<u8>) -> Result<(Response, Duration), ProviderError> {
        let start = Instant::now();
        let resp = self.exchange(None, self.timeout, "response", body).await?;
        Ok((resp, self.timeout.saturating_sub(start.elapsed())))
    }

    /// POSTs a streamed request: its successful response and when it was
    /// sent (the first-byte wait runs from then). A non-2xx answer is the
    /// upstream's error.
    pub(crate) async fn post_stream(
        &self,
        body: Vec<u8>,
    ) -> Result<(Response, Instant), ProviderError> {
        let sent = Instant::now();
        let wait = self.stream_timeouts.first_byte;
        let resp = self
            .exchange(Some("text/event-stream"), wait, "first byte", body)
            .await?;
        Ok((resp, sent))
    }

    /// POSTs `body`, allowing `wait` until the response headers; a non-2xx
    /// answer is the upstream's error.
    async fn exchange(
        &self,
        accept: Option<&'static str>,
        wait: Duration,
        phase: &'static str,
        body: Vec<u8>,
    ) -> Result<Response, ProviderError> {
        let req = self.client.post(&self.url, accept, body);
        let resp = send(&self.name, &self.client, req, wait, phase).await?;
        if !resp.status().is_success() {
            // Boxed: the error path's body read would otherwise size the
            // future of every exchange.
            return Err(Box::pin(status_error(&self.name, resp)).await);
        }
        Ok(resp)
    }
}

/// A request body as JSON bytes.
pub(crate) fn encode(body: &impl serde::Serialize) -> Result<Vec<u8>, ProviderError> {
    // Room for a usual request at once (serde_json alone starts at 128
    // bytes and grows by doubling, copying each time).
    let mut out = Vec::with_capacity(1024);
    serde_json::to_writer(&mut out, body).map_err(|e| ProviderError::Unsupported {
        param: "body".into(),
        message: format!("cannot encode request: {e}"),
    })?;
    Ok(out)
}

/// The endpoint `base_url` + `path`, checked to be an absolute http(s) URL.
pub(crate) fn endpoint(provider: &str, base_url: &str, path: &str) -> Result<Uri, BuildError> {
    let uri: Uri = format!("{base_url}{path}")
        .parse()
        .map_err(|e| bad_url(provider, e))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(bad_url(
            provider,
            format!("{base_url:?} needs http:// or https:// and a host"),
        )),
    }
}

pub(crate) fn bad_url(provider: &str, e: impl std::fmt::Display) -> BuildError {
    BuildError {
        provider: provider.to_string(),
        message: format!("base_url does not make a valid URL: {e}"),
    }
}

/// Whether an I/O timeout sits anywhere in the error's causes.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = c.source();
    }
    false
}

pub(crate) fn map_send_error(
    provider: &str,
    e: &hyper_util::client::legacy::Error,
    after: Duration,
) -> ProviderError {
    if timed_out(e) {
        ProviderError::Timeout {
            provider: provider.to_string(),
            after,
            phase: "response",
        }
    } else {
        // Connect failures and connections dropped before a response.
        ProviderError::Unreachable {
            provider: provider.to_string(),
            message: error_chain(e),
            connect: e.is_connect(),
        }
    }
}

/// The error and its causes, joined (a client error's top-level message is
/// rarely actionable).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Sends a request, allowing `timeout` until the response headers arrive.
pub(crate) async fn send(
    provider: &str,
    client: &HttpClient,
    req: http::Request<Full<Bytes>>,
    timeout: Duration,
    phase: &'static str,
) -> Result<Response, ProviderError> {
    let exchange = async {
        if req.uri().scheme() == Some(&http::uri::Scheme::HTTP) {
            client.h1.send(provider, current_slot(), req).await
        } else {
            match client.pools.current().request(req).await {
                Ok(r) => Ok(r.map(crate::h1::Body::Pooled)),
                Err(e) => Err(map_send_error(provider, &e, timeout)),
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(ProviderError::Timeout {
            provider: provider.to_string(),
            after: timeout,
            phase,
        }),
        Ok(r) => r,
    }
}

/// Reads a body up to `limit` bytes before `deadline`.
pub(crate) async fn read_body(
    provider: &str,
    resp: Response,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ProviderError> {
    let read = async {
        let mut body = crate::Gathered::default();
        let mut stream = BodyDataStream::new(resp.into_body());
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| ProviderError::Stream {
                provider: provider.to_string(),
                message: format!("response body broke off: {}", error_chain(&e)),
            })?;
            if !body.push(piece, limit) {
                return Err(ProviderError::InvalidResponse {
                    provider: provider.to_string(),
                    message: format!("response body larger than {limit} bytes"),
                });
            }
        }
        Ok(body.into_bytes())
    };
    match crate::within(timeout, read).await {
        Err(_) => Err(ProviderError::Timeout {
            provider: provider.to_string(),
            after: timeout,
            phase: "response body",
        }),
        Ok(r) => r,
    }
}

/// Reads a successful JSON response.
pub(crate) async fn read_json(
    provider: &str,
    resp: Response,
    timeout: Duration,
) -> Result<(Value, Bytes), ProviderError> {
    let body = read_body(provider, resp, MAX_RESPONSE_BODY, timeout).await?;
    let v = parse_json(provider, &body)?;
    Ok((v, body))
}

/// A whole response body read (at most the response limit, within `timeout`),
/// not yet decoded.
pub(crate) async fn read_bytes(
    provider: &str,
    resp: Response,
    timeout: Duration,
) -> Result<Bytes, ProviderError> {
    read_body(provider, resp, MAX_RESPONSE_BODY, timeout).await
}

/// Decodes a response body as a JSON tree.
pub(crate) fn parse_json(provider: &str, body: &[u8]) -> Result<Value, ProviderError> {
    serde_json::from_slice(body).map_err(|e| ProviderError::InvalidResponse {
        provider: provider.to_string(),
        message: format!("body is not valid JSON ({e}): {}", snippet(body)),
    })
}

/// The first 200 characters of a body, for error messages.
pub(crate) fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    if s.chars().count() > 200 {
        format!("{}…", s.chars().take(200).collect::<String>())
    } else if s.is_empty() {
        "(empty body)".to_string()
    } else {
        s.to_string()
    }
}

/// Turns a non-2xx response into a [`ProviderError::Status`], extracting the
/// upstream's own message from OpenAI- or Anthropic-shaped error bodies.
pub(crate) async fn status_error(provider: &str, resp: Response) -> ProviderError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let body = read_body(provider, resp, MAX_ERROR_BODY, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.get("message").or(Some(e)))
                .and_then(|m| m.as_str().map(str::to_string))
        })
        .unwrap_or_else(|| snippet(&body));
    ProviderError::Status {
        provider: provider.to_string(),
        status,
        message,
        retry_after,
    }
}

struct SseState<S> {
    body: S,
    decoder: SseDecoder,
    ready: VecDeque<SseEvent>,
    done: bool,
    provider: String,
    timeouts: StreamTimeouts,
    /// When the first piece of body must have arrived.
    first_by: Option<tokio::time::Instant>,
    /// When the whole stream must be over.
    end_by: tokio::time::Instant,
}

/// The waits a streamed response is allowed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamTimeouts {
    /// From the request being sent to the first piece of body.
    pub first_byte: Duration,
    /// Between two pieces of body.
    pub idle: Duration,
    /// The whole stream.
    pub total: Duration,
}

/// Decodes a streaming response body into SSE events. The first piece of
/// body must arrive within `first_byte` of `sent`, each later one within
/// `idle` of the previous, and the whole body within `total`; a body that
/// breaks off is an error item; a clean end of body ends the stream.
pub(crate) fn sse_events(
    provider: &str,
    resp: Response,
    timeouts: StreamTimeouts,
    sent: Instant,
) -> impl Stream<Item = Result<SseEvent, ProviderError>> + Send + 'static {
    let sent = tokio::time::Instant::from_std(sent);
    let state = SseState {
        body: BodyDataStream::new(resp.into_body()).boxed(),
        decoder: SseDecoder::default(),
        ready: VecDeque::new(),
        done: false,
        provider: provider.to_string(),
        timeouts,
        first_by: Some(sent + timeouts.first_byte),
        end_by: sent + timeouts.total,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.ready.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            let (wait_until, after, phase) = match st.first_by {
                Some(t) => (t, st.timeouts.first_byte, "first byte"),
                None => (
                    tokio::time::Instant::now() + st.timeouts.idle,
                    st.timeouts.idle,
                    "between chunks",
                ),
            };
            let (wait_until, after, phase) = if st.end_by < wait_until {
                (st.end_by, st.timeouts.total, "whole stream")
            } else {
                (wait_until, after, phase)
            };
            let next = tokio::time::timeout_at(wait_until, st.body.next()).await;
            st.first_by = None;
            match next {
                Err(_) => {
                    st.done = true;
                    let e = ProviderError::Timeout {
                        provider: st.provider.clone(),
                        after,
                        phase,
                    };
                    return Some((Err(e), st));
                }
                Ok(None) => {
                    st.done = true;
                    match st.decoder.finish() {
                        Ok(Some(ev)) => st.ready.push_back(ev),
                        Ok(None) => {}
                        Err(e) => {
                            let e = ProviderError::Stream {
                                provider: st.provider.clone(),
                                message: e.to_string(),
                            };
                            return Some((Err(e), st));
                        }
                    }
                }
                Ok(Some(Err(e))) => {
                    st.done = true;
                    let e = ProviderError::Stream {
                        provider: st.provider.clone(),
                        message: format!("connection broke off mid-stream: {}", error_chain(&e)),
                    };
                    return Some((Err(e), st));
                }
                Ok(Some(Ok(bytes))) => match st.decoder.feed(&bytes) {
                    Ok(evs) => st.ready.extend(evs),
                    Err(e) => {
                        st.done = true;
                        let e = ProviderError::Stream {
                            provider: st.provider.clone(),
                            message: e.to_string(),
                        };
                        return Some((Err(e), st));
                    }
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    /// A loopback HTTP/1.1 server answering `ok` on keep-alive connections;
    /// counts the connections it accepted. It stops accepting once `stop` is
    /// set and one more connection arrives.
    fn counting_server() -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicUsize::new(0));
        let (a, st) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) != 0 {
                    break;
                }
                let Ok(mut conn) = conn else { break };
                a.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request: a head and a Content-Length body.
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match conn.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            match conn.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + 4 + len);
                        if conn
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted, stop)
    }

    fn client() -> HttpClient {
        build_client(&crate::test_config().providers["o"], HeaderMap::new()).expect("client")
    }

    /// `n` sequential requests from the calling thread's runtime, each read
    /// to the end so its connection goes back to the pool.
    async fn exchange(client: &HttpClient, uri: &Uri, n: usize) -> Result<(), ProviderError> {
        for _ in 0..n {
            let req = client.post(uri, None, b"{}".to_vec());
            let resp = send("o", client, req, Duration::from_secs(2), "test").await?;
            let body = read_body("o", resp, 1024, Duration::from_secs(2)).await?;
            assert_eq!(&body[..], b"ok");
        }
        Ok(())
    }

    /// A server that answers up to two requests (on one connection or two)
    /// with a body sent as `pieces`, each flushed as its own chunk after a
    /// pause.
    fn chunked_server(pieces: &'static [&'static str]) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for conn in listener.incoming().take(2) {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    for _ in 0..2 {
                        // A request: its head and the test's `{}` body.
                        while !buf.windows(6).any(|w| w == b"\r\n\r\n{}") {
                            match conn.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        let _ = conn
                            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
                        for p in pieces {
                            std::thread::sleep(Duration::from_millis(20));
                            let _ = conn.write_all(format!("{:x}\r\n{p}\r\n", p.len()).as_bytes());
                            let _ = conn.flush();
                        }
                        let _ = conn.write_all(b"0\r\n\r\n");
                    }
                });
            }
        });
        addr
    }

    /// A body that arrives in several pieces is read whole, and the size
    /// limit counts every piece.
    #[tokio::test]
    async fn a_body_in_pieces_is_read_whole_and_within_its_limit() {
        let addr = chunked_server(&["{\"a\":", "\"hello", " world\"}"]);
        let uri: Uri = format!("http://{addr}/v1/chat/completions")
            .parse()
            .expect("uri");
        let client = client();
        for limit in [1024, 12] {
            let req = client.post(&uri, None, b"{}".to_vec());
            let resp = send("o", &client, req, Duration::from_secs(2), "test")
                .await
                .expect("answered");
            let body = read_body("o", resp, limit, Duration::from_secs(2)).await;
            match (limit, body) {
                (1024, Ok(b)) => assert_eq!(&b[..], br#"{"a":"hello world"}"#),
                (12, Err(ProviderError::InvalidResponse { message, .. })) => {
                    assert!(message.contains("larger than 12 bytes"), "{message}")
                }
                (l, other) => panic!("limit {l}: {other:?}"),
            }
        }
    }

    /// Every serving thread gets its own pool: it reuses its own connection
    /// across requests and never borrows one whose I/O runs on another
    /// thread's event loop (which would hang while that thread is busy).
    #[test]
    fn each_serving_thread_keeps_its_own_connections() {
        let (addr, accepted, stop) = counting_server();
        let uri: Uri = format!("http://{addr}/v1/chat/completions")
            .parse()
            .expect("uri");
        let client = client();
        let a_done = Arc::new(Barrier::new(2));
        let b_done = Arc::new(Barrier::new(2));
        let thread_a = {
            let (client, uri, a_done, b_done) =
                (client.clone(), uri.clone(), a_done.clone(), b_done.clone());
            std::thread::spawn(move || {
                use_thread_pool(1);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let r = rt.block_on(exchange(&client, &uri, 3));
                a_done.wait();
                // Thread A's event loop is not driven until B is done: a
                // connection B borrowed from it could not make progress.
                b_done.wait();
                r
            })
        };
        let thread_b = {
            let (client, uri) = (client.clone(), uri.clone());
            std::thread::spawn(move || {
                use_thread_pool(2);
                a_done.wait();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let r = rt.block_on(exchange(&client, &uri, 3));
                b_done.wait();
                r
            })
        };
        let b = thread_b.join().expect("thread B");
        let a = thread_a.join().expect("thread A");
        a.expect("thread A's requests are answered");
        b.expect("thread B's requests are answered while thread A is busy");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "one connection per thread, reused for its three requests"
        );
        stop.store(1, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(addr);
    }
}
