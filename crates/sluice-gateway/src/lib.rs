//! sluice's HTTP surface: the OpenAI-compatible API (`/v1/chat/completions`,
//! `/v1/models`), `/metrics`, `/healthz`, and the server lifecycle (bind,
//! serve, graceful shutdown that flushes every record).
//!
//! What this crate is not: it holds no domain logic of its own (that is in
//! `sluice-core`), no SQL (`sluice-store`) and no upstream wire protocols
//! (`sluice-providers`). It wires them into one request pipeline
//! ([`pipeline`]).

pub mod admin;
mod control;
pub mod controller;
pub mod error;
pub mod eval;
pub mod feedback;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod rollouts;
mod server;
pub mod shadow;
pub mod snapshot;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sluice_core::Config;
use sluice_store::{
    EventSender, EventWriter, Store, StoreError, StoreLocation, WriterStatsSnapshot,
};
use tokio::net::TcpListener;

pub use error::ApiError;
pub use snapshot::{EnvSecrets, SecretResolver, Snapshot};

/// Unix milliseconds now (the gateway's one clock read for records and
/// rollout state).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Shared state of a running gateway.
pub struct AppState {
    /// The current compiled configuration.
    pub snapshot: ArcSwap<Snapshot>,
    /// The live rollout states.
    pub rollouts: ArcSwap<rollouts::Rollouts>,
    /// Where request records go.
    pub events: EventSender,
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
    /// The store, for admin reads and rollout commits.
    pub store: Arc<Store>,
    /// Serialises admin changes (rollout transitions, reloads).
    pub admin_lock: tokio::sync::Mutex<()>,
    /// Where the config came from, for reloads.
    pub config_path: Option<PathBuf>,
    /// How secrets are resolved on reload.
    pub secrets: Arc<dyn SecretResolver + Send + Sync>,
    /// What the external detectors (judges, webhooks) share.
    pub external: policy::External,
    /// Chat completion requests being served now (for `max_in_flight`).
    pub in_flight: Arc<AtomicUsize>,
    /// Work a request leaves running after its answer (shadow calls), which
    /// shutdown waits for so that their records are written.
    pub background: Arc<Background>,
}

/// A count of background tasks that shutdown waits for.
#[derive(Debug, Default)]
pub struct Background {
    running: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Held by a background task while it runs.
#[derive(Debug)]
pub struct BackgroundGuard(Arc<Background>);

impl Background {
    /// Counts a task as running until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> BackgroundGuard {
        self.running.fetch_add(1, Ordering::AcqRel);
        BackgroundGuard(self.clone())
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Resolves once no task is running.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for BackgroundGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl AppState {
    /// Hands a finished record to the writer. Bodies are redacted first when
    /// `log_bodies = "redacted"`; with `durability = "strict"` the returned
    /// receiver resolves once the record is committed.
    pub fn record(
        &self,
        mut rec: sluice_store::RequestRecord,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let snap = self.snapshot.load();
        let store = &snap.config.store;
        if store.log_bodies == sluice_core::config::LogBodies::Redacted {
            let redact = sluice_core::policy::redact_sensitive;
            rec.request_body = rec.request_body.as_deref().map(redact);
            rec.response_body = rec.response_body.as_deref().map(redact);
        }
        if store.durability == sluice_core::config::Durability::Strict {
            Some(self.events.record_committed(rec))
        } else {
            self.events.record(rec);
            None
        }
    }
}

/// Where a gateway's configuration comes from.
pub struct ConfigSource {
    /// The parsed config.
    pub config: Config,
    /// The file it was read from (enables reloads; relative prompt files are
    /// read next to it).
    pub path: Option<PathBuf>,
}

impl From<Config> for ConfigSource {
    fn from(config: Config) -> Self {
        ConfigSource { config, path: None }
    }
}

/// Why the gateway could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration could not be compiled (secrets, provider clients).
    #[error("cannot start with this configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// What happened during shutdown.
#[derive(Debug, Clone, Copy)]
pub struct ShutdownReport {
    /// Final event writer counters: `written` equals `enqueued` when nothing
    /// was lost.
    pub events: WriterStatsSnapshot,
    /// Whether in-flight requests finished before the grace period ran out.
    pub drained: bool,
}

/// What the store looked like when the gateway opened it.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    /// Schema version after migrations.
    pub schema: i64,
    /// Records replayed from a spill journal a previous process left.
    pub replayed: u64,
}

/// Binds `addr` with an accept queue of `backlog` connections (the kernel
/// caps it at `net.core.somaxconn`). The usual default of 128 overflows in a
/// burst of new connections, and every connection it drops waits out a
/// one-second SYN retransmit.
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A bound, ready-to-serve gateway.
pub struct Gateway {
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    recovery: RecoveryReport,
    app: Arc<AppState>,
    writer: EventWriter,
    store: Arc<Store>,
}

impl Gateway {
    /// Opens the store, compiles the config, loads rollout states and binds
    /// the listen address.
    pub async fn bind(
        source: impl Into<ConfigSource>,
        secrets: Arc<dyn SecretResolver + Send + Sync>,
    ) -> Result<Gateway, GatewayError> {
        let ConfigSource { config, path } = source.into();
        let store = Arc::new(Store::open(StoreLocation::from_config(&config.store.path))?);
        // A crash cannot corrupt SQLite (WAL); say so, or say what is wrong.
        store.quick_check()?;
        let writer = store.spawn_writer_with(sluice_store::WriterOptions {
            capacity: config.store.queue_capacity,
            batch_max: config.store.batch_max,
            backpressure: config.store.on_backpressure,
            journal: store.journal_path(),
            commit_window: config.store.commit_window,
        })?;
        let recovery = RecoveryReport {
            schema: store.schema_version()?,
            replayed: writer.recovered(),
        };
        tracing::info!(
            store = %config.store.path,
            schema = recovery.schema,
            replayed = recovery.replayed,
            "store opened: integrity ok{}",
            if recovery.replayed > 0 {
                format!(
                    ", {} request records recovered from the spill journal",
                    recovery.replayed
                )
            } else {
                String::new()
            }
        );
        let addr = config.listen;
        let admin_addr = config.admin_listen;
        let backlog = config.limits.listen_backlog;
        let base = path
            .as_deref()
            .and_then(|p| p.parent())
            .map(|p| p.to_path_buf());
        let rollouts =
            rollouts::Rollouts::load(&config, &store, None).map_err(GatewayError::Config)?;
        let snapshot = Snapshot::build(config, secrets.as_ref(), base.as_deref())
            .map_err(GatewayError::Config)?;
        let listener =
            listen(addr, backlog).map_err(|source| GatewayError::Bind { addr, source })?;
        let admin_listener = match admin_addr {
            Some(addr) => {
                if !addr.ip().is_loopback() {
                    tracing::warn!(%addr, "the admin API listens beyond loopback; keep it behind a firewall");
                }
                Some(listen(addr, backlog).map_err(|source| GatewayError::Bind { addr, source })?)
            }
            None => None,
        };
        let health = snapshot
            .providers
            .values()
            .map(|u| u.health.clone())
            .collect();
        let events = writer.sender();
        let app = Arc::new(AppState {
            snapshot: ArcSwap::from_pointee(snapshot),
            rollouts: ArcSwap::from_pointee(rollouts),
            metrics: metrics::Metrics::new(events.clone()),
            events,
            store: store.clone(),
            admin_lock: tokio::sync::Mutex::new(()),
            config_path: path,
            secrets,
            external: policy::External::default(),
            in_flight: Arc::default(),
            background: Arc::default(),
        });
        app.metrics.set_health(health);
        Ok(Gateway {
            listener,
            admin_listener,
            recovery,
            app,
            writer,
            store,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.app.snapshot.load().config.listen)
    }

    /// The admin API's own address, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// What startup found in the store.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The store (for reads; writes go through the event writer).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Shared state (for embedding and tests).
    pub fn state(&self) -> Arc<AppState> {
        self.app.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests and streams finish for up to `grace`, and flushes every
    /// record to the store before returning.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
    ) -> Result<ShutdownReport, GatewayError> {
        let Gateway {
            listener,
            admin_listener,
            recovery: _,
            app,
            writer,
            store: _store,
        } = self;
        let limits = app.snapshot.load().config.limits.clone();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let has_admin = admin_listener.is_some();
        // The controller and the admin listener get a thread of their own,
        // so a rollback does not wait on the runtime serving clients.
        let mut control = control::ControlPlane::spawn(
            app.clone(),
            admin_listener,
            limits.clone(),
            stop_rx.clone(),
            grace,
            limits.workers + 1,
        )
        .map_err(GatewayError::Serve)?;
        #[cfg(unix)]
        let hup = {
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(mut sig) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                else {
                    tracing::error!("cannot listen for SIGHUP; use POST /admin/reload");
                    return;
                };
                while sig.recv().await.is_some() {
                    match admin::reload(&app).await {
                        Ok(()) => tracing::info!("configuration reloaded (SIGHUP)"),
                        Err(problems) => tracing::error!(
                            "reload refused, still serving the previous configuration:\n  {}",
                            problems.join("\n  ")
                        ),
                    }
                }
            })
        };
        let mut servers = Vec::new();
        let client_router = if has_admin {
            public_router(app.clone())
        } else {
            router(app.clone())
        };
        // Both carry the chat route.
        let client_router = server::Routes {
            router: client_router,
            chat: Some(app.clone()),
        };
        let serving = match limits.workers {
            // The caller's work-stealing runtime: a thread that falls behind
            // has its work taken by the others.
            0 => {
                servers.push(tokio::spawn(server::serve(
                    listener,
                    client_router,
                    limits.clone(),
                    stop_rx.clone(),
                )));
                Vec::new()
            }
            threads => {
                tracing::info!(threads, "serving client connections on dedicated threads");
                server::serve_on_threads(
                    listener,
                    client_router,
                    limits.clone(),
                    stop_rx.clone(),
                    grace,
                    (threads, app.metrics.offloaded()),
                )
                .map_err(GatewayError::Serve)?
            }
        };
        shutdown.await;
        let _ = stop_tx.send(true);
        tracing::info!(
            ?grace,
            "stopping: no new connections; finishing requests in flight"
        );
        let mut drained = true;
        let deadline = tokio::time::Instant::now() + grace;
        for s in servers {
            match s.await {
                Ok(d) => drained &= d.finish(deadline).await,
                Err(e) => return Err(GatewayError::Serve(std::io::Error::other(e))),
            }
        }
        for done in serving {
            match done.await {
                Ok(Ok(d)) => drained &= d,
                Ok(Err(e)) => return Err(GatewayError::Serve(e)),
                Err(_) => {
                    return Err(GatewayError::Serve(std::io::Error::other(
                        "a serving thread ended without reporting (it panicked)",
                    )))
                }
            }
        }
        drained &= control.admin_drained().await.map_err(GatewayError::Serve)?;
        if !drained {
            tracing::warn!(
                ?grace,
                "in-flight requests did not finish within the grace period; stopping"
            );
        }
        // Shadow calls still running record what they saw: wait for them
        // (each is bounded by its stage's timeout) up to the deadline.
        if tokio::time::timeout_at(deadline, app.background.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                running = app.background.running(),
                "shadow calls still running at the end of the grace period; their records are dropped"
            );
        }
        // Give in-flight stream bodies dropped by the deadline a moment to
        // hand their records over, then flush everything.
        tokio::task::yield_now().await;
        control.end().await;
        #[cfg(unix)]
        hup.abort();
        drop(app);
        let events = writer.shutdown().await;
        Ok(ShutdownReport { events, drained })
    }
}

/// Every route on one address (no `admin_listen`).
pub fn router(app: Arc<AppState>) -> Router {
    finish_router(
        admin_routes(public_routes(Router::new())).route("/metrics", get(metrics_text)),
        app,
    )
}

/// The client-facing routes only (when the admin API has its own address).
pub fn public_router(app: Arc<AppState>) -> Router {
    finish_router(public_routes(Router::new()), app)
}

/// The admin API with `/metrics` and `/healthz` (its own address).
pub fn admin_router(app: Arc<AppState>) -> Router {
    finish_router(
        admin_routes(Router::new())
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics_text)),
        app,
    )
}

fn public_routes(r: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    r.route(pipeline::CHAT_PATH, post(pipeline::chat_completions))
        .route("/v1/feedback", post(feedback::feedback))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/healthz", get(healthz))
}

fn admin_routes(r: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    r.route("/admin/rollouts", get(admin::list))
        .route("/admin/rollouts/{name}", get(admin::show))
        .route("/admin/rollouts/{name}/{action}", post(admin::act))
        .route("/admin/reload", post(admin::reload_handler))
        .route("/admin/providers", get(admin::providers))
}

fn finish_router(r: Router<Arc<AppState>>, app: Arc<AppState>) -> Router {
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

fn model_object(name: &str) -> serde_json::Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "sluice"})
}

async fn list_models(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let snap = app.snapshot.load();
    let key = match pipeline::authenticate(&snap, &headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let data: Vec<_> = snap
        .deployments
        .keys()
        .filter(|d| key.is_none_or(|k| k.may_use(d)))
        .map(|d| model_object(d))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(model): Path<String>,
) -> Response {
    let snap = app.snapshot.load();
    let key = match pipeline::authenticate(&snap, &headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    match pipeline::resolve(&snap, key, &model) {
        Ok(d) => Json(model_object(&d.config.name)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn healthz(State(app): State<Arc<AppState>>) -> Response {
    let s = app.events.stats();
    Json(json!({
        "status": "ok",
        "deployments": app.snapshot.load().deployments.len(),
        "events": {
            "enqueued": s.enqueued, "written": s.written, "failed": s.failed,
            "dropped": s.dropped, "shed": s.shed, "spilled": s.spilled, "replayed": s.replayed,
            "journal_depth": app.events.journal_depth(),
        },
    }))
    .into_response()
}

async fn metrics_text(State(app): State<Arc<AppState>>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::route_not_found(method.as_str(), uri.path()).into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::method_not_allowed().into_response()
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// With the default `listen_backlog`, a burst of connections larger than
    /// the usual 128-connection accept queue is held by the kernel until
    /// accepted, instead of having its SYNs dropped (a one-second stall for
    /// every dropped client).
    #[tokio::test]
    async fn the_accept_queue_holds_a_burst_larger_than_128() {
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if somaxconn.is_some_and(|m| m < 512) {
            eprintln!("skipped: net.core.somaxconn is below 512 on this machine");
            return;
        }
        let backlog = sluice_core::config::ServerLimits::default().listen_backlog;
        let listener = super::listen("127.0.0.1:0".parse().unwrap(), backlog).unwrap();
        let addr = listener.local_addr().unwrap();
        // Nothing accepts: every connection waits in the kernel's queue.
        let held = tokio::task::spawn_blocking(move || {
            let mut held = Vec::new();
            for i in 0..400 {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Ok(s) => held.push(s),
                    Err(e) => return Err(format!("connection {i} was not queued: {e}")),
                }
            }
            Ok(held.len())
        })
        .await
        .unwrap();
        assert_eq!(held, Ok(400));
        drop(listener);
    }
}
