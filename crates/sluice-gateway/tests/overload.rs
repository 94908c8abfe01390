//! End to end: overload is refused fast, without queuing and without
//! growing memory. Alone in its test binary so the memory reading is its own.

mod common;

use std::time::{Duration, Instant};

use common::{client, fault_upstream, Harness, CLIENT_KEY};
use serde_json::{json, Value};

fn ask(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_fast_without_queuing_or_growing() {
    let (fault, _) = fault_upstream().await;
    let h = Harness::start_with(move |c| {
        c.replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\nmax_in_flight = 4",
        ) + &format!(
            "\n[providers.faulty]\nkind = \"openai\"\nbase_url = \"http://{fault}/v1\"\n\
             [deployments.slow]\nstable = \"v1\"\nvariants.v1 = {{ provider = \"faulty\", model = \"f-slow\" }}\n"
        )
    })
    .await;
    let http = client();
    let mut warm = 0;
    let mut ok = 0usize;
    let mut refused = 0usize;
    let mut slowest_refusal = Duration::ZERO;
    // 40 waves of 50 concurrent requests against a limit of 4.
    for w in 0..40 {
        if w == 10 {
            warm = rss_kib();
        }
        let wave: Vec<_> = (0..50)
            .map(|_| {
                let http = http.clone();
                let url = h.url("/v1/chat/completions");
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = http
                        .post(url)
                        .bearer_auth(CLIENT_KEY)
                        .json(&ask("slow"))
                        .send()
                        .await
                        .expect("sent");
                    let s = r.status().as_u16();
                    let retry = header(&r, "retry-after");
                    let body = r.text().await.unwrap_or_default();
                    (s, retry, body, t.elapsed())
                })
            })
            .collect();
        for t in wave {
            let (s, retry, body, took) = t.await.expect("join");
            match s {
                200 => ok += 1,
                503 => {
                    refused += 1;
                    assert_eq!(retry, "1");
                    assert!(body.contains("server_overloaded"), "{body}");
                    slowest_refusal = slowest_refusal.max(took);
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
    }
    assert!(ok >= 40, "each wave serves up to the limit: {ok}");
    assert!(refused >= 1500, "{refused} refused");
    assert!(
        slowest_refusal < Duration::from_millis(250),
        "a refusal took {slowest_refusal:?}"
    );
    // Once warm, 1500 more requests do not make the process grow (gateway,
    // mocks and client all live in this test process).
    let grown_mib = rss_kib().saturating_sub(warm) / 1024;
    assert!(grown_mib < 16, "RSS grew {grown_mib} MiB");
    h.flush().await;
    let report = h.stop().await;
    assert_eq!(report.events.lost(), 0);
    assert_eq!(report.events.written, 2000, "every refusal is recorded too");
}
