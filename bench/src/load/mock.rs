//! A mock OpenAI-compatible upstream fast enough never to be the bottleneck:
//! hyper directly, pre-built answers, no JSON parsing of requests (the only
//! thing read is whether `"stream":true` appears).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// How long the mock takes to answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// Always this long (zero: answer at once).
    Fixed(Duration),
    /// Lognormal with this median and 99th percentile.
    LogNormal {
        /// Median.
        median: Duration,
        /// 99th percentile.
        p99: Duration,
    },
}

impl std::str::FromStr for Latency {
    type Err = String;
    /// `0`, `20ms`, or `lognormal:20ms:80ms`.
    fn from_str(s: &str) -> Result<Self, String> {
        let d = |x: &str| {
            humantime::parse_duration(x).map_err(|e| format!("invalid duration {x:?}: {e}"))
        };
        if s == "0" {
            return Ok(Latency::Fixed(Duration::ZERO));
        }
        match s.split(':').collect::<Vec<_>>().as_slice() {
            ["lognormal", m, p] => Ok(Latency::LogNormal {
                median: d(m)?,
                p99: d(p)?,
            }),
            [x] => Ok(Latency::Fixed(d(x)?)),
            _ => Err(format!(
                "latency must be 0, a duration (20ms) or lognormal:MEDIAN:P99, got {s:?}"
            )),
        }
    }
}

/// What the mock answers.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Time before the answer (non-stream) or the first chunk (stream).
    pub latency: Latency,
    /// Content chunks in a streamed answer.
    pub chunks: usize,
    /// Time between two chunks.
    pub interval: Duration,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            latency: Latency::Fixed(Duration::ZERO),
            chunks: 10,
            interval: Duration::from_millis(1),
        }
    }
}

const COMPLETION: &str = r#"{"id":"chatcmpl-load","object":"chat.completion","created":1700000000,"model":"mock","choices":[{"index":0,"message":{"role":"assistant","content":"Your order ships tomorrow. Thanks for your patience, and let me know if there is anything else I can help with."},"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":22,"total_tokens":46}}"#;

fn chunk(content: &str, finish: Option<&str>) -> String {
    let finish = finish.map_or("null".to_string(), |f| format!("\"{f}\""));
    format!(
        "data: {{\"id\":\"chatcmpl-load\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"mock\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":{finish}}}]}}\n\n"
    )
}

struct Mock {
    cfg: MockConfig,
    completion: Bytes,
    chunks: Vec<Bytes>,
    seed: std::sync::atomic::AtomicU64,
}

impl Mock {
    fn delay(&self) -> Duration {
        match self.cfg.latency {
            Latency::Fixed(d) => d,
            Latency::LogNormal { median, p99 } => {
                let s = self
                    .seed
                    .fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed);
                let mut r = sluice_core::splitmix::SplitMix64(s);
                let m = median.as_secs_f64().max(1e-6);
                let sigma = ((p99.as_secs_f64().max(m)) / m).ln() / 2.326;
                Duration::from_secs_f64(m * (sigma * r.normal()).exp())
            }
        }
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn handle(mock: Arc<Mock>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let stream = memchr_stream(&body);
    let delay = mock.delay();
    if !stream {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        return Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(mock.completion.clone()).boxed())
            .unwrap_or_default());
    }
    let chunks = mock.chunks.clone();
    let interval = mock.cfg.interval;
    let s = futures_util::stream::unfold(0usize, move |i| {
        let chunks = chunks.clone();
        async move {
            if i >= chunks.len() {
                return None;
            }
            // [role, content × N, finish, DONE]: the latency before the
            // first piece, the interval before each content piece.
            let wait = if i == 0 {
                delay
            } else if i + 2 < chunks.len() {
                interval
            } else {
                Duration::ZERO
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            Some((Ok::<_, Infallible>(Frame::data(chunks[i].clone())), i + 1))
        }
    });
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(s).boxed())
        .unwrap_or_default())
}

/// Whether the body asks for a stream (`"stream":true`, spaces allowed).
fn memchr_stream(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    let Some(at) = text.find("\"stream\"") else {
        return false;
    };
    text[at + 8..]
        .trim_start()
        .strip_prefix(':')
        .is_some_and(|rest| rest.trim_start().starts_with("true"))
}

/// Serves the mock on `listener` until the process ends.
pub async fn serve(listener: TcpListener, cfg: MockConfig) {
    let mut chunks: Vec<Bytes> = vec![Bytes::from(chunk("", None).replace(
        "\"delta\":{\"content\":\"\"}",
        "\"delta\":{\"role\":\"assistant\",\"content\":\"\"}",
    ))];
    for i in 0..cfg.chunks {
        chunks.push(Bytes::from(chunk(&format!("word{i} "), None)));
    }
    chunks.push(Bytes::from(chunk("", Some("stop"))));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let mock = Arc::new(Mock {
        cfg,
        completion: Bytes::from_static(COMPLETION.as_bytes()),
        chunks,
        seed: std::sync::atomic::AtomicU64::new(7),
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mock = mock.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(mock.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds `addr` with the 4096-connection accept queue every target in a run
/// gets (sluice's default `listen_backlog`).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    sluice_gateway::listen(addr, 4096)
}

/// Binds `addr` and serves the mock on a task; returns the bound address.
pub async fn spawn(addr: SocketAddr, cfg: MockConfig) -> std::io::Result<SocketAddr> {
    let l = listen(addr)?;
    let a = l.local_addr()?;
    tokio::spawn(serve(l, cfg));
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_flag_is_read_without_parsing() {
        assert!(memchr_stream(br#"{"model":"m","stream":true}"#));
        assert!(memchr_stream(br#"{"model":"m","stream" : true}"#));
        assert!(!memchr_stream(br#"{"model":"m","stream":false}"#));
        assert!(!memchr_stream(br#"{"model":"m"}"#));
    }

    #[test]
    fn latency_parses() {
        assert_eq!("0".parse::<Latency>(), Ok(Latency::Fixed(Duration::ZERO)));
        assert_eq!(
            "20ms".parse::<Latency>(),
            Ok(Latency::Fixed(Duration::from_millis(20)))
        );
        assert!(matches!(
            "lognormal:20ms:80ms".parse::<Latency>(),
            Ok(Latency::LogNormal { .. })
        ));
        assert!("soon".parse::<Latency>().is_err());
    }
}
