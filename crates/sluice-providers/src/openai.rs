//! Any OpenAI-compatible upstream (`POST {base_url}/chat/completions`).
//!
//! Requests are forwarded as OpenAI would receive them; responses are passed
//! through byte-for-byte when unchanged. Streams always ask the upstream for a
//! usage chunk (`stream_options.include_usage`) so every interaction has token
//! counts; the gateway hides that chunk from clients that did not ask for it.

use futures_util::StreamExt;
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;
use sluice_core::chat::{ChatRequest, StreamOptions, Usage};
use sluice_core::config::{OpenAiConfig, ProviderConfig};

use crate::http::{parse_json, read_bytes, read_json, sse_events, Endpoint};
use crate::{BuildError, Chunk, ChunkStream, Completion, ProviderError, RawCompletion, Reply};

/// A client for one OpenAI-compatible upstream.
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    ep: Endpoint,
}

impl OpenAiProvider {
    /// Builds the client.
    pub fn new(
        cfg: &ProviderConfig,
        o: &OpenAiConfig,
        api_key: Option<String>,
    ) -> Result<Self, BuildError> {
        let bad = |message: String| BuildError {
            provider: cfg.name.clone(),
            message,
        };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(k) = api_key {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", k.trim()))
                .map_err(|_| bad("API key contains characters not allowed in a header".into()))?;
            // Never printed by Debug, never logged.
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        for (k, v) in &o.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| bad(format!("headers.{k}: not a valid header name")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| bad(format!("headers.{k}: not a valid header value")))?;
            headers.insert(name, value);
        }
        Ok(OpenAiProvider {
            ep: Endpoint::new(cfg, &o.base_url, "/chat/completions", headers)?,
        })
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.ep.name
    }

    /// Sends a non-streamed request; the successful answer's bytes.
    async fn answer_bytes(&self, req: &ChatRequest) -> Result<bytes::Bytes, ProviderError> {
        let body = if req.stream.is_none() && req.stream_options.is_none() {
            crate::http::encode(req)?
        } else {
            let mut req = req.clone();
            req.stream = None;
            req.stream_options = None;
            crate::http::encode(&req)?
        };
        let (resp, remaining) = self.ep.post(body).await?;
        read_bytes(&self.ep.name, resp, remaining).await
    }

    /// A non-streamed completion.
    pub async fn complete(&self, req: &ChatRequest) -> Result<Completion, ProviderError> {
        let raw = self.answer_bytes(req).await?;
        completion_from_bytes(&self.ep.name, raw)
    }

    /// A non-streamed completion as the request path takes it: read without
    /// a JSON tree when its shape allows (see [`RawCompletion`]).
    pub async fn reply(&self, req: &ChatRequest) -> Result<Reply, ProviderError> {
        let raw = self.answer_bytes(req).await?;
        match RawCompletion::read(raw) {
            Ok(r) => Ok(Reply::Raw(r)),
            Err(raw) => completion_from_bytes(&self.ep.name, raw).map(Reply::Complete),
        }
    }

    /// A streamed completion.
    pub async fn stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let mut req = req.clone();
        req.stream = Some(true);
        let mut opts = req.stream_options.take().unwrap_or_default();
        opts.include_usage = Some(true);
        req.stream_options = Some(StreamOptions { ..opts });
        let body = crate::http::encode(&req)?;
        let (resp, sent) = self.ep.post_stream(body).await?;
        let is_sse = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            // Some compatible servers ignore `stream` and answer in one piece.
            let (value, _) = read_json(&self.ep.name, resp, self.ep.timeout).await?;
            check_completion(&self.ep.name, &value)?;
            return Ok(Box::pin(futures_util::stream::iter(
                completion_as_chunks(&value).into_iter().map(Ok),
            )));
        }
        let name = self.ep.name.clone();
        let events = sse_events(&self.ep.name, resp, self.ep.stream_timeouts, sent);
        struct St<S> {
            events: S,
            done: bool,
            finished: bool,
            name: String,
        }
        let st = St {
            events: Box::pin(events),
            done: false,
            finished: false,
            name,
        };
        let s = futures_util::stream::unfold(st, |mut st| async move {
            if st.done {
                return None;
            }
            loop {
                match st.events.next().await {
                    None => {
                        st.done = true;
                        if st.finished {
                            return None;
                        }
                        let e = ProviderError::Stream {
                            provider: st.name.clone(),
                            message: "upstream closed the stream before it finished \
                                      (no finish_reason and no [DONE])"
                                .into(),
                        };
                        return Some((Err(e), st));
                    }
                    Some(Err(e)) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                    Some(Ok(ev)) => {
                        let data = ev.data.trim();
                        if data == "[DONE]" {
                            return None;
                        }
                        if data.is_empty() {
                            continue;
                        }
                        let value: Value = match serde_json::from_str(data) {
                            Ok(v) => v,
                            Err(e) => {
                                st.done = true;
                                let e = ProviderError::Stream {
                                    provider: st.name.clone(),
                                    message: format!(
                                        "chunk is not valid JSON ({e}): {}",
                                        crate::http::snippet(data.as_bytes())
                                    ),
                                };
                                return Some((Err(e), st));
                            }
                        };
                        if let Some(err) = value.get("error") {
                            st.done = true;
                            let message = err
                                .get("message")
                                .and_then(Value::as_str)
                                .unwrap_or("upstream sent an error event")
                                .to_string();
                            let e = ProviderError::Stream {
                                provider: st.name.clone(),
                                message,
                            };
                            return Some((Err(e), st));
                        }
                        if sluice_core::chat::finish_reason(&value).is_some() {
                            st.finished = true;
                        }
                        let chunk = Chunk {
                            value,
                            raw: Some(data.to_string()),
                        };
                        return Some((Ok(chunk), st));
                    }
                }
            }
        });
        Ok(Box::pin(s))
    }
}

/// A 200 answer must still look like a completion: some upstreams report
/// errors with a success status.
/// Decodes an answer's bytes as a JSON tree and checks its shape; the bytes
/// are kept to be sent on unchanged.
pub(crate) fn completion_from_bytes(
    provider: &str,
    raw: bytes::Bytes,
) -> Result<Completion, ProviderError> {
    let value = parse_json(provider, &raw)?;
    check_completion(provider, &value)?;
    let usage = Usage::from_json(&value);
    Ok(Completion {
        body: value,
        raw: Some(raw),
        usage,
    })
}

fn check_completion(provider: &str, v: &Value) -> Result<(), ProviderError> {
    if let Some(err) = v.get("error") {
        return Err(ProviderError::Status {
            provider: provider.to_string(),
            status: 200,
            message: err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("error object in a 200 response")
                .to_string(),
            retry_after: None,
        });
    }
    if !v.get("choices").is_some_and(Value::is_array) {
        return Err(ProviderError::InvalidResponse {
            provider: provider.to_string(),
            message: "response has no `choices` array".into(),
        });
    }
    Ok(())
}

/// Expresses a whole completion as stream chunks (for upstreams that ignore
/// `stream: true`).
pub fn completion_as_chunks(v: &Value) -> Vec<Chunk> {
    let base = |choices: Value| {
        serde_json::json!({
            "id": v.get("id"),
            "object": "chat.completion.chunk",
            "created": v.get("created"),
            "model": v.get("model"),
            "choices": choices,
        })
    };
    let mut out = Vec::new();
    for c in v
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let idx = c.get("index").cloned().unwrap_or(Value::from(0));
        let msg = c.get("message").cloned().unwrap_or(Value::Null);
        let mut delta = serde_json::Map::new();
        delta.insert("role".into(), Value::from("assistant"));
        if let Some(t) = msg.get("content") {
            delta.insert("content".into(), t.clone());
        }
        if let Some(calls) = msg.get("tool_calls").and_then(Value::as_array) {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, tc)| {
                    let mut tc = tc.clone();
                    tc["index"] = Value::from(i);
                    tc
                })
                .collect();
            delta.insert("tool_calls".into(), Value::from(calls));
        }
        out.push(Chunk {
            value: base(serde_json::json!([{"index": idx, "delta": delta, "finish_reason": null}])),
            raw: None,
        });
        out.push(Chunk {
            value: base(serde_json::json!([{"index": idx, "delta": {}, "finish_reason": c.get("finish_reason")}])),
            raw: None,
        });
    }
    if let Some(u) = v.get("usage") {
        let mut last = base(serde_json::json!([]));
        last["usage"] = u.clone();
        out.push(Chunk {
            value: last,
            raw: None,
        });
    }
    out
}
