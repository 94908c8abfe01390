//! The request path for `POST /v1/chat/completions`, as a sequence of small
//! phases called in order by [`chat_completions`]:
//!
//! ```text
//! authenticate → read body → parse → resolve deployment → assign variant
//!   → input policy → prepare upstream request → call provider
//!   → output policy → respond → record
//! ```
//!
//! Each phase is a plain function with one job; later capabilities (rollout
//! assignment, policies, shadow traffic) replace or extend single phases.
//!
//! Invariants kept here:
//! - every request that reaches this handler produces exactly one
//!   [`RequestRecord`], whatever happens (errors, streams cut by the client);
//! - the path never waits on the database: records are handed to the writer.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sluice_core::assign::{decide, Reason, RequestFacts};
use sluice_core::chat::{finish_reason, ChatRequest, InvalidRequest, Message};
use sluice_core::config::{Fallback, KeyRole, LogBodies, Price, VariantConfig};
use sluice_core::policy::guard::{OutputGuard, Step};
use sluice_core::policy::Constitution;
use sluice_core::rollout::Status;
use sluice_core::signals::is_refusal;
use sluice_core::stream::StreamAccumulator;
use sluice_providers::{ChunkStream, ProviderError, Reply};
use sluice_store::RequestRecord;

use crate::error::ApiError;
use crate::rollouts::Rollouts;
use crate::snapshot::{ApiKey, Deployment, Snapshot};
use crate::{now_ms, AppState};

/// Header carrying the request id.
pub const REQUEST_ID: &str = "x-sluice-request-id";
/// Header naming the variant that served the request.
pub const VARIANT: &str = "x-sluice-variant";
/// Header naming the deployment.
pub const DEPLOYMENT: &str = "x-sluice-deployment";
/// Header listing the principles that fired.
pub const POLICY: &str = "x-sluice-policy";
/// Header naming the rollout stage that routed the request.
pub const STAGE: &str = "x-sluice-stage";
/// Header naming the assigned variant when a fallback variant served.
pub const FALLBACK_FROM: &str = "x-sluice-fallback-from";

/// One place in a bounded count of requests; frees itself when dropped.
pub(crate) struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Slot {
    /// Takes a place if fewer than `limit` are taken.
    fn try_take(count: &Arc<std::sync::atomic::AtomicUsize>, limit: usize) -> Option<Slot> {
        use std::sync::atomic::Ordering;
        if count.fetch_add(1, Ordering::AcqRel) >= limit {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The places a request holds: in the gateway's limit and in its
/// deployment's (a pair, not a list: nothing to allocate per request).
#[derive(Default)]
pub(crate) struct Slots {
    global: Option<Slot>,
    deployment: Option<Slot>,
}

/// A new request id: `req_` and a time-ordered UUIDv7 in hex.
pub fn new_request_id() -> String {
    // Written into a string of the final size: `format!` would guess short
    // and grow it (two allocations on every request instead of one).
    let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
    let hex = uuid::Uuid::now_v7().simple().encode_lower(&mut buf);
    let mut id = String::with_capacity(4 + hex.len());
    id.push_str("req_");
    id.push_str(hex);
    id
}

/// A body as text for the record, invalid UTF-8 replaced (checked in one
/// fast pass first: bodies are almost always valid).
fn body_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Phase: authenticate. `Authorization: Bearer KEY` (or `x-api-key: KEY`).
pub fn authenticate<'a>(
    snap: &'a Snapshot,
    headers: &HeaderMap,
) -> Result<Option<&'a ApiKey>, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .unwrap_or(v)
                .trim()
        })
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        })
        .filter(|k| !k.is_empty());
    if snap.keys.is_empty() && snap.config.allow_anonymous {
        return Ok(None);
    }
    let Some(presented) = presented else {
        return Err(ApiError::unauthorized(
            "You didn't provide an API key. Provide it in an Authorization header using Bearer auth \
             (Authorization: Bearer YOUR_KEY).",
        ));
    };
    match snap.authenticate(presented) {
        Some(k) => Ok(Some(k)),
        None => Err(ApiError::unauthorized(
            "Incorrect API key provided. Use a key configured in [[api_keys]].",
        )),
    }
}

/// Phase: read the body, refusing more than `limit` bytes. A body that
/// arrives in one piece (the usual request) is kept as it came, without a
/// copy or a list of pieces.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let mut body = body;
    let mut gathered = sluice_providers::Gathered::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::unreadable_body(&e.into_inner()))?;
        // Trailers carry nothing sluice reads.
        let Ok(piece) = frame.into_data() else {
            continue;
        };
        if !gathered.push(piece, limit) {
            return Err(ApiError::too_large(limit));
        }
    }
    Ok(gathered.into_bytes())
}

/// Phase: resolve the deployment named in `model`.
pub fn resolve<'a>(
    snap: &'a Snapshot,
    key: Option<&ApiKey>,
    model: &str,
) -> Result<&'a Deployment, ApiError> {
    match snap.deployments.get(model) {
        Some(d) if key.is_none_or(|k| k.may_use(model)) => Ok(d),
        _ => Err(ApiError::model_not_found(model)),
    }
}

/// The variant chosen for a request, and why.
#[derive(Debug, Clone)]
pub struct Assignment<'a> {
    /// The variant's config.
    pub variant: &'a VariantConfig,
    /// Its provider.
    pub provider: &'a Arc<crate::upstream::Upstream>,
    /// Why.
    pub reason: Reason,
    /// The rollout that governs the deployment, if any.
    pub rollout: Option<String>,
    /// That rollout's stage index.
    pub stage: Option<usize>,
    /// The `x-sluice-stage` value.
    pub stage_header: Cow<'static, str>,
    /// Whether the subject will get the same variant next time.
    pub sticky: bool,
}

/// Header an operator key may send to pin a variant.
pub const PIN: &str = "x-sluice-variant";

pub(crate) fn random_bucket(seed: &str) -> u32 {
    use std::hash::BuildHasher;
    let h = std::collections::hash_map::RandomState::new().hash_one(seed);
    (h % u64::from(sluice_core::assign::BUCKETS)) as u32
}

/// Phase: assign a variant. A pin (operator keys only) wins; otherwise the
/// deployment's governing rollout decides (see `sluice_core::assign`), and
/// without one the stable variant serves.
pub fn assign<'a>(
    snap: &Snapshot,
    deployment: &'a Deployment,
    rollouts: &Rollouts,
    key: Option<&ApiKey>,
    req: &ChatRequest,
    headers: &HeaderMap,
    request_id: &str,
) -> Result<Assignment<'a>, ApiError> {
    let d = &deployment.config;
    let governing = rollouts.governing(&d.name);
    let stage_header = crate::rollouts::stage_header(governing);
    let pick =
        |name: &str| -> Result<(&'a VariantConfig, &'a Arc<crate::upstream::Upstream>), ApiError> {
            let v = d
                .variants
                .get(name)
                .ok_or_else(|| ApiError::model_not_found(&d.name))?;
            let p = deployment
                .providers
                .get(name)
                .ok_or_else(|| ApiError::model_not_found(&d.name))?;
            Ok((v, p))
        };
    let rollout = governing.map(|g| g.config.name.clone());
    let stage = governing
        .filter(|g| g.state.status.is_active())
        .map(|g| g.state.stage);
    if let Some(pin) = headers.get(PIN) {
        if key.is_none_or(|k| k.role != KeyRole::Operator) {
            return Err(ApiError::forbidden(
                "Pinning a variant with the x-sluice-variant header needs an API key with role = \"operator\".",
            ));
        }
        let name = pin.to_str().unwrap_or_default();
        if !d.variants.contains_key(name) {
            let mut known: Vec<&str> = d.variants.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(ApiError::invalid(InvalidRequest {
                param: Some(PIN.to_string()),
                message: format!(
                    "Deployment `{}` has no variant `{name}` (variants: {}).",
                    d.name,
                    known.join(", ")
                ),
            }));
        }
        let (variant, provider) = pick(name)?;
        return Ok(Assignment {
            variant,
            provider,
            reason: Reason::Pinned,
            rollout,
            stage,
            stage_header,
            sticky: true,
        });
    }
    let Some(g) = governing else {
        let (variant, provider) = pick(&d.stable)?;
        return Ok(Assignment {
            variant,
            provider,
            reason: Reason::Stable,
            rollout,
            stage,
            stage_header,
            sticky: true,
        });
    };
    let (candidate, reason, sticky) = match g.state.status {
        Status::Promoted => (true, Reason::Promoted, true),
        Status::Running => {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let facts = RequestFacts {
                user: req.user.as_deref(),
                api_key: key.map(|k| k.name.as_str()),
                metadata: req.metadata.as_ref(),
                header: &header,
            };
            let dec = decide(
                &g.config,
                g.state.stage,
                &snap.config.cohorts,
                &facts,
                || random_bucket(request_id),
            );
            g.counters.count(dec.candidate);
            (dec.candidate, dec.reason, dec.sticky)
        }
        Status::Paused => {
            g.counters.count(false);
            (false, Reason::Stable, true)
        }
        _ => (false, Reason::Stable, true),
    };
    let (variant, provider) = pick(if candidate {
        &g.config.candidate
    } else {
        &d.stable
    })?;
    Ok(Assignment {
        variant,
        provider,
        reason,
        rollout,
        stage,
        stage_header,
        sticky,
    })
}

/// Phase: rewrite the client's request for the variant: upstream model, the
/// variant's system prompt first, its default parameters where the client set
/// none. `metadata` is sluice's (used for routing) and is only forwarded when
/// the client asked the upstream to `store` the completion.
pub fn prepare(req: &ChatRequest, variant: &VariantConfig) -> Result<ChatRequest, ApiError> {
    prepare_owned(req.clone(), variant)
}

/// [`prepare`] on a request that is not needed afterwards.
fn prepare_owned(mut up: ChatRequest, variant: &VariantConfig) -> Result<ChatRequest, ApiError> {
    up.model = variant.model.clone();
    if let Some(sp) = &variant.system_prompt {
        up.messages.insert(0, Message::system(sp.clone()));
    }
    up.apply_defaults(&variant.params)
        .map_err(ApiError::invalid)?;
    if up.store != Some(true) {
        up.metadata = None;
    }
    // A non-streamed call goes upstream without stream fields; clearing them
    // here spares the provider a copy of the request to drop them.
    if !up.is_stream() {
        up.stream = None;
        up.stream_options = None;
    }
    Ok(up)
}

/// Everything known about a request so far; becomes its record. Every path
/// that answers takes `rec` out; if the handler is dropped before that (the
/// client closed the connection, or a stop ran out of grace), dropping the
/// context records the request as `client_disconnected` with status 499, so
/// no request that reached the handler goes unrecorded.
struct Ctx {
    app: Arc<AppState>,
    rec: RequestRecord,
    stage_header: Option<Cow<'static, str>>,
    policy: crate::policy::PolicyLog,
    flags: Vec<(String, bool)>,
    started: Instant,
    log_full: bool,
    /// The mirror waiting for this request's outcome (shadow stages).
    shadow: Option<crate::shadow::PairSender>,
    /// Places held in the global and deployment concurrency limits.
    slots: Slots,
    /// Time spent waiting on upstream calls (for the overhead metric).
    upstream: std::time::Duration,
    /// The deployment's and variant's response headers, once known.
    names: NameHeaders,
}

/// The deployment's and the serving variant's names as response header
/// values, taken ready-made from the snapshot (an atomic count each, where
/// building them would copy and check the names on every request).
#[derive(Default)]
struct NameHeaders {
    deployment: Option<HeaderValue>,
    variant: Option<HeaderValue>,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if self.rec.id.is_empty() {
            return; // already answered and recorded
        }
        let mut rec = std::mem::take(&mut self.rec);
        rec.status = 499;
        rec.error_kind = Some("client_disconnected".to_string());
        rec.error_message =
            Some("the client closed the connection before the answer was ready".to_string());
        rec.latency_ms = ms_since(self.started);
        rec.policy = self.policy.to_record();
        // No outcome to judge: the request feeds no rollout signal.
        self.app.metrics.observe(&rec);
        drop(self.app.record(rec));
    }
}

/// The response headers sluice adds, as names that cost no copy to insert.
static H_REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID);
static H_VARIANT: HeaderName = HeaderName::from_static(VARIANT);
static H_DEPLOYMENT: HeaderName = HeaderName::from_static(DEPLOYMENT);
static H_POLICY: HeaderName = HeaderName::from_static(POLICY);
static H_STAGE: HeaderName = HeaderName::from_static(STAGE);
static H_FALLBACK_FROM: HeaderName = HeaderName::from_static(FALLBACK_FROM);

fn with_headers(
    mut resp: Response,
    rec: &RequestRecord,
    names: &NameHeaders,
    stage: Option<&Cow<'static, str>>,
    policy: Option<String>,
) -> Response {
    let h = resp.headers_mut();
    if let Some(v) = policy.and_then(|v| HeaderValue::from_str(&v).ok()) {
        h.insert(H_POLICY.clone(), v);
    }
    let stage = stage.and_then(|v| match v {
        Cow::Borrowed(s) => Some(HeaderValue::from_static(s)),
        Cow::Owned(s) => HeaderValue::from_str(s).ok(),
    });
    if let Some(v) = stage {
        h.insert(H_STAGE.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&rec.id) {
        h.insert(H_REQUEST_ID.clone(), v);
    }
    if let Some(v) = rec
        .fallback_from
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        h.insert(H_FALLBACK_FROM.clone(), v);
    }
    if let Some(v) = names.variant.clone() {
        h.insert(H_VARIANT.clone(), v);
    }
    if let Some(v) = names.deployment.clone() {
        h.insert(H_DEPLOYMENT.clone(), v);
    }
    resp
}

/// The per-principle flags a rollout's gates see; none for a request
/// outside a rollout (nothing reads them).
fn gate_flags(
    c: &sluice_core::policy::Constitution,
    log: &crate::policy::PolicyLog,
    rec: &RequestRecord,
) -> Vec<(String, bool)> {
    if rec.rollout.is_none() {
        return Vec::new();
    }
    crate::policy::flags(c, log)
}

/// Counts, observes and records a finished request; with strict durability
/// the returned receiver resolves once its record is committed.
fn finish(
    app: &AppState,
    rec: RequestRecord,
    flags: Vec<(String, bool)>,
    shadow: Option<crate::shadow::PairSender>,
) -> Option<tokio::sync::oneshot::Receiver<()>> {
    app.metrics.observe(&rec);
    let obs = observe_rollout(app, &rec, flags);
    if let (Some(tx), Some(obs)) = (shadow, obs) {
        let _ = tx.send(obs);
    }
    app.record(rec)
}

/// Waits for a strictly durable record's commit.
async fn committed(ack: Option<tokio::sync::oneshot::Receiver<()>>) {
    if let Some(rx) = ack {
        let _ = rx.await;
    }
}

/// Feeds a finished request into its rollout stage's signals, if it was
/// assigned by a rollout that is still in that stage; returns what it fed.
fn observe_rollout(
    app: &AppState,
    rec: &RequestRecord,
    flags: Vec<(String, bool)>,
) -> Option<sluice_core::signals::Observation> {
    let (Some(name), Some(stage)) = (rec.rollout.as_deref(), rec.stage) else {
        return None;
    };
    if !matches!(
        rec.assignment.as_deref(),
        Some("cohort" | "bucket" | "stable")
    ) {
        return None;
    }
    let rollouts = app.rollouts.load();
    let e = rollouts.entries.get(name)?;
    if !e.state.status.is_active() || u32::try_from(e.state.stage).ok() != Some(stage) {
        return None;
    }
    // A request a fallback served counts as a failure of the assigned variant.
    let assigned = rec.fallback_from.as_deref().or(rec.variant.as_deref());
    let candidate = assigned == Some(e.config.candidate.as_str());
    let (status, error_kind) = match &rec.fallback_from {
        Some(_) => (
            502,
            rec.fallback_error.as_deref().or(Some("upstream_error")),
        ),
        None => (rec.status, rec.error_kind.as_deref()),
    };
    let mut obs = crate::rollouts::observation(
        status,
        error_kind,
        rec.latency_ms,
        rec.ttft_ms,
        rec.tokens_out,
        rec.refusal,
        rec.cost_usd,
    );
    if !obs.error {
        obs.flags = flags;
    }
    e.aggregates
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .arm_mut(candidate)
        .observe(&obs);
    Some(obs)
}

/// The chat completions route.
pub const CHAT_PATH: &str = "/v1/chat/completions";

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Held until the response is built; a stream takes its own guard so it
    // counts until its last byte.
    let _in_flight = app.metrics.in_flight();
    let snap = app.snapshot.load_full();
    let mut ctx = Ctx {
        app: app.clone(),
        rec: RequestRecord {
            id: new_request_id(),
            ts_ms: now_ms(),
            ..Default::default()
        },
        stage_header: None,
        policy: Default::default(),
        flags: Vec::new(),
        started: Instant::now(),
        log_full: snap.config.store.log_bodies != LogBodies::Metadata,
        shadow: None,
        slots: Slots::default(),
        upstream: std::time::Duration::ZERO,
        names: NameHeaders::default(),
    };
    let out = handle(&app, &snap, headers, body, &mut ctx).await;
    app.metrics
        .overhead(ctx.started.elapsed().saturating_sub(ctx.upstream));
    match out {
        Ok(resp) => resp,
        Err(e) => {
            let mut rec = std::mem::take(&mut ctx.rec);
            rec.status = e.status.as_u16();
            rec.error_kind = Some(e.record_kind.to_string());
            rec.error_message = Some(e.message.clone());
            rec.latency_ms = ms_since(ctx.started);
            rec.policy = ctx.policy.to_record();
            let resp = with_headers(
                e.into_response(),
                &rec,
                &ctx.names,
                ctx.stage_header.as_ref(),
                ctx.policy.header(),
            );
            let ack = finish(&app, rec, std::mem::take(&mut ctx.flags), ctx.shadow.take());
            committed(ack).await;
            resp
        }
    }
}

/// The variants to try for a request, in order: the assigned one, then
/// (unless it was pinned) stable when a rollout's candidate was assigned and
/// the rollout falls back, then the deployment's `fallbacks`.
fn fallback_chain<'a>(
    deployment: &'a Deployment,
    assignment: &Assignment<'a>,
    rollouts: &Rollouts,
) -> Vec<(&'a VariantConfig, &'a Arc<crate::upstream::Upstream>)> {
    let d = &deployment.config;
    let assigned = assignment.variant.name.as_str();
    let (to_stable, fallbacks) = if assignment.reason == Reason::Pinned {
        (false, false)
    } else {
        let is_stable = assigned == d.stable;
        let to_stable = !is_stable
            && rollouts
                .governing(&d.name)
                .is_none_or(|g| g.config.fallback == Fallback::Stable);
        (to_stable, is_stable || to_stable)
    };
    let names = std::iter::once(assigned)
        .chain(to_stable.then_some(d.stable.as_str()))
        .chain(
            d.fallbacks
                .iter()
                .map(String::as_str)
                .filter(move |_| fallbacks),
        );
    let mut out: Vec<(&'a VariantConfig, &'a Arc<crate::upstream::Upstream>)> = Vec::new();
    for n in names {
        if out.iter().any(|(v, _)| v.name == n) {
            continue;
        }
        if let (Some(v), Some(p)) = (d.variants.get(n), deployment.providers.get(n)) {
            out.push((v, p));
        }
    }
    out
}

/// Whether another variant may serve after this failure: the upstream or
/// its breaker failed, not the request.
fn can_fall_back(e: &ProviderError) -> bool {
    crate::upstream::is_endpoint_failure(e) || matches!(e, ProviderError::CircuitOpen { .. })
}

/// What a provider call produced.
enum Answer {
    Complete(sluice_providers::Reply),
    Stream(ChunkStream),
}

/// Serves one chat request. The client's headers and body are taken by
/// value and dropped once read: they share their memory with the
/// connection's read buffer, which would otherwise stay pinned for as long
/// as the upstream takes to answer.
async fn handle(
    app: &Arc<AppState>,
    snap: &Arc<Snapshot>,
    headers: HeaderMap,
    body: Body,
    ctx: &mut Ctx,
) -> Result<Response, ApiError> {
    let limits = &snap.config.limits;
    ctx.slots.global = Some(
        Slot::try_take(&app.in_flight, limits.max_in_flight)
            .ok_or_else(|| ApiError::overloaded(limits.max_in_flight))?,
    );
    let key = authenticate(snap, &headers)?;
    ctx.rec.api_key = key.map(|k| k.name.clone());
    let bytes = sluice_providers::within(
        limits.body_timeout,
        read_body(&headers, body, snap.config.max_body_bytes),
    )
    .await
    .map_err(|_| ApiError::body_timeout(limits.body_timeout))??;
    if ctx.log_full {
        ctx.rec.request_body = Some(body_text(&bytes));
    }
    // The request as decoded lives only in this block: it leaves it
    // rewritten for the upstream (and boxed, when a fallback or a mirror
    // needs it again), so the handler's future, which every request in
    // flight holds, keeps no slot for it across the upstream call.
    let (deployment, constitution, chain, stream, stream_usage, prepared, original) = {
        let mut req = ChatRequest::parse(&bytes).map_err(ApiError::invalid)?;
        drop(bytes);
        ctx.rec.stream = req.is_stream();
        ctx.rec.subject = req.user.clone().or_else(|| ctx.rec.api_key.clone());
        let deployment = resolve(snap, key, &req.model)?;
        ctx.rec.deployment = Some(deployment.config.name.clone());
        ctx.names.deployment = deployment.name_header.clone();
        if let Some(limit) = deployment.config.max_in_flight {
            ctx.slots.deployment = Some(
                Slot::try_take(&deployment.in_flight, limit)
                    .ok_or_else(|| ApiError::deployment_busy(&deployment.config.name, limit))?,
            );
        }
        let rollouts = app.rollouts.load();
        let mut assignment = assign(
            snap,
            deployment,
            &rollouts,
            key,
            &req,
            &headers,
            &ctx.rec.id,
        )?;
        drop(headers);
        ctx.stage_header = Some(std::mem::take(&mut assignment.stage_header));
        ctx.rec.rollout = assignment.rollout.clone();
        ctx.rec.stage = assignment.stage.and_then(|s| u32::try_from(s).ok());
        ctx.rec.assignment = Some(assignment.reason.name().to_string());
        ctx.rec.sticky = Some(assignment.sticky);
        ctx.rec.variant = Some(assignment.variant.name.clone());
        ctx.names.variant = deployment
            .variant_headers
            .get(&assignment.variant.name)
            .cloned();
        ctx.rec.provider = Some(assignment.variant.provider.clone());
        ctx.rec.model = Some(assignment.variant.model.clone());
        let constitution = deployment.constitution.clone();
        let checked = crate::policy::check_input(&constitution, &mut req, &mut ctx.policy);
        ctx.flags = gate_flags(&constitution, &ctx.policy, &ctx.rec);
        checked?;
        if crate::policy::has_external(&constitution, sluice_core::config::Applies::Input) {
            let started = Instant::now();
            let text = crate::policy::input_text(&req);
            // Boxed (as are the other awaits off the common path) so that their
            // futures do not size the handler's, which every request allocates.
            let found = Box::pin(crate::policy::check_external(
                &app.external,
                snap,
                &constitution,
                sluice_core::config::Applies::Input,
                &text,
            ))
            .await;
            ctx.policy
                .add(&found, started.elapsed().as_micros() as u64, None);
            ctx.flags = gate_flags(&constitution, &ctx.policy, &ctx.rec);
            if let Some(b) = found
                .iter()
                .find(|f| f.action == sluice_core::config::PolicyAction::Block)
            {
                return Err(crate::policy::violation(b));
            }
        }
        let mirrored = assignment.reason == Reason::Stable && ctx.rec.rollout.is_some();
        let chain = fallback_chain(deployment, &assignment, &rollouts);
        let stream = req.is_stream();
        let stream_usage = req.wants_stream_usage();
        // The client's request is rewritten in place when nothing else needs
        // it: no mirror to start, no fallback to rewrite it for.
        let (prepared, original) = if chain.len() == 1 && !mirrored {
            (prepare_owned(req, assignment.variant)?, None)
        } else {
            (prepare(&req, assignment.variant)?, Some(Box::new(req)))
        };
        if let (true, Some(req)) = (mirrored, original.as_deref()) {
            ctx.shadow = crate::shadow::start(app, snap, &rollouts, &ctx.rec, req);
        }
        (
            deployment,
            constitution,
            chain,
            stream,
            stream_usage,
            prepared,
            original,
        )
    };
    let mut first_failure: Option<ProviderError> = None;
    let mut served: Option<(&VariantConfig, Answer)> = None;
    let mut up = prepared;
    for (i, (variant, upstream)) in chain.iter().enumerate() {
        if i > 0 {
            // A chain of one has nothing after its first variant.
            let Some(req) = original.as_deref() else {
                break;
            };
            up = prepare(req, variant)?;
        }
        let waiting = Instant::now();
        let (r, attempts) = if stream {
            let (r, n) = Box::pin(upstream.stream_counted(&up)).await;
            (r.map(Answer::Stream), n)
        } else {
            let (r, n) = upstream.reply_counted(&up).await;
            (r.map(Answer::Complete), n)
        };
        ctx.upstream += waiting.elapsed();
        ctx.rec.attempts = Some(attempts);
        match r {
            Ok(a) => {
                served = Some((variant, a));
                break;
            }
            Err(e) if i + 1 < chain.len() && can_fall_back(&e) => {
                tracing::warn!(
                    deployment = %deployment.config.name,
                    variant = %variant.name,
                    next = %chain[i + 1].0.name,
                    "variant failed, falling back: {e}"
                );
                first_failure.get_or_insert(e);
            }
            Err(e) => return Err(ApiError::upstream(&e)),
        }
    }
    let Some((variant, answer)) = served else {
        return Err(ApiError::model_not_found(&deployment.config.name));
    };
    if let Some(e) = first_failure {
        ctx.rec.fallback_from = ctx.rec.variant.replace(variant.name.clone());
        ctx.names.variant = deployment.variant_headers.get(&variant.name).cloned();
        ctx.rec.fallback_error = Some(e.kind().to_string());
        ctx.rec.provider = Some(variant.provider.clone());
        ctx.rec.model = Some(variant.model.clone());
        app.metrics.fallback(
            &deployment.config.name,
            ctx.rec.fallback_from.as_deref().unwrap_or("-"),
            &variant.name,
        );
    }
    let price = snap.config.prices.get(&variant.model).copied();
    match answer {
        Answer::Stream(stream) => Ok(stream_response(
            app.clone(),
            price,
            constitution,
            ctx,
            stream,
            stream_usage,
        )),
        Answer::Complete(reply) => {
            // An answer read without a tree goes out as it came unless a
            // principle changes it or calls out; then it is decoded.
            let (body, usage, finished, refusal) = match reply {
                Reply::Raw(mut raw)
                    if crate::policy::check_output_texts(
                        &constitution,
                        &raw.texts,
                        &mut ctx.policy,
                    ) =>
                {
                    let refusal = is_refusal(raw.first_text());
                    let usage = raw.usage;
                    let finished = raw.finish_reason.take();
                    (raw.into_bytes(), usage, finished, refusal)
                }
                reply => {
                    let mut completion = reply
                        .into_completion(&variant.provider)
                        .map_err(|e| ApiError::upstream(&e))?;
                    if Box::pin(crate::policy::check_completion(
                        &app.external,
                        snap,
                        &constitution,
                        &mut completion.body,
                        &mut ctx.policy,
                    ))
                    .await
                    {
                        completion.raw = None;
                    }
                    let finished = finish_reason(&completion.body);
                    let refusal = is_refusal(&crate::eval::first_text(&completion.body));
                    let body = match completion.raw {
                        Some(raw) => raw,
                        None => {
                            Bytes::from(serde_json::to_vec(&completion.body).unwrap_or_default())
                        }
                    };
                    (body, completion.usage, finished, refusal)
                }
            };
            let flags = gate_flags(&constitution, &ctx.policy, &ctx.rec);
            let mut rec = std::mem::take(&mut ctx.rec);
            rec.policy = ctx.policy.to_record();
            rec.status = 200;
            rec.latency_ms = ms_since(ctx.started);
            if let Some(u) = usage {
                rec.tokens_in = Some(u.prompt_tokens);
                rec.tokens_out = Some(u.completion_tokens);
            }
            rec.finish_reason = finished;
            rec.refusal = Some(refusal);
            rec.cost_usd = price.and_then(|p| Some(p.cost(rec.tokens_in?, rec.tokens_out?)));
            if ctx.log_full {
                rec.response_body = Some(body_text(&body));
            }
            let resp = (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response();
            let resp = with_headers(
                resp,
                &rec,
                &ctx.names,
                ctx.stage_header.as_ref(),
                ctx.policy.header(),
            );
            committed(finish(app, rec, flags, ctx.shadow.take())).await;
            Ok(resp)
        }
    }
}

/// Owns a streamed request's record until the stream ends; if the client goes
/// away first, dropping it records the request as `client_disconnected`.
/// It also owns the output guards, one per choice.
struct StreamRecorder {
    app: Arc<AppState>,
    rec: Option<RequestRecord>,
    started: Instant,
    acc: StreamAccumulator,
    log_full: bool,
    price: Option<Price>,
    constitution: Arc<Constitution>,
    guards: std::collections::BTreeMap<u64, OutputGuard>,
    finished: std::collections::BTreeSet<u64>,
    policy: crate::policy::PolicyLog,
    check_us: u64,
    shadow: Option<crate::shadow::PairSender>,
    /// A strictly durable record's commit, awaited before the stream ends.
    ack: Option<tokio::sync::oneshot::Receiver<()>>,
    _slots: Slots,
    _in_flight: crate::metrics::InFlight,
}

impl StreamRecorder {
    fn finish(&mut self, error: Option<(&'static str, String)>) {
        let Some(mut rec) = self.rec.take() else {
            return;
        };
        rec.status = 200;
        rec.latency_ms = ms_since(self.started);
        if let Some(u) = self.acc.usage() {
            rec.tokens_in = Some(u.prompt_tokens);
            rec.tokens_out = Some(u.completion_tokens);
        }
        rec.finish_reason = self.acc.finish_reason().map(str::to_string);
        if self.acc.chunks() > 0 {
            rec.refusal = Some(is_refusal(self.acc.text()));
        }
        rec.cost_usd = self
            .price
            .and_then(|p| Some(p.cost(rec.tokens_in?, rec.tokens_out?)));
        if let Some((kind, message)) = error {
            rec.error_kind = Some(kind.to_string());
            rec.error_message = Some(message);
        }
        let findings: Vec<_> = self
            .guards
            .values()
            .flat_map(|g| g.findings().to_vec())
            .collect();
        self.policy.add(&findings, self.check_us, None);
        rec.policy = self.policy.to_record();
        if self.log_full && self.acc.chunks() > 0 {
            rec.response_body = Some(self.acc.completion().to_string());
        }
        let flags = gate_flags(&self.constitution, &self.policy, &rec);
        self.ack = finish(&self.app, rec, flags, self.shadow.take());
    }

    /// Waits until the finished record is committed (strict durability).
    async fn settle(&mut self) {
        committed(self.ack.take()).await;
    }

    /// Passes a chunk's text through the choices' guards. Returns the chunk
    /// to send, whether a `block` principle ended the stream, and whether
    /// the chunk changed (an unchanged chunk goes out as the upstream's own
    /// bytes, without re-serialising).
    fn guard(&mut self, mut v: Value) -> (Value, bool, bool) {
        let mut blocked = false;
        let mut changed = false;
        let started = Instant::now();
        if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
            for c in choices.iter_mut() {
                let idx = c.get("index").and_then(Value::as_u64).unwrap_or(0);
                let constitution = &self.constitution;
                let guard = self
                    .guards
                    .entry(idx)
                    .or_insert_with(|| OutputGuard::new(constitution));
                let mut emitted = String::new();
                let mut choice_blocked = false;
                let content = c.get("delta").and_then(|d| d.get("content"));
                let original = content.and_then(Value::as_str);
                if let Some(t) = original {
                    match guard.push(t) {
                        Step::Emit(e) => emitted = e,
                        Step::Block { emit, .. } => {
                            emitted = emit;
                            choice_blocked = true;
                        }
                    }
                }
                let finishing = c.get("finish_reason").is_some_and(|f| !f.is_null());
                if finishing && !choice_blocked {
                    self.finished.insert(idx);
                    match guard.finish() {
                        Step::Emit(e) => emitted.push_str(&e),
                        Step::Block { emit, .. } => {
                            emitted.push_str(&emit);
                            choice_blocked = true;
                        }
                    }
                }
                if (content.is_some() || !emitted.is_empty()) && original != Some(emitted.as_str())
                {
                    c["delta"]["content"] = json!(emitted);
                    changed = true;
                }
                if choice_blocked {
                    changed = true;
                    c["finish_reason"] = json!("content_filter");
                    self.finished.insert(idx);
                    blocked = true;
                }
            }
        }
        self.check_us += started.elapsed().as_micros() as u64;
        (v, blocked, changed)
    }

    /// At the end of a stream: releases what the guards still hold for
    /// choices that never sent a finish reason.
    fn flush(&mut self, template: &Value) -> Option<(Value, bool)> {
        let open: Vec<u64> = self
            .guards
            .keys()
            .filter(|k| !self.finished.contains(k))
            .copied()
            .collect();
        if open.is_empty() {
            return None;
        }
        let mut blocked = false;
        let mut choices = Vec::new();
        for idx in open {
            self.finished.insert(idx);
            let Some(g) = self.guards.get_mut(&idx) else {
                continue;
            };
            let (text, b) = match g.finish() {
                Step::Emit(e) => (e, false),
                Step::Block { emit, .. } => (emit, true),
            };
            blocked |= b;
            choices.push(json!({"index": idx, "delta": {"content": text}, "finish_reason": if b { json!("content_filter") } else { Value::Null }}));
        }
        let mut v = template.clone();
        v["choices"] = json!(choices);
        if let Some(o) = v.as_object_mut() {
            o.remove("usage");
        }
        Some((v, blocked))
    }
}

impl Drop for StreamRecorder {
    fn drop(&mut self) {
        if self.rec.is_some() {
            self.finish(Some((
                "client_disconnected",
                "the client closed the connection before the stream ended".to_string(),
            )));
        }
    }
}

fn sse_error(e: &ProviderError) -> Bytes {
    let api = ApiError::upstream(e);
    let body = serde_json::json!({"error": {
        "message": api.message,
        "type": api.kind,
        "param": Value::Null,
        "code": e.kind(),
    }});
    Bytes::from(format!("data: {body}\n\n"))
}

/// Appends `v` as one server-sent event, serialised straight into `out`.
fn push_event(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(b"data: ");
    // Serialising a `Value` into memory cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
    out.extend_from_slice(b"\n\n");
}

fn sse_data(text: &str) -> Bytes {
    Bytes::from(format!("data: {text}\n\n"))
}

fn stream_response(
    app: Arc<AppState>,
    price: Option<Price>,
    constitution: Arc<Constitution>,
    ctx: &mut Ctx,
    upstream: ChunkStream,
    want_usage: bool,
) -> Response {
    let rec = std::mem::take(&mut ctx.rec);
    // Input verdicts are known now; output verdicts of a stream arrive after
    // its headers, in the record.
    let policy_header = ctx.policy.header();
    let headers_rec = RequestRecord {
        id: rec.id.clone(),
        variant: rec.variant.clone(),
        deployment: rec.deployment.clone(),
        ..Default::default()
    };
    let app_metrics_guard = app.metrics.in_flight();
    let guarded = constitution.applies(sluice_core::config::Applies::Output);
    let has_ext = crate::policy::has_external(&constitution, sluice_core::config::Applies::Output);
    let recorder = StreamRecorder {
        app,
        rec: Some(rec),
        started: ctx.started,
        acc: StreamAccumulator::new(),
        log_full: ctx.log_full,
        price,
        constitution,
        guards: Default::default(),
        finished: Default::default(),
        policy: std::mem::take(&mut ctx.policy),
        check_us: 0,
        shadow: ctx.shadow.take(),
        ack: None,
        _slots: std::mem::take(&mut ctx.slots),
        _in_flight: app_metrics_guard,
    };
    enum Phase {
        Streaming,
        /// Send this, then `[DONE]`.
        Closing(Option<Bytes>),
        Done,
    }
    let body = futures_util::stream::unfold(
        (upstream, recorder, Phase::Streaming, Value::Null),
        move |(mut upstream, mut recorder, phase, mut template)| async move {
            match phase {
                Phase::Done => return None,
                Phase::Closing(next) => {
                    return match next {
                        Some(b) => Some((
                            Ok::<_, std::convert::Infallible>(b),
                            (upstream, recorder, Phase::Closing(None), template),
                        )),
                        None => Some((
                            Ok(Bytes::from_static(b"data: [DONE]\n\n")),
                            (upstream, recorder, Phase::Done, template),
                        )),
                    };
                }
                Phase::Streaming => {}
            }
            loop {
                match upstream.next().await {
                    Some(Ok(chunk)) => {
                        let usage_only = chunk.value.get("usage").is_some_and(|u| !u.is_null())
                            && chunk
                                .value
                                .get("choices")
                                .and_then(Value::as_array)
                                .is_none_or(Vec::is_empty);
                        let (value, raw, blocked) = if (guarded || has_ext) && !usage_only {
                            if template.is_null() {
                                template = chunk.value.clone();
                            }
                            let (v, b, changed) = recorder.guard(chunk.value);
                            (v, if changed { None } else { chunk.raw }, b)
                        } else {
                            (chunk.value, chunk.raw, false)
                        };
                        // Usage chunks come after the last content: release
                        // whatever the guards still hold first.
                        let flushed = if guarded && usage_only {
                            recorder.flush(&template)
                        } else {
                            None
                        };
                        let produced = recorder.acc.push(&value);
                        if produced {
                            if let Some(rec) = recorder.rec.as_mut() {
                                if rec.ttft_ms.is_none() {
                                    rec.ttft_ms = Some(ms_since(recorder.started));
                                }
                            }
                        }
                        if blocked {
                            recorder.finish(None);
                            recorder.settle().await;
                            let text = value.to_string();
                            return Some((
                                Ok(sse_data(&text)),
                                (upstream, recorder, Phase::Closing(None), template),
                            ));
                        }
                        let mut out = Vec::new();
                        if let Some((fv, fb)) = flushed {
                            recorder.acc.push(&fv);
                            push_event(&mut out, &fv);
                            if fb {
                                recorder.finish(None);
                                recorder.settle().await;
                                return Some((
                                    Ok(Bytes::from(out)),
                                    (upstream, recorder, Phase::Closing(None), template),
                                ));
                            }
                        }
                        if usage_only && !want_usage {
                            if out.is_empty() {
                                continue;
                            }
                            return Some((
                                Ok(Bytes::from(out)),
                                (upstream, recorder, Phase::Streaming, template),
                            ));
                        }
                        match raw {
                            Some(raw) => {
                                out.reserve(raw.len() + 8);
                                out.extend_from_slice(b"data: ");
                                out.extend_from_slice(raw.as_bytes());
                                out.extend_from_slice(b"\n\n");
                            }
                            None => push_event(&mut out, &value),
                        }
                        return Some((
                            Ok(Bytes::from(out)),
                            (upstream, recorder, Phase::Streaming, template),
                        ));
                    }
                    Some(Err(e)) => {
                        tracing::warn!("stream failed: {e}");
                        recorder.finish(Some((e.kind(), e.to_string())));
                        recorder.settle().await;
                        return Some((
                            Ok(sse_error(&e)),
                            (upstream, recorder, Phase::Done, template),
                        ));
                    }
                    None => {
                        let flushed = if guarded {
                            recorder.flush(&template)
                        } else {
                            None
                        };
                        let mut tail = flushed.map(|(fv, _)| {
                            recorder.acc.push(&fv);
                            sse_data(&fv.to_string())
                        });
                        // Detectors that call out judge the whole answer once
                        // it is complete; a block can only mark the end.
                        if has_ext && recorder.acc.chunks() > 0 {
                            let app = recorder.app.clone();
                            let snap = app.snapshot.load_full();
                            let text = recorder.acc.text().to_string();
                            let started = Instant::now();
                            let found = crate::policy::check_external(
                                &app.external,
                                &snap,
                                &recorder.constitution,
                                sluice_core::config::Applies::Output,
                                &text,
                            )
                            .await;
                            recorder
                                .policy
                                .add(&found, started.elapsed().as_micros() as u64, None);
                            if found
                                .iter()
                                .any(|f| f.action == sluice_core::config::PolicyAction::Block)
                            {
                                let mut v = if template.is_null() {
                                    json!({"object": "chat.completion.chunk"})
                                } else {
                                    template.clone()
                                };
                                v["choices"] = json!([{"index": 0, "delta": {}, "finish_reason": "content_filter"}]);
                                if let Some(o) = v.as_object_mut() {
                                    o.remove("usage");
                                }
                                let mut b = tail.map(|t| t.to_vec()).unwrap_or_default();
                                b.extend_from_slice(&sse_data(&v.to_string()));
                                tail = Some(Bytes::from(b));
                            }
                        }
                        recorder.finish(None);
                        recorder.settle().await;
                        return match tail {
                            Some(b) => {
                                Some((Ok(b), (upstream, recorder, Phase::Closing(None), template)))
                            }
                            None => Some((
                                Ok(Bytes::from_static(b"data: [DONE]\n\n")),
                                (upstream, recorder, Phase::Done, template),
                            )),
                        };
                    }
                }
            }
        },
    );
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    with_headers(
        resp,
        &headers_rec,
        &ctx.names,
        ctx.stage_header.as_ref(),
        policy_header,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_lowercase_hex_after_the_prefix() {
        let ids: Vec<String> = (0..2000).map(|_| new_request_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 36, "{id}");
            let hex = id.strip_prefix("req_").expect("prefix");
            assert!(
                hex.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
            assert!(HeaderValue::from_str(id).is_ok(), "{id}");
        }
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }
}
