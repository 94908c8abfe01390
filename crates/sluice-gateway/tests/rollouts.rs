//! End-to-end: staged rollouts through the admin API against the real gateway.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{chat, client, Harness, CLIENT_KEY};
use serde_json::{json, Value};
use sluice_core::secret::digest_hex;

const OPS: &str = "ops-token";
const VIEWER: &str = "viewer-token";
const ROOT: &str = "root-token";
const OPERATOR_KEY: &str = "sk-operator";

fn with_rollout(stages: &'static str) -> impl Fn(String) -> String {
    move |c: String| {
        let c = c.replace(
            "variants.v1 = { provider = \"mock-openai\", model = \"gpt-ok\", system_prompt = \"You are a support agent.\" }",
            "variants.v1 = { provider = \"mock-openai\", model = \"gpt-ok\", system_prompt = \"You are a support agent.\" }\n\
             variants.v2 = { provider = \"mock-openai\", model = \"gpt-candidate\" }",
        );
        format!(
            r#"{c}
[[admin_tokens]]
name = "ops"
role = "operator"
sha256 = "{ops}"

[[admin_tokens]]
name = "watcher"
role = "viewer"
sha256 = "{viewer}"

[[admin_tokens]]
name = "root"
role = "admin"
sha256 = "{root}"

[[api_keys]]
name = "tester"
role = "operator"
sha256 = "{operator}"

[cohorts.internal]
subjects = ["alice"]

[cohorts.beta]
match = {{ metadata.tier = "beta" }}

[rollouts.support-v2]
deployment = "support"
candidate = "v2"
subject = "user"
stages = {stages}
"#,
            ops = digest_hex(OPS),
            viewer = digest_hex(VIEWER),
            root = digest_hex(ROOT),
            operator = digest_hex(OPERATOR_KEY),
        )
    }
}

const WALK: &str = r#"[
  { kind = "cohort", cohorts = ["internal", "beta"] },
  { kind = "percent", percent = 50, approval = ["admin"] },
  { kind = "percent", percent = 100 },
]"#;

async fn admin(h: &Harness, token: &str, action: &str, reason: &str) -> (u16, Value) {
    let r = client()
        .post(h.url(&format!("/admin/rollouts/support-v2/{action}")))
        .bearer_auth(token)
        .json(&json!({"reason": reason}))
        .send()
        .await
        .expect("sent");
    let s = r.status().as_u16();
    (s, r.json().await.expect("json"))
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

async fn variant_for(h: &Harness, body: Value) -> (String, String) {
    let r = chat(h, body).await;
    assert_eq!(r.status(), 200);
    let v = r.headers()["x-sluice-variant"]
        .to_str()
        .expect("v")
        .to_string();
    let s = r.headers()["x-sluice-stage"]
        .to_str()
        .expect("s")
        .to_string();
    let _ = r.bytes().await;
    (v, s)
}

fn ask(user: &str) -> Value {
    json!({"model": "support", "user": user, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_walks_its_stages_with_roles_cohorts_and_sticky_buckets() {
    let h = Harness::start_with(with_rollout(WALK)).await;
    let c = client();
    // Authentication and roles.
    let r = c.get(h.url("/admin/rollouts")).send().await.expect("sent");
    assert_eq!(r.status(), 401);
    let list: Value = c
        .get(h.url("/admin/rollouts"))
        .bearer_auth(VIEWER)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(list["data"][0]["status"], "pending");
    let (s, b) = admin(&h, VIEWER, "start", "try").await;
    assert_eq!(s, 403);
    assert!(
        b["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("needs the operator role"),
        "{b}"
    );

    // Pending: everyone on stable.
    assert_eq!(
        variant_for(&h, ask("alice")).await,
        ("v1".into(), "none".into())
    );

    let (s, b) = admin(&h, OPS, "start", "internal dogfood").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["status"].as_str(), b["stage"].as_u64()),
        (Some("running"), Some(0))
    );
    // Cohort stage: members by subject or metadata, nobody else.
    assert_eq!(
        variant_for(&h, ask("alice")).await,
        ("v2".into(), "0:cohort".into())
    );
    assert_eq!(variant_for(&h, ask("bob")).await.0, "v1");
    let mut beta = ask("carol");
    beta["metadata"] = json!({"tier": "beta"});
    assert_eq!(variant_for(&h, beta).await.0, "v2");
    // The upstream saw the candidate's model, and no sluice metadata.
    let (_, up) = h.openai_seen.last();
    assert_eq!(up["model"], "gpt-candidate");
    assert!(up.get("metadata").is_none());

    let (s, _) = admin(&h, OPS, "advance", "cohort looks fine").await;
    assert_eq!(s, 200);
    // Stage 1 needs an admin's approval.
    let (s, b) = admin(&h, OPS, "advance", "").await;
    assert_eq!(s, 409);
    assert!(
        b["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("approval needed from: admin"),
        "{b}"
    );
    let (s, b) = admin(&h, OPS, "approve", "").await;
    assert_eq!(s, 403, "{b}");

    // 50 %: about half of 400 users, each always on the same side; alice stays in.
    let mut on_candidate = 0;
    for i in 0..400 {
        let user = format!("user-{i}");
        let (v, stage) = variant_for(&h, ask(&user)).await;
        assert_eq!(stage, "1:percent-50");
        if i % 40 == 0 {
            assert_eq!(variant_for(&h, ask(&user)).await.0, v, "sticky");
        }
        if v == "v2" {
            on_candidate += 1;
        }
    }
    assert!((150..=250).contains(&on_candidate), "{on_candidate} of 400");
    assert_eq!(variant_for(&h, ask("alice")).await.0, "v2");

    let (s, _) = admin(&h, ROOT, "approve", "numbers look right").await;
    assert_eq!(s, 200);
    let (s, b) = admin(&h, OPS, "advance", "to everyone").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["stage_label"], "percent-100");
    assert_eq!(variant_for(&h, ask("zed")).await.0, "v2");

    let (s, b) = admin(&h, OPS, "promote", "done").await;
    assert_eq!((s, b["status"].as_str()), (200, Some("promoted")));
    assert_eq!(
        variant_for(&h, ask("nobody")).await,
        ("v2".into(), "promoted".into())
    );
    let (s, b) = admin(&h, OPS, "start", "again").await;
    assert_eq!(s, 409);
    assert!(
        b["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("cannot start a rollout that is promoted"),
        "{b}"
    );

    // The history names every transition with actor, reason and the stage it left.
    let st = status(&h).await;
    let hist = st["history"].as_array().expect("history");
    let actions: Vec<&str> = hist
        .iter()
        .map(|e| e["action"].as_str().expect("a"))
        .collect();
    assert_eq!(
        actions,
        ["start", "advance", "approve", "advance", "promote"]
    );
    assert_eq!(hist[0]["actor"], "ops");
    assert_eq!(hist[0]["reason"], "internal dogfood");
    assert_eq!(
        (hist[3]["from_stage"].as_u64(), hist[3]["to_stage"].as_u64()),
        (Some(1), Some(2))
    );

    // Recorded requests carry rollout, stage and the assignment reason.
    h.flush().await;
    let rows = h.store.recent(2000).expect("rows");
    assert!(rows
        .iter()
        .any(|r| r.assignment.as_deref() == Some("cohort") && r.stage == Some(0)));
    assert!(rows
        .iter()
        .any(|r| r.assignment.as_deref() == Some("bucket")
            && r.stage == Some(1)
            && r.sticky == Some(true)));
    assert!(rows
        .iter()
        .any(|r| r.assignment.as_deref() == Some("promoted")));
    assert!(rows
        .iter()
        .filter(|r| r.stage.is_some())
        .all(|r| r.rollout.as_deref() == Some("support-v2")));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_during_a_burst_routes_nobody_to_the_candidate_afterwards() {
    let h = Arc::new(
        Harness::start_with(with_rollout(r#"[{ kind = "percent", percent = 100 }]"#)).await,
    );
    let (s, _) = admin(&h, OPS, "start", "").await;
    assert_eq!(s, 200);
    let url = h.url("/v1/chat/completions");
    let t0 = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let url = url.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut seen = Vec::new();
            for i in 0..60 {
                let sent_at = t0.elapsed();
                let r = c
                    .post(&url)
                    .bearer_auth(CLIENT_KEY)
                    .json(&json!({"model": "support", "user": format!("u{w}-{i}"), "messages": [{"role": "user", "content": "x"}]}))
                    .send()
                    .await
                    .expect("sent");
                let v = r.headers()["x-sluice-variant"].to_str().expect("v").to_string();
                let _ = r.bytes().await;
                seen.push((sent_at, v));
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            seen
        }));
    }
    // Roll back once a quarter of the burst has been served.
    while done.load(std::sync::atomic::Ordering::SeqCst) < 120 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (s, b) = admin(&h, OPS, "rollback", "error spike").await;
    let returned_at = t0.elapsed();
    assert_eq!((s, b["status"].as_str()), (200, Some("rolled_back")));
    let mut before = 0;
    let mut after = 0;
    for w in workers {
        for (sent_at, v) in w.await.expect("worker") {
            if sent_at > returned_at {
                after += 1;
                assert_eq!(
                    v, "v1",
                    "a request sent after the rollback returned reached the candidate"
                );
            } else if v == "v2" {
                before += 1;
            }
        }
    }
    assert!(
        before > 0,
        "the burst reached the candidate before the rollback"
    );
    assert!(after > 0, "the burst went on after the rollback");
    let h = Arc::try_unwrap(h).ok().expect("sole owner");
    h.stop().await;
}

/// The admin API on `admin_listen` runs on the control plane's own thread:
/// with every thread serving clients held busy, a rollback is still
/// answered, and the first request served afterwards goes to stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_is_answered_while_client_serving_is_stuck() {
    let h = Harness::start_with(|c| {
        with_rollout(r#"[{ kind = "percent", percent = 100 }]"#)(c).replacen(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
            1,
        )
    })
    .await;
    let admin_base = h.admin_base.clone().expect("an admin listener");
    let (s, b) = common::post_blocking(
        &admin_base,
        "/admin/rollouts/support-v2/start",
        OPS,
        r#"{"reason":"go"}"#,
    );
    assert_eq!(s, 200, "{b}");
    assert_eq!(variant_for(&h, ask("u1")).await.0, "v2");

    let stuck = common::Stuck::runtime(2);
    let (s, b) = common::post_blocking(
        &admin_base,
        "/admin/rollouts/support-v2/rollback",
        OPS,
        r#"{"reason":"error spike"}"#,
    );
    let answered_while_stuck = stuck.still();
    stuck.release();
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(r#""status":"rolled_back""#), "{b}");
    assert!(
        answered_while_stuck,
        "the rollback was answered only once client serving was free again"
    );
    assert_eq!(variant_for(&h, ask("u2")).await.0, "v1");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_stage_with_clocks_and_counters() {
    let h = Harness::start_with(with_rollout(WALK)).await;
    admin(&h, OPS, "start", "").await;
    admin(&h, OPS, "advance", "").await;
    for i in 0..30 {
        variant_for(&h, ask(&format!("user-{i}"))).await;
    }
    let before = status(&h).await;
    assert_eq!(before["stage"], 1);
    let counted = before["requests"]["stable"].as_u64().expect("n")
        + before["requests"]["candidate"].as_u64().expect("n");
    assert_eq!(counted, 30);
    let h = h.restart().await;
    let after = status(&h).await;
    assert_eq!(after["status"], "running");
    assert_eq!(after["stage"], 1);
    assert_eq!(after["stage_started_ms"], before["stage_started_ms"]);
    assert_eq!(after["requests"], before["requests"]);
    assert_eq!(after["history"].as_array().expect("h").len(), 2);
    // Assignment is the same after the restart.
    let (v1, _) = variant_for(&h, ask("user-7")).await;
    let rows = h.store.recent(1000).expect("rows");
    let earlier = rows
        .iter()
        .find(|r| r.subject.as_deref() == Some("user-7") && r.stage == Some(1))
        .expect("recorded");
    assert_eq!(earlier.variant.as_deref(), Some(v1.as_str()));
    h.stop().await;
}

/// The per-principle flag rates the gates read are rebuilt from the
/// recorded verdicts after a restart, like every other signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_rebuilds_the_stage_signals_flag_rates_included() {
    let flagged = |c: String| {
        let c = with_rollout(WALK)(c).replacen(
            "[deployments.support]\nstable = \"v1\"",
            "[deployments.support]\nstable = \"v1\"\nprinciples = [\"mentions-refund\"]",
            1,
        );
        format!(
            "{c}\n[principles.mentions-refund]\napplies_to = [\"input\"]\naction = \"flag\"\ndetectors = [{{ kind = \"keywords\", words = [\"refund\"] }}]\n"
        )
    };
    let h = Harness::start_with(flagged).await;
    admin(&h, OPS, "start", "").await;
    admin(&h, OPS, "advance", "").await;
    for i in 0..40 {
        let text = if i % 3 == 0 { "I want a refund" } else { "hi" };
        let body = json!({"model": "support", "user": format!("user-{i}"), "messages": [{"role": "user", "content": text}]});
        variant_for(&h, body).await;
    }
    h.flush().await;
    let before = status(&h).await;
    let rates = |v: &Value| {
        ["stable", "candidate"]
            .map(|arm| v["signals"][arm]["flag_rates"]["mentions-refund"].as_f64())
    };
    let live = rates(&before);
    assert!(
        live.iter().all(|r| r.is_some_and(|r| r > 0.0 && r < 1.0)),
        "both arms saw flagged and unflagged requests: {before}"
    );
    let h = h.restart().await;
    let after = status(&h).await;
    assert_eq!(rates(&after), live, "{after}");
    assert_eq!(after["signals"], before["signals"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_keeps_the_old_config() {
    let h = Harness::start_with(with_rollout(WALK)).await;
    let c = client();
    let good = std::fs::read_to_string(&h.config_path).expect("read");
    std::fs::write(
        &h.config_path,
        good.replace("kind = \"anthropic\"", "kind = \"anthropik\""),
    )
    .expect("write");
    let r = c
        .post(h.url("/admin/reload"))
        .bearer_auth(OPS)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 403, "reload needs admin");
    let r = c
        .post(h.url("/admin/reload"))
        .bearer_auth(ROOT)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 422);
    let b: Value = r.json().await.expect("json");
    assert!(
        b["error"]["problems"][0]
            .as_str()
            .expect("p")
            .contains("providers.mock-anthropic.kind"),
        "{b}"
    );
    assert_eq!(
        chat(&h, ask("x")).await.status(),
        200,
        "still serving the old config"
    );

    // A valid change takes effect without a restart; rollout state survives.
    admin(&h, OPS, "start", "").await;
    let added = format!(
        "{good}\n[deployments.extra]\nstable = \"v1\"\nvariants.v1 = {{ provider = \"mock-openai\", model = \"gpt-ok\" }}\n"
    );
    std::fs::write(&h.config_path, added).expect("write");
    let r = c
        .post(h.url("/admin/reload"))
        .bearer_auth(ROOT)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let r = chat(
        &h,
        json!({"model": "extra", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(status(&h).await["status"], "running");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_operator_keys_may_pin_a_variant() {
    let h = Harness::start_with(with_rollout(WALK)).await;
    let c = client();
    let body = ask("bob");
    let r = c
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .header("x-sluice-variant", "v2")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 403);
    let r = c
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(OPERATOR_KEY)
        .header("x-sluice-variant", "v2")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-sluice-variant"], "v2");
    let r = c
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(OPERATOR_KEY)
        .header("x-sluice-variant", "v9")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 400);
    let b: Value = r.json().await.expect("json");
    assert_eq!(b["error"]["param"], "x-sluice-variant");
    h.flush().await;
    let rows = h.store.recent(10).expect("rows");
    assert!(rows
        .iter()
        .any(|r| r.assignment.as_deref() == Some("pinned") && r.variant.as_deref() == Some("v2")));
    h.stop().await;
}
