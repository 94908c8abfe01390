//! Prometheus metrics: request counts, errors, latency and time-to-first-token
//! histograms by deployment and variant, token counts, and the event writer's
//! health (so a lost record can never go unnoticed).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_store::{EventSender, RequestRecord};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    deployment: String,
    variant: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    deployment: String,
    variant: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    deployment: String,
    principle: String,
    action: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShadowLabels {
    rollout: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    deployment: String,
    from: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    provider: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VariantLabels {
    deployment: String,
    variant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    deployment: String,
    variant: String,
    direction: String,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

/// All gateway metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<VariantLabels, Histogram, fn() -> Histogram>,
    ttft: Family<VariantLabels, Histogram, fn() -> Histogram>,
    tokens: Family<TokenLabels, Counter>,
    policy: Family<PolicyLabels, Counter>,
    shadow: Family<ShadowLabels, Counter>,
    fallbacks: Family<FallbackLabels, Counter>,
    overhead: Histogram,
    in_flight: Arc<AtomicI64>,
    offloaded: Arc<AtomicU64>,
    health: HealthBoard,
    /// Series handles by deployment and variant (a prometheus-client metric
    /// shares its value with its clones, so a handle counts into its family).
    hot: RwLock<HashMap<String, HashMap<String, Arc<VariantHandles>>>>,
}

/// One deployment and variant's per-request series, each taken from its
/// family the first time it is used (so `/metrics` shows only series that
/// have counted something, as before).
struct VariantHandles {
    labels: VariantLabels,
    ok: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
    ttft: OnceLock<Histogram>,
    tokens_in: OnceLock<Counter>,
    tokens_out: OnceLock<Counter>,
}

impl VariantHandles {
    fn request_labels(&self, status: u16) -> RequestLabels {
        RequestLabels {
            deployment: self.labels.deployment.clone(),
            variant: self.labels.variant.clone(),
            status: status.to_string(),
        }
    }
}

/// Buckets of the gateway-overhead histogram, seconds (10 µs to 100 ms).
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1,
];

/// The providers whose health `/metrics` reports; replaced on reload.
pub type HealthBoard = Arc<std::sync::Mutex<Vec<Arc<crate::upstream::Health>>>>;

#[derive(Debug)]
struct HealthCollector {
    board: HealthBoard,
}

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let views: Vec<_> = self
            .board
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|h| h.view())
            .collect();
        {
            let mut fam = encoder.encode_descriptor(
                "sluice_upstream_breaker_state",
                "Circuit breaker state per provider and upstream model: 0 closed, 1 half-open, 2 open.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for v in &views {
                for b in &v.breakers {
                    let labels = BreakerLabels {
                        provider: v.provider.clone(),
                        model: b.model.clone(),
                    };
                    ConstGauge::new(b.gauge).encode(fam.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "sluice_upstream_breaker_opened",
                "Times a circuit breaker opened, per provider and upstream model.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for v in &views {
                for b in &v.breakers {
                    let labels = BreakerLabels {
                        provider: v.provider.clone(),
                        model: b.model.clone(),
                    };
                    ConstCounter::new(b.opened_total).encode(fam.encode_family(&labels)?)?;
                }
            }
        }
        type Pick = fn(&crate::upstream::HealthView) -> u64;
        let counters: [(&str, &str, Pick); 5] = [
            (
                "sluice_upstream_calls",
                "Upstream call attempts per provider (first attempts and retries).",
                |v| v.calls_total,
            ),
            (
                "sluice_upstream_failures",
                "Upstream call attempts that failed (connect, timeout, 429/5xx, invalid response).",
                |v| v.failures_total,
            ),
            ("sluice_upstream_retries", "Upstream calls retried.", |v| {
                v.retries_total
            }),
            (
                "sluice_upstream_retries_denied",
                "Retries not made because the provider's retry budget was spent.",
                |v| v.retries_denied_total,
            ),
            (
                "sluice_upstream_breaker_rejections",
                "Calls refused without trying because the provider's breaker was open.",
                |v| v.rejected_total,
            ),
        ];
        for (name, help, pick) in counters {
            let mut fam = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for v in &views {
                let labels = ProviderLabels {
                    provider: v.provider.clone(),
                };
                ConstCounter::new(pick(v)).encode(fam.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

struct WriterCollector {
    events: EventSender,
    in_flight: Arc<AtomicI64>,
    offloaded: Arc<AtomicU64>,
}

impl std::fmt::Debug for WriterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterCollector")
    }
}

impl Collector for WriterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.events.stats();
        for (name, help, v) in [
            (
                "sluice_events_enqueued",
                "Request records handed to the event writer.",
                s.enqueued,
            ),
            (
                "sluice_events_written",
                "Request records committed to the store.",
                s.written,
            ),
            (
                "sluice_events_delayed",
                "Strictly durable request records that waited because the writer queue was full.",
                s.delayed,
            ),
            (
                "sluice_events_failed",
                "Request records lost after repeated store write failures.",
                s.failed,
            ),
            (
                "sluice_events_dropped",
                "Request records handed over after the writer stopped.",
                s.dropped,
            ),
            (
                "sluice_events_shed",
                "Request records dropped because the writer queue was full (on_backpressure = \"shed\").",
                s.shed,
            ),
            (
                "sluice_events_spilled",
                "Request records written to the spill journal because the writer queue was full.",
                s.spilled,
            ),
            (
                "sluice_events_replayed",
                "Spilled request records committed to the store from the journal.",
                s.replayed,
            ),
            (
                "sluice_store_write_errors",
                "Failed store write attempts (each retried).",
                s.write_errors,
            ),
        ] {
            let c = ConstCounter::new(v);
            let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)?;
        }
        let depth = ConstGauge::new(i64::try_from(self.events.queue_depth()).unwrap_or(i64::MAX));
        let m = encoder.encode_descriptor(
            "sluice_events_queue_depth",
            "Request records waiting for the writer.",
            None,
            depth.metric_type(),
        )?;
        depth.encode(m)?;
        let journal =
            ConstGauge::new(i64::try_from(self.events.journal_depth()).unwrap_or(i64::MAX));
        let m = encoder.encode_descriptor(
            "sluice_events_journal_depth",
            "Spilled request records waiting in the journal.",
            None,
            journal.metric_type(),
        )?;
        journal.encode(m)?;
        let offloaded = ConstCounter::new(self.offloaded.load(Ordering::Relaxed));
        let m = encoder.encode_descriptor(
            "sluice_requests_offloaded",
            "Requests whose handler ran on another serving thread than its connection's (workers = N), because that thread was falling behind.",
            None,
            offloaded.metric_type(),
        )?;
        offloaded.encode(m)?;
        let inflight = ConstGauge::new(self.in_flight.load(Ordering::Relaxed));
        let m = encoder.encode_descriptor(
            "sluice_requests_in_flight",
            "Chat completion requests being served now.",
            None,
            inflight.metric_type(),
        )?;
        inflight.encode(m)
    }
}

/// Decrements the in-flight gauge when dropped.
pub struct InFlight(Arc<AtomicI64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Creates the metrics, reading writer health from `events` at scrape time.
    pub fn new(events: EventSender) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration: Family<VariantLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let ttft: Family<VariantLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let tokens = Family::<TokenLabels, Counter>::default();
        let policy = Family::<PolicyLabels, Counter>::default();
        let shadow = Family::<ShadowLabels, Counter>::default();
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "sluice_fallbacks",
            "Requests served by a fallback variant because the assigned one failed, by deployment, assigned variant (from) and serving variant (to).",
            fallbacks.clone(),
        );
        let overhead = Histogram::new(OVERHEAD_BUCKETS.iter().copied());
        registry.register(
            "sluice_gateway_overhead_seconds",
            "Time sluice itself spent on a chat request: arrival to answer (a stream's headers) minus the time waiting on upstreams.",
            overhead.clone(),
        );
        let health: HealthBoard = Arc::default();
        registry.register_collector(Box::new(HealthCollector {
            board: health.clone(),
        }));
        registry.register(
            "sluice_shadow_calls",
            "Mirrored calls of shadow stages by rollout and outcome (ok, error, skipped_full: not mirrored because max_in_flight calls were running).",
            shadow.clone(),
        );
        registry.register(
            "sluice_requests",
            "Chat completion requests by deployment, variant and HTTP status.",
            requests.clone(),
        );
        registry.register(
            "sluice_request_errors",
            "Failed chat completion requests by deployment, variant and error kind.",
            errors.clone(),
        );
        registry.register(
            "sluice_request_duration_seconds",
            "Time from request arrival to the last byte of the answer.",
            duration.clone(),
        );
        registry.register(
            "sluice_time_to_first_token_seconds",
            "Time from request arrival to the first generated token of a stream.",
            ttft.clone(),
        );
        registry.register(
            "sluice_tokens",
            "Tokens by deployment, variant and direction (input, output).",
            tokens.clone(),
        );
        registry.register(
            "sluice_policy_verdicts",
            "Principles that fired, by deployment, principle, action and stage.",
            policy.clone(),
        );
        let in_flight = Arc::new(AtomicI64::new(0));
        let offloaded = Arc::new(AtomicU64::new(0));
        registry.register_collector(Box::new(WriterCollector {
            events,
            in_flight: in_flight.clone(),
            offloaded: offloaded.clone(),
        }));
        Metrics {
            registry,
            requests,
            errors,
            duration,
            ttft,
            tokens,
            policy,
            shadow,
            fallbacks,
            overhead,
            in_flight,
            offloaded,
            health,
            hot: RwLock::default(),
        }
    }

    /// The counter of requests handed to another serving thread, for the
    /// serving threads to count into.
    pub fn offloaded(&self) -> Arc<AtomicU64> {
        self.offloaded.clone()
    }

    /// Observes the time sluice itself spent on a request.
    pub fn overhead(&self, d: std::time::Duration) {
        self.overhead.observe(d.as_secs_f64());
    }

    /// Sets the providers whose health is reported.
    pub fn set_health(&self, providers: Vec<Arc<crate::upstream::Health>>) {
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = providers;
    }

    /// Counts a request served by a fallback variant.
    pub fn fallback(&self, deployment: &str, from: &str, to: &str) {
        self.fallbacks
            .get_or_create(&FallbackLabels {
                deployment: deployment.to_string(),
                from: from.to_string(),
                to: to.to_string(),
            })
            .inc();
    }

    /// Counts one shadow-stage mirror outcome.
    pub fn shadow(&self, rollout: &str, outcome: &str) {
        self.shadow
            .get_or_create(&ShadowLabels {
                rollout: rollout.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts a request as in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.in_flight.clone())
    }

    /// Records a finished request.
    pub fn observe(&self, r: &RequestRecord) {
        let deployment = r.deployment.as_deref().unwrap_or("-");
        let variant = r.variant.as_deref().unwrap_or("-");
        let h = self.handles(deployment, variant);
        if r.status == 200 {
            h.ok.get_or_init(|| self.requests.get_or_create(&h.request_labels(200)).clone())
                .inc();
        } else {
            self.requests
                .get_or_create(&h.request_labels(r.status))
                .inc();
        }
        if let Some(kind) = &r.error_kind {
            self.errors
                .get_or_create(&ErrorLabels {
                    deployment: deployment.to_string(),
                    variant: variant.to_string(),
                    kind: kind.clone(),
                })
                .inc();
        }
        self.observe_policy(r, deployment);
        h.duration
            .get_or_init(|| self.duration.get_or_create(&h.labels).clone())
            .observe(r.latency_ms / 1000.0);
        if let Some(t) = r.ttft_ms {
            h.ttft
                .get_or_init(|| self.ttft.get_or_create(&h.labels).clone())
                .observe(t / 1000.0);
        }
        for (direction, n, cell) in [
            ("input", r.tokens_in, &h.tokens_in),
            ("output", r.tokens_out, &h.tokens_out),
        ] {
            if let Some(n) = n {
                cell.get_or_init(|| {
                    self.tokens
                        .get_or_create(&TokenLabels {
                            deployment: deployment.to_string(),
                            variant: variant.to_string(),
                            direction: direction.into(),
                        })
                        .clone()
                })
                .inc_by(n);
            }
        }
    }

    /// The per-request series of one deployment and variant, looked up
    /// without building label sets once the pair has been seen.
    fn handles(&self, deployment: &str, variant: &str) -> Arc<VariantHandles> {
        let hot = self.hot.read().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hot.get(deployment).and_then(|m| m.get(variant)) {
            return h.clone();
        }
        drop(hot);
        let mut hot = self.hot.write().unwrap_or_else(|p| p.into_inner());
        hot.entry(deployment.to_string())
            .or_default()
            .entry(variant.to_string())
            .or_insert_with(|| {
                Arc::new(VariantHandles {
                    labels: VariantLabels {
                        deployment: deployment.to_string(),
                        variant: variant.to_string(),
                    },
                    ok: OnceLock::new(),
                    duration: OnceLock::new(),
                    ttft: OnceLock::new(),
                    tokens_in: OnceLock::new(),
                    tokens_out: OnceLock::new(),
                })
            })
            .clone()
    }

    /// Counts the principles that fired on a request (from its record).
    fn observe_policy(&self, r: &RequestRecord, deployment: &str) {
        let Some(p) = &r.policy else { return };
        let Ok(serde_json::Value::Array(findings)) = serde_json::from_str::<serde_json::Value>(p)
        else {
            return;
        };
        for f in findings {
            self.policy
                .get_or_create(&PolicyLabels {
                    deployment: deployment.to_string(),
                    principle: f["principle"].as_str().unwrap_or("").to_string(),
                    action: f["action"].as_str().unwrap_or("").to_string(),
                    stage: f["stage"].as_str().unwrap_or("").to_string(),
                })
                .inc();
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("cannot encode metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> (Metrics, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("m.db");
        let store = sluice_store::Store::open(sluice_store::StoreLocation::from_config(
            path.to_str().expect("utf-8 path"),
        ))
        .expect("store");
        let writer = store.spawn_writer(16, 16).expect("writer");
        (Metrics::new(writer.sender()), dir)
    }

    fn rec(deployment: &str, variant: &str, status: u16) -> RequestRecord {
        RequestRecord {
            deployment: Some(deployment.into()),
            variant: Some(variant.into()),
            status,
            latency_ms: 12.0,
            ..Default::default()
        }
    }

    #[test]
    fn cached_series_count_into_the_families_they_came_from() {
        let (m, _dir) = metrics();
        let mut r = rec("support", "v1", 200);
        r.tokens_out = Some(7);
        m.observe(&r);
        m.observe(&r);
        m.observe(&rec("support", "v2", 200));
        let mut failed = rec("support", "v1", 502);
        failed.error_kind = Some("upstream_error".into());
        m.observe(&failed);
        let text = m.render();
        for want in [
            "sluice_requests_total{deployment=\"support\",variant=\"v1\",status=\"200\"} 2",
            "sluice_requests_total{deployment=\"support\",variant=\"v2\",status=\"200\"} 1",
            "sluice_requests_total{deployment=\"support\",variant=\"v1\",status=\"502\"} 1",
            "sluice_request_errors_total{deployment=\"support\",variant=\"v1\",kind=\"upstream_error\"} 1",
            "sluice_request_duration_seconds_count{deployment=\"support\",variant=\"v1\"} 3",
            "sluice_tokens_total{deployment=\"support\",variant=\"v1\",direction=\"output\"} 14",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        // Series nothing counted into stay absent.
        assert!(!text.contains("direction=\"input\""), "{text}");
        assert!(
            !text.contains("sluice_time_to_first_token_seconds_count{"),
            "{text}"
        );
    }
}
