//! Versioned schema migrations.
//!
//! The schema version lives in SQLite's `user_version`. Each migration runs in
//! its own transaction together with the version bump, so a crash mid-way
//! leaves the database at the previous version, never half-migrated.
//! Migrations are append-only: never edit one that has shipped.

use rusqlite::Connection;

use crate::StoreError;

/// (version, SQL) in order.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE requests (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    ts_ms          INTEGER NOT NULL,
    api_key        TEXT,
    deployment     TEXT,
    variant        TEXT,
    provider       TEXT,
    model          TEXT,
    subject        TEXT,
    stream         INTEGER NOT NULL,
    status         INTEGER NOT NULL,
    error_kind     TEXT,
    error_message  TEXT,
    latency_ms     REAL NOT NULL,
    ttft_ms        REAL,
    tokens_in      INTEGER,
    tokens_out     INTEGER,
    finish_reason  TEXT,
    request_body   TEXT,
    response_body  TEXT
);
CREATE INDEX requests_ts ON requests (ts_ms);
CREATE INDEX requests_deployment ON requests (deployment, variant, ts_ms);
"#,
    ),
    (
        2,
        r#"
ALTER TABLE requests ADD COLUMN rollout TEXT;
ALTER TABLE requests ADD COLUMN stage INTEGER;
ALTER TABLE requests ADD COLUMN assignment TEXT;
ALTER TABLE requests ADD COLUMN sticky INTEGER;
CREATE INDEX requests_rollout ON requests (rollout, stage, variant);

CREATE TABLE rollouts (
    name        TEXT PRIMARY KEY,
    deployment  TEXT NOT NULL,
    candidate   TEXT NOT NULL,
    state       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);

CREATE TABLE rollout_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout      TEXT NOT NULL,
    ts_ms        INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    role         TEXT NOT NULL,
    action       TEXT NOT NULL,
    reason       TEXT,
    from_status  TEXT NOT NULL,
    from_stage   INTEGER NOT NULL,
    to_status    TEXT NOT NULL,
    to_stage     INTEGER NOT NULL
);
CREATE INDEX rollout_events_rollout ON rollout_events (rollout, seq);
"#,
    ),
    (
        3,
        r#"
ALTER TABLE requests ADD COLUMN refusal INTEGER;
ALTER TABLE requests ADD COLUMN cost_usd REAL;

CREATE TABLE feedback (
    request_id  TEXT PRIMARY KEY,
    ts_ms       INTEGER NOT NULL,
    api_key     TEXT,
    thumbs_down INTEGER,
    score       REAL,
    comment     TEXT
);

CREATE TABLE gate_verdicts (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout  TEXT NOT NULL,
    stage    INTEGER NOT NULL,
    ts_ms    INTEGER NOT NULL,
    signal   TEXT NOT NULL,
    outcome  TEXT NOT NULL,
    verdict  TEXT NOT NULL
);
CREATE INDEX gate_verdicts_rollout ON gate_verdicts (rollout, seq);
"#,
    ),
    (
        4,
        r#"
ALTER TABLE requests ADD COLUMN policy TEXT;

CREATE TABLE review_items (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id  TEXT NOT NULL,
    principle   TEXT NOT NULL,
    severity    TEXT NOT NULL,
    stage       TEXT NOT NULL,
    detail      TEXT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'pending',
    created_ms  INTEGER NOT NULL,
    UNIQUE (request_id, principle, stage)
);
CREATE INDEX review_items_status ON review_items (status, seq);
"#,
    ),
    (
        5,
        r#"
ALTER TABLE requests ADD COLUMN shadow_of TEXT;
CREATE INDEX requests_shadow_of ON requests (shadow_of) WHERE shadow_of IS NOT NULL;

CREATE TABLE eval_runs (
    id          TEXT PRIMARY KEY,
    ts_ms       INTEGER NOT NULL,
    suite       TEXT NOT NULL,
    suite_hash  TEXT NOT NULL,
    deployment  TEXT NOT NULL,
    variant     TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    passed      INTEGER NOT NULL,
    total       INTEGER NOT NULL,
    pass_rate   REAL NOT NULL,
    report      TEXT NOT NULL
);
CREATE INDEX eval_runs_suite ON eval_runs (suite_hash, deployment, variant, ts_ms);

CREATE TABLE eval_cases (
    run_id      TEXT NOT NULL REFERENCES eval_runs (id),
    case_id     TEXT NOT NULL,
    pass        INTEGER NOT NULL,
    passed_runs INTEGER NOT NULL,
    runs        INTEGER NOT NULL,
    detail      TEXT NOT NULL,
    PRIMARY KEY (run_id, case_id)
);
"#,
    ),
    (
        6,
        r#"
ALTER TABLE requests ADD COLUMN fallback_from TEXT;
ALTER TABLE requests ADD COLUMN fallback_error TEXT;
ALTER TABLE requests ADD COLUMN attempts INTEGER;
"#,
    ),
    (
        7,
        // Only requests in a rollout are looked up by rollout; traffic
        // outside one no longer pays an index insert, and the stage
        // queries' time bound is now part of the key.
        r#"
DROP INDEX requests_rollout;
CREATE INDEX requests_rollout ON requests (rollout, stage, ts_ms) WHERE rollout IS NOT NULL;
"#,
    ),
    (
        8,
        // No query reads requests by deployment and variant (the summary
        // scans by time and groups as it goes), and every record paid for
        // the index: about a fifth of the record writer's insert time.
        r#"
DROP INDEX requests_deployment;
"#,
    ),
];

/// The newest schema version this build knows.
pub fn latest() -> i64 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Applies every migration newer than the database's version.
pub fn migrate(conn: &mut Connection, path: &str) -> Result<(), StoreError> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > latest() {
        return Err(StoreError::TooNew {
            path: path.to_string(),
            found: current,
            known: latest(),
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .and_then(|_| tx.pragma_update(None, "user_version", version))
            .map_err(|source| StoreError::Migration {
                version: *version,
                source,
            })?;
        tx.commit().map_err(|source| StoreError::Migration {
            version: *version,
            source,
        })?;
        tracing::info!(version, "store schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreLocation};

    /// The query plan SQLite picks for `sql` with three bound values.
    fn plan(store: &Store, sql: &str) -> String {
        let c = store.lock();
        let mut stmt = c
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("prepare");
        let rows = stmt
            .query_map(rusqlite::params!["r", 1, 0], |r| r.get::<_, String>(3))
            .expect("plan");
        rows.collect::<Result<Vec<_>, _>>()
            .expect("rows")
            .join("; ")
    }

    #[test]
    fn stage_queries_use_the_partial_rollout_index() {
        let s = Store::open(StoreLocation::from_config(":memory:")).expect("open");
        let p = plan(
            &s,
            "SELECT COUNT(*) FROM requests WHERE rollout = ?1 AND stage = ?2 AND ts_ms >= ?3",
        );
        assert!(
            p.contains("requests_rollout (rollout=? AND stage=? AND ts_ms>?)"),
            "{p}"
        );
    }

    /// The indexes on `requests` are the ones its queries use; each one
    /// costs every recorded request an insert.
    #[test]
    fn requests_carry_only_the_indexes_their_queries_use() {
        let s = Store::open(StoreLocation::from_config(":memory:")).expect("open");
        let summary = plan(
            &s,
            "SELECT COALESCE(deployment, '-'), latency_ms FROM requests \
             WHERE ts_ms >= ?1 AND shadow_of IS NULL AND ?2 = ?2 AND ?3 = ?3 ORDER BY 1",
        );
        assert!(summary.contains("requests_ts (ts_ms>?)"), "{summary}");
        let by_id = plan(
            &s,
            "SELECT latency_ms FROM requests WHERE id = ?1 AND ?2 = ?2 AND ?3 = ?3",
        );
        assert!(
            by_id.contains("sqlite_autoindex_requests_1 (id=?)"),
            "{by_id}"
        );
        let c = s.lock();
        let mut stmt = c
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests' ORDER BY name")
            .expect("indexes");
        let names: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("names");
        assert_eq!(
            names,
            [
                "requests_rollout",
                "requests_shadow_of",
                "requests_ts",
                "sqlite_autoindex_requests_1"
            ]
        );
    }

    #[test]
    fn requests_outside_a_rollout_are_not_in_the_rollout_index() {
        let s = Store::open(StoreLocation::from_config(":memory:")).expect("open");
        let c = s.lock();
        c.execute_batch(
            "INSERT INTO requests (id, ts_ms, stream, status, latency_ms) VALUES ('a', 1, 0, 200, 1.0);
             INSERT INTO requests (id, ts_ms, stream, status, latency_ms, rollout, stage)
                 VALUES ('b', 2, 0, 200, 1.0, 'r', 0);",
        )
        .expect("insert");
        // PRAGMA index_list: (seq, name, unique, origin, partial).
        let mut stmt = c
            .prepare("PRAGMA index_list(requests)")
            .expect("index list");
        let partial: Vec<(String, bool)> = stmt
            .query_map([], |r| Ok((r.get(1)?, r.get(4)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("index list");
        assert!(
            partial.contains(&("requests_rollout".to_string(), true)),
            "{partial:?}"
        );
        let indexed: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM requests INDEXED BY requests_rollout WHERE rollout = 'r'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(indexed, 1);
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, super::latest());
    }
}
