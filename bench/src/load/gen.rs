//! An open-loop load generator: requests are sent at a constant arrival rate
//! whatever the target does, and each latency is measured from the request's
//! *intended* send time, so a stalled target shows as latency instead of
//! quietly lowering the rate (no coordinated omission). Results go into HDR
//! histograms (microseconds); requests intended during the warm-up are sent
//! but not counted.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::Full;
use hyper::body::Body as _;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

/// One load run against one URL.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// `http://host:port/v1/chat/completions`.
    pub url: String,
    /// `Authorization: Bearer` value, if any.
    pub bearer: Option<String>,
    /// Request body.
    pub body: Bytes,
    /// Requests per second.
    pub rate: u32,
    /// Counted part of the run.
    pub duration: Duration,
    /// Uncounted start.
    pub warmup: Duration,
    /// Whether responses are SSE streams (time to first token is measured).
    pub stream: bool,
    /// Most requests outstanding at once; beyond it, requests are counted
    /// as errors (`saturated`) instead of piling up.
    pub max_outstanding: u64,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadResult {
    /// Target rate.
    pub rate: u32,
    /// Requests sent (warm-up included).
    pub sent: u64,
    /// Counted requests (after warm-up).
    pub counted: u64,
    /// Counted requests answered 200 in full.
    pub ok: u64,
    /// Counted requests that failed (status, transport, timeout).
    pub errors: u64,
    /// Counted requests not sent because too many were outstanding.
    pub saturated: u64,
    /// Completed counted requests per second of the counted window.
    pub throughput: f64,
    /// Latency from intended send to the last byte.
    pub latency_us: Percentiles,
    /// Streams: from intended send to the first content chunk.
    pub ttft_us: Option<Percentiles>,
    /// Statuses other than 200 seen, with counts.
    pub statuses: std::collections::BTreeMap<u16, u64>,
}

struct Acc {
    latency: Histogram<u64>,
    ttft: Histogram<u64>,
    ok: u64,
    errors: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds are valid")
}

/// Runs the load and returns what it measured.
pub async fn run(spec: LoadSpec) -> LoadResult {
    let target = Target {
        url: spec.url.clone(),
        bearer: spec.bearer.clone(),
    };
    // One target, one request per slice: the warm-up and the counted part
    // are exact request counts.
    let slice = Duration::from_secs_f64(1.0 / f64::from(spec.rate.max(1)));
    run_interleaved(&spec, &[target], slice)
        .await
        .pop()
        .unwrap_or_default()
}

/// Where an interleaved run sends its requests.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port/v1/chat/completions`.
    pub url: String,
    /// `Authorization: Bearer` value, if any.
    pub bearer: Option<String>,
}

/// One arrival process at `spec.rate` whose requests go to each target in
/// turn for `slice` at a time: target 0 for a slice, then target 1, and so
/// on, round after round. Every target sees the same rate, and whatever the
/// machine does meanwhile (a noisy neighbour, the hypervisor taking the CPU
/// for a while) falls on all of them alike instead of on whichever ran at
/// that moment. The first rounds that cover `spec.warmup` per target are
/// sent but not counted, with the rate ramping up from a tenth of
/// `spec.rate`; then rounds continue until each target has had
/// `spec.duration` counted. `spec.url` and `spec.bearer` are ignored.
pub async fn run_interleaved(
    spec: &LoadSpec,
    targets: &[Target],
    slice: Duration,
) -> Vec<LoadResult> {
    let k = targets.len().max(1) as u64;
    let accs: Vec<Arc<Mutex<Acc>>> = targets
        .iter()
        .map(|_| {
            Arc::new(Mutex::new(Acc {
                latency: hist(),
                ttft: hist(),
                ok: 0,
                errors: 0,
                statuses: Default::default(),
            }))
        })
        .collect();
    let sent: Vec<AtomicU64> = targets.iter().map(|_| AtomicU64::new(0)).collect();
    let saturated: Vec<AtomicU64> = targets.iter().map(|_| AtomicU64::new(0)).collect();
    let outstanding = Arc::new(AtomicU64::new(0));
    let rate = f64::from(spec.rate.max(1));
    let per_slice = ((slice.as_secs_f64() * rate).round() as u64).max(1);
    let slices_for = |d: Duration| (d.as_secs_f64() * rate / per_slice as f64).ceil() as u64;
    let warm_rounds = slices_for(spec.warmup);
    let rounds = warm_rounds + slices_for(spec.duration).max(1);
    let n = rounds * k * per_slice;
    let ramp = Ramp::new(warm_rounds * k * per_slice, rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let uris: Vec<hyper::Uri> = targets
        .iter()
        .map(|t| t.url.parse().expect("a valid URL"))
        .collect();
    let pools: Vec<Arc<Pool>> = uris.iter().map(|u| Arc::new(Pool::new(u))).collect();
    let reqs: Vec<Arc<Req>> = uris
        .iter()
        .zip(targets)
        .map(|(u, t)| {
            Arc::new(Req {
                path: u.path_and_query().map_or("/", |p| p.as_str()).to_string(),
                host: u.authority().map_or("", |a| a.as_str()).to_string(),
                bearer: t.bearer.as_ref().map(|b| format!("Bearer {b}")),
                body: spec.body.clone(),
            })
        })
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let intended = start + ramp.at(i);
        tokio::time::sleep_until(intended).await;
        let slot = i / per_slice;
        let t = (slot % k) as usize;
        let counted = slot / k >= warm_rounds;
        if outstanding.load(Ordering::Relaxed) >= spec.max_outstanding {
            if counted {
                saturated[t].fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        outstanding.fetch_add(1, Ordering::Relaxed);
        sent[t].fetch_add(1, Ordering::Relaxed);
        let (pool, req) = (pools[t].clone(), reqs[t].clone());
        let (acc, outstanding) = (accs[t].clone(), outstanding.clone());
        let (stream, timeout) = (spec.stream, spec.timeout);
        let intended = intended.into_std();
        tasks.spawn(async move {
            let r = tokio::time::timeout(timeout, one(&pool, &req, stream, intended)).await;
            outstanding.fetch_sub(1, Ordering::Relaxed);
            if !counted {
                return;
            }
            let mut a = acc.lock().unwrap_or_else(|p| p.into_inner());
            match r {
                Ok(Ok((200, total, first))) => {
                    a.ok += 1;
                    let _ = a.latency.record(total.as_micros().max(1) as u64);
                    if let Some(f) = first {
                        let _ = a.ttft.record(f.as_micros().max(1) as u64);
                    }
                }
                Ok(Ok((status, _, _))) => {
                    a.errors += 1;
                    *a.statuses.entry(status).or_default() += 1;
                }
                Ok(Err(())) => {
                    a.errors += 1;
                    *a.statuses.entry(0).or_default() += 1;
                }
                Err(_) => {
                    a.errors += 1;
                    *a.statuses.entry(1).or_default() += 1;
                }
            }
        });
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let counted = (rounds - warm_rounds) * per_slice;
    let counted_secs = counted as f64 / rate;
    accs.iter()
        .enumerate()
        .map(|(t, acc)| {
            let a = acc.lock().unwrap_or_else(|p| p.into_inner());
            LoadResult {
                rate: spec.rate,
                sent: sent[t].load(Ordering::Relaxed),
                counted,
                ok: a.ok,
                errors: a.errors,
                saturated: saturated[t].load(Ordering::Relaxed),
                throughput: a.ok as f64 / counted_secs,
                latency_us: Percentiles::of(&a.latency),
                ttft_us: spec.stream.then(|| Percentiles::of(&a.ttft)),
                statuses: a.statuses.clone(),
            }
        })
        .collect()
}

/// The arrival schedule: during the warm-up the rate climbs linearly from a
/// tenth of the target rate to the full rate, then stays there. A process
/// that starts cold (empty connection pools, caches not yet built) is
/// brought up to speed the way traffic reaches a new instance behind a load
/// balancer, instead of taking the full rate from its first millisecond;
/// the counted part is a constant rate either way.
#[derive(Debug, Clone, Copy)]
struct Ramp {
    /// Requests sent during the warm-up.
    warm: u64,
    /// The full rate, per second.
    rate: f64,
    /// The starting rate, per second.
    from: f64,
    /// The warm-up's length in seconds.
    secs: f64,
}

impl Ramp {
    fn new(warm: u64, rate: f64) -> Ramp {
        let from = rate / 10.0;
        Ramp {
            warm,
            rate,
            from,
            secs: 2.0 * warm as f64 / (from + rate),
        }
    }

    /// When request `i` is due, from the start.
    fn at(&self, i: u64) -> Duration {
        if i >= self.warm {
            return Duration::from_secs_f64(self.secs + (i - self.warm) as f64 / self.rate);
        }
        // n(t) = from·t + (rate − from)·t² / (2·secs), solved for t.
        let a = (self.rate - self.from) / (2.0 * self.secs);
        let t = (-self.from + (self.from * self.from + 4.0 * a * i as f64).sqrt()) / (2.0 * a);
        Duration::from_secs_f64(t)
    }
}

/// What one request sends.
struct Req {
    path: String,
    host: String,
    bearer: Option<String>,
    body: Bytes,
}

impl Req {
    fn build(&self) -> Result<hyper::Request<Full<Bytes>>, ()> {
        let mut b = hyper::Request::post(self.path.as_str())
            .header("host", self.host.as_str())
            .header("content-type", "application/json");
        if let Some(v) = &self.bearer {
            b = b.header("authorization", v.as_str());
        }
        b.body(Full::new(self.body.clone())).map_err(|_| ())
    }
}

type Connection = Pin<Box<http1::Connection<TokioIo<TcpStream>, Full<Bytes>>>>;

/// One kept-alive HTTP/1.1 connection: hyper's client halves. The request
/// using it drives it from its own task, so a request costs one task and no
/// hand-off to a connection task (the generator shares the machine with
/// what it measures and should cost as little CPU as it can).
struct Conn {
    send: http1::SendRequest<Full<Bytes>>,
    conn: Connection,
}

/// Polls `f` while driving `conn`; `Err` if the connection ended before
/// `f` finished.
async fn drive<T>(
    conn: &mut Connection,
    mut f: impl FnMut(&mut Context<'_>) -> Poll<Result<T, ()>>,
) -> Result<T, ()> {
    poll_fn(|cx| {
        if let Poll::Ready(r) = f(cx) {
            return Poll::Ready(r);
        }
        match conn.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            // The connection ended: whatever it delivered last still counts.
            Poll::Ready(_) => match f(cx) {
                Poll::Ready(r) => Poll::Ready(r),
                Poll::Pending => Poll::Ready(Err(())),
            },
        }
    })
    .await
}

/// Idle connections to one target, the most recently used first (as client
/// pools reuse them).
struct Pool {
    /// `host:port`.
    addr: String,
    idle: Mutex<Vec<Conn>>,
}

impl Pool {
    fn new(uri: &hyper::Uri) -> Pool {
        Pool {
            addr: uri
                .authority()
                .map_or("127.0.0.1:80", |a| a.as_str())
                .to_string(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// An idle connection (unless `fresh`) or a new one; and whether it was
    /// reused.
    async fn take(&self, fresh: bool) -> Result<(Conn, bool), ()> {
        if !fresh {
            let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            if let Some(c) = reused {
                return Ok((c, true));
            }
        }
        let s = TcpStream::connect(&self.addr).await.map_err(|_| ())?;
        let _ = s.set_nodelay(true);
        let (send, conn) = http1::handshake(TokioIo::new(s)).await.map_err(|_| ())?;
        Ok((
            Conn {
                send,
                conn: Box::pin(conn),
            },
            false,
        ))
    }

    fn put(&self, c: Conn) {
        if !c.send.is_closed() {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        }
    }
}

/// Sends `req` on `c` and waits for the answer's head.
async fn send(c: &mut Conn, req: &Req) -> Result<hyper::Response<hyper::body::Incoming>, ()> {
    let Conn { send, conn } = c;
    drive(conn, |cx| send.poll_ready(cx).map_err(|_| ())).await?;
    let mut answer = pin!(send.send_request(req.build()?));
    drive(conn, |cx| answer.as_mut().poll(cx).map_err(|_| ())).await
}

/// Sends one request; returns (status, time to the last byte, time to the
/// first content chunk of a stream), all from the intended send time. A
/// request that fails on a reused connection before any answer (the target
/// closed it meanwhile) is sent once more on a new one, as client pools do.
async fn one(
    pool: &Pool,
    req: &Req,
    stream: bool,
    intended: Instant,
) -> Result<(u16, Duration, Option<Duration>), ()> {
    let (mut c, reused) = pool.take(false).await?;
    let resp = match send(&mut c, req).await {
        Ok(r) => r,
        Err(()) if reused => {
            c = pool.take(true).await?.0;
            send(&mut c, req).await?
        }
        Err(()) => return Err(()),
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut first = None;
    loop {
        let frame = drive(&mut c.conn, |cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Ok(Some(f))),
            Poll::Ready(Some(Err(_))) => Poll::Ready(Err(())),
            Poll::Ready(None) => Poll::Ready(Ok(None)),
            Poll::Pending => Poll::Pending,
        })
        .await?;
        let Some(frame) = frame else { break };
        if stream && first.is_none() {
            if let Some(d) = frame.data_ref() {
                if d.windows(9).any(|w| w == b"\"content\"") {
                    first = Some(intended.elapsed());
                }
            }
        }
    }
    let done = intended.elapsed();
    pool.put(c);
    Ok((status, done, first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_up_ramps_from_a_tenth_to_the_full_rate_then_holds_it() {
        let (rate, warm) = (5000.0, 5000);
        let r = Ramp::new(warm, rate);
        let gap = |i: u64| (r.at(i) - r.at(i - 1)).as_secs_f64();
        // Starts near a tenth of the rate, ends near the full rate.
        assert!((gap(1) - 10.0 / rate).abs() < 1e-3, "{}", gap(1));
        assert!(
            (gap(warm - 1) - 1.0 / rate).abs() < 2e-6,
            "{}",
            gap(warm - 1)
        );
        // Never goes back in time.
        for i in 1..warm + 100 {
            assert!(r.at(i) >= r.at(i - 1), "request {i} due before {}", i - 1);
        }
        // The warm-up lasts warm / mean rate: 5000 / 2750 s.
        assert!((r.at(warm).as_secs_f64() - 5000.0 / 2750.0).abs() < 1e-6);
        // After it, exactly the rate.
        for i in [warm + 1, warm + 1000, warm + 123_456] {
            assert!((gap(i) - 1.0 / rate).abs() < 1e-9);
        }
    }

    /// A server that answers one request per connection with keep-alive
    /// headers, then closes the connection 50 ms later; counts connections.
    async fn closing_server() -> (String, Arc<AtomicU64>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    // Head and a 2-byte body.
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") || !buf.ends_with(b"{}") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                });
            }
        });
        (format!("http://{addr}/v1/chat/completions"), accepted)
    }

    /// A kept-alive connection the target closed while it sat idle fails
    /// the next request sent on it; that request is sent again on a new
    /// connection instead of counting as an error.
    #[tokio::test]
    async fn a_request_on_a_connection_closed_while_idle_is_sent_again() {
        let (url, accepted) = closing_server().await;
        let uri: hyper::Uri = url.parse().expect("uri");
        let pool = Pool::new(&uri);
        let req = Req {
            path: "/v1/chat/completions".into(),
            host: pool.addr.clone(),
            bearer: None,
            body: Bytes::from_static(b"{}"),
        };
        for _ in 0..3 {
            let (status, _, _) = one(&pool, &req, false, Instant::now())
                .await
                .expect("answered");
            assert_eq!(status, 200);
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3, "one connection each");
    }

    #[test]
    fn without_a_warm_up_the_rate_is_constant_from_the_start() {
        let r = Ramp::new(0, 2000.0);
        assert_eq!(r.at(0), Duration::ZERO);
        assert!((r.at(2000).as_secs_f64() - 1.0).abs() < 1e-9);
    }
}
