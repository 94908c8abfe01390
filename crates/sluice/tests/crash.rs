//! Crash durability: `kill -9` the server in the middle of load and admin
//! actions, then check the store. Acknowledged admin actions all survive; of
//! the requests clients got answers to, at most those answered in the last
//! group-commit window (50 ms) may be missing, and none with
//! `durability = "strict"`. The store opens clean and the server restarts.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::start_server;
use serde_json::{json, Value};
use sluice_store::Store;

fn config(durability: &str) -> String {
    format!(
        r#"
[store]
durability = "{durability}"

[[api_keys]]
name = "app"
key_env = "TEST_APP_KEY"

[[admin_tokens]]
name = "ops"
role = "operator"
token_env = "TEST_OPS_TOKEN"

[providers.sim]
kind = "simulated"
latency = {{ median_ms = 3, p99_ms = 15 }}

[deployments.support]
stable = "v1"
variants.v1 = {{ provider = "sim", model = "sim-1" }}
variants.v2 = {{ provider = "sim", model = "sim-2" }}

[rollouts.support-v2]
deployment = "support"
candidate = "v2"
stages = [{{ kind = "percent", percent = 20 }}, {{ kind = "percent", percent = 60 }}]
"#
    )
}

/// (request id, when its answer arrived)
type Acked = Arc<Mutex<Vec<(String, Instant)>>>;

struct Outcome {
    acked: Vec<(String, Instant)>,
    killed_at: Instant,
    last_action: &'static str,
    db: String,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

const ENV: [(&str, &str); 2] = [("TEST_APP_KEY", "sk-app"), ("TEST_OPS_TOKEN", "ops-secret")];

fn load_then_kill(durability: &str) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(&cfg, config(durability)).expect("write");
    let db = dir.path().join("crash.db").to_string_lossy().into_owned();
    let mut server = start_server(&cfg, &db, &ENV);
    let base = server.base.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let acked: Acked = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (killed_at, last_action) = rt.block_on(async {
        let http = reqwest::Client::new();
        let mut workers = Vec::new();
        for w in 0..16 {
            let (http, base, acked, stop) = (http.clone(), base.clone(), acked.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                let mut i = 0u64;
                // Bounded: stops at the kill, or after 5000 requests at most.
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 5000 {
                    i += 1;
                    let stream = i % 4 == 0;
                    let sent = http
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth("sk-app")
                        .json(&json!({"model": "support", "user": format!("w{w}-{i}"), "stream": stream,
                                      "messages": [{"role": "user", "content": "hi"}]}))
                        .send()
                        .await;
                    let Ok(r) = sent else { break };
                    let id = r
                        .headers()
                        .get("x-sluice-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    // Acknowledged = the whole answer arrived.
                    if r.bytes().await.is_ok() && !id.is_empty() {
                        acked.lock().expect("lock").push((id, Instant::now()));
                    }
                }
            }));
        }
        let act = |action: &'static str| {
            let http = http.clone();
            let base = base.clone();
            async move {
                let r = http
                    .post(format!("{base}/admin/rollouts/support-v2/{action}"))
                    .bearer_auth("ops-secret")
                    .json(&json!({"reason": "crash test"}))
                    .send()
                    .await
                    .expect("admin call");
                assert_eq!(r.status(), 200, "{action}: {}", r.text().await.unwrap_or_default());
            }
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        act("start").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        act("advance").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        act("pause").await;
        // The last action is acknowledged; kill at once, mid-load.
        server.child.kill().expect("kill -9");
        let killed_at = Instant::now();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for w in workers {
            let _ = w.await;
        }
        (killed_at, "paused")
    });
    let _ = server.child.wait();
    let acked = std::mem::take(&mut *acked.lock().expect("lock"));
    Outcome {
        acked,
        killed_at,
        last_action,
        db,
        dir,
        config: cfg,
    }
}

fn check(o: &Outcome, window: Duration) -> (usize, usize) {
    let store = Store::open_existing(&o.db).expect("store opens after kill -9");
    store.quick_check().expect("store is not corrupt");
    let mut missing_old = 0;
    let mut missing_recent = 0;
    for (id, at) in &o.acked {
        if store.get(id).expect("read").is_none() {
            if o.killed_at.duration_since(*at) > window {
                missing_old += 1;
            } else {
                missing_recent += 1;
            }
        }
    }
    (missing_old, missing_recent)
}

fn restarted_status(o: &Outcome) -> Value {
    let server = start_server(&o.config, &o.db, &ENV);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let v = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{}/admin/rollouts/support-v2", server.base))
            .bearer_auth("ops-secret")
            .send()
            .await
            .expect("sent")
            .json::<Value>()
            .await
            .expect("json")
    });
    drop(server);
    v
}

#[test]
fn kill_9_loses_no_admin_action_and_at_most_the_last_commit_window() {
    let o = load_then_kill("batched");
    assert!(
        o.acked.len() > 200,
        "only {} requests answered",
        o.acked.len()
    );
    let (old, recent) = check(&o, Duration::from_millis(50));
    assert_eq!(
        old, 0,
        "{old} records answered more than 50 ms before the kill are missing ({recent} recent)"
    );
    let st = restarted_status(&o);
    assert_eq!(st["status"], o.last_action, "{st}");
    assert_eq!(st["stage"], 1, "the acknowledged advance survived: {st}");
    drop(o.dir);
}

#[test]
fn kill_9_in_strict_mode_loses_nothing_acknowledged() {
    let o = load_then_kill("strict");
    assert!(
        o.acked.len() > 100,
        "only {} requests answered",
        o.acked.len()
    );
    let (old, recent) = check(&o, Duration::from_millis(50));
    assert_eq!(
        old + recent,
        0,
        "{old} + {recent} acknowledged records missing"
    );
    let st = restarted_status(&o);
    assert_eq!(st["status"], o.last_action, "{st}");
    drop(o.dir);
}
