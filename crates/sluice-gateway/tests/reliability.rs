//! Reliability end to end: a fault-injecting upstream (bursts of 500s,
//! 429 with Retry-After, resets, stalls, truncated and stalled streams,
//! invalid JSON) in front of the real gateway, asserting what the client
//! sees and what the store records; breakers, fallbacks, retry budgets,
//! overload limits and slow clients.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{chat, client, fault_upstream, reset_upstream, Faults, Harness};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VIEWER: &str = "adm-viewer-token";

fn faulty(fault: SocketAddr, reset: SocketAddr) -> impl Fn(String) -> String {
    move |c: String| {
        let mut s = c.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"\nheader_timeout = \"300ms\"\nbody_timeout = \"300ms\"\nmax_header_bytes = 16384");
        s.push_str(&format!(
            r#"
[[admin_tokens]]
name = "watcher"
role = "viewer"
sha256 = "{viewer}"

[providers.faulty]
kind = "openai"
base_url = "http://{fault}/v1"
timeout = "400ms"
first_byte_timeout = "300ms"
idle_timeout = "250ms"
stream_timeout = "1s"
retry = {{ attempts = 3, backoff = "10ms", max_backoff = "1500ms", budget = 0.5, min_per_second = 5 }}
breaker = {{ failure_rate = 0.5, min_requests = 6, window = "10s", cooldown = "400ms", probes = 2 }}

[providers.budgeted]
kind = "openai"
base_url = "http://{fault}/v1"
timeout = "400ms"
retry = {{ attempts = 3, backoff = "1ms", max_backoff = "5ms", budget = 0.1, min_per_second = 0 }}
breaker = {{ enabled = false }}

[providers.resetting]
kind = "openai"
base_url = "http://{reset}/v1"
timeout = "400ms"

[deployments.guarded]
stable = "v1"
fallbacks = ["v2"]
variants.v1 = {{ provider = "faulty", model = "f-always500" }}
variants.v2 = {{ provider = "mock-openai", model = "gpt-ok" }}

[deployments.budget]
stable = "v1"
variants.v1 = {{ provider = "budgeted", model = "f-always500" }}

[deployments.reset]
stable = "v1"
variants.v1 = {{ provider = "resetting", model = "gpt-ok" }}

[deployments.narrow]
stable = "v1"
max_in_flight = 2
variants.v1 = {{ provider = "faulty", model = "f-slow" }}
"#,
            viewer = sluice_core::secret::digest_hex(VIEWER),
        ));
        for m in [
            "f-ok",
            "f-slow",
            "f-burst500-2",
            "f-429once-1",
            "f-429once-5",
            "f-stall",
            "f-stall-stream",
            "f-late-first",
            "f-truncated",
            "f-drip",
            "f-badjson",
            "f-leaky",
            "f-leaky-body",
        ] {
            s.push_str(&format!(
                "\n[deployments.{m}]\nstable = \"v1\"\nvariants.v1 = {{ provider = \"faulty\", model = \"{m}\" }}\n"
            ));
        }
        s
    }
}

async fn start() -> (
    Harness,
    Faults,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let (fault, faults) = fault_upstream().await;
    let (reset, resets) = reset_upstream().await;
    let h = Harness::start_with(faulty(fault, reset)).await;
    (h, faults, resets)
}

fn ask(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

fn ask_stream(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]})
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn record(h: &Harness, id: &str) -> sluice_store::RequestRecord {
    h.flush().await;
    h.store.get(id).expect("read").expect("recorded")
}

async fn providers(h: &Harness) -> Value {
    client()
        .get(h.url("/admin/providers"))
        .bearer_auth(VIEWER)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json")
}

fn provider<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["data"]
        .as_array()
        .expect("list")
        .iter()
        .find(|p| p["provider"] == name)
        .expect("provider listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_burst_of_500s_is_retried_away() {
    let (h, faults, _) = start().await;
    let r = chat(&h, ask("f-burst500-2")).await;
    assert_eq!(r.status(), 200);
    let id = header(&r, "x-sluice-request-id");
    assert_eq!(faults.calls("f-burst500-2"), 3);
    let rec = record(&h, &id).await;
    assert_eq!(rec.status, 200);
    assert_eq!(rec.attempts, Some(3));
    let p = providers(&h).await;
    assert_eq!(provider(&p, "faulty")["retries_total"], 2, "{p}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_waited_for_or_passed_back() {
    let (h, faults, _) = start().await;
    let t = Instant::now();
    let r = chat(&h, ask("f-429once-1")).await;
    assert_eq!(r.status(), 200);
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(faults.calls("f-429once-1"), 2);

    // Longer than max_backoff: not waited for; the client gets the 429 and
    // the upstream's Retry-After.
    let t = Instant::now();
    let r = chat(&h, ask("f-429once-5")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), "5");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(faults.calls("f-429once-5"), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_that_may_have_reached_the_model_are_not_retried() {
    let (h, faults, resets) = start().await;
    // A stall: one attempt, cut at the provider's timeout.
    let t = Instant::now();
    let r = chat(&h, ask("f-stall")).await;
    assert_eq!(r.status(), 504);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "upstream_timeout");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(faults.calls("f-stall"), 1);

    // A connection dropped after the request was sent.
    let r = chat(&h, ask("reset")).await;
    assert_eq!(r.status(), 502);
    let id = header(&r, "x-sluice-request-id");
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["type"], "api_error");
    assert_eq!(resets.load(std::sync::atomic::Ordering::SeqCst), 1);
    let rec = record(&h, &id).await;
    assert_eq!(rec.error_kind.as_deref(), Some("upstream_unreachable"));
    assert_eq!(rec.attempts, Some(1));

    // Invalid JSON from upstream.
    let r = chat(&h, ask("f-badjson")).await;
    assert_eq!(r.status(), 502);
    let id = header(&r, "x-sluice-request-id");
    assert_eq!(faults.calls("f-badjson"), 1);
    let rec = record(&h, &id).await;
    assert_eq!(rec.error_kind.as_deref(), Some("upstream_invalid_response"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_keeps_a_failing_upstream_from_being_hammered() {
    let (h, faults, _) = start().await;
    for _ in 0..60 {
        let r = chat(&h, ask("budget")).await;
        assert_eq!(r.status(), 502);
    }
    // 60 first attempts; retries capped at 10 % of them (plus rounding).
    let calls = faults.calls("f-always500");
    assert!((60..=67).contains(&calls), "{calls} upstream calls");
    let p = providers(&h).await;
    let b = provider(&p, "budgeted");
    assert!(b["retries_denied_total"].as_u64().unwrap_or(0) >= 50, "{b}");
    assert!(b["retries_total"].as_u64().unwrap_or(99) <= 7, "{b}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_sends_traffic_to_the_fallback_until_probes_succeed() {
    let (h, faults, _) = start().await;
    let mut ids = Vec::new();
    for _ in 0..30 {
        let r = chat(&h, ask("guarded")).await;
        assert_eq!(r.status(), 200, "the fallback serves every request");
        assert_eq!(header(&r, "x-sluice-variant"), "v2");
        assert_eq!(header(&r, "x-sluice-fallback-from"), "v1");
        ids.push(header(&r, "x-sluice-request-id"));
    }
    // The breaker opened after a handful of failures: v1's upstream was left
    // alone for the rest.
    let calls = faults.calls("f-always500");
    assert!(calls <= 8, "{calls} calls reached the failing upstream");
    let p = providers(&h).await;
    let b = &provider(&p, "faulty")["breakers"];
    let b = b
        .as_array()
        .expect("breakers")
        .iter()
        .find(|b| b["model"] == "f-always500")
        .expect("breaker listed");
    assert_eq!(b["state"], "open", "{p}");
    assert!(b["opened_total"].as_u64().unwrap_or(0) >= 1);
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
            .contains("sluice_upstream_breaker_state{provider=\"faulty\",model=\"f-always500\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_fallbacks_total{deployment=\"guarded\",from=\"v1\",to=\"v2\"} 30")
    );
    let first = record(&h, &ids[0]).await;
    assert_eq!(first.variant.as_deref(), Some("v2"));
    assert_eq!(first.fallback_from.as_deref(), Some("v1"));
    assert_eq!(first.fallback_error.as_deref(), Some("upstream_error"));
    let last = record(&h, &ids[29]).await;
    assert_eq!(
        last.fallback_error.as_deref(),
        Some("upstream_circuit_open")
    );

    // The upstream recovers; after the cooldown, probes close the breaker
    // and v1 serves again.
    faults
        .healthy
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let mut served_by_v1 = 0;
    for _ in 0..5 {
        let r = chat(&h, ask("guarded")).await;
        assert_eq!(r.status(), 200);
        if header(&r, "x-sluice-variant") == "v1" {
            served_by_v1 += 1;
        }
    }
    assert_eq!(served_by_v1, 5);
    let p = providers(&h).await;
    let b = &provider(&p, "faulty")["breakers"];
    assert!(
        b.as_array()
            .expect("breakers")
            .iter()
            .any(|b| b["model"] == "f-always500" && b["state"] == "closed"),
        "{p}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_bounded_by_first_byte_idle_and_total_timeouts() {
    let (h, _, _) = start().await;
    for (model, phase, within) in [
        ("f-stall-stream", "between chunks", Duration::from_secs(2)),
        ("f-late-first", "first byte", Duration::from_millis(1500)),
        ("f-drip", "whole stream", Duration::from_secs(3)),
    ] {
        let t = Instant::now();
        let r = chat(&h, ask_stream(model)).await;
        assert_eq!(r.status(), 200);
        let id = header(&r, "x-sluice-request-id");
        let body = r.text().await.expect("body");
        assert!(t.elapsed() < within, "{model}: {:?}", t.elapsed());
        assert!(body.contains(phase), "{model}: {body}");
        assert!(body.contains("upstream_timeout"), "{model}: {body}");
        let rec = record(&h, &id).await;
        assert_eq!(
            rec.error_kind.as_deref(),
            Some("upstream_timeout"),
            "{model}"
        );
    }
    // A stream that ends early is reported, not passed off as complete.
    let r = chat(&h, ask_stream("f-truncated")).await;
    let id = header(&r, "x-sluice-request-id");
    let body = r.text().await.expect("body");
    assert!(body.contains("upstream_stream_error"), "{body}");
    assert!(body.contains("before it finished"), "{body}");
    let rec = record(&h, &id).await;
    assert_eq!(rec.error_kind.as_deref(), Some("upstream_stream_error"));
    assert!(rec.response_body.unwrap_or_default().contains("Hello"));
    h.stop().await;
}

/// An upstream's error text can echo its own key or what it was sent; it
/// reaches the client and the store with credentials redacted, streamed or
/// not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_upstream_error_text_are_redacted() {
    let (h, _, _) = start().await;
    let prompt = "use AKIAIOSFODNN7EXAMPLE please";
    for body in [
        json!({"model": "f-leaky", "messages": [{"role": "user", "content": prompt}]}),
        json!({"model": "f-leaky", "stream": true, "messages": [{"role": "user", "content": prompt}]}),
    ] {
        let r = chat(&h, body).await;
        assert_eq!(r.status(), 400);
        let id = header(&r, "x-sluice-request-id");
        let text = r.text().await.expect("body");
        assert!(text.contains("upstream_rejected_request"), "{text}");
        assert!(text.contains("is not allowed this input"), "{text}");
        assert!(text.contains("[REDACTED:api_key]"), "{text}");
        assert!(text.contains("[REDACTED:aws_access_key]"), "{text}");
        assert!(!text.contains("UPSTREAMkey0123456789"), "{text}");
        assert!(!text.contains("AKIAIOSFODNN7EXAMPLE"), "{text}");
        let rec = record(&h, &id).await;
        let stored = format!("{:?} {:?}", rec.error_message, rec.response_body);
        assert!(!stored.contains("UPSTREAMkey0123456789"), "{stored}");
        assert!(!stored.contains("AKIAIOSFODNN7EXAMPLE"), "{stored}");
    }
    let r = chat(&h, ask("f-leaky-body")).await;
    assert_eq!(r.status(), 502);
    let text = r.text().await.expect("body");
    assert!(text.contains("sent an invalid response"), "{text}");
    assert!(text.contains("[REDACTED:bearer_token]"), "{text}");
    assert!(!text.contains("abcdefghijklmnopqrstuvwxyz012345"), "{text}");
    h.stop().await;
}

/// One stream, one outcome for the breaker: a stream that breaks off
/// part-way counts as one failed call, not as a success when it opened and
/// a failure later; a stream that finishes counts as one success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reaches_the_breaker_as_one_outcome() {
    let (h, _, _) = start().await;
    let breaker = |p: &Value, model: &str| {
        provider(p, "faulty")["breakers"]
            .as_array()
            .expect("breakers")
            .iter()
            .find(|b| b["model"] == model)
            .cloned()
            .unwrap_or(Value::Null)
    };
    for _ in 0..3 {
        let r = chat(&h, ask_stream("f-truncated")).await;
        let body = r.text().await.expect("body");
        assert!(body.contains("upstream_stream_error"), "{body}");
    }
    for _ in 0..2 {
        let r = chat(&h, ask_stream("f-ok")).await;
        let body = r.text().await.expect("body");
        assert!(body.contains("[DONE]"), "{body}");
    }
    let p = providers(&h).await;
    let cut = breaker(&p, "f-truncated");
    assert_eq!(cut["window_ok"], 0, "{p}");
    assert_eq!(cut["window_failed"], 3, "{p}");
    assert_eq!(cut["state"], "closed", "3 of min_requests 6: {p}");
    let ok = breaker(&p, "f-ok");
    assert_eq!(ok["window_ok"], 2, "{p}");
    assert_eq!(ok["window_failed"], 0, "{p}");
    let faulty = provider(&p, "faulty");
    assert_eq!(faulty["calls_total"], 5, "{p}");
    assert_eq!(faulty["failures_total"], 3, "{p}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_at_its_limit_answers_429_at_once() {
    let (h, _, _) = start().await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let url = h.url("/v1/chat/completions");
            tokio::spawn(async move {
                let t = Instant::now();
                let r = client()
                    .post(url)
                    .bearer_auth(common::CLIENT_KEY)
                    .json(&ask("narrow"))
                    .send()
                    .await
                    .expect("sent");
                let status = r.status().as_u16();
                let retry = header(&r, "retry-after");
                let body: Value = r.json().await.expect("json");
                (status, retry, body, t.elapsed())
            })
        })
        .collect();
    let mut ok = 0;
    let mut busy = 0;
    for t in tasks {
        let (status, retry, body, took) = t.await.expect("join");
        match status {
            200 => ok += 1,
            429 => {
                busy += 1;
                assert_eq!(retry, "1");
                assert_eq!(body["error"]["code"], "deployment_busy");
                assert!(took < Duration::from_millis(250), "{took:?}");
            }
            s => panic!("unexpected status {s}: {body}"),
        }
    }
    assert!(ok >= 2 && busy >= 1, "ok {ok}, busy {busy}");
    assert_eq!(ok + busy, 10);
    h.stop().await;
}

async fn raw(h: &Harness) -> tokio::net::TcpStream {
    let addr = h.base.trim_start_matches("http://").to_string();
    tokio::net::TcpStream::connect(addr).await.expect("connect")
}

async fn read_all(s: &mut tokio::net::TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_oversized_clients_are_cut_off() {
    let (h, _, _) = start().await;
    // Slowloris: half a request head, then silence.
    let mut s = raw(&h).await;
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let t = Instant::now();
    let _ = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "connection held for {:?}",
        t.elapsed()
    );

    // A request head over max_header_bytes.
    let mut s = raw(&h).await;
    let big = "a".repeat(40_000);
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let answer = read_all(&mut s, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // A body that trickles in slower than body_timeout.
    let mut s = raw(&h).await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\"",
        common::CLIENT_KEY
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let answer = read_all(&mut s, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    h.stop().await;
}

/// Whether the server has closed `s` (read returns end of file within
/// `within`).
async fn closed(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, s.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// At `max_connections`, a new connection is taken once an open one is
/// idle: the kept-alive connection idle longest closes to make room (the
/// others stay open and keep serving), busy ones finish their requests first and
/// the new connection waits in the listen queue meanwhile. On the shared
/// runtime and on dedicated serving threads alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_makes_room_from_idle_connections_only() {
    let health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    let body = r#"{"model":"gpt-slow","messages":[{"role":"user","content":"hi"}]}"#;
    let slow = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        common::CLIENT_KEY,
        body.len()
    )
    .into_bytes();
    for workers in [0, 2] {
        let h = Harness::start_with(move |c| {
            c.replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:0\"\nmax_connections = 3\nworkers = {workers}"),
            )
            .replace("timeout = \"800ms\"", "timeout = \"2s\"")
        })
        .await;
        // Three idle kept-alive connections fill the listener.
        let mut idle = Vec::new();
        for _ in 0..3 {
            let mut s = raw(&h).await;
            s.write_all(&health).await.expect("write");
            assert!(read_one(&mut s).await.starts_with("HTTP/1.1 200"));
            idle.push(s);
        }
        // Not before anyone waits: all stay open.
        assert!(
            !closed(&mut idle[0], Duration::from_millis(300)).await,
            "workers {workers}"
        );
        // Used again in another order: the second connection is now the
        // one idle longest, neither the first accepted nor the last used.
        for i in [1, 2, 0] {
            tokio::time::sleep(Duration::from_millis(20)).await;
            idle[i].write_all(&health).await.expect("write");
            assert!(read_one(&mut idle[i]).await.starts_with("HTTP/1.1 200"));
        }
        // A fourth is served: one idle connection, and only one, closed
        // for it: the one idle longest.
        let mut d = raw(&h).await;
        d.write_all(&health).await.expect("write");
        let answer = read_one(&mut d).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "workers {workers}: {answer}"
        );
        let mut open = Vec::new();
        let mut gone = Vec::new();
        for (i, mut s) in idle.into_iter().enumerate() {
            if closed(&mut s, Duration::from_millis(300)).await {
                gone.push(i);
            } else {
                open.push(s);
            }
        }
        assert_eq!(
            gone,
            vec![1],
            "workers {workers}: connections closed for one new one (by order of \
             acceptance; the second was idle longest)"
        );
        // The others still serve their clients.
        for s in &mut open {
            s.write_all(&health).await.expect("write");
            let answer = read_one(s).await;
            assert!(
                answer.starts_with("HTTP/1.1 200"),
                "workers {workers}: {answer}"
            );
        }
        drop((open, d));
        tokio::time::sleep(Duration::from_millis(100)).await;

        // Three busy connections are left to finish (the upstream call
        // takes 2 s to time out); the fourth waits, then is served.
        let mut busy = Vec::new();
        for _ in 0..3 {
            let mut s = raw(&h).await;
            s.write_all(&slow).await.expect("write");
            busy.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut d = raw(&h).await;
        d.write_all(&health).await.expect("write");
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), d.read(&mut byte)).await;
        assert!(
            early.is_err(),
            "workers {workers}: a fourth connection was answered while three were busy"
        );
        for s in &mut busy {
            let answer = read_one(s).await;
            assert!(
                answer.starts_with("HTTP/1.1 "),
                "workers {workers}: {answer}"
            );
            assert!(
                !answer.starts_with("HTTP/1.1 200"),
                "workers {workers}: {answer}"
            );
        }
        let answer = read_one(&mut d).await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "workers {workers}: {answer}"
        );
        h.stop().await;
    }
}

/// Reads one HTTP/1.1 response (head and Content-Length body) off a
/// kept-alive connection; "" if the connection closed first.
async fn read_one(s: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(i) = text.find("\r\n\r\n") {
            let len: usize = text[..i]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                return text;
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return String::from_utf8_lossy(&buf).into_owned(),
        }
    }
}

/// Idle kept-alive connections stay open for keep_alive_timeout, well past
/// header_timeout (so a client pool does not send on a connection being
/// closed), and are closed after it; a connection that never sends a
/// request is still cut off after header_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_wait_for_keep_alive_timeout() {
    let (fault, _) = fault_upstream().await;
    let (reset, _) = reset_upstream().await;
    let edit = faulty(fault, reset);
    let h = Harness::start_with(move |c| {
        edit(c).replace(
            "header_timeout = \"300ms\"",
            "header_timeout = \"300ms\"\nkeep_alive_timeout = \"1500ms\"",
        )
    })
    .await;
    let ask_health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut s = raw(&h).await;
    s.write_all(ask_health).await.expect("write");
    assert!(read_one(&mut s).await.starts_with("HTTP/1.1 200"));
    // Idle for twice header_timeout: still open and answering.
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.write_all(ask_health).await.expect("write");
    let again = read_one(&mut s).await;
    assert!(
        again.starts_with("HTTP/1.1 200"),
        "after 700 ms idle: {again:?}"
    );
    // Past keep_alive_timeout: closed by the gateway.
    let t = Instant::now();
    let rest = read_all(&mut s, Duration::from_secs(5)).await;
    assert_eq!(rest, "");
    let waited = t.elapsed();
    assert!(
        waited > Duration::from_millis(1200) && waited < Duration::from_secs(3),
        "closed after {waited:?} idle"
    );
    // Connected, silent: cut off after header_timeout.
    let mut s = raw(&h).await;
    let t = Instant::now();
    let _ = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(
        t.elapsed() < Duration::from_millis(1200),
        "silent connection held for {:?}",
        t.elapsed()
    );
    // A streamed answer longer than header_timeout is not cut.
    // (f-drip sends a chunk every 100 ms until stream_timeout ends it at 1 s.)
    let r = chat(&h, ask_stream("f-drip")).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.expect("the stream runs to its end");
    assert!(body.matches("data:").count() >= 6, "{body}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_keeps_serving_after_every_fault() {
    let (h, _, _) = start().await;
    for m in ["f-stall", "reset", "f-badjson", "f-always500"] {
        let _ = chat(&h, ask(m)).await;
    }
    let r = chat(&h, ask("f-ok")).await;
    assert_eq!(r.status(), 200);
    h.flush().await;
    let report = h.stop().await;
    assert_eq!(report.events.lost(), 0, "{:?}", report.events);
    assert_eq!(report.events.written, 5);
    assert!(report.drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_answer_is_still_recorded() {
    let (h, faults, _) = start().await;
    let before = h.store.count().expect("count");
    let body = ask("f-stall").to_string();
    let mut s = raw(&h).await;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        common::CLIENT_KEY,
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    // Leave once the upstream is working on it.
    let t = Instant::now();
    while faults.calls("f-stall") == 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(faults.calls("f-stall"), 1);
    drop(s);
    let t = Instant::now();
    let rec = loop {
        h.flush().await;
        let found = h
            .store
            .recent(10)
            .expect("read")
            .into_iter()
            .find(|r| r.deployment.as_deref() == Some("f-stall"));
        if let Some(r) = found {
            break r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no record for the abandoned request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rec.status, 499);
    assert_eq!(rec.error_kind.as_deref(), Some("client_disconnected"));
    assert!(rec.latency_ms < 5000.0, "{}", rec.latency_ms);
    assert_eq!(h.store.count().expect("count"), before + 1);
    // The gateway keeps serving.
    let r = chat(&h, ask("f-ok")).await;
    assert_eq!(r.status(), 200);
    h.stop().await;
}
