//! Persistence for sluice: the embedded SQLite store, its versioned
//! migrations, and the batching event writer that keeps the database off the
//! request path.
//!
//! What this crate is not: it does not decide what to record (the gateway
//! does) and it does not serve HTTP. It depends only on `sluice-core`.
//!
//! Invariant: the request path only ever *enqueues* a [`RequestRecord`]; a
//! dedicated writer thread owns the write connection and commits records in
//! batches. An event handed to [`EventSender::record`] is either committed or
//! counted as failed in [`WriterStats`]; none disappears silently.

mod evals;
mod migrations;
mod record;
mod rollouts;
mod write_gate;
mod writer;

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags};

pub use evals::EvalRun;
pub use record::{RequestRecord, VariantSummary};
pub use rollouts::{Feedback, RolloutEvent, StageRow, StoredRollout};
pub use writer::{EventSender, EventWriter, WriterOptions, WriterStats, WriterStatsSnapshot};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened.
    #[error("cannot open store {path}: {source}")]
    Open {
        /// The path given.
        path: String,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The database was written by a newer sluice.
    #[error(
        "store {path} has schema version {found}, newer than this sluice understands \
         (up to {known}); upgrade sluice or use another --db"
    )]
    TooNew {
        /// The path given.
        path: String,
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// A migration failed.
    #[error("migration to schema version {version} failed: {source}")]
    Migration {
        /// The version being applied.
        version: i64,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// Any other SQLite error.
    #[error("store error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row could not be decoded.
    #[error("store holds an unreadable row: {0}")]
    Corrupt(String),
    /// Someone else changed the rollout since it was read.
    #[error("rollout {0} was changed concurrently; read it again and retry")]
    Conflict(String),
}

/// An interaction waiting for a human decision.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReviewItem {
    /// The request.
    pub request_id: String,
    /// The principle that escalated it.
    pub principle: String,
    /// Its severity.
    pub severity: String,
    /// `input` or `output`.
    pub stage: String,
    /// When (unix ms).
    pub created_ms: i64,
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file.
    File(String),
    /// An in-memory database shared by this process's connections under a
    /// unique name; gone when the last connection closes. It lives in
    /// SQLite's `memdb` VFS, whose locks behave like a file's (a connection
    /// that meets another's lock waits out `busy_timeout`), not in the shared
    /// cache, which refuses such a connection at once with "database table
    /// is locked". It holds at most [`MEMORY_STORE_MAX_BYTES`].
    Memory(String),
}

impl StoreLocation {
    /// Interprets a configured path (`:memory:` means in-memory).
    pub fn from_config(path: &str) -> Self {
        if path == ":memory:" {
            let unique = format!(
                "sluice-{}-{}",
                std::process::id(),
                MEM_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            StoreLocation::Memory(unique)
        } else {
            StoreLocation::File(path.to_string())
        }
    }

    fn describe(&self) -> String {
        match self {
            StoreLocation::File(p) => p.clone(),
            StoreLocation::Memory(_) => ":memory:".to_string(),
        }
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match self {
            StoreLocation::File(p) => Connection::open_with_flags(Path::new(p), flags),
            StoreLocation::Memory(name) => {
                Connection::open_with_flags(format!("file:/{name}?vfs=memdb"), flags)
            }
        }
        .map_err(|source| StoreError::Open {
            path: self.describe(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        if matches!(self, StoreLocation::Memory(_)) {
            memdb_limit(&conn, MEMORY_STORE_MAX_BYTES).map_err(|source| StoreError::Open {
                path: self.describe(),
                source,
            })?;
        }
        if matches!(self, StoreLocation::File(_)) {
            // WAL lets readers (the CLI, the admin API) run beside the writer;
            // NORMAL sync commits survive a process crash.
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        conn.pragma_update(None, "foreign_keys", "ON")?;
        Ok(conn)
    }
}

static MEM_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The most an in-memory store may hold: SQLite's `memdb` VFS keeps the
/// database in one buffer, stops at 1 GiB unless told otherwise, and no
/// single SQLite allocation may reach 2 GiB. A store that is full fails
/// every record with "database or disk is full"; a file store has no such
/// bound.
pub const MEMORY_STORE_MAX_BYTES: i64 = 2_147_479_552;

/// Sets the `memdb` size limit of an in-memory connection (a negative
/// `limit` leaves it) and returns the limit in force.
fn memdb_limit(conn: &Connection, limit: i64) -> Result<i64, rusqlite::Error> {
    use rusqlite::ffi;
    let mut limit = limit;
    // SAFETY: the handle is this open connection's; for
    // SQLITE_FCNTL_SIZE_LIMIT SQLite reads and writes one sqlite3_int64
    // through the pointer, which lives until the call returns.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_SIZE_LIMIT,
            std::ptr::addr_of_mut!(limit).cast(),
        )
    };
    if rc == ffi::SQLITE_OK {
        Ok(limit)
    } else {
        Err(rusqlite::Error::SqliteFailure(
            ffi::Error::new(rc),
            Some("cannot set the in-memory store's size limit".into()),
        ))
    }
}

/// Idle read connections a file store keeps open for the next read.
const IDLE_READERS: usize = 4;

/// The sluice store: a SQLite database with sluice's schema.
///
/// Writes other than the record writer's (rollout transitions, verdicts,
/// feedback, eval runs) go through one connection. Reads of a file store
/// use connections of their own, so a long read (a stage's rows rebuilt on
/// reload, a history) never holds a rollback back; in WAL mode they read a
/// snapshot and do not block the writers either. An in-memory store reads
/// through the write connection (without WAL a reader would block writers
/// anyway).
pub struct Store {
    location: StoreLocation,
    conn: Mutex<Connection>,
    /// Idle read connections (file stores only).
    readers: Mutex<Vec<Connection>>,
    /// Turns at the write lock between the record writer and rollout
    /// transitions (see `write_gate.rs`).
    gate: std::sync::Arc<write_gate::WriteGate>,
}

impl Store {
    /// Opens (creating if needed) the store and brings its schema up to date.
    pub fn open(location: StoreLocation) -> Result<Store, StoreError> {
        let mut conn = location.connect()?;
        migrations::migrate(&mut conn, &location.describe())?;
        Ok(Store {
            location,
            conn: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            gate: std::sync::Arc::default(),
        })
    }

    /// Opens a store for reading only if it exists: a missing file is an error
    /// rather than a new empty database.
    pub fn open_existing(path: &str) -> Result<Store, StoreError> {
        if path != ":memory:" && !Path::new(path).exists() {
            return Err(StoreError::Open {
                path: path.to_string(),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some("no such file".to_string()),
                ),
            });
        }
        Self::open(StoreLocation::from_config(path))
    }

    /// Where this store lives.
    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let c = self.read()?;
        Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (statements are atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection to read with: an idle read connection (or a new one) of
    /// a file store, the write connection of an in-memory store.
    pub(crate) fn read(&self) -> Result<Reader<'_>, StoreError> {
        if matches!(self.location, StoreLocation::Memory(_)) {
            return Ok(Reader::Shared(self.lock()));
        }
        let idle = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => {
                let c = self.location.connect()?;
                c.pragma_update(None, "query_only", true)?;
                c
            }
        };
        Ok(Reader::Pooled {
            conn: Some(conn),
            idle: &self.readers,
        })
    }

    /// Starts the batching writer on its own connection.
    pub fn spawn_writer(
        &self,
        queue_capacity: usize,
        batch_max: usize,
    ) -> Result<EventWriter, StoreError> {
        self.spawn_writer_with(WriterOptions {
            capacity: queue_capacity,
            batch_max,
            backpressure: sluice_core::config::Backpressure::Spill,
            journal: self.journal_path(),
            commit_window: std::time::Duration::from_millis(50),
        })
    }

    /// Starts the batching writer with explicit options. A spill journal
    /// left by a previous process is replayed before this returns.
    pub fn spawn_writer_with(&self, opts: WriterOptions) -> Result<EventWriter, StoreError> {
        let conn = self.location.connect()?;
        Ok(EventWriter::spawn(conn, opts, self.gate.clone()))
    }

    /// Where the spill journal of this store lives: next to a file store;
    /// in the temp directory for an in-memory one.
    pub fn journal_path(&self) -> Option<std::path::PathBuf> {
        match &self.location {
            StoreLocation::File(p) => Some(std::path::PathBuf::from(format!("{p}.spill"))),
            StoreLocation::Memory(name) => Some(std::env::temp_dir().join(format!("{name}.spill"))),
        }
    }

    /// Checks the database's integrity (`PRAGMA quick_check`); `Ok(())` when
    /// it is sound, otherwise what SQLite found.
    pub fn quick_check(&self) -> Result<(), StoreError> {
        let c = self.read()?;
        let mut stmt = c.prepare("PRAGMA quick_check")?;
        let found: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
        if found.len() == 1 && found[0] == "ok" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(found.join("; ")))
        }
    }

    /// Inserts records directly (used by tests and tools, not the request path).
    pub fn insert(&self, records: &[RequestRecord]) -> Result<(), StoreError> {
        let mut c = self.lock();
        record::insert_batch(&mut c, records)?;
        Ok(())
    }

    /// The most recent `limit` requests, newest first.
    pub fn recent(&self, limit: usize) -> Result<Vec<RequestRecord>, StoreError> {
        let c = self.read()?;
        record::recent(&c, limit)
    }

    /// Looks one request up by id.
    pub fn get(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let c = self.read()?;
        record::get(&c, id)
    }

    /// Review items waiting for a person, oldest first.
    pub fn pending_reviews(&self, limit: usize) -> Result<Vec<ReviewItem>, StoreError> {
        let c = self.read()?;
        let mut stmt = c.prepare_cached(
            "SELECT request_id, principle, severity, stage, created_ms FROM review_items \
             WHERE status = 'pending' ORDER BY seq LIMIT ?1",
        )?;
        let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok(ReviewItem {
                request_id: r.get(0)?,
                principle: r.get(1)?,
                severity: r.get(2)?,
                stage: r.get(3)?,
                created_ms: r.get(4)?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// How many requests are recorded.
    pub fn count(&self) -> Result<u64, StoreError> {
        let c = self.read()?;
        let n: i64 = c.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    /// Per deployment and variant: requests, errors and latency percentiles,
    /// over requests recorded at or after `since_ms` (unix milliseconds).
    pub fn summary(&self, since_ms: i64) -> Result<Vec<VariantSummary>, StoreError> {
        let c = self.read()?;
        record::summary(&c, since_ms)
    }
}

/// A connection lent for reading; see [`Store::read`].
pub(crate) enum Reader<'a> {
    /// A read connection, returned to the idle list when done.
    Pooled {
        conn: Option<Connection>,
        idle: &'a Mutex<Vec<Connection>>,
    },
    /// The write connection, held for the read.
    Shared(std::sync::MutexGuard<'a, Connection>),
}

impl std::ops::Deref for Reader<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match self {
            Reader::Pooled { conn: Some(c), .. } => c,
            Reader::Pooled { conn: None, .. } => {
                unreachable!("a read connection is only taken on drop")
            }
            Reader::Shared(c) => c,
        }
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let Reader::Pooled { conn, idle } = self {
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_READERS {
                if let Some(c) = conn.take() {
                    idle.push(c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_twice_keeps_schema_and_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db").to_string_lossy().to_string();
        let s = Store::open(StoreLocation::File(path.clone())).expect("open");
        let v = s.schema_version().expect("version");
        assert!(v >= 1);
        s.insert(&[RequestRecord::sample("a")]).expect("insert");
        drop(s);
        let s = Store::open(StoreLocation::File(path)).expect("reopen");
        assert_eq!(s.schema_version().expect("version"), v);
        assert_eq!(s.count().expect("count"), 1);
        assert_eq!(
            s.get("a")
                .expect("get")
                .expect("present")
                .deployment
                .as_deref(),
            Some("support")
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db").to_string_lossy().to_string();
        {
            let c = Connection::open(&path).expect("open");
            c.pragma_update(None, "user_version", 999).expect("set");
        }
        let e = Store::open(StoreLocation::File(path))
            .err()
            .expect("refused");
        assert!(matches!(e, StoreError::TooNew { found: 999, .. }), "{e}");
    }

    #[test]
    fn open_existing_refuses_missing_files() {
        let e = Store::open_existing("/nonexistent/dir/x.db")
            .err()
            .expect("refused");
        assert!(e.to_string().contains("/nonexistent/dir/x.db"));
    }

    /// A rollout transition commits while a read is in progress on another
    /// thread (before reads had connections of their own, it waited for the
    /// read to end), and the read still sees the snapshot it started with.
    #[test]
    fn a_transition_does_not_wait_for_a_read_in_progress() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db").to_string_lossy().to_string();
        let s = std::sync::Arc::new(Store::open(StoreLocation::File(path)).expect("open"));
        s.insert(&[RequestRecord::sample("a")]).expect("insert");
        let reader = s.read().expect("reader");
        reader.execute_batch("BEGIN").expect("begin");
        let seen: i64 = reader
            .query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))
            .expect("count");
        assert_eq!(seen, 1);
        let (done, committed) = std::sync::mpsc::channel();
        let writer = s.clone();
        std::thread::spawn(move || {
            let event = crate::RolloutEvent::sample("rollback");
            let state = sluice_core::rollout::RolloutState::default();
            let _ = done.send(writer.commit_rollout("r", "d", "v2", None, &state, &event));
        });
        // Bounded: a transition stuck behind the read fails here instead of
        // hanging the test.
        let version = committed
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the transition waited for the read")
            .expect("committed");
        assert_eq!(version, 1);
        let in_snapshot: i64 = reader
            .query_row("SELECT COUNT(*) FROM rollouts", [], |r| r.get(0))
            .expect("count");
        assert_eq!(in_snapshot, 0, "the read keeps its snapshot");
        reader.execute_batch("COMMIT").expect("end read");
        drop(reader);
        assert_eq!(s.rollout("r").expect("read").expect("stored").version, 1);
    }

    /// An in-memory store may grow to 2 GiB, not to the 1 GiB at which
    /// SQLite's `memdb` stops by default (about 104 000 records of 10 kB),
    /// and every connection to it sees that limit.
    #[test]
    fn a_memory_store_may_grow_past_a_gibibyte() {
        let s = Store::open(StoreLocation::from_config(":memory:")).expect("open");
        let w = s.location.connect().expect("second connection");
        for c in [&*s.lock(), &w] {
            assert_eq!(memdb_limit(c, -1).expect("limit"), MEMORY_STORE_MAX_BYTES);
        }
        const { assert!(MEMORY_STORE_MAX_BYTES > 1 << 30) };
    }

    #[test]
    fn memory_stores_are_shared_between_connections() {
        let s = Store::open(StoreLocation::from_config(":memory:")).expect("open");
        let w = s.spawn_writer(16, 4).expect("writer");
        let tx = w.sender();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tx.record(RequestRecord::sample("m1"));
            drop(tx);
            w.shutdown().await;
        });
        assert_eq!(s.count().expect("count"), 1);
    }
}
