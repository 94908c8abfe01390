//! The control plane's own thread: the rollout controller and, when
//! `admin_listen` is set, the admin listener run on a single-threaded
//! runtime of their own instead of the runtime that serves client traffic.
//!
//! A rollback is needed most when something is wrong, and the serving side
//! may be what is wrong: a handler blocking its thread, a detector stuck on
//! a pathological input, more work queued than the runtime can run. On its
//! own thread the control plane waits only for a share of the CPU, which the
//! kernel gives every thread, so neither an operator's rollback nor the
//! controller's automatic one depends on the serving runtime making
//! progress (tests `a_rollback_is_answered_while_client_serving_is_stuck`
//! and `the_controller_rolls_back_while_client_serving_is_stuck`). Under
//! plain overload it changes little: rollbacks were answered in about a
//! millisecond (median) up to 25 000 req/s on two cores either way
//! (bench/README.md, "Rollback under load").

use std::sync::Arc;
use std::time::Duration;

use sluice_core::config::ServerLimits;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::{admin_router, controller, server, AppState};

/// A running control plane; see the module docs.
pub(crate) struct ControlPlane {
    /// Resolves with whether the admin listener's connections drained
    /// within the grace period after the stop (absent without one).
    admin_drained: Option<oneshot::Receiver<bool>>,
    /// Tells the thread to stop the controller and end.
    end: oneshot::Sender<()>,
    /// Resolves when the thread's runtime is gone (with everything it held).
    finished: oneshot::Receiver<()>,
}

impl ControlPlane {
    /// Starts the thread. The admin listener, bound on the caller's runtime,
    /// moves to the new one; both fail here, not later, if they cannot.
    /// `pool_slot` gives the thread its own upstream connection pools (probe
    /// suites call providers from it).
    pub(crate) fn spawn(
        app: Arc<AppState>,
        admin: Option<TcpListener>,
        limits: ServerLimits,
        stop: watch::Receiver<bool>,
        grace: Duration,
        pool_slot: usize,
    ) -> std::io::Result<ControlPlane> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let admin = match admin {
            Some(l) => {
                let l = l.into_std()?;
                let _in_rt = rt.enter();
                Some(TcpListener::from_std(l)?)
            }
            None => None,
        };
        let (drained_tx, drained_rx) = oneshot::channel();
        let (end, end_rx) = oneshot::channel::<()>();
        let (finished_tx, finished) = oneshot::channel();
        let admin_drained = admin.is_some().then_some(drained_rx);
        std::thread::Builder::new()
            .name("sluice-control".into())
            .spawn(move || {
                sluice_providers::use_thread_pool(pool_slot);
                rt.block_on(async move {
                    let controller = tokio::spawn(controller::run(app.clone()));
                    if let Some(l) = admin {
                        let draining = server::serve(l, admin_router(app), limits, stop).await;
                        let deadline = tokio::time::Instant::now() + grace;
                        let _ = drained_tx.send(draining.finish(deadline).await);
                    }
                    // The controller keeps watching until the client side
                    // has drained too.
                    let _ = end_rx.await;
                    controller.abort();
                    let _ = controller.await;
                });
                drop(rt);
                let _ = finished_tx.send(());
            })?;
        Ok(ControlPlane {
            admin_drained,
            end,
            finished,
        })
    }

    /// Whether the admin listener drained in time (true without one).
    /// Call after the stop was signalled.
    pub(crate) async fn admin_drained(&mut self) -> Result<bool, std::io::Error> {
        match self.admin_drained.take() {
            Some(rx) => rx.await.map_err(|_| {
                std::io::Error::other("the control plane's thread ended without reporting")
            }),
            None => Ok(true),
        }
    }

    /// Stops the controller and waits for the thread to end.
    pub(crate) async fn end(self) {
        let _ = self.end.send(());
        let _ = self.finished.await;
    }
}
