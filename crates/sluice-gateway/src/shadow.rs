//! Shadow stages: stable serves the user; a copy of the request goes to the
//! candidate in the background and both answers are recorded as a linked
//! pair that feeds the stage's paired gates.
//!
//! The user's response never waits for, and is never changed by, the
//! mirror: a mirror starts only when a slot is free (`max_in_flight`,
//! otherwise it is skipped and counted), runs on its own task with its own
//! timeout, and is recorded as `assignment = "shadow"` with `shadow_of`
//! naming the served request, so it never counts as served traffic.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use sluice_core::chat::ChatRequest;
use sluice_core::config::{LogBodies, StageKind};
use sluice_core::signals::{is_refusal, Observation};
use sluice_store::RequestRecord;
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::rollouts::{observation, try_mirror, Rollouts};
use crate::snapshot::Snapshot;
use crate::{now_ms, AppState};

/// Where the served request's outcome goes so the mirror can pair with it.
pub type PairSender = oneshot::Sender<Observation>;

/// Starts mirroring `req` (already through input policy) to the candidate
/// when `primary` was routed to stable by a rollout in a shadow stage, the
/// request is in the stage's `sample`, and a mirror slot is free.
pub fn start(
    app: &Arc<AppState>,
    snap: &Arc<Snapshot>,
    rollouts: &Rollouts,
    primary: &RequestRecord,
    req: &ChatRequest,
) -> Option<PairSender> {
    let name = primary.rollout.as_deref()?;
    if primary.assignment.as_deref() != Some("stable") {
        return None;
    }
    let entry = rollouts.entries.get(name)?;
    if entry.state.status != sluice_core::rollout::Status::Running {
        return None;
    }
    let Some(StageKind::Shadow(cfg)) = entry.config.stages.get(entry.state.stage).map(|s| &s.kind)
    else {
        return None;
    };
    if cfg.sample < 1.0 {
        let bucket = crate::pipeline::random_bucket(&primary.id);
        if f64::from(bucket) >= cfg.sample * f64::from(sluice_core::assign::BUCKETS) {
            return None;
        }
    }
    let Some(permit) = try_mirror(&entry.counters, cfg.max_in_flight) else {
        app.metrics.shadow(name, "skipped_full");
        return None;
    };
    let deployment = snap.deployments.get(&entry.config.deployment)?;
    let candidate = entry.config.candidate.clone();
    let variant = deployment.config.variants.get(&candidate)?;
    let (tx, rx) = oneshot::channel::<Observation>();
    let mut rec = RequestRecord {
        id: crate::pipeline::new_request_id(),
        ts_ms: now_ms(),
        api_key: primary.api_key.clone(),
        deployment: primary.deployment.clone(),
        variant: Some(candidate.clone()),
        provider: Some(variant.provider.clone()),
        model: Some(variant.model.clone()),
        subject: primary.subject.clone(),
        stream: req.is_stream(),
        rollout: Some(name.to_string()),
        stage: primary.stage,
        assignment: Some("shadow".into()),
        shadow_of: Some(primary.id.clone()),
        ..Default::default()
    };
    let (stage, stage_started) = (entry.state.stage, entry.state.stage_started_ms);
    let counters = entry.counters.clone();
    let timeout = cfg.timeout;
    let (app, snap, req, name) = (app.clone(), snap.clone(), req.clone(), name.to_string());
    let running = app.background.enter();
    tokio::spawn(async move {
        let _running = running;
        let Some(dep) = snap
            .deployments
            .get(rec.deployment.as_deref().unwrap_or_default())
        else {
            return;
        };
        let answered = crate::eval::call_variant(
            &app.external,
            &snap,
            dep,
            &candidate,
            &req,
            timeout,
            rec.stream,
        )
        .await;
        drop(permit);
        rec.latency_ms = answered.latency_ms;
        let mut flags = Vec::new();
        match answered.outcome {
            Ok(s) => {
                rec.status = 200;
                rec.ttft_ms = s.ttft_ms;
                if let Some(u) = s.usage {
                    rec.tokens_in = Some(u.prompt_tokens);
                    rec.tokens_out = Some(u.completion_tokens);
                }
                rec.finish_reason = sluice_core::chat::finish_reason(&s.body);
                rec.refusal = Some(is_refusal(&s.text));
                rec.cost_usd = s.cost_usd;
                rec.policy = s.policy.to_record();
                flags = crate::policy::flags(&dep.constitution, &s.policy);
                if snap.config.store.log_bodies != LogBodies::Metadata {
                    rec.response_body = serde_json::to_string(&s.body).ok();
                }
                app.metrics.shadow(&name, "ok");
            }
            Err(e) => {
                let api = ApiError::upstream(&e);
                rec.status = api.status.as_u16();
                rec.error_kind = Some(e.kind().to_string());
                rec.error_message = Some(e.to_string());
                counters.shadow.failed.fetch_add(1, Ordering::Relaxed);
                app.metrics.shadow(&name, "error");
            }
        }
        let mut mirrored = observation(
            rec.status,
            rec.error_kind.as_deref(),
            rec.latency_ms,
            rec.ttft_ms,
            rec.tokens_out,
            rec.refusal,
            rec.cost_usd,
        );
        if !mirrored.error {
            mirrored.flags = flags;
        }
        // The served request reports its outcome when it finishes (a stream
        // may still be running); no report means it left the stage.
        if let Ok(served) = rx.await {
            let rollouts = app.rollouts.load();
            if let Some(e) = rollouts.entries.get(&name) {
                if e.state.stage == stage
                    && e.state.stage_started_ms == stage_started
                    && e.state.status.is_active()
                {
                    e.aggregates
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .paired
                        .observe(&served, &mirrored);
                    e.counters.shadow.paired.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // A mirror never holds up anyone: its record is not waited for.
        drop(app.record(rec));
    });
    Some(tx)
}
