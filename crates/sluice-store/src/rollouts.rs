//! Durable rollout state and its history.
//!
//! A transition is committed (state row and history row, one transaction)
//! before the admin API answers. The state row carries a version: a commit
//! names the version it read and fails with [`StoreError::Conflict`] if
//! someone else committed in between, so concurrent admins (or replicas)
//! never overwrite each other.

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use sluice_core::rollout::RolloutState;

use crate::{Store, StoreError};

/// One entry of a rollout's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEvent {
    /// When (unix ms).
    pub ts_ms: i64,
    /// Who (admin token name, or `controller`).
    pub actor: String,
    /// Their role.
    pub role: String,
    /// The action (`start`, `advance`, ...).
    pub action: String,
    /// Why, as given.
    pub reason: Option<String>,
    /// Status before.
    pub from_status: String,
    /// Stage before: the stage it left.
    pub from_stage: u32,
    /// Status after.
    pub to_status: String,
    /// Stage after.
    pub to_stage: u32,
}

impl RolloutEvent {
    /// An operator's history entry for `action`, for tests.
    #[cfg(test)]
    pub(crate) fn sample(action: &str) -> Self {
        RolloutEvent {
            ts_ms: 5,
            actor: "ops".into(),
            role: "operator".into(),
            action: action.into(),
            reason: Some("because".into()),
            from_status: "pending".into(),
            from_stage: 0,
            to_status: "running".into(),
            to_stage: 0,
        }
    }
}

/// A stored rollout state and the version to name when changing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRollout {
    /// The state.
    pub state: RolloutState,
    /// Its version.
    pub version: i64,
}

impl Store {
    /// The stored state of a rollout, if it was ever changed.
    pub fn rollout(&self, name: &str) -> Result<Option<StoredRollout>, StoreError> {
        let c = self.read()?;
        let row: Option<(String, i64)> = c
            .query_row(
                "SELECT state, version FROM rollouts WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            None => Ok(None),
            Some((json, version)) => {
                let state = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("rollout {name}: {e}")))?;
                Ok(Some(StoredRollout { state, version }))
            }
        }
    }

    /// Commits a new state and its history entry atomically. `expected` is
    /// the version read before deciding (`None`: the rollout was never
    /// stored). Returns the new version.
    pub fn commit_rollout(
        &self,
        name: &str,
        deployment: &str,
        candidate: &str,
        expected: Option<i64>,
        state: &RolloutState,
        event: &RolloutEvent,
    ) -> Result<i64, StoreError> {
        let json = serde_json::to_string(state)
            .map_err(|e| StoreError::Corrupt(format!("rollout {name}: {e}")))?;
        // Next at the write lock, ahead of the record writer's next group.
        let _turn = self.gate.priority();
        let mut c = self.lock();
        let tx = c.transaction()?;
        let new_version = match expected {
            None => {
                let n = tx.execute(
                    "INSERT OR IGNORE INTO rollouts (name, deployment, candidate, state, version, updated_ms) \
                     VALUES (?1, ?2, ?3, ?4, 1, ?5)",
                    params![name, deployment, candidate, json, state.updated_ms],
                )?;
                if n == 0 {
                    return Err(StoreError::Conflict(name.to_string()));
                }
                1
            }
            Some(v) => {
                let n = tx.execute(
                    "UPDATE rollouts SET state = ?1, version = version + 1, updated_ms = ?2 \
                     WHERE name = ?3 AND version = ?4",
                    params![json, state.updated_ms, name, v],
                )?;
                if n == 0 {
                    return Err(StoreError::Conflict(name.to_string()));
                }
                v + 1
            }
        };
        tx.execute(
            "INSERT INTO rollout_events (rollout, ts_ms, actor, role, action, reason, \
             from_status, from_stage, to_status, to_stage) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                name,
                event.ts_ms,
                event.actor,
                event.role,
                event.action,
                event.reason,
                event.from_status,
                event.from_stage,
                event.to_status,
                event.to_stage
            ],
        )?;
        tx.commit()?;
        Ok(new_version)
    }

    /// A rollout's history, oldest first.
    pub fn rollout_history(&self, name: &str) -> Result<Vec<RolloutEvent>, StoreError> {
        let c = self.read()?;
        let mut stmt = c.prepare_cached(
            "SELECT ts_ms, actor, role, action, reason, from_status, from_stage, to_status, to_stage \
             FROM rollout_events WHERE rollout = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([name], |r| {
            Ok(RolloutEvent {
                ts_ms: r.get(0)?,
                actor: r.get(1)?,
                role: r.get(2)?,
                action: r.get(3)?,
                reason: r.get(4)?,
                from_status: r.get(5)?,
                from_stage: r.get(6)?,
                to_status: r.get(7)?,
                to_stage: r.get(8)?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Requests per variant recorded for a rollout stage since `since_ms`.
    pub fn stage_counts(
        &self,
        rollout: &str,
        stage: u32,
        since_ms: i64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let c = self.read()?;
        let mut stmt = c.prepare_cached(
            "SELECT COALESCE(variant, '-'), COUNT(*) FROM requests \
             WHERE rollout = ?1 AND stage = ?2 AND ts_ms >= ?3 \
             AND assignment IN ('cohort', 'bucket', 'stable') GROUP BY 1 ORDER BY 1",
        )?;
        let rows = stmt.query_map(params![rollout, stage, since_ms], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreLocation;

    #[test]
    fn commits_are_versioned_and_conflicts_refused() {
        let s = Store::open(StoreLocation::from_config(":memory:")).expect("open");
        assert!(s.rollout("r").expect("read").is_none());
        let st = RolloutState::default();
        let v = s
            .commit_rollout("r", "d", "v2", None, &st, &RolloutEvent::sample("start"))
            .expect("first");
        assert_eq!(v, 1);
        assert!(matches!(
            s.commit_rollout("r", "d", "v2", None, &st, &RolloutEvent::sample("start")),
            Err(StoreError::Conflict(_))
        ));
        let v2 = s
            .commit_rollout("r", "d", "v2", Some(1), &st, &RolloutEvent::sample("pause"))
            .expect("second");
        assert_eq!(v2, 2);
        assert!(matches!(
            s.commit_rollout(
                "r",
                "d",
                "v2",
                Some(1),
                &st,
                &RolloutEvent::sample("resume")
            ),
            Err(StoreError::Conflict(_))
        ));
        let h = s.rollout_history("r").expect("history");
        assert_eq!(
            h.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["start", "pause"]
        );
        assert_eq!(s.rollout("r").expect("read").expect("stored").version, 2);
    }
}

/// What one recorded request contributes to its stage's signals.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRow {
    /// The variant that served it.
    pub variant: String,
    /// HTTP status.
    pub status: u16,
    /// Error kind, if any.
    pub error_kind: Option<String>,
    /// Latency, ms.
    pub latency_ms: f64,
    /// Time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Output tokens.
    pub tokens_out: Option<u64>,
    /// Refusal flag.
    pub refusal: Option<bool>,
    /// Cost in USD.
    pub cost_usd: Option<f64>,
    /// Thumbs feedback: Some(true) = down.
    pub thumbs_down: Option<bool>,
    /// Feedback score.
    pub score: Option<f64>,
    /// Policy verdicts as recorded (JSON list of findings), when any
    /// principle fired.
    pub policy: Option<String>,
}

/// Feedback as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    /// The request it is about.
    pub request_id: String,
    /// When (unix ms).
    pub ts_ms: i64,
    /// The API key that gave it.
    pub api_key: Option<String>,
    /// Thumbs: `Some(true)` down, `Some(false)` up.
    pub thumbs_down: Option<bool>,
    /// Score 0..1.
    pub score: Option<f64>,
    /// Free text.
    pub comment: Option<String>,
}

impl Store {
    /// Every rollout-assigned request of a stage since `since_ms`, with its
    /// feedback: what rebuilding the stage's signals after a restart needs.
    pub fn stage_rows(
        &self,
        rollout: &str,
        stage: u32,
        since_ms: i64,
    ) -> Result<Vec<StageRow>, StoreError> {
        let c = self.read()?;
        let mut stmt = c.prepare_cached(
            // A request served by a fallback counts as a failure of the
            // variant it was assigned to.
            "SELECT COALESCE(r.fallback_from, r.variant, '-'), \
             CASE WHEN r.fallback_from IS NULL THEN r.status ELSE 502 END, \
             COALESCE(r.fallback_error, r.error_kind), r.latency_ms, r.ttft_ms, r.tokens_out, \
             r.refusal, r.cost_usd, f.thumbs_down, f.score, r.policy \
             FROM requests r LEFT JOIN feedback f ON f.request_id = r.id \
             WHERE r.rollout = ?1 AND r.stage = ?2 AND r.ts_ms >= ?3 \
             AND r.assignment IN ('cohort', 'bucket', 'stable') ORDER BY r.seq",
        )?;
        let rows = stmt.query_map(params![rollout, stage, since_ms], |r| {
            Ok(StageRow {
                variant: r.get(0)?,
                status: r.get(1)?,
                error_kind: r.get(2)?,
                latency_ms: r.get(3)?,
                ttft_ms: r.get(4)?,
                tokens_out: r.get::<_, Option<i64>>(5)?.map(|v| v.max(0) as u64),
                refusal: r.get(6)?,
                cost_usd: r.get(7)?,
                thumbs_down: r.get(8)?,
                score: r.get(9)?,
                policy: r.get(10)?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// The mirrored pairs of a shadow stage since `since_ms`: (the served
    /// stable request, its shadow call), in order. Rebuilds a shadow stage's
    /// paired signals after a restart.
    pub fn shadow_pairs(
        &self,
        rollout: &str,
        stage: u32,
        since_ms: i64,
    ) -> Result<Vec<(StageRow, StageRow)>, StoreError> {
        let c = self.read()?;
        let mut stmt = c.prepare_cached(
            "SELECT COALESCE(p.variant, '-'), p.status, p.error_kind, p.latency_ms, p.ttft_ms, p.tokens_out, \
             p.refusal, p.cost_usd, p.policy, \
             COALESCE(s.variant, '-'), s.status, s.error_kind, s.latency_ms, s.ttft_ms, s.tokens_out, \
             s.refusal, s.cost_usd, s.policy \
             FROM requests s JOIN requests p ON p.id = s.shadow_of \
             WHERE s.rollout = ?1 AND s.stage = ?2 AND s.ts_ms >= ?3 AND s.assignment = 'shadow' \
             ORDER BY s.seq",
        )?;
        let rows = stmt.query_map(params![rollout, stage, since_ms], |r| {
            let side = |o: usize| -> rusqlite::Result<StageRow> {
                Ok(StageRow {
                    variant: r.get(o)?,
                    status: r.get(o + 1)?,
                    error_kind: r.get(o + 2)?,
                    latency_ms: r.get(o + 3)?,
                    ttft_ms: r.get(o + 4)?,
                    tokens_out: r.get::<_, Option<i64>>(o + 5)?.map(|v| v.max(0) as u64),
                    refusal: r.get(o + 6)?,
                    cost_usd: r.get(o + 7)?,
                    thumbs_down: None,
                    score: None,
                    policy: r.get(o + 8)?,
                })
            };
            Ok((side(0)?, side(9)?))
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Stores feedback for a request (the latest feedback replaces earlier
    /// feedback) and returns what was stored before.
    pub fn put_feedback(&self, f: &Feedback) -> Result<Option<Feedback>, StoreError> {
        let mut c = self.lock();
        // Immediate: the write lock is taken (waiting for it if need be)
        // before the read. A deferred transaction would read first and then
        // fail at once with "database is locked" whenever the record writer
        // committed in between, which under traffic is most of the time.
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let previous = tx
            .query_row(
                "SELECT request_id, ts_ms, api_key, thumbs_down, score, comment FROM feedback WHERE request_id = ?1",
                [&f.request_id],
                |r| {
                    Ok(Feedback {
                        request_id: r.get(0)?,
                        ts_ms: r.get(1)?,
                        api_key: r.get(2)?,
                        thumbs_down: r.get(3)?,
                        score: r.get(4)?,
                        comment: r.get(5)?,
                    })
                },
            )
            .optional()?;
        tx.execute(
            "INSERT INTO feedback (request_id, ts_ms, api_key, thumbs_down, score, comment) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(request_id) DO UPDATE SET \
             ts_ms = excluded.ts_ms, api_key = excluded.api_key, \
             thumbs_down = COALESCE(excluded.thumbs_down, feedback.thumbs_down), \
             score = COALESCE(excluded.score, feedback.score), \
             comment = COALESCE(excluded.comment, feedback.comment)",
            params![
                f.request_id,
                f.ts_ms,
                f.api_key,
                f.thumbs_down,
                f.score,
                f.comment
            ],
        )?;
        tx.commit()?;
        Ok(previous)
    }

    /// Records a gate verdict (as JSON) in the rollout's verdict history.
    pub fn put_verdict(
        &self,
        rollout: &str,
        stage: u32,
        ts_ms: i64,
        signal: &str,
        outcome: &str,
        verdict_json: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.gate.priority();
        let c = self.lock();
        c.execute(
            "INSERT INTO gate_verdicts (rollout, stage, ts_ms, signal, outcome, verdict) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![rollout, stage, ts_ms, signal, outcome, verdict_json],
        )?;
        Ok(())
    }

    /// A rollout's verdict history (verdict JSON objects with `stage` and
    /// `ts_ms` added), oldest first, at most `limit` (the newest).
    pub fn verdict_history(
        &self,
        rollout: &str,
        limit: usize,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let c = self.read()?;
        let mut stmt = c.prepare_cached(
            "SELECT stage, ts_ms, verdict FROM gate_verdicts WHERE rollout = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(
            params![rollout, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (stage, ts, json) = row?;
            let mut v: serde_json::Value = serde_json::from_str(&json)
                .map_err(|e| StoreError::Corrupt(format!("verdict: {e}")))?;
            v["stage"] = stage.into();
            v["ts_ms"] = ts.into();
            out.push(v);
        }
        out.reverse();
        Ok(out)
    }
}
