//! End-to-end: gates judge the candidate and the controller acts by itself;
//! feedback reaches the stage it belongs to.

mod common;

use std::time::{Duration, Instant};

use common::{chat, client, Harness, CLIENT_KEY, OTHER_KEY};
use serde_json::{json, Value};
use sluice_core::secret::digest_hex;

const VIEWER: &str = "viewer-token";
const OPS: &str = "ops-token";

/// A rollout of `candidate_model` (served by the OpenAI mock) with gates.
fn with_gated_rollout(
    candidate_model: &'static str,
    stages: &'static str,
    gates: &'static str,
) -> impl Fn(String) -> String {
    move |c: String| {
        let c = c.replace(
            "variants.v1 = { provider = \"mock-openai\", model = \"gpt-ok\", system_prompt = \"You are a support agent.\" }",
            &format!(
                "variants.v1 = {{ provider = \"mock-openai\", model = \"gpt-ok\", system_prompt = \"You are a support agent.\" }}\n\
                 variants.v2 = {{ provider = \"mock-openai\", model = \"{candidate_model}\" }}"
            ),
        );
        format!(
            r#"{c}
[[admin_tokens]]
name = "watcher"
role = "viewer"
sha256 = "{viewer}"

[[admin_tokens]]
name = "ops"
role = "operator"
sha256 = "{ops}"

[prices.gpt-ok]
input_per_mtok = 1.0
output_per_mtok = 2.0

[rollouts.support-v2]
deployment = "support"
candidate = "v2"
evaluate_every = "100ms"
stages = {stages}
{gates}
"#,
            viewer = digest_hex(VIEWER),
            ops = digest_hex(OPS),
        )
    }
}

async fn status(h: &Harness) -> Value {
    client()
        .get(h.url("/admin/rollouts/support-v2"))
        .bearer_auth(VIEWER)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json")
}

async fn start(h: &Harness) {
    let r = client()
        .post(h.url("/admin/rollouts/support-v2/start"))
        .bearer_auth(OPS)
        .json(&json!({"reason": "gated"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
}

async fn ask(h: &Harness, user: &str) -> (u16, String, String) {
    let r = chat(
        h,
        json!({"model": "support", "user": user, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let s = r.status().as_u16();
    let v = r
        .headers()
        .get("x-sluice-variant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let id = r.headers()["x-sluice-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let _ = r.bytes().await;
    (s, v, id)
}

/// Half the traffic to the candidate, then all of it.
const HALF_THEN_ALL: &str =
    r#"[{ kind = "percent", percent = 50 }, { kind = "percent", percent = 100 }]"#;

/// Fails a candidate whose error rate is 5 points worse than stable's.
const ERROR_RATE_GATE: &str = r#"
[[rollouts.support-v2.gates]]
signal = "error_rate"
max_regression = 0.05
min_samples = 30
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_candidate_is_rolled_back_by_the_gates() {
    let h = Harness::start_with(with_gated_rollout(
        "gpt-500",
        HALF_THEN_ALL,
        ERROR_RATE_GATE,
    ))
    .await;
    start(&h).await;
    let st = status(&h).await;
    assert_eq!(st["controller"], "auto");
    assert!(
        st["signals"]["stable"]["latency_ms"].get("p99").is_some(),
        "{st}"
    );
    let started = Instant::now();
    let mut rolled_back_at = None;
    let mut fallback_ids = Vec::new();
    for i in 0..2000 {
        let (code, variant, id) = ask(&h, &format!("user-{i}")).await;
        // The failing candidate's requests are served by stable (the
        // rollout's default fallback), yet still count against it.
        assert_eq!(code, 200, "request {i}");
        if rolled_back_at.is_none() && fallback_ids.len() < 5 {
            h.flush().await;
            let rec = h.store.get(&id).expect("read").expect("recorded");
            if rec.fallback_from.is_some() {
                assert_eq!(rec.fallback_from.as_deref(), Some("v2"));
                assert_eq!(variant, "v1");
                fallback_ids.push(id);
            }
        }
        if rolled_back_at.is_none() && i % 20 == 19 {
            let s = status(&h).await;
            if s["status"] == "rolled_back" {
                rolled_back_at = Some(i);
            }
        }
        if let Some(at) = rolled_back_at {
            if i > at {
                assert_eq!(
                    variant, "v1",
                    "request {i} after the rollback reached the candidate"
                );
            }
            if i > at + 50 {
                break;
            }
        }
    }
    assert!(
        rolled_back_at.is_some(),
        "not rolled back after {:?}",
        started.elapsed()
    );
    assert_eq!(
        fallback_ids.len(),
        5,
        "candidate requests fell back to stable"
    );
    let st = status(&h).await;
    let last = st["history"]
        .as_array()
        .expect("history")
        .last()
        .cloned()
        .expect("an entry");
    assert_eq!(last["actor"], "controller");
    assert_eq!(last["action"], "rollback");
    assert!(
        last["reason"]
            .as_str()
            .expect("reason")
            .starts_with("gate failed: error_rate: candidate 100.00 %"),
        "{last}"
    );
    let verdicts = st["verdict_history"].as_array().expect("verdicts");
    assert!(
        verdicts
            .iter()
            .any(|v| v["outcome"] == "fail" && v["signal"] == "error_rate"),
        "{verdicts:?}"
    );
    let fail = verdicts
        .iter()
        .find(|v| v["outcome"] == "fail")
        .expect("fail");
    assert!(fail["n_candidate"].as_u64().expect("n") >= 30);
    assert!(fail["ci_low"].as_f64().expect("low") > 0.05);
    h.stop().await;
}

/// The controller runs on the control plane's own thread: with every thread
/// serving clients held busy, a failing gate still rolls the candidate back
/// (and the first request served afterwards goes to stable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_rolls_back_while_client_serving_is_stuck() {
    let h = Harness::start_with(|c| {
        with_gated_rollout("gpt-500", HALF_THEN_ALL, ERROR_RATE_GATE)(c)
            // Evaluated at the start (nothing to judge yet), then not again
            // until the serving side is stuck.
            .replace("evaluate_every = \"100ms\"", "evaluate_every = \"4s\"")
    })
    .await;
    start(&h).await;
    for i in 0..120 {
        ask(&h, &format!("user-{i}")).await;
    }
    assert_eq!(
        status(&h).await["status"],
        "running",
        "the controller acted before the serving side was stuck"
    );

    let stuck = common::Stuck::runtime(2);
    let t = Instant::now();
    let mut rolled_back = false;
    while !rolled_back && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(20));
        rolled_back = h
            .store
            .rollout("support-v2")
            .expect("read")
            .is_some_and(|r| r.state.status == sluice_core::rollout::Status::RolledBack);
    }
    let while_stuck = stuck.still();
    stuck.release();
    assert!(rolled_back, "not rolled back within 15 s");
    assert!(
        while_stuck,
        "the controller acted only once client serving was free again"
    );
    let (code, variant, _) = ask(&h, "user-after").await;
    assert_eq!((code, variant.as_str()), (200, "v1"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_candidate_is_promoted_by_the_gates() {
    let h = Harness::start_with(with_gated_rollout(
        "gpt-ok",
        r#"[{ kind = "percent", percent = 50 }, { kind = "percent", percent = 100 }]"#,
        r#"
[[rollouts.support-v2.gates]]
signal = "error_rate"
max_regression = 0.1
min_samples = 40

[[rollouts.support-v2.gates]]
signal = "cost_per_request"
max_regression = "50%"
min_samples = 40
"#,
    ))
    .await;
    start(&h).await;
    let mut promoted = false;
    for i in 0..3000 {
        ask(&h, &format!("user-{i}")).await;
        if i % 25 == 24 && status(&h).await["status"] == "promoted" {
            promoted = true;
            break;
        }
    }
    assert!(promoted, "{}", status(&h).await);
    let st = status(&h).await;
    let actions: Vec<(String, String)> = st["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or("").to_string(),
                e["action"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("ops".to_string(), "start".to_string()),
            ("controller".into(), "advance".into()),
            ("controller".into(), "advance".into())
        ]
    );
    assert!(
        st["history"][1]["reason"]
            .as_str()
            .expect("r")
            .starts_with("all gates pass"),
        "{st}"
    );
    // Every request afterwards goes to the candidate.
    assert_eq!(ask(&h, "late-user").await.1, "v2");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_is_checked_and_counted_in_its_stage() {
    let h = Harness::start_with(with_gated_rollout(
        "gpt-ok",
        r#"[{ kind = "percent", percent = 50 }]"#,
        r#"
[[rollouts.support-v2.gates]]
signal = "feedback_down_rate"
max_regression = 0.05
min_samples = 1000
"#,
    ))
    .await;
    start(&h).await;
    let c = client();
    let url = h.url("/v1/feedback");
    let (_, _, id) = ask(&h, "alice").await;
    // Immediately after the answer (the record may still be queued).
    let r = c
        .post(&url)
        .bearer_auth(CLIENT_KEY)
        .json(&json!({"request_id": id, "thumbs": "down"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.expect("json");
    assert_eq!(b["rollout_stage"]["rollout"], "support-v2");
    // Changing one's mind replaces, never double counts.
    let r = c
        .post(&url)
        .bearer_auth(CLIENT_KEY)
        .json(&json!({"request_id": id, "thumbs": "up", "comment": "actually fine"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(
        r.json::<Value>().await.expect("json")["replaced_earlier_feedback"],
        true
    );
    let st = status(&h).await;
    let gate = &st["gates"][0];
    assert_eq!(gate["signal"], "feedback_down_rate");
    assert_eq!(
        gate["n_stable"].as_u64().unwrap_or(0) + gate["n_candidate"].as_u64().unwrap_or(0),
        1,
        "{gate}"
    );
    // Unknown id, another key's request, bad values.
    let r = c
        .post(&url)
        .bearer_auth(CLIENT_KEY)
        .json(&json!({"request_id": "req_nope", "thumbs": "up"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 404);
    let r = c
        .post(&url)
        .bearer_auth(OTHER_KEY)
        .json(&json!({"request_id": id, "thumbs": "up"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 404);
    let r = c
        .post(&url)
        .bearer_auth(CLIENT_KEY)
        .json(&json!({"request_id": id, "score": 7}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["param"],
        "score"
    );
    let r = c
        .post(&url)
        .json(&json!({"request_id": id, "thumbs": "up"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 401);
    // Cost was computed from the price table for the priced model.
    h.flush().await;
    let rec = h.store.get(&id).expect("read").expect("recorded");
    if rec.variant.as_deref() == Some("v1") {
        assert!(rec.cost_usd.expect("priced") > 0.0);
    }
    assert_eq!(rec.refusal, Some(false));
    // The stage's signals survive a restart (rebuilt from records + feedback).
    let before = status(&h).await["gates"][0].clone();
    let h = h.restart().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = status(&h).await["gates"][0].clone();
    assert_eq!(before["n_stable"], after["n_stable"]);
    assert_eq!(before["n_candidate"], after["n_candidate"]);
    h.stop().await;
}

/// `None` for a 200; otherwise what was asked and what came back.
async fn unless_ok(what: &str, r: reqwest::Response) -> Option<String> {
    if r.status() == 200 {
        return None;
    }
    let status = r.status();
    Some(format!(
        "{what}: {status} {}",
        r.text().await.unwrap_or_default()
    ))
}

/// Stops a harness the test's tasks shared, once they are done with it.
async fn stop_shared(h: std::sync::Arc<Harness>) -> sluice_gateway::ShutdownReport {
    match std::sync::Arc::try_unwrap(h) {
        Ok(h) => h.stop().await,
        Err(_) => panic!("harness still shared"),
    }
}

/// Feedback given while traffic flows is accepted and counted every time:
/// the record writer committing group after group must not make a feedback
/// write fail with "database is locked".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_given_during_traffic_is_never_refused() {
    let h = std::sync::Arc::new(
        Harness::start_with(with_gated_rollout(
            "gpt-ok",
            r#"[{ kind = "percent", percent = 50 }]"#,
            r#"
[[rollouts.support-v2.gates]]
signal = "feedback_down_rate"
max_regression = 0.05
min_samples = 100000
"#,
        ))
        .await,
    );
    start(&h).await;
    // Traffic that only asks, keeping the writer busy.
    let mut tasks = Vec::new();
    for t in 0..8 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                ask(&h, &format!("busy-{t}-{i}")).await;
            }
            Vec::new()
        }));
    }
    // Traffic that gives feedback on each answer as soon as it arrives.
    for t in 0..2 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut refused = Vec::new();
            for i in 0..100 {
                let (_, _, id) = ask(&h, &format!("fb-{t}-{i}")).await;
                let r = c
                    .post(h.url("/v1/feedback"))
                    .bearer_auth(CLIENT_KEY)
                    .json(&json!({"request_id": id, "thumbs": if i % 2 == 0 { "down" } else { "up" }}))
                    .send()
                    .await
                    .expect("sent");
                refused.extend(unless_ok("feedback", r).await);
            }
            refused
        }));
    }
    let mut refused = Vec::new();
    for t in tasks {
        refused.extend(t.await.expect("task"));
    }
    assert!(
        refused.is_empty(),
        "{} of 200 feedback posts refused, first: {:?}",
        refused.len(),
        refused.first()
    );
    let gate = status(&h).await["gates"][0].clone();
    assert_eq!(
        gate["n_stable"].as_u64().unwrap_or(0) + gate["n_candidate"].as_u64().unwrap_or(0),
        200,
        "{gate}"
    );
    stop_shared(h).await;
}

/// Everything an operator and the users do on a busy day, at once: chat
/// and streamed traffic, feedback on the answers, the rollout read, paused
/// and resumed, the configuration reloaded, metrics scraped. Nothing is
/// refused, every request is recorded, and the rollout's history holds each
/// change once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_at_once_while_traffic_flows() {
    const ADMIN: &str = "admin-token";
    let gated = with_gated_rollout(
        "gpt-ok",
        r#"[{ kind = "percent", percent = 50 }]"#,
        r#"
[[rollouts.support-v2.gates]]
signal = "error_rate"
max_regression = 0.05
min_samples = 100000
"#,
    );
    let h = std::sync::Arc::new(
        Harness::start_with(move |c| {
            format!(
                "{}
[[admin_tokens]]
name = \"root\"
role = \"admin\"
sha256 = \"{}\"
",
                gated(c),
                digest_hex(ADMIN)
            )
        })
        .await,
    );
    start(&h).await;
    type Outcome = (usize, Vec<String>);
    let mut tasks: Vec<tokio::task::JoinHandle<Outcome>> = Vec::new();
    for t in 0..4 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut bad = Vec::new();
            for i in 0..150 {
                let (s, _, id) = ask(&h, &format!("chat-{t}-{i}")).await;
                if s != 200 {
                    bad.push(format!("chat {id}: {s}"));
                }
            }
            (150, bad)
        }));
    }
    for t in 0..2 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut bad = Vec::new();
            for i in 0..40 {
                let r = chat(
                    &h,
                    json!({"model": "support", "user": format!("stream-{t}-{i}"), "stream": true,
                           "messages": [{"role": "user", "content": "hi"}]}),
                )
                .await;
                let s = r.status();
                let body = r.text().await.unwrap_or_default();
                if s != 200 || !body.contains("data: [DONE]") {
                    bad.push(format!("stream: {s} {}", &body[..body.len().min(200)]));
                }
            }
            (40, bad)
        }));
    }
    {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut bad = Vec::new();
            for i in 0..60 {
                let (_, _, id) = ask(&h, &format!("fb-{i}")).await;
                let r = c
                    .post(h.url("/v1/feedback"))
                    .bearer_auth(CLIENT_KEY)
                    .json(&json!({"request_id": id, "score": 0.5}))
                    .send()
                    .await
                    .expect("sent");
                bad.extend(unless_ok("feedback", r).await);
            }
            (60, bad)
        }));
    }
    {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut bad = Vec::new();
            for i in 0..40 {
                let path = match i % 4 {
                    0 => "/admin/rollouts/support-v2",
                    1 => "/admin/rollouts",
                    2 => "/admin/providers",
                    _ => "/metrics",
                };
                let r = c
                    .get(h.url(path))
                    .bearer_auth(VIEWER)
                    .send()
                    .await
                    .expect("sent");
                bad.extend(unless_ok(&format!("GET {path}"), r).await);
            }
            (0, bad)
        }));
    }
    {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut bad = Vec::new();
            for i in 0..20 {
                let (path, token) = match i % 3 {
                    0 => ("/admin/rollouts/support-v2/pause", OPS),
                    1 => ("/admin/rollouts/support-v2/resume", OPS),
                    _ => ("/admin/reload", ADMIN),
                };
                let r = c
                    .post(h.url(path))
                    .bearer_auth(token)
                    .json(&json!({"reason": format!("busy day {i}")}))
                    .send()
                    .await
                    .expect("sent");
                bad.extend(unless_ok(&format!("POST {path}"), r).await);
            }
            (0, bad)
        }));
    }
    let mut served = 0;
    let mut bad = Vec::new();
    for t in tasks {
        let (n, b) = t.await.expect("task");
        served += n;
        bad.extend(b);
    }
    assert!(
        bad.is_empty(),
        "{} refused, first: {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    let st = status(&h).await;
    let actions: Vec<&str> = st["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    let mut expected = vec!["start"];
    for i in 0..20 {
        match i % 3 {
            0 => expected.push("pause"),
            1 => expected.push("resume"),
            _ => {}
        }
    }
    assert_eq!(actions, expected, "{st}");
    h.flush().await;
    assert_eq!(h.store.count().expect("count"), served as u64);
    let report = stop_shared(h).await;
    assert_eq!(report.events.lost(), 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fallback_the_client_sees_the_candidates_error() {
    let h = Harness::start_with(with_gated_rollout(
        "gpt-500",
        r#"[{ kind = "percent", percent = 100 }]"#,
        "fallback = \"none\"\ncontroller = \"manual\"\n",
    ))
    .await;
    start(&h).await;
    let (code, variant, id) = ask(&h, "someone").await;
    assert_eq!(code, 502);
    assert_eq!(variant, "v2");
    h.flush().await;
    let rec = h.store.get(&id).expect("read").expect("recorded");
    assert_eq!(rec.fallback_from, None);
    assert_eq!(rec.error_kind.as_deref(), Some("upstream_error"));
    h.stop().await;
}
