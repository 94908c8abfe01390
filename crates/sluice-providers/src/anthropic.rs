//! Anthropic's Messages API (`POST {base_url}/v1/messages`), translated to and
//! from OpenAI's chat-completions shape in both directions, streams included.
//!
//! Request mapping: system/developer messages → `system`; user/assistant
//! messages → content blocks (text, images from `image_url`); assistant
//! `tool_calls` → `tool_use` blocks; `tool` messages → `tool_result` blocks in
//! a user turn; `tools` → `input_schema` tools; `tool_choice` auto/required/
//! none/named → auto/any/none/tool; `stop` → `stop_sequences`;
//! `max_completion_tokens`/`max_tokens` → `max_tokens` (the provider's
//! `default_max_tokens` when unset); `user` → `metadata.user_id`.
//! `seed`, `logit_bias`, penalties and `store` have no Anthropic equivalent and
//! are not sent; `n > 1`, `logprobs` and JSON response formats are refused
//! with a 400 naming the parameter rather than silently ignored.
//!
//! Response mapping: text blocks → `content`, `tool_use` → `tool_calls` (input
//! re-encoded as a JSON string), `stop_reason` end_turn/stop_sequence → `stop`,
//! max_tokens → `length`, tool_use → `tool_calls`, refusal → `content_filter`;
//! `usage.input_tokens/output_tokens` → `prompt_tokens/completion_tokens`.

use futures_util::StreamExt;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use serde_json::{json, Map, Value};
use sluice_core::chat::{ChatRequest, Content, Role, Usage};
use sluice_core::config::{AnthropicConfig, ProviderConfig};

use crate::http::{read_json, sse_events, Endpoint};
use crate::{now_secs, BuildError, Chunk, ChunkStream, Completion, ProviderError};

/// A client for Anthropic's Messages API.
#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    ep: Endpoint,
    default_max_tokens: u32,
}

impl AnthropicProvider {
    /// Builds the client.
    pub fn new(
        cfg: &ProviderConfig,
        a: &AnthropicConfig,
        api_key: Option<String>,
    ) -> Result<Self, BuildError> {
        let bad = |message: &str| BuildError {
            provider: cfg.name.clone(),
            message: message.to_string(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            "anthropic-version",
            HeaderValue::from_str(&a.version)
                .map_err(|_| bad("version is not a valid header value"))?,
        );
        if let Some(k) = api_key {
            let mut v = HeaderValue::from_str(k.trim())
                .map_err(|_| bad("API key contains characters not allowed in a header"))?;
            // Never printed by Debug, never logged.
            v.set_sensitive(true);
            headers.insert("x-api-key", v);
        }
        Ok(AnthropicProvider {
            ep: Endpoint::new(cfg, &a.base_url, "/v1/messages", headers)?,
            default_max_tokens: a.default_max_tokens,
        })
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.ep.name
    }

    /// A non-streamed completion.
    pub async fn complete(&self, req: &ChatRequest) -> Result<Completion, ProviderError> {
        let body = to_messages_request(req, self.default_max_tokens, false)?;
        let body = crate::http::encode(&body)?;
        let (resp, remaining) = self.ep.post(body).await?;
        let (value, _) = read_json(&self.ep.name, resp, remaining).await?;
        let out = from_messages_response(&value, now_secs()).map_err(|message| {
            ProviderError::InvalidResponse {
                provider: self.ep.name.clone(),
                message,
            }
        })?;
        Ok(Completion::from_value(out))
    }

    /// A streamed completion.
    pub async fn stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let body = to_messages_request(req, self.default_max_tokens, true)?;
        let body = crate::http::encode(&body)?;
        let (resp, sent) = self.ep.post_stream(body).await?;
        let events = Box::pin(sse_events(
            &self.ep.name,
            resp,
            self.ep.stream_timeouts,
            sent,
        ));
        let translator = StreamTranslator::new(now_secs());
        let name = self.ep.name.clone();
        let s = futures_util::stream::unfold(
            (
                events,
                translator,
                name,
                std::collections::VecDeque::<Chunk>::new(),
                false,
            ),
            |(mut events, mut tr, name, mut ready, mut done)| async move {
                loop {
                    if let Some(c) = ready.pop_front() {
                        return Some((Ok(c), (events, tr, name, ready, done)));
                    }
                    if done {
                        return None;
                    }
                    match events.next().await {
                        None => {
                            done = true;
                            if !tr.finished() {
                                let e = ProviderError::Stream {
                                    provider: name.clone(),
                                    message: "upstream closed the stream before message_stop"
                                        .into(),
                                };
                                return Some((Err(e), (events, tr, name, ready, done)));
                            }
                        }
                        Some(Err(e)) => {
                            done = true;
                            return Some((Err(e), (events, tr, name, ready, done)));
                        }
                        Some(Ok(ev)) => {
                            let data: Value = match serde_json::from_str(&ev.data) {
                                Ok(v) => v,
                                Err(e) => {
                                    done = true;
                                    let e = ProviderError::Stream {
                                        provider: name.clone(),
                                        message: format!("event is not valid JSON: {e}"),
                                    };
                                    return Some((Err(e), (events, tr, name, ready, done)));
                                }
                            };
                            let kind = ev
                                .event
                                .clone()
                                .or_else(|| {
                                    data.get("type").and_then(Value::as_str).map(str::to_string)
                                })
                                .unwrap_or_default();
                            match tr.event(&kind, &data) {
                                Ok(chunks) => ready.extend(
                                    chunks.into_iter().map(|value| Chunk { value, raw: None }),
                                ),
                                Err(message) => {
                                    done = true;
                                    let e = ProviderError::Stream {
                                        provider: name.clone(),
                                        message,
                                    };
                                    return Some((Err(e), (events, tr, name, ready, done)));
                                }
                            }
                            if tr.finished() {
                                done = true;
                            }
                        }
                    }
                }
            },
        );
        Ok(Box::pin(s))
    }
}

fn unsupported(param: &str, message: &str) -> ProviderError {
    ProviderError::Unsupported {
        param: param.to_string(),
        message: format!("'{param}' {message} with an Anthropic-backed deployment."),
    }
}

/// Converts an OpenAI content part to an Anthropic content block.
fn part_to_block(p: &Value) -> Option<Value> {
    match p.get("type").and_then(Value::as_str)? {
        "text" => Some(
            json!({"type": "text", "text": p.get("text").and_then(Value::as_str).unwrap_or("")}),
        ),
        "image_url" => {
            let url = p
                .get("image_url")
                .and_then(|u| u.get("url"))
                .and_then(Value::as_str)?;
            if let Some(rest) = url.strip_prefix("data:") {
                let (meta, data) = rest.split_once(',')?;
                let media = meta.strip_suffix(";base64")?;
                Some(
                    json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}),
                )
            } else {
                Some(json!({"type": "image", "source": {"type": "url", "url": url}}))
            }
        }
        _ => None,
    }
}

fn content_blocks(c: &Content) -> Vec<Value> {
    match c {
        Content::Text(t) => vec![json!({"type": "text", "text": t})],
        Content::Parts(parts) => parts.iter().filter_map(part_to_block).collect(),
    }
}

/// Translates an OpenAI chat request into a Messages API request body.
pub fn to_messages_request(
    req: &ChatRequest,
    default_max_tokens: u32,
    stream: bool,
) -> Result<Value, ProviderError> {
    if req.n.is_some_and(|n| n > 1) {
        return Err(unsupported("n", "greater than 1 is not supported"));
    }
    if req.logprobs == Some(true) {
        return Err(unsupported("logprobs", "is not supported"));
    }
    if let Some(rf) = &req.response_format {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(unsupported(
                "response_format",
                "other than {\"type\": \"text\"} is not supported",
            ));
        }
    }
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let mut push = |role: &str, blocks: Vec<Value>| {
        if blocks.is_empty() {
            return;
        }
        // Consecutive turns of one role merge into one (tool results after
        // each other, a user message after tool results).
        if let Some(last) = messages.last_mut() {
            if last["role"] == role {
                if let Some(arr) = last["content"].as_array_mut() {
                    arr.extend(blocks);
                    return;
                }
            }
        }
        messages.push(json!({"role": role, "content": blocks}));
    };
    for (i, m) in req.messages.iter().enumerate() {
        match m.role {
            Role::System | Role::Developer => system.push(m.text()),
            Role::User => push(
                "user",
                m.content.as_ref().map(content_blocks).unwrap_or_default(),
            ),
            Role::Assistant => {
                let mut blocks = m.content.as_ref().map(content_blocks).unwrap_or_default();
                blocks.retain(|b| {
                    b["type"] != "text" || b["text"].as_str().is_some_and(|t| !t.is_empty())
                });
                for tc in m.tool_calls.iter().flatten() {
                    let input: Value = if tc.function.arguments.trim().is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&tc.function.arguments).map_err(|e| ProviderError::Unsupported {
                            param: format!("messages[{i}].tool_calls"),
                            message: format!(
                                "Invalid 'messages[{i}].tool_calls': arguments of call '{}' are not valid JSON ({e}).",
                                tc.id
                            ),
                        })?
                    };
                    blocks.push(json!({"type": "tool_use", "id": tc.id, "name": tc.function.name, "input": input}));
                }
                push("assistant", blocks);
            }
            Role::Tool | Role::Function => {
                let id = m
                    .tool_call_id
                    .clone()
                    .or_else(|| m.name.clone())
                    .unwrap_or_default();
                push(
                    "user",
                    vec![json!({"type": "tool_result", "tool_use_id": id, "content": m.text()})],
                );
            }
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(req.model));
    out.insert(
        "max_tokens".into(),
        json!(req.max_output_tokens().unwrap_or(default_max_tokens)),
    );
    out.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    if let Some(t) = req.temperature {
        out.insert("temperature".into(), json!(t.min(1.0)));
    }
    if let Some(p) = req.top_p {
        out.insert("top_p".into(), json!(p));
    }
    if let Some(s) = &req.stop {
        out.insert("stop_sequences".into(), json!(s.to_vec()));
    }
    if let Some(u) = &req.user {
        out.insert("metadata".into(), json!({"user_id": u}));
    }
    if let Some(tools) = &req.tools {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let f = &t["function"];
                let mut o = json!({
                    "name": f["name"],
                    "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                });
                if let Some(d) = f.get("description") {
                    o["description"] = d.clone();
                }
                o
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    let mut choice = match &req.tool_choice {
        None => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            other => {
                return Err(ProviderError::Unsupported {
                    param: "tool_choice".into(),
                    message: format!("Invalid 'tool_choice': unsupported value '{other}'."),
                })
            }
        },
        Some(v) => match v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) => Some(json!({"type": "tool", "name": name})),
            None => {
                return Err(ProviderError::Unsupported {
                    param: "tool_choice".into(),
                    message: "Invalid 'tool_choice': expected \"auto\", \"required\", \"none\" or {\"type\":\"function\",\"function\":{\"name\":...}}.".into(),
                })
            }
        },
    };
    if req.parallel_tool_calls == Some(false) && req.tools.is_some() {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = json!(true);
        }
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    if stream {
        out.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(out))
}

/// Maps Anthropic's `stop_reason` to OpenAI's `finish_reason`.
pub fn finish_reason(stop_reason: Option<&str>) -> Option<&'static str> {
    Some(match stop_reason? {
        "end_turn" | "stop_sequence" | "pause_turn" => "stop",
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    })
}

/// Translates a Messages API response into a `chat.completion` object.
pub fn from_messages_response(v: &Value, created: u64) -> Result<Value, String> {
    if v.get("type").and_then(Value::as_str) == Some("error") {
        return Err(format!(
            "error in a 200 response: {}",
            v["error"]["message"].as_str().unwrap_or("unknown")
        ));
    }
    let blocks = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or("response has no `content` array")?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": b["id"],
                "type": "function",
                "function": {"name": b["name"], "arguments": b.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into())},
            })),
            _ => {} // thinking and other block kinds are not part of the chat shape
        }
    }
    let usage = Usage::new(
        v["usage"]["input_tokens"].as_u64().unwrap_or(0),
        v["usage"]["output_tokens"].as_u64().unwrap_or(0),
    );
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }, "refusal": null});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    Ok(json!({
        "id": format!("chatcmpl-{}", v.get("id").and_then(Value::as_str).unwrap_or("anthropic")),
        "object": "chat.completion",
        "created": created,
        "model": v.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{"index": 0, "message": message, "logprobs": null,
                     "finish_reason": finish_reason(v.get("stop_reason").and_then(Value::as_str))}],
        "usage": usage,
    }))
}

/// Turns Messages API stream events into `chat.completion.chunk` objects.
#[derive(Debug)]
pub struct StreamTranslator {
    id: String,
    model: Value,
    created: u64,
    input_tokens: u64,
    output_tokens: u64,
    /// Anthropic block index → OpenAI tool-call index (for tool_use blocks).
    tool_index: std::collections::HashMap<u64, u64>,
    next_tool: u64,
    finished: bool,
}

impl StreamTranslator {
    /// A translator for one stream.
    pub fn new(created: u64) -> Self {
        StreamTranslator {
            id: "chatcmpl-anthropic".into(),
            model: Value::Null,
            created,
            input_tokens: 0,
            output_tokens: 0,
            tool_index: Default::default(),
            next_tool: 0,
            finished: false,
        }
    }

    /// Whether `message_stop` was seen.
    pub fn finished(&self) -> bool {
        self.finished
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    }

    /// Handles one event; returns the chunks it produces, or the error an
    /// `error` event carries.
    pub fn event(&mut self, kind: &str, data: &Value) -> Result<Vec<Value>, String> {
        Ok(match kind {
            "message_start" => {
                let m = &data["message"];
                if let Some(id) = m.get("id").and_then(Value::as_str) {
                    self.id = format!("chatcmpl-{id}");
                }
                self.model = m.get("model").cloned().unwrap_or(Value::Null);
                self.input_tokens = m["usage"]["input_tokens"].as_u64().unwrap_or(0);
                self.output_tokens = m["usage"]["output_tokens"].as_u64().unwrap_or(0);
                vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
            }
            "content_block_start" => {
                let b = &data["content_block"];
                match b.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let idx = data["index"].as_u64().unwrap_or(0);
                        let ti = self.next_tool;
                        self.next_tool += 1;
                        self.tool_index.insert(idx, ti);
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": ti, "id": b["id"], "type": "function",
                                    "function": {"name": b["name"], "arguments": ""}}]}),
                            None,
                        )]
                    }
                    Some("text") => match b.get("text").and_then(Value::as_str) {
                        Some(t) if !t.is_empty() => vec![self.chunk(json!({"content": t}), None)],
                        _ => vec![],
                    },
                    _ => vec![],
                }
            }
            "content_block_delta" => {
                let d = &data["delta"];
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        vec![self.chunk(json!({"content": d["text"].as_str().unwrap_or("")}), None)]
                    }
                    Some("input_json_delta") => {
                        let idx = data["index"].as_u64().unwrap_or(0);
                        let Some(ti) = self.tool_index.get(&idx) else {
                            return Err(format!("input_json_delta for unknown block {idx}"));
                        };
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": ti, "function": {"arguments": d["partial_json"].as_str().unwrap_or("")}}]}),
                            None,
                        )]
                    }
                    _ => vec![],
                }
            }
            "message_delta" => {
                if let Some(o) = data["usage"]["output_tokens"].as_u64() {
                    self.output_tokens = o;
                }
                if let Some(i) = data["usage"]["input_tokens"].as_u64() {
                    self.input_tokens = i;
                }
                match finish_reason(data["delta"]["stop_reason"].as_str()) {
                    Some(f) => vec![self.chunk(json!({}), Some(f))],
                    None => vec![],
                }
            }
            "message_stop" => {
                self.finished = true;
                let mut c = json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [],
                });
                c["usage"] = json!(Usage::new(self.input_tokens, self.output_tokens));
                vec![c]
            }
            "error" => {
                return Err(data["error"]["message"]
                    .as_str()
                    .unwrap_or("upstream sent an error event")
                    .to_string())
            }
            _ => vec![], // ping, content_block_stop, unknown future events
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> ChatRequest {
        ChatRequest::from_value(v).expect("valid request")
    }

    #[test]
    fn translates_a_conversation_with_tools() {
        let r = req(json!({
            "model": "claude-sonnet-4",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type":"text","text":"weather?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id":"t1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "cold"},
                {"role": "user", "content": "thanks"}
            ],
            "tools": [{"type":"function","function":{"name":"get_weather","description":"d","parameters":{"type":"object"}}}],
            "tool_choice": "required", "stop": "END", "temperature": 1.5, "user": "u1", "max_tokens": 99
        }));
        let out = to_messages_request(&r, 4096, true).expect("translates");
        assert_eq!(out["system"], "be brief");
        assert_eq!(out["max_tokens"], 99);
        assert_eq!(out["temperature"], 1.0);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["tool_choice"], json!({"type": "any"}));
        assert_eq!(out["tools"][0]["input_schema"], json!({"type": "object"}));
        assert_eq!(out["metadata"]["user_id"], "u1");
        let msgs = out["messages"].as_array().expect("array");
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert_eq!(msgs[0]["content"][1]["source"]["media_type"], "image/png");
        assert_eq!(msgs[1]["content"][0]["type"], "tool_use");
        assert_eq!(msgs[1]["content"][0]["input"]["city"], "Oslo");
        // The tool result and the next user message merge into one user turn.
        assert_eq!(msgs[2]["content"][0]["type"], "tool_result");
        assert_eq!(msgs[2]["content"][1]["text"], "thanks");
        assert_eq!(out["stream"], true);
    }

    #[test]
    fn refuses_what_cannot_be_expressed() {
        let r = req(json!({"model":"m","messages":[{"role":"user","content":"x"}],"n":2}));
        let e = to_messages_request(&r, 10, false).unwrap_err();
        assert!(matches!(e, ProviderError::Unsupported { ref param, .. } if param == "n"));
        let r = req(
            json!({"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}),
        );
        assert!(to_messages_request(&r, 10, false).is_err());
    }

    #[test]
    fn translates_responses() {
        let v = json!({"id":"msg_1","type":"message","role":"assistant","model":"claude",
            "content":[{"type":"text","text":"Let me check."},{"type":"tool_use","id":"t1","name":"get_weather","input":{"city":"Oslo"}}],
            "stop_reason":"tool_use","usage":{"input_tokens":10,"output_tokens":5}});
        let out = from_messages_response(&v, 1).expect("translates");
        assert_eq!(out["id"], "chatcmpl-msg_1");
        assert_eq!(out["choices"][0]["message"]["content"], "Let me check.");
        assert_eq!(
            out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Oslo\"}"
        );
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out["usage"]["total_tokens"], 15);
    }

    #[test]
    fn translates_stream_events() {
        let mut t = StreamTranslator::new(1);
        let mut all = Vec::new();
        for (k, d) in [
            (
                "message_start",
                json!({"message":{"id":"m1","model":"claude","usage":{"input_tokens":7,"output_tokens":1}}}),
            ),
            (
                "content_block_start",
                json!({"index":0,"content_block":{"type":"text","text":""}}),
            ),
            (
                "content_block_delta",
                json!({"index":0,"delta":{"type":"text_delta","text":"Hi"}}),
            ),
            ("ping", json!({})),
            (
                "content_block_start",
                json!({"index":1,"content_block":{"type":"tool_use","id":"t1","name":"f","input":{}}}),
            ),
            (
                "content_block_delta",
                json!({"index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\":"}}),
            ),
            (
                "content_block_delta",
                json!({"index":1,"delta":{"type":"input_json_delta","partial_json":"1}"}}),
            ),
            (
                "message_delta",
                json!({"delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}),
            ),
            ("message_stop", json!({})),
        ] {
            all.extend(t.event(k, &d).expect("ok"));
        }
        assert!(t.finished());
        let mut acc = sluice_core::stream::StreamAccumulator::new();
        for c in &all {
            acc.push(c);
        }
        let c = acc.completion();
        assert_eq!(c["choices"][0]["message"]["content"], "Hi");
        assert_eq!(
            c["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(acc.usage(), Some(Usage::new(7, 9)));
        let e = t.event(
            "error",
            &json!({"error":{"type":"overloaded_error","message":"Overloaded"}}),
        );
        assert_eq!(e.unwrap_err(), "Overloaded");
    }

    proptest::proptest! {
        /// Any sequence of known or unknown events with arbitrary JSON never
        /// panics the translator.
        #[test]
        fn translator_never_panics(
            events in proptest::collection::vec(
                ("(message_start|content_block_start|content_block_delta|message_delta|message_stop|error|ping|other)",
                 "\\{(\"index\":(0|1|-1|\"x\"),)?\"delta\":\\{\"type\":\"(text_delta|input_json_delta)\"(,\"text\":1)?\\}\\}"),
                0..12),
        ) {
            let mut t = StreamTranslator::new(0);
            for (kind, data) in events {
                if let Ok(v) = serde_json::from_str::<Value>(&data) {
                    let _ = t.event(&kind, &v);
                }
            }
        }
    }
}
