//! End to end: strict durability, redacted bodies, the
//! admin API on its own address, admin authorization for every route and
//! role, and a graceful stop that lets streams finish.

mod common;

use std::time::Duration;

use common::{chat, client, fault_upstream, Harness, CLIENT_KEY};
use serde_json::{json, Value};
use sluice_core::config::Role;
use sluice_core::rollout::Action;
use sluice_core::secret::digest_hex;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_durability_commits_before_the_client_hears_back() {
    let h = Harness::start_with(|c| {
        c.replace(
            "log_bodies = \"full\"",
            "log_bodies = \"full\"\ndurability = \"strict\"",
        )
    })
    .await;
    for i in 0..20 {
        let stream = i % 2 == 0;
        let r = chat(
            &h,
            json!({"model": if i % 5 == 0 { "gpt-500" } else { "support" }, "stream": stream,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        let id = header(&r, "x-sluice-request-id");
        let _ = r.bytes().await;
        // No flush: the record is already committed.
        assert!(
            h.store.get(&id).expect("read").is_some(),
            "request {i} ({id}) answered before its record was committed"
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacted_bodies_keep_no_pii_or_secrets() {
    let h = Harness::start_with(|c| {
        c.replace("log_bodies = \"full\"", "log_bodies = \"redacted\"")
            + "\n[deployments.gpt-pii]\nstable = \"v1\"\nvariants.v1 = { provider = \"mock-openai\", model = \"gpt-pii\" }\n"
    })
    .await;
    let r = chat(
        &h,
        json!({"model": "gpt-pii", "messages": [{"role": "user",
               "content": "I am jane.doe@example.org, key AKIAIOSFODNN7EXAMPLE"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = header(&r, "x-sluice-request-id");
    let body = r.text().await.expect("body");
    // The client's answer is untouched (no principle is enforced here).
    assert!(body.contains("jane.doe@corp.io"), "{body}");
    h.flush().await;
    let rec = h.store.get(&id).expect("read").expect("recorded");
    let req = rec.request_body.expect("request body kept");
    let resp = rec.response_body.expect("response body kept");
    for leaked in ["jane.doe@example.org", "AKIAIOSFODNN7EXAMPLE"] {
        assert!(!req.contains(leaked), "{req}");
    }
    assert!(req.contains("[REDACTED:email]"), "{req}");
    assert!(req.contains("[REDACTED:aws_access_key]"), "{req}");
    assert!(!resp.contains("jane.doe@corp.io"), "{resp}");
    assert!(!resp.contains("4111 1111 1111 1111"), "{resp}");
    assert!(
        serde_json::from_str::<Value>(&req).is_ok(),
        "still JSON: {req}"
    );
    h.stop().await;
}

const TOKENS: [(&str, &str); 4] = [
    ("viewer", "tok-viewer"),
    ("reviewer", "tok-reviewer"),
    ("operator", "tok-operator"),
    ("admin", "tok-admin"),
];

fn with_admin(c: String) -> String {
    let mut s = c.replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
    );
    s = s.replace(
        "variants.v1 = { provider = \"mock-openai\", model = \"gpt-ok\", system_prompt = \"You are a support agent.\" }",
        "variants.v1 = { provider = \"mock-openai\", model = \"gpt-ok\", system_prompt = \"You are a support agent.\" }\n\
         variants.v2 = { provider = \"mock-openai\", model = \"gpt-ok\" }",
    );
    for (role, tok) in TOKENS {
        s.push_str(&format!(
            "\n[[admin_tokens]]\nname = \"{role}-1\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            digest_hex(tok)
        ));
    }
    s.push_str(
        "\n[rollouts.support-v2]\ndeployment = \"support\"\ncandidate = \"v2\"\n\
         stages = [{ kind = \"percent\", percent = 10 }, { kind = \"percent\", percent = 50 }]\n",
    );
    s
}

fn role_of(name: &str) -> Role {
    match name {
        "viewer" => Role::Viewer,
        "reviewer" => Role::Reviewer,
        "operator" => Role::Operator,
        _ => Role::Admin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lives_on_its_own_address() {
    let h = Harness::start_with(with_admin).await;
    let admin = h.admin_base.clone().expect("admin address bound");
    let http = client();
    for path in ["/admin/rollouts", "/admin/providers", "/metrics"] {
        let r = http.get(h.url(path)).send().await.expect("sent");
        assert_eq!(r.status(), 404, "{path} must not be on the client address");
    }
    let r = http
        .get(format!("{admin}/admin/rollouts"))
        .bearer_auth("tok-viewer")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{admin}/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&ask("support"))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 404, "no model traffic on the admin address");
    let r = chat(&h, ask("support")).await;
    assert_eq!(r.status(), 200);
    h.stop().await;
}

/// Every admin route, with no token, a wrong token, a client API key, and
/// each role: 401 without a valid admin token, 403 below the route's role,
/// anything but 401/403 at or above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_checks_token_and_role() {
    let h = Harness::start_with(with_admin).await;
    let admin = h.admin_base.clone().expect("admin address bound");
    let http = client();
    let mut routes: Vec<(&str, String, Role)> = vec![
        ("GET", "/admin/rollouts".into(), Role::Viewer),
        ("GET", "/admin/rollouts/support-v2".into(), Role::Viewer),
        ("GET", "/admin/providers".into(), Role::Viewer),
        ("POST", "/admin/reload".into(), Role::Admin),
    ];
    for a in Action::ALL {
        routes.push((
            "POST",
            format!("/admin/rollouts/support-v2/{}", a.name()),
            a.required_role(),
        ));
    }
    let mut checked = 0;
    for (method, path, needed) in &routes {
        let send = |token: Option<&str>| {
            let url = format!("{admin}{path}");
            let mut r = if *method == "GET" {
                http.get(url)
            } else {
                http.post(url).json(&json!({"reason": "auth test"}))
            };
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            r.send()
        };
        for bad in [None, Some("not-a-token"), Some(CLIENT_KEY)] {
            let r = send(bad).await.expect("sent");
            assert_eq!(r.status(), 401, "{method} {path} with {bad:?}");
            let e: Value = r.json().await.expect("json");
            assert_eq!(e["error"]["type"], "authentication_error");
        }
        for (role, tok) in TOKENS {
            let r = send(Some(tok)).await.expect("sent");
            let s = r.status().as_u16();
            if role_of(role) < *needed {
                assert_eq!(s, 403, "{method} {path} as {role}");
                let e: Value = r.json().await.expect("json");
                assert!(
                    e["error"]["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains(needed.name()),
                    "{e}"
                );
            } else {
                assert!(s != 401 && s != 403, "{method} {path} as {role}: {s}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, routes.len() * 4);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_lets_streams_in_flight_finish() {
    let (fault, _) = fault_upstream().await;
    let h = Harness::start_with(move |c| {
        c + &format!(
            "\n[providers.faulty]\nkind = \"openai\"\nbase_url = \"http://{fault}/v1\"\nidle_timeout = \"5s\"\n\
             [deployments.drip]\nstable = \"v1\"\nvariants.v1 = {{ provider = \"faulty\", model = \"f-drip\" }}\n"
        )
    })
    .await;
    let url = h.url("/v1/chat/completions");
    let streaming = tokio::spawn(async move {
        let r = client()
            .post(url)
            .bearer_auth(CLIENT_KEY)
            .json(&json!({"model": "drip", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("sent");
        r.text().await.expect("body")
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = h.base.clone();
    let report = h.stop().await;
    let body = streaming.await.expect("join");
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "the stream ran to its end: {body}"
    );
    assert_eq!(body.matches("data: ").count(), 42);
    assert!(report.drained);
    assert_eq!(report.events.written, 1);
    assert_eq!(report.events.lost(), 0);
    // And nothing is accepted any more.
    assert!(client()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_err());
}

/// A stop wakes the connections that are only being kept alive and closes
/// them at once: the drain does not wait out the grace period (5 s in the
/// harness) for them, and counts as complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_closes_idle_kept_alive_connections_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await;
    let addr = h.base.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut conn = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("send");
        let mut buf = vec![0u8; 4096];
        let n = conn.read(&mut buf).await.expect("answer");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        idle.push(conn);
    }
    let report = h.stop().await;
    assert!(
        report.drained,
        "the idle connections were left to the end of the grace period"
    );
    for mut conn in idle {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("closed")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without another byte");
    }
}

/// Hostile bodies over real HTTP: every one gets a 4xx in OpenAI's error
/// shape with a message, every one is recorded, and the gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_clear_errors_and_are_recorded() {
    let h = Harness::start().await;
    let seed = br#"{"model":"support","messages":[{"role":"user","content":"hi"}],"temperature":0.5,"stream":false}"#;
    let mut rng = sluice_core::splitmix::SplitMix64(42);
    let http = client();
    let mut sent = 0;
    for i in 0..400 {
        let body: Vec<u8> = if i % 4 == 0 {
            (0..(rng.next_u64() % 300))
                .map(|_| rng.next_u64() as u8)
                .collect()
        } else {
            let mut b = seed.to_vec();
            for _ in 0..=(rng.next_u64() % 4) {
                let at = (rng.next_u64() as usize) % b.len();
                match rng.next_u64() % 3 {
                    0 => b[at] = rng.next_u64() as u8,
                    1 => {
                        b.remove(at);
                    }
                    _ => b.insert(at, rng.next_u64() as u8),
                }
            }
            b
        };
        let r = http
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("sent");
        sent += 1;
        let status = r.status().as_u16();
        if status == 200 {
            // A mutation that is still a valid request.
            continue;
        }
        assert!(
            (400..500).contains(&status),
            "{status} for {:?}",
            String::from_utf8_lossy(&body)
        );
        let e: Value = r.json().await.expect("an error body in JSON");
        assert!(
            !e["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{e}"
        );
        assert!(e["error"]["type"].is_string(), "{e}");
    }
    let r = chat(&h, ask("support")).await;
    assert_eq!(r.status(), 200);
    h.flush().await;
    let report = h.stop().await;
    assert_eq!(report.events.written, sent + 1);
    assert_eq!(report.events.lost(), 0);
}
