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

fn violation(f: &Finding) -> ApiError {
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
                let started = Instant::now();
                let findings = c.check(Applies::Input, t);
                log.add(&findings, started.elapsed().as_micros() as u64, Some(i));
                if let Some(b) = findings.iter().find(|f| f.action == PolicyAction::Block) {
                    return Err(violation(b));
                }
                if findings.iter().any(|f| f.action == PolicyAction::Redact) {
                    *t = redact(t, &findings);
                }
            }
            Some(Content::Parts(parts)) => {
                for p in parts.iter_mut() {
                    let Some(t) = p.get("text").and_then(Value::as_str).map(str::to_string) else {
                        continue;
                    };
                    let started = Instant::now();
                    let findings = c.check(Applies::Input, &t);
                    log.add(&findings, started.elapsed().as_micros() as u64, Some(i));
                    if let Some(b) = findings.iter().find(|f| f.action == PolicyAction::Block) {
                        return Err(violation(b));
                    }
                    if findings.iter().any(|f| f.action == PolicyAction::Redact) {
                        p["text"] = json!(redact(&t, &findings));
                    }
                }
            }
            None => {}
        }
    }
    Ok(())
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
            let message = c
                .principles
                .iter()
                .find(|p| p.config.id == b.principle)
                .map(|p| p.config.message.clone())
                .unwrap_or_default();
            choice["message"] = json!({"role": "assistant", "content": message, "refusal": null});
            choice["finish_reason"] = json!("content_filter");
            changed = true;
        } else if findings.iter().any(|f| f.action == PolicyAction::Redact) {
            choice["message"]["content"] = json!(redact(&text, &findings));
            changed = true;
        }
    }
    changed
}

/// The per-principle flags the rollout gates see (`flag_rate:PRINCIPLE`).
pub fn flags(c: &Constitution, log: &PolicyLog) -> Vec<(String, bool)> {
    c.principles
        .iter()
        .map(|p| (p.config.id.clone(), log.fired.contains(&p.config.id)))
        .collect()
}
