//! Parsing of the reliability settings: provider timeouts, `retry` and
//! `breaker` tables, and the server's overload limits.

use std::time::Duration;

use serde::Deserialize;

use super::{check_rate, join_path, parse_duration, Cx};
use crate::resilience::{BreakerConfig, RetryConfig};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<u32>,
    backoff: Option<String>,
    max_backoff: Option<String>,
    budget: Option<f64>,
    min_per_second: Option<f64>,
    window: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    enabled: Option<bool>,
    failure_rate: Option<f64>,
    min_requests: Option<u32>,
    window: Option<String>,
    cooldown: Option<String>,
    probes: Option<u32>,
}

fn dur(cx: &mut Cx, path: &str, field: &str, v: Option<String>, default: Duration) -> Duration {
    v.and_then(|s| parse_duration(cx, &join_path(path, field), &s))
        .unwrap_or(default)
}

/// Decodes `[providers.NAME.retry]`.
pub(super) fn retry(cx: &mut Cx, path: &str, v: Option<toml::Value>) -> RetryConfig {
    let path = join_path(path, "retry");
    let d = RetryConfig::default();
    let Some(raw) = v.and_then(|v| cx.decode::<RawRetry>(&path, v)) else {
        return d;
    };
    let attempts = raw.attempts.unwrap_or(d.attempts);
    if !(1..=10).contains(&attempts) {
        cx.err(
            join_path(&path, "attempts"),
            format!("must be between 1 (no retries) and 10, got {attempts}"),
        );
    }
    let budget = raw.budget.unwrap_or(d.budget);
    check_rate(cx, join_path(&path, "budget"), budget);
    let min_per_sec = raw.min_per_second.unwrap_or(d.min_per_sec);
    if min_per_sec.is_nan() || min_per_sec < 0.0 {
        cx.err(join_path(&path, "min_per_second"), "must be zero or more");
    }
    let backoff = dur(cx, &path, "backoff", raw.backoff, d.backoff);
    let max_backoff = dur(cx, &path, "max_backoff", raw.max_backoff, d.max_backoff);
    if max_backoff < backoff {
        cx.err(
            join_path(&path, "max_backoff"),
            format!("must be at least backoff ({backoff:?})"),
        );
    }
    RetryConfig {
        attempts,
        backoff,
        max_backoff,
        budget,
        min_per_sec,
        window: dur(cx, &path, "window", raw.window, d.window),
    }
}

/// Decodes `[providers.NAME.breaker]`.
pub(super) fn breaker(cx: &mut Cx, path: &str, v: Option<toml::Value>) -> BreakerConfig {
    let path = join_path(path, "breaker");
    let d = BreakerConfig::default();
    let Some(raw) = v.and_then(|v| cx.decode::<RawBreaker>(&path, v)) else {
        return d;
    };
    let failure_rate = raw.failure_rate.unwrap_or(d.failure_rate);
    if failure_rate.is_nan() || failure_rate <= 0.0 || failure_rate > 1.0 {
        cx.err(
            join_path(&path, "failure_rate"),
            format!("must be greater than 0.0 and at most 1.0, got {failure_rate}"),
        );
    }
    let min_requests = raw.min_requests.unwrap_or(d.min_requests);
    if min_requests == 0 {
        cx.err(join_path(&path, "min_requests"), "must be at least 1");
    }
    let probes = raw.probes.unwrap_or(d.probes);
    if probes == 0 {
        cx.err(join_path(&path, "probes"), "must be at least 1");
    }
    BreakerConfig {
        enabled: raw.enabled.unwrap_or(true),
        failure_rate,
        min_requests,
        window: dur(cx, &path, "window", raw.window, d.window),
        cooldown: dur(cx, &path, "cooldown", raw.cooldown, d.cooldown),
        probes,
    }
}

/// The server's limits against overload and slow clients (top-level keys).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerLimits {
    /// Most requests handled at once; beyond it requests get 503 at once.
    pub max_in_flight: usize,
    /// Time a client has to send its request headers (from connecting, or
    /// from the first byte of a later request on a kept-alive connection).
    pub header_timeout: Duration,
    /// How long a kept-alive connection may sit idle between requests
    /// before sluice closes it. Longer than client pools keep idle
    /// connections, so a client does not reuse one that is being closed.
    pub keep_alive_timeout: Duration,
    /// Time a client has to send its request body.
    pub body_timeout: Duration,
    /// Largest request head (request line + headers) in bytes.
    pub max_header_bytes: usize,
    /// How long a stopping server lets in-flight requests and streams finish.
    pub shutdown_grace: Duration,
    /// Connections the kernel may hold waiting to be accepted (the `listen`
    /// backlog; the kernel caps it at `net.core.somaxconn`). A short queue
    /// drops connection attempts in a burst, and a dropped SYN costs its
    /// client a one-second retransmit.
    pub listen_backlog: u32,
    /// Most client connections open at once per listener (0: no cap). A
    /// connection accepted at the cap waits for a place while one idle
    /// kept-alive connection closes to make room; busy ones finish first.
    /// Each open connection holds about 16 KiB of buffers, idle or not.
    pub max_connections: usize,
    /// 0: client connections are served on the shared work-stealing runtime.
    /// N: on N dedicated threads, each with its own event loop and upstream
    /// connection pools (less CPU per request; a burst on one thread cannot
    /// borrow another's core).
    pub workers: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_in_flight: 4096,
            header_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(75),
            body_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(30),
            listen_backlog: 4096,
            max_connections: 0,
            workers: 0,
        }
    }
}

/// Reads the top-level limit keys out of `t`.
pub(super) fn server_limits(cx: &mut Cx, t: &mut toml::Table) -> ServerLimits {
    let d = ServerLimits::default();
    let max_in_flight: usize = super::take(cx, t, "", "max_in_flight").unwrap_or(d.max_in_flight);
    if max_in_flight == 0 {
        cx.err("max_in_flight", "must be at least 1");
    }
    let max_header_bytes: usize =
        super::take(cx, t, "", "max_header_bytes").unwrap_or(d.max_header_bytes);
    if !(8192..=1 << 20).contains(&max_header_bytes) {
        cx.err(
            "max_header_bytes",
            format!("must be between 8192 and 1048576, got {max_header_bytes}"),
        );
    }
    let listen_backlog: u32 = super::take(cx, t, "", "listen_backlog").unwrap_or(d.listen_backlog);
    if !(1..=65535).contains(&listen_backlog) {
        cx.err(
            "listen_backlog",
            format!("must be between 1 and 65535, got {listen_backlog}"),
        );
    }
    let max_connections: usize =
        super::take(cx, t, "", "max_connections").unwrap_or(d.max_connections);
    let workers: usize = super::take(cx, t, "", "workers").unwrap_or(d.workers);
    if workers > 256 {
        cx.err(
            "workers",
            format!("must be between 0 (the shared runtime) and 256, got {workers}"),
        );
    }
    let header_timeout = super::take::<String>(cx, t, "", "header_timeout");
    let keep_alive = super::take::<String>(cx, t, "", "keep_alive_timeout");
    let body_timeout = super::take::<String>(cx, t, "", "body_timeout");
    let grace = super::take::<String>(cx, t, "", "shutdown_grace");
    ServerLimits {
        max_in_flight,
        header_timeout: dur(cx, "", "header_timeout", header_timeout, d.header_timeout),
        keep_alive_timeout: dur(
            cx,
            "",
            "keep_alive_timeout",
            keep_alive,
            d.keep_alive_timeout,
        ),
        body_timeout: dur(cx, "", "body_timeout", body_timeout, d.body_timeout),
        max_header_bytes,
        shutdown_grace: dur(cx, "", "shutdown_grace", grace, d.shutdown_grace),
        listen_backlog,
        max_connections,
        workers,
    }
}
