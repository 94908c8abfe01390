//! Reassembles a streamed chat completion from its chunks.
//!
//! The gateway forwards chunks as they arrive; alongside, it feeds each one to
//! a [`StreamAccumulator`] so the finished interaction can be recorded (and,
//! later, judged) as one `chat.completion` object.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::chat::Usage;

#[derive(Debug, Default, Clone)]
struct ToolCallAcc {
    id: Option<String>,
    name: String,
    arguments: String,
}

#[derive(Debug, Default, Clone)]
struct ChoiceAcc {
    role: Option<String>,
    content: String,
    has_content: bool,
    refusal: String,
    tool_calls: BTreeMap<u64, ToolCallAcc>,
    finish_reason: Option<String>,
}

/// Accumulates `chat.completion.chunk` objects.
#[derive(Debug, Default, Clone)]
pub struct StreamAccumulator {
    id: Option<String>,
    model: Option<String>,
    created: Option<i64>,
    choices: BTreeMap<u64, ChoiceAcc>,
    usage: Option<Usage>,
    chunks: u64,
}

impl StreamAccumulator {
    /// A fresh accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one chunk. Returns true when the chunk carried generated output
    /// (text, refusal or tool-call data), which is what time-to-first-token
    /// measures.
    pub fn push(&mut self, chunk: &Value) -> bool {
        self.chunks += 1;
        if self.id.is_none() {
            self.id = chunk.get("id").and_then(Value::as_str).map(str::to_string);
        }
        if self.model.is_none() {
            self.model = chunk
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        if self.created.is_none() {
            self.created = chunk.get("created").and_then(Value::as_i64);
        }
        if let Some(u) = Usage::from_json(chunk) {
            self.usage = Some(u);
        }
        let mut produced = false;
        for c in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let idx = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let acc = self.choices.entry(idx).or_default();
            if let Some(r) = c.get("finish_reason").and_then(Value::as_str) {
                acc.finish_reason = Some(r.to_string());
            }
            let Some(d) = c.get("delta") else { continue };
            if let Some(r) = d.get("role").and_then(Value::as_str) {
                acc.role = Some(r.to_string());
            }
            if let Some(t) = d.get("content").and_then(Value::as_str) {
                acc.has_content = true;
                if !t.is_empty() {
                    acc.content.push_str(t);
                    produced = true;
                }
            }
            if let Some(t) = d.get("refusal").and_then(Value::as_str) {
                if !t.is_empty() {
                    acc.refusal.push_str(t);
                    produced = true;
                }
            }
            for tc in d
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                produced = true;
                let ti = tc.get("index").and_then(Value::as_u64).unwrap_or(0);
                let t = acc.tool_calls.entry(ti).or_default();
                if let Some(id) = tc.get("id").and_then(Value::as_str) {
                    t.id = Some(id.to_string());
                }
                if let Some(f) = tc.get("function") {
                    if let Some(n) = f.get("name").and_then(Value::as_str) {
                        t.name.push_str(n);
                    }
                    if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                        t.arguments.push_str(a);
                    }
                }
            }
        }
        produced
    }

    /// Usage reported by the stream, if any chunk carried it.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Number of chunks seen.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The finish reason of the first choice, if the stream ended properly.
    pub fn finish_reason(&self) -> Option<&str> {
        self.choices
            .values()
            .find_map(|c| c.finish_reason.as_deref())
    }

    /// All generated text of the first choice so far.
    pub fn text(&self) -> &str {
        self.choices
            .values()
            .next()
            .map(|c| c.content.as_str())
            .unwrap_or("")
    }

    /// The stream so far as one `chat.completion` object.
    pub fn completion(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .map(|(i, c)| {
                let mut msg = serde_json::Map::new();
                msg.insert(
                    "role".into(),
                    json!(c.role.clone().unwrap_or_else(|| "assistant".into())),
                );
                msg.insert(
                    "content".into(),
                    if c.has_content || c.tool_calls.is_empty() {
                        json!(c.content)
                    } else {
                        Value::Null
                    },
                );
                if !c.refusal.is_empty() {
                    msg.insert("refusal".into(), json!(c.refusal));
                }
                if !c.tool_calls.is_empty() {
                    let calls: Vec<Value> = c
                        .tool_calls
                        .values()
                        .map(|t| {
                            json!({
                                "id": t.id,
                                "type": "function",
                                "function": {"name": t.name, "arguments": t.arguments}
                            })
                        })
                        .collect();
                    msg.insert("tool_calls".into(), json!(calls));
                }
                json!({"index": i, "message": msg, "finish_reason": c.finish_reason})
            })
            .collect();
        let mut out = json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = self.usage {
            out["usage"] = json!(u);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassembles_text_tool_calls_and_usage() {
        let mut a = StreamAccumulator::new();
        assert!(!a.push(&json!({"id":"c1","model":"m","created":1,"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]})));
        assert!(a.push(&json!({"choices":[{"index":0,"delta":{"content":"Hel"}}]})));
        assert!(a.push(&json!({"choices":[{"index":0,"delta":{"content":"lo"}}]})));
        assert!(a.push(&json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t1","type":"function","function":{"name":"get","arguments":""}}]}}]})));
        a.push(&json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}}]}));
        a.push(&json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}));
        a.push(&json!({"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}));
        a.push(&json!({"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}));
        let c = a.completion();
        assert_eq!(c["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            c["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(a.usage(), Some(Usage::new(5, 7)));
        assert_eq!(a.finish_reason(), Some("tool_calls"));
        assert_eq!(c["id"], "c1");
    }
}
