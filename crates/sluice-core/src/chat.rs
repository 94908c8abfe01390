//! OpenAI chat-completions wire types, and the checks sluice applies to a
//! request before it goes anywhere.
//!
//! The request type is strict at the top level and in messages, like OpenAI's
//! own API: an unknown argument is refused with its name rather than silently
//! dropped. Fields sluice does not interpret (tools, response_format, ...) are
//! kept as JSON and passed through untouched.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A rejected request: which parameter, and why. Rendered to clients as an
/// OpenAI `invalid_request_error` with `param` set.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    /// The offending parameter path (`messages[0].content`), if any.
    pub param: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl InvalidRequest {
    fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        InvalidRequest {
            param: Some(param.into()),
            message: message.into(),
        }
    }
}

/// `stop`: one string or up to four.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop sequence.
    One(String),
    /// Several stop sequences.
    Many(Vec<String>),
}

impl Stop {
    /// The stop sequences as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a final chunk carrying token usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Pass-through for upstreams that support stream obfuscation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_obfuscation: Option<bool>,
}

/// A message author.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System instructions.
    System,
    /// Developer instructions (newer name for system).
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool result.
    Tool,
    /// A legacy function result.
    Function,
}

/// Message content: a string or a list of typed parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts (`{"type":"text","text":...}`, `{"type":"image_url",...}`).
    Parts(Vec<Value>),
}

impl Content {
    /// All text in the content, parts joined by newlines.
    pub fn text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// A function call made by the assistant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments as a JSON-encoded string.
    #[serde(default)]
    pub arguments: String,
}

/// A tool call made by the assistant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Call id, echoed back by the tool message.
    pub id: String,
    /// Always `function` today.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The call.
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".to_string()
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its content (absent on assistant tool-call messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls made by the assistant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a tool message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// An assistant refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Legacy function call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<Value>,
    /// Audio reference on assistant messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<Value>,
}

impl Message {
    /// A system message with the given text.
    pub fn system(text: impl Into<String>) -> Self {
        Message {
            role: Role::System,
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: None,
            tool_call_id: None,
            refusal: None,
            function_call: None,
            audio: None,
        }
    }

    /// The message's text, empty when it has none.
    pub fn text(&self) -> String {
        self.content.as_ref().map(Content::text).unwrap_or_default()
    }
}

/// A `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// The deployment name (rewritten to the upstream model before forwarding).
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Stream the answer as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Legacy output token limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Output token limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// How the model chooses tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Allow several tool calls in one turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// Output format (`text`, `json_object`, `json_schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Number of choices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// End-user identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Free-form string metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Presence penalty, -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// Frequency penalty, -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Token biases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Value>,
    /// Return log-probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// How many alternatives per token with `logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// Upstream storage flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<bool>,
    /// Reasoning effort for reasoning models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    /// Service tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<String>,
    /// Output modalities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modalities: Option<Value>,
    /// Audio output settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<Value>,
    /// Predicted output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Value>,
    /// Output verbosity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verbosity: Option<String>,
    /// Web search options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_search_options: Option<Value>,
    /// Stable end-user identifier for safety systems.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_identifier: Option<String>,
    /// Prompt cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_key: Option<String>,
    /// Legacy functions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Value>,
    /// Legacy function choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<Value>,
}

impl ChatRequest {
    /// Parses and validates a request body.
    pub fn parse(body: &[u8]) -> Result<ChatRequest, InvalidRequest> {
        if let Some(req) = Self::parse_plain(body) {
            req.validate()?;
            return Ok(req);
        }
        Self::parse_careful(body)
    }

    /// The common body decoded in one pass, without a JSON tree: an object
    /// that decodes cleanly and whose messages carry no tool calls (tool
    /// calls skip unknown keys, which a direct pass would not check as
    /// strictly as the tree does). `None` sends the body the careful way,
    /// which accepts and rejects exactly what it always did and names the
    /// offending parameter.
    fn parse_plain(body: &[u8]) -> Option<ChatRequest> {
        let first = body
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
        if *first != b'{' {
            return None;
        }
        let req: ChatRequest = serde_json::from_slice(body).ok()?;
        req.messages
            .iter()
            .all(|m| m.tool_calls.is_none())
            .then_some(req)
    }

    /// Parses through a JSON tree, for precise errors.
    fn parse_careful(body: &[u8]) -> Result<ChatRequest, InvalidRequest> {
        let value: Value = serde_json::from_slice(body).map_err(|e| InvalidRequest {
            param: None,
            message: format!(
                "We could not parse the JSON body of your request: {e}. \
                 The body must be a JSON object."
            ),
        })?;
        Self::from_value(value)
    }

    /// Decodes and validates an already-parsed JSON value.
    pub fn from_value(value: Value) -> Result<ChatRequest, InvalidRequest> {
        let Value::Object(map) = value else {
            return Err(InvalidRequest {
                param: None,
                message: "The request body must be a JSON object.".to_string(),
            });
        };
        for required in ["model", "messages"] {
            if !map.contains_key(required) {
                return Err(InvalidRequest::new(
                    required,
                    format!("Missing required parameter: '{required}'."),
                ));
            }
        }
        let req: ChatRequest = match serde_path_to_error::deserialize(Value::Object(map)) {
            Ok(r) => r,
            Err(e) => return Err(describe_decode_error(&e)),
        };
        req.validate()?;
        Ok(req)
    }

    /// Range and shape checks serde cannot express.
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        if self.model.trim().is_empty() {
            return Err(InvalidRequest::new("model", "'model' must not be empty."));
        }
        if self.messages.is_empty() {
            return Err(InvalidRequest::new(
                "messages",
                "'messages' must contain at least one message.",
            ));
        }
        for (i, m) in self.messages.iter().enumerate() {
            match m.role {
                Role::Tool if m.tool_call_id.is_none() => {
                    return Err(InvalidRequest::new(
                        format!("messages[{i}].tool_call_id"),
                        format!("Missing required parameter: 'messages[{i}].tool_call_id'."),
                    ))
                }
                Role::System | Role::Developer | Role::User | Role::Tool if m.content.is_none() => {
                    return Err(InvalidRequest::new(
                        format!("messages[{i}].content"),
                        format!("Missing required parameter: 'messages[{i}].content'."),
                    ))
                }
                Role::Assistant
                    if m.content.is_none()
                        && m.tool_calls.is_none()
                        && m.function_call.is_none()
                        && m.refusal.is_none() =>
                {
                    return Err(InvalidRequest::new(
                        format!("messages[{i}].content"),
                        format!(
                            "Invalid value for 'messages[{i}]': an assistant message needs \
                             'content' or 'tool_calls'."
                        ),
                    ))
                }
                _ => {}
            }
            if let Some(Content::Parts(parts)) = &m.content {
                for (j, p) in parts.iter().enumerate() {
                    if p.get("type").and_then(Value::as_str).is_none() {
                        return Err(InvalidRequest::new(
                            format!("messages[{i}].content[{j}].type"),
                            format!(
                                "Missing required parameter: 'messages[{i}].content[{j}].type'."
                            ),
                        ));
                    }
                }
            }
        }
        range(self.temperature, "temperature", 0.0, 2.0)?;
        range(self.top_p, "top_p", 0.0, 1.0)?;
        range(self.presence_penalty, "presence_penalty", -2.0, 2.0)?;
        range(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)?;
        if let Some(n) = self.n {
            if !(1..=128).contains(&n) {
                return Err(InvalidRequest::new(
                    "n",
                    format!("Invalid 'n': integer above maximum value. Expected a value between 1 and 128, but got {n} instead."),
                ));
            }
        }
        for (name, v) in [
            ("max_tokens", self.max_tokens),
            ("max_completion_tokens", self.max_completion_tokens),
        ] {
            if v == Some(0) {
                return Err(InvalidRequest::new(
                    name,
                    format!("Invalid '{name}': expected a value of at least 1, but got 0 instead."),
                ));
            }
        }
        if let Some(Stop::Many(v)) = &self.stop {
            if v.len() > 4 {
                return Err(InvalidRequest::new(
                    "stop",
                    format!("Invalid 'stop': at most 4 stop sequences, got {}.", v.len()),
                ));
            }
        }
        if let Some(t) = self.top_logprobs {
            if t > 20 {
                return Err(InvalidRequest::new(
                    "top_logprobs",
                    format!("Invalid 'top_logprobs': expected a value between 0 and 20, but got {t} instead."),
                ));
            }
        }
        if self.stream_options.is_some() && self.stream != Some(true) {
            return Err(InvalidRequest::new(
                "stream_options",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            ));
        }
        if let Some(tools) = &self.tools {
            for (i, t) in tools.iter().enumerate() {
                let name = t
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str);
                if name.is_none_or(str::is_empty) {
                    return Err(InvalidRequest::new(
                        format!("tools[{i}].function.name"),
                        format!("Missing required parameter: 'tools[{i}].function.name'."),
                    ));
                }
            }
        }
        if let Some(m) = &self.metadata {
            if m.len() > 16 {
                return Err(InvalidRequest::new(
                    "metadata",
                    format!("Invalid 'metadata': at most 16 keys, got {}.", m.len()),
                ));
            }
        }
        Ok(())
    }

    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// Whether the client asked for a final usage chunk on a stream.
    pub fn wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The output token limit the client set, under either name.
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Text of the last user message (used by the simulator and in listings).
    pub fn last_user_text(&self) -> String {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(Message::text)
            .unwrap_or_default()
    }

    /// Fills parameters the client left unset from a variant's defaults.
    ///
    /// Defaults are JSON values checked at config time to name known
    /// parameters; a default whose type does not fit is reported, not ignored.
    pub fn apply_defaults(&mut self, params: &Map<String, Value>) -> Result<(), InvalidRequest> {
        if params.is_empty() {
            return Ok(());
        }
        let mut current = serde_json::to_value(&*self).map_err(|e| InvalidRequest {
            param: None,
            message: format!("internal: could not re-encode request: {e}"),
        })?;
        let Some(obj) = current.as_object_mut() else {
            return Ok(());
        };
        let mut changed = false;
        for (k, v) in params {
            let unset = obj.get(k).is_none_or(Value::is_null);
            if unset {
                obj.insert(k.clone(), v.clone());
                changed = true;
            }
        }
        if changed {
            *self = serde_json::from_value(current).map_err(|e| InvalidRequest {
                param: None,
                message: format!("variant default parameters do not fit the request: {e}"),
            })?;
        }
        Ok(())
    }
}

fn range(v: Option<f64>, name: &str, lo: f64, hi: f64) -> Result<(), InvalidRequest> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(InvalidRequest::new(
            name,
            format!(
                "Invalid '{name}': expected a value between {lo} and {hi}, but got {x} instead."
            ),
        )),
        _ => Ok(()),
    }
}

fn describe_decode_error(e: &serde_path_to_error::Error<serde_json::Error>) -> InvalidRequest {
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    // serde: "unknown field `foo`, expected one of ..."
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default();
        let param = if path == "." || path.is_empty() {
            field.to_string()
        } else if path.ends_with(field) {
            path.clone()
        } else {
            format!("{path}.{field}")
        };
        return InvalidRequest::new(
            param.clone(),
            format!("Unrecognized request argument supplied: {param}"),
        );
    }
    let param = if path == "." {
        None
    } else {
        Some(path.clone())
    };
    let what = param.clone().unwrap_or_else(|| "body".to_string());
    let detail = if inner.contains("did not match any variant of untagged enum Content") {
        "expected a string or an array of content parts".to_string()
    } else if inner.contains("did not match any variant of untagged enum Stop") {
        "expected a string or an array of strings".to_string()
    } else if let Some(rest) = inner.strip_prefix("unknown variant `") {
        let v = rest.split('`').next().unwrap_or_default();
        let expected = rest.split("expected one of ").nth(1).unwrap_or_default();
        format!("unsupported value '{v}' (expected one of {expected})")
    } else {
        // serde_json appends " at line X column Y" to some messages.
        inner
            .split(" at line ")
            .next()
            .unwrap_or(&inner)
            .to_string()
    };
    InvalidRequest {
        param,
        message: format!("Invalid '{what}': {detail}."),
    }
}

/// Token counts reported by a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens.
    pub prompt_tokens: u64,
    /// Output tokens.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
}

impl Usage {
    /// Builds a usage record from input and output counts.
    pub fn new(prompt: u64, completion: u64) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }

    /// Reads `usage` from a completion or chunk object, if present.
    pub fn from_json(v: &Value) -> Option<Usage> {
        let u = v.get("usage")?;
        if u.is_null() {
            return None;
        }
        let p = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
        let c = u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        Some(Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: u
                .get("total_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(p + c),
        })
    }
}

/// The first choice's `finish_reason` in a completion object.
pub fn finish_reason(v: &Value) -> Option<String> {
    v.get("choices")?
        .as_array()?
        .iter()
        .find_map(|c| c.get("finish_reason").and_then(Value::as_str))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn malformed_json_is_rejected_even_inside_fields_sluice_ignores() {
        // Nested objects tolerate unknown keys, but their values must still
        // be valid JSON: a decoder that skips them unchecked would let these
        // through.
        let body = |extra: &[u8]| {
            let mut b = br#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"},"x":"#.to_vec();
            b.extend_from_slice(extra);
            b.extend_from_slice(b"}]}]}");
            b
        };
        assert!(ChatRequest::parse(&body(b"1")).is_ok());
        for bad in [&b"1e400"[..], b"-1e999", br#""\ud800""#, b"\"\x80\""] {
            let e = ChatRequest::parse(&body(bad)).expect_err("malformed JSON");
            assert!(
                e.message.contains("could not parse the JSON body"),
                "{}",
                e.message
            );
        }
    }

    fn parse(v: Value) -> Result<ChatRequest, InvalidRequest> {
        ChatRequest::from_value(v)
    }

    #[test]
    fn accepts_a_full_request() {
        let r = parse(json!({
            "model": "support",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ],
            "temperature": 0.3, "top_p": 1, "max_tokens": 10, "max_completion_tokens": 12,
            "stop": ["x"], "seed": 1, "n": 1, "user": "u1", "metadata": {"tier": "beta"},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": "auto", "response_format": {"type": "json_object"},
            "stream": true, "stream_options": {"include_usage": true}
        }))
        .expect("valid");
        assert!(r.is_stream() && r.wants_stream_usage());
        assert_eq!(r.max_output_tokens(), Some(12));
        assert_eq!(r.last_user_text(), "hi");
    }

    #[test]
    fn unknown_arguments_are_named() {
        let e = parse(
            json!({"model": "m", "messages": [{"role":"user","content":"x"}], "temprature": 1}),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temprature"));
        assert_eq!(
            e.message,
            "Unrecognized request argument supplied: temprature"
        );
        let e =
            parse(json!({"model": "m", "messages": [{"role":"user","content":"x","colour":1}]}))
                .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].colour"), "{e:?}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let base = || json!({"model": "m", "messages": [{"role":"user","content":"x"}]});
        let mut v = base();
        v["temperature"] = json!(3);
        assert_eq!(parse(v).unwrap_err().param.as_deref(), Some("temperature"));
        let mut v = base();
        v["temperature"] = json!("hot");
        let e = parse(v).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("invalid type"), "{e:?}");
        let mut v = base();
        v["messages"][0]["role"] = json!("robot");
        let e = parse(v).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"), "{e:?}");
        assert!(e.message.contains("'robot'"), "{e:?}");
        let mut v = base();
        v["messages"][0]["content"] = json!(5);
        let e = parse(v).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"), "{e:?}");
        let e = parse(json!({"model": "m"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = parse(json!({"model": "m", "messages": []})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let mut v = base();
        v["stream_options"] = json!({"include_usage": true});
        assert_eq!(
            parse(v).unwrap_err().param.as_deref(),
            Some("stream_options")
        );
        let mut v = base();
        v["n"] = json!(0);
        assert_eq!(parse(v).unwrap_err().param.as_deref(), Some("n"));
    }

    #[test]
    fn malformed_json_is_reported() {
        let e = ChatRequest::parse(b"{\"model\": ").unwrap_err();
        assert!(e.param.is_none());
        assert!(e.message.contains("could not parse the JSON body"), "{e:?}");
        let e = ChatRequest::parse(b"[1,2]").unwrap_err();
        assert!(e.message.contains("JSON object"));
        // An array in a request's field order is still not a request.
        let e = ChatRequest::parse(br#" ["m",[{"role":"user","content":"hi"}]]"#).unwrap_err();
        assert!(e.message.contains("JSON object"), "{e:?}");
    }

    #[test]
    fn defaults_fill_only_unset_parameters() {
        let mut r = parse(
            json!({"model": "m", "messages": [{"role":"user","content":"x"}], "temperature": 0.9}),
        )
        .expect("valid");
        let mut d = Map::new();
        d.insert("temperature".into(), json!(0.1));
        d.insert("max_tokens".into(), json!(64));
        r.apply_defaults(&d).expect("fits");
        assert_eq!(r.temperature, Some(0.9));
        assert_eq!(r.max_tokens, Some(64));
    }

    #[test]
    fn usage_and_finish_reason_are_read() {
        let v = json!({"choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}});
        assert_eq!(Usage::from_json(&v), Some(Usage::new(3, 4)));
        assert_eq!(finish_reason(&v).as_deref(), Some("stop"));
    }

    /// Request keys, known and unknown.
    const REQUEST_KEYS: &[&str] = &[
        "model",
        "model",
        "messages",
        "messages",
        "messages",
        "stream",
        "temperature",
        "max_tokens",
        "n",
        "stop",
        "tools",
        "metadata",
        "user",
        "x",
    ];

    /// A JSON value text: scalars (some out of range or malformed), and
    /// message lists whose messages may carry tool calls with unknown keys.
    fn json_piece() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let scalar = proptest::sample::select(vec![
            "\"m\"",
            "\" \"",
            "1",
            "-1",
            "0.5",
            "1e400",
            "null",
            "true",
            "[]",
            "{}",
            "[\"a\",\"b\"]",
            "{\"k\":\"v\"}",
            "{\"k\":1}",
            "\"\\ud800\"",
            "\"\\u00e9\"",
        ])
        .prop_map(str::to_string);
        prop_oneof![
            scalar,
            proptest::collection::vec(message_piece(), 0..3)
                .prop_map(|m| format!("[{}]", m.join(","))),
        ]
    }

    /// A message object's text, sometimes with tool calls that carry
    /// unknown keys (some holding out-of-range or malformed values).
    fn message_piece() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        (
            proptest::sample::select(vec!["user", "assistant", "tool", "system", "x"]),
            proptest::sample::select(vec![
                "",
                ",\"content\":\"hi\"",
                ",\"content\":null",
                ",\"content\":1",
                ",\"content\":[{\"type\":\"text\",\"text\":\"a\"}]",
                ",\"content\":\"a\",\"content\":\"b\"",
                ",\"tool_call_id\":\"c\"",
                ",\"extra\":1",
            ]),
            proptest::sample::select(vec![
                "",
                ",\"tool_calls\":[{\"id\":\"c\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]",
                ",\"tool_calls\":[{\"id\":\"c\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"},\"x\":1e400}]",
                ",\"tool_calls\":[{\"id\":\"c\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\",\"y\":\"\\ud800\"}}]",
            ]),
        )
            .prop_map(|(role, rest, calls)| format!("{{\"role\":\"{role}\"{rest}{calls}}}"))
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the parser; they yield a request or a
        /// clear error.
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = ChatRequest::parse(&bytes);
        }

        /// The one-pass decoding accepts exactly what the careful one does,
        /// with the same result, and otherwise gives the careful error.
        #[test]
        fn one_pass_parse_agrees_with_the_careful_one(
            lead in "[ \t\n]{0,2}",
            model in proptest::sample::select(vec!["\"m\"", "\"m\"", "\" \"", "1"]),
            messages in proptest::collection::vec(message_piece(), 0..3),
            extra in proptest::collection::vec(
                (proptest::sample::select(REQUEST_KEYS), json_piece()),
                0..4,
            ),
        ) {
            let mut fields = vec![
                format!("\"model\":{model}"),
                format!("\"messages\":[{}]", messages.join(",")),
            ];
            fields.extend(extra.iter().map(|(k, v)| format!("\"{k}\":{v}")));
            let body = format!("{lead}{{{}}}", fields.join(","));
            proptest::prop_assert_eq!(
                ChatRequest::parse(body.as_bytes()),
                ChatRequest::parse_careful(body.as_bytes()),
                "{}",
                body
            );
        }

        /// Arbitrary JSON-ish structures never panic the decoder.
        #[test]
        fn decoder_never_panics(s in "\\{\"model\":\"m\",\"messages\":\\[\\{\"role\":\"(user|tool|assistant|x)\",\"content\":(\"a\"|1|null|\\[\\{\\}\\])\\}\\](,\"n\":(0|1|-1|\"x\"))?\\}") {
            let _ = ChatRequest::parse(s.as_bytes());
        }
    }
}
