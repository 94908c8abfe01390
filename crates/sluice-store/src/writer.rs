//! The batching event writer.
//!
//! One OS thread owns the write connection. The request path calls
//! [`EventSender::record`], which never waits: it tries the bounded channel,
//! and when the channel is full it follows the configured backpressure:
//! - `spill`: the record is appended to an on-disk journal next to the store
//!   (one JSON line, written through to the OS so a process crash keeps it);
//!   the writer replays the journal into the store as soon as its queue is
//!   empty again, on every flush, at shutdown, and at the next startup;
//! - `shed`: the record is dropped and counted (`sluice_events_shed_total`).
//!
//! The writer takes whatever is queued, up to `batch_max` records or
//! `commit_window` after the first, and commits it in one transaction, so
//! under load each commit carries many records, while a record never waits
//! more than the window (and with an idle queue it is committed as soon as it
//! arrives). A crash therefore loses at most the records of the last window.
//!
//! Strict durability uses [`EventSender::record_committed`], which resolves
//! once the record's transaction has committed.
//!
//! Shutdown ([`EventWriter::shutdown`]) sends a stop marker behind everything
//! already queued and replays the journal, so every record handed over
//! before shutdown is committed before it returns.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use serde::Serialize;
use sluice_core::config::Backpressure;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::record::{insert_prefix, RequestRecord};
use crate::write_gate::WriteGate;

type Ack = oneshot::Sender<()>;

enum Msg {
    Record(Box<RequestRecord>, Option<Ack>),
    Flush(Ack),
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
    shed: AtomicU64,
    spilled: AtomicU64,
    replayed: AtomicU64,
    batches: AtomicU64,
    write_errors: AtomicU64,
}

/// A point-in-time copy of [`WriterStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WriterStatsSnapshot {
    /// Records handed to the writer.
    pub enqueued: u64,
    /// Records committed (directly or replayed from the journal).
    pub written: u64,
    /// Strictly durable records that found the queue full and waited.
    pub delayed: u64,
    /// Records given up on after repeated write errors (or unreadable
    /// journal lines).
    pub failed: u64,
    /// Records handed over after the writer stopped.
    pub dropped: u64,
    /// Records dropped because the queue was full (`on_backpressure = "shed"`,
    /// or a journal that could not be written).
    pub shed: u64,
    /// Records written to the spill journal because the queue was full.
    pub spilled: u64,
    /// Journal records committed to the store (included in `written`).
    pub replayed: u64,
    /// Transactions committed.
    pub batches: u64,
    /// Failed write attempts (each retried).
    pub write_errors: u64,
}

impl WriterStatsSnapshot {
    /// Records lost for good: failed, dropped or shed.
    pub fn lost(&self) -> u64 {
        self.failed + self.dropped + self.shed
    }
}

impl WriterStats {
    /// Copies the counters.
    pub fn snapshot(&self) -> WriterStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WriterStatsSnapshot {
            enqueued: l(&self.enqueued),
            written: l(&self.written),
            delayed: l(&self.delayed),
            failed: l(&self.failed),
            dropped: l(&self.dropped),
            shed: l(&self.shed),
            spilled: l(&self.spilled),
            replayed: l(&self.replayed),
            batches: l(&self.batches),
            write_errors: l(&self.write_errors),
        }
    }
}

/// The spill journal: JSON lines appended by the request path when the
/// queue is full, replayed by the writer.
///
/// Its record count is changed only here, under the journal's lock, so a
/// record spilled while the writer moves the journal aside is counted
/// against the next journal, never wiped with the old one.
struct Journal {
    path: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    /// Records in the journal not yet taken for replay; read lock-free by
    /// the writer and `/metrics`.
    pending: Arc<AtomicU64>,
}

impl Journal {
    fn replaying_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".replaying");
        PathBuf::from(p)
    }

    fn append(&mut self, rec: &RequestRecord) -> std::io::Result<()> {
        if self.file.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.file = Some(std::io::BufWriter::new(f));
        }
        let Some(f) = self.file.as_mut() else {
            return Err(std::io::Error::other("journal not open"));
        };
        let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        line.push(b'\n');
        f.write_all(&line)?;
        // Through to the OS: a process crash keeps it.
        f.flush()?;
        self.pending.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Moves the journal aside for replay; returns the file to replay. The
    /// record count drops to zero only once the journal has been moved (a
    /// journal that could not be moved stays counted, so it is retried).
    fn take(&mut self) -> Option<PathBuf> {
        let aside = self.replaying_path();
        if let Some(mut f) = self.file.take() {
            let _ = f.flush();
        }
        match self.move_to(&aside) {
            Ok(()) => self.pending.store(0, Ordering::Release),
            Err(e) => tracing::error!(
                "cannot move the spill journal {} to {}: {e}",
                self.path.display(),
                aside.display()
            ),
        }
        aside.exists().then_some(aside)
    }

    /// Moves the journal's records to `aside`: renamed there, or appended to
    /// what a replay that did not finish (a crash) left there. A missing
    /// journal has nothing to move.
    fn move_to(&self, aside: &std::path::Path) -> std::io::Result<()> {
        use std::io::ErrorKind::NotFound;
        if !aside.exists() {
            return match std::fs::rename(&self.path, aside) {
                Err(e) if e.kind() == NotFound => Ok(()),
                r => r,
            };
        }
        let text = match std::fs::read(&self.path) {
            Err(e) if e.kind() == NotFound => return Ok(()),
            r => r?,
        };
        std::fs::OpenOptions::new()
            .append(true)
            .open(aside)?
            .write_all(&text)?;
        let _ = std::fs::remove_file(&self.path);
        Ok(())
    }
}

struct Shared {
    stats: WriterStats,
    backpressure: Backpressure,
    journal: Option<Mutex<Journal>>,
    journal_pending: Arc<AtomicU64>,
    parked: AtomicUsize,
    parked_done: Notify,
    /// The writer thread, woken early when someone waits on a commit.
    thread: std::sync::OnceLock<std::thread::Thread>,
    /// Turns at the write lock with rollout transitions.
    gate: Arc<WriteGate>,
}

impl Shared {
    fn new(backpressure: Backpressure, journal: Option<PathBuf>, gate: Arc<WriteGate>) -> Self {
        let journal_pending = Arc::new(AtomicU64::new(0));
        Shared {
            stats: WriterStats::default(),
            backpressure,
            journal: journal.map(|path| {
                Mutex::new(Journal {
                    path,
                    file: None,
                    pending: journal_pending.clone(),
                })
            }),
            journal_pending,
            parked: AtomicUsize::new(0),
            parked_done: Notify::new(),
            thread: std::sync::OnceLock::new(),
            gate,
        }
    }

    /// Ends the writer's gathering wait now: a sender waits on the batch.
    fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    fn journal(&self) -> Option<std::sync::MutexGuard<'_, Journal>> {
        self.journal
            .as_ref()
            .map(|j| j.lock().unwrap_or_else(|p| p.into_inner()))
    }
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
        match self.tx.try_send(Msg::Record(Box::new(rec), None)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Msg::Record(rec, _))) => self.overflow(&rec),
            Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                s.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!("event writer stopped; a request record was dropped");
            }
        }
    }

    fn overflow(&self, rec: &RequestRecord) {
        let s = &self.shared;
        if s.backpressure == Backpressure::Spill {
            if let Some(mut j) = s.journal() {
                match j.append(rec) {
                    Ok(()) => {
                        s.stats.spilled.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => tracing::error!(
                        "cannot append to the spill journal {}: {e}; shedding the record",
                        j.path.display()
                    ),
                }
            }
        }
        let n = s.stats.shed.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                shed_total = n,
                "event queue full: request records are being dropped (on_backpressure = \"shed\"); \
                 see sluice_events_shed_total"
            );
        }
    }

    /// Hands a record to the writer; the returned receiver resolves once it
    /// is committed (or the writer gave up on it). A full queue makes this
    /// record wait for room, never spill or shed.
    pub fn record_committed(&self, rec: RequestRecord) -> oneshot::Receiver<()> {
        let s = &self.shared;
        s.stats.enqueued.fetch_add(1, Ordering::Relaxed);
        let (ack, done) = oneshot::channel();
        match self.tx.try_send(Msg::Record(Box::new(rec), Some(ack))) {
            Ok(()) => s.wake(),
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
                    shared.wake();
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
        done
    }

    /// Waits until everything recorded so far (spilled records included) is
    /// committed.
    pub async fn flush(&self) {
        self.wait_parked().await;
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).await.is_ok() {
            self.shared.wake();
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

    /// Records waiting in the spill journal right now.
    pub fn journal_depth(&self) -> u64 {
        self.shared.journal_pending.load(Ordering::Acquire)
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

/// How the writer behaves.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Capacity of the queue between the request path and the writer.
    pub capacity: usize,
    /// Most records per transaction.
    pub batch_max: usize,
    /// What a full queue does.
    pub backpressure: Backpressure,
    /// Where spilled records go (`None`: spilling sheds).
    pub journal: Option<PathBuf>,
    /// Longest a batch keeps gathering records before it is committed.
    pub commit_window: Duration,
}

/// The writer thread and the means to stop it.
pub struct EventWriter {
    sender: EventSender,
    thread: Option<JoinHandle<()>>,
    recovered: u64,
}

impl EventWriter {
    pub(crate) fn spawn(mut conn: Connection, opts: WriterOptions, gate: Arc<WriteGate>) -> Self {
        let (tx, rx) = mpsc::channel(opts.capacity.max(1));
        let shared = Arc::new(Shared::new(opts.backpressure, opts.journal, gate));
        let batch_max = opts.batch_max.max(1);
        let window = opts.commit_window;
        // Whatever a previous process left in the journal goes in first.
        let recovered = replay(&mut conn, &shared, batch_max);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-writer".into())
            .spawn(move || {
                let _ = thread_shared.thread.set(std::thread::current());
                lower_priority();
                run(conn, rx, batch_max, window, &thread_shared)
            })
            .expect("spawning the writer thread");
        EventWriter {
            sender: EventSender { tx, shared },
            thread: Some(thread),
            recovered,
        }
    }

    /// A sender for the request path.
    pub fn sender(&self) -> EventSender {
        self.sender.clone()
    }

    /// Records replayed from a spill journal left by a previous process.
    pub fn recovered(&self) -> u64 {
        self.recovered
    }

    /// Commits everything handed over so far, stops the thread, and returns
    /// the final counters.
    pub async fn shutdown(mut self) -> WriterStatsSnapshot {
        self.sender.wait_parked().await;
        let _ = self.sender.tx.send(Msg::Stop).await;
        self.sender.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.sender.stats()
    }
}

/// Lowers this thread's scheduling priority (nice 10), so that on a busy
/// machine a group commit yields the CPU to requests being served instead
/// of delaying them; the writer has a whole commit window of slack.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority only read their integer arguments;
    // on Linux a thread id names just this thread for PRIO_PROCESS.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, 10) != 0 {
            tracing::debug!("could not lower the writer thread's priority");
        }
    }
}

/// Replays the spill journal into the store; returns the records committed.
fn replay(conn: &mut Connection, shared: &Shared, batch_max: usize) -> u64 {
    let Some(path) = shared.journal().and_then(|mut j| j.take()) else {
        return 0;
    };
    let stats = &shared.stats;
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("cannot read the spill journal {}: {e}", path.display());
            return 0;
        }
    };
    let before = stats.written.load(Ordering::Relaxed);
    let mut batch = Vec::with_capacity(batch_max);
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(
                    "spill journal {} unreadable at line {}: {e}",
                    path.display(),
                    n + 1
                );
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<RequestRecord>(&line) {
            Ok(r) => batch.push(r),
            Err(e) => {
                // A torn last line from a crash mid-append.
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "spill journal {} line {} is not a record ({e}); skipped",
                    path.display(),
                    n + 1
                );
            }
        }
        if batch.len() >= batch_max {
            write_with_retry(conn, &batch, shared);
            batch.clear();
        }
    }
    if !batch.is_empty() {
        write_with_retry(conn, &batch, shared);
    }
    let n = stats.written.load(Ordering::Relaxed) - before;
    stats.replayed.fetch_add(n, Ordering::Relaxed);
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::error!("cannot remove the replayed journal {}: {e}", path.display());
    }
    n
}

/// Sorts one message into the batch, its acks, or the flushes; returns
/// whether it is the stop marker.
fn take(
    m: Msg,
    batch: &mut Vec<RequestRecord>,
    acks: &mut Vec<Ack>,
    flushes: &mut Vec<Ack>,
) -> bool {
    match m {
        Msg::Record(r, ack) => {
            batch.push(*r);
            acks.extend(ack);
            false
        }
        Msg::Flush(a) => {
            flushes.push(a);
            false
        }
        Msg::Stop => true,
    }
}

fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Msg>,
    batch_max: usize,
    window: Duration,
    shared: &Shared,
) {
    let mut batch: Vec<RequestRecord> = Vec::with_capacity(batch_max);
    let mut acks: Vec<Ack> = Vec::new();
    let mut flushes: Vec<Ack> = Vec::new();
    loop {
        let Some(first) = rx.blocking_recv() else {
            return;
        };
        let mut stop = take(first, &mut batch, &mut acks, &mut flushes);
        // Group commit: gather for up to half the window (the other half is
        // the commit's own budget), unless someone waits on this batch
        // (strict durability, a flush, shutdown) or it is full. One commit
        // per window instead of one per record is most of the writer's CPU.
        // The wait is one sleep, not a poll: whoever waits on this batch
        // wakes the thread, so a busy gateway sees one writer wakeup per
        // window instead of hundreds.
        let opened = std::time::Instant::now();
        let gather = window / 2;
        loop {
            match rx.try_recv() {
                Ok(m) => {
                    stop |= take(m, &mut batch, &mut acks, &mut flushes);
                    if batch.len() >= batch_max {
                        break;
                    }
                }
                Err(_) => {
                    let waited = opened.elapsed();
                    if stop || !acks.is_empty() || !flushes.is_empty() || waited >= gather {
                        break;
                    }
                    std::thread::park_timeout(gather - waited);
                }
            }
        }
        if !batch.is_empty() {
            write_with_retry(&mut conn, &batch, shared);
            batch.clear();
        }
        for a in acks.drain(..) {
            let _ = a.send(());
        }
        // Spilled records go in once the queue has drained (or on demand).
        let pending = shared.journal_pending.load(Ordering::Acquire) > 0;
        if pending && (rx.is_empty() || !flushes.is_empty() || stop) {
            replay(&mut conn, shared, batch_max);
        }
        for a in flushes.drain(..) {
            let _ = a.send(());
        }
        if stop {
            // Anything that raced in behind the marker is still written.
            rx.close();
            while let Ok(m) = rx.try_recv() {
                if let Msg::Record(r, ack) = m {
                    batch.push(*r);
                    acks.extend(ack);
                }
            }
            if !batch.is_empty() {
                write_with_retry(&mut conn, &batch, shared);
            }
            for a in acks.drain(..) {
                let _ = a.send(());
            }
            replay(&mut conn, shared, batch_max);
            return;
        }
    }
}

/// Commits `batch`, in more than one transaction when a rollout transition
/// wants the write lock meanwhile (see [`crate::write_gate`]), retrying a failed
/// transaction with backoff; records still failing after 8 tries are
/// counted as failed.
fn write_with_retry(conn: &mut Connection, batch: &[RequestRecord], shared: &Shared) {
    let stats = &shared.stats;
    let mut rest = batch;
    let mut delay = Duration::from_millis(20);
    let mut attempt = 1;
    while !rest.is_empty() {
        let turn = shared.gate.writer();
        let result = insert_prefix(conn, rest, || shared.gate.wanted());
        drop(turn);
        match result {
            Ok(n) => {
                stats.written.fetch_add(n as u64, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                rest = &rest[n..];
                attempt = 1;
                delay = Duration::from_millis(20);
            }
            Err(e) => {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                if attempt == 8 {
                    stats.failed.fetch_add(rest.len() as u64, Ordering::Relaxed);
                    tracing::error!(
                        records = rest.len(),
                        "store write failed 8 times: {e}; these request records are lost (counted in sluice_events_failed_total)"
                    );
                    return;
                }
                tracing::warn!(
                    attempt,
                    records = rest.len(),
                    "store write failed: {e}; retrying"
                );
                attempt += 1;
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WriterOptions;
    use crate::{RequestRecord, Store, StoreLocation};
    use sluice_core::config::Backpressure;

    fn opts(capacity: usize, backpressure: Backpressure, dir: &std::path::Path) -> WriterOptions {
        WriterOptions {
            capacity,
            batch_max: 64,
            backpressure,
            journal: Some(dir.join("w.db.spill")),
            commit_window: std::time::Duration::from_millis(50),
        }
    }

    async fn hammer(w: &super::EventWriter, tasks: usize, each: usize) {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let tx = w.sender();
            handles.push(tokio::spawn(async move {
                for i in 0..each {
                    tx.record(RequestRecord::sample(&format!("r{t}-{i}")));
                }
            }));
        }
        for h in handles {
            h.await.expect("task");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_spills_to_the_journal_and_loses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.db").to_string_lossy().to_string();
        let store = Store::open(StoreLocation::File(path)).expect("open");
        // A queue of 2 against 2000 records from 20 tasks forces spilling.
        let w = store
            .spawn_writer_with(opts(2, Backpressure::Spill, dir.path()))
            .expect("writer");
        hammer(&w, 20, 100).await;
        w.sender().flush().await;
        assert_eq!(store.count().expect("count"), 2000);
        let stats = w.shutdown().await;
        assert_eq!(stats.enqueued, 2000);
        assert_eq!(stats.written, 2000, "{stats:?}");
        assert!(stats.spilled > 0, "{stats:?}");
        assert_eq!(stats.replayed, stats.spilled, "{stats:?}");
        assert_eq!(stats.lost(), 0, "{stats:?}");
        assert!(!dir.path().join("w.db.spill").exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shedding_counts_every_dropped_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.db").to_string_lossy().to_string();
        let store = Store::open(StoreLocation::File(path)).expect("open");
        let w = store
            .spawn_writer_with(opts(2, Backpressure::Shed, dir.path()))
            .expect("writer");
        hammer(&w, 20, 100).await;
        let stats = w.shutdown().await;
        assert!(stats.shed > 0, "{stats:?}");
        assert_eq!(stats.written + stats.shed, 2000, "{stats:?}");
        assert_eq!(store.count().expect("count") as u64, stats.written);
    }

    #[tokio::test]
    async fn a_journal_left_by_a_crash_is_replayed_at_startup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.db").to_string_lossy().to_string();
        let store = Store::open(StoreLocation::File(path)).expect("open");
        let mut text = String::new();
        for i in 0..5 {
            text.push_str(
                &serde_json::to_string(&RequestRecord::sample(&format!("j{i}"))).expect("json"),
            );
            text.push('\n');
        }
        // A torn last line, as a crash mid-append leaves it.
        text.push_str("{\"id\":\"j5\",\"ts_");
        std::fs::write(dir.path().join("w.db.spill"), text).expect("write");
        let w = store
            .spawn_writer_with(opts(16, Backpressure::Spill, dir.path()))
            .expect("writer");
        assert_eq!(w.recovered(), 5);
        assert_eq!(store.count().expect("count"), 5);
        let stats = w.shutdown().await;
        assert_eq!(stats.failed, 1, "the torn line is counted");
    }

    /// A crash in the middle of a replay leaves the journal moved aside and
    /// possibly a newer journal next to it: both go in at the next start,
    /// each record once.
    #[tokio::test]
    async fn an_interrupted_replay_and_a_newer_journal_are_both_recovered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.db").to_string_lossy().to_string();
        let store = Store::open(StoreLocation::File(path)).expect("open");
        let lines = |prefix: &str, n: usize| {
            (0..n)
                .map(|i| {
                    serde_json::to_string(&RequestRecord::sample(&format!("{prefix}{i}")))
                        .expect("json")
                        + "\n"
                })
                .collect::<String>()
        };
        std::fs::write(dir.path().join("w.db.spill.replaying"), lines("old", 3)).expect("write");
        std::fs::write(dir.path().join("w.db.spill"), lines("new", 4)).expect("write");
        let w = store
            .spawn_writer_with(opts(16, Backpressure::Spill, dir.path()))
            .expect("writer");
        assert_eq!(w.recovered(), 7);
        assert_eq!(store.count().expect("count"), 7);
        assert!(!dir.path().join("w.db.spill").exists());
        assert!(!dir.path().join("w.db.spill.replaying").exists());
        assert_eq!(w.sender().journal_depth(), 0);
        let stats = w.shutdown().await;
        assert_eq!(stats.lost(), 0, "{stats:?}");
    }

    #[tokio::test]
    async fn record_committed_resolves_after_commit() {
        let store = Store::open(StoreLocation::from_config(":memory:")).expect("open");
        let w = store.spawn_writer(1, 8).expect("writer");
        let tx = w.sender();
        let mut acks = Vec::new();
        for i in 0..20 {
            acks.push(tx.record_committed(RequestRecord::sample(&format!("s{i}"))));
        }
        for a in acks {
            a.await.expect("acked");
        }
        assert_eq!(store.count().expect("count"), 20);
        w.shutdown().await;
    }

    /// A rollout transition waiting at the write lock goes first: the writer
    /// starts no transaction while one waits, and commits what it has at the
    /// next statement when one arrives, the rest of its batch following.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_rollout_transition_goes_before_the_next_group() {
        let store = Store::open(StoreLocation::from_config(":memory:")).expect("open");
        let w = store.spawn_writer(4096, 1024).expect("writer");
        let tx = w.sender();
        let turn = store.gate.priority();
        let ack = tx.record_committed(RequestRecord::sample("held"));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(
            store.count().expect("count"),
            0,
            "the writer committed while a transition waited"
        );
        drop(turn);
        ack.await.expect("acked");
        assert_eq!(store.count().expect("count"), 1);

        // A batch cut short at the first statement when the gate is wanted.
        let records: Vec<RequestRecord> = (0..40)
            .map(|i| RequestRecord::sample(&format!("cut{i}")))
            .collect();
        let mut conn = store.location.connect().expect("connect");
        let n = crate::record::insert_prefix(&mut conn, &records, || true).expect("insert");
        assert_eq!(n, 16, "one statement's worth, then the turn is given up");
        let rest =
            crate::record::insert_prefix(&mut conn, &records[n..], || false).expect("insert");
        assert_eq!(rest, 24);
        assert_eq!(store.count().expect("count"), 41);
        let stats = w.shutdown().await;
        assert_eq!(stats.lost(), 0, "{stats:?}");
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

    /// Records spilled while the writer moves the journal aside for replay
    /// stay counted, so the next flush replays them instead of leaving them
    /// on disk until shutdown. Many short rounds, each checked once its
    /// appenders stop, give the interleaving many chances to show.
    #[test]
    fn records_spilled_during_a_replay_stay_counted() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.db").to_string_lossy().to_string();
        let location = StoreLocation::File(path);
        let store = Store::open(location.clone()).expect("open");
        let mut conn = location.connect().expect("connect");
        let journal = dir.path().join("w.db.spill");
        let shared = std::sync::Arc::new(super::Shared::new(
            Backpressure::Spill,
            Some(journal.clone()),
            std::sync::Arc::default(),
        ));
        let (rounds, threads, each) = (150, 3, 12);
        for round in 0..rounds {
            let appenders: Vec<_> = (0..threads)
                .map(|t| {
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        for i in 0..each {
                            let rec = RequestRecord::sample(&format!("j{round}-{t}-{i}"));
                            let mut j = shared.journal().expect("journal");
                            j.append(&rec).expect("append");
                        }
                    })
                })
                .collect();
            while appenders.iter().any(|a| !a.is_finished()) {
                super::replay(&mut conn, &shared, 64);
            }
            for a in appenders {
                a.join().expect("appender");
            }
            let on_disk = std::fs::read_to_string(&journal)
                .map(|t| t.lines().count() as u64)
                .unwrap_or(0);
            assert_eq!(
                shared.journal_pending.load(Ordering::Acquire),
                on_disk,
                "round {round}: the depth counter disagrees with the journal"
            );
        }
        super::replay(&mut conn, &shared, 64);
        assert_eq!(
            store.count().expect("count"),
            (rounds * threads * each) as u64
        );
        assert_eq!(shared.journal_pending.load(Ordering::Acquire), 0);
        assert!(!journal.exists());
    }

    /// Feedback, rollout transitions, verdicts and reads all succeed while
    /// the record writer commits group after group, in a file store and in
    /// an in-memory one. A transaction that reads before it writes fails at
    /// once with "database is locked" when another connection committed in
    /// between (a third of feedback writes did, before feedback took the
    /// write lock first), and the in-memory store's shared cache used to
    /// refuse any connection meeting the writer with "database table is
    /// locked", which no busy timeout waits out.
    async fn others_succeed_while_the_writer_commits(store: Store) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use std::time::Duration;
        let w = store.spawn_writer(100_000, 1024).expect("writer");
        let tx = w.sender();
        let stop = Arc::new(AtomicBool::new(false));
        let feeding = stop.clone();
        let feeder = std::thread::spawn(move || {
            // Bounded: stops when told or after 2 million records.
            for i in 0..2_000_000u64 {
                if feeding.load(Ordering::Relaxed) {
                    break;
                }
                tx.record(RequestRecord::sample(&format!("r{i}")));
                if i % 50 == 49 {
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
        });
        let mut failed = Vec::new();
        let mut version = None;
        for i in 0..200u32 {
            let fb = crate::Feedback {
                request_id: format!("r{}", i % 20),
                ts_ms: i64::from(i),
                api_key: None,
                thumbs_down: Some(i % 2 == 0),
                score: None,
                comment: Some(format!("note {i}")),
            };
            if let Err(e) = store.put_feedback(&fb) {
                failed.push(format!("feedback: {e}"));
            }
            if let Err(e) = store.count() {
                failed.push(format!("count: {e}"));
            }
            if i % 10 == 0 {
                let event = crate::RolloutEvent::sample("pause");
                let state = sluice_core::rollout::RolloutState::default();
                match store.commit_rollout("r", "d", "v2", version, &state, &event) {
                    Ok(v) => version = Some(v),
                    Err(e) => failed.push(format!("transition: {e}")),
                }
                if let Err(e) = store.put_verdict("r", 0, 1, "error_rate", "continue", "{}") {
                    failed.push(format!("verdict: {e}"));
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        feeder.join().expect("feeder");
        let stats = w.shutdown().await;
        assert!(
            failed.is_empty(),
            "{} operations failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        assert!(stats.written > 1_000, "the writer was busy: {stats:?}");
        assert_eq!(stats.lost(), 0, "{stats:?}");
        assert_eq!(version, Some(20));
        assert_eq!(store.count().expect("count"), stats.written);
        let c = store.lock();
        let (rows, last): (i64, String) = c
            .query_row(
                "SELECT COUNT(*), MAX(comment) FROM feedback WHERE request_id = 'r19'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("feedback");
        assert_eq!((rows, last.as_str()), (1, "note 199"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_store_takes_other_writes_while_the_writer_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db").to_string_lossy().to_string();
        others_succeed_while_the_writer_commits(
            Store::open(StoreLocation::File(path)).expect("open"),
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_memory_store_takes_other_writes_while_the_writer_commits() {
        others_succeed_while_the_writer_commits(
            Store::open(StoreLocation::from_config(":memory:")).expect("open"),
        )
        .await;
    }
}
