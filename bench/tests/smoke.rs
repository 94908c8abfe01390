//! Smoke test of the load harness (the full runs are not part of CI): the
//! mock, the open-loop generator and the sluice configuration it uses, with
//! an in-process gateway, at a low rate for a second.

use std::sync::Arc;
use std::time::Duration;

use sluice_bench::load::gen::{self, LoadSpec};
use sluice_bench::load::mock::{self, MockConfig};
use sluice_bench::load::targets::{self, Scenario};
use sluice_bench::load::{rollback, run};

/// An in-process gateway started from the harness's config text.
struct Started {
    url: String,
    admin_port: Option<u16>,
    store: Arc<sluice_store::Store>,
}

type Stop = tokio::sync::oneshot::Sender<()>;
type Running =
    tokio::task::JoinHandle<Result<sluice_gateway::ShutdownReport, sluice_gateway::GatewayError>>;

async fn gateway(text: &str) -> (Started, Stop, Running) {
    let config = sluice_core::Config::parse(text).expect("the harness config is valid");
    let gw = sluice_gateway::Gateway::bind(config, Arc::new(sluice_gateway::EnvSecrets))
        .await
        .expect("gateway binds");
    let started = Started {
        url: format!("http://{}/v1/chat/completions", gw.local_addr()),
        admin_port: gw.admin_addr().map(|a| a.port()),
        store: gw.store(),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gw.run(
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(5),
    ));
    (started, tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_measures_direct_and_sluice_and_counts_every_record() {
    let mock = mock::spawn("127.0.0.1:0".parse().expect("addr"), MockConfig::default())
        .await
        .expect("mock binds");
    let spec = |url: String, bearer: Option<String>, stream: bool| LoadSpec {
        url,
        bearer,
        body: run::body(stream),
        rate: 200,
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(200),
        stream,
        max_outstanding: 1000,
        timeout: Duration::from_secs(5),
    };
    let direct = gen::run(spec(
        format!("http://{mock}/v1/chat/completions"),
        None,
        false,
    ))
    .await;
    assert_eq!(direct.counted, 200);
    assert_eq!(direct.ok, 200, "{direct:?}");
    assert!(direct.latency_us.p50 > 0 && direct.latency_us.p99 < 1_000_000);
    // The generator's own lag is measured, and is part of each latency
    // (both run from the intended send time).
    let lag = &direct.send_lag_us;
    assert!(lag.p50 > 0, "{lag:?}");
    assert!(
        lag.p50 <= direct.latency_us.p50 && lag.p99 <= direct.latency_us.p99,
        "{lag:?} vs {:?}",
        direct.latency_us
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("smoke.db");
    let text = targets::sluice_config(Scenario::SluicePolicies, 0, mock, &db);
    let (gw, tx, task) = gateway(&text).await;
    let url = gw.url;
    let store = gw.store;
    let plain = gen::run(spec(url.clone(), Some(targets::KEY.into()), false)).await;
    let streamed = gen::run(spec(url, Some(targets::KEY.into()), true)).await;
    assert_eq!(plain.ok, 200, "{plain:?}");
    assert_eq!(streamed.ok, 200, "{streamed:?}");
    let ttft = streamed
        .ttft_us
        .expect("streams report time to first token");
    assert!(ttft.p50 > 0 && ttft.p50 <= streamed.latency_us.p50);
    let _ = tx.send(());
    let report = task.await.expect("join").expect("clean stop");
    assert_eq!(report.events.lost(), 0);
    assert_eq!(
        store.count().expect("count"),
        plain.sent + streamed.sent,
        "every request sent is recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_targets_take_turns_and_each_gets_the_whole_count() {
    let fast = mock::spawn("127.0.0.1:0".parse().expect("addr"), MockConfig::default())
        .await
        .expect("mock binds");
    let slow_cfg = MockConfig {
        latency: mock::Latency::Fixed(Duration::from_millis(5)),
        ..MockConfig::default()
    };
    let slow = mock::spawn("127.0.0.1:0".parse().expect("addr"), slow_cfg)
        .await
        .expect("mock binds");
    let spec = LoadSpec {
        url: String::new(),
        bearer: None,
        body: run::body(false),
        rate: 200,
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(200),
        stream: false,
        max_outstanding: 1000,
        timeout: Duration::from_secs(5),
    };
    let target = |addr| gen::Target {
        url: format!("http://{addr}/v1/chat/completions"),
        bearer: None,
    };
    let out = gen::run_interleaved(
        &spec,
        &[target(fast), target(slow)],
        Duration::from_millis(100),
    )
    .await;
    assert_eq!(out.len(), 2);
    for r in &out {
        // 20 requests per slice; 2 warm-up rounds, then 5 counted ones.
        assert_eq!(r.counted, 100, "{r:?}");
        assert_eq!(r.ok, 100, "{r:?}");
        assert_eq!(r.sent, 140, "{r:?}");
        assert_eq!(r.errors + r.saturated, 0);
    }
    // Each target's latency is its own: the slow mock's 5 ms shows on it
    // alone, and not in how late its requests left.
    assert!(out[1].send_lag_us.p50 < 5_000, "{:?}", out[1].send_lag_us);
    assert!(out[1].latency_us.p50 >= 5_000, "{:?}", out[1].latency_us);
    assert!(
        out[0].latency_us.p50 < out[1].latency_us.p50,
        "{:?} vs {:?}",
        out[0].latency_us,
        out[1].latency_us
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_under_load_is_timed_and_nothing_after_it_reaches_the_candidate() {
    let mock = mock::spawn("127.0.0.1:0".parse().expect("addr"), MockConfig::default())
        .await
        .expect("mock binds");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("rollback.db");
    let text = targets::sluice_config(Scenario::SluiceRollback, 0, mock, &db).replacen(
        "\n",
        "\nadmin_listen = \"127.0.0.1:0\"\n",
        1,
    );
    let (gw, tx, task) = gateway(&text).await;
    let (url, store) = (gw.url, gw.store);
    let admin_port = gw.admin_port.expect("an admin listener");
    tokio::task::spawn_blocking(move || targets::start_rollout(admin_port))
        .await
        .expect("join")
        .expect("the rollout starts");
    let spec = rollback::RollbackSpec {
        url,
        bearer: targets::KEY.into(),
        admin_port,
        admin_token: targets::OPS.into(),
        rollout: "support-v2".into(),
        body: run::body(false),
        rate: 300,
        warmup: Duration::from_millis(200),
        before: Duration::from_millis(500),
        after: Duration::from_millis(500),
        timeout: Duration::from_secs(5),
        max_outstanding: 1000,
    };
    let t = rollback::trial(&spec).await;
    assert_eq!(t.rollback_status, 200, "{t:?}");
    assert_eq!((t.ok, t.errors, t.saturated), (t.sent, 0, 0), "{t:?}");
    // Everyone was on the candidate until the rollback, nobody after it.
    assert!(t.on_candidate >= 150, "{t:?}");
    assert!(t.sent_after_answer >= 100, "{t:?}");
    assert_eq!(t.candidate_after_answer, 0, "{t:?}");
    let last = t
        .last_candidate_sent_ms
        .expect("some reached the candidate");
    assert!(last <= t.answer_ms, "{t:?}");
    assert!(t.answer_ms > 0.0 && t.p99_around_us > 0, "{t:?}");
    let _ = tx.send(());
    let report = task.await.expect("join").expect("clean stop");
    assert_eq!(report.events.lost(), 0);
    assert_eq!(store.count().expect("count"), t.sent);
    let table = rollback::table(&[t]);
    assert!(
        table
            .lines()
            .nth(2)
            .expect("a row")
            .starts_with("| 300 | 1 |"),
        "{table}"
    );
}
