//! The constitution on the request path: the input phase (before the
//! upstream is called) and the output phase (non-streamed answers; streams
//! are guarded chunk by chunk in `pipeline`). Every verdict is logged for the
//! request's record.

use std::collections::BTreeSet;
use std::time::Instant;

use axum::http::StatusCode;
use serde_json::{json, Value};
use sluice_core::chat::{ChatRequest, Content, Role};
use sluice_core::config::{Applies, PolicyAction};
use sluice_core::policy::{redact, Constitution, Finding};

use crate::error::ApiError;

/// Verdicts collected for one request.
#[derive(Debug, Default, Clone)]
pub struct PolicyLog {
    /// Findings as recorded (JSON objects).
    pub findings: Vec<Value>,
    /// Principles that fired.
    pub fired: BTreeSet<String>,
}

impl PolicyLog {
    /// Logs findings of one check, with how long the check took.
    pub fn add(&mut self, findings: &[Finding], micros: u64, message: Option<usize>) {
        for f in findings {
            self.fired.insert(f.principle.clone());
            let mut v = json!(f);
            v["check_us"] = json!(micros);
            if let Some(m) = message {
                v["message_index"] = json!(m);
            }
            self.findings.push(v);
        }
    }

    /// The record's `policy` column.
    pub fn to_record(&self) -> Option<String> {
        (!self.findings.is_empty()).then(|| Value::Array(self.findings.clone()).to_string())
    }

    /// The `x-sluice-policy` header value.
    pub fn header(&self) -> Option<String> {
        (!self.fired.is_empty()).then(|| self.fired.iter().cloned().collect::<Vec<_>>().join(","))
    }
}

/// The 400 answer for a blocked input.
pub fn violation(f: &Finding) -> ApiError {
    let labels: BTreeSet<&str> = f.spans.iter().map(|s| s.label.as_str()).collect();
    ApiError {
        status: StatusCode::BAD_REQUEST,
        kind: "invalid_request_error",
        message: format!(
            "Request blocked by principle `{}` ({} detector: {}).",
            f.principle,
            f.detector,
            labels.into_iter().collect::<Vec<_>>().join(", ")
        ),
        param: Some("messages".into()),
        code: Some("policy_violation"),
        retry_after: None,
        record_kind: "policy_violation",
    }
}

/// Phase: input policy. Checks every non-assistant message; a `block`
/// principle refuses the request (the upstream is never called), `redact`
/// rewrites the message, `flag` and `escalate` are logged.
pub fn check_input(
    c: &Constitution,
    req: &mut ChatRequest,
    log: &mut PolicyLog,
) -> Result<(), ApiError> {
    if !c.applies(Applies::Input) {
        return Ok(());
    }
    for (i, m) in req.messages.iter_mut().enumerate() {
        if m.role == Role::Assistant {
            continue;
        }
        match &mut m.content {
            Some(Content::Text(t)) => {
                if let Some(r) = check_input_text(c, t, i, log)? {
                    *t = r;
                }
            }
            Some(Content::Parts(parts)) => {
                for p in parts.iter_mut() {
                    let Some(t) = p.get("text").and_then(Value::as_str) else {
                        continue;
                    };
                    if let Some(r) = check_input_text(c, t, i, log)? {
                        p["text"] = json!(r);
                    }
                }
            }
            None => {}
        }
    }
    Ok(())
}

/// Checks one piece of input text (message `i`): a block refuses the
/// request; a redaction returns the rewritten text.
fn check_input_text(
    c: &Constitution,
    text: &str,
    i: usize,
    log: &mut PolicyLog,
) -> Result<Option<String>, ApiError> {
    let started = Instant::now();
    let findings = c.check(Applies::Input, text);
    log.add(&findings, started.elapsed().as_micros() as u64, Some(i));
    if let Some(b) = findings.iter().find(|f| f.action == PolicyAction::Block) {
        return Err(violation(b));
    }
    Ok(findings
        .iter()
        .any(|f| f.action == PolicyAction::Redact)
        .then(|| redact(text, &findings)))
}

/// Phase: output policy on a whole completion. Returns whether the body was
/// changed (blocked answers are replaced by the principle's message with
/// `finish_reason: "content_filter"`; redactions rewrite the content).
pub fn check_output(c: &Constitution, body: &mut Value, log: &mut PolicyLog) -> bool {
    if !c.applies(Applies::Output) {
        return false;
    }
    let mut changed = false;
    let Some(choices) = body.get_mut("choices").and_then(Value::as_array_mut) else {
        return false;
    };
    for choice in choices {
        let Some(text) = choice["message"]["content"].as_str().map(str::to_string) else {
            continue;
        };
        let started = Instant::now();
        let findings = c.check(Applies::Output, &text);
        log.add(&findings, started.elapsed().as_micros() as u64, None);
        if let Some(b) = findings.iter().find(|f| f.action == PolicyAction::Block) {
            refuse(choice, &principle_message(c, &b.principle));
            changed = true;
        } else if findings.iter().any(|f| f.action == PolicyAction::Redact) {
            choice["message"]["content"] = json!(redact(&text, &findings));
            changed = true;
        }
    }
    changed
}

/// The output check of an answer kept as its bytes, on its choices' texts
/// (`None`: a choice without text). True when the answer can go out
/// unchanged: no principle blocks or redacts any text and none calls out;
/// the findings are then logged as [`check_output`] logs them. False (and
/// nothing logged) when the answer must be decoded and go through
/// [`check_completion`].
pub fn check_output_texts(c: &Constitution, texts: &[Option<String>], log: &mut PolicyLog) -> bool {
    if !c.applies(Applies::Output) {
        return true;
    }
    if has_external(c, Applies::Output) {
        return false;
    }
    let mut checked = Vec::new();
    for text in texts.iter().flatten() {
        let started = Instant::now();
        let findings = c.check(Applies::Output, text);
        let micros = started.elapsed().as_micros() as u64;
        if findings
            .iter()
            .any(|f| matches!(f.action, PolicyAction::Block | PolicyAction::Redact))
        {
            return false;
        }
        if !findings.is_empty() {
            checked.push((findings, micros));
        }
    }
    for (findings, micros) in checked {
        log.add(&findings, micros, None);
    }
    true
}

/// Phase: every output principle on a whole completion, the detectors that
/// call out included (skipped when a synchronous `block` already replaced
/// the answer). Returns whether the body was changed.
pub async fn check_completion(
    ext: &External,
    snap: &crate::snapshot::Snapshot,
    c: &Constitution,
    body: &mut Value,
    log: &mut PolicyLog,
) -> bool {
    let mut changed = check_output(c, body, log);
    let blocked = body["choices"][0]["finish_reason"] == "content_filter";
    if !blocked && has_external(c, Applies::Output) {
        let started = Instant::now();
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let found = check_external(ext, snap, c, Applies::Output, &text).await;
        log.add(&found, started.elapsed().as_micros() as u64, None);
        if let Some(b) = found.iter().find(|f| f.action == PolicyAction::Block) {
            block_answer(c, body, &b.principle);
            changed = true;
        }
    }
    changed
}

/// Whether any principle at `stage` has a detector that calls out.
pub fn has_external(c: &Constitution, stage: Applies) -> bool {
    c.principles.iter().filter(|p| p.applies(stage)).any(|p| {
        p.detectors
            .iter()
            .any(|d| matches!(d, sluice_core::policy::Compiled::External(_)))
    })
}

/// The text the input checks judge as a whole: every non-assistant message.
pub fn input_text(req: &ChatRequest) -> String {
    req.messages
        .iter()
        .filter(|m| m.role != Role::Assistant)
        .map(|m| m.text())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Replaces every choice's message by the blocking principle's message.
pub fn block_answer(c: &Constitution, body: &mut Value, principle: &str) {
    let message = principle_message(c, principle);
    if let Some(choices) = body.get_mut("choices").and_then(Value::as_array_mut) {
        for choice in choices {
            refuse(choice, &message);
        }
    }
}

/// The answer a principle serves when it blocks an output.
fn principle_message(c: &Constitution, principle: &str) -> String {
    c.principles
        .iter()
        .find(|p| p.config.id == principle)
        .map(|p| p.config.message.clone())
        .unwrap_or_default()
}

/// Replaces a choice's message by a refusal ending in `content_filter`.
fn refuse(choice: &mut Value, message: &str) {
    choice["message"] = json!({"role": "assistant", "content": message, "refusal": null});
    choice["finish_reason"] = json!("content_filter");
}

/// The per-principle flags the rollout gates see (`flag_rate:PRINCIPLE`).
pub fn flags(c: &Constitution, log: &PolicyLog) -> Vec<(String, bool)> {
    c.principles
        .iter()
        .map(|p| (p.config.id.clone(), log.fired.contains(&p.config.id)))
        .collect()
}

/// What the external detectors share: one HTTP client (webhooks) and the
/// judge verdict cache.
#[derive(Default)]
pub struct External {
    /// HTTP client for webhook detectors.
    pub http: reqwest::Client,
    /// Judge verdicts by (principle, content hash).
    pub judge_cache: std::sync::Mutex<std::collections::HashMap<(String, u64), bool>>,
}

/// Runs the detectors that call out (`judge`, `webhook`) for the principles
/// applying at `stage`, on the whole `text`. Results of judges are cached per
/// (principle, text) so a repeated answer costs one call.
pub async fn check_external(
    app: &External,
    snap: &crate::snapshot::Snapshot,
    c: &Constitution,
    stage: Applies,
    text: &str,
) -> Vec<Finding> {
    use sluice_core::config::{DetectorConfig, OnError};
    use sluice_core::policy::detectors::Span;
    use sluice_core::policy::Compiled;
    let mut out = Vec::new();
    for p in c.principles.iter().filter(|p| p.applies(stage)) {
        for d in &p.detectors {
            let Compiled::External(cfg) = d else { continue };
            let (fired, label) = match cfg {
                DetectorConfig::Judge {
                    provider,
                    model,
                    rubric,
                    timeout,
                    on_error,
                    ..
                } => {
                    let key = (p.config.id.clone(), content_hash(text));
                    let cached = app
                        .judge_cache
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&key)
                        .copied();
                    match cached {
                        Some(v) => (v, "judge"),
                        None => match judge(
                            snap,
                            provider,
                            model.as_deref(),
                            rubric.as_deref().unwrap_or(""),
                            text,
                            *timeout,
                        )
                        .await
                        {
                            Ok(v) => {
                                let mut cache =
                                    app.judge_cache.lock().unwrap_or_else(|e| e.into_inner());
                                if cache.len() >= 10_000 {
                                    cache.clear();
                                }
                                cache.insert(key, v);
                                (v, "judge")
                            }
                            Err(e) => {
                                tracing::warn!(principle = p.config.id, "judge failed: {e}");
                                (*on_error == OnError::Block, "judge_error")
                            }
                        },
                    }
                }
                DetectorConfig::Webhook {
                    url,
                    timeout,
                    on_error,
                } => match webhook(&app.http, url, &p.config.id, stage, text, *timeout).await {
                    Ok(v) => (v, "webhook"),
                    Err(e) => {
                        tracing::warn!(principle = p.config.id, "webhook failed: {e}");
                        (*on_error == OnError::Block, "webhook_error")
                    }
                },
                _ => continue,
            };
            if fired {
                out.push(Finding {
                    principle: p.config.id.clone(),
                    detector: d.kind().to_string(),
                    action: p.config.action,
                    severity: p.config.severity,
                    stage,
                    spans: vec![Span {
                        start: 0,
                        end: text.len(),
                        label: label.to_string(),
                    }],
                });
            }
        }
    }
    out
}

fn content_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Asks a provider whether `text` satisfies `rubric`. The judge must answer
/// PASS or FAIL as its first word (or JSON `{"verdict": "pass"|"fail"}`).
/// Returns whether the principle fires (the text fails the rubric).
async fn judge(
    snap: &crate::snapshot::Snapshot,
    provider: &str,
    model: Option<&str>,
    rubric: &str,
    text: &str,
    timeout: std::time::Duration,
) -> Result<bool, String> {
    let p = snap
        .providers
        .get(provider)
        .ok_or_else(|| format!("unknown provider {provider}"))?;
    let req = ChatRequest::from_value(json!({
        "model": model.unwrap_or("judge"),
        "messages": [
            {"role": "system", "content": format!("{rubric}\n\nJudge the text the user sends against this rubric. Answer with one word first: PASS if it satisfies the rubric, FAIL if it does not.")},
            {"role": "user", "content": text},
        ],
        "temperature": 0,
        "max_tokens": 16,
    }))
    .map_err(|e| e.message)?;
    let c = tokio::time::timeout(timeout, p.complete(&req))
        .await
        .map_err(|_| format!("no verdict within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let answer = c.body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .trim()
        .to_string();
    parse_verdict(&answer).ok_or_else(|| format!("unreadable verdict: {:.80}", answer))
}

/// `Some(true)` for FAIL, `Some(false)` for PASS.
pub fn parse_verdict(answer: &str) -> Option<bool> {
    if let Ok(v) = serde_json::from_str::<Value>(answer) {
        return match v
            .get("verdict")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("pass") => Some(false),
            Some("fail") => Some(true),
            _ => None,
        };
    }
    let first: String = answer
        .chars()
        .skip_while(|c| !c.is_alphabetic())
        .take_while(|c| c.is_alphabetic())
        .collect();
    match first.to_ascii_uppercase().as_str() {
        "PASS" => Some(false),
        "FAIL" => Some(true),
        _ => None,
    }
}

/// POSTs `{"text", "principle", "stage"}`; the classifier answers
/// `{"flagged": bool}`. Returns whether it flagged the text.
async fn webhook(
    http: &reqwest::Client,
    url: &str,
    principle: &str,
    stage: Applies,
    text: &str,
    timeout: std::time::Duration,
) -> Result<bool, String> {
    let resp = http
        .post(url)
        .timeout(timeout)
        .json(&json!({"text": text, "principle": principle, "stage": stage}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let v: Value = resp
        .json()
        .await
        .map_err(|e| format!("answer is not JSON: {e}"))?;
    v.get("flagged")
        .and_then(Value::as_bool)
        .ok_or_else(|| "answer has no boolean `flagged`".to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_verdict;

    #[test]
    fn verdicts_are_parsed_strictly() {
        assert_eq!(parse_verdict("PASS"), Some(false));
        assert_eq!(parse_verdict("fail - it talks about cooking"), Some(true));
        assert_eq!(parse_verdict("**FAIL**"), Some(true));
        assert_eq!(parse_verdict(r#"{"verdict": "Pass"}"#), Some(false));
        assert_eq!(parse_verdict("maybe"), None);
        assert_eq!(parse_verdict(""), None);
    }
}
