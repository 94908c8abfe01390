//! The `simulated` provider: a stand-in model for demos and tests. It makes
//! no network calls and says so in every response (`system_fingerprint` is
//! `sluice-simulated`).
//!
//! Everything it produces is a pure function of (provider seed, model,
//! messages, request `seed`): the same request always gets the same text,
//! latency, error or refusal. Across different prompts the configured rates
//! hold: latency is lognormal with the configured median and 99th
//! percentile, and `error_rate`, `refusal_rate`, `pii_rate` and
//! `tool_call_rate` are the shares of requests that fail, refuse, leak
//! PII-like strings, or call a tool.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_core::chat::{ChatRequest, Usage};
use sluice_core::config::SimulatedConfig;
use sluice_core::splitmix::SplitMix64 as Rng;

use crate::{now_secs, Chunk, ChunkStream, Completion, ProviderError};

/// The simulator.
#[derive(Debug, Clone)]
pub struct SimulatedProvider {
    name: String,
    cfg: SimulatedConfig,
}

/// The simulation's generator, plus picking from a list.
trait Pick {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T;
}

impl Pick for Rng {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next_u64() % items.len() as u64) as usize]
    }
}

/// FNV-1a 64-bit over several byte strings.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

const OPENERS: &[&str] = &[
    "Thanks for reaching out.",
    "Happy to help with that.",
    "Good question.",
    "Here is what I found.",
    "Let me walk you through it.",
];
const WORDS: &[&str] = &[
    "your", "account", "order", "request", "settings", "page", "support", "team", "update",
    "refund", "billing", "details", "option", "menu", "first", "then", "next", "simply", "open",
    "select", "confirm", "review", "within", "days", "usually", "please", "check", "the", "a",
    "and", "to", "of", "in", "for", "you", "can", "will", "should", "this", "that", "it", "is",
    "be", "from", "with", "after", "before", "once", "help", "status",
];
const REFUSALS: &[&str] = &[
    "I'm sorry, but I can't help with that request.",
    "I can't assist with that.",
    "I'm unable to help with this request.",
];
const LEAKS: &[&str] = &[
    "You can also contact Jane Doe directly at jane.doe@example.com or +1 415-555-0134.",
    "The customer on file is John Smith, SSN 123-45-6789, card 4111 1111 1111 1111.",
    "Reach our agent Maria at maria.rossi@example.org, phone +44 20 7946 0958.",
];

/// Rough token count: one token per four characters, at least one.
pub fn approx_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

struct Plan {
    latency: Duration,
    error: bool,
    choices: Vec<(String, Option<Value>, &'static str)>,
    usage: Usage,
}

impl SimulatedProvider {
    /// A simulator with the given settings.
    pub fn new(name: &str, cfg: SimulatedConfig) -> Self {
        SimulatedProvider {
            name: name.to_string(),
            cfg,
        }
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn rng(&self, req: &ChatRequest, salt: &[u8]) -> Rng {
        let msgs = serde_json::to_vec(&req.messages).unwrap_or_default();
        let seed = req.seed.unwrap_or(0).to_le_bytes();
        Rng(fnv(&[
            &self.cfg.seed.to_le_bytes(),
            req.model.as_bytes(),
            &msgs,
            &seed,
            salt,
        ]))
    }

    fn latency(&self, rng: &mut Rng) -> Duration {
        let m = self.cfg.latency.median_ms.max(0.0);
        if m == 0.0 {
            return Duration::ZERO;
        }
        let sigma = (self.cfg.latency.p99_ms.max(m) / m).ln() / 2.326_347_874;
        let ms = (m.ln() + sigma * rng.normal()).exp();
        Duration::from_secs_f64((ms / 1000.0).min(600.0))
    }

    fn plan(&self, req: &ChatRequest) -> Plan {
        let mut rng = self.rng(req, b"plan");
        let latency = self.latency(&mut rng);
        let error = rng.unit() < self.cfg.error_rate;
        let n = req.n.unwrap_or(1).max(1);
        let mut choices = Vec::new();
        let mut out_tokens = 0;
        for i in 0..n {
            let mut r = self.rng(req, &i.to_le_bytes());
            let (text, call, finish) = self.answer(req, &mut r);
            out_tokens += approx_tokens(&text)
                + call
                    .as_ref()
                    .map(|c| approx_tokens(&c.to_string()))
                    .unwrap_or(0);
            choices.push((text, call, finish));
        }
        let prompt: String = req
            .messages
            .iter()
            .map(|m| m.text())
            .collect::<Vec<_>>()
            .join(" ");
        Plan {
            latency,
            error,
            choices,
            usage: Usage::new(
                approx_tokens(&prompt) + 3 * req.messages.len() as u64,
                out_tokens,
            ),
        }
    }

    /// One choice: (text, tool call, finish reason).
    fn answer(&self, req: &ChatRequest, rng: &mut Rng) -> (String, Option<Value>, &'static str) {
        let tool_choice = req.tool_choice.as_ref();
        let tools = req.tools.as_deref().unwrap_or(&[]);
        let forced = tool_choice.is_some_and(|c| c == "required" || c.is_object());
        let allowed = !tools.is_empty() && tool_choice.is_none_or(|c| c != "none");
        let roll_tool = rng.unit() < self.cfg.tool_call_rate;
        if allowed && (forced || roll_tool) {
            let named = tool_choice
                .and_then(|c| c.get("function"))
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            let tool = named
                .and_then(|n| tools.iter().find(|t| t["function"]["name"] == n))
                .unwrap_or(&tools[0]);
            let f = &tool["function"];
            let mut args = serde_json::Map::new();
            if let Some(props) = f["parameters"]["properties"].as_object() {
                for (k, schema) in props {
                    let v = match schema["type"].as_str() {
                        Some("integer") => json!(rng.next_u64() % 100),
                        Some("number") => json!((rng.unit() * 100.0).round() / 10.0),
                        Some("boolean") => json!(rng.unit() < 0.5),
                        Some("array") => json!([]),
                        Some("object") => json!({}),
                        _ => match schema["enum"].as_array() {
                            Some(e) if !e.is_empty() => rng.pick(e).clone(),
                            _ => json!(format!("sample-{k}")),
                        },
                    };
                    args.insert(k.clone(), v);
                }
            }
            let id = format!("call_{:016x}", rng.next_u64());
            let call = json!({"id": id, "type": "function",
                "function": {"name": f["name"], "arguments": Value::Object(args).to_string()}});
            return (String::new(), Some(call), "tool_calls");
        }
        if rng.unit() < self.cfg.refusal_rate {
            return (rng.pick(REFUSALS).to_string(), None, "stop");
        }
        let words = ((40.0 * self.cfg.verbosity) * (0.5 + rng.unit()))
            .round()
            .max(3.0) as usize;
        let mut text = rng.pick(OPENERS).to_string();
        let topic = req.last_user_text();
        let topic: String = topic
            .split_whitespace()
            .take(6)
            .collect::<Vec<_>>()
            .join(" ");
        if !topic.is_empty() {
            text.push_str(&format!(" About \"{topic}\":"));
        }
        for i in 0..words {
            text.push(' ');
            text.push_str(rng.pick::<&str>(WORDS));
            if i % 12 == 11 {
                text.push('.');
            }
        }
        text.push('.');
        if rng.unit() < self.cfg.pii_rate {
            text.push(' ');
            text.push_str(rng.pick::<&str>(LEAKS));
        }
        let mut finish = "stop";
        if let Some(stop) = &req.stop {
            for s in stop.to_vec() {
                if let Some(p) = text.find(&s).filter(|_| !s.is_empty()) {
                    text.truncate(p);
                }
            }
        }
        if let Some(max) = req.max_output_tokens() {
            let max_chars = (max as usize) * 4;
            if text.chars().count() > max_chars {
                text = text.chars().take(max_chars).collect();
                finish = "length";
            }
        }
        (text, None, finish)
    }

    fn id(&self, req: &ChatRequest) -> String {
        format!("chatcmpl-sim-{:016x}", self.rng(req, b"id").next_u64())
    }

    fn error(&self) -> ProviderError {
        ProviderError::Status {
            provider: self.name.clone(),
            status: 500,
            message: "simulated upstream error (error_rate)".into(),
            retry_after: None,
        }
    }

    /// A non-streamed completion after the simulated latency.
    pub async fn complete(&self, req: &ChatRequest) -> Result<Completion, ProviderError> {
        let plan = self.plan(req);
        tokio::time::sleep(plan.latency).await;
        if plan.error {
            return Err(self.error());
        }
        let choices: Vec<Value> = plan
            .choices
            .iter()
            .enumerate()
            .map(|(i, (text, call, finish))| {
                let mut msg = json!({"role": "assistant", "content": if call.is_some() { Value::Null } else { json!(text) }, "refusal": null});
                if let Some(c) = call {
                    msg["tool_calls"] = json!([c]);
                }
                json!({"index": i, "message": msg, "logprobs": null, "finish_reason": finish})
            })
            .collect();
        Ok(Completion::from_value(json!({
            "id": self.id(req),
            "object": "chat.completion",
            "created": now_secs(),
            "model": req.model,
            "system_fingerprint": "sluice-simulated",
            "choices": choices,
            "usage": plan.usage,
        })))
    }

    /// A streamed completion: the first token after about a third of the
    /// simulated latency, the rest spread evenly.
    pub async fn stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let plan = self.plan(req);
        let ttft = plan.latency.mul_f64(0.35);
        tokio::time::sleep(ttft).await;
        if plan.error {
            return Err(self.error());
        }
        let id = self.id(req);
        let created = now_secs();
        let model = req.model.clone();
        let chunk = |choices: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "system_fingerprint": "sluice-simulated", "choices": choices})
        };
        let mut chunks: Vec<Value> = Vec::new();
        for (i, (text, call, _)) in plan.choices.iter().enumerate() {
            chunks.push(chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])));
            if let Some(c) = call {
                let mut head = c.clone();
                head["index"] = json!(0);
                let args = head["function"]["arguments"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                head["function"]["arguments"] = json!("");
                chunks.push(chunk(
                    json!([{"index": i, "delta": {"tool_calls": [head]}, "finish_reason": null}]),
                ));
                chunks.push(chunk(json!([{"index": i, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": args}}]}, "finish_reason": null}])));
            } else {
                let mut piece = String::new();
                for (k, w) in text.split_inclusive(' ').enumerate() {
                    piece.push_str(w);
                    if k % 3 == 2 {
                        chunks.push(chunk(json!([{"index": i, "delta": {"content": piece}, "finish_reason": null}])));
                        piece = String::new();
                    }
                }
                if !piece.is_empty() {
                    chunks.push(chunk(
                        json!([{"index": i, "delta": {"content": piece}, "finish_reason": null}]),
                    ));
                }
            }
        }
        for (i, (_, _, finish)) in plan.choices.iter().enumerate() {
            chunks.push(chunk(
                json!([{"index": i, "delta": {}, "finish_reason": finish}]),
            ));
        }
        let mut last = chunk(json!([]));
        last["usage"] = json!(plan.usage);
        chunks.push(last);
        let gap = plan
            .latency
            .saturating_sub(ttft)
            .checked_div(chunks.len().max(1) as u32)
            .unwrap_or_default();
        let s = futures_util::stream::unfold(
            (chunks.into_iter(), true),
            move |(mut it, first)| async move {
                let v = it.next()?;
                if !first && !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
                Some((
                    Ok(Chunk {
                        value: v,
                        raw: None,
                    }),
                    (it, false),
                ))
            },
        );
        Ok(Box::pin(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use sluice_core::config::LatencyConfig;

    fn sim(error_rate: f64, refusal_rate: f64, pii_rate: f64) -> SimulatedProvider {
        SimulatedProvider::new(
            "sim",
            SimulatedConfig {
                seed: 7,
                latency: LatencyConfig {
                    median_ms: 0.0,
                    p99_ms: 0.0,
                },
                error_rate,
                pii_rate,
                refusal_rate,
                verbosity: 1.0,
                tool_call_rate: 0.0,
            },
        )
    }

    fn req(text: &str) -> ChatRequest {
        ChatRequest::from_value(
            json!({"model":"sim-1","messages":[{"role":"user","content":text}]}),
        )
        .expect("valid")
    }

    #[tokio::test]
    async fn same_prompt_same_answer() {
        let s = sim(0.0, 0.0, 0.0);
        let a = s.complete(&req("hello")).await.expect("ok");
        let b = s.complete(&req("hello")).await.expect("ok");
        let c = s.complete(&req("other")).await.expect("ok");
        assert_eq!(a.body["choices"], b.body["choices"]);
        assert_ne!(a.body["choices"], c.body["choices"]);
        assert!(a.usage.expect("usage").completion_tokens > 0);
    }

    #[tokio::test]
    async fn rates_hold_across_prompts() {
        let s = sim(0.2, 0.0, 0.0);
        let mut errors = 0;
        for i in 0..2000 {
            if s.complete(&req(&format!("q{i}"))).await.is_err() {
                errors += 1;
            }
        }
        assert!((300..=500).contains(&errors), "errors {errors}");
        let s = sim(0.0, 0.5, 0.0);
        let mut refusals = 0;
        for i in 0..1000 {
            let c = s.complete(&req(&format!("q{i}"))).await.expect("ok");
            if REFUSALS
                .iter()
                .any(|r| c.body["choices"][0]["message"]["content"] == *r)
            {
                refusals += 1;
            }
        }
        assert!((420..=580).contains(&refusals), "refusals {refusals}");
    }

    #[test]
    fn latency_follows_median_and_p99() {
        let mut cfg = sim(0.0, 0.0, 0.0).cfg;
        cfg.latency = LatencyConfig {
            median_ms: 100.0,
            p99_ms: 400.0,
        };
        let s = SimulatedProvider::new("sim", cfg);
        let mut v: Vec<f64> = (0..20000)
            .map(|i| s.plan(&req(&format!("p{i}"))).latency.as_secs_f64() * 1000.0)
            .collect();
        v.sort_by(f64::total_cmp);
        let p50 = v[10000];
        let p99 = v[19800];
        assert!((90.0..110.0).contains(&p50), "p50 {p50}");
        assert!((340.0..460.0).contains(&p99), "p99 {p99}");
    }

    #[tokio::test]
    async fn stream_matches_completion_and_reports_usage() {
        let s = sim(0.0, 0.0, 1.0);
        let full = s.complete(&req("hi")).await.expect("ok");
        let mut st = s.stream(&req("hi")).await.expect("ok");
        let mut acc = sluice_core::stream::StreamAccumulator::new();
        while let Some(c) = st.next().await {
            acc.push(&c.expect("chunk").value);
        }
        assert_eq!(
            acc.text(),
            full.body["choices"][0]["message"]["content"]
                .as_str()
                .expect("text")
        );
        assert!(acc.text().contains('@') || acc.text().contains("SSN"));
        assert_eq!(acc.usage(), full.usage);
    }

    #[tokio::test]
    async fn tools_are_called_when_required() {
        let s = sim(0.0, 0.0, 0.0);
        let r = ChatRequest::from_value(json!({"model":"sim-1","messages":[{"role":"user","content":"weather"}],
            "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}],
            "tool_choice":"required"})).expect("valid");
        let c = s.complete(&r).await.expect("ok");
        assert_eq!(c.body["choices"][0]["finish_reason"], "tool_calls");
        let args: Value = serde_json::from_str(
            c.body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .expect("str"),
        )
        .expect("json");
        assert_eq!(args["city"], "sample-city");
    }
}
