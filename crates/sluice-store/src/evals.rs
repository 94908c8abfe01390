//! Probe-suite runs: every run is kept (suite hash, variant, per-case
//! results), whether it came from `sluice eval` or from a stage gate.

use rusqlite::params;
use serde::Serialize;
use sluice_core::probe::report::SuiteReport;

use crate::{Store, StoreError};

/// A stored run, without its per-case detail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalRun {
    /// Run id.
    pub id: String,
    /// When it started (unix ms).
    pub ts_ms: i64,
    /// The suite.
    pub suite: String,
    /// Its SHA-256.
    pub suite_hash: String,
    /// `deployment/variant`.
    pub deployment: String,
    /// The variant.
    pub variant: String,
    /// `cli`, or `gate:ROLLOUT/STAGE`.
    pub trigger: String,
    /// Cases passed.
    pub passed: u64,
    /// Cases run.
    pub total: u64,
}

impl Store {
    /// Stores a run and its cases in one transaction.
    pub fn put_eval_run(
        &self,
        id: &str,
        trigger: &str,
        report: &SuiteReport,
    ) -> Result<(), StoreError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let json = serde_json::to_string(report).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        tx.execute(
            "INSERT INTO eval_runs (id, ts_ms, suite, suite_hash, deployment, variant, trigger, passed, total, pass_rate, report) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                id,
                report.started_ms,
                report.suite,
                report.suite_hash,
                report.deployment,
                report.variant,
                trigger,
                i64::try_from(report.totals.passed).unwrap_or(i64::MAX),
                i64::try_from(report.totals.total).unwrap_or(i64::MAX),
                report.pass_rate(),
                json,
            ],
        )?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO eval_cases (run_id, case_id, pass, passed_runs, runs, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for case in &report.cases {
                let detail =
                    serde_json::to_string(case).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                stmt.execute(params![
                    id,
                    case.id,
                    case.pass,
                    case.passed_runs,
                    case.runs.len() as i64,
                    detail
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The most recent runs, newest first.
    pub fn eval_runs(&self, limit: usize) -> Result<Vec<EvalRun>, StoreError> {
        let c = self.read()?;
        let mut stmt = c.prepare_cached(
            "SELECT id, ts_ms, suite, suite_hash, deployment, variant, trigger, passed, total \
             FROM eval_runs ORDER BY ts_ms DESC, rowid DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok(EvalRun {
                id: r.get(0)?,
                ts_ms: r.get(1)?,
                suite: r.get(2)?,
                suite_hash: r.get(3)?,
                deployment: r.get(4)?,
                variant: r.get(5)?,
                trigger: r.get(6)?,
                passed: r.get::<_, i64>(7)?.max(0) as u64,
                total: r.get::<_, i64>(8)?.max(0) as u64,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// A stored run's full report.
    pub fn eval_report(&self, id: &str) -> Result<Option<SuiteReport>, StoreError> {
        let c = self.read()?;
        let mut stmt = c.prepare_cached("SELECT report FROM eval_runs WHERE id = ?1")?;
        let mut rows = stmt.query([id])?;
        match rows.next()? {
            None => Ok(None),
            Some(r) => {
                let text: String = r.get(0)?;
                serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(format!("eval run {id}: {e}")))
            }
        }
    }

    /// Per-case pass/fail of a stored run.
    pub fn eval_cases(&self, id: &str) -> Result<Vec<(String, bool)>, StoreError> {
        let c = self.read()?;
        let mut stmt = c.prepare_cached(
            "SELECT case_id, pass FROM eval_cases WHERE run_id = ?1 ORDER BY rowid",
        )?;
        let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }
}
