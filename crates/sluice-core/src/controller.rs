//! The controller's decision for one running rollout at one evaluation tick.
//!
//! Pure: it is handed the state, the gates' verdicts and the facts, and says
//! what to do. The gateway applies the decision through the same state
//! machine (and history) as a person would, as actor `controller`.
//!
//! Rules, in order:
//! 1. any gate fails → the rollout's `on_failure` (rollback or pause), with
//!    the failing verdicts as the reason — in `auto` and `manual` mode alike;
//! 2. `auto` mode, every gate passes and the stage's own conditions hold
//!    (min duration, min requests, approvals) → advance (promote after the
//!    last stage);
//! 3. the stage has run for its `max_duration` without either → pause and
//!    ask a human;
//! 4. otherwise hold.
//!
//! Shadow stages serve nobody the candidate; their gates judge the mirrored
//! pairs instead (see [`crate::gate::evaluate_paired`]), by the same rules.

use crate::config::{ControllerMode, OnFailure, RolloutConfig};
use crate::gate::{Outcome, Verdict};
use crate::rollout::{Action, Facts, RolloutState, Status};

/// What the controller does now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing.
    Hold,
    /// Advance (or promote from the last stage).
    Advance {
        /// Why.
        reason: String,
    },
    /// A gate failed: roll back or pause.
    Fail {
        /// `Rollback` or `Pause`.
        action: Action,
        /// The failing verdicts.
        reason: String,
    },
    /// Undecided for too long: pause for a person.
    NeedsHuman {
        /// What is still open.
        reason: String,
    },
}

/// The gate blockers of a stage: what keeps it from advancing as far as the
/// gates are concerned.
pub fn gate_blockers(plan: &RolloutConfig, stage: usize, verdicts: &[Verdict]) -> Vec<String> {
    if plan.stages.get(stage).is_none() {
        return Vec::new();
    }
    verdicts
        .iter()
        .filter(|v| v.outcome != Outcome::Pass)
        .map(|v| format!("gate {}", v.summary))
        .collect()
}

/// Decides for one rollout.
pub fn decide(
    plan: &RolloutConfig,
    state: &RolloutState,
    verdicts: &[Verdict],
    facts: &Facts,
) -> Decision {
    if state.status != Status::Running {
        return Decision::Hold;
    }
    let Some(stage) = plan.stages.get(state.stage) else {
        return Decision::Hold;
    };
    let failing: Vec<&str> = verdicts
        .iter()
        .filter(|v| v.outcome == Outcome::Fail)
        .map(|v| v.summary.as_str())
        .collect();
    if !failing.is_empty() {
        let action = match plan.on_failure {
            OnFailure::Rollback => Action::Rollback,
            OnFailure::Pause => Action::Pause,
        };
        return Decision::Fail {
            action,
            reason: format!("gate failed: {}", failing.join("; ")),
        };
    }
    let mut f = facts.clone();
    f.gate_blockers = gate_blockers(plan, state.stage, verdicts);
    let blockers = state.blockers(plan, &f);
    if blockers.is_empty() && plan.controller == ControllerMode::Auto {
        let reason = if verdicts.is_empty() {
            "stage conditions met".to_string()
        } else {
            format!(
                "all gates pass: {}",
                verdicts
                    .iter()
                    .map(|v| v.summary.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        };
        return Decision::Advance { reason };
    }
    if let Some(max) = stage.max_duration {
        let max_ms = i64::try_from(max.as_millis()).unwrap_or(i64::MAX);
        if state.time_in_stage_ms(facts.now_ms) >= max_ms && !blockers.is_empty() {
            return Decision::NeedsHuman {
                reason: format!(
                    "needs a human: stage {} still undecided after {}: {}",
                    state.stage,
                    humantime::format_duration(max),
                    blockers.join("; ")
                ),
            };
        }
    }
    Decision::Hold
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GateConfig, Margin, Signal, StageConfig, StageKind, SubjectSource};
    use crate::gate::{evaluate, Method};
    use crate::signals::{Observation, StageAggregates};
    use proptest::prelude::*;
    use std::time::Duration;

    fn plan(min_samples: u64) -> RolloutConfig {
        let st = |bp| StageConfig {
            kind: StageKind::Percent { basis_points: bp },
            min_duration: Duration::ZERO,
            min_requests: 0,
            approval: vec![],
            max_duration: Some(Duration::from_secs(60)),
            require_suites: vec![],
        };
        RolloutConfig {
            name: "r".into(),
            deployment: "d".into(),
            candidate: "v2".into(),
            subject: SubjectSource::User,
            salt: "r".into(),
            stages: vec![st(1000), st(10_000)],
            on_failure: OnFailure::Rollback,
            fallback: crate::config::Fallback::Stable,
            gates: vec![
                GateConfig {
                    signal: Signal::ErrorRate,
                    max_regression: Margin::Absolute(0.01),
                    alpha: 0.05,
                    min_samples,
                },
                GateConfig {
                    signal: Signal::LatencyP95,
                    max_regression: Margin::Relative(0.2),
                    alpha: 0.05,
                    min_samples,
                },
            ],
            evaluate_every: Duration::from_secs(5),
            controller: ControllerMode::Auto,
        }
    }

    fn running(now: i64) -> RolloutState {
        RolloutState {
            status: Status::Running,
            stage: 0,
            started_ms: Some(0),
            stage_started_ms: 0,
            updated_ms: now,
            ..Default::default()
        }
    }

    proptest! {
        /// Whatever the traffic, the controller never advances while a gate
        /// fails or is undecided, and never fails a rollout before every
        /// failing gate has min_samples on both arms.
        #[test]
        fn never_advances_on_a_failing_gate_nor_acts_early(
            n_s in 0u64..400, n_c in 0u64..400,
            err_s in 0u64..40, err_c in 0u64..200,
            slow in 1.0f64..3.0, min_samples in 1u64..300, now in 0i64..120_000,
        ) {
            let p = plan(min_samples);
            let mut a = StageAggregates::default();
            for i in 0..n_s {
                a.stable.observe(&Observation { error: i < err_s, latency_ms: Some(100.0 + (i % 50) as f64), ..Default::default() });
            }
            for i in 0..n_c {
                a.candidate.observe(&Observation { error: i < err_c, latency_ms: Some((100.0 + (i % 50) as f64) * slow), ..Default::default() });
            }
            let verdicts: Vec<Verdict> = p.gates.iter().map(|g| evaluate(g, &a, Method::Sequential)).collect();
            let facts = Facts { now_ms: now, stage_requests: n_s + n_c, gate_blockers: vec![] };
            match decide(&p, &running(now), &verdicts, &facts) {
                Decision::Advance { .. } => {
                    prop_assert!(verdicts.iter().all(|v| v.outcome == Outcome::Pass));
                }
                Decision::Fail { action, .. } => {
                    prop_assert_eq!(action, Action::Rollback);
                    prop_assert!(verdicts.iter().any(|v| v.outcome == Outcome::Fail));
                }
                Decision::NeedsHuman { .. } => prop_assert!(now >= 60_000),
                Decision::Hold => {}
            }
            for v in &verdicts {
                if v.n_stable < min_samples || v.n_candidate < min_samples {
                    prop_assert_eq!(v.outcome, Outcome::Inconclusive);
                }
            }
        }
    }

    #[test]
    fn a_paused_rollout_is_left_alone_and_manual_mode_never_advances() {
        let mut p = plan(1);
        let mut s = running(0);
        s.status = Status::Paused;
        assert_eq!(decide(&p, &s, &[], &Facts::default()), Decision::Hold);
        p.controller = ControllerMode::Manual;
        p.gates.clear();
        assert_eq!(
            decide(
                &p,
                &running(0),
                &[],
                &Facts {
                    now_ms: 1,
                    ..Default::default()
                }
            ),
            Decision::Hold
        );
        p.controller = ControllerMode::Auto;
        assert!(matches!(
            decide(
                &p,
                &running(0),
                &[],
                &Facts {
                    now_ms: 1,
                    ..Default::default()
                }
            ),
            Decision::Advance { .. }
        ));
    }

    #[test]
    fn an_undecided_stage_asks_a_human_after_max_duration() {
        let p = plan(50);
        let mut a = StageAggregates::default();
        for i in 0..60u64 {
            a.stable.observe(&Observation {
                error: i % 10 == 0,
                latency_ms: Some(100.0),
                ..Default::default()
            });
            a.candidate.observe(&Observation {
                error: i % 8 == 0,
                latency_ms: Some(100.0),
                ..Default::default()
            });
        }
        let verdicts: Vec<Verdict> = p
            .gates
            .iter()
            .map(|g| evaluate(g, &a, Method::Sequential))
            .collect();
        assert!(verdicts.iter().all(|v| v.outcome == Outcome::Inconclusive));
        let early = Facts {
            now_ms: 30_000,
            stage_requests: 120,
            gate_blockers: vec![],
        };
        assert_eq!(decide(&p, &running(0), &verdicts, &early), Decision::Hold);
        let late = Facts {
            now_ms: 61_000,
            ..early
        };
        match decide(&p, &running(0), &verdicts, &late) {
            Decision::NeedsHuman { reason } => assert!(
                reason.contains("needs a human") && reason.contains("1m"),
                "{reason}"
            ),
            other => panic!("expected NeedsHuman, got {other:?}"),
        }
    }
}
