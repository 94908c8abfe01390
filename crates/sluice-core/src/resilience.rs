//! Pure state machines that protect upstreams: a circuit breaker, a retry
//! budget and jittered exponential backoff. Time is passed in (Unix or
//! monotonic milliseconds, the caller's choice), so every transition can be
//! tested without clocks.
//!
//! - [`Breaker`]: closed → open when the failure share over a sliding window
//!   reaches `failure_rate` with at least `min_requests` calls; open → half-open
//!   after `cooldown`; half-open lets `probes` calls through and closes once
//!   they all succeed, reopening on the first failure.
//! - [`RetryBudget`]: a retry is allowed while retries in the window stay
//!   under `ratio` × requests (plus a small floor of `min_per_sec`), so a
//!   failing upstream sees at most that much extra load.
//! - [`backoff`]: "full jitter" exponential backoff.

use std::time::Duration;

/// Number of buckets a sliding window is divided into.
const BUCKETS: usize = 10;

/// Settings of a circuit breaker (`[providers.NAME.breaker]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Whether the breaker is active at all.
    pub enabled: bool,
    /// Failure share (0..=1) over the window that opens the breaker.
    pub failure_rate: f64,
    /// Calls the window must hold before the share is judged.
    pub min_requests: u32,
    /// Length of the sliding window.
    pub window: Duration,
    /// How long the breaker stays open before probing.
    pub cooldown: Duration,
    /// Calls let through while half-open; all must succeed to close.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            failure_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(15),
            probes: 3,
        }
    }
}

/// Settings of retries (`[providers.NAME.retry]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryConfig {
    /// Most attempts per call, the first included (1 = never retry).
    pub attempts: u32,
    /// Backoff before the first retry; doubles each retry (with full jitter).
    pub backoff: Duration,
    /// Longest wait before a retry; an upstream `Retry-After` longer than
    /// this is not waited for (the error goes back to the client instead).
    pub max_backoff: Duration,
    /// Retries allowed as a share of requests over the budget window.
    pub budget: f64,
    /// Retries per second always allowed, whatever the ratio says.
    pub min_per_sec: f64,
    /// The budget's sliding window.
    pub window: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 2,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            budget: 0.2,
            min_per_sec: 1.0,
            window: Duration::from_secs(10),
        }
    }
}

/// A sliding window of counts in [`BUCKETS`] time buckets.
#[derive(Debug, Clone)]
struct Window {
    width_ms: u64,
    /// (bucket epoch, a, b) per slot.
    slots: [(u64, u64, u64); BUCKETS],
}

impl Window {
    fn new(window: Duration) -> Self {
        let width_ms = (window.as_millis() as u64 / BUCKETS as u64).max(1);
        Window {
            width_ms,
            slots: [(u64::MAX, 0, 0); BUCKETS],
        }
    }

    fn slot(&mut self, now_ms: u64) -> &mut (u64, u64, u64) {
        let epoch = now_ms / self.width_ms;
        let s = &mut self.slots[(epoch % BUCKETS as u64) as usize];
        if s.0 != epoch {
            *s = (epoch, 0, 0);
        }
        s
    }

    fn add(&mut self, now_ms: u64, a: u64, b: u64) {
        let s = self.slot(now_ms);
        s.1 += a;
        s.2 += b;
    }

    fn sums(&self, now_ms: u64) -> (u64, u64) {
        let epoch = now_ms / self.width_ms;
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        self.slots
            .iter()
            .filter(|s| s.0 != u64::MAX && s.0 >= oldest && s.0 <= epoch)
            .fold((0, 0), |(a, b), s| (a + s.1, b + s.2))
    }

    fn clear(&mut self) {
        self.slots = [(u64::MAX, 0, 0); BUCKETS];
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls are refused until the given time.
    Open {
        /// When probing may start.
        until_ms: u64,
    },
    /// A few probe calls are let through.
    HalfOpen {
        /// Probes started and not yet finished.
        in_flight: u32,
        /// Probes that succeeded.
        successes: u32,
    },
}

impl BreakerState {
    /// `closed`, `open` or `half_open`.
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }

    /// 0 closed, 1 half-open, 2 open (the `/metrics` gauge value).
    pub fn gauge(&self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen { .. } => 1,
            BreakerState::Open { .. } => 2,
        }
    }
}

/// What a breaker says about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead.
    Allowed,
    /// Go ahead as a half-open probe (report the outcome with `probe = true`).
    Probe,
    /// Refused; the breaker may let calls through again after this long.
    Rejected {
        /// Milliseconds until probing starts (0 while probes are busy).
        retry_after_ms: u64,
    },
}

/// A circuit breaker for one upstream endpoint.
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: BreakerState,
    /// (successes, failures) over the window while closed.
    window: Window,
    opened: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Breaker {
            window: Window::new(cfg.window),
            cfg,
            state: BreakerState::Closed,
            opened: 0,
        }
    }

    /// The state as of `now_ms` (an expired open breaker reads half-open).
    pub fn state(&self, now_ms: u64) -> BreakerState {
        match self.state {
            BreakerState::Open { until_ms } if now_ms >= until_ms => BreakerState::HalfOpen {
                in_flight: 0,
                successes: 0,
            },
            s => s,
        }
    }

    /// How many times the breaker has opened.
    pub fn times_opened(&self) -> u64 {
        self.opened
    }

    /// (successes, failures) in the current window.
    pub fn window_counts(&self, now_ms: u64) -> (u64, u64) {
        self.window.sums(now_ms)
    }

    /// Asks to make a call.
    pub fn admit(&mut self, now_ms: u64) -> Admit {
        if !self.cfg.enabled {
            return Admit::Allowed;
        }
        self.state = self.state(now_ms);
        match &mut self.state {
            BreakerState::Closed => Admit::Allowed,
            BreakerState::Open { until_ms } => Admit::Rejected {
                retry_after_ms: until_ms.saturating_sub(now_ms),
            },
            BreakerState::HalfOpen {
                in_flight,
                successes,
            } => {
                if *in_flight + *successes < self.cfg.probes.max(1) {
                    *in_flight += 1;
                    Admit::Probe
                } else {
                    Admit::Rejected { retry_after_ms: 0 }
                }
            }
        }
    }

    /// Reports a call's outcome. `probe` is whether [`Breaker::admit`]
    /// answered [`Admit::Probe`] for it.
    pub fn record(&mut self, now_ms: u64, ok: bool, probe: bool) {
        if !self.cfg.enabled {
            return;
        }
        match &mut self.state {
            BreakerState::HalfOpen {
                in_flight,
                successes,
            } if probe => {
                *in_flight = in_flight.saturating_sub(1);
                if !ok {
                    self.trip(now_ms);
                } else {
                    *successes += 1;
                    if *successes >= self.cfg.probes.max(1) {
                        self.state = BreakerState::Closed;
                        self.window.clear();
                    }
                }
            }
            BreakerState::Closed => {
                self.window.add(now_ms, u64::from(ok), u64::from(!ok));
                if !ok {
                    let (s, f) = self.window.sums(now_ms);
                    let n = s + f;
                    if n >= u64::from(self.cfg.min_requests.max(1))
                        && f as f64 >= self.cfg.failure_rate * n as f64
                    {
                        self.trip(now_ms);
                    }
                }
            }
            // Calls admitted before the breaker opened finish late; their
            // outcome no longer matters.
            _ => {}
        }
    }

    fn trip(&mut self, now_ms: u64) {
        self.opened += 1;
        self.state = BreakerState::Open {
            until_ms: now_ms + self.cfg.cooldown.as_millis() as u64,
        };
        self.window.clear();
    }
}

/// A retry budget for one upstream endpoint.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    floor: f64,
    /// (requests, retries) over the window.
    window: Window,
}

impl RetryBudget {
    /// A budget from retry settings.
    pub fn new(cfg: &RetryConfig) -> Self {
        RetryBudget {
            ratio: cfg.budget,
            floor: cfg.min_per_sec * cfg.window.as_secs_f64(),
            window: Window::new(cfg.window),
        }
    }

    /// Counts a first attempt.
    pub fn on_request(&mut self, now_ms: u64) {
        self.window.add(now_ms, 1, 0);
    }

    /// Takes one retry from the budget if any is left.
    pub fn try_retry(&mut self, now_ms: u64) -> bool {
        let (requests, retries) = self.window.sums(now_ms);
        let allowed = (self.ratio * requests as f64).max(self.floor);
        if (retries as f64) < allowed {
            self.window.add(now_ms, 0, 1);
            true
        } else {
            false
        }
    }

    /// (requests, retries) in the current window.
    pub fn counts(&self, now_ms: u64) -> (u64, u64) {
        self.window.sums(now_ms)
    }
}

/// The wait before retry number `retry` (1-based): uniformly random in
/// `[0, min(max, base × 2^(retry-1))]` ("full jitter"); `unit` is a random
/// number in `[0, 1)`.
pub fn backoff(base: Duration, max: Duration, retry: u32, unit: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << retry.saturating_sub(1).min(20));
    let cap = exp.min(max);
    cap.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            failure_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(5),
            probes: 2,
        }
    }

    #[test]
    fn opens_on_failure_share_only_after_min_requests() {
        let mut b = Breaker::new(cfg());
        for i in 0..9 {
            assert_eq!(b.admit(i), Admit::Allowed);
            b.record(i, false, false);
        }
        // 9 failures of 9: below min_requests, still closed.
        assert_eq!(b.state(10), BreakerState::Closed);
        b.admit(10);
        b.record(10, false, false);
        assert!(matches!(b.state(11), BreakerState::Open { .. }));
        assert_eq!(b.times_opened(), 1);
        assert_eq!(
            b.admit(1000),
            Admit::Rejected {
                retry_after_ms: 5010 - 1000
            }
        );
    }

    #[test]
    fn stays_closed_below_the_failure_share() {
        let mut b = Breaker::new(cfg());
        for i in 0..100 {
            b.admit(i * 10);
            b.record(i * 10, i % 3 != 0, false); // a third fail
        }
        assert_eq!(b.state(1000), BreakerState::Closed);
    }

    #[test]
    fn half_open_closes_after_all_probes_succeed_and_reopens_on_failure() {
        let mut b = Breaker::new(cfg());
        for i in 0..10 {
            b.admit(i);
            b.record(i, false, false);
        }
        let t = 5_100;
        assert_eq!(b.state(t).name(), "half_open");
        assert_eq!(b.admit(t), Admit::Probe);
        assert_eq!(b.admit(t), Admit::Probe);
        // Only `probes` calls at a time.
        assert_eq!(b.admit(t), Admit::Rejected { retry_after_ms: 0 });
        b.record(t, true, true);
        b.record(t, true, true);
        assert_eq!(b.state(t), BreakerState::Closed);
        assert_eq!(b.window_counts(t), (0, 0));

        for i in 0..10 {
            b.admit(t + i);
            b.record(t + i, false, false);
        }
        let t2 = t + 10 + 5_000;
        assert_eq!(b.admit(t2), Admit::Probe);
        b.record(t2, false, true);
        assert!(matches!(b.state(t2), BreakerState::Open { .. }));
        // Opened by the first burst, the second burst, and the failed probe.
        assert_eq!(b.times_opened(), 3);
    }

    #[test]
    fn old_failures_slide_out_of_the_window() {
        let mut b = Breaker::new(cfg());
        for i in 0..9 {
            b.admit(i);
            b.record(i, false, false);
        }
        // 20 s later the old failures are gone: one more does not trip.
        b.admit(20_000);
        b.record(20_000, false, false);
        assert_eq!(b.state(20_001), BreakerState::Closed);
        assert_eq!(b.window_counts(20_001), (0, 1));
    }

    #[test]
    fn disabled_breaker_never_refuses() {
        let mut b = Breaker::new(BreakerConfig {
            enabled: false,
            ..cfg()
        });
        for i in 0..100 {
            assert_eq!(b.admit(i), Admit::Allowed);
            b.record(i, false, false);
        }
    }

    #[test]
    fn budget_allows_the_ratio_plus_the_floor() {
        let rc = RetryConfig {
            budget: 0.2,
            min_per_sec: 0.0,
            window: Duration::from_secs(10),
            ..RetryConfig::default()
        };
        let mut b = RetryBudget::new(&rc);
        for _ in 0..100 {
            b.on_request(1);
        }
        let granted = (0..100).filter(|_| b.try_retry(1)).count();
        assert_eq!(granted, 20);
        // With a floor of 1/s over 10 s, ten retries pass even with no traffic.
        let mut b = RetryBudget::new(&RetryConfig {
            min_per_sec: 1.0,
            ..rc
        });
        assert_eq!((0..50).filter(|_| b.try_retry(1)).count(), 10);
    }

    #[test]
    fn backoff_is_capped_and_grows() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        assert_eq!(backoff(base, max, 1, 0.999_999).as_millis(), 99);
        assert_eq!(backoff(base, max, 3, 0.5), Duration::from_millis(200));
        assert_eq!(backoff(base, max, 30, 1.0), max);
        assert_eq!(backoff(base, max, 2, 0.0), Duration::ZERO);
    }

    proptest! {
        /// Whatever the sequence of calls and outcomes, probes never exceed
        /// the configured number, an open breaker refuses until its cooldown
        /// ends, and a closed breaker only opens on a failure.
        #[test]
        fn breaker_invariants(ops in proptest::collection::vec((0u64..400, any::<bool>()), 1..400)) {
            let c = cfg();
            let mut b = Breaker::new(c);
            let mut now = 0u64;
            let mut probes_out: Vec<bool> = Vec::new();
            for (dt, ok) in ops {
                now += dt;
                let before = b.state(now);
                match b.admit(now) {
                    Admit::Allowed => {
                        prop_assert_eq!(before, BreakerState::Closed);
                        b.record(now, ok, false);
                        if ok {
                            prop_assert_eq!(b.state(now), BreakerState::Closed);
                        }
                    }
                    Admit::Probe => {
                        probes_out.push(ok);
                        if let BreakerState::HalfOpen { in_flight, successes } = b.state(now) {
                            prop_assert!(in_flight + successes <= c.probes);
                        }
                        // Finish probes in order once two are out.
                        if probes_out.len() == 2 {
                            for ok in probes_out.drain(..) {
                                b.record(now, ok, true);
                            }
                        }
                    }
                    Admit::Rejected { retry_after_ms } => {
                        prop_assert!(before != BreakerState::Closed);
                        prop_assert!(retry_after_ms <= c.cooldown.as_millis() as u64);
                    }
                }
            }
        }

        /// Retries granted never exceed ratio × requests + the floor.
        #[test]
        fn budget_bound(reqs in 0u64..500, asks in 0usize..500, ratio in 0.0f64..1.0) {
            let rc = RetryConfig { budget: ratio, min_per_sec: 0.5, window: Duration::from_secs(10), ..RetryConfig::default() };
            let mut b = RetryBudget::new(&rc);
            for _ in 0..reqs { b.on_request(5); }
            let granted = (0..asks).filter(|_| b.try_retry(5)).count() as f64;
            prop_assert!(granted <= (ratio * reqs as f64).max(5.0).ceil());
        }

        /// Backoff never exceeds its cap nor the exponential step.
        #[test]
        fn backoff_bounds(base_ms in 1u64..1000, max_ms in 1u64..10_000, retry in 1u32..40, unit in 0.0f64..1.0) {
            let d = backoff(Duration::from_millis(base_ms), Duration::from_millis(max_ms), retry, unit);
            prop_assert!(d <= Duration::from_millis(max_ms));
        }
    }
}
