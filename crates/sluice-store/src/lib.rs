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
    /// is locked".
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

/// The sluice store: a SQLite database with sluice's schema.
pub struct Store {
    location: StoreLocation,
    conn: Mutex<Connection>,
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
        let c = self.lock();
        Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (statements are atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
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
        let c = self.lock();
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
        let c = self.lock();
        record::recent(&c, limit)
    }

    /// Looks one request up by id.
    pub fn get(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let c = self.lock();
        record::get(&c, id)
    }

    /// Review items waiting for a person, oldest first.
    pub fn pending_reviews(&self, limit: usize) -> Result<Vec<ReviewItem>, StoreError> {
        let c = self.lock();
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
        let c = self.lock();
        let n: i64 = c.query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    /// Per deployment and variant: requests, errors and latency percentiles,
    /// over requests recorded at or after `since_ms` (unix milliseconds).
    pub fn summary(&self, since_ms: i64) -> Result<Vec<VariantSummary>, StoreError> {
        let c = self.lock();
        record::summary(&c, since_ms)
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
