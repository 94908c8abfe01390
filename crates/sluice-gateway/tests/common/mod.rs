//! Test fixtures: local upstream servers that speak OpenAI's and Anthropic's
//! wire protocols (with switchable misbehaviour), and a helper that starts the
//! real gateway on an ephemeral port in front of them.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use sluice_core::secret::SecretSource;
use sluice_core::Config;
use sluice_gateway::{Gateway, SecretResolver, ShutdownReport};
use sluice_store::Store;
use tokio::net::TcpListener;

/// Requests an upstream received: (headers, body).
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<(HeaderMap, Value)>>>);

impl Seen {
    pub fn last(&self) -> (HeaderMap, Value) {
        self.0
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("a request reached the upstream")
    }
    pub fn count(&self) -> usize {
        self.0.lock().expect("lock").len()
    }
}

async fn serve(router: Router) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    addr
}

fn sse(events: Vec<String>, cut: bool, gap: Duration) -> Response {
    let s = futures_util::stream::unfold(
        (events.into_iter(), cut, false),
        move |(mut it, cut, ended)| async move {
            if ended {
                return None;
            }
            tokio::time::sleep(gap).await;
            match it.next() {
                Some(e) => Some((
                    Ok::<Bytes, std::io::Error>(Bytes::from(e)),
                    (it, cut, false),
                )),
                None if cut => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "cut",
                    )),
                    (it, cut, true),
                )),
                None => None,
            }
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(s))
        .expect("response")
}

/// The pieces the mock streams for a model (joined: the whole answer).
pub fn mock_pieces(model: &str) -> Vec<&'static str> {
    match model {
        "gpt-pii" => vec![
            "Reach Jane at jane.",
            "doe@corp.io or card 4111 11",
            "11 1111 ",
            "1111. Thanks.",
        ],
        "gpt-secret" => vec![
            "Sure, the key is AKIAIOSF",
            "ODNN7EXAMPLE, use it ",
            "wisely.",
        ],
        _ => vec!["Hello", " from", " the", " mock."],
    }
}

/// The completion the OpenAI mock returns for `model`.
pub fn openai_completion(model: &str, tools: bool) -> Value {
    let text: String = mock_pieces(model).concat();
    let message = if tools {
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]})
    } else {
        json!({"role": "assistant", "content": text, "refusal": null})
    };
    json!({
        "id": "chatcmpl-mock1", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null,
                     "finish_reason": if tools { "tool_calls" } else { "stop" }}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
        "system_fingerprint": "fp_mock"
    })
}

fn openai_chunks(model: &str, tools: bool, usage: bool) -> Vec<String> {
    let c = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-mock1", "object": "chat.completion.chunk", "created": 1_700_000_000,
                   "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let mut v = vec![c(json!({"role": "assistant", "content": ""}), Value::Null)];
    if tools {
        v.push(c(json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}), Value::Null));
        v.push(c(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
            Value::Null,
        ));
        v.push(c(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}),
            Value::Null,
        ));
        v.push(c(json!({}), json!("tool_calls")));
    } else {
        for w in mock_pieces(model) {
            v.push(c(json!({"content": w}), Value::Null));
        }
        v.push(c(json!({}), json!("stop")));
    }
    if usage {
        v.push(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-mock1", "object": "chat.completion.chunk", "created": 1_700_000_000,
                   "model": model, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}})
        ));
    }
    v.push("data: [DONE]\n\n".to_string());
    v
}

/// An OpenAI-compatible upstream. Behaviour by upstream model name:
/// `gpt-ok` answers, `gpt-tools` calls a tool, `gpt-500` fails,
/// `gpt-badjson` sends a non-JSON 200, `gpt-cut` breaks streams off,
/// `gpt-slow` answers after 3 s, `gpt-429` rate-limits, `gpt-400` rejects.
pub async fn openai_upstream() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    async fn handler(
        State(seen): State<Seen>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> Response {
        seen.0.lock().expect("lock").push((headers, body.clone()));
        let model = body["model"].as_str().unwrap_or("").to_string();
        let stream = body["stream"] == true;
        let usage = body["stream_options"]["include_usage"] == true;
        let last_user = body["messages"]
            .as_array()
            .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
            .and_then(|m| m["content"].as_str())
            .unwrap_or("")
            .to_string();
        match model.as_str() {
            // Echoes the user; or judges: FAIL when the text talks about cooking.
            "gpt-echo" | "gpt-judge" => {
                let text = if model == "gpt-echo" {
                    last_user
                } else if last_user.contains("cook") {
                    "FAIL".to_string()
                } else {
                    "PASS".to_string()
                };
                let mut v = openai_completion(&model, false);
                v["choices"][0]["message"]["content"] = json!(text);
                if stream {
                    let words: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
                    let mut ev: Vec<String> = words
                        .iter()
                        .map(|w| format!("data: {}\n\n", json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": null}]})))
                        .collect();
                    ev.push(format!("data: {}\n\n", json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})));
                    ev.push("data: [DONE]\n\n".to_string());
                    sse(ev, false, Duration::from_millis(1))
                } else {
                    Json(v).into_response()
                }
            }
            "gpt-500" => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": {"message": "The server had an error", "type": "server_error"}}))).into_response(),
            "gpt-429" => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "7")], Json(json!({"error": {"message": "Rate limit reached", "type": "rate_limit"}}))).into_response(),
            "gpt-400" => (StatusCode::BAD_REQUEST, Json(json!({"error": {"message": "Invalid value for 'temperature'", "type": "invalid_request_error"}}))).into_response(),
            "gpt-badjson" => (StatusCode::OK, [("content-type", "application/json")], "this is not json").into_response(),
            "gpt-slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Json(openai_completion(&model, false)).into_response()
            }
            "gpt-cut" if stream => {
                let mut ev = openai_chunks(&model, false, false);
                ev.truncate(3);
                sse(ev, true, Duration::from_millis(5))
            }
            _ => {
                let tools = model == "gpt-tools";
                if stream {
                    sse(openai_chunks(&model, tools, usage), false, Duration::from_millis(2))
                } else {
                    Json(openai_completion(&model, tools)).into_response()
                }
            }
        }
    }
    let r = Router::new()
        .route("/v1/chat/completions", post(handler))
        .with_state(seen.clone());
    (serve(r).await, seen)
}

fn anthropic_event(kind: &str, data: Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

/// An Anthropic Messages upstream. Model `claude-tools` answers with a
/// tool_use block; `claude-overloaded` sends an error event mid-stream.
pub async fn anthropic_upstream() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    async fn handler(
        State(seen): State<Seen>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> Response {
        seen.0
            .lock()
            .expect("lock")
            .push((headers.clone(), body.clone()));
        if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some("anthropic-secret")
            || headers.get("anthropic-version").is_none()
        {
            return (StatusCode::UNAUTHORIZED, Json(json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}))).into_response();
        }
        let model = body["model"].as_str().unwrap_or("").to_string();
        let tools = model == "claude-tools";
        if body["stream"] == true {
            let mut ev = vec![
                anthropic_event(
                    "message_start",
                    json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [], "usage": {"input_tokens": 21, "output_tokens": 1}}}),
                ),
                anthropic_event("ping", json!({"type": "ping"})),
                anthropic_event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                anthropic_event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Bonjour"}}),
                ),
                anthropic_event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " le monde"}}),
                ),
                anthropic_event(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ),
            ];
            if model == "claude-overloaded" {
                ev.push(anthropic_event("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})));
                return sse(ev, false, Duration::from_millis(2));
            }
            if tools {
                ev.push(anthropic_event("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}})));
                ev.push(anthropic_event("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}})));
                ev.push(anthropic_event("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}})));
                ev.push(anthropic_event(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 1}),
                ));
            }
            ev.push(anthropic_event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": if tools { "tool_use" } else { "end_turn" }}, "usage": {"output_tokens": 9}})));
            ev.push(anthropic_event(
                "message_stop",
                json!({"type": "message_stop"}),
            ));
            return sse(ev, false, Duration::from_millis(2));
        }
        let mut content = vec![json!({"type": "text", "text": "Bonjour le monde"})];
        if tools {
            content.push(json!({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}));
        }
        Json(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": if tools { "tool_use" } else { "end_turn" }, "stop_sequence": null,
            "usage": {"input_tokens": 21, "output_tokens": 9}
        }))
        .into_response()
    }
    let r = Router::new()
        .route("/v1/messages", post(handler))
        .with_state(seen.clone());
    (serve(r).await, seen)
}

/// The switchable state of [`fault_upstream`].
#[derive(Clone, Default)]
pub struct Faults {
    /// Calls received, by model.
    pub calls: Arc<Mutex<HashMap<String, usize>>>,
    /// When set, `f-always500` answers normally.
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
}

impl Faults {
    pub fn calls(&self, model: &str) -> usize {
        self.calls
            .lock()
            .expect("lock")
            .get(model)
            .copied()
            .unwrap_or(0)
    }
}

/// An OpenAI-protocol upstream whose misbehaviour is chosen by the model:
/// - `f-ok`: answers (streams too); `f-slow`: answers after 300 ms;
/// - `f-burst500-N`: the first N calls get 500, then it answers;
/// - `f-429once-S`: the first call gets 429 with `Retry-After: S`;
/// - `f-always500`: 500 until `healthy` is set;
/// - `f-stall`: never answers; `f-stall-stream`: one chunk, then silence;
/// - `f-late-first`: stream headers at once, the first chunk after 2 s;
/// - `f-truncated`: a stream that ends after two chunks, without finishing;
/// - `f-drip`: a chunk every 100 ms for 4 s;
/// - `f-badjson`: a 200 that is not JSON;
/// - `f-leaky`: a 400 whose message echoes its own key and the prompt;
///   `f-leaky-body`: a 200 that is not JSON and holds a key.
pub async fn fault_upstream() -> (SocketAddr, Faults) {
    let faults = Faults::default();
    async fn handler(State(f): State<Faults>, Json(body): Json<Value>) -> Response {
        let model = body["model"].as_str().unwrap_or("").to_string();
        let stream = body["stream"].as_bool().unwrap_or(false);
        let n = {
            let mut c = f.calls.lock().expect("lock");
            let e = c.entry(model.clone()).or_insert(0);
            *e += 1;
            *e
        };
        let err = |status: StatusCode| {
            (
                status,
                Json(json!({"error": {"message": format!("injected {status}"), "type": "server_error"}})),
            )
                .into_response()
        };
        let ok = |model: &str| {
            if stream {
                sse(
                    openai_chunks(model, false, true),
                    false,
                    Duration::from_millis(1),
                )
            } else {
                Json(openai_completion(model, false)).into_response()
            }
        };
        if let Some(k) = model.strip_prefix("f-burst500-") {
            let k: usize = k.parse().unwrap_or(0);
            return if n <= k {
                err(StatusCode::INTERNAL_SERVER_ERROR)
            } else {
                ok(&model)
            };
        }
        if let Some(secs) = model.strip_prefix("f-429once-") {
            return if n == 1 {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", secs.to_string())],
                    Json(json!({"error": {"message": "slow down", "type": "rate_limit"}})),
                )
                    .into_response()
            } else {
                ok(&model)
            };
        }
        match model.as_str() {
            "f-always500" if !f.healthy.load(std::sync::atomic::Ordering::SeqCst) => {
                err(StatusCode::INTERNAL_SERVER_ERROR)
            }
            "f-slow" => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                ok(&model)
            }
            "f-stall" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                ok(&model)
            }
            "f-stall-stream" => {
                let first = openai_chunks(&model, false, false).remove(0);
                let s = futures_util::stream::unfold(0, move |i| {
                    let first = first.clone();
                    async move {
                        if i == 0 {
                            Some((Ok::<Bytes, std::io::Error>(Bytes::from(first)), 1))
                        } else {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            None
                        }
                    }
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(s))
                    .expect("response")
            }
            "f-truncated" => {
                let all = openai_chunks(&model, false, false);
                sse(all[..3].to_vec(), false, Duration::from_millis(1))
            }
            "f-late-first" => sse(
                openai_chunks(&model, false, true),
                false,
                Duration::from_secs(2),
            ),
            "f-drip" => {
                let all = openai_chunks(&model, false, false);
                let mut v = vec![all[1].clone(); 40];
                v.extend(all[all.len() - 2..].iter().cloned());
                sse(v, false, Duration::from_millis(100))
            }
            "f-badjson" => (
                StatusCode::OK,
                [("content-type", "application/json")],
                "{\"id\": tru",
            )
                .into_response(),
            "f-leaky" => {
                let prompt = body["messages"][0]["content"].as_str().unwrap_or("");
                (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": {
                        "message": format!(
                            "key sk-proj-UPSTREAMkey0123456789abcdef is not allowed this input: {prompt}"
                        ),
                        "type": "invalid_request_error",
                    }})),
                )
                    .into_response()
            }
            "f-leaky-body" => (
                StatusCode::OK,
                [("content-type", "application/json")],
                "{\"debug\": \"auth=Bearer abcdefghijklmnopqrstuvwxyz012345\", tru",
            )
                .into_response(),
            _ => ok(&model),
        }
    }
    let r = Router::new()
        .route("/v1/chat/completions", post(handler))
        .with_state(faults.clone());
    (serve(r).await, faults)
}

/// An upstream that reads each request and drops the connection without
/// answering; returns its address and how many connections it took.
pub async fn reset_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                drop(s);
            });
        }
    });
    (addr, n)
}

/// A port nothing listens on.
pub async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let p = l.local_addr().expect("addr").port();
    drop(l);
    p
}

/// Resolves secrets from a fixed map (no process environment involved).
pub struct MapSecrets(pub HashMap<String, String>);

impl SecretResolver for MapSecrets {
    fn resolve(&self, source: &SecretSource) -> Result<String, String> {
        let k = match source {
            SecretSource::Env(v) | SecretSource::File(v) => v,
        };
        self.0
            .get(k)
            .cloned()
            .ok_or_else(|| format!("{k} is not set"))
    }
}

pub const CLIENT_KEY: &str = "sk-test-client";
pub const OTHER_KEY: &str = "sk-test-limited";

/// A config routing deployments to the mocks. Each `gpt-*` behaviour gets a
/// deployment of the same name.
pub fn config_text(openai: SocketAddr, anthropic: SocketAddr, dead: u16, db: &str) -> String {
    let mut s = format!(
        r#"
listen = "127.0.0.1:0"
max_body_bytes = 65536

[store]
path = "{db}"
log_bodies = "full"

[[api_keys]]
name = "app"
key_env = "CLIENT_KEY"

[[api_keys]]
name = "limited"
sha256 = "{limited}"
deployments = ["support"]

[providers.mock-openai]
kind = "openai"
base_url = "http://{openai}/v1"
api_key_env = "UPSTREAM_KEY"
timeout = "800ms"

[providers.mock-anthropic]
kind = "anthropic"
base_url = "http://{anthropic}"
api_key_env = "ANTHROPIC_KEY"

[providers.nowhere]
kind = "openai"
base_url = "http://127.0.0.1:{dead}/v1"

[deployments.support]
stable = "v1"
variants.v1 = {{ provider = "mock-openai", model = "gpt-ok", system_prompt = "You are a support agent." }}

[deployments.claude]
stable = "v1"
variants.v1 = {{ provider = "mock-anthropic", model = "claude-sonnet-4", system_prompt = "Be kind." }}

[deployments.claude-tools]
stable = "v1"
variants.v1 = {{ provider = "mock-anthropic", model = "claude-tools" }}

[deployments.claude-overloaded]
stable = "v1"
variants.v1 = {{ provider = "mock-anthropic", model = "claude-overloaded" }}

[deployments.refused]
stable = "v1"
variants.v1 = {{ provider = "nowhere", model = "gpt-ok" }}

[deployments.defaults]
stable = "v1"
variants.v1 = {{ provider = "mock-openai", model = "gpt-ok", params = {{ temperature = 0.1, max_tokens = 77 }} }}
"#,
        limited = sluice_core::secret::digest_hex(OTHER_KEY),
    );
    for m in [
        "gpt-tools",
        "gpt-500",
        "gpt-badjson",
        "gpt-cut",
        "gpt-slow",
        "gpt-429",
        "gpt-400",
    ] {
        s.push_str(&format!(
            "\n[deployments.{m}]\nstable = \"v1\"\nvariants.v1 = {{ provider = \"mock-openai\", model = \"{m}\" }}\n"
        ));
    }
    s
}

/// A running gateway with its mocks.
pub struct Harness {
    pub base: String,
    /// The admin API's own address, when `admin_listen` is set.
    pub admin_base: Option<String>,
    pub store: Arc<Store>,
    pub openai_seen: Seen,
    pub anthropic_seen: Seen,
    pub state: Arc<sluice_gateway::AppState>,
    pub config_path: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<ShutdownReport, sluice_gateway::GatewayError>>>,
    dir: Option<tempfile::TempDir>,
}

fn secrets() -> Arc<MapSecrets> {
    Arc::new(MapSecrets(HashMap::from([
        ("CLIENT_KEY".to_string(), CLIENT_KEY.to_string()),
        ("UPSTREAM_KEY".to_string(), "upstream-secret".to_string()),
        ("ANTHROPIC_KEY".to_string(), "anthropic-secret".to_string()),
    ])))
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|c| c).await
    }

    /// Starts with the test config rewritten by `edit`.
    pub async fn start_with(edit: impl Fn(String) -> String) -> Harness {
        let (oa, openai_seen) = openai_upstream().await;
        let (an, anthropic_seen) = anthropic_upstream().await;
        let dead = dead_port().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("e2e.db").to_string_lossy().into_owned();
        let config_path = dir.path().join("sluice.toml");
        std::fs::write(&config_path, edit(config_text(oa, an, dead, &db))).expect("write config");
        Self::launch(config_path, dir, openai_seen, anthropic_seen).await
    }

    async fn launch(
        config_path: std::path::PathBuf,
        dir: tempfile::TempDir,
        openai_seen: Seen,
        anthropic_seen: Seen,
    ) -> Harness {
        let text = std::fs::read_to_string(&config_path).expect("read config");
        let config = Config::parse(&text).expect("test config is valid");
        let source = sluice_gateway::ConfigSource {
            config,
            path: Some(config_path.clone()),
        };
        let gw = Gateway::bind(source, secrets())
            .await
            .expect("gateway binds");
        let base = format!("http://{}", gw.local_addr());
        let admin_base = gw.admin_addr().map(|a| format!("http://{a}"));
        let store = gw.store();
        let state = gw.state();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(gw.run(
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(5),
        ));
        Harness {
            base,
            admin_base,
            store,
            openai_seen,
            anthropic_seen,
            state,
            config_path,
            stop: Some(tx),
            task: Some(task),
            dir: Some(dir),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Waits until every record handed over so far is committed.
    pub async fn flush(&self) {
        self.state.events.flush().await;
    }

    /// Stops the gateway and starts a new one on the same config and store.
    pub async fn restart(mut self) -> Harness {
        let dir = self.dir.take().expect("dir");
        let (path, oa, an) = (
            self.config_path.clone(),
            self.openai_seen.clone(),
            self.anthropic_seen.clone(),
        );
        self.stop().await;
        Self::launch(path, dir, oa, an).await
    }

    /// Stops the gateway and returns its shutdown report.
    pub async fn stop(mut self) -> ShutdownReport {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("running");
        drop(self.state);
        drop(self.store);
        task.await.expect("join").expect("clean shutdown")
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// Posts a chat request with the main client key.
pub async fn chat(h: &Harness, body: Value) -> reqwest::Response {
    client()
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(CLIENT_KEY)
        .json(&body)
        .send()
        .await
        .expect("request sent")
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// Every thread of the calling test's runtime held busy (the serving side
/// of a gateway the harness started stops answering) until released.
pub struct Stuck {
    release: Arc<std::sync::atomic::AtomicBool>,
    ended: Arc<std::sync::atomic::AtomicUsize>,
}

impl Stuck {
    /// Occupies the runtime's `threads` worker threads with tasks that block
    /// them for up to 20 s. Call from the test's body (which runs on a
    /// thread of its own), and only use blocking I/O until [`Stuck::release`].
    pub fn runtime(threads: usize) -> Stuck {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let release = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        for _ in 0..threads {
            let (release, ended, started) = (release.clone(), ended.clone(), started.clone());
            tokio::spawn(async move {
                started.fetch_add(1, Ordering::SeqCst);
                let t = std::time::Instant::now();
                while !release.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
        let t = std::time::Instant::now();
        while started.load(Ordering::SeqCst) < threads {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the runtime never got stuck"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Stuck { release, ended }
    }

    /// Whether every thread is still held.
    pub fn still(&self) -> bool {
        self.ended.load(std::sync::atomic::Ordering::SeqCst) == 0
    }

    /// Lets the threads go.
    pub fn release(self) {
        self.release
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `POST`s `body` to `base` + `path` with blocking I/O on a fresh
/// connection, bearer `token`; returns the status and the response text.
pub fn post_blocking(base: &str, path: &str, token: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}
