//! The controller: evaluates every running rollout's gates on its
//! `evaluate_every` tick and acts on the decision of
//! `sluice_core::controller::decide` through the same committed transition
//! path as a person (actor `controller`).
//!
//! A failing verdict leads to `on_failure` in the same tick it is computed,
//! and the rollback is visible to the next request once committed. Verdicts
//! are written to the verdict history when a gate's outcome changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::config::Role;
use sluice_core::controller::{decide, Decision};
use sluice_core::gate::Outcome;
use sluice_core::rollout::{Action, Actor, Facts, Status};

use crate::{now_ms, AppState};

/// The actor name the controller records.
pub const ACTOR: &str = "controller";

/// Runs until the task is aborted.
pub async fn run(app: Arc<AppState>) {
    let actor = Actor {
        name: ACTOR.to_string(),
        role: Role::Admin,
    };
    let mut last_eval: HashMap<String, Instant> = HashMap::new();
    let mut last_outcome: HashMap<(String, usize, i64, String), Outcome> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let rollouts = app.rollouts.load_full();
        for (name, e) in &rollouts.entries {
            if e.state.status != Status::Running {
                continue;
            }
            if last_eval
                .get(name)
                .is_some_and(|t| t.elapsed() < e.config.evaluate_every)
            {
                continue;
            }
            last_eval.insert(name.clone(), Instant::now());
            let verdicts = e.verdicts();
            let now = now_ms();
            for v in &verdicts {
                let k = (
                    name.clone(),
                    e.state.stage,
                    e.state.stage_started_ms,
                    v.signal.clone(),
                );
                if last_outcome.get(&k) != Some(&v.outcome) {
                    last_outcome.insert(k, v.outcome);
                    let store = app.store.clone();
                    let (n, stage, sig) = (name.clone(), e.state.stage as u32, v.signal.clone());
                    let outcome = serde_json::to_value(v.outcome)
                        .ok()
                        .and_then(|o| o.as_str().map(str::to_string))
                        .unwrap_or_default();
                    let json = serde_json::to_string(v).unwrap_or_default();
                    let res = tokio::task::spawn_blocking(move || {
                        store.put_verdict(&n, stage, now, &sig, &outcome, &json)
                    })
                    .await;
                    if let Ok(Err(err)) = res {
                        tracing::error!(rollout = name, "cannot record a gate verdict: {err}");
                    }
                }
            }
            let facts = Facts {
                now_ms: now,
                stage_requests: e.counters.total(),
                gate_blockers: Vec::new(),
            };
            let expect = Some((e.state.stage, e.state.stage_started_ms));
            let (action, reason, human) = match decide(&e.config, &e.state, &verdicts, &facts) {
                Decision::Hold => continue,
                Decision::Advance { reason } => (Action::Advance, reason, false),
                Decision::Fail { action, reason } => (action, reason, false),
                Decision::NeedsHuman { reason } => (Action::Pause, reason, true),
            };
            match crate::admin::transition(
                &app,
                name,
                action,
                &actor,
                Some(reason.clone()),
                expect,
                human,
            )
            .await
            {
                Ok(_) => tracing::info!(
                    rollout = name,
                    action = action.name(),
                    "controller: {reason}"
                ),
                Err(err) => tracing::warn!(
                    rollout = name,
                    action = action.name(),
                    "controller could not act: {}",
                    err.message
                ),
            }
        }
    }
}
