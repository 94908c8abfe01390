//! End-to-end: shadow stages mirror traffic without touching what users get,
//! record linked pairs and judge them; stages that require probe suites open
//! only when the suites pass.

mod common;

use std::time::{Duration, Instant};

use common::{chat, client, Harness};
use serde_json::{json, Value};
use sluice_core::secret::digest_hex;

const VIEWER: &str = "viewer-token";
const OPS: &str = "ops-token";

/// The support deployment with a candidate `v2` on `candidate_model`, admin
/// tokens, and `rollouts` appended verbatim.
/// A rollout `name` of `support` to `v2` that only people move (no
/// controller); `rest` holds its stages and anything after them.
fn manual(name: &str, rest: &str) -> String {
    format!(
        "\n[rollouts.{name}]\ndeployment = \"support\"\ncandidate = \"v2\"\ncontroller = \"manual\"\n{rest}"
    )
}

/// A manual `support-v2` rollout: a shadow stage (4 mirrors at most, each
/// cut at `timeout`) that does not end by itself, then everyone.
fn shadow_then_everyone(timeout: &str) -> String {
    manual(
        "support-v2",
        &format!(
            r#"stages = [
  {{ kind = "shadow", max_in_flight = 4, timeout = "{timeout}", min_requests = 100000 }},
  {{ kind = "percent", percent = 100 }},
]
"#
        ),
    )
}

fn with(candidate_model: &'static str, rollouts: String) -> impl Fn(String) -> String {
    move |c: String| {
        let c = c.replace(
            "variants.v1 = { provider = \"mock-openai\", model = \"gpt-ok\", system_prompt = \"You are a support agent.\" }",
            &format!(
                "variants.v1 = {{ provider = \"mock-openai\", model = \"gpt-ok\", system_prompt = \"You are a support agent.\" }}\n\
                 variants.v2 = {{ provider = \"mock-openai\", model = \"{candidate_model}\" }}"
            ),
        );
        format!(
            "{c}\n[[admin_tokens]]\nname = \"watcher\"\nrole = \"viewer\"\nsha256 = \"{}\"\n\n\
             [[admin_tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n\n{rollouts}\n",
            digest_hex(VIEWER),
            digest_hex(OPS),
        )
    }
}

async fn view(h: &Harness, name: &str) -> Value {
    client()
        .get(h.url(&format!("/admin/rollouts/{name}")))
        .bearer_auth(VIEWER)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json")
}

async fn act(h: &Harness, name: &str, action: &str) -> (u16, Value) {
    let r = client()
        .post(h.url(&format!("/admin/rollouts/{name}/{action}")))
        .bearer_auth(OPS)
        .json(&json!({"reason": "test"}))
        .send()
        .await
        .expect("sent");
    let s = r.status().as_u16();
    (s, r.json().await.expect("json"))
}

/// One request as a user sees it: status, variant, answer text, latency,
/// request id.
async fn ask(h: &Harness, i: usize) -> (u16, String, String, f64, String) {
    let started = Instant::now();
    let r = chat(
        h,
        json!({"model": "support", "user": format!("u{i}"), "messages": [{"role": "user", "content": format!("question {i}")}]}),
    )
    .await;
    let status = r.status().as_u16();
    let variant = r.headers()["x-sluice-variant"]
        .to_str()
        .expect("variant")
        .to_string();
    let id = r.headers()["x-sluice-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let body: Value = r.json().await.expect("json");
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (status, variant, text, ms, id)
}

fn quantile(mut xs: Vec<f64>, q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() as f64 * q).ceil() as usize).clamp(1, xs.len()) - 1]
}

/// The recorded mirrors, once there are `n` of them (or after 10 s, with
/// however many there are).
async fn mirrors(h: &Harness, n: usize) -> Vec<sluice_store::RequestRecord> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        h.flush().await;
        let rows: Vec<_> = h
            .store
            .recent(1000)
            .expect("recent")
            .into_iter()
            .filter(|r| r.shadow_of.is_some())
            .collect();
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_candidate_in_shadow_leaves_stable_untouched_and_pairs_are_recorded() {
    let rollout = shadow_then_everyone("300ms");
    // gpt-slow answers after 3 s: every mirror hits the 300 ms shadow timeout.
    let h = Harness::start_with(with("gpt-slow", rollout)).await;
    const N: usize = 40;
    let mut base = Vec::new();
    for i in 0..N {
        base.push(ask(&h, i).await);
    }
    let (s, _) = act(&h, "support-v2", "start").await;
    assert_eq!(s, 200);
    let mut shadowed = Vec::new();
    for i in 0..N {
        shadowed.push(ask(&h, i).await);
    }
    // Same answers, same variant, same status.
    for (b, s) in base.iter().zip(&shadowed) {
        assert_eq!((b.0, &b.1, &b.2), (s.0, &s.1, &s.2));
        assert_eq!(s.1, "v1");
    }
    let lat = |v: &[(u16, String, String, f64, String)]| v.iter().map(|x| x.3).collect::<Vec<_>>();
    let (b50, s50) = (quantile(lat(&base), 0.5), quantile(lat(&shadowed), 0.5));
    let s_max = quantile(lat(&shadowed), 1.0);
    assert!(
        s50 <= b50 + 20.0,
        "median latency with shadow {s50:.1} ms vs {b50:.1} ms without"
    );
    assert!(
        s_max < 250.0,
        "a request waited for its mirror: {s_max:.1} ms (mirror timeout 300 ms)"
    );
    // Mirrors beyond max_in_flight were skipped and counted.
    let v = view(&h, "support-v2").await;
    let sh = &v["shadow"];
    let mirrored = sh["mirrored"].as_u64().expect("mirrored");
    let skipped = sh["skipped_full"].as_u64().expect("skipped");
    assert_eq!(mirrored + skipped, N as u64, "{sh}");
    assert!(mirrored >= 4 && skipped > 0, "{sh}");
    assert_eq!(v["requests"]["stable"], N as u64);
    assert_eq!(v["requests"]["candidate"], 0);
    // Every mirror is recorded, linked to the request it mirrors, and paired.
    let primaries: std::collections::BTreeSet<String> =
        shadowed.iter().map(|x| x.4.clone()).collect();
    let rows = mirrors(&h, mirrored as usize).await;
    assert_eq!(rows.len() as u64, mirrored);
    for r in &rows {
        assert!(primaries.contains(r.shadow_of.as_deref().expect("link")));
        assert_eq!(r.assignment.as_deref(), Some("shadow"));
        assert_eq!(r.variant.as_deref(), Some("v2"));
        assert_eq!(r.rollout.as_deref(), Some("support-v2"));
        assert_eq!(r.error_kind.as_deref(), Some("upstream_timeout"));
        assert!(
            r.latency_ms >= 290.0 && r.latency_ms < 2000.0,
            "{}",
            r.latency_ms
        );
        let primary = h
            .store
            .get(r.shadow_of.as_deref().expect("link"))
            .expect("get")
            .expect("primary stored");
        assert_eq!(primary.variant.as_deref(), Some("v1"));
        assert_eq!(primary.status, 200);
    }
    let v = view(&h, "support-v2").await;
    assert_eq!(v["shadow"]["paired"], mirrored, "{}", v["shadow"]);
    assert_eq!(v["shadow"]["failed"], mirrored);
    // Mirrors are not served traffic: no request metric for v2.
    let metrics = client()
        .get(h.url("/metrics"))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    assert!(
        metrics
            .contains("sluice_shadow_calls_total{rollout=\"support-v2\",outcome=\"skipped_full\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("variant=\"v2\""), "{metrics}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_candidate_is_rolled_back_in_shadow_by_paired_gates() {
    let rollout = r#"
[rollouts.support-v2]
deployment = "support"
candidate = "v2"
evaluate_every = "100ms"
stages = [
  { kind = "shadow", min_requests = 100000 },
  { kind = "percent", percent = 100 },
]
gates = [
  { signal = "error_rate", max_regression = 0.01, min_samples = 20 },
  { signal = "feedback_down_rate", max_regression = 0.05 },
]
"#
    .to_string();
    let h = Harness::start_with(with("gpt-500", rollout)).await;
    let (s, _) = act(&h, "support-v2", "start").await;
    assert_eq!(s, 200);
    let mut status = String::new();
    for i in 0..400 {
        let (code, variant, ..) = ask(&h, i).await;
        assert_eq!((code, variant.as_str()), (200, "v1"));
        if i % 10 == 9 {
            status = view(&h, "support-v2").await["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if status == "rolled_back" {
                break;
            }
        }
    }
    assert_eq!(status, "rolled_back");
    let v = view(&h, "support-v2").await;
    let last = v["history"]
        .as_array()
        .expect("history")
        .last()
        .cloned()
        .expect("entry");
    assert_eq!(last["actor"], "controller");
    let reason = last["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("gate failed: error_rate: candidate 100.00 %"),
        "{reason}"
    );
    assert!(reason.contains("paired over"), "{reason}");
    assert!(reason.contains("on stable only 0"), "{reason}");
    h.stop().await;
}

/// A streamed request is mirrored as a stream: the mirror's record has its
/// time to first token and the reassembled answer, and the stage's
/// `ttft_p95` gate judges the pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_requests_are_mirrored_as_streams_and_feed_the_ttft_gate() {
    let rollout = manual(
        "support-v2",
        r#"stages = [{ kind = "shadow", max_in_flight = 64, timeout = "5s" }, { kind = "percent", percent = 100 }]

[[rollouts.support-v2.gates]]
signal = "ttft_p95"
max_regression = "50%"
min_samples = 5
"#,
    );
    let h = Harness::start_with(with("gpt-candidate", rollout)).await;
    let (s, b) = act(&h, "support-v2", "start").await;
    assert_eq!(s, 200, "{b}");
    const N: usize = 12;
    for i in 0..N {
        let r = chat(
            &h,
            json!({"model": "support", "user": format!("s{i}"), "stream": true,
                   "messages": [{"role": "user", "content": format!("question {i}")}]}),
        )
        .await;
        assert_eq!(r.status(), 200);
        let body = r.text().await.expect("body");
        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    }
    let recorded = mirrors(&h, N).await;
    assert_eq!(recorded.len(), N);
    for m in &recorded {
        assert!(m.stream, "a streamed request's mirror streams");
        assert_eq!(m.status, 200);
        let ttft = m.ttft_ms.expect("time to first token recorded");
        assert!(
            ttft > 0.0 && ttft <= m.latency_ms,
            "{ttft} vs {}",
            m.latency_ms
        );
        let body = m.response_body.as_deref().expect("body kept");
        assert!(body.contains("Hello from the mock."), "{body}");
        assert!(m.tokens_out.is_some(), "usage from the stream's last chunk");
    }
    let v = view(&h, "support-v2").await;
    assert_eq!(v["shadow"]["paired"], N as u64, "{}", v["shadow"]);
    let gate = v["gates"]
        .as_array()
        .expect("gates")
        .iter()
        .find(|g| g["signal"] == "ttft_p95")
        .cloned()
        .expect("the ttft gate is judged in shadow");
    assert_eq!(gate["n_stable"], N as u64, "{gate}");
    assert_eq!(gate["n_candidate"], N as u64, "{gate}");
    assert!(gate["candidate"].as_f64().is_some(), "{gate}");
    h.stop().await;
}

/// A probe suite that takes its time does not hold up a rollback: the
/// rollback lands at once, and the advance that was waiting on the suite is
/// then refused (the rollout is rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_does_not_wait_for_a_running_probe_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let suite = dir.path().join("slow.jsonl");
    std::fs::write(
        &suite,
        "{\"id\": \"greets\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"assert\": [{\"type\": \"icontains\", \"value\": \"hello\"}]}\n",
    )
    .expect("write");
    let stages = format!(
        r#"stages = [
  {{ kind = "percent", percent = 10 }},
  {{ kind = "percent", percent = 50, require_suites = [{{ suite = "{s}" }}] }},
]
"#,
        s = suite.display()
    );
    let rollouts = manual("slow-suite", &stages) + &manual("slow-suite-b", &stages);
    // The candidate's model answers after 3 s (the provider gives up at
    // 800 ms): the suite runs for most of a second.
    let h = Harness::start_with(with("gpt-slow", rollouts)).await;
    let (s, b) = act(&h, "slow-suite", "start").await;
    assert_eq!(s, 200, "{b}");
    let started = Instant::now();
    let advance = act(&h, "slow-suite", "advance");
    let rollback = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let r = act(&h, "slow-suite", "rollback").await;
        (r, started.elapsed())
    };
    let (advanced, ((rs, rb), rolled_back_at)) = tokio::join!(advance, rollback);
    let advanced_at = started.elapsed();
    assert_eq!(rs, 200, "{rb}");
    assert_eq!(rb["status"], "rolled_back");
    assert!(
        rolled_back_at < Duration::from_millis(600),
        "the rollback waited {rolled_back_at:?}"
    );
    assert!(advanced_at >= Duration::from_millis(700), "{advanced_at:?}");
    // Under the lock, the advance meets a rolled-back rollout.
    assert_eq!(advanced.0, 409, "{}", advanced.1);
    assert_eq!(advanced.1["error"]["code"], "transition_refused");
    let v = view(&h, "slow-suite").await;
    assert_eq!(v["status"], "rolled_back", "{v}");
    assert_eq!(v["stage"], 0, "{v}");

    // A suite's verdict belongs to the state it was run for: paused and
    // resumed while it ran, the rollout is not advanced on it.
    let (s, b) = act(&h, "slow-suite-b", "start").await;
    assert_eq!(s, 200, "{b}");
    let advance = act(&h, "slow-suite-b", "advance");
    let meanwhile = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let p = act(&h, "slow-suite-b", "pause").await;
        let r = act(&h, "slow-suite-b", "resume").await;
        (p.0, r.0)
    };
    let (advanced, (paused, resumed)) = tokio::join!(advance, meanwhile);
    assert_eq!((paused, resumed), (200, 200));
    assert_eq!(advanced.0, 409, "{}", advanced.1);
    assert_eq!(advanced.1["error"]["code"], "stale_decision");
    let v = view(&h, "slow-suite-b").await;
    assert_eq!(
        (&v["status"], &v["stage"]),
        (&json!("running"), &json!(0)),
        "{v}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_requiring_a_suite_opens_only_when_it_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let passing = dir.path().join("passing.jsonl");
    let failing = dir.path().join("failing.jsonl");
    std::fs::write(
        &passing,
        "{\"id\": \"greets\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"assert\": [{\"type\": \"icontains\", \"value\": \"hello\"}, {\"type\": \"not-refusal\"}, {\"type\": \"llm-judge\", \"rubric\": \"Greets the user\", \"provider\": \"mock-openai\", \"model\": \"gpt-judge\"}]}\n",
    )
    .expect("write");
    std::fs::write(
        &failing,
        "{\"id\": \"greets\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"assert\": [{\"type\": \"not-refusal\"}]}\n\
         {\"id\": \"refunds\", \"messages\": [{\"role\": \"user\", \"content\": \"refund?\"}], \"assert\": [{\"type\": \"contains\", \"value\": \"refund\"}]}\n\
         {\"id\": \"cooking\", \"messages\": [{\"role\": \"user\", \"content\": \"how do I cook rice?\"}], \"assert\": [{\"type\": \"llm-judge\", \"rubric\": \"Stays on support topics\", \"provider\": \"mock-openai\", \"model\": \"gpt-judge\", \"threshold\": 0.5}]}\n",
    )
    .expect("write");
    let (p, f) = (passing.display(), failing.display());
    let rollouts = format!(
        r#"
[rollouts.gated-fail]
deployment = "support"
candidate = "v2"
controller = "manual"
stages = [{{ kind = "percent", percent = 10, require_suites = [{{ suite = "{f}", min_pass_rate = 0.9 }}] }}]

[rollouts.gated-pass]
deployment = "support"
candidate = "v2"
controller = "manual"
stages = [{{ kind = "percent", percent = 10, require_suites = [{{ suite = "{p}" }}] }}]

[rollouts.auto-fail]
deployment = "support"
candidate = "v2"
evaluate_every = "100ms"
controller = "auto"
stages = [
  {{ kind = "percent", percent = 10 }},
  {{ kind = "percent", percent = 50, require_suites = [{{ suite = "{f}", min_pass_rate = 0.9 }}] }},
]
"#
    );
    let h = Harness::start_with(with("gpt-candidate", rollouts)).await;
    // A person cannot open a stage whose suite fails.
    let (s, b) = act(&h, "gated-fail", "start").await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(b["error"]["code"], "suite_failed");
    let msg = b["error"]["message"].as_str().expect("msg");
    assert!(msg.contains("1/3 cases pass (33.3 %)"), "{msg}");
    assert!(
        msg.contains("cooking (llm-judge: judge scored 0.00 (threshold 0.50))"),
        "{msg}"
    );
    assert!(msg.contains("below the required 90.0 %"), "{msg}");
    assert!(
        msg.contains("refunds (contains: contains \"refund\")"),
        "{msg}"
    );
    assert_eq!(view(&h, "gated-fail").await["status"], "pending");
    // A passing suite lets the stage open.
    let (s, b) = act(&h, "gated-pass", "start").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["status"], "running");
    let (s, _) = act(&h, "gated-pass", "rollback").await;
    assert_eq!(s, 200);
    // The controller treats a failing suite as a failing gate.
    let (s, _) = act(&h, "auto-fail", "start").await;
    assert_eq!(s, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v = view(&h, "auto-fail").await;
        if v["status"] == "rolled_back" || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(v["status"], "rolled_back", "{v}");
    let last = v["history"]
        .as_array()
        .expect("history")
        .last()
        .cloned()
        .expect("entry");
    assert_eq!(last["actor"], "controller");
    assert!(
        last["reason"]
            .as_str()
            .expect("reason")
            .starts_with("gate failed: stage 1 cannot open: suite"),
        "{last}"
    );
    // Every suite run is stored with what triggered it.
    let runs = h.store.eval_runs(10).expect("runs");
    let triggers: Vec<&str> = runs.iter().map(|r| r.trigger.as_str()).collect();
    assert!(triggers.contains(&"gate:gated-fail/0"), "{triggers:?}");
    assert!(triggers.contains(&"gate:gated-pass/0"), "{triggers:?}");
    assert!(triggers.contains(&"gate:auto-fail/1"), "{triggers:?}");
    let failed = runs
        .iter()
        .find(|r| r.trigger == "gate:gated-fail/0")
        .expect("run");
    assert_eq!((failed.passed, failed.total), (1, 3));
    assert_eq!(
        h.store.eval_cases(&failed.id).expect("cases"),
        [
            ("greets".to_string(), true),
            ("refunds".to_string(), false),
            ("cooking".to_string(), false)
        ]
    );
    let passed = runs
        .iter()
        .find(|r| r.trigger == "gate:gated-pass/0")
        .expect("run");
    let report = h
        .store
        .eval_report(&passed.id)
        .expect("read")
        .expect("stored");
    let judged = &report.cases[0].runs[0].assertions[2];
    assert_eq!(judged.kind, "llm-judge");
    assert!(
        judged.pass && judged.detail.contains("judge scored 1.00"),
        "{judged:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_for_running_mirrors_and_writes_their_records() {
    let rollout = shadow_then_everyone("1s");
    // gpt-slow answers after 3 s: each mirror runs for its 1 s timeout,
    // long after the users' answers came back.
    let h = Harness::start_with(with("gpt-slow", rollout)).await;
    let (s, _) = act(&h, "support-v2", "start").await;
    assert_eq!(s, 200);
    for i in 0..3 {
        assert_eq!(ask(&h, i).await.0, 200);
    }
    let started = Instant::now();
    let report = h.stop().await;
    assert_eq!(report.events.dropped, 0, "{:?}", report.events);
    assert_eq!(report.events.lost(), 0, "{:?}", report.events);
    // Three answers and three mirrors (and nothing else is recorded here).
    assert_eq!(report.events.written, 6, "{:?}", report.events);
    assert!(started.elapsed() >= Duration::from_millis(500));
}
