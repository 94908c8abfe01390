//! The batching event writer.
//!
//! One OS thread owns the write connection. The request path calls
//! [`EventSender::record`], which never waits: it tries the bounded channel
//! and, when the channel is full, parks the record on a small task that waits
//! for room (counted as `delayed`). The writer takes whatever is queued, up to
//! `batch_max`, and commits it in one transaction, so under load each fsync
//! carries many records.
//!
//! Shutdown ([`EventWriter::shutdown`]) waits for parked records, then sends a
//! stop marker behind everything already queued, so every record handed over
//! before shutdown is committed before it returns.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::record::{insert_batch, RequestRecord};

enum Msg {
    Record(Box<RequestRecord>),
    Flush(oneshot::Sender<()>),
    Stop,
}

/// Counters describing the writer; shared with `/metrics`.
#[derive(Debug, Default)]
pub struct WriterStats {
    enqueued: AtomicU64,
    written: AtomicU64,
    delayed: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    batches: AtomicU64,
    write_errors: AtomicU64,
}

/// A point-in-time copy of [`WriterStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WriterStatsSnapshot {
    /// Records handed to the writer.
    pub enqueued: u64,
    /// Records committed.
    pub written: u64,
    /// Records that found the queue full and waited for room.
    pub delayed: u64,
    /// Records given up on after repeated write errors.
    pub failed: u64,
    /// Records handed over after the writer stopped.
    pub dropped: u64,
    /// Transactions committed.
    pub batches: u64,
    /// Failed write attempts (each retried).
    pub write_errors: u64,
}

impl WriterStats {
    /// Copies the counters.
    pub fn snapshot(&self) -> WriterStatsSnapshot {
        WriterStatsSnapshot {
            enqueued: self.enqueued.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }
}

struct Shared {
    stats: WriterStats,
    parked: AtomicUsize,
    parked_done: Notify,
}

/// The handle the request path uses to record events. Cheap to clone.
#[derive(Clone)]
pub struct EventSender {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl EventSender {
    /// Hands a record to the writer without waiting.
    pub fn record(&self, rec: RequestRecord) {
        let s = &self.shared;
        s.stats.enqueued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Msg::Record(Box::new(rec))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                s.stats.delayed.fetch_add(1, Ordering::Relaxed);
                s.parked.fetch_add(1, Ordering::SeqCst);
                let tx = self.tx.clone();
                let shared = self.shared.clone();
                let park = async move {
                    if tx.send(msg).await.is_err() {
                        shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::error!("event writer stopped; a request record was dropped");
                    }
                    shared.parked.fetch_sub(1, Ordering::SeqCst);
                    shared.parked_done.notify_waiters();
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        h.spawn(park);
                    }
                    Err(_) => futures_block_on(park),
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                s.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!("event writer stopped; a request record was dropped");
            }
        }
    }

    /// Waits until everything recorded so far is committed.
    pub async fn flush(&self) {
        self.wait_parked().await;
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    async fn wait_parked(&self) {
        loop {
            let notified = self.shared.parked_done.notified();
            if self.shared.parked.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The writer's counters.
    pub fn stats(&self) -> WriterStatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Records waiting in the queue right now.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Runs a future to completion on the current thread (only used when a record
/// is handed over outside any tokio runtime).
fn futures_block_on<F: std::future::Future<Output = ()>>(f: F) {
    match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt.block_on(f),
        Err(e) => tracing::error!("cannot build a runtime to park a record: {e}"),
    }
}

/// The writer thread and the means to stop it.
pub struct EventWriter {
    sender: EventSender,
    thread: Option<JoinHandle<()>>,
}

impl EventWriter {
    pub(crate) fn spawn(conn: Connection, capacity: usize, batch_max: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let shared = Arc::new(Shared {
            stats: WriterStats::default(),
            parked: AtomicUsize::new(0),
            parked_done: Notify::new(),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-writer".into())
            .spawn(move || run(conn, rx, batch_max.max(1), &thread_shared.stats))
            .expect("spawning the writer thread");
        EventWriter {
            sender: EventSender { tx, shared },
            thread: Some(thread),
        }
    }

    /// A sender for the request path.
    pub fn sender(&self) -> EventSender {
        self.sender.clone()
    }

    /// Commits everything handed over so far, stops the thread, and returns
    /// the final counters.
    pub async fn shutdown(mut self) -> WriterStatsSnapshot {
        self.sender.wait_parked().await;
        let _ = self.sender.tx.send(Msg::Stop).await;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.sender.stats()
    }
}

fn run(mut conn: Connection, mut rx: mpsc::Receiver<Msg>, batch_max: usize, stats: &WriterStats) {
    let mut batch: Vec<RequestRecord> = Vec::with_capacity(batch_max);
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let Some(first) = rx.blocking_recv() else {
            return;
        };
        let mut stop = false;
        let mut take = |m: Msg, batch: &mut Vec<RequestRecord>, acks: &mut Vec<_>| match m {
            Msg::Record(r) => batch.push(*r),
            Msg::Flush(a) => acks.push(a),
            Msg::Stop => stop = true,
        };
        take(first, &mut batch, &mut acks);
        while batch.len() < batch_max {
            match rx.try_recv() {
                Ok(m) => take(m, &mut batch, &mut acks),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write_with_retry(&mut conn, &batch, stats);
            batch.clear();
        }
        for a in acks.drain(..) {
            let _ = a.send(());
        }
        if stop {
            // Anything that raced in behind the marker is still written.
            rx.close();
            while let Ok(m) = rx.try_recv() {
                if let Msg::Record(r) = m {
                    batch.push(*r);
                }
            }
            if !batch.is_empty() {
                write_with_retry(&mut conn, &batch, stats);
            }
            return;
        }
    }
}

fn write_with_retry(conn: &mut Connection, batch: &[RequestRecord], stats: &WriterStats) {
    let mut delay = Duration::from_millis(20);
    for attempt in 1..=8 {
        match insert_batch(conn, batch) {
            Ok(()) => {
                stats
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    attempt,
                    records = batch.len(),
                    "store write failed: {e}; retrying"
                );
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    stats
        .failed
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    tracing::error!(
        records = batch.len(),
        "store write failed 8 times; these request records are lost (counted in sluice_events_failed_total)"
    );
}

#[cfg(test)]
mod tests {
    use crate::{RequestRecord, Store, StoreLocation};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_delays_but_loses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.db").to_string_lossy().to_string();
        let store = Store::open(StoreLocation::File(path)).expect("open");
        // A queue of 2 against 2000 concurrent records forces parking.
        let w = store.spawn_writer(2, 64).expect("writer");
        let mut tasks = Vec::new();
        for t in 0..20 {
            let tx = w.sender();
            tasks.push(tokio::spawn(async move {
                for i in 0..100 {
                    tx.record(RequestRecord::sample(&format!("r{t}-{i}")));
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let stats = w.shutdown().await;
        assert_eq!(stats.enqueued, 2000);
        assert_eq!(stats.written, 2000, "{stats:?}");
        assert!(stats.delayed > 0, "{stats:?}");
        assert_eq!(stats.dropped + stats.failed, 0);
        assert_eq!(store.count().expect("count"), 2000);
    }

    #[tokio::test]
    async fn flush_waits_for_commit() {
        let store = Store::open(StoreLocation::from_config(":memory:")).expect("open");
        let w = store.spawn_writer(128, 8).expect("writer");
        let tx = w.sender();
        for i in 0..50 {
            tx.record(RequestRecord::sample(&format!("f{i}")));
        }
        tx.flush().await;
        assert_eq!(store.count().expect("count"), 50);
        w.shutdown().await;
    }
}
