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
        let c = self.lock();
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
        let c = self.lock();
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
        let c = self.lock();
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

    fn event(action: &str) -> RolloutEvent {
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

    #[test]
    fn commits_are_versioned_and_conflicts_refused() {
        let s = Store::open(StoreLocation::from_config(":memory:")).expect("open");
        assert!(s.rollout("r").expect("read").is_none());
        let st = RolloutState::default();
        let v = s
            .commit_rollout("r", "d", "v2", None, &st, &event("start"))
            .expect("first");
        assert_eq!(v, 1);
        assert!(matches!(
            s.commit_rollout("r", "d", "v2", None, &st, &event("start")),
            Err(StoreError::Conflict(_))
        ));
        let v2 = s
            .commit_rollout("r", "d", "v2", Some(1), &st, &event("pause"))
            .expect("second");
        assert_eq!(v2, 2);
        assert!(matches!(
            s.commit_rollout("r", "d", "v2", Some(1), &st, &event("resume")),
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
