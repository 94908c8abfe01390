//! The constitution at run time: compiled principles that check texts,
//! redact spans, and guard streams as they flow.
//!
//! Detectors that need I/O (`judge`, `webhook`) are compiled as
//! [`Compiled::External`]; the gateway runs them. Everything else runs here,
//! synchronously, without allocation beyond the findings.

pub mod detectors;
pub mod guard;

use std::sync::Arc;

use serde::Serialize;

use crate::config::{Applies, DetectorConfig, PolicyAction, PrincipleConfig, Severity};
use detectors::{
    find_pii, find_secrets, pii_holdback, secrets_holdback, trailing_run, PhraseMatcher,
    RegexDetector, Span,
};

/// A compiled detector.
pub enum Compiled {
    /// Regular expressions.
    Regex(RegexDetector, usize),
    /// Phrases.
    Keywords(PhraseMatcher),
    /// Character limit.
    MaxLength(usize),
    /// Valid JSON, optionally matching a JSON Schema.
    Json(Option<Box<jsonschema::Validator>>),
    /// Refusal.
    Refusal,
    /// PII.
    Pii(Vec<String>, Vec<String>),
    /// Credentials.
    Secrets,
    /// Override phrasings.
    PromptInjection(PhraseMatcher),
    /// Run by the gateway (judge, webhook).
    External(DetectorConfig),
}

impl Compiled {
    fn compile(d: &DetectorConfig) -> Result<Compiled, String> {
        Ok(match d {
            DetectorConfig::Regex {
                patterns,
                max_match,
            } => Compiled::Regex(
                RegexDetector::new(patterns).map_err(|(i, e)| format!("pattern {i}: {e}"))?,
                *max_match,
            ),
            DetectorConfig::Keywords { words } => {
                Compiled::Keywords(PhraseMatcher::new(words.iter().cloned(), true)?)
            }
            DetectorConfig::MaxLength { max_chars } => Compiled::MaxLength(*max_chars),
            DetectorConfig::Json { schema } => Compiled::Json(match schema {
                Some(s) => Some(Box::new(
                    jsonschema::validator_for(s)
                        .map_err(|e| format!("invalid JSON Schema: {e}"))?,
                )),
                None => None,
            }),
            DetectorConfig::Refusal => Compiled::Refusal,
            DetectorConfig::Pii { entities, allow } => {
                detectors::prepare_pii();
                Compiled::Pii(entities.clone(), allow.clone())
            }
            DetectorConfig::Secrets => {
                detectors::prepare_secrets();
                Compiled::Secrets
            }
            DetectorConfig::PromptInjection { phrases } => {
                Compiled::PromptInjection(PhraseMatcher::prompt_injection(phrases)?)
            }
            other => Compiled::External(other.clone()),
        })
    }

    /// The detector kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Compiled::Regex(..) => "regex",
            Compiled::Keywords(_) => "keywords",
            Compiled::MaxLength(_) => "max_length",
            Compiled::Json(_) => "json",
            Compiled::Refusal => "refusal",
            Compiled::Pii(..) => "pii",
            Compiled::Secrets => "secrets",
            Compiled::PromptInjection(_) => "prompt_injection",
            Compiled::External(d) => d.kind(),
        }
    }

    /// Whether it judges only a complete text (JSON validity, refusal).
    pub fn needs_whole_text(&self) -> bool {
        matches!(
            self,
            Compiled::Json(_) | Compiled::Refusal | Compiled::External(_)
        )
    }

    /// Spans in `text` (for whole-text detectors, one span over the text
    /// when they fire).
    pub fn scan(&self, text: &str, out: &mut Vec<Span>) {
        match self {
            Compiled::Regex(r, _) => r.find(text, out),
            Compiled::Keywords(k) => k.find(text, "keyword", out),
            Compiled::MaxLength(max) => {
                if let Some((i, _)) = text.char_indices().nth(*max) {
                    out.push(Span {
                        start: i,
                        end: text.len(),
                        label: "max_length".into(),
                    });
                }
            }
            Compiled::Json(schema) => {
                match serde_json::from_str::<serde_json::Value>(text.trim()) {
                    Err(_) => out.push(Span {
                        start: 0,
                        end: text.len(),
                        label: "invalid_json".into(),
                    }),
                    Ok(v) => {
                        if schema.as_ref().is_some_and(|s| !s.is_valid(&v)) {
                            out.push(Span {
                                start: 0,
                                end: text.len(),
                                label: "schema_mismatch".into(),
                            });
                        }
                    }
                }
            }
            Compiled::Refusal => {
                if crate::signals::is_refusal(text) {
                    out.push(Span {
                        start: 0,
                        end: text.len(),
                        label: "refusal".into(),
                    });
                }
            }
            Compiled::Pii(e, a) => find_pii(text, e, a, out),
            Compiled::Secrets => find_secrets(text, out),
            Compiled::PromptInjection(m) => m.find(text, "prompt_injection", out),
            Compiled::External(_) => {}
        }
    }

    /// Trailing bytes of a growing text that could still become a match.
    pub fn holdback(&self, text: &str) -> usize {
        match self {
            Compiled::Regex(_, max) => {
                let mut n = (*max).min(text.len());
                while !text.is_char_boundary(text.len() - n) {
                    n -= 1;
                }
                n
            }
            Compiled::Keywords(k) => trailing_run(text, k.longest, |c| c != '\n'),
            Compiled::Pii(e, _) => pii_holdback(text, e),
            Compiled::Secrets => secrets_holdback(text),
            _ => 0,
        }
    }
}

/// A compiled principle.
pub struct Principle {
    /// Its config.
    pub config: PrincipleConfig,
    /// Its detectors, in config order.
    pub detectors: Vec<Compiled>,
}

impl std::fmt::Debug for Principle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principle")
            .field("id", &self.config.id)
            .field("detectors", &self.detectors.len())
            .finish()
    }
}

impl Principle {
    /// Compiles a principle.
    pub fn compile(config: &PrincipleConfig) -> Result<Principle, String> {
        let mut detectors = Vec::new();
        for (i, d) in config.detectors.iter().enumerate() {
            detectors.push(
                Compiled::compile(d)
                    .map_err(|e| format!("principles.{}.detectors[{i}]: {e}", config.id))?,
            );
        }
        Ok(Principle {
            config: config.clone(),
            detectors,
        })
    }

    /// Whether it applies to inputs or outputs.
    pub fn applies(&self, stage: Applies) -> bool {
        self.config.applies_to.contains(&stage)
    }
}

/// One principle firing on one text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// Principle id.
    pub principle: String,
    /// Detector kind.
    pub detector: String,
    /// The principle's action.
    pub action: PolicyAction,
    /// Its severity.
    pub severity: Severity,
    /// Input or output.
    pub stage: Applies,
    /// Where (offsets and labels, never the matched text).
    pub spans: Vec<Span>,
}

/// The principles enforced on one deployment.
#[derive(Clone, Default)]
pub struct Constitution {
    /// In config order.
    pub principles: Vec<Arc<Principle>>,
}

impl Constitution {
    /// Whether any principle applies at this stage.
    pub fn applies(&self, stage: Applies) -> bool {
        self.principles.iter().any(|p| p.applies(stage))
    }

    /// Runs every synchronous detector of the principles applying at `stage`
    /// on `text`. External detectors are left to the caller.
    pub fn check(&self, stage: Applies, text: &str) -> Vec<Finding> {
        let mut out = Vec::new();
        for p in self.principles.iter().filter(|p| p.applies(stage)) {
            for d in &p.detectors {
                let mut spans = Vec::new();
                d.scan(text, &mut spans);
                if !spans.is_empty() {
                    spans.sort();
                    out.push(Finding {
                        principle: p.config.id.clone(),
                        detector: d.kind().to_string(),
                        action: p.config.action,
                        severity: p.config.severity,
                        stage,
                        spans,
                    });
                }
            }
        }
        out
    }
}

/// Replaces the redact findings' spans with `[REDACTED:<label>]`; overlapping
/// spans merge (the first label wins).
pub fn redact(text: &str, findings: &[Finding]) -> String {
    let spans: Vec<&Span> = findings
        .iter()
        .filter(|f| f.action == PolicyAction::Redact)
        .flat_map(|f| f.spans.iter())
        .collect();
    redact_spans(text, spans)
}

/// Replaces every PII entity and secret the built-in detectors find with
/// `[REDACTED:<label>]` (what `log_bodies = "redacted"` stores).
pub fn redact_sensitive(text: &str) -> String {
    let mut spans = Vec::new();
    let entities: Vec<String> = detectors::PII_ENTITIES
        .iter()
        .map(|s| s.to_string())
        .collect();
    detectors::find_pii(text, &entities, &[], &mut spans);
    detectors::find_secrets(text, &mut spans);
    redact_spans(text, spans.iter().collect())
}

/// Compiles what [`redact_sensitive`] runs, so the first body it redacts
/// does not pay for building the patterns.
pub fn prepare_redaction() {
    detectors::prepare_pii();
    detectors::prepare_secrets();
}

/// `text` with every secret the built-in detector finds replaced by
/// `[REDACTED:<label>]`, or `None` when it holds none (no copy made).
pub fn redact_secrets(text: &str) -> Option<String> {
    let mut spans = Vec::new();
    detectors::find_secrets(text, &mut spans);
    (!spans.is_empty()).then(|| redact_spans(text, spans.iter().collect()))
}

fn redact_spans(text: &str, mut spans: Vec<&Span>) -> String {
    if spans.is_empty() {
        return text.to_string();
    }
    spans.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for s in spans {
        if s.end <= at {
            continue;
        }
        let start = s.start.max(at);
        out.push_str(&text[at..start]);
        if s.start >= at {
            out.push_str(&format!("[REDACTED:{}]", s.label));
        }
        at = s.end;
    }
    out.push_str(&text[at.min(text.len())..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    pub(crate) fn constitution(extra: &str) -> Constitution {
        let text = format!(
            r#"
allow_anonymous = true
[providers.sim]
kind = "simulated"
[deployments.d]
stable = "v1"
variants.v1 = {{ provider = "sim", model = "m" }}
principles = ["no-pii", "no-secrets"]

[principles.no-pii]
applies_to = ["output"]
action = "redact"
detectors = [{{ kind = "pii", entities = ["email", "phone", "credit_card", "ssn", "iban"] }}]

[principles.no-secrets]
applies_to = ["input", "output"]
action = "block"
message = "That would reveal a secret."
detectors = [{{ kind = "secrets" }}, {{ kind = "regex", patterns = ["(?i)internal use only"] }}]
{extra}"#
        );
        let c = Config::parse(&text).expect("valid");
        Constitution {
            principles: c
                .principles
                .values()
                .map(|p| Arc::new(Principle::compile(p).expect("compiles")))
                .collect(),
        }
    }

    #[test]
    fn checks_and_redacts() {
        let c = constitution("");
        let t = "Write to jane@corp.io, card 4111 1111 1111 1111.";
        let f = c.check(Applies::Output, t);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].principle, "no-pii");
        assert_eq!(
            redact(t, &f),
            "Write to [REDACTED:email], card [REDACTED:credit_card]."
        );
        let f = c.check(Applies::Input, "this is INTERNAL USE ONLY material");
        assert_eq!(
            (f[0].principle.as_str(), f[0].action),
            ("no-secrets", PolicyAction::Block)
        );
        assert!(
            c.check(Applies::Input, "jane@corp.io").is_empty(),
            "pii applies to outputs only"
        );
    }

    #[test]
    fn policy_config_mistakes_are_named() {
        let bad = r#"
[principles.x]
applies_to = ["output"]
action = "redact"
detectors = [{ kind = "regexp", patterns = ["a"] }, { kind = "regex", patterns = ["(unclosed"] }, { kind = "json" }, { kind = "pii", entities = ["emial"] }]
"#;
        let text = format!("allow_anonymous = true\n[providers.sim]\nkind = \"simulated\"\n[deployments.d]\nstable = \"v1\"\nvariants.v1 = {{ provider = \"sim\", model = \"m\" }}\nprinciples = [\"x\", \"nope\"]\n{bad}");
        let e = Config::parse(&text).unwrap_err().to_string();
        for expected in [
            "principles.x.detectors[0].kind: unknown detector kind \"regexp\"",
            "principles.x.detectors[1].patterns[0]: invalid regex",
            "principles.x.detectors[2]: a \"json\" detector reports no spans to redact",
            "principles.x.detectors[3].entities[0]: unknown PII entity \"emial\"",
            "deployments.d.principles: unknown principle \"nope\"",
        ] {
            assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
        }
    }

    #[test]
    fn json_outputs_are_checked_against_a_schema() {
        let c = constitution(
            r#"
[principles.structured]
applies_to = ["output"]
action = "flag"
detectors = [{ kind = "json", schema = { type = "object", required = ["answer"], properties = { answer = { type = "string" } } } }]
"#,
        );
        let labels = |t: &str| -> Vec<String> {
            c.check(Applies::Output, t)
                .into_iter()
                .filter(|f| f.principle == "structured")
                .flat_map(|f| f.spans.into_iter().map(|s| s.label))
                .collect()
        };
        assert!(labels(r#"{"answer": "yes"}"#).is_empty());
        assert_eq!(labels(r#"{"answer": 3}"#), ["schema_mismatch"]);
        assert_eq!(labels("not json at all"), ["invalid_json"]);
    }
}
