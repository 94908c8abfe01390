//! Simulated rollouts: the proof that the gates keep their promises.
//!
//! Each run plays one stage of a rollout request by request through the real
//! code — [`crate::assign::decide`] puts each simulated user in an arm,
//! [`crate::signals::ArmAggregates`] aggregates what the arm's model
//! produced, [`crate::gate::evaluate`] judges every `tick` requests, and
//! [`crate::controller::decide`] decides — until the controller promotes,
//! rolls back, or the stage runs out of time ("needs a human"). The same data
//! is also judged by a naive fixed-horizon test looked at every tick, to show
//! what peeking costs.
//!
//! Deterministic for a seed; runs are spread over threads.

use std::time::Duration;

use serde::Serialize;

use crate::assign::{decide as assign, RequestFacts};
use crate::config::{
    ControllerMode, GateConfig, Margin, OnFailure, RolloutConfig, Signal, StageConfig, StageKind,
    SubjectSource,
};
use crate::controller::{decide, Decision};
use crate::gate::{evaluate, Method, Outcome};
use crate::rollout::{Facts, RolloutState, Status};
use crate::signals::{Observation, StageAggregates};

/// How one arm behaves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ArmModel {
    /// Share of requests that fail.
    pub error_rate: f64,
    /// Median latency, ms (lognormal).
    pub latency_median_ms: f64,
    /// Log-space standard deviation of latency.
    pub latency_sigma: f64,
    /// Share of answers that refuse.
    pub refusal_rate: f64,
    /// Share of thumbs feedback that is down.
    pub thumbs_down_rate: f64,
    /// Mean output tokens (geometric-ish spread).
    pub output_tokens: f64,
}

impl ArmModel {
    /// A typical healthy variant.
    pub fn baseline() -> Self {
        ArmModel {
            error_rate: 0.01,
            latency_median_ms: 400.0,
            latency_sigma: 0.5,
            refusal_rate: 0.02,
            thumbs_down_rate: 0.10,
            output_tokens: 200.0,
        }
    }
}

/// One scenario: a gate, and how stable and candidate behave.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Name shown in the table.
    pub name: String,
    /// What the candidate truly is: `same`, `worse` or `better`.
    pub truth: &'static str,
    /// The gate judged.
    pub gate: GateConfig,
    /// Stable's behaviour.
    pub stable: ArmModel,
    /// The candidate's.
    pub candidate: ArmModel,
}

/// Settings of a simulation.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Runs per scenario.
    pub runs: usize,
    /// Requests between evaluations.
    pub tick: u64,
    /// Requests after which an undecided stage needs a human.
    pub max_requests: u64,
    /// Share of users on the candidate, percent.
    pub percent: u32,
    /// Share of successful requests that get thumbs feedback.
    pub feedback_rate: f64,
    /// Seed.
    pub seed: u64,
    /// Worker threads.
    pub threads: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            runs: 1000,
            tick: 250,
            max_requests: 100_000,
            percent: 50,
            feedback_rate: 0.3,
            seed: 1,
            threads: 2,
        }
    }
}

/// A scenario's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub scenario: String,
    /// `same`, `worse` or `better`.
    pub truth: &'static str,
    /// The gate, e.g. `error_rate ≤ +0.50 pp`.
    pub gate: String,
    /// Runs.
    pub runs: usize,
    /// Share rolled back.
    pub rollback_rate: f64,
    /// Share promoted.
    pub promote_rate: f64,
    /// Share left for a human.
    pub needs_human_rate: f64,
    /// Median requests until the controller decided (decided runs only).
    pub median_requests_to_decision: Option<u64>,
    /// Share a naive fixed-horizon test, looked at every tick, would have
    /// rolled back.
    pub naive_rollback_rate: f64,
}

/// The standard scenarios: A/A on every signal with a zero margin (the case
/// most prone to false alarms), the regressions the gates must catch, and a
/// better candidate.
pub fn standard_scenarios() -> Vec<Scenario> {
    let g = |signal: Signal, margin: Margin| GateConfig {
        signal,
        max_regression: margin,
        alpha: 0.05,
        min_samples: 200,
    };
    let b = ArmModel::baseline();
    let mut v = Vec::new();
    for (name, signal) in [
        ("A/A error rate", Signal::ErrorRate),
        ("A/A latency p95", Signal::LatencyP95),
        ("A/A refusal rate", Signal::RefusalRate),
        ("A/A thumbs-down", Signal::FeedbackDownRate),
        ("A/A output tokens", Signal::OutputTokens),
    ] {
        v.push(Scenario {
            name: name.into(),
            truth: "same",
            gate: g(signal, Margin::Absolute(0.0)),
            stable: b,
            candidate: b,
        });
    }
    v.push(Scenario {
        name: "error rate 1 % → 2 %".into(),
        truth: "worse",
        gate: g(Signal::ErrorRate, Margin::Absolute(0.005)),
        stable: b,
        candidate: ArmModel {
            error_rate: 0.02,
            ..b
        },
    });
    v.push(Scenario {
        name: "latency +20 %".into(),
        truth: "worse",
        gate: g(Signal::LatencyP95, Margin::Relative(0.10)),
        stable: b,
        candidate: ArmModel {
            latency_median_ms: b.latency_median_ms * 1.2,
            ..b
        },
    });
    v.push(Scenario {
        name: "thumbs-down 10 % → 13 %".into(),
        truth: "worse",
        gate: g(Signal::FeedbackDownRate, Margin::Absolute(0.01)),
        stable: b,
        candidate: ArmModel {
            thumbs_down_rate: 0.13,
            ..b
        },
    });
    v.push(Scenario {
        name: "better candidate".into(),
        truth: "better",
        gate: g(Signal::ErrorRate, Margin::Absolute(0.005)),
        stable: b,
        candidate: ArmModel {
            error_rate: 0.005,
            latency_median_ms: b.latency_median_ms * 0.9,
            ..b
        },
    });
    v
}

use crate::splitmix::SplitMix64 as Rng;

fn plan(scenario: &Scenario, settings: &Settings) -> RolloutConfig {
    RolloutConfig {
        name: "sim".into(),
        deployment: "sim".into(),
        candidate: "candidate".into(),
        subject: SubjectSource::User,
        salt: "sim".into(),
        stages: vec![StageConfig {
            kind: StageKind::Percent {
                basis_points: settings.percent.min(100) * 100,
            },
            min_duration: Duration::ZERO,
            min_requests: 0,
            approval: vec![],
            // One simulated request per millisecond.
            max_duration: Some(Duration::from_millis(settings.max_requests)),
            require_suites: vec![],
        }],
        on_failure: OnFailure::Rollback,
        fallback: crate::config::Fallback::Stable,
        gates: vec![scenario.gate.clone()],
        evaluate_every: Duration::from_millis(settings.tick),
        controller: ControllerMode::Auto,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Rollback(u64),
    Promote(u64),
    Human,
}

fn no_header(_: &str) -> Option<String> {
    None
}

fn run_one(scenario: &Scenario, settings: &Settings, run: usize) -> (End, bool) {
    let p = plan(scenario, settings);
    let mut rng = Rng(settings.seed ^ (run as u64).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5eed);
    let mut aggs = StageAggregates::default();
    let state = RolloutState {
        status: Status::Running,
        ..Default::default()
    };
    let mut naive_rolled_back = false;
    let cohorts = Default::default();
    let mut subject = String::with_capacity(32);
    for i in 1..=settings.max_requests {
        subject.clear();
        use std::fmt::Write;
        let _ = write!(subject, "u{run}-{i}");
        let facts = RequestFacts {
            user: Some(&subject),
            api_key: None,
            metadata: None,
            header: &no_header,
        };
        let cand = assign(&p, 0, &cohorts, &facts, || 0).candidate;
        let m = if cand {
            &scenario.candidate
        } else {
            &scenario.stable
        };
        let error = rng.unit() < m.error_rate;
        let obs = if error {
            Observation {
                error: true,
                ..Default::default()
            }
        } else {
            let latency = m.latency_median_ms * (m.latency_sigma * rng.normal()).exp();
            let tokens = (m.output_tokens * (0.5 + rng.unit())).round() as u64;
            Observation {
                error: false,
                refusal: Some(rng.unit() < m.refusal_rate),
                latency_ms: Some(latency),
                ttft_ms: Some(latency * 0.3),
                cost: Some(tokens as f64 * 1e-6),
                output_tokens: Some(tokens),
                flags: Vec::new(),
            }
        };
        let arm = aggs.arm_mut(cand);
        arm.observe(&obs);
        if !error && rng.unit() < settings.feedback_rate {
            arm.thumbs(None, rng.unit() < m.thumbs_down_rate);
        }
        if i % settings.tick == 0 {
            if !naive_rolled_back
                && evaluate(&scenario.gate, &aggs, Method::FixedHorizon).outcome == Outcome::Fail
            {
                naive_rolled_back = true;
            }
            let verdicts = [evaluate(&scenario.gate, &aggs, Method::Sequential)];
            let facts = Facts {
                now_ms: i as i64,
                stage_requests: i,
                gate_blockers: Vec::new(),
            };
            match decide(&p, &state, &verdicts, &facts) {
                Decision::Fail { .. } => return (End::Rollback(i), naive_rolled_back),
                Decision::Advance { .. } => return (End::Promote(i), naive_rolled_back),
                Decision::NeedsHuman { .. } => return (End::Human, naive_rolled_back),
                Decision::Hold => {}
            }
        }
    }
    (End::Human, naive_rolled_back)
}

fn margin_text(g: &GateConfig) -> String {
    let m = match g.max_regression {
        Margin::Absolute(a) => match g.signal {
            Signal::LatencyP95 | Signal::TtftP95 => format!("+{a} ms"),
            Signal::OutputTokens | Signal::CostPerRequest => format!("+{a}"),
            _ => format!("+{:.2} pp", a * 100.0),
        },
        Margin::Relative(r) => format!("+{:.0} %", r * 100.0),
    };
    format!("{} ≤ {m}", g.signal.name())
}

/// Runs one scenario.
pub fn run_scenario(scenario: &Scenario, settings: &Settings) -> ScenarioResult {
    let threads = settings.threads.max(1);
    let results: Vec<(End, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..settings.runs)
                        .step_by(threads)
                        .map(|r| run_one(scenario, settings, r))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let n = results.len().max(1) as f64;
    let count = |f: &dyn Fn(&End) -> bool| results.iter().filter(|(e, _)| f(e)).count() as f64 / n;
    let mut decided: Vec<u64> = results
        .iter()
        .filter_map(|(e, _)| match e {
            End::Rollback(i) | End::Promote(i) => Some(*i),
            End::Human => None,
        })
        .collect();
    decided.sort_unstable();
    ScenarioResult {
        scenario: scenario.name.clone(),
        truth: scenario.truth,
        gate: margin_text(&scenario.gate),
        runs: results.len(),
        rollback_rate: count(&|e| matches!(e, End::Rollback(_))),
        promote_rate: count(&|e| matches!(e, End::Promote(_))),
        needs_human_rate: count(&|e| matches!(e, End::Human)),
        median_requests_to_decision: decided.get(decided.len() / 2).copied(),
        naive_rollback_rate: results.iter().filter(|(_, naive)| *naive).count() as f64 / n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_simulation_behaves() {
        let settings = Settings {
            runs: 40,
            max_requests: 30_000,
            ..Settings::default()
        };
        let scenarios = standard_scenarios();
        let aa = run_scenario(&scenarios[0], &settings);
        assert!(aa.rollback_rate <= 0.1, "{aa:?}");
        assert!(aa.naive_rollback_rate > aa.rollback_rate, "{aa:?}");
        let worse = scenarios
            .iter()
            .find(|s| s.name.starts_with("error rate"))
            .expect("scenario");
        let r = run_scenario(worse, &settings);
        assert!(r.rollback_rate >= 0.85, "{r:?}");
        let better = scenarios
            .iter()
            .find(|s| s.truth == "better")
            .expect("scenario");
        let r = run_scenario(better, &settings);
        assert!(r.promote_rate >= 0.85, "{r:?}");
    }
}
