//! Rollback under load: how fast an operator's rollback takes effect while
//! sluice is serving at a given rate.
//!
//! A trial starts sluice fresh with a rollout whose one stage sends every
//! request to the candidate (`sluice-rollback`), sends open-loop load at the
//! rate (warm-up ramp as in [`crate::load::gen`]), and partway through posts
//! `rollback` to the admin listener. Every request's send time and the
//! variant that answered it are kept, so the trial reports how long the
//! rollback took to answer, when the last request to reach the candidate was
//! sent, and whether any request sent after the answer still reached it
//! (which must never happen).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use super::gen::Ramp;

/// One trial's shape.
#[derive(Debug, Clone)]
pub struct RollbackSpec {
    /// Chat completions URL.
    pub url: String,
    /// API key.
    pub bearer: String,
    /// The admin listener's port.
    pub admin_port: u16,
    /// The operator token.
    pub admin_token: String,
    /// The rollout to roll back.
    pub rollout: String,
    /// Request body.
    pub body: Bytes,
    /// Requests per second.
    pub rate: u32,
    /// Ramp-up before the full rate.
    pub warmup: Duration,
    /// Full-rate time before the rollback is sent.
    pub before: Duration,
    /// Full-rate time after it is sent.
    pub after: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Most requests outstanding; beyond it sends are skipped and counted.
    pub max_outstanding: u64,
}

/// What one trial measured. Times are milliseconds from the moment the
/// rollback request was sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RollbackTrial {
    /// Target rate.
    pub rate: u32,
    /// Requests sent.
    pub sent: u64,
    /// Requests whose response head arrived (each reached sluice's handler).
    pub answered: u64,
    /// Requests answered 200.
    pub ok: u64,
    /// Requests that failed (status, transport, timeout).
    pub errors: u64,
    /// Sends skipped because too many were outstanding.
    pub saturated: u64,
    /// The rollback's HTTP status (0 when it failed on the way).
    pub rollback_status: u16,
    /// When the rollback was answered.
    pub answer_ms: f64,
    /// When the last request that reached the candidate was sent (negative:
    /// before the rollback was sent).
    pub last_candidate_sent_ms: Option<f64>,
    /// Requests that reached the candidate.
    pub on_candidate: u64,
    /// Requests sent after the rollback was answered that still reached the
    /// candidate: must be 0.
    pub candidate_after_answer: u64,
    /// Requests sent after the rollback was answered (that the check above
    /// covered).
    pub sent_after_answer: u64,
    /// p99 latency (from intended send, microseconds) of the requests sent
    /// within a second either side of the rollback.
    pub p99_around_us: u64,
    /// The same for the second before that window (the steady state to
    /// compare with); 0 when `before` is too short to have one.
    pub p99_before_us: u64,
    /// Rows in sluice's store after it stopped, less the readiness probes.
    pub recorded: Option<u64>,
    /// Whether every request that reached sluice was recorded (see
    /// [`crate::load::run::no_event_lost`]).
    pub no_event_lost: Option<bool>,
}

struct Seen {
    /// Actual send start, from the trial's start.
    sent: Duration,
    latency: Duration,
    status: u16,
    candidate: bool,
}

/// Runs one trial against a started `sluice-rollback` target.
pub async fn trial(spec: &RollbackSpec) -> RollbackTrial {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let rate = f64::from(spec.rate.max(1));
    let warm = (spec.warmup.as_secs_f64() * rate) as u64;
    let full = ((spec.before + spec.after).as_secs_f64() * rate) as u64;
    let ramp = Ramp::new(warm, rate);
    let origin = Instant::now();
    let start = tokio::time::Instant::from_std(origin) + Duration::from_millis(20);
    let rollback_at = start + ramp.at(warm) + spec.before;
    let uri: hyper::Uri = spec.url.parse().expect("a valid URL");
    let seen: Arc<Mutex<Vec<Seen>>> =
        Arc::new(Mutex::new(Vec::with_capacity((warm + full) as usize)));
    let outstanding = Arc::new(AtomicU64::new(0));
    let mut saturated = 0;
    let mut sent = 0;

    // The operator's rollback, on its own connection to the admin listener
    // and from a thread of its own: past capacity the generator's runtime
    // is as busy as the target, and would delay the call and its timing.
    let (rb_tx, rb_rx) = tokio::sync::oneshot::channel();
    {
        let spec = spec.clone();
        let due = rollback_at.into_std();
        std::thread::spawn(move || {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let at = origin.elapsed();
            let status = rollback(&spec);
            let _ = rb_tx.send((at, origin.elapsed(), status));
        });
    }

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..warm + full {
        let intended = start + ramp.at(i);
        tokio::time::sleep_until(intended).await;
        if outstanding.load(Ordering::Relaxed) >= spec.max_outstanding {
            saturated += 1;
            continue;
        }
        outstanding.fetch_add(1, Ordering::Relaxed);
        sent += 1;
        let req = hyper::Request::post(uri.clone())
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", spec.bearer))
            .body(Full::new(spec.body.clone()))
            .expect("a valid request");
        let (client, seen, outstanding) = (client.clone(), seen.clone(), outstanding.clone());
        let timeout = spec.timeout;
        let intended = intended.into_std();
        tasks.spawn(async move {
            let at = origin.elapsed();
            let r = tokio::time::timeout(timeout, async {
                let resp = client.request(req).await.map_err(|_| ())?;
                let status = resp.status().as_u16();
                let candidate = resp
                    .headers()
                    .get("x-sluice-variant")
                    .is_some_and(|v| v.as_bytes() == b"v2");
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    frame.map_err(|_| ())?;
                }
                Ok::<_, ()>((status, candidate))
            })
            .await;
            outstanding.fetch_sub(1, Ordering::Relaxed);
            let (status, candidate) = match r {
                Ok(Ok(x)) => x,
                Ok(Err(())) => (0, false),
                Err(_) => (1, false),
            };
            seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
                sent: at,
                latency: intended.elapsed(),
                status,
                candidate,
            });
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let (rb_sent, rb_answered, rollback_status) =
        rb_rx.await.unwrap_or((Duration::ZERO, Duration::ZERO, 0));
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let ms = |d: Duration| (d.as_secs_f64() - rb_sent.as_secs_f64()) * 1000.0;
    let hist = || {
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .expect("histogram bounds are valid")
    };
    let (mut around, mut steady) = (hist(), hist());
    let window = Duration::from_secs(1);
    for s in seen.iter() {
        let us = s.latency.as_micros().max(1) as u64;
        if s.sent + window >= rb_sent && s.sent <= rb_sent + window {
            let _ = around.record(us);
        } else if s.sent + 2 * window >= rb_sent && s.sent + window < rb_sent {
            let _ = steady.record(us);
        }
    }
    let p99 = |h: &hdrhistogram::Histogram<u64>| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(0.99)
        }
    };
    RollbackTrial {
        rate: spec.rate,
        sent,
        answered: seen.iter().filter(|s| s.status >= 100).count() as u64,
        ok: seen.iter().filter(|s| s.status == 200).count() as u64,
        errors: seen.iter().filter(|s| s.status != 200).count() as u64,
        saturated,
        rollback_status,
        answer_ms: ms(rb_answered),
        last_candidate_sent_ms: seen
            .iter()
            .filter(|s| s.candidate)
            .map(|s| s.sent)
            .max()
            .map(ms),
        on_candidate: seen.iter().filter(|s| s.candidate).count() as u64,
        candidate_after_answer: seen
            .iter()
            .filter(|s| s.candidate && s.sent > rb_answered)
            .count() as u64,
        sent_after_answer: seen.iter().filter(|s| s.sent > rb_answered).count() as u64,
        p99_around_us: p99(&around),
        p99_before_us: p99(&steady),
        recorded: None,
        no_event_lost: None,
    }
}

/// Posts the rollback (blocking, on a fresh connection); returns its status
/// (0 when it failed on the way).
fn rollback(spec: &RollbackSpec) -> u16 {
    use std::io::{Read, Write};
    let body = r#"{"reason":"rollback under load"}"#;
    let req = format!(
        "POST /admin/rollouts/{}/rollback HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        spec.rollout,
        spec.admin_token,
        body.len()
    );
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", spec.admin_port)) else {
        return 0;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(spec.timeout));
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    // The status line is all that is needed; the answer comes with it.
    let mut head = [0u8; 12];
    if s.read_exact(&mut head).is_err() {
        return 0;
    }
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Medians and maxima of a rate's trials, for the table.
pub fn table(trials: &[RollbackTrial]) -> String {
    let mut out = String::from(
        "| rate | trials | rollback answered (ms) median / max | last candidate send (ms) max | candidate after answer | p99 the second before (ms) median / max | p99 around (ms) median / max | recorded = sent |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let mut rates: Vec<u32> = trials.iter().map(|t| t.rate).collect();
    rates.dedup();
    for rate in rates {
        let ts: Vec<&RollbackTrial> = trials.iter().filter(|t| t.rate == rate).collect();
        let mut answers: Vec<f64> = ts.iter().map(|t| t.answer_ms).collect();
        answers.sort_by(f64::total_cmp);
        let mut p99: Vec<u64> = ts.iter().map(|t| t.p99_around_us).collect();
        p99.sort_unstable();
        let mut base: Vec<u64> = ts.iter().map(|t| t.p99_before_us).collect();
        base.sort_unstable();
        let last = ts
            .iter()
            .filter_map(|t| t.last_candidate_sent_ms)
            .fold(f64::NEG_INFINITY, f64::max);
        let after: u64 = ts.iter().map(|t| t.candidate_after_answer).sum();
        let all_recorded = ts.iter().all(|t| t.no_event_lost == Some(true));
        out.push_str(&format!(
            "| {rate} | {} | {:.1} / {:.1} | {:.1} | {after} | {:.2} / {:.2} | {:.2} / {:.2} | {} |\n",
            ts.len(),
            answers.get(answers.len() / 2).copied().unwrap_or(0.0),
            answers.last().copied().unwrap_or(0.0),
            last,
            base.get(base.len() / 2).copied().unwrap_or(0) as f64 / 1000.0,
            base.last().copied().unwrap_or(0) as f64 / 1000.0,
            p99.get(p99.len() / 2).copied().unwrap_or(0) as f64 / 1000.0,
            p99.last().copied().unwrap_or(0) as f64 / 1000.0,
            if all_recorded { "yes" } else { "NO" },
        ));
    }
    out
}
