//! The request record and its SQL.

use rusqlite::{params, Connection, Row};
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// One served (or refused) request, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RequestRecord {
    /// The id returned in `x-sluice-request-id`.
    pub id: String,
    /// When the request arrived, unix milliseconds.
    pub ts_ms: i64,
    /// Name of the API key used.
    pub api_key: Option<String>,
    /// Deployment named in `model`, when it resolved.
    pub deployment: Option<String>,
    /// Variant that served it.
    pub variant: Option<String>,
    /// Provider of that variant.
    pub provider: Option<String>,
    /// Upstream model.
    pub model: Option<String>,
    /// The subject key (the request's `user`, else the API key name).
    pub subject: Option<String>,
    /// Whether the answer was streamed.
    pub stream: bool,
    /// HTTP status sent to the client (200 for a stream that started).
    pub status: u16,
    /// Machine-readable error kind (`upstream_error`, `upstream_timeout`,
    /// `invalid_request`, `client_disconnected`, ...).
    pub error_kind: Option<String>,
    /// Human-readable error.
    pub error_message: Option<String>,
    /// Total time until the last byte, milliseconds.
    pub latency_ms: f64,
    /// Time to the first generated token, milliseconds.
    pub ttft_ms: Option<f64>,
    /// Input tokens.
    pub tokens_in: Option<u64>,
    /// Output tokens.
    pub tokens_out: Option<u64>,
    /// Finish reason of the first choice.
    pub finish_reason: Option<String>,
    /// Request body (when `log_bodies = "full"`).
    pub request_body: Option<String>,
    /// Response body, streams reassembled (when `log_bodies = "full"`).
    pub response_body: Option<String>,
    /// The rollout that assigned the variant, if one was active.
    pub rollout: Option<String>,
    /// Index of that rollout's stage.
    pub stage: Option<u32>,
    /// Why the variant was chosen: `stable`, `cohort`, `bucket`, `pinned`,
    /// `promoted`.
    pub assignment: Option<String>,
    /// Whether the same subject gets the same variant next time.
    pub sticky: Option<bool>,
    /// Whether the answer was a refusal (successful requests).
    pub refusal: Option<bool>,
    /// Cost in USD, when the model has a price.
    pub cost_usd: Option<f64>,
    /// Policy verdicts (JSON list of findings: principle, detector, action,
    /// severity, stage, spans, check latency), when any principle fired.
    pub policy: Option<String>,
    /// For a mirrored (shadow) call: the id of the request it mirrors. Such
    /// records have assignment `shadow` and were never served to anyone.
    pub shadow_of: Option<String>,
    /// When another variant served because the assigned one failed before
    /// answering: the assigned variant. Gates count such a request as a
    /// failure of this variant.
    pub fallback_from: Option<String>,
    /// The error kind of the assigned variant's failed attempt.
    pub fallback_error: Option<String>,
    /// Upstream attempts made for the variant that answered (retries + 1);
    /// `None` when no upstream was called.
    pub attempts: Option<u32>,
}

impl RequestRecord {
    /// A small valid record for tests.
    #[cfg(test)]
    pub fn sample(id: &str) -> Self {
        RequestRecord {
            id: id.to_string(),
            ts_ms: 1_700_000_000_000,
            deployment: Some("support".into()),
            variant: Some("v1".into()),
            status: 200,
            latency_ms: 12.5,
            ..Default::default()
        }
    }

    /// Whether the request failed (any non-2xx status or a recorded error).
    pub fn is_error(&self) -> bool {
        self.status >= 400 || self.error_kind.is_some()
    }
}

const COLUMNS: &str = "id, ts_ms, api_key, deployment, variant, provider, model, subject, \
    stream, status, error_kind, error_message, latency_ms, ttft_ms, tokens_in, tokens_out, \
    finish_reason, request_body, response_body, rollout, stage, assignment, sticky, refusal, cost_usd, policy, shadow_of, \
    fallback_from, fallback_error, attempts";

fn to_i64(v: Option<u64>) -> Option<i64> {
    v.map(|x| i64::try_from(x).unwrap_or(i64::MAX))
}

/// Values bound per record in an insert.
const COLUMN_COUNT: usize = 30;

/// Rows per multi-row `INSERT`, largest first. A batch is split greedily
/// into these, so at most three statements are ever cached for it.
const CHUNKS: [usize; 3] = [16, 4, 1];

/// The insert statement for `CHUNKS[i]` records.
fn insert_sql(i: usize) -> &'static str {
    static SQL: std::sync::OnceLock<[String; CHUNKS.len()]> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        let row = format!("({})", vec!["?"; COLUMN_COUNT].join(", "));
        CHUNKS.map(|n| {
            format!(
                "INSERT OR IGNORE INTO requests ({COLUMNS}) VALUES {}",
                vec![row.as_str(); n].join(", ")
            )
        })
    });
    &all[i]
}

/// Inserts records in one transaction, up to 16 per statement (each
/// statement costs a VM start, cursor opens on every index and the
/// AUTOINCREMENT counter update, whatever its row count). A record whose id
/// is already stored is left as it is (idempotent replay).
pub(crate) fn insert_batch(
    conn: &mut Connection,
    records: &[RequestRecord],
) -> Result<(), rusqlite::Error> {
    insert_prefix(conn, records, || false).map(|_| ())
}

/// [`insert_batch`], except that when `yield_now` turns true after a
/// statement the transaction commits there; returns how many records (a
/// prefix of `records`, at least one statement's worth) it committed.
pub(crate) fn insert_prefix(
    conn: &mut Connection,
    records: &[RequestRecord],
    yield_now: impl Fn() -> bool,
) -> Result<usize, rusqlite::Error> {
    let tx = conn.transaction()?;
    let mut rest = records;
    while !rest.is_empty() {
        // The last chunk size is 1, so a non-empty rest always fits one.
        let i = CHUNKS
            .iter()
            .position(|&n| n <= rest.len())
            .unwrap_or(CHUNKS.len() - 1);
        let (chunk, tail) = rest.split_at(CHUNKS[i]);
        {
            let mut stmt = tx.prepare_cached(insert_sql(i))?;
            for (row, r) in chunk.iter().enumerate() {
                bind_record(&mut stmt, row * COLUMN_COUNT, r)?;
            }
            stmt.raw_execute()?;
        }
        for r in chunk {
            insert_review_items(&tx, r)?;
        }
        rest = tail;
        if !rest.is_empty() && yield_now() {
            break;
        }
    }
    tx.commit()?;
    Ok(records.len() - rest.len())
}

/// Binds one record's values after the first `base` parameters, in
/// [`COLUMNS`] order.
fn bind_record(
    stmt: &mut rusqlite::CachedStatement<'_>,
    base: usize,
    r: &RequestRecord,
) -> Result<(), rusqlite::Error> {
    let values: [&dyn rusqlite::ToSql; COLUMN_COUNT] = [
        &r.id,
        &r.ts_ms,
        &r.api_key,
        &r.deployment,
        &r.variant,
        &r.provider,
        &r.model,
        &r.subject,
        &r.stream,
        &r.status,
        &r.error_kind,
        &r.error_message,
        &r.latency_ms,
        &r.ttft_ms,
        &to_i64(r.tokens_in),
        &to_i64(r.tokens_out),
        &r.finish_reason,
        &r.request_body,
        &r.response_body,
        &r.rollout,
        &r.stage,
        &r.assignment,
        &r.sticky,
        &r.refusal,
        &r.cost_usd,
        &r.policy,
        &r.shadow_of,
        &r.fallback_from,
        &r.fallback_error,
        &r.attempts,
    ];
    for (i, v) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(base + i + 1, v)?;
    }
    Ok(())
}

/// Escalated findings become review items, in the same transaction as
/// their request.
fn insert_review_items(
    tx: &rusqlite::Transaction<'_>,
    r: &RequestRecord,
) -> Result<(), rusqlite::Error> {
    // Most findings are not escalations; skip decoding those lists.
    let Some(policy) = r.policy.as_deref().filter(|p| p.contains("escalate")) else {
        return Ok(());
    };
    let Ok(serde_json::Value::Array(findings)) = serde_json::from_str::<serde_json::Value>(policy)
    else {
        return Ok(());
    };
    for f in findings.iter().filter(|f| f["action"] == "escalate") {
        // Only for the request as stored: a replayed id whose first
        // record carried other findings adds nothing.
        tx.prepare_cached(
            "INSERT OR IGNORE INTO review_items (request_id, principle, severity, stage, detail, created_ms) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS \
             (SELECT 1 FROM requests WHERE id = ?1 AND policy = ?7)",
        )?
        .execute(params![
            r.id,
            f["principle"].as_str().unwrap_or(""),
            f["severity"].as_str().unwrap_or(""),
            f["stage"].as_str().unwrap_or(""),
            f.to_string(),
            r.ts_ms,
            policy
        ])?;
    }
    Ok(())
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<RequestRecord> {
    let tokens = |i: usize| -> rusqlite::Result<Option<u64>> {
        Ok(row.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64))
    };
    Ok(RequestRecord {
        id: row.get(0)?,
        ts_ms: row.get(1)?,
        api_key: row.get(2)?,
        deployment: row.get(3)?,
        variant: row.get(4)?,
        provider: row.get(5)?,
        model: row.get(6)?,
        subject: row.get(7)?,
        stream: row.get(8)?,
        status: row.get(9)?,
        error_kind: row.get(10)?,
        error_message: row.get(11)?,
        latency_ms: row.get(12)?,
        ttft_ms: row.get(13)?,
        tokens_in: tokens(14)?,
        tokens_out: tokens(15)?,
        finish_reason: row.get(16)?,
        request_body: row.get(17)?,
        response_body: row.get(18)?,
        rollout: row.get(19)?,
        stage: row.get(20)?,
        assignment: row.get(21)?,
        sticky: row.get(22)?,
        refusal: row.get(23)?,
        cost_usd: row.get(24)?,
        policy: row.get(25)?,
        shadow_of: row.get(26)?,
        fallback_from: row.get(27)?,
        fallback_error: row.get(28)?,
        attempts: row.get(29)?,
    })
}

pub(crate) fn recent(conn: &Connection, limit: usize) -> Result<Vec<RequestRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM requests ORDER BY seq DESC LIMIT ?1"
    ))?;
    let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], from_row)?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn get(conn: &Connection, id: &str) -> Result<Option<RequestRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM requests WHERE id = ?1"))?;
    let mut rows = stmt.query_map([id], from_row)?;
    match rows.next() {
        None => Ok(None),
        Some(r) => r.map(Some).map_err(|e| StoreError::Corrupt(e.to_string())),
    }
}

/// Requests, errors and latency percentiles for one deployment variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantSummary {
    /// Deployment name (`-` when the request never resolved one).
    pub deployment: String,
    /// Variant name (`-` when none was chosen).
    pub variant: String,
    /// Requests recorded.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Median latency, milliseconds.
    pub latency_p50_ms: f64,
    /// 99th-percentile latency, milliseconds.
    pub latency_p99_ms: f64,
    /// Median time to first token over streamed requests, milliseconds.
    pub ttft_p50_ms: Option<f64>,
    /// Output tokens in total.
    pub tokens_out: u64,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub(crate) fn summary(conn: &Connection, since_ms: i64) -> Result<Vec<VariantSummary>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT COALESCE(deployment, '-'), COALESCE(variant, '-'), latency_ms, ttft_ms, \
         status >= 400 OR error_kind IS NOT NULL, COALESCE(tokens_out, 0) \
         FROM requests WHERE ts_ms >= ?1 AND shadow_of IS NULL ORDER BY 1, 2",
    )?;
    let mut rows = stmt.query([since_ms])?;
    let mut out: Vec<VariantSummary> = Vec::new();
    let mut lat: Vec<f64> = Vec::new();
    let mut ttft: Vec<f64> = Vec::new();
    let finish = |s: &mut VariantSummary, lat: &mut Vec<f64>, ttft: &mut Vec<f64>| {
        lat.sort_by(f64::total_cmp);
        ttft.sort_by(f64::total_cmp);
        s.latency_p50_ms = percentile(lat, 0.5);
        s.latency_p99_ms = percentile(lat, 0.99);
        s.ttft_p50_ms = (!ttft.is_empty()).then(|| percentile(ttft, 0.5));
        lat.clear();
        ttft.clear();
    };
    while let Some(row) = rows.next()? {
        let d: String = row.get(0)?;
        let v: String = row.get(1)?;
        let same = out
            .last()
            .is_some_and(|s| s.deployment == d && s.variant == v);
        if !same {
            if let Some(last) = out.last_mut() {
                finish(last, &mut lat, &mut ttft);
            }
            out.push(VariantSummary {
                deployment: d,
                variant: v,
                requests: 0,
                errors: 0,
                latency_p50_ms: 0.0,
                latency_p99_ms: 0.0,
                ttft_p50_ms: None,
                tokens_out: 0,
            });
        }
        let s = out
            .last_mut()
            .ok_or_else(|| StoreError::Corrupt("summary".into()))?;
        s.requests += 1;
        if row.get::<_, bool>(4)? {
            s.errors += 1;
        }
        s.tokens_out += row.get::<_, i64>(5)?.max(0) as u64;
        lat.push(row.get(2)?);
        if let Some(t) = row.get::<_, Option<f64>>(3)? {
            ttft.push(t);
        }
    }
    if let Some(last) = out.last_mut() {
        finish(last, &mut lat, &mut ttft);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of("[a-z\\\"{}é ]{0,12}")
    }

    /// Records with ids from a small pool (so batches repeat ids) and the
    /// optional fields set or not.
    fn arb_record() -> impl Strategy<Value = RequestRecord> {
        (
            (0u8..12, any::<i64>(), arb_text(), arb_text(), any::<bool>()),
            (100u16..600, -1e6f64..1e6, proptest::option::of(0..=i64::MAX as u64)),
            (arb_text(), proptest::option::of(0u32..9), proptest::option::of(any::<bool>())),
            (proptest::option::of(0u8..3), proptest::option::of(1u32..4)),
        )
            .prop_map(|((id, ts, key, body, stream), (status, lat, tok), (rollout, stage, sticky), (policy, attempts))| {
                RequestRecord {
                    id: format!("req_{id}"),
                    ts_ms: ts,
                    api_key: key,
                    request_body: body,
                    stream,
                    status,
                    latency_ms: lat,
                    tokens_out: tok,
                    rollout,
                    stage,
                    sticky,
                    // None, a flag (no review item), an escalation.
                    policy: policy.map(|p| match p {
                        0 => "[]".to_string(),
                        1 => r#"[{"principle":"pii","action":"flag","severity":"low","stage":"output"}]"#.to_string(),
                        _ => r#"[{"principle":"pii","action":"escalate","severity":"high","stage":"output"}]"#.to_string(),
                    }),
                    attempts,
                    ..Default::default()
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// However a stream of records is cut into batches, the store holds
        /// the first record of each id, field for field, in arrival order,
        /// and one review item per escalated request.
        #[test]
        fn batches_of_any_size_store_first_records_in_order(
            records in proptest::collection::vec(arb_record(), 0..60),
            cuts in proptest::collection::vec(1usize..40, 1..6),
        ) {
            let store = crate::Store::open(crate::StoreLocation::from_config(":memory:")).expect("open");
            let mut rest = &records[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                let (batch, tail) = rest.split_at(n);
                store.insert(batch).expect("insert");
                rest = tail;
                i += 1;
            }
            let mut expected: Vec<&RequestRecord> = Vec::new();
            for r in &records {
                if !expected.iter().any(|e| e.id == r.id) {
                    expected.push(r);
                }
            }
            let mut stored = store.recent(1000).expect("recent");
            stored.reverse();
            prop_assert_eq!(stored.len(), expected.len());
            for (s, e) in stored.iter().zip(&expected) {
                prop_assert_eq!(s, *e);
            }
            let escalated = expected
                .iter()
                .filter(|r| r.policy.as_deref().is_some_and(|p| p.contains("escalate")))
                .count();
            prop_assert_eq!(store.pending_reviews(1000).expect("reviews").len(), escalated);
        }
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }
}
