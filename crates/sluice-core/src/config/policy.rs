//! Configuration of the constitution: `[principles.ID]`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{did_you_mean, join_path, key, parse_duration, unknown_ref, Cx, ProviderConfig};
use crate::policy::detectors::{RegexDetector, PII_ENTITIES};

/// Where a principle applies.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Applies {
    /// The request's messages.
    Input,
    /// The model's answer.
    Output,
}

/// How serious a violation is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, PartialOrd, Ord, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Low.
    Low,
    /// Medium.
    #[default]
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

/// What happens when a principle fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    /// Refuse (input: 400; output: replace with the principle's message).
    Block,
    /// Replace matched spans with `[REDACTED:<label>]`.
    Redact,
    /// Serve unchanged, record the verdict.
    Flag,
    /// Serve unchanged, record the verdict and a review item.
    Escalate,
}

impl PolicyAction {
    /// The action's name.
    pub fn name(self) -> &'static str {
        match self {
            PolicyAction::Block => "block",
            PolicyAction::Redact => "redact",
            PolicyAction::Flag => "flag",
            PolicyAction::Escalate => "escalate",
        }
    }
}

/// What an external detector does when it cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Treat as not fired.
    #[default]
    Allow,
    /// Treat as fired.
    Block,
}

/// One detector of a principle.
#[derive(Debug, Clone, PartialEq)]
pub enum DetectorConfig {
    /// Regular expressions (compiled into one set).
    Regex {
        /// The patterns.
        patterns: Vec<String>,
        /// Longest match a stream must hold back for (bytes).
        max_match: usize,
    },
    /// Whole-word phrases, case-insensitive.
    Keywords {
        /// The phrases.
        words: Vec<String>,
    },
    /// Text longer than this many characters.
    MaxLength {
        /// The limit.
        max_chars: usize,
    },
    /// The text must be valid JSON (and match `schema` when given).
    Json {
        /// A JSON Schema the value must satisfy.
        schema: Option<serde_json::Value>,
    },
    /// The model declined.
    Refusal,
    /// Personal data.
    Pii {
        /// Which kinds.
        entities: Vec<String>,
        /// Emails or `@domain`s not reported.
        allow: Vec<String>,
    },
    /// Credential shapes.
    Secrets,
    /// Known override phrasings (inputs).
    PromptInjection {
        /// Extra phrases beyond the built-in list.
        phrases: Vec<String>,
    },
    /// Ask a model with a rubric.
    Judge {
        /// Provider name.
        provider: String,
        /// Upstream model.
        model: Option<String>,
        /// The rubric text (inline).
        rubric: Option<String>,
        /// A file holding the rubric, relative to the config.
        rubric_file: Option<String>,
        /// Time allowed.
        timeout: Duration,
        /// What a failure means.
        on_error: OnError,
    },
    /// POST the text to a classifier.
    Webhook {
        /// Where.
        url: String,
        /// Time allowed.
        timeout: Duration,
        /// What a failure means.
        on_error: OnError,
    },
}

impl DetectorConfig {
    /// The `kind = "..."` name.
    pub fn kind(&self) -> &'static str {
        match self {
            DetectorConfig::Regex { .. } => "regex",
            DetectorConfig::Keywords { .. } => "keywords",
            DetectorConfig::MaxLength { .. } => "max_length",
            DetectorConfig::Json { .. } => "json",
            DetectorConfig::Refusal => "refusal",
            DetectorConfig::Pii { .. } => "pii",
            DetectorConfig::Secrets => "secrets",
            DetectorConfig::PromptInjection { .. } => "prompt_injection",
            DetectorConfig::Judge { .. } => "judge",
            DetectorConfig::Webhook { .. } => "webhook",
        }
    }

    /// Whether it reports spans precise enough to redact.
    pub fn has_spans(&self) -> bool {
        matches!(
            self,
            DetectorConfig::Regex { .. }
                | DetectorConfig::Keywords { .. }
                | DetectorConfig::Pii { .. }
                | DetectorConfig::Secrets
                | DetectorConfig::PromptInjection { .. }
        )
    }
}

/// Detector kinds accepted in `kind = "..."`.
pub const DETECTOR_KINDS: &[&str] = &[
    "regex",
    "keywords",
    "max_length",
    "json",
    "refusal",
    "pii",
    "secrets",
    "prompt_injection",
    "judge",
    "webhook",
];

/// One `[principles.ID]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PrincipleConfig {
    /// The principle's id.
    pub id: String,
    /// What it asks, in words.
    pub description: String,
    /// Inputs, outputs, or both.
    pub applies_to: Vec<Applies>,
    /// How serious.
    pub severity: Severity,
    /// What happens when it fires.
    pub action: PolicyAction,
    /// Its detectors (any firing fires the principle).
    pub detectors: Vec<DetectorConfig>,
    /// The answer served when an output is blocked.
    pub message: String,
    /// Red-team probe suites for this principle, relative to the config
    /// file (`sluice eval --principle ID` runs them).
    pub probes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrinciple {
    #[serde(default)]
    description: String,
    applies_to: Vec<Applies>,
    #[serde(default)]
    severity: Severity,
    action: PolicyAction,
    detectors: Vec<toml::Value>,
    message: Option<String>,
    #[serde(default)]
    probes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetector {
    kind: String,
    patterns: Option<Vec<String>>,
    max_match: Option<usize>,
    words: Option<Vec<String>>,
    max_chars: Option<usize>,
    entities: Option<Vec<String>>,
    allow: Option<Vec<String>>,
    phrases: Option<Vec<String>>,
    schema: Option<toml::Value>,
    provider: Option<String>,
    model: Option<String>,
    rubric: Option<String>,
    rubric_file: Option<String>,
    url: Option<String>,
    timeout: Option<String>,
    #[serde(default)]
    on_error: OnError,
}

fn build_detector(
    cx: &mut Cx,
    path: &str,
    v: toml::Value,
    providers: &BTreeMap<String, ProviderConfig>,
) -> Option<DetectorConfig> {
    let r: RawDetector = cx.decode(path, v)?;
    let need = |cx: &mut Cx, field: &str, ok: bool| {
        if !ok {
            cx.err(
                join_path(path, field),
                format!("required for kind \"{}\"", r.kind),
            );
        }
        ok
    };
    let timeout = |cx: &mut Cx| match &r.timeout {
        Some(s) => {
            parse_duration(cx, &join_path(path, "timeout"), s).unwrap_or(Duration::from_secs(2))
        }
        None => Duration::from_secs(2),
    };
    Some(match r.kind.as_str() {
        "regex" => {
            let patterns = r.patterns.clone().unwrap_or_default();
            if !need(cx, "patterns", !patterns.is_empty()) {
                return None;
            }
            if let Err((i, e)) = RegexDetector::new(&patterns) {
                cx.err(
                    format!("{}[{i}]", join_path(path, "patterns")),
                    format!("invalid regex: {}", e.lines().last().unwrap_or(&e)),
                );
                return None;
            }
            DetectorConfig::Regex {
                patterns,
                max_match: r.max_match.unwrap_or(64).clamp(1, 8192),
            }
        }
        "keywords" => {
            let words = r.words.clone().unwrap_or_default();
            if !need(cx, "words", !words.is_empty()) {
                return None;
            }
            DetectorConfig::Keywords { words }
        }
        "max_length" => {
            if !need(cx, "max_chars", r.max_chars.is_some_and(|m| m > 0)) {
                return None;
            }
            DetectorConfig::MaxLength {
                max_chars: r.max_chars.unwrap_or(1),
            }
        }
        "json" => {
            let schema = match &r.schema {
                Some(v) => match serde_json::to_value(v) {
                    Ok(j) => {
                        if let Err(e) = jsonschema::validator_for(&j) {
                            cx.err(
                                join_path(path, "schema"),
                                format!("invalid JSON Schema: {e}"),
                            );
                        }
                        Some(j)
                    }
                    Err(e) => {
                        cx.err(
                            join_path(path, "schema"),
                            format!("cannot convert to JSON: {e}"),
                        );
                        None
                    }
                },
                None => None,
            };
            DetectorConfig::Json { schema }
        }
        "refusal" => DetectorConfig::Refusal,
        "pii" => {
            let entities = r
                .entities
                .clone()
                .unwrap_or_else(|| PII_ENTITIES.iter().map(|s| s.to_string()).collect());
            for (i, e) in entities.iter().enumerate() {
                if !PII_ENTITIES.contains(&e.as_str()) {
                    let hint = did_you_mean(e, PII_ENTITIES.iter().copied())
                        .map(|s| format!("; did you mean \"{s}\"?"))
                        .unwrap_or_default();
                    cx.err(
                        format!("{}[{i}]", join_path(path, "entities")),
                        format!(
                            "unknown PII entity \"{e}\" (known: {}){hint}",
                            PII_ENTITIES.join(", ")
                        ),
                    );
                }
            }
            DetectorConfig::Pii {
                entities,
                allow: r.allow.clone().unwrap_or_default(),
            }
        }
        "secrets" => DetectorConfig::Secrets,
        "prompt_injection" => DetectorConfig::PromptInjection {
            phrases: r.phrases.clone().unwrap_or_default(),
        },
        "judge" => {
            let provider = r.provider.clone().unwrap_or_default();
            if !need(cx, "provider", !provider.is_empty()) {
                return None;
            }
            if !providers.contains_key(&provider) {
                cx.err(
                    join_path(path, "provider"),
                    unknown_ref(
                        "provider",
                        &provider,
                        providers.keys().map(String::as_str).collect(),
                    ),
                );
            }
            if r.rubric.is_some() == r.rubric_file.is_some() {
                cx.err(
                    path.to_string(),
                    "set exactly one of `rubric` and `rubric_file`",
                );
            }
            DetectorConfig::Judge {
                provider,
                model: r.model.clone(),
                rubric: r.rubric.clone(),
                rubric_file: r.rubric_file.clone(),
                timeout: timeout(cx),
                on_error: r.on_error,
            }
        }
        "webhook" => {
            let url = r.url.clone().unwrap_or_default();
            if !need(
                cx,
                "url",
                url.starts_with("http://") || url.starts_with("https://"),
            ) {
                return None;
            }
            DetectorConfig::Webhook {
                url,
                timeout: timeout(cx),
                on_error: r.on_error,
            }
        }
        other => {
            let hint = did_you_mean(other, DETECTOR_KINDS.iter().copied())
                .map(|s| format!("; did you mean \"{s}\"?"))
                .unwrap_or_default();
            cx.err(
                join_path(path, "kind"),
                format!(
                    "unknown detector kind \"{other}\" (known: {}){hint}",
                    DETECTOR_KINDS.join(", ")
                ),
            );
            return None;
        }
    })
}

pub(super) fn build_principles(
    cx: &mut Cx,
    v: Option<toml::Value>,
    providers: &BTreeMap<String, ProviderConfig>,
) -> BTreeMap<String, PrincipleConfig> {
    let mut out = BTreeMap::new();
    let Some(v) = v else { return out };
    let toml::Value::Table(t) = v else {
        cx.err("principles", "must be a table: use [principles.ID]");
        return out;
    };
    for (id, pv) in t {
        let path = format!("principles.{}", key(&id));
        let Some(raw) = cx.decode::<RawPrinciple>(&path, pv) else {
            continue;
        };
        if raw.applies_to.is_empty() {
            cx.err(
                format!("{path}.applies_to"),
                "name \"input\", \"output\" or both",
            );
        }
        if raw.detectors.is_empty() {
            cx.err(
                format!("{path}.detectors"),
                "a principle needs at least one detector",
            );
        }
        let mut detectors = Vec::new();
        let mut indexed = Vec::new();
        for (i, dv) in raw.detectors.into_iter().enumerate() {
            if let Some(d) = build_detector(cx, &format!("{path}.detectors[{i}]"), dv, providers) {
                indexed.push((i, d.clone()));
                detectors.push(d);
            }
        }
        if raw.action == PolicyAction::Redact {
            for (i, d) in &indexed {
                if !d.has_spans() {
                    cx.err(
                        format!("{path}.detectors[{i}]"),
                        format!("a \"{}\" detector reports no spans to redact; use action = \"block\", \"flag\" or \"escalate\"", d.kind()),
                    );
                }
            }
        }
        out.insert(
            id.clone(),
            PrincipleConfig {
                message: raw
                    .message
                    .unwrap_or_else(|| "I'm sorry, but I can't help with that.".to_string()),
                id,
                description: raw.description,
                applies_to: raw.applies_to,
                severity: raw.severity,
                action: raw.action,
                detectors,
                probes: raw.probes,
            },
        );
    }
    out
}
