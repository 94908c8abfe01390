//! The admin API: rollout status and transitions, and config reload.
//!
//! Every route needs `Authorization: Bearer ADMIN_TOKEN`. Roles are ordered
//! viewer < reviewer < operator < admin; a request below the role it needs
//! gets 403 naming that role. Errors use the same JSON shape as the rest of
//! the API.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use sluice_core::config::Role;
use sluice_core::controller::gate_blockers;
use sluice_core::rollout::{Action, Actor, Facts, Refusal, Status};
use sluice_core::Config;
use sluice_store::RolloutEvent;

use crate::error::ApiError;
use crate::rollouts::{RolloutEntry, Rollouts};
use crate::snapshot::{AdminToken, Snapshot};
use crate::{now_ms, AppState};

fn api(
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: impl Into<String>,
) -> ApiError {
    ApiError {
        status,
        kind,
        message: message.into(),
        param: None,
        code: Some(code),
        retry_after: None,
        record_kind: code,
    }
}

/// Authenticates an admin token and checks its role.
fn authorize(
    snap: &Snapshot,
    headers: &HeaderMap,
    needed: Role,
    what: &str,
) -> Result<AdminToken, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(presented) = presented else {
        return Err(ApiError::unauthorized(
            "The admin API needs an admin token: Authorization: Bearer TOKEN (see [[admin_tokens]]).",
        ));
    };
    let Some(token) = snap.authenticate_admin(presented) else {
        return Err(ApiError::unauthorized("Unknown admin token."));
    };
    if token.role < needed {
        return Err(ApiError::forbidden(format!(
            "{what} needs the {} role; token \"{}\" has {}.",
            needed.name(),
            token.name,
            token.role.name()
        )));
    }
    Ok(token.clone())
}

/// One arm's signals as JSON.
fn arm_json(a: &sluice_core::signals::ArmAggregates) -> Value {
    let q = |h: &sluice_core::signals::LogHistogram| json!({"p50": h.quantile(0.5), "p95": h.quantile(0.95), "p99": h.quantile(0.99), "n": h.count()});
    json!({
        "requests": a.requests,
        "error_rate": a.errors.mean(),
        "refusal_rate": (a.refusals.n > 0).then(|| a.refusals.mean()),
        "latency_ms": q(&a.latency),
        "ttft_ms": q(&a.ttft),
        "cost_per_request": (a.cost.n > 0).then_some(a.cost.mean),
        "output_tokens": (a.output_tokens.n > 0).then_some(a.output_tokens.mean),
        "feedback": {"thumbs": a.thumbs_down.n, "down_rate": (a.thumbs_down.n > 0).then(|| a.thumbs_down.mean()), "mean_score": (a.scores.n > 0).then_some(a.scores.mean)},
        "flag_rates": a.flags.iter().map(|(k, b)| (k.clone(), json!(b.mean()))).collect::<serde_json::Map<String, Value>>(),
    })
}

/// The JSON view of one rollout.
pub fn view(snap: &Snapshot, e: &RolloutEntry, now: i64) -> Value {
    let c = &e.config;
    let stable = snap
        .config
        .deployments
        .get(&c.deployment)
        .map(|d| d.stable.clone())
        .unwrap_or_default();
    let verdicts = e.verdicts();
    let facts = Facts {
        now_ms: now,
        stage_requests: e.counters.total(),
        gate_blockers: gate_blockers(c, e.state.stage, &verdicts),
    };
    let stages: Vec<Value> = c
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "index": i,
                "label": s.kind.label(),
                "min_duration_ms": s.min_duration.as_millis() as u64,
                "min_requests": s.min_requests,
                "approval": s.approval.iter().map(|r| r.name()).collect::<Vec<_>>(),
                "require_suites": s.require_suites.iter().map(|r| json!({"suite": r.suite, "min_pass_rate": r.min_pass_rate})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "name": c.name,
        "deployment": c.deployment,
        "stable": stable,
        "candidate": c.candidate,
        "status": e.state.status.name(),
        "stage": e.state.stage,
        "stage_label": c.stages.get(e.state.stage).map(|s| s.kind.label()),
        "stages": stages,
        "started_ms": e.state.started_ms,
        "stage_started_ms": e.state.stage_started_ms,
        "time_in_stage_ms": e.state.time_in_stage_ms(now),
        "requests": {
            "stable": e.counters.stable.load(std::sync::atomic::Ordering::Relaxed),
            "candidate": e.counters.candidate.load(std::sync::atomic::Ordering::Relaxed),
        },
        "shadow": if e.in_shadow() && e.state.status.is_active() {
            let sh = &e.counters.shadow;
            let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            json!({
                "mirrored": ld(&sh.mirrored),
                "skipped_full": ld(&sh.skipped),
                "failed": ld(&sh.failed),
                "paired": ld(&sh.paired),
                "in_flight": sh.in_flight(),
            })
        } else {
            Value::Null
        },
        "approvals": e.state.approvals,
        "blockers": if e.state.status.is_active() { e.state.blockers(c, &facts) } else { Vec::new() },
        "on_failure": match c.on_failure { sluice_core::config::OnFailure::Rollback => "rollback", sluice_core::config::OnFailure::Pause => "pause" },
        "updated_ms": e.state.updated_ms,
        "needs_human": e.state.needs_human,
        "controller": match c.controller { sluice_core::config::ControllerMode::Auto => "auto", sluice_core::config::ControllerMode::Manual => "manual" },
        "evaluate_every_ms": c.evaluate_every.as_millis() as u64,
        "gates": if e.state.status.is_active() { json!(verdicts) } else { json!([]) },
        "signals": if e.state.status.is_active() {
            let a = e.aggregates.lock().unwrap_or_else(|p| p.into_inner());
            json!({"stable": arm_json(&a.stable), "candidate": arm_json(&a.candidate)})
        } else {
            Value::Null
        },
    })
}

/// `GET /admin/rollouts`.
pub async fn list(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let snap = app.snapshot.load();
    if let Err(e) = authorize(&snap, &headers, Role::Viewer, "listing rollouts") {
        return e.into_response();
    }
    let now = now_ms();
    let r = app.rollouts.load();
    let data: Vec<Value> = r.entries.values().map(|e| view(&snap, e, now)).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /admin/providers`: each provider's circuit breaker, retry budget use
/// and call counters.
pub async fn providers(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let snap = app.snapshot.load();
    if let Err(e) = authorize(&snap, &headers, Role::Viewer, "reading provider health") {
        return e.into_response();
    }
    let data: Vec<Value> = snap
        .providers
        .values()
        .map(|u| {
            let mut v = serde_json::to_value(u.health.view()).unwrap_or(Value::Null);
            v["kind"] = json!(u.kind());
            v
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

fn unknown_rollout(name: &str, r: &Rollouts) -> ApiError {
    let known: Vec<&str> = r.entries.keys().map(String::as_str).collect();
    api(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "rollout_not_found",
        format!(
            "No rollout named `{name}` ({}).",
            if known.is_empty() {
                "none are configured".to_string()
            } else {
                format!("known: {}", known.join(", "))
            }
        ),
    )
}

/// `GET /admin/rollouts/{name}`: status plus history.
pub async fn show(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let snap = app.snapshot.load();
    if let Err(e) = authorize(&snap, &headers, Role::Viewer, "reading a rollout") {
        return e.into_response();
    }
    let r = app.rollouts.load();
    let Some(e) = r.entries.get(&name) else {
        return unknown_rollout(&name, &r).into_response();
    };
    let mut v = view(&snap, e, now_ms());
    let store = app.store.clone();
    let n = name.clone();
    let history = tokio::task::spawn_blocking(move || {
        store
            .rollout_history(&n)
            .and_then(|h| Ok((h, store.verdict_history(&n, 500)?)))
    })
    .await;
    match history {
        Ok(Ok((h, verdicts))) => {
            v["history"] = json!(h);
            v["verdict_history"] = json!(verdicts);
        }
        Ok(Err(err)) => return ApiError::store(&err).into_response(),
        Err(err) => return ApiError::internal(&err).into_response(),
    }
    Json(v).into_response()
}

async fn reason_from(body: Body) -> Result<Option<String>, ApiError> {
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|e| ApiError::unreadable_body(&e))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(sluice_core::chat::InvalidRequest {
            param: None,
            message: format!("The body must be JSON like {{\"reason\": \"...\"}}: {e}"),
        })
    })?;
    let Value::Object(m) = v else {
        return Err(ApiError::invalid(sluice_core::chat::InvalidRequest {
            param: None,
            message: "The body must be a JSON object like {\"reason\": \"...\"}.".into(),
        }));
    };
    for k in m.keys() {
        if k != "reason" {
            return Err(ApiError::invalid(sluice_core::chat::InvalidRequest {
                param: Some(k.clone()),
                message: format!("Unrecognized argument: {k} (only \"reason\" is accepted)."),
            }));
        }
    }
    match m.get("reason") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(sluice_core::chat::InvalidRequest {
            param: Some("reason".into()),
            message: "'reason' must be a string.".into(),
        })),
    }
}

/// `POST /admin/rollouts/{name}/{action}` with an optional `{"reason": "..."}`.
pub async fn act(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
    body: Body,
) -> Response {
    match act_inner(&app, &headers, &name, &action, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn act_inner(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    name: &str,
    action: &str,
    body: Body,
) -> Result<Value, ApiError> {
    let snap = app.snapshot.load_full();
    let Some(action) = Action::parse(action) else {
        return Err(api(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_action",
            format!(
                "Unknown rollout action `{action}` (known: {}).",
                Action::ALL.map(|a| a.name()).join(", ")
            ),
        ));
    };
    // Approvals are checked against the stage's requirements by the state
    // machine; everything else needs at least the action's role here.
    let token = authorize(
        &snap,
        headers,
        action.required_role(),
        &format!("`{}`", action.name()),
    )?;
    let reason = reason_from(body).await?;
    let actor = Actor {
        name: token.name.clone(),
        role: token.role,
    };
    transition(app, name, action, &actor, reason, None, false).await
}

/// What the state machine is told about a rollout's current stage.
fn facts(entry: &RolloutEntry, now: i64) -> Facts {
    let verdicts = entry.verdicts();
    Facts {
        now_ms: now,
        stage_requests: entry.counters.total(),
        gate_blockers: gate_blockers(&entry.config, entry.state.stage, &verdicts),
    }
}

/// Whether a transition (to `next`, recorded as `t`) opens a stage that
/// requires probe suites.
fn opens_suite_stage(
    entry: &RolloutEntry,
    action: Action,
    next: &sluice_core::rollout::RolloutState,
    t: &sluice_core::rollout::Transition,
) -> bool {
    let opens =
        next.status == Status::Running && (t.to_stage != t.from_stage || action == Action::Start);
    opens
        && entry
            .config
            .stages
            .get(next.stage)
            .is_some_and(|s| !s.require_suites.is_empty())
}

/// The stage whose probe suites `action` would need to pass, if the rollout
/// stays as it is now.
fn suite_stage(entry: &RolloutEntry, action: Action, actor: &Actor, now: i64) -> Option<usize> {
    let (next, t) = entry
        .state
        .apply(&entry.config, action, actor, &facts(entry, now))
        .ok()?;
    opens_suite_stage(entry, action, &next, &t).then_some(next.stage)
}

/// Applies an action to a rollout as `actor`: decides through the state
/// machine (with the gates' current verdicts as blockers), commits the new
/// state and its history entry to the store, then makes it visible to the
/// very next request. Used by the admin API and by the controller alike.
/// `expect_stage` (controller only) refuses the action if the rollout moved
/// on since the decision was taken.
pub async fn transition(
    app: &Arc<AppState>,
    name: &str,
    action: Action,
    actor: &Actor,
    reason: Option<String>,
    expect_stage: Option<(usize, i64)>,
    needs_human: bool,
) -> Result<Value, ApiError> {
    let snap = app.snapshot.load_full();
    // Probe suites call models and can take minutes: they run before the
    // admin lock is taken, so no rollback, pause or reload (of this rollout
    // or any other) waits for them. Their result holds only if the rollout
    // is still where it was when they started.
    let mut suites = None;
    {
        let current = app.rollouts.load_full();
        if let Some(entry) = current.entries.get(name) {
            if let Some(stage) = suite_stage(entry, action, actor, now_ms()) {
                let result = crate::eval::stage_suites(app, &snap, &entry.config, stage).await;
                suites = Some((entry.config.clone(), entry.version, stage, result));
            }
        }
    }
    let _guard = app.admin_lock.lock().await;
    let current = app.rollouts.load_full();
    let Some(entry) = current.entries.get(name) else {
        return Err(unknown_rollout(name, &current));
    };
    if let Some((stage, started)) = expect_stage {
        if entry.state.stage != stage
            || entry.state.stage_started_ms != started
            || entry.state.status != Status::Running
        {
            return Err(api(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "stale_decision",
                "the rollout moved on",
            ));
        }
    }
    if action == Action::Start {
        if let Some(other) = current.active_for(&entry.config.deployment, name) {
            return Err(api(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "rollout_conflict",
                format!(
                    "Deployment `{}` already has an active rollout `{other}`; finish, roll back or abort it first.",
                    entry.config.deployment
                ),
            ));
        }
    }
    let now = now_ms();
    let facts = facts(entry, now);
    let (mut next, t) = entry
        .state
        .apply(&entry.config, action, actor, &facts)
        .map_err(|r| match r {
            Refusal::Role { .. } => ApiError::forbidden(r.to_string()),
            _ => api(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "transition_refused",
                r.to_string(),
            ),
        })?;
    let mut reason = reason;
    let mut action = action;
    let mut t = t;
    // A stage that requires probe suites opens only when they pass. A person
    // is refused; the controller applies the rollout's `on_failure` instead,
    // as for any failing gate.
    if opens_suite_stage(entry, action, &next, &t) {
        let result = match suites {
            Some((config, version, stage, result))
                if Arc::ptr_eq(&config, &entry.config)
                    && version == entry.version
                    && stage == next.stage =>
            {
                result
            }
            _ => {
                return Err(api(
                    StatusCode::CONFLICT,
                    "invalid_request_error",
                    "stale_decision",
                    "the rollout changed while its probe suites ran; look at it again before repeating the action",
                ))
            }
        };
        if let Err(why) = result {
            if actor.name != crate::controller::ACTOR {
                return Err(api(
                    StatusCode::CONFLICT,
                    "invalid_request_error",
                    "suite_failed",
                    format!("stage {} cannot open: {why}", next.stage),
                ));
            }
            action = match entry.config.on_failure {
                sluice_core::config::OnFailure::Rollback => Action::Rollback,
                sluice_core::config::OnFailure::Pause => Action::Pause,
            };
            reason = Some(format!(
                "gate failed: stage {} cannot open: {why}",
                next.stage
            ));
            let (n2, t2) = entry
                .state
                .apply(&entry.config, action, actor, &facts)
                .map_err(|r| {
                    api(
                        StatusCode::CONFLICT,
                        "invalid_request_error",
                        "transition_refused",
                        r.to_string(),
                    )
                })?;
            next = n2;
            t = t2;
        }
    }
    if needs_human {
        next.needs_human = reason.clone();
    }
    let event = RolloutEvent {
        ts_ms: now,
        actor: actor.name.clone(),
        role: actor.role.name().to_string(),
        action: action.name().to_string(),
        reason,
        from_status: t.from_status.name().to_string(),
        from_stage: u32::try_from(t.from_stage).unwrap_or(u32::MAX),
        to_status: t.to_status.name().to_string(),
        to_stage: u32::try_from(t.to_stage).unwrap_or(u32::MAX),
    };
    let store = app.store.clone();
    let (rn, dep, cand, expected, st) = (
        name.to_string(),
        entry.config.deployment.clone(),
        entry.config.candidate.clone(),
        entry.version,
        next.clone(),
    );
    let version = tokio::task::spawn_blocking(move || {
        store.commit_rollout(&rn, &dep, &cand, expected, &st, &event)
    })
    .await
    .map_err(|e| ApiError::internal(&e))?
    .map_err(|e| ApiError::store(&e))?;
    // Committed: now make it visible to the very next request.
    let mut updated = RolloutEntry {
        config: entry.config.clone(),
        state: next,
        version: Some(version),
        counters: entry.counters.clone(),
        aggregates: entry.aggregates.clone(),
    };
    if updated.state.stage != entry.state.stage
        || updated.state.stage_started_ms != entry.state.stage_started_ms
    {
        updated.fresh_stage();
    }
    let new_view = current.with(name, updated);
    let v = new_view
        .entries
        .get(name)
        .map(|e| view(&snap, e, now))
        .unwrap_or(Value::Null);
    app.rollouts.store(Arc::new(new_view));
    tracing::info!(
        rollout = name,
        action = action.name(),
        actor = actor.name,
        from = format!("{}:{}", t.from_status.name(), t.from_stage),
        to = format!("{}:{}", t.to_status.name(), t.to_stage),
        "rollout transition"
    );
    Ok(v)
}

/// Re-reads the config file, validates and compiles it, and swaps it in; on
/// any problem the running configuration stays and the problems are returned.
pub async fn reload(app: &Arc<AppState>) -> Result<(), Vec<String>> {
    let Some(path) = app.config_path.clone() else {
        return Err(vec![
            "this gateway was not started from a config file; nothing to reload".into(),
        ]);
    };
    let _guard = app.admin_lock.lock().await;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
    let mut config = Config::parse(&text)
        .map_err(|e| e.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let old = app.snapshot.load_full();
    // Where it listens and stores cannot change without a restart.
    let mut notes = Vec::new();
    if config.listen != old.config.listen {
        notes.push(format!(
            "listen changed to {} (takes effect on restart)",
            config.listen
        ));
        config.listen = old.config.listen;
    }
    if config.store != old.config.store {
        notes.push("[store] changed (takes effect on restart)".to_string());
        config.store = old.config.store.clone();
    }
    if config.admin_listen != old.config.admin_listen {
        notes.push("admin_listen changed (takes effect on restart)".to_string());
        config.admin_listen = old.config.admin_listen;
    }
    if config.limits.max_header_bytes != old.config.limits.max_header_bytes
        || config.limits.header_timeout != old.config.limits.header_timeout
        || config.limits.keep_alive_timeout != old.config.limits.keep_alive_timeout
    {
        notes.push(
            "max_header_bytes / header_timeout / keep_alive_timeout changed (take effect on restart)"
                .to_string(),
        );
    }
    if config.limits.listen_backlog != old.config.limits.listen_backlog {
        notes.push("listen_backlog changed (takes effect on restart)".to_string());
    }
    if config.limits.max_connections != old.config.limits.max_connections {
        notes.push("max_connections changed (takes effect on restart)".to_string());
    }
    if config.limits.workers != old.config.limits.workers {
        notes.push("workers changed (takes effect on restart)".to_string());
    }
    let store = app.store.clone();
    let prev = app.rollouts.load_full();
    let cfg = config.clone();
    let rollouts = tokio::task::spawn_blocking(move || Rollouts::load(&cfg, &store, Some(&prev)))
        .await
        .map_err(|e| vec![e.to_string()])??;
    let base = path.parent().map(|p| p.to_path_buf());
    let snapshot =
        Snapshot::build_after(config, app.secrets.as_ref(), base.as_deref(), Some(&old))?;
    app.metrics.set_health(
        snapshot
            .providers
            .values()
            .map(|u| u.health.clone())
            .collect(),
    );
    app.snapshot.store(Arc::new(snapshot));
    app.rollouts.store(Arc::new(rollouts));
    for n in notes {
        tracing::warn!("{n}");
    }
    Ok(())
}

/// `POST /admin/reload` (admin role).
pub async fn reload_handler(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let snap = app.snapshot.load();
    if let Err(e) = authorize(&snap, &headers, Role::Admin, "reloading the configuration") {
        return e.into_response();
    }
    drop(snap);
    match reload(&app).await {
        Ok(()) => {
            let snap = app.snapshot.load();
            Json(json!({
                "reloaded": true,
                "deployments": snap.deployments.keys().collect::<Vec<_>>(),
                "rollouts": app.rollouts.load().entries.keys().cloned().collect::<Vec<_>>(),
            }))
            .into_response()
        }
        Err(problems) => {
            let mut e = api(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "invalid_config",
                format!(
                    "The new configuration was refused; still serving the previous one. Problems: {}",
                    problems.join("; ")
                ),
            );
            e.param = None;
            let mut body = e.body();
            body["error"]["problems"] = json!(problems);
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
        }
    }
}
