//! Every call to a provider goes through an [`Upstream`]: the provider's
//! client plus its [`Health`] (circuit breaker, retry budget, counters).
//!
//! A call is:
//! 1. refused at once with [`ProviderError::CircuitOpen`] while the breaker
//!    is open (or its half-open probes are all out);
//! 2. made; its outcome is reported to the breaker;
//! 3. retried only when that is safe — the connection was never made, or the
//!    upstream answered 429/5xx, and nothing reached the client yet (streams
//!    are retried only before their first chunk is handed on) — after a full
//!    jitter backoff or the upstream's `Retry-After`, and only while the retry
//!    budget allows. A `Retry-After` longer than `max_backoff` is not waited
//!    for: the error (with its `Retry-After`) goes back to the caller.
//!
//! There is one breaker per provider *and upstream model*: one model failing
//! (a bad candidate) must not cut off the others served by the same
//! provider. The retry budget is per provider.
//!
//! Health outlives configuration reloads when a provider's settings did not
//! change, so a reload does not close an open breaker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::Stream;
use serde::Serialize;
use sluice_core::chat::ChatRequest;
use sluice_core::config::ProviderConfig;
use sluice_core::resilience::{backoff, Admit, Breaker, BreakerConfig, RetryBudget, RetryConfig};
use sluice_providers::{ChunkStream, Completion, Provider, ProviderError};

/// Monotonic milliseconds since the process started (breaker clock).
fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The health of one provider endpoint, shared by every call to it.
#[derive(Debug)]
pub struct Health {
    /// Provider name.
    pub name: String,
    retry: RetryConfig,
    breaker_cfg: BreakerConfig,
    state: Mutex<HealthState>,
    rng: AtomicU64,
    calls: AtomicU64,
    failures: AtomicU64,
    retries: AtomicU64,
    retries_denied: AtomicU64,
    rejected: AtomicU64,
}

#[derive(Debug)]
struct HealthState {
    budget: RetryBudget,
    /// By upstream model.
    breakers: std::collections::BTreeMap<String, Breaker>,
}

/// One breaker's state.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerView {
    /// Upstream model the breaker guards.
    pub model: String,
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// 0 closed, 1 half-open, 2 open.
    #[serde(skip)]
    pub gauge: i64,
    /// Seconds until an open breaker starts probing.
    pub open_for_s: Option<u64>,
    /// Times the breaker opened since start.
    pub opened_total: u64,
    /// Successful calls in the breaker's current window.
    pub window_ok: u64,
    /// Failed calls in the breaker's current window.
    pub window_failed: u64,
}

/// A point-in-time view of a provider's health (admin API and `/metrics`).
#[derive(Debug, Clone, Serialize)]
pub struct HealthView {
    /// Provider name.
    pub provider: String,
    /// Breakers by upstream model (those called so far).
    pub breakers: Vec<BreakerView>,
    /// First attempts in the retry budget's window.
    pub budget_requests: u64,
    /// Retries in the retry budget's window.
    pub budget_retries: u64,
    /// Calls attempted (first attempts and retries).
    pub calls_total: u64,
    /// Attempts that failed.
    pub failures_total: u64,
    /// Retries made.
    pub retries_total: u64,
    /// Retries refused because the retry budget was spent.
    pub retries_denied_total: u64,
    /// Calls refused because the breaker was open.
    pub rejected_total: u64,
}

impl Health {
    /// Fresh health for a provider.
    pub fn new(cfg: &ProviderConfig) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed);
        Health {
            name: cfg.name.clone(),
            retry: cfg.retry,
            breaker_cfg: cfg.breaker,
            state: Mutex::new(HealthState {
                budget: RetryBudget::new(&cfg.retry),
                breakers: Default::default(),
            }),
            rng: AtomicU64::new(seed),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            retries_denied: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// Whether this health can carry over to a provider with `cfg`.
    pub fn fits(&self, cfg: &ProviderConfig) -> bool {
        self.retry == cfg.retry && self.breaker_cfg == cfg.breaker
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_breaker<T>(&self, model: &str, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut g = self.lock();
        match g.breakers.get_mut(model) {
            Some(b) => f(b),
            None => {
                let mut b = Breaker::new(self.breaker_cfg);
                let out = f(&mut b);
                g.breakers.insert(model.to_string(), b);
                out
            }
        }
    }

    fn unit(&self) -> f64 {
        let s = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        sluice_core::splitmix::SplitMix64(s).unit()
    }

    fn admit(&self, model: &str) -> Admit {
        self.with_breaker(model, |b| b.admit(mono_ms()))
    }

    fn report(&self, model: &str, ok: bool, probe: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.with_breaker(model, |b| b.record(mono_ms(), ok, probe));
    }

    /// The current view.
    pub fn view(&self) -> HealthView {
        let now = mono_ms();
        let g = self.lock();
        let breakers = g
            .breakers
            .iter()
            .map(|(model, b)| {
                let state = b.state(now);
                let (ok, failed) = b.window_counts(now);
                BreakerView {
                    model: model.clone(),
                    state: state.name(),
                    gauge: state.gauge(),
                    open_for_s: match state {
                        sluice_core::resilience::BreakerState::Open { until_ms } => {
                            Some(until_ms.saturating_sub(now).div_ceil(1000))
                        }
                        _ => None,
                    },
                    opened_total: b.times_opened(),
                    window_ok: ok,
                    window_failed: failed,
                }
            })
            .collect();
        let (budget_requests, budget_retries) = g.budget.counts(now);
        HealthView {
            provider: self.name.clone(),
            breakers,
            budget_requests,
            budget_retries,
            calls_total: self.calls.load(Ordering::Relaxed),
            failures_total: self.failures.load(Ordering::Relaxed),
            retries_total: self.retries.load(Ordering::Relaxed),
            retries_denied_total: self.retries_denied.load(Ordering::Relaxed),
            rejected_total: self.rejected.load(Ordering::Relaxed),
        }
    }
}

/// Whether an outcome counts as a failure of the endpoint (for the breaker).
/// Client mistakes (4xx other than 429) do not.
pub fn is_endpoint_failure(e: &ProviderError) -> bool {
    match e {
        ProviderError::Unreachable { .. }
        | ProviderError::Timeout { .. }
        | ProviderError::InvalidResponse { .. }
        | ProviderError::Stream { .. } => true,
        ProviderError::Status { status, .. } => *status == 429 || *status >= 500,
        ProviderError::CircuitOpen { .. } | ProviderError::Unsupported { .. } => false,
    }
}

/// Whether a failed attempt may be made again: the request certainly did not
/// reach the model (connect failure) or the upstream said to try again.
pub fn is_retryable(e: &ProviderError) -> bool {
    match e {
        ProviderError::Unreachable { connect, .. } => *connect,
        ProviderError::Status { status, .. } => *status == 429 || *status >= 500,
        _ => false,
    }
}

/// A provider with its health.
#[derive(Debug)]
pub struct Upstream {
    /// The client.
    pub provider: Provider,
    /// Breaker, budget and counters.
    pub health: Arc<Health>,
}

impl Upstream {
    /// Wraps a provider.
    pub fn new(provider: Provider, health: Arc<Health>) -> Self {
        Upstream { provider, health }
    }

    /// The provider's configured name.
    pub fn name(&self) -> &str {
        self.provider.name()
    }

    /// The provider kind.
    pub fn kind(&self) -> &'static str {
        self.provider.kind()
    }

    /// A non-streamed completion, with breaker and retries.
    pub async fn complete(&self, req: &ChatRequest) -> Result<Completion, ProviderError> {
        self.complete_counted(req).await.0
    }

    /// Like [`Upstream::complete`], also returning how many attempts were made.
    pub async fn complete_counted(
        &self,
        req: &ChatRequest,
    ) -> (Result<Completion, ProviderError>, u32) {
        let (r, n) = self
            .call(&req.model, false, || self.provider.complete(req))
            .await;
        (r.map(|(c, _)| c), n)
    }

    /// Like [`Upstream::complete_counted`], taking the answer as the request
    /// path does (see [`sluice_providers::Reply`]).
    pub async fn reply_counted(
        &self,
        req: &ChatRequest,
    ) -> (Result<sluice_providers::Reply, ProviderError>, u32) {
        let (r, n) = self
            .call(&req.model, false, || self.provider.reply(req))
            .await;
        (r.map(|(c, _)| c), n)
    }

    /// A streamed completion, with breaker and retries before the first
    /// chunk. The call's outcome reaches the breaker once, when the stream
    /// ends: a failure part-way through counts as the call's failure (not
    /// as a success at the start and a failure later).
    pub async fn stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        self.stream_counted(req).await.0
    }

    /// Like [`Upstream::stream`], also returning how many attempts were made.
    pub async fn stream_counted(
        &self,
        req: &ChatRequest,
    ) -> (Result<ChunkStream, ProviderError>, u32) {
        let (r, n) = self
            .call(&req.model, true, || self.provider.stream(req))
            .await;
        let r = r.map(|(inner, probe)| {
            let s: ChunkStream = Box::pin(Reported {
                inner,
                health: self.health.clone(),
                model: req.model.clone(),
                probe,
                reported: false,
            });
            s
        });
        (r, n)
    }

    /// Makes the call with breaker and retries. A success is reported to
    /// the breaker here unless `defer_ok`, in which case the caller reports
    /// it (a stream, when it ends); the flag returned with it says whether
    /// the call was a half-open probe.
    async fn call<T, F, Fut>(
        &self,
        model: &str,
        defer_ok: bool,
        f: F,
    ) -> (Result<(T, bool), ProviderError>, u32)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ProviderError>>,
    {
        let h = &self.health;
        h.lock().budget.on_request(mono_ms());
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let probe = match h.admit(model) {
                Admit::Allowed => false,
                Admit::Probe => true,
                Admit::Rejected { retry_after_ms } => {
                    h.rejected.fetch_add(1, Ordering::Relaxed);
                    let e = ProviderError::CircuitOpen {
                        provider: h.name.clone(),
                        retry_after_s: retry_after_ms.div_ceil(1000).max(1),
                    };
                    return (Err(e), attempt - 1);
                }
            };
            let r = f().await;
            let e = match r {
                Ok(v) => {
                    if !defer_ok {
                        h.report(model, true, probe);
                    }
                    return (Ok((v, probe)), attempt);
                }
                Err(e) => e.scrub_secrets(),
            };
            h.report(model, !is_endpoint_failure(&e), probe);
            if attempt >= h.retry.attempts || !is_retryable(&e) {
                return (Err(e), attempt);
            }
            let wait = match &e {
                ProviderError::Status {
                    retry_after: Some(s),
                    ..
                } => {
                    let d = Duration::from_secs(*s);
                    if d > h.retry.max_backoff {
                        return (Err(e), attempt);
                    }
                    d
                }
                _ => backoff(h.retry.backoff, h.retry.max_backoff, attempt, h.unit()),
            };
            if !h.lock().budget.try_retry(mono_ms()) {
                h.retries_denied.fetch_add(1, Ordering::Relaxed);
                return (Err(e), attempt);
            }
            h.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(provider = %h.name, attempt, ?wait, "retrying upstream call: {e}");
            tokio::time::sleep(wait).await;
        }
    }
}

/// A stream that reports its call's outcome to the breaker exactly once: a
/// failure at the first endpoint error, a success at its end, or a success
/// when it is dropped before either (the client left; the upstream was
/// answering).
struct Reported {
    inner: ChunkStream,
    health: Arc<Health>,
    model: String,
    probe: bool,
    reported: bool,
}

impl Reported {
    fn report(&mut self, ok: bool) {
        if !self.reported {
            self.reported = true;
            self.health.report(&self.model, ok, self.probe);
        }
    }
}

impl Stream for Reported {
    type Item = Result<sluice_providers::Chunk, ProviderError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let item = std::task::ready!(self.inner.as_mut().poll_next(cx));
        std::task::Poll::Ready(match item {
            Some(Err(e)) => {
                let e = e.scrub_secrets();
                self.report(!is_endpoint_failure(&e));
                Some(Err(e))
            }
            None => {
                self.report(true);
                None
            }
            ok => ok,
        })
    }
}

impl Drop for Reported {
    fn drop(&mut self) {
        self.report(true);
    }
}
