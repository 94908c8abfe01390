//! Probe suites: written test cases run against a variant before (and while)
//! it meets users.
//!
//! A suite is a JSONL file, one case per line:
//!
//! ```json
//! {"id": "refund-01", "messages": [{"role": "user", "content": "How do I get a refund?"}],
//!  "assert": [{"type": "contains", "value": "refund"}, {"type": "not-refusal"}],
//!  "tags": ["support"], "repeat": 3, "pass_share": 0.66}
//! ```
//!
//! This module parses suites (every error names its line and field) and
//! judges one answer against a case's assertions. Calling the model, and the
//! `llm-judge` assertion that needs a second model, belong to the caller; the
//! verdict of a judge is read here ([`parse_score`]) so it can be tested.

pub mod report;

use std::collections::BTreeSet;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::chat::ChatRequest;
use crate::config::did_you_mean;
use crate::policy::Principle;
use crate::signals::is_refusal;

/// Assertion types a case may use.
pub const ASSERTION_TYPES: &[&str] = &[
    "equals",
    "contains",
    "icontains",
    "not-contains",
    "not-icontains",
    "regex",
    "not-regex",
    "is-json",
    "json-schema",
    "refusal",
    "not-refusal",
    "max-length",
    "principle-pass",
    "principle-fail",
    "llm-judge",
    "latency-under",
    "cost-under",
];

/// One parsed suite.
#[derive(Debug)]
pub struct Suite {
    /// Where it was read from (as given).
    pub name: String,
    /// SHA-256 of its bytes, hex: two runs with the same hash ran the same
    /// cases.
    pub hash: String,
    /// Its cases, in file order.
    pub cases: Vec<Case>,
}

/// One case.
#[derive(Debug)]
pub struct Case {
    /// Unique within the suite.
    pub id: String,
    /// 1-based line in the file.
    pub line: usize,
    /// The conversation sent.
    pub messages: Vec<Value>,
    /// Extra request fields (`temperature`, `max_tokens`, …).
    pub params: serde_json::Map<String, Value>,
    /// What the answer must satisfy.
    pub asserts: Vec<Assertion>,
    /// Labels for per-tag pass rates.
    pub tags: Vec<String>,
    /// How many times to run it.
    pub repeat: u32,
    /// The share of repeats that must pass for the case to pass.
    pub pass_share: f64,
}

impl Case {
    /// The request for this case against `model` (the variant's upstream
    /// model is set by the caller).
    pub fn request(&self, model: &str) -> Result<ChatRequest, String> {
        let mut m = self.params.clone();
        m.insert("model".into(), Value::String(model.to_string()));
        m.insert("messages".into(), Value::Array(self.messages.clone()));
        m.remove("stream");
        ChatRequest::from_value(Value::Object(m)).map_err(|e| e.message)
    }

    /// How many of `runs` repeats must pass.
    pub fn needed(&self, runs: u32) -> u32 {
        ((self.pass_share * f64::from(runs)) - 1e-9).ceil().max(1.0) as u32
    }
}

/// One assertion, compiled.
#[derive(Debug)]
pub enum Assertion {
    /// The answer equals the value (surrounding whitespace ignored).
    Equals(String),
    /// The answer contains the value.
    Contains(String),
    /// …ignoring case.
    IContains(String),
    /// The answer does not contain the value.
    NotContains(String),
    /// …ignoring case.
    NotIContains(String),
    /// The answer matches the pattern.
    Regex(Regex),
    /// The answer does not match the pattern.
    NotRegex(Regex),
    /// The answer is JSON.
    IsJson,
    /// The answer is JSON satisfying the schema.
    JsonSchema(Box<jsonschema::Validator>, Value),
    /// The answer is a refusal.
    Refusal,
    /// The answer is not a refusal.
    NotRefusal,
    /// The answer has at most this many characters.
    MaxLength(usize),
    /// The principle does not fire on the model's answer.
    PrinciplePass(String),
    /// The principle fires on the model's answer.
    PrincipleFail(String),
    /// A model grades the answer against a rubric.
    LlmJudge(JudgeSpec),
    /// The call took less than this many milliseconds.
    LatencyUnder(f64),
    /// The call cost less than this many USD.
    CostUnder(f64),
}

/// An `llm-judge` assertion.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeSpec {
    /// What a good answer does, in words.
    pub rubric: String,
    /// The provider (from `[providers]`) that judges.
    pub provider: String,
    /// Its model.
    #[serde(default)]
    pub model: Option<String>,
    /// The least score (0–1) that passes.
    #[serde(default = "half")]
    pub threshold: f64,
}

fn half() -> f64 {
    0.5
}

impl Assertion {
    /// The `type` name.
    pub fn name(&self) -> &'static str {
        match self {
            Assertion::Equals(_) => "equals",
            Assertion::Contains(_) => "contains",
            Assertion::IContains(_) => "icontains",
            Assertion::NotContains(_) => "not-contains",
            Assertion::NotIContains(_) => "not-icontains",
            Assertion::Regex(_) => "regex",
            Assertion::NotRegex(_) => "not-regex",
            Assertion::IsJson => "is-json",
            Assertion::JsonSchema(..) => "json-schema",
            Assertion::Refusal => "refusal",
            Assertion::NotRefusal => "not-refusal",
            Assertion::MaxLength(_) => "max-length",
            Assertion::PrinciplePass(_) => "principle-pass",
            Assertion::PrincipleFail(_) => "principle-fail",
            Assertion::LlmJudge(_) => "llm-judge",
            Assertion::LatencyUnder(_) => "latency-under",
            Assertion::CostUnder(_) => "cost-under",
        }
    }

    /// The principle it names, if any.
    pub fn principle(&self) -> Option<&str> {
        match self {
            Assertion::PrinciplePass(p) | Assertion::PrincipleFail(p) => Some(p),
            _ => None,
        }
    }

    /// Judges an answer. `principle` looks a principle up by id (every id a
    /// suite names is checked against the config before it runs). Returns
    /// `None` for `llm-judge`, which the caller evaluates.
    pub fn check<'p>(
        &self,
        answer: &Answer,
        principle: &dyn Fn(&str) -> Option<&'p Principle>,
    ) -> Option<AssertionResult> {
        let text = answer.text.as_str();
        let r = |pass: bool, detail: String| {
            Some(AssertionResult {
                kind: self.name().to_string(),
                pass,
                detail,
            })
        };
        match self {
            Assertion::Equals(v) => {
                let pass = text.trim() == v.trim();
                r(pass, format!("expected exactly {}", quote(v)))
            }
            Assertion::Contains(v) => {
                r(text.contains(v.as_str()), format!("contains {}", quote(v)))
            }
            Assertion::IContains(v) => r(
                text.to_lowercase().contains(&v.to_lowercase()),
                format!("contains {} (any case)", quote(v)),
            ),
            Assertion::NotContains(v) => r(
                !text.contains(v.as_str()),
                format!("does not contain {}", quote(v)),
            ),
            Assertion::NotIContains(v) => r(
                !text.to_lowercase().contains(&v.to_lowercase()),
                format!("does not contain {} (any case)", quote(v)),
            ),
            Assertion::Regex(re) => r(re.is_match(text), format!("matches /{}/", re.as_str())),
            Assertion::NotRegex(re) => r(
                !re.is_match(text),
                format!("does not match /{}/", re.as_str()),
            ),
            Assertion::IsJson => match serde_json::from_str::<Value>(text.trim()) {
                Ok(_) => r(true, "is JSON".into()),
                Err(e) => r(false, format!("is not JSON: {e}")),
            },
            Assertion::JsonSchema(v, _) => match serde_json::from_str::<Value>(text.trim()) {
                Ok(j) => match v.validate(&j) {
                    Ok(()) => r(true, "matches the schema".into()),
                    Err(e) => r(false, format!("does not match the schema: {e}")),
                },
                Err(e) => r(false, format!("is not JSON: {e}")),
            },
            Assertion::Refusal => r(is_refusal(text), "is a refusal".into()),
            Assertion::NotRefusal => r(!is_refusal(text), "is not a refusal".into()),
            Assertion::MaxLength(n) => {
                let len = text.chars().count();
                r(len <= *n, format!("{len} characters (at most {n})"))
            }
            Assertion::PrinciplePass(id) | Assertion::PrincipleFail(id) => {
                let want_fire = matches!(self, Assertion::PrincipleFail(_));
                let Some(p) = principle(id) else {
                    return r(false, format!("unknown principle \"{id}\""));
                };
                let fired = fires(p, &answer.raw_text);
                let detail = match (fired.is_empty(), want_fire) {
                    (true, false) => format!("principle \"{id}\" did not fire"),
                    (true, true) => format!("principle \"{id}\" did not fire (expected it to)"),
                    (false, _) => format!("principle \"{id}\" fired: {}", fired.join(", ")),
                };
                r(fired.is_empty() != want_fire, detail)
            }
            Assertion::LlmJudge(_) => None,
            Assertion::LatencyUnder(ms) => r(
                answer.latency_ms < *ms,
                format!("{:.0} ms (under {ms} ms)", answer.latency_ms),
            ),
            Assertion::CostUnder(usd) => match answer.cost_usd {
                Some(c) => r(c < *usd, format!("${c:.6} (under ${usd})")),
                None => r(
                    false,
                    "cost unknown: no price configured for this model ([prices])".into(),
                ),
            },
        }
    }
}

/// The labels a principle's synchronous detectors report on `text`.
fn fires(p: &Principle, text: &str) -> Vec<String> {
    let mut labels = BTreeSet::new();
    for d in &p.detectors {
        let mut spans = Vec::new();
        d.scan(text, &mut spans);
        labels.extend(spans.into_iter().map(|s| s.label));
    }
    labels.into_iter().collect()
}

fn quote(s: &str) -> String {
    let short: String = s.chars().take(60).collect();
    if short.len() < s.len() {
        format!("\"{short}…\"")
    } else {
        format!("\"{short}\"")
    }
}

/// What a model answered to a case, as the assertions see it.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// The answer as a user would get it (after the deployment's output
    /// policies).
    pub text: String,
    /// The answer as the model gave it (before policies).
    pub raw_text: String,
    /// Time the call took, ms.
    pub latency_ms: f64,
    /// Its cost, when the model has a price.
    pub cost_usd: Option<f64>,
}

/// One assertion's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssertionResult {
    /// The assertion type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether it held.
    pub pass: bool,
    /// What was checked and what was found.
    pub detail: String,
}

/// Reads a judge's answer as a score in 0–1: JSON `{"score": x}` (x in 0–1,
/// or 1–10 read as tenths), a bare number, or PASS/FAIL as the first word.
pub fn parse_score(answer: &str) -> Option<f64> {
    let t = answer.trim();
    let scale = |x: f64| -> Option<f64> {
        if (0.0..=1.0).contains(&x) {
            Some(x)
        } else if (1.0..=10.0).contains(&x) {
            Some(x / 10.0)
        } else {
            None
        }
    };
    if let Ok(v) = serde_json::from_str::<Value>(t) {
        if let Some(x) = v.get("score").and_then(Value::as_f64) {
            return scale(x);
        }
        if let Some(x) = v.as_f64() {
            return scale(x);
        }
        return match v
            .get("verdict")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("pass") => Some(1.0),
            Some("fail") => Some(0.0),
            _ => None,
        };
    }
    let first: String = t
        .chars()
        .skip_while(|c| !c.is_alphanumeric())
        .take_while(|c| c.is_alphanumeric() || *c == '.')
        .collect();
    if let Ok(x) = first.parse::<f64>() {
        return scale(x);
    }
    match first.to_ascii_uppercase().as_str() {
        "PASS" => Some(1.0),
        "FAIL" => Some(0.0),
        _ => None,
    }
}

/// A suite that could not be read, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {} problem{}:\n  {}", .problems.len(), if .problems.len() == 1 { "" } else { "s" }, .problems.join("\n  "))]
pub struct SuiteError {
    /// The suite.
    pub name: String,
    /// `line N: …` each.
    pub problems: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    id: String,
    messages: Vec<Value>,
    #[serde(default, rename = "assert")]
    asserts: Vec<RawAssertion>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    params: serde_json::Map<String, Value>,
    #[serde(default)]
    repeat: Option<u32>,
    #[serde(default)]
    pass_share: Option<f64>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAssertion {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    principle: Option<String>,
    #[serde(default)]
    rubric: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    threshold: Option<f64>,
}

fn compile(a: RawAssertion) -> Result<Assertion, String> {
    let kind = a.kind.as_str();
    let text = |v: &Option<Value>| -> Result<String, String> {
        match v {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!("`{kind}` needs a string `value`, got {other}")),
            None => Err(format!("`{kind}` needs a string `value`")),
        }
    };
    let number = |v: &Option<Value>| -> Result<f64, String> {
        match v.as_ref().and_then(Value::as_f64) {
            Some(x) if x.is_finite() && x >= 0.0 => Ok(x),
            _ => Err(format!("`{kind}` needs a non-negative number `value`")),
        }
    };
    let no_extra = |allowed: &[&str]| -> Result<(), String> {
        let given = [
            ("value", a.value.is_some()),
            ("principle", a.principle.is_some()),
            ("rubric", a.rubric.is_some()),
            ("provider", a.provider.is_some()),
            ("model", a.model.is_some()),
            ("threshold", a.threshold.is_some()),
        ];
        match given.iter().find(|(f, set)| *set && !allowed.contains(f)) {
            Some((f, _)) => Err(format!("`{kind}` takes no `{f}`")),
            None => Ok(()),
        }
    };
    let regex = |v: &Option<Value>| -> Result<Regex, String> {
        let p = text(v)?;
        Regex::new(&p).map_err(|e| format!("`{kind}` pattern does not compile: {e}"))
    };
    Ok(match kind {
        "equals" | "contains" | "icontains" | "not-contains" | "not-icontains" => {
            no_extra(&["value"])?;
            let v = text(&a.value)?;
            match kind {
                "equals" => Assertion::Equals(v),
                "contains" => Assertion::Contains(v),
                "icontains" => Assertion::IContains(v),
                "not-contains" => Assertion::NotContains(v),
                _ => Assertion::NotIContains(v),
            }
        }
        "regex" => {
            no_extra(&["value"])?;
            Assertion::Regex(regex(&a.value)?)
        }
        "not-regex" => {
            no_extra(&["value"])?;
            Assertion::NotRegex(regex(&a.value)?)
        }
        "is-json" => {
            no_extra(&[])?;
            Assertion::IsJson
        }
        "json-schema" => {
            no_extra(&["value"])?;
            let schema = a
                .value
                .clone()
                .ok_or("`json-schema` needs the schema as `value`")?;
            let v = jsonschema::validator_for(&schema)
                .map_err(|e| format!("`json-schema` value is not a valid schema: {e}"))?;
            Assertion::JsonSchema(Box::new(v), schema)
        }
        "refusal" => {
            no_extra(&[])?;
            Assertion::Refusal
        }
        "not-refusal" => {
            no_extra(&[])?;
            Assertion::NotRefusal
        }
        "max-length" => {
            no_extra(&["value"])?;
            match a.value.as_ref().and_then(Value::as_u64) {
                Some(n) => Assertion::MaxLength(n as usize),
                None => return Err("`max-length` needs a whole number `value`".into()),
            }
        }
        "principle-pass" | "principle-fail" => {
            no_extra(&["principle"])?;
            let p = a
                .principle
                .clone()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| format!("`{kind}` needs `principle`"))?;
            if kind == "principle-pass" {
                Assertion::PrinciplePass(p)
            } else {
                Assertion::PrincipleFail(p)
            }
        }
        "llm-judge" => {
            no_extra(&["rubric", "provider", "model", "threshold"])?;
            let rubric = a
                .rubric
                .clone()
                .filter(|r| !r.trim().is_empty())
                .ok_or("`llm-judge` needs a `rubric`")?;
            let provider = a
                .provider
                .clone()
                .ok_or("`llm-judge` needs a `provider` (a name from [providers])")?;
            let threshold = a.threshold.unwrap_or(0.5);
            if !(0.0..=1.0).contains(&threshold) {
                return Err("`llm-judge` threshold must be between 0 and 1".into());
            }
            Assertion::LlmJudge(JudgeSpec {
                rubric,
                provider,
                model: a.model.clone(),
                threshold,
            })
        }
        "latency-under" => {
            no_extra(&["value"])?;
            Assertion::LatencyUnder(number(&a.value)?)
        }
        "cost-under" => {
            no_extra(&["value"])?;
            Assertion::CostUnder(number(&a.value)?)
        }
        other => {
            let hint = did_you_mean(other, ASSERTION_TYPES.iter().copied())
                .map(|s| format!("; did you mean \"{s}\"?"))
                .unwrap_or_default();
            return Err(format!(
                "unknown assertion type \"{other}\" (known: {}){hint}",
                ASSERTION_TYPES.join(", ")
            ));
        }
    })
}

/// Most repeats a case may ask for.
pub const MAX_REPEAT: u32 = 100;

impl Suite {
    /// Parses a suite. `name` is used in messages and reports. Blank lines
    /// and lines starting with `//` or `#` are skipped.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Suite, SuiteError> {
        let hash = hex::encode(Sha256::digest(bytes));
        let err = |problems| SuiteError {
            name: name.to_string(),
            problems,
        };
        let text =
            std::str::from_utf8(bytes).map_err(|e| err(vec![format!("not UTF-8 text: {e}")]))?;
        let mut problems = Vec::new();
        let mut cases: Vec<Case> = Vec::new();
        let mut ids = BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let t = line.trim();
            if t.is_empty() || t.starts_with("//") || t.starts_with('#') {
                continue;
            }
            let de = &mut serde_json::Deserializer::from_str(t);
            let raw: RawCase = match serde_path_to_error::deserialize(de) {
                Ok(r) => r,
                Err(e) => {
                    let path = e.path().to_string();
                    let at = if path == "." {
                        String::new()
                    } else {
                        format!(" at `{path}`")
                    };
                    problems.push(format!("line {n}{at}: {}", e.into_inner()));
                    continue;
                }
            };
            let _ = raw.description;
            let mut bad = |m: String| problems.push(format!("line {n} (case \"{}\"): {m}", raw.id));
            if raw.id.trim().is_empty() {
                bad("`id` is empty".into());
            } else if !ids.insert(raw.id.clone()) {
                bad("duplicate id (ids must be unique within a suite)".into());
            }
            if raw.messages.is_empty() {
                bad("`messages` is empty".into());
            }
            let repeat = raw.repeat.unwrap_or(1);
            if repeat == 0 || repeat > MAX_REPEAT {
                bad(format!("`repeat` must be 1–{MAX_REPEAT}, got {repeat}"));
            }
            let pass_share = raw.pass_share.unwrap_or(1.0);
            if !(pass_share > 0.0 && pass_share <= 1.0) {
                bad(format!("`pass_share` must be in (0, 1], got {pass_share}"));
            }
            let mut asserts = Vec::new();
            for (j, a) in raw.asserts.into_iter().enumerate() {
                match compile(a) {
                    Ok(a) => asserts.push(a),
                    Err(m) => bad(format!("assert[{j}]: {m}")),
                }
            }
            let case = Case {
                id: raw.id,
                line: n,
                messages: raw.messages,
                params: raw.params,
                asserts,
                tags: raw.tags,
                repeat,
                pass_share,
            };
            if let Err(m) = case.request("probe") {
                problems.push(format!("line {n} (case \"{}\"): {m}", case.id));
            }
            cases.push(case);
        }
        if cases.is_empty() && problems.is_empty() {
            problems.push("no cases (one JSON object per line expected)".into());
        }
        if !problems.is_empty() {
            return Err(err(problems));
        }
        Ok(Suite {
            name: name.to_string(),
            hash,
            cases,
        })
    }

    /// Every principle the suite's assertions name.
    pub fn principles(&self) -> BTreeSet<&str> {
        self.cases
            .iter()
            .flat_map(|c| c.asserts.iter().filter_map(Assertion::principle))
            .collect()
    }

    /// Every provider its `llm-judge` assertions name.
    pub fn judge_providers(&self) -> BTreeSet<&str> {
        self.cases
            .iter()
            .flat_map(|c| c.asserts.iter())
            .filter_map(|a| match a {
                Assertion::LlmJudge(j) => Some(j.provider.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Total model calls one run makes (cases × repeats).
    pub fn calls(&self) -> u64 {
        self.cases.iter().map(|c| u64::from(c.repeat)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn suite(text: &str) -> Result<Suite, SuiteError> {
        Suite::parse("t.jsonl", text.as_bytes())
    }

    const MSG: &str = r#""messages": [{"role": "user", "content": "hi"}]"#;

    fn answer(text: &str) -> Answer {
        Answer {
            text: text.into(),
            raw_text: text.into(),
            latency_ms: 120.0,
            cost_usd: Some(0.001),
        }
    }

    fn check(a: &str, text: &str) -> bool {
        let s = suite(&format!(r#"{{"id": "x", {MSG}, "assert": [{a}]}}"#)).unwrap();
        let none = |_: &str| None;
        s.cases[0].asserts[0]
            .check(&answer(text), &none)
            .unwrap()
            .pass
    }

    #[test]
    fn text_assertions_judge_answers() {
        assert!(check(r#"{"type": "equals", "value": "Yes"}"#, " Yes\n"));
        assert!(!check(r#"{"type": "equals", "value": "Yes"}"#, "Yes!"));
        assert!(check(
            r#"{"type": "contains", "value": "refund"}"#,
            "a refund"
        ));
        assert!(!check(
            r#"{"type": "contains", "value": "Refund"}"#,
            "a refund"
        ));
        assert!(check(
            r#"{"type": "icontains", "value": "Refund"}"#,
            "a REFUND"
        ));
        assert!(check(r#"{"type": "not-contains", "value": "ssn"}"#, "no"));
        assert!(!check(
            r#"{"type": "not-icontains", "value": "ssn"}"#,
            "SSN: 1"
        ));
        assert!(check(r#"{"type": "regex", "value": "^\\d{3}$"}"#, "123"));
        assert!(check(r#"{"type": "not-regex", "value": "\\d"}"#, "abc"));
        assert!(check(r#"{"type": "is-json"}"#, r#" {"a": 1} "#));
        assert!(!check(r#"{"type": "is-json"}"#, "{a: 1}"));
        let schema =
            r#"{"type": "json-schema", "value": {"type": "object", "required": ["answer"]}}"#;
        assert!(check(schema, r#"{"answer": "x"}"#));
        assert!(!check(schema, r#"{"other": "x"}"#));
        assert!(check(r#"{"type": "refusal"}"#, "I can't help with that."));
        assert!(check(r#"{"type": "not-refusal"}"#, "Sure, here it is."));
        assert!(check(r#"{"type": "max-length", "value": 5}"#, "héllo"));
        assert!(!check(r#"{"type": "max-length", "value": 4}"#, "héllo"));
        assert!(check(r#"{"type": "latency-under", "value": 500}"#, ""));
        assert!(!check(r#"{"type": "latency-under", "value": 100}"#, ""));
        assert!(check(r#"{"type": "cost-under", "value": 0.01}"#, ""));
    }

    #[test]
    fn principle_assertions_use_the_model_answer() {
        let cfg = Config::parse(
            r#"
allow_anonymous = true
[providers.sim]
kind = "simulated"
[deployments.chat]
stable = "a"
variants.a = { provider = "sim", model = "m" }
[principles.no-pii-leak]
applies_to = ["output"]
action = "redact"
detectors = [{ kind = "pii" }]
"#,
        )
        .unwrap();
        let p = Principle::compile(&cfg.principles["no-pii-leak"]).unwrap();
        let lookup = |id: &str| (id == "no-pii-leak").then_some(&p);
        let s = suite(&format!(
            r#"{{"id": "x", {MSG}, "assert": [{{"type": "principle-pass", "principle": "no-pii-leak"}}, {{"type": "principle-fail", "principle": "no-pii-leak"}}, {{"type": "principle-pass", "principle": "nope"}}]}}"#
        ))
        .unwrap();
        let leak = Answer {
            text: "mail [REDACTED:email]".into(),
            raw_text: "mail jane.doe@example.com".into(),
            ..answer("")
        };
        let a = &s.cases[0].asserts;
        assert!(!a[0].check(&leak, &lookup).unwrap().pass);
        assert!(a[1].check(&leak, &lookup).unwrap().pass);
        assert!(a[0].check(&answer("all fine"), &lookup).unwrap().pass);
        let unknown = a[2].check(&leak, &lookup).unwrap();
        assert!(!unknown.pass && unknown.detail.contains("unknown principle"));
    }

    #[test]
    fn bad_suites_name_line_and_field() {
        let e = suite(&format!(
            "{{\"id\": \"a\", {MSG}}}\n\n{{\"id\": \"a\", {MSG}}}\n{{\"id\": \"b\", {MSG}, \"assert\": [{{\"type\": \"contians\", \"value\": \"x\"}}]}}\nnot json\n{{\"id\": \"c\", {MSG}, \"extra\": 1}}\n{{\"id\": \"d\", {MSG}, \"assert\": [{{\"type\": \"regex\", \"value\": \"(\"}}], \"repeat\": 0}}"
        ))
        .unwrap_err();
        let all = e.problems.join("\n");
        assert!(all.contains("line 3 (case \"a\"): duplicate id"), "{all}");
        assert!(
            all.contains("line 4 (case \"b\"): assert[0]: unknown assertion type \"contians\""),
            "{all}"
        );
        assert!(all.contains("did you mean \"contains\"?"), "{all}");
        assert!(all.contains("line 5: expected"), "{all}");
        assert!(
            all.contains("line 6") && all.contains("unknown field `extra`"),
            "{all}"
        );
        assert!(
            all.contains("line 7 (case \"d\"): `repeat` must be"),
            "{all}"
        );
        assert!(all.contains("pattern does not compile"), "{all}");
        let e =
            suite(r#"{"id": "x", "messages": [{"role": "wizard", "content": "hi"}]}"#).unwrap_err();
        assert!(e.problems[0].starts_with("line 1 (case \"x\"):"), "{e}");
        assert!(suite("\n// nothing\n").unwrap_err().problems[0].contains("no cases"));
        let e = suite(&format!(
            r#"{{"id": "x", {MSG}, "assert": [{{"type": "contains"}}, {{"type": "is-json", "value": 1}}, {{"type": "llm-judge", "rubric": "r"}}]}}"#
        ))
        .unwrap_err();
        let all = e.problems.join("\n");
        assert!(
            all.contains("assert[0]: `contains` needs a string `value`"),
            "{all}"
        );
        assert!(
            all.contains("assert[1]: `is-json` takes no `value`"),
            "{all}"
        );
        assert!(
            all.contains("assert[2]: `llm-judge` needs a `provider`"),
            "{all}"
        );
    }

    #[test]
    fn repeats_pass_on_their_share() {
        let s = suite(&format!(
            r#"{{"id": "x", {MSG}, "repeat": 3, "pass_share": 0.66, "params": {{"temperature": 0.2}}}}"#
        ))
        .unwrap();
        let c = &s.cases[0];
        assert_eq!(c.needed(3), 2);
        assert_eq!(c.request("m").unwrap().model, "m");
        assert_eq!(s.calls(), 3);
        let strict = suite(&format!(r#"{{"id": "x", {MSG}, "repeat": 4}}"#)).unwrap();
        assert_eq!(strict.cases[0].needed(4), 4);
        assert_eq!(s.hash.len(), 64);
    }

    #[test]
    fn judge_scores_are_read_in_every_form() {
        assert_eq!(parse_score(r#"{"score": 0.8, "reason": "ok"}"#), Some(0.8));
        assert_eq!(parse_score(r#"{"score": 7}"#), Some(0.7));
        assert_eq!(parse_score("PASS - fine"), Some(1.0));
        assert_eq!(parse_score("fail"), Some(0.0));
        assert_eq!(parse_score("0.25"), Some(0.25));
        assert_eq!(parse_score(r#"{"verdict": "pass"}"#), Some(1.0));
        assert_eq!(parse_score("maybe"), None);
        assert_eq!(parse_score("42"), None);
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = Suite::parse("fuzz", &bytes);
        }

        #[test]
        fn parsing_json_shaped_lines_never_panics(s in r#"\{"id": "[a-z]{0,3}", "messages": \[\{"role": "(user|x)", "content": "[a-z]{0,5}"\}\](, "assert": \[\{"type": "[a-z-]{0,14}"(, "value": ([0-9]{1,3}|"[a-z(]{0,4}"))?\}\])?(, "repeat": [0-9]{1,4})?\}"#) {
            let _ = Suite::parse("fuzz", s.as_bytes());
        }
    }
}
