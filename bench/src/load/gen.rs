//! An open-loop load generator: requests are sent at a constant arrival rate
//! whatever the target does, and each latency is measured from the request's
//! *intended* send time, so a stalled target shows as latency instead of
//! quietly lowering the rate (no coordinated omission). Results go into HDR
//! histograms (microseconds); requests intended during the warm-up are sent
//! but not counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

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
    /// Requests sent (warm-up included) whose response head arrived: each
    /// reached the target's handler. The others failed on the way (a
    /// connection refused, or closed under a connection cap, before the
    /// request was read) or timed out waiting.
    pub answered: u64,
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
    /// From intended send to the moment the request's task started sending
    /// it: the generator's own timer and scheduling lag, part of every
    /// latency above and shared by every target of an interleaved run (the
    /// runtime's timer fires on millisecond ticks, so up to a millisecond
    /// of it is by design).
    pub send_lag_us: Percentiles,
    /// Statuses other than 200 seen, with counts.
    pub statuses: std::collections::BTreeMap<u16, u64>,
}

struct Acc {
    latency: Histogram<u64>,
    ttft: Histogram<u64>,
    lag: Histogram<u64>,
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
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let accs: Vec<Arc<Mutex<Acc>>> = targets
        .iter()
        .map(|_| {
            Arc::new(Mutex::new(Acc {
                latency: hist(),
                ttft: hist(),
                lag: hist(),
                ok: 0,
                errors: 0,
                statuses: Default::default(),
            }))
        })
        .collect();
    let sent: Vec<AtomicU64> = targets.iter().map(|_| AtomicU64::new(0)).collect();
    let answered: Vec<Arc<AtomicU64>> = targets.iter().map(|_| Arc::default()).collect();
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
        let mut b =
            hyper::Request::post(uris[t].clone()).header("content-type", "application/json");
        if let Some(token) = &targets[t].bearer {
            b = b.header("authorization", format!("Bearer {token}"));
        }
        let req = b
            .body(Full::new(spec.body.clone()))
            .expect("a valid request");
        let (client, acc, outstanding) = (client.clone(), accs[t].clone(), outstanding.clone());
        let answered = answered[t].clone();
        let (stream, timeout) = (spec.stream, spec.timeout);
        let intended = intended.into_std();
        tasks.spawn(async move {
            let lag = intended.elapsed();
            let r =
                tokio::time::timeout(timeout, one(&client, req, stream, intended, &answered)).await;
            outstanding.fetch_sub(1, Ordering::Relaxed);
            if !counted {
                return;
            }
            let mut a = acc.lock().unwrap_or_else(|p| p.into_inner());
            let _ = a.lag.record(lag.as_micros().max(1) as u64);
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
                answered: answered[t].load(Ordering::Relaxed),
                counted,
                ok: a.ok,
                errors: a.errors,
                saturated: saturated[t].load(Ordering::Relaxed),
                throughput: a.ok as f64 / counted_secs,
                latency_us: Percentiles::of(&a.latency),
                ttft_us: spec.stream.then(|| Percentiles::of(&a.ttft)),
                send_lag_us: Percentiles::of(&a.lag),
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
pub(crate) struct Ramp {
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
    pub(crate) fn new(warm: u64, rate: f64) -> Ramp {
        let from = rate / 10.0;
        Ramp {
            warm,
            rate,
            from,
            secs: 2.0 * warm as f64 / (from + rate),
        }
    }

    /// When request `i` is due, from the start.
    pub(crate) fn at(&self, i: u64) -> Duration {
        if i >= self.warm {
            return Duration::from_secs_f64(self.secs + (i - self.warm) as f64 / self.rate);
        }
        // n(t) = from·t + (rate − from)·t² / (2·secs), solved for t.
        let a = (self.rate - self.from) / (2.0 * self.secs);
        let t = (-self.from + (self.from * self.from + 4.0 * a * i as f64).sqrt()) / (2.0 * a);
        Duration::from_secs_f64(t)
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Sends one request; returns (status, time to the last byte, time to the
/// first content chunk of a stream), all from the intended send time, and
/// counts it in `answered` once its response head arrives.
async fn one(
    client: &HttpClient,
    req: hyper::Request<Full<Bytes>>,
    stream: bool,
    intended: Instant,
    answered: &AtomicU64,
) -> Result<(u16, Duration, Option<Duration>), ()> {
    let resp = client.request(req).await.map_err(|_| ())?;
    answered.fetch_add(1, Ordering::Relaxed);
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| ())?;
        if stream && first.is_none() {
            if let Some(d) = frame.data_ref() {
                if d.windows(9).any(|w| w == b"\"content\"") {
                    first = Some(intended.elapsed());
                }
            }
        }
    }
    Ok((status, intended.elapsed(), first))
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

    #[test]
    fn without_a_warm_up_the_rate_is_constant_from_the_start() {
        let r = Ramp::new(0, 2000.0);
        assert_eq!(r.at(0), Duration::ZERO);
        assert!((r.at(2000).as_secs_f64() - 1.0).abs() < 1e-9);
    }
}
