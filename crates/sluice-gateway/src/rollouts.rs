//! The live view of every configured rollout: its plan, its durable state,
//! and the request counters of its current stage.
//!
//! Invariant: the request path reads [`Rollouts`] through an `ArcSwap`. An
//! admin action commits the new state to the store first, then swaps in a new
//! [`Rollouts`], then answers; so once the answer is sent, every request
//! routed afterwards sees the new state (a pause or rollback routes nobody to
//! the candidate from the very next request on).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sluice_core::config::StageKind;
use sluice_core::config::{Config, RolloutConfig};
use sluice_core::gate::{evaluate, evaluate_paired, judged_in_shadow, Method, Verdict};
use sluice_core::rollout::{RolloutState, Status};
use sluice_core::signals::{Observation, StageAggregates};
use sluice_store::{Store, StoreError};

/// Whether a request's outcome counts as an error against its variant:
/// server-side and upstream failures, not the client's own mistakes or
/// disconnects.
pub fn is_error(status: u16, error_kind: Option<&str>) -> bool {
    status >= 500 || status == 429 || error_kind.is_some_and(|k| k.starts_with("upstream_"))
}

/// What a finished request contributes to its stage's signals.
#[allow(clippy::too_many_arguments)]
pub fn observation(
    status: u16,
    error_kind: Option<&str>,
    latency_ms: f64,
    ttft_ms: Option<f64>,
    tokens_out: Option<u64>,
    refusal: Option<bool>,
    cost: Option<f64>,
) -> Observation {
    let error = is_error(status, error_kind);
    if error {
        return Observation {
            error,
            ..Default::default()
        };
    }
    Observation {
        error,
        refusal,
        latency_ms: Some(latency_ms),
        ttft_ms,
        cost,
        output_tokens: tokens_out,
        flags: Vec::new(),
    }
}

/// Requests served in one stage of a rollout, per arm.
#[derive(Debug, Default)]
pub struct StageCounters {
    /// Served by the stable variant.
    pub stable: AtomicU64,
    /// Served by the candidate.
    pub candidate: AtomicU64,
    /// Mirrored calls of a shadow stage.
    pub shadow: ShadowCounters,
}

/// What a shadow stage's mirroring did.
#[derive(Debug, Default)]
pub struct ShadowCounters {
    in_flight: AtomicUsize,
    /// Mirrored calls started.
    pub mirrored: AtomicU64,
    /// Mirrors skipped because `max_in_flight` calls were already running.
    pub skipped: AtomicU64,
    /// Mirrored calls that failed or timed out.
    pub failed: AtomicU64,
    /// Complete pairs fed to the gates.
    pub paired: AtomicU64,
}

impl ShadowCounters {
    /// Mirrored calls running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A slot for one mirrored call; frees itself when dropped.
#[derive(Debug)]
pub struct ShadowPermit(Arc<StageCounters>);

impl Drop for ShadowPermit {
    fn drop(&mut self) {
        self.0.shadow.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes a mirror slot if fewer than `max` are in use; otherwise counts the
/// skip and returns `None` (never waits).
pub fn try_mirror(counters: &Arc<StageCounters>, max: usize) -> Option<ShadowPermit> {
    let s = &counters.shadow;
    let mut cur = s.in_flight.load(Ordering::Acquire);
    loop {
        if cur >= max {
            s.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match s
            .in_flight
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                s.mirrored.fetch_add(1, Ordering::Relaxed);
                return Some(ShadowPermit(counters.clone()));
            }
            Err(now) => cur = now,
        }
    }
}

impl StageCounters {
    /// Both arms together.
    pub fn total(&self) -> u64 {
        self.stable.load(Ordering::Relaxed) + self.candidate.load(Ordering::Relaxed)
    }

    /// Counts one request.
    pub fn count(&self, candidate: bool) {
        if candidate {
            self.candidate.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stable.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One rollout as the gateway sees it.
#[derive(Debug, Clone)]
pub struct RolloutEntry {
    /// Its plan.
    pub config: Arc<RolloutConfig>,
    /// Its durable state.
    pub state: RolloutState,
    /// The stored version (`None`: never changed, so still pending).
    pub version: Option<i64>,
    /// Requests in the current stage.
    pub counters: Arc<StageCounters>,
    /// Signals of the current stage, per arm.
    pub aggregates: Arc<Mutex<StageAggregates>>,
}

/// Whether a stage serves everyone the candidate, so it has no concurrent
/// stable arm and judges against the previous stage's stable arm instead.
pub fn carries_stable(rc: &RolloutConfig, stage: usize) -> bool {
    stage > 0
        && matches!(
            rc.stages.get(stage).map(|s| &s.kind),
            Some(sluice_core::config::StageKind::Percent {
                basis_points: 10_000
            })
        )
}

impl RolloutEntry {
    /// Fresh counters and aggregates for the stage the state is now in. A
    /// 100 % stage keeps the previous stage's stable arm as its control.
    pub fn fresh_stage(&mut self) {
        let mut fresh = StageAggregates::default();
        if carries_stable(&self.config, self.state.stage) {
            fresh.stable = self
                .aggregates
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stable
                .clone();
        }
        self.counters = Arc::new(StageCounters::default());
        self.aggregates = Arc::new(Mutex::new(fresh));
    }

    /// Whether the current stage mirrors traffic.
    pub fn in_shadow(&self) -> bool {
        matches!(
            self.config.stages.get(self.state.stage).map(|s| &s.kind),
            Some(StageKind::Shadow(_))
        )
    }

    /// The gates' verdicts on the current stage now. A shadow stage judges
    /// its mirrored pairs, with the gates that apply there.
    pub fn verdicts(&self) -> Vec<Verdict> {
        let aggs = self.aggregates.lock().unwrap_or_else(|p| p.into_inner());
        if self.in_shadow() {
            return self
                .config
                .gates
                .iter()
                .filter(|g| judged_in_shadow(&g.signal))
                .map(|g| evaluate_paired(g, &aggs.paired, Method::Sequential))
                .collect();
        }
        self.config
            .gates
            .iter()
            .map(|g| evaluate(g, &aggs, Method::Sequential))
            .collect()
    }
}

/// All rollouts, and which one governs each deployment.
#[derive(Debug, Default)]
pub struct Rollouts {
    /// By rollout name.
    pub entries: BTreeMap<String, RolloutEntry>,
    /// Deployment → the rollout that routes its traffic: the active one, or
    /// else the most recently promoted one.
    pub governing: HashMap<String, String>,
}

impl Rollouts {
    /// Builds the view from a config and the store. Counters of an entry whose
    /// rollout and stage are unchanged are carried over from `previous`;
    /// others are seeded from the requests recorded in the stage.
    pub fn load(
        config: &Config,
        store: &Store,
        previous: Option<&Rollouts>,
    ) -> Result<Rollouts, Vec<String>> {
        let mut errors = Vec::new();
        let mut entries = BTreeMap::new();
        for (name, rc) in &config.rollouts {
            let stored = match store.rollout(name) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(format!("rollouts.{name}: cannot read its state: {e}"));
                    continue;
                }
            };
            let (state, version) = match stored {
                Some(s) => (s.state, Some(s.version)),
                None => (RolloutState::default(), None),
            };
            if state.status.is_active() && state.stage >= rc.stages.len() {
                errors.push(format!(
                    "rollouts.{name}: the rollout is {} in stage {} but the plan now has {} stage(s); \
                     roll it back or restore the plan",
                    state.status.name(),
                    state.stage,
                    rc.stages.len()
                ));
                continue;
            }
            let carried = previous
                .and_then(|p| p.entries.get(name))
                .filter(|e| {
                    e.state.stage == state.stage
                        && e.state.stage_started_ms == state.stage_started_ms
                })
                .map(|e| (e.counters.clone(), e.aggregates.clone()));
            let (counters, aggregates) = match carried {
                Some(c) => c,
                None => {
                    let c = StageCounters::default();
                    let mut a = StageAggregates::default();
                    if state.status.is_active() {
                        let principles = config
                            .deployments
                            .get(&rc.deployment)
                            .map_or(&[][..], |d| d.principles.as_slice());
                        match seed(store, rc, principles, &state, &mut a) {
                            Ok((s, k)) => {
                                c.stable.store(s, Ordering::Relaxed);
                                c.candidate.store(k, Ordering::Relaxed);
                            }
                            Err(e) => errors
                                .push(format!("rollouts.{name}: cannot count its requests: {e}")),
                        }
                    }
                    (Arc::new(c), Arc::new(Mutex::new(a)))
                }
            };
            entries.insert(
                name.clone(),
                RolloutEntry {
                    config: Arc::new(rc.clone()),
                    state,
                    version,
                    counters,
                    aggregates,
                },
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self::index(entries))
    }

    /// Recomputes which rollout governs each deployment.
    pub fn index(entries: BTreeMap<String, RolloutEntry>) -> Rollouts {
        let mut governing: HashMap<String, (String, bool, i64)> = HashMap::new();
        for (name, e) in &entries {
            let active = e.state.status.is_active();
            if !active && e.state.status != Status::Promoted {
                continue;
            }
            let candidate = (name.clone(), active, e.state.updated_ms);
            let d = e.config.deployment.clone();
            match governing.get(&d) {
                // An active rollout wins; among promoted ones, the latest.
                Some((_, cur_active, cur_t))
                    if *cur_active || (!active && *cur_t >= e.state.updated_ms) => {}
                _ => {
                    governing.insert(d, candidate);
                }
            }
        }
        Rollouts {
            entries,
            governing: governing.into_iter().map(|(d, (n, _, _))| (d, n)).collect(),
        }
    }

    /// The rollout that routes a deployment's traffic, if any.
    pub fn governing(&self, deployment: &str) -> Option<&RolloutEntry> {
        self.governing
            .get(deployment)
            .and_then(|n| self.entries.get(n))
    }

    /// The active rollout of a deployment other than `except`, if any.
    pub fn active_for(&self, deployment: &str, except: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, e)| {
                *n != except && e.config.deployment == deployment && e.state.status.is_active()
            })
            .map(|(n, _)| n.as_str())
    }

    /// A copy with one entry replaced.
    pub fn with(&self, name: &str, entry: RolloutEntry) -> Rollouts {
        let mut entries = self.entries.clone();
        entries.insert(name.to_string(), entry);
        Self::index(entries)
    }
}

/// What a recorded request contributes to its stage's signals. `principles`
/// are the deployment's (its constitution, in order): a successful request
/// flags each one its recorded verdicts name, as it did when it was served.
fn row_observation(r: &sluice_store::StageRow, principles: &[String]) -> Observation {
    let mut obs = observation(
        r.status,
        r.error_kind.as_deref(),
        r.latency_ms,
        r.ttft_ms,
        r.tokens_out,
        r.refusal,
        r.cost_usd,
    );
    if !obs.error && !principles.is_empty() {
        let fired = fired_principles(r.policy.as_deref());
        obs.flags = principles
            .iter()
            .map(|p| (p.clone(), fired.contains(p.as_str())))
            .collect();
    }
    obs
}

/// The principles a recorded `policy` column names (a JSON list of findings,
/// each with a `principle`). A column that does not parse names none.
fn fired_principles(policy: Option<&str>) -> std::collections::BTreeSet<String> {
    let Some(text) = policy else {
        return Default::default();
    };
    match serde_json::from_str::<Vec<serde_json::Value>>(text) {
        Ok(findings) => findings
            .iter()
            .filter_map(|f| f.get("principle").and_then(|p| p.as_str()))
            .map(str::to_string)
            .collect(),
        Err(e) => {
            tracing::warn!("a recorded request's policy verdicts do not parse ({e}); its flags count as not fired");
            Default::default()
        }
    }
}

/// Rebuilds a stage's counters and signals from its recorded requests (one
/// indexed query per active rollout, at startup or reload; never per
/// evaluation).
fn seed(
    store: &Store,
    rc: &RolloutConfig,
    principles: &[String],
    state: &RolloutState,
    aggs: &mut StageAggregates,
) -> Result<(u64, u64), StoreError> {
    let stage = u32::try_from(state.stage).unwrap_or(u32::MAX);
    if carries_stable(rc, state.stage) {
        // The control arm of a 100 % stage: the previous stage's stable rows.
        for row in store.stage_rows(&rc.name, stage - 1, 0)? {
            if row.variant != rc.candidate {
                let arm = &mut aggs.stable;
                arm.observe(&row_observation(&row, principles));
                if let Some(down) = row.thumbs_down {
                    arm.thumbs(None, down);
                }
            }
        }
    }
    if matches!(
        rc.stages.get(state.stage).map(|s| &s.kind),
        Some(StageKind::Shadow(_))
    ) {
        for (primary, mirror) in store.shadow_pairs(&rc.name, stage, state.stage_started_ms)? {
            aggs.paired.observe(
                &row_observation(&primary, principles),
                &row_observation(&mirror, principles),
            );
        }
    }
    let mut stable = 0;
    let mut candidate = 0;
    for row in store.stage_rows(&rc.name, stage, state.stage_started_ms)? {
        let cand = row.variant == rc.candidate;
        if cand {
            candidate += 1;
        } else {
            stable += 1;
        }
        let arm = aggs.arm_mut(cand);
        arm.observe(&row_observation(&row, principles));
        if let Some(down) = row.thumbs_down {
            arm.thumbs(None, down);
        }
        if let Some(s) = row.score {
            arm.scores.add(s);
        }
    }
    Ok((stable, candidate))
}

/// The `x-sluice-stage` value for a governing rollout: a fixed word, with
/// no allocation, unless a stage is running or paused.
pub fn stage_header(entry: Option<&RolloutEntry>) -> Cow<'static, str> {
    match entry {
        None => Cow::Borrowed("none"),
        Some(e) => match e.state.status {
            Status::Running => Cow::Owned(format!(
                "{}:{}",
                e.state.stage,
                e.config
                    .stages
                    .get(e.state.stage)
                    .map(|s| s.kind.label())
                    .unwrap_or_default()
            )),
            Status::Paused => Cow::Owned(format!("{}:paused", e.state.stage)),
            other => Cow::Borrowed(other.name()),
        },
    }
}
