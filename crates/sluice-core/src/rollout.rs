//! The rollout state machine.
//!
//! ```text
//! pending ──start──> running(0) ──advance──> running(1) ── … ──advance──> promoted
//!                      │   ▲                                               │
//!                 pause│   │resume                                         │rollback
//!                      ▼   │                                               ▼
//!                     paused ──rollback──> rolled_back <──rollback── running(i)
//!            pending | running | paused ──abort──> aborted
//!            running | paused ──promote──> promoted
//! ```
//!
//! `advance` out of stage `i` needs the stage's `min_duration` (paused time
//! excluded), `min_requests` and approvals, plus whatever the gate evaluation
//! reports as blocking ([`Facts::gate_blockers`], the seam for statistical
//! gates). Advancing out of the last stage promotes. `rolled_back` and
//! `aborted` are final; `promoted` can still be rolled back (a fast way back
//! after a completed rollout). Everything here is pure: time and counts come
//! in as [`Facts`].

use serde::{Deserialize, Serialize};

use crate::config::{Role, RolloutConfig};

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Defined but not started: stable serves everyone.
    Pending,
    /// Exposing the candidate per the current stage.
    Running,
    /// Stopped in a stage: stable serves everyone until resumed.
    Paused,
    /// The candidate serves everyone.
    Promoted,
    /// Ended; stable serves everyone.
    RolledBack,
    /// Cancelled; stable serves everyone.
    Aborted,
}

impl Status {
    /// The status's name.
    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Promoted => "promoted",
            Status::RolledBack => "rolled_back",
            Status::Aborted => "aborted",
        }
    }

    /// Running or paused.
    pub fn is_active(self) -> bool {
        matches!(self, Status::Running | Status::Paused)
    }
}

/// Something a person (or the controller) asks a rollout to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// pending → running(0).
    Start,
    /// running(i) → running(i+1), or promoted from the last stage.
    Advance,
    /// running → paused.
    Pause,
    /// paused → running.
    Resume,
    /// running | paused | promoted → rolled_back.
    Rollback,
    /// running | paused → promoted.
    Promote,
    /// pending | running | paused → aborted.
    Abort,
    /// Records an approval of the current stage.
    Approve,
}

impl Action {
    /// All actions.
    pub const ALL: [Action; 8] = [
        Action::Start,
        Action::Advance,
        Action::Pause,
        Action::Resume,
        Action::Rollback,
        Action::Promote,
        Action::Abort,
        Action::Approve,
    ];

    /// The action's name.
    pub fn name(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Advance => "advance",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Rollback => "rollback",
            Action::Promote => "promote",
            Action::Abort => "abort",
            Action::Approve => "approve",
        }
    }

    /// Parses an action name.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == s)
    }

    /// The least role that may take this action (approvals are checked
    /// against the stage's requirements instead).
    pub fn required_role(self) -> Role {
        match self {
            Action::Approve => Role::Reviewer,
            _ => Role::Operator,
        }
    }
}

/// One approval of a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Who approved.
    pub actor: String,
    /// With which role.
    pub role: Role,
    /// When (unix ms).
    pub at_ms: i64,
}

/// The durable state of one rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// Where it is.
    pub status: Status,
    /// Current stage (the stage it was in when it ended, for final states).
    pub stage: usize,
    /// When it started (unix ms).
    pub started_ms: Option<i64>,
    /// When the current stage was entered (unix ms).
    pub stage_started_ms: i64,
    /// Paused time accumulated in the current stage, ms.
    pub paused_ms: i64,
    /// When the current pause began.
    pub paused_at_ms: Option<i64>,
    /// Approvals of the current stage.
    pub approvals: Vec<Approval>,
    /// When the state last changed (unix ms).
    pub updated_ms: i64,
    /// Set when the controller paused the rollout because its stage stayed
    /// undecided for its `max_duration`: what a person should look at.
    #[serde(default)]
    pub needs_human: Option<String>,
}

impl Default for RolloutState {
    fn default() -> Self {
        RolloutState {
            status: Status::Pending,
            stage: 0,
            started_ms: None,
            stage_started_ms: 0,
            paused_ms: 0,
            paused_at_ms: None,
            approvals: Vec::new(),
            updated_ms: 0,
            needs_human: None,
        }
    }
}

/// What the state machine is told about the world.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Now, unix ms.
    pub now_ms: i64,
    /// Requests served in the current stage (both variants).
    pub stage_requests: u64,
    /// Reasons the gates give for not advancing (empty: nothing blocks).
    pub gate_blockers: Vec<String>,
}

/// Who asks.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Name recorded in the history.
    pub name: String,
    /// Their role.
    pub role: Role,
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The actor's role is too low.
    #[error("`{action}` needs the {needed} role; {actor} has {has}")]
    Role {
        /// The action.
        action: &'static str,
        /// The role needed.
        needed: &'static str,
        /// The actor.
        actor: String,
        /// Their role.
        has: &'static str,
    },
    /// The action makes no sense in this state.
    #[error("cannot {action} a rollout that is {status}{hint}")]
    IllegalTransition {
        /// The action.
        action: &'static str,
        /// The current status.
        status: &'static str,
        /// What to do instead.
        hint: String,
    },
    /// The stage's conditions do not hold yet.
    #[error("stage {stage} cannot advance yet: {}", .reasons.join("; "))]
    NotReady {
        /// The stage index.
        stage: usize,
        /// Everything still missing.
        reasons: Vec<String>,
    },
    /// The approval is not needed or not allowed.
    #[error("{0}")]
    Approval(String),
}

/// A recorded change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// What was done.
    pub action: Action,
    /// Status before.
    pub from_status: Status,
    /// Stage before (the stage it left).
    pub from_stage: usize,
    /// Status after.
    pub to_status: Status,
    /// Stage after.
    pub to_stage: usize,
}

fn fmt_ms(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl RolloutState {
    /// Time spent in the current stage, paused time excluded.
    pub fn time_in_stage_ms(&self, now_ms: i64) -> i64 {
        if !self.status.is_active() {
            return 0;
        }
        let paused_now = self.paused_at_ms.map(|p| now_ms - p).unwrap_or(0);
        (now_ms - self.stage_started_ms - self.paused_ms - paused_now).max(0)
    }

    /// Required approvals of the current stage not yet given.
    pub fn missing_approvals(&self, plan: &RolloutConfig) -> Vec<Role> {
        let Some(stage) = plan.stages.get(self.stage) else {
            return Vec::new();
        };
        let mut needed = stage.approval.clone();
        needed.sort_unstable_by(|a, b| b.cmp(a));
        let mut given: Vec<Role> = self.approvals.iter().map(|a| a.role).collect();
        given.sort_unstable_by(|a, b| b.cmp(a));
        let mut missing = Vec::new();
        for need in needed {
            // The weakest approval that still satisfies this requirement.
            match given.iter().rposition(|g| *g >= need) {
                Some(i) => {
                    given.remove(i);
                }
                None => missing.push(need),
            }
        }
        missing
    }

    /// Everything that keeps the current stage from advancing now.
    pub fn blockers(&self, plan: &RolloutConfig, facts: &Facts) -> Vec<String> {
        let mut out = Vec::new();
        if self.status != Status::Running {
            out.push(format!("the rollout is {}", self.status.name()));
            return out;
        }
        let Some(stage) = plan.stages.get(self.stage) else {
            out.push("the plan has no such stage".into());
            return out;
        };
        let in_stage = self.time_in_stage_ms(facts.now_ms);
        let min = i64::try_from(stage.min_duration.as_millis()).unwrap_or(i64::MAX);
        if in_stage < min {
            out.push(format!(
                "min_duration: {} of {} spent in stage",
                fmt_ms(in_stage),
                fmt_ms(min)
            ));
        }
        if facts.stage_requests < stage.min_requests {
            out.push(format!(
                "min_requests: {} of {} requests served in stage",
                facts.stage_requests, stage.min_requests
            ));
        }
        let missing = self.missing_approvals(plan);
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|r| r.name()).collect();
            out.push(format!("approval needed from: {}", names.join(", ")));
        }
        out.extend(facts.gate_blockers.iter().cloned());
        out
    }

    fn enter_stage(&mut self, stage: usize, now_ms: i64) {
        self.stage = stage;
        self.stage_started_ms = now_ms;
        self.paused_ms = 0;
        self.paused_at_ms = None;
        self.approvals.clear();
    }

    fn illegal(&self, action: Action, hint: &str) -> Refusal {
        Refusal::IllegalTransition {
            action: action.name(),
            status: self.status.name(),
            hint: if hint.is_empty() {
                String::new()
            } else {
                format!(" ({hint})")
            },
        }
    }

    /// Applies an action, returning the new state and the transition to
    /// record, or why it is refused. The state itself is never modified.
    pub fn apply(
        &self,
        plan: &RolloutConfig,
        action: Action,
        actor: &Actor,
        facts: &Facts,
    ) -> Result<(RolloutState, Transition), Refusal> {
        let needed = action.required_role();
        if actor.role < needed {
            return Err(Refusal::Role {
                action: action.name(),
                needed: needed.name(),
                actor: actor.name.clone(),
                has: actor.role.name(),
            });
        }
        let now = facts.now_ms;
        let mut next = self.clone();
        let last = plan.stages.len().saturating_sub(1);
        use Status::*;
        match (action, self.status) {
            (Action::Start, Pending) => {
                next.status = Running;
                next.started_ms = Some(now);
                next.enter_stage(0, now);
            }
            (Action::Start, _) => {
                return Err(self.illegal(
                    action,
                    "a rollout runs once; define a new rollout to try again",
                ))
            }
            (Action::Advance, Running) => {
                let reasons = self.blockers(plan, facts);
                if !reasons.is_empty() {
                    return Err(Refusal::NotReady {
                        stage: self.stage,
                        reasons,
                    });
                }
                if self.stage >= last {
                    next.status = Promoted;
                    next.paused_at_ms = None;
                } else {
                    next.enter_stage(self.stage + 1, now);
                }
            }
            (Action::Advance, Paused) => return Err(self.illegal(action, "resume it first")),
            (Action::Advance, Pending) => return Err(self.illegal(action, "start it first")),
            (Action::Pause, Running) => {
                next.status = Paused;
                next.paused_at_ms = Some(now);
            }
            (Action::Resume, Paused) => {
                next.status = Running;
                if let Some(p) = self.paused_at_ms {
                    next.paused_ms += (now - p).max(0);
                }
                next.paused_at_ms = None;
            }
            (Action::Rollback, Running | Paused | Promoted) => {
                next.status = RolledBack;
                next.paused_at_ms = None;
            }
            (Action::Rollback, Pending) => {
                return Err(self.illegal(action, "nothing was exposed; abort it instead"))
            }
            (Action::Promote, Running | Paused) => {
                next.status = Promoted;
                next.paused_at_ms = None;
            }
            (Action::Abort, Pending | Running | Paused) => {
                next.status = Aborted;
                next.paused_at_ms = None;
            }
            (Action::Approve, Running | Paused) => {
                if self.approvals.iter().any(|a| a.actor == actor.name) {
                    return Err(Refusal::Approval(format!(
                        "{} already approved stage {}",
                        actor.name, self.stage
                    )));
                }
                let missing = self.missing_approvals(plan);
                if missing.is_empty() {
                    return Err(Refusal::Approval(format!(
                        "stage {} needs no (more) approval",
                        self.stage
                    )));
                }
                if !missing.iter().any(|m| actor.role >= *m) {
                    let names: Vec<&str> = missing.iter().map(|r| r.name()).collect();
                    return Err(Refusal::Role {
                        action: "approve",
                        needed: missing.iter().min().map(|r| r.name()).unwrap_or("operator"),
                        actor: format!(
                            "{} (stage {} still needs: {})",
                            actor.name,
                            self.stage,
                            names.join(", ")
                        ),
                        has: actor.role.name(),
                    });
                }
                next.approvals.push(Approval {
                    actor: actor.name.clone(),
                    role: actor.role,
                    at_ms: now,
                });
            }
            (_, _) => return Err(self.illegal(action, "")),
        }
        next.updated_ms = now;
        if action != Action::Approve {
            next.needs_human = None;
        }
        let t = Transition {
            action,
            from_status: self.status,
            from_stage: self.stage,
            to_status: next.status,
            to_stage: next.stage,
        };
        Ok((next, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OnFailure, StageConfig, StageKind, SubjectSource};
    use proptest::prelude::*;
    use std::time::Duration;

    fn plan() -> RolloutConfig {
        let st = |kind, secs, reqs, approval: Vec<Role>| StageConfig {
            kind,
            min_duration: Duration::from_secs(secs),
            min_requests: reqs,
            approval,
            max_duration: None,
            require_suites: vec![],
        };
        RolloutConfig {
            name: "r".into(),
            deployment: "d".into(),
            candidate: "v2".into(),
            subject: SubjectSource::User,
            salt: "r".into(),
            stages: vec![
                st(StageKind::Shadow(Default::default()), 10, 5, vec![]),
                st(
                    StageKind::Percent { basis_points: 500 },
                    0,
                    0,
                    vec![Role::Operator, Role::Admin],
                ),
                st(
                    StageKind::Percent {
                        basis_points: 10_000,
                    },
                    0,
                    0,
                    vec![],
                ),
            ],
            on_failure: OnFailure::Rollback,
            fallback: crate::config::Fallback::Stable,
            gates: vec![],
            evaluate_every: Duration::from_secs(5),
            controller: crate::config::ControllerMode::Manual,
        }
    }

    fn op() -> Actor {
        Actor {
            name: "ops".into(),
            role: Role::Operator,
        }
    }

    fn at(now_ms: i64, stage_requests: u64) -> Facts {
        Facts {
            now_ms,
            stage_requests,
            gate_blockers: vec![],
        }
    }

    #[test]
    fn walks_a_plan_with_conditions_and_approvals() {
        let p = plan();
        let s = RolloutState::default();
        let (s, t) = s
            .apply(&p, Action::Start, &op(), &at(1000, 0))
            .expect("start");
        assert_eq!(
            (t.from_status, t.to_status, s.stage),
            (Status::Pending, Status::Running, 0)
        );
        let e = s
            .apply(&p, Action::Advance, &op(), &at(5000, 2))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("min_duration: 4s of 10s") && msg.contains("min_requests: 2 of 5"),
            "{msg}"
        );
        // Paused time does not count toward min_duration.
        let (s, _) = s
            .apply(&p, Action::Pause, &op(), &at(5000, 2))
            .expect("pause");
        let (s, _) = s
            .apply(&p, Action::Resume, &op(), &at(20_000, 2))
            .expect("resume");
        assert_eq!(s.time_in_stage_ms(20_000), 4000);
        let (s, t) = s
            .apply(&p, Action::Advance, &op(), &at(26_000, 5))
            .expect("advance");
        assert_eq!((t.from_stage, t.to_stage), (0, 1));
        // Stage 1 needs an operator and an admin.
        let e = s
            .apply(&p, Action::Advance, &op(), &at(27_000, 0))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("approval needed from: admin, operator"),
            "{e}"
        );
        let viewer = Actor {
            name: "v".into(),
            role: Role::Viewer,
        };
        assert!(matches!(
            s.apply(&p, Action::Approve, &viewer, &at(27_000, 0)),
            Err(Refusal::Role { .. })
        ));
        let (s, _) = s
            .apply(&p, Action::Approve, &op(), &at(27_000, 0))
            .expect("approve");
        assert!(
            s.apply(&p, Action::Approve, &op(), &at(27_000, 0)).is_err(),
            "same actor twice"
        );
        let other_op = Actor {
            name: "ops2".into(),
            role: Role::Operator,
        };
        assert!(matches!(
            s.apply(&p, Action::Approve, &other_op, &at(27_000, 0)),
            Err(Refusal::Role { .. })
        ));
        let admin = Actor {
            name: "root".into(),
            role: Role::Admin,
        };
        let (s, _) = s
            .apply(&p, Action::Approve, &admin, &at(27_000, 0))
            .expect("approve");
        let (s, _) = s
            .apply(&p, Action::Advance, &op(), &at(28_000, 0))
            .expect("advance");
        assert_eq!(s.stage, 2);
        assert!(s.approvals.is_empty());
        // Advancing out of the last stage promotes; a promoted rollout can still roll back.
        let (s, t) = s
            .apply(&p, Action::Advance, &op(), &at(29_000, 0))
            .expect("promote");
        assert_eq!(t.to_status, Status::Promoted);
        let (s, _) = s
            .apply(&p, Action::Rollback, &op(), &at(30_000, 0))
            .expect("rollback");
        let e = s
            .apply(&p, Action::Resume, &op(), &at(31_000, 0))
            .unwrap_err();
        assert_eq!(e.to_string(), "cannot resume a rollout that is rolled_back");
    }

    #[test]
    fn refusals_say_why() {
        let p = plan();
        let s = RolloutState::default();
        let viewer = Actor {
            name: "v".into(),
            role: Role::Viewer,
        };
        let e = s.apply(&p, Action::Start, &viewer, &at(0, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`start` needs the operator role; v has viewer"
        );
        let e = s.apply(&p, Action::Advance, &op(), &at(0, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot advance a rollout that is pending (start it first)"
        );
        let e = s.apply(&p, Action::Rollback, &op(), &at(0, 0)).unwrap_err();
        assert!(e.to_string().contains("abort it instead"));
    }

    fn action() -> impl Strategy<Value = Action> {
        proptest::sample::select(Action::ALL.to_vec())
    }

    fn role() -> impl Strategy<Value = Role> {
        proptest::sample::select(vec![
            Role::Viewer,
            Role::Reviewer,
            Role::Operator,
            Role::Admin,
        ])
    }

    proptest! {
        /// Under any sequence of commands, by anyone, at any pace, the state
        /// stays legal and every accepted transition is one the diagram allows.
        #[test]
        fn never_reaches_an_illegal_state(
            steps in proptest::collection::vec((action(), role(), 0i64..20_000, 0u64..10, 0usize..3), 0..60)
        ) {
            let p = plan();
            let mut s = RolloutState::default();
            let mut now = 0i64;
            for (a, r, dt, reqs, who) in steps {
                now += dt;
                let actor = Actor { name: format!("actor{who}"), role: r };
                let before = s.clone();
                match s.apply(&p, a, &actor, &at(now, reqs)) {
                    Ok((next, t)) => {
                        prop_assert!(r >= a.required_role());
                        prop_assert_eq!(t.from_status, before.status);
                        let allowed = matches!(
                            (a, before.status, next.status),
                            (Action::Start, Status::Pending, Status::Running)
                                | (Action::Advance, Status::Running, Status::Running | Status::Promoted)
                                | (Action::Pause, Status::Running, Status::Paused)
                                | (Action::Resume, Status::Paused, Status::Running)
                                | (Action::Rollback, Status::Running | Status::Paused | Status::Promoted, Status::RolledBack)
                                | (Action::Promote, Status::Running | Status::Paused, Status::Promoted)
                                | (Action::Abort, Status::Pending | Status::Running | Status::Paused, Status::Aborted)
                                | (Action::Approve, Status::Running, Status::Running)
                                | (Action::Approve, Status::Paused, Status::Paused)
                        );
                        prop_assert!(allowed, "{:?} from {:?} to {:?}", a, before.status, next.status);
                        if a == Action::Advance && next.status == Status::Running {
                            prop_assert_eq!(next.stage, before.stage + 1);
                        }
                        s = next;
                    }
                    Err(_) => prop_assert_eq!(&s, &before),
                }
                prop_assert!(s.stage < p.stages.len());
                prop_assert_eq!(s.paused_at_ms.is_some(), s.status == Status::Paused);
                prop_assert!(s.time_in_stage_ms(now) >= 0);
                prop_assert!(s.approvals.len() <= p.stages[s.stage].approval.len());
                if matches!(s.status, Status::RolledBack | Status::Aborted) {
                    // Final: nothing moves it any more.
                    for a in Action::ALL {
                        let admin = Actor { name: "root".into(), role: Role::Admin };
                        prop_assert!(s.apply(&p, a, &admin, &at(now + 1_000_000, 1000)).is_err());
                    }
                }
            }
        }
    }
}
