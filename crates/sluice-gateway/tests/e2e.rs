//! End-to-end: the real gateway on an ephemeral port in front of local
//! OpenAI- and Anthropic-speaking upstreams, driven over real HTTP.

mod common;

use common::{chat, client, sse_data, Harness, CLIENT_KEY, OTHER_KEY};
use serde_json::{json, Value};

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("error body is JSON");
    let e = &body["error"];
    assert!(e["message"].is_string(), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_stream_passes_through_and_is_recorded() {
    let h = Harness::start().await;
    let r = chat(
        &h,
        json!({
            "model": "support",
            "messages": [{"role": "user", "content": "Where is my order?"}],
            "temperature": 0.3, "top_p": 0.9, "max_tokens": 50, "max_completion_tokens": 60,
            "stop": ["\n\n"], "seed": 42, "n": 1, "user": "alice",
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
            "tool_choice": "auto", "response_format": {"type": "text"},
            "metadata": {"tier": "beta"}
        }),
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = header(&r, "x-sluice-request-id");
    assert!(id.starts_with("req_"), "{id}");
    assert_eq!(header(&r, "x-sluice-variant"), "v1");
    let body: Value = r.json().await.expect("json");
    // Exactly what the upstream sent.
    assert_eq!(body, common::openai_completion("gpt-ok", false));

    let (headers, up) = h.openai_seen.last();
    assert_eq!(headers["authorization"], "Bearer upstream-secret");
    assert_eq!(up["model"], "gpt-ok");
    assert_eq!(
        up["messages"][0],
        json!({"role": "system", "content": "You are a support agent."})
    );
    assert_eq!(up["messages"][1]["content"], "Where is my order?");
    for (k, v) in [
        ("temperature", json!(0.3)),
        ("top_p", json!(0.9)),
        ("max_tokens", json!(50)),
        ("max_completion_tokens", json!(60)),
        ("stop", json!(["\n\n"])),
        ("seed", json!(42)),
        ("n", json!(1)),
        ("user", json!("alice")),
        ("tool_choice", json!("auto")),
        ("response_format", json!({"type": "text"})),
    ] {
        assert_eq!(up[k], v, "parameter {k} passed through");
    }
    assert_eq!(up["tools"][0]["function"]["name"], "lookup");
    assert!(
        up.get("metadata").is_none(),
        "metadata is sluice's, not forwarded without store"
    );
    assert!(up.get("stream").is_none());

    h.flush().await;
    let rec = h.store.get(&id).expect("read").expect("recorded");
    assert_eq!(rec.status, 200);
    assert_eq!(rec.deployment.as_deref(), Some("support"));
    assert_eq!(rec.variant.as_deref(), Some("v1"));
    assert_eq!(rec.provider.as_deref(), Some("mock-openai"));
    assert_eq!(rec.model.as_deref(), Some("gpt-ok"));
    assert_eq!(rec.api_key.as_deref(), Some("app"));
    assert_eq!(rec.subject.as_deref(), Some("alice"));
    assert_eq!((rec.tokens_in, rec.tokens_out), (Some(11), Some(5)));
    assert_eq!(rec.finish_reason.as_deref(), Some("stop"));
    assert!(!rec.stream);
    assert!(rec.latency_ms > 0.0);
    assert!(rec
        .request_body
        .expect("full bodies")
        .contains("Where is my order?"));
    assert!(rec
        .response_body
        .expect("full bodies")
        .contains("Hello from the mock."));
    let report = h.stop().await;
    assert_eq!(report.events.written, report.events.enqueued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_honour_include_usage_and_are_recorded() {
    let h = Harness::start().await;
    // With include_usage: the usage chunk reaches the client.
    let r = chat(
        &h,
        json!({"model": "support", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").starts_with("text/event-stream"));
    let id = header(&r, "x-sluice-request-id");
    let body = r.text().await.expect("body");
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello from the mock.");
    assert_eq!(
        chunks.last().expect("usage chunk")["usage"]["total_tokens"],
        16
    );
    // The upstream was always asked for usage.
    assert_eq!(
        h.openai_seen.last().1["stream_options"]["include_usage"],
        true
    );

    // Without it: no usage chunk for the client, but tokens are still recorded.
    let r = chat(&h, json!({"model": "support", "stream": true, "messages": [{"role": "user", "content": "hi"}]})).await;
    let id2 = header(&r, "x-sluice-request-id");
    let body = r.text().await.expect("body");
    assert!(!body.contains("\"usage\""), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"));

    h.flush().await;
    for id in [id, id2] {
        let rec = h.store.get(&id).expect("read").expect("recorded");
        assert!(rec.stream);
        assert_eq!(rec.status, 200);
        assert!(rec.error_kind.is_none());
        assert_eq!((rec.tokens_in, rec.tokens_out), (Some(11), Some(5)));
        assert!(rec.ttft_ms.expect("ttft") <= rec.latency_ms);
        let resp: Value = serde_json::from_str(&rec.response_body.expect("body")).expect("json");
        assert_eq!(
            resp["choices"][0]["message"]["content"],
            "Hello from the mock."
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_round_trip_on_both_protocols() {
    let h = Harness::start().await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    // OpenAI, non-stream and stream.
    let r = chat(&h, json!({"model": "gpt-tools", "tools": tools, "messages": [{"role": "user", "content": "weather?"}]})).await;
    let b: Value = r.json().await.expect("json");
    assert_eq!(
        b["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"city\":\"Oslo\"}"
    );
    let r = chat(&h, json!({"model": "gpt-tools", "stream": true, "tools": tools, "messages": [{"role": "user", "content": "weather?"}]})).await;
    let body = r.text().await.expect("body");
    let args: String = sse_data(&body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).expect("json"))
        .filter_map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(args, "{\"city\":\"Oslo\"}");

    // Anthropic, with a prior tool result in the conversation.
    let convo = json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "toolu_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "toolu_0", "content": "sunny"},
        {"role": "user", "content": "and Paris?"}
    ]);
    let r = chat(&h, json!({"model": "claude-tools", "tools": tools, "tool_choice": "required", "messages": convo})).await;
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.expect("json");
    assert_eq!(b["object"], "chat.completion");
    assert_eq!(b["choices"][0]["finish_reason"], "tool_calls");
    let call = &b["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["id"], "toolu_1");
    assert_eq!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().expect("str"))
            .expect("json"),
        json!({"city": "Paris"})
    );
    assert_eq!(
        b["usage"],
        json!({"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30})
    );
    let (_, up) = h.anthropic_seen.last();
    assert_eq!(up["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        up["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(up["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(
        up["messages"][2]["content"][0],
        json!({"type": "tool_result", "tool_use_id": "toolu_0", "content": "sunny"})
    );

    let r = chat(&h, json!({"model": "claude-tools", "stream": true, "stream_options": {"include_usage": true}, "tools": tools, "messages": [{"role": "user", "content": "weather in Paris?"}]})).await;
    let body = r.text().await.expect("body");
    let chunks: Vec<Value> = sse_data(&body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("json"))
        .collect();
    let mut acc = sluice_core::stream::StreamAccumulator::new();
    for c in &chunks {
        acc.push(c);
    }
    let done = acc.completion();
    assert_eq!(done["choices"][0]["message"]["content"], "Bonjour le monde");
    assert_eq!(
        done["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{\"city\": \"Paris\"}"
    );
    assert_eq!(done["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(done["usage"]["completion_tokens"], 9);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_text_and_system_prompt() {
    let h = Harness::start().await;
    let r = chat(
        &h,
        json!({"model": "claude", "max_tokens": 100, "messages": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "hello"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.expect("json");
    assert_eq!(b["choices"][0]["message"]["content"], "Bonjour le monde");
    assert_eq!(b["choices"][0]["finish_reason"], "stop");
    let (headers, up) = h.anthropic_seen.last();
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert_eq!(up["model"], "claude-sonnet-4");
    assert_eq!(up["system"], "Be kind.\n\nAnswer in French.");
    assert_eq!(up["max_tokens"], 100);
    assert_eq!(
        up["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    );

    let r = chat(&h, json!({"model": "claude", "stream": true, "messages": [{"role": "user", "content": "hello"}]})).await;
    let body = r.text().await.expect("body");
    assert!(body.ends_with("data: [DONE]\n\n"));
    let text: String = sse_data(&body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            serde_json::from_str::<Value>(d).expect("json")["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "Bonjour le monde");
    // n > 1 cannot be expressed: a 400 naming the parameter, upstream not called.
    let before = h.anthropic_seen.count();
    let r = chat(
        &h,
        json!({"model": "claude", "n": 2, "messages": [{"role": "user", "content": "hello"}]}),
    )
    .await;
    let (status, b) = error_of(r).await;
    assert_eq!(status, 400);
    assert_eq!(b["error"]["param"], "n");
    assert_eq!(h.anthropic_seen.count(), before);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_have_openai_shape_and_status() {
    let h = Harness::start().await;
    let c = client();
    let url = h.url("/v1/chat/completions");

    // 400 malformed JSON.
    let r = c
        .post(&url)
        .bearer_auth(CLIENT_KEY)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .expect("sent");
    let (s, b) = error_of(r).await;
    assert_eq!(s, 400);
    assert_eq!(b["error"]["type"], "invalid_request_error");
    assert!(
        b["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("JSON"),
        "{b}"
    );

    // 400 invalid field, named.
    let r = chat(&h, json!({"model": "support", "temperature": 9, "messages": [{"role": "user", "content": "x"}]})).await;
    let (s, b) = error_of(r).await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (400, Some("temperature"))
    );
    let r = chat(
        &h,
        json!({"model": "support", "messages": [{"role": "wizard", "content": "x"}]}),
    )
    .await;
    let (s, b) = error_of(r).await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (400, Some("messages[0].role"))
    );

    // 400 unknown field, named.
    let r = chat(&h, json!({"model": "support", "temprature": 1, "messages": [{"role": "user", "content": "x"}]})).await;
    let (s, b) = error_of(r).await;
    assert_eq!(s, 400);
    assert_eq!(b["error"]["param"], "temprature");
    assert!(b["error"]["message"]
        .as_str()
        .expect("msg")
        .contains("temprature"));

    // 401 missing and unknown key.
    let r = c
        .post(&url)
        .json(&json!({"model": "support", "messages": []}))
        .send()
        .await
        .expect("sent");
    let (s, b) = error_of(r).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let r = c
        .post(&url)
        .bearer_auth("sk-wrong")
        .json(&json!({"model": "support", "messages": []}))
        .send()
        .await
        .expect("sent");
    assert_eq!(error_of(r).await.0, 401);

    // 404 unknown model, and a deployment this key may not use.
    let r = chat(
        &h,
        json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    let (s, b) = error_of(r).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let r = c
        .post(&url)
        .bearer_auth(OTHER_KEY)
        .json(&json!({"model": "claude", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(error_of(r).await.0, 404);
    let r = c
        .post(&url)
        .bearer_auth(OTHER_KEY)
        .json(&json!({"model": "support", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);

    // 413 over max_body_bytes (64 KiB in the test config), declared and chunked.
    let big = "x".repeat(70_000);
    let r = chat(
        &h,
        json!({"model": "support", "messages": [{"role": "user", "content": big}]}),
    )
    .await;
    let (s, b) = error_of(r).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (413, Some("request_too_large"))
    );
    let chunks =
        futures_util::stream::iter((0..9).map(|_| Ok::<_, std::io::Error>(vec![b' '; 8192])));
    let r = c
        .post(&url)
        .bearer_auth(CLIENT_KEY)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("sent");
    assert_eq!(error_of(r).await.0, 413);

    // Unknown route and wrong method, same shape.
    let r = c.get(h.url("/v1/nothing")).send().await.expect("sent");
    assert_eq!(error_of(r).await.0, 404);
    let r = c.get(&url).send().await.expect("sent");
    assert_eq!(error_of(r).await.0, 405);
    // The chat route answers on its exact path only; a query string is not
    // part of the path.
    let ok = json!({"model": "support", "messages": [{"role": "user", "content": "x"}]});
    for (at, status) in [(format!("{url}/"), 404), (format!("{url}?trace=1"), 200)] {
        let r = c
            .post(&at)
            .bearer_auth(CLIENT_KEY)
            .json(&ok)
            .send()
            .await
            .expect("sent");
        if status == 200 {
            assert_eq!(r.status(), 200, "{at}");
        } else {
            assert_eq!(error_of(r).await.0, status, "{at}");
        }
    }

    h.flush().await;
    let rows = h.store.recent(100).expect("rows");
    let statuses: Vec<u16> = rows.iter().map(|r| r.status).collect();
    for s in [400, 401, 404, 413] {
        assert!(statuses.contains(&s), "a {s} was recorded: {statuses:?}");
    }
    assert!(rows
        .iter()
        .filter(|r| r.status >= 400)
        .all(|r| r.error_kind.is_some()));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_misbehaviour_is_reported_recorded_and_survived() {
    let h = Harness::start().await;
    let msg = json!([{"role": "user", "content": "x"}]);
    let cases = [
        ("gpt-500", 502, "upstream_error"),
        ("gpt-badjson", 502, "upstream_invalid_response"),
        ("refused", 502, "upstream_unreachable"),
        ("gpt-slow", 504, "upstream_timeout"),
        ("gpt-429", 429, "upstream_error"),
        ("gpt-400", 400, "upstream_error"),
    ];
    let mut ids = Vec::new();
    for (model, status, kind) in cases {
        let r = chat(&h, json!({"model": model, "messages": msg})).await;
        let id = header(&r, "x-sluice-request-id");
        if model == "gpt-429" {
            assert_eq!(header(&r, "retry-after"), "7");
        }
        let (s, b) = error_of(r).await;
        assert_eq!(s, status, "{model}: {b}");
        ids.push((id, status, kind));
    }
    // A stream cut mid-way: the client gets what arrived, then an SSE error event.
    let r = chat(
        &h,
        json!({"model": "gpt-cut", "stream": true, "messages": msg}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let cut_id = header(&r, "x-sluice-request-id");
    let body = r.text().await.expect("body");
    let data = sse_data(&body);
    let last: Value =
        serde_json::from_str(data.last().expect("events")).expect("error event is JSON");
    assert_eq!(last["error"]["code"], "upstream_stream_error", "{body}");
    assert!(!body.contains("[DONE]"));
    // An error event from Anthropic mid-stream.
    let r = chat(
        &h,
        json!({"model": "claude-overloaded", "stream": true, "messages": msg}),
    )
    .await;
    let body = r.text().await.expect("body");
    assert!(body.contains("Overloaded"), "{body}");
    // A stream whose upstream fails before it starts: a plain JSON error.
    let r = chat(
        &h,
        json!({"model": "gpt-500", "stream": true, "messages": msg}),
    )
    .await;
    assert_eq!(error_of(r).await.0, 502);

    // Still serving.
    let r = chat(&h, json!({"model": "support", "messages": msg})).await;
    assert_eq!(r.status(), 200);

    h.flush().await;
    for (id, status, kind) in ids {
        let rec = h.store.get(&id).expect("read").expect("recorded");
        assert_eq!(
            (rec.status, rec.error_kind.as_deref()),
            (status, Some(kind)),
            "{id}"
        );
        assert!(rec.error_message.is_some());
    }
    let rec = h.store.get(&cut_id).expect("read").expect("recorded");
    assert_eq!(rec.error_kind.as_deref(), Some("upstream_stream_error"));
    let resp: Value =
        serde_json::from_str(&rec.response_body.expect("partial body")).expect("json");
    assert_eq!(resp["choices"][0]["message"]["content"], "Hello from");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variant_defaults_fill_unset_parameters() {
    let h = Harness::start().await;
    chat(&h, json!({"model": "defaults", "messages": [{"role": "user", "content": "x"}], "temperature": 0.7})).await;
    let (_, up) = h.openai_seen.last();
    assert_eq!(up["temperature"], 0.7);
    assert_eq!(up["max_tokens"], 77);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_metrics_and_health() {
    let h = Harness::start().await;
    let c = client();
    let r = c
        .get(h.url("/v1/models"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .expect("sent");
    let b: Value = r.json().await.expect("json");
    let ids: Vec<&str> = b["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"support") && ids.contains(&"claude"),
        "{ids:?}"
    );
    let r = c
        .get(h.url("/v1/models"))
        .bearer_auth(OTHER_KEY)
        .send()
        .await
        .expect("sent");
    let b: Value = r.json().await.expect("json");
    assert_eq!(b["data"].as_array().expect("list").len(), 1);
    let r = c.get(h.url("/v1/models")).send().await.expect("sent");
    assert_eq!(r.status(), 401);
    let r = c
        .get(h.url("/v1/models/support"))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.json::<Value>().await.expect("json")["id"], "support");

    chat(
        &h,
        json!({"model": "support", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    chat(
        &h,
        json!({"model": "support", "stream": true, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await
    .text()
    .await
    .expect("body");
    chat(
        &h,
        json!({"model": "gpt-500", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    h.flush().await;
    let m = c
        .get(h.url("/metrics"))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    assert!(
        m.contains("sluice_requests_total{deployment=\"support\",variant=\"v1\",status=\"200\"} 2"),
        "{m}"
    );
    assert!(m.contains("sluice_request_errors_total{deployment=\"gpt-500\",variant=\"v1\",kind=\"upstream_error\"} 1"), "{m}");
    assert!(m.contains("sluice_request_duration_seconds_bucket{"), "{m}");
    assert!(
        m.contains(
            "sluice_time_to_first_token_seconds_count{deployment=\"support\",variant=\"v1\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains(
            "sluice_tokens_total{deployment=\"support\",variant=\"v1\",direction=\"output\"} 10"
        ),
        "{m}"
    );
    assert!(m.contains("sluice_events_written_total 3"), "{m}");
    assert!(m.contains("sluice_events_failed_total 0"), "{m}");
    // The shared runtime hands nothing between serving threads.
    assert!(m.contains("sluice_requests_offloaded_total 0"), "{m}");
    let r = c.get(h.url("/healthz")).send().await.expect("sent");
    assert_eq!(r.json::<Value>().await.expect("json")["status"], "ok");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_lost_under_concurrency() {
    // Three serving threads on two cores: connections land on every one,
    // each with its own upstream pool, and every record reaches the store.
    let h = Harness::start_with(|c| {
        c.replace(
            "max_body_bytes = 65536",
            "max_body_bytes = 65536\nworkers = 3",
        )
    })
    .await;
    const N: usize = 400;
    let c = client();
    let url = h.url("/v1/chat/completions");
    let results = futures_util::future::join_all((0..N).map(|i| {
        let c = c.clone();
        let url = url.clone();
        async move {
            let body = match i % 4 {
                0 => json!({"model": "support", "stream": true, "messages": [{"role": "user", "content": format!("q{i}")}]}),
                1 => json!({"model": "claude", "messages": [{"role": "user", "content": format!("q{i}")}]}),
                2 => json!({"model": "gpt-500", "messages": [{"role": "user", "content": format!("q{i}")}]}),
                _ => json!({"model": "support", "messages": [{"role": "user", "content": format!("q{i}")}]}),
            };
            let r = c.post(&url).bearer_auth(CLIENT_KEY).json(&body).send().await.expect("sent");
            let id = r.headers()["x-sluice-request-id"].to_str().expect("id").to_string();
            let _ = r.bytes().await;
            id
        }
    }))
    .await;
    let store = h.store.clone();
    let report = h.stop().await;
    assert_eq!(report.events.enqueued, N as u64);
    assert_eq!(report.events.written, N as u64, "{:?}", report.events);
    assert_eq!(store.count().expect("count"), N as u64);
    let mut unique = results.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), N, "request ids are unique");
    for id in results.iter().step_by(37) {
        assert!(store.get(id).expect("read").is_some(), "{id} recorded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_mode_keeps_no_bodies() {
    let h =
        Harness::start_with(|c| c.replace("log_bodies = \"full\"", "log_bodies = \"metadata\""))
            .await;
    let r = chat(
        &h,
        json!({"model": "support", "messages": [{"role": "user", "content": "private words"}]}),
    )
    .await;
    let id = header(&r, "x-sluice-request-id");
    assert_eq!(r.status(), 200);
    let r = chat(&h, json!({"model": "support", "stream": true, "messages": [{"role": "user", "content": "private words"}]})).await;
    let id2 = header(&r, "x-sluice-request-id");
    r.text().await.expect("body");
    h.flush().await;
    for id in [id, id2] {
        let rec = h.store.get(&id).expect("read").expect("recorded");
        assert!(
            rec.request_body.is_none() && rec.response_body.is_none(),
            "{rec:?}"
        );
        assert_eq!(rec.tokens_out, Some(5));
    }
    h.stop().await;
}
