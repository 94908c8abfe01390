//! What strict durability costs: request records committed through the
//! event writer to a SQLite file (WAL), batched (the request path hands the
//! record over and moves on) against strict (the response waits for the
//! record's commit), one request at a time and 64 at once.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use sluice_store::{RequestRecord, Store, StoreLocation, WriterOptions};

fn record(i: u64) -> RequestRecord {
    RequestRecord {
        id: format!("req_{i:020}"),
        ts_ms: 1_700_000_000_000 + i as i64,
        api_key: Some("app".into()),
        deployment: Some("support".into()),
        variant: Some("v1".into()),
        provider: Some("openai".into()),
        model: Some("gpt-4o-mini".into()),
        status: 200,
        latency_ms: 412.5,
        tokens_in: Some(120),
        tokens_out: Some(48),
        finish_reason: Some("stop".into()),
        request_body: Some(r#"{"model":"support","messages":[{"role":"user","content":"Where is my order #1234?"}]}"#.into()),
        response_body: Some(r#"{"choices":[{"message":{"role":"assistant","content":"It ships tomorrow."}}]}"#.into()),
        ..Default::default()
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.db").to_string_lossy().into_owned();
    let store = Store::open(StoreLocation::File(path)).expect("store");
    let writer = rt.block_on(async {
        store
            .spawn_writer_with(WriterOptions {
                capacity: 65_536,
                batch_max: 1024,
                backpressure: sluice_core::config::Backpressure::Spill,
                journal: store.journal_path(),
                commit_window: Duration::from_millis(50),
            })
            .expect("writer")
    });
    let tx = writer.sender();
    let mut next = 0u64;
    let mut g = c.benchmark_group("record");
    g.bench_function("batched (committed per record, amortised)", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            rt.block_on(async {
                for _ in 0..iters {
                    next += 1;
                    tx.record(record(next));
                }
                tx.flush().await;
            });
            t.elapsed()
        })
    });
    g.bench_function("strict, one request at a time", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            rt.block_on(async {
                for _ in 0..iters {
                    next += 1;
                    let _ = tx.record_committed(record(next)).await;
                }
            });
            t.elapsed()
        })
    });
    g.bench_function("strict, 64 requests at once", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            rt.block_on(async {
                let mut left = iters;
                while left > 0 {
                    let n = left.min(64);
                    left -= n;
                    let acks: Vec<_> = (0..n)
                        .map(|_| {
                            next += 1;
                            tx.record_committed(record(next))
                        })
                        .collect();
                    for a in acks {
                        let _ = a.await;
                    }
                }
            });
            t.elapsed()
        })
    });
    g.finish();
    rt.block_on(writer.shutdown());
}

/// The record writer's own work per record: inserting groups of 100 (a
/// 50 ms commit window at 2 000 req/s) into a SQLite file in WAL mode, on
/// the calling thread, with the fields a served request without bodies
/// carries. What the schema's indexes cost shows here.
fn insert(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("insert.db").to_string_lossy().into_owned();
    let store = Store::open(StoreLocation::File(path)).expect("store");
    let mut next = 0u64;
    let served = |i: u64| RequestRecord {
        request_body: None,
        response_body: None,
        subject: Some(format!("user-{}", i % 5_000)),
        variant: Some(if i % 20 == 0 { "v2" } else { "v1" }.into()),
        assignment: Some("stable".into()),
        sticky: Some(true),
        refusal: Some(false),
        cost_usd: Some(0.000_12),
        attempts: Some(1),
        ..record(i)
    };
    let mut g = c.benchmark_group("insert");
    g.bench_function("groups of 100, per record", |b| {
        b.iter_custom(|iters| {
            let groups = iters.div_ceil(100);
            let batches: Vec<Vec<RequestRecord>> = (0..groups)
                .map(|_| {
                    (0..100)
                        .map(|_| {
                            next += 1;
                            served(next)
                        })
                        .collect()
                })
                .collect();
            let t = Instant::now();
            for batch in &batches {
                store.insert(batch).expect("insert");
            }
            // Scaled to the `iters` records asked for (the last group may
            // hold a few more).
            t.elapsed().mul_f64(iters as f64 / (groups * 100) as f64)
        })
    });
    g.finish();
}

criterion_group!(benches, bench, insert);
criterion_main!(benches);
