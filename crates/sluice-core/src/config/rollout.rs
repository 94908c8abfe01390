//! Configuration of cohorts, rollout plans and admin tokens.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;

use super::{
    did_you_mean, join_path, key, parse_duration, unknown_ref, ApiKeySecret, Cx, DeploymentConfig,
};

/// Admin roles, from least to most powerful. A role may do everything the
/// roles below it may.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads rollouts and history.
    Viewer,
    /// Also reviews interactions and gives `reviewer` approvals.
    Reviewer,
    /// Also starts, advances, pauses, resumes, rolls back, promotes, aborts.
    Operator,
    /// Everything, including reloading the configuration.
    Admin,
}

impl Role {
    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Reviewer => "reviewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// One `[[admin_tokens]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminTokenConfig {
    /// Name recorded as the actor of each action taken with the token.
    pub name: String,
    /// What the token may do.
    pub role: Role,
    /// Where the token comes from.
    pub secret: ApiKeySecret,
}

/// One `[cohorts.NAME]` entry: a named set of users.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CohortConfig {
    /// The cohort's name.
    pub name: String,
    /// Subjects that belong to it by name.
    pub subjects: BTreeSet<String>,
    /// Requests whose `metadata` has all these key/value pairs belong to it.
    pub match_metadata: BTreeMap<String, String>,
    /// Requests with all these header values belong to it (names lowercase).
    pub match_headers: BTreeMap<String, String>,
}

/// Where a rollout reads a request's subject from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectSource {
    /// The request's `user` field.
    User,
    /// A request header (name lowercase).
    Header(String),
    /// The name of the API key used.
    ApiKey,
}

/// What a stage exposes.
#[derive(Debug, Clone, PartialEq)]
pub enum StageKind {
    /// Nobody is served by the candidate; stable's traffic is mirrored to it.
    Shadow(ShadowConfig),
    /// Members of these cohorts (and of earlier cohort stages) get the
    /// candidate.
    Cohort(Vec<String>),
    /// Subjects whose bucket is below `basis_points` (percent × 100) get the
    /// candidate, as do members of earlier cohort stages.
    Percent {
        /// Share of subjects in hundredths of a percent (0..=10000).
        basis_points: u32,
    },
}

impl StageKind {
    /// A short label: `shadow`, `cohort`, `percent-5`.
    pub fn label(&self) -> String {
        match self {
            StageKind::Shadow(_) => "shadow".into(),
            StageKind::Cohort(_) => "cohort".into(),
            StageKind::Percent { basis_points } => {
                if basis_points % 100 == 0 {
                    format!("percent-{}", basis_points / 100)
                } else {
                    format!("percent-{}", *basis_points as f64 / 100.0)
                }
            }
        }
    }
}

/// How a shadow stage mirrors traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowConfig {
    /// Share of stable's requests mirrored (0 < sample ≤ 1).
    pub sample: f64,
    /// Most mirrored calls in flight at once; beyond it a mirror is skipped
    /// (and counted), never queued.
    pub max_in_flight: usize,
    /// Time allowed for one mirrored call.
    pub timeout: Duration,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            sample: 1.0,
            max_in_flight: 64,
            timeout: Duration::from_secs(60),
        }
    }
}

/// A probe suite a stage requires before it opens.
#[derive(Debug, Clone, PartialEq)]
pub struct SuiteRequirement {
    /// The suite file, relative to the config file.
    pub suite: String,
    /// Least share of cases that must pass.
    pub min_pass_rate: f64,
}

/// A signal a gate judges (higher is worse for all of them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    /// Share of requests failing on the server or upstream side.
    ErrorRate,
    /// 95th-percentile latency of successful requests.
    LatencyP95,
    /// 95th-percentile time to first token of streams.
    TtftP95,
    /// Share of successful answers that refuse.
    RefusalRate,
    /// Share of thumbs feedback that is "down".
    FeedbackDownRate,
    /// Mean cost per successful request (needs `[prices]`).
    CostPerRequest,
    /// Mean output tokens per successful request.
    OutputTokens,
    /// Share of requests a constitution principle flags.
    FlagRate(String),
}

/// Signal names accepted in `signal = "..."`.
pub const SIGNALS: &[&str] = &[
    "error_rate",
    "latency_p95",
    "ttft_p95",
    "refusal_rate",
    "feedback_down_rate",
    "cost_per_request",
    "output_tokens",
    "flag_rate:PRINCIPLE",
];

impl Signal {
    /// Parses a signal name.
    pub fn parse(s: &str) -> Option<Signal> {
        Some(match s {
            "error_rate" => Signal::ErrorRate,
            "latency_p95" => Signal::LatencyP95,
            "ttft_p95" => Signal::TtftP95,
            "refusal_rate" => Signal::RefusalRate,
            "feedback_down_rate" => Signal::FeedbackDownRate,
            "cost_per_request" => Signal::CostPerRequest,
            "output_tokens" => Signal::OutputTokens,
            _ => match s.strip_prefix("flag_rate:") {
                Some(p) if !p.is_empty() => Signal::FlagRate(p.to_string()),
                _ => return None,
            },
        })
    }

    /// The signal's name.
    pub fn name(&self) -> String {
        match self {
            Signal::ErrorRate => "error_rate".into(),
            Signal::LatencyP95 => "latency_p95".into(),
            Signal::TtftP95 => "ttft_p95".into(),
            Signal::RefusalRate => "refusal_rate".into(),
            Signal::FeedbackDownRate => "feedback_down_rate".into(),
            Signal::CostPerRequest => "cost_per_request".into(),
            Signal::OutputTokens => "output_tokens".into(),
            Signal::FlagRate(p) => format!("flag_rate:{p}"),
        }
    }
}

/// How much worse the candidate may be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Margin {
    /// In the signal's own unit (a rate difference, milliseconds, USD, tokens).
    Absolute(f64),
    /// A share of the stable variant's value (`"10%"` is 0.10).
    Relative(f64),
}

/// One gate: a signal, a margin, and the test's error rate.
#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    /// What is judged.
    pub signal: Signal,
    /// The largest regression still acceptable.
    pub max_regression: Margin,
    /// Chance of a wrong verdict under continuous monitoring.
    pub alpha: f64,
    /// Observations per arm before any verdict but inconclusive.
    pub min_samples: u64,
}

/// Who advances a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControllerMode {
    /// The controller advances when gates pass and stage conditions hold.
    Auto,
    /// People advance; the controller still acts on failing gates.
    Manual,
}

/// One stage of a rollout plan.
#[derive(Debug, Clone, PartialEq)]
pub struct StageConfig {
    /// What it exposes.
    pub kind: StageKind,
    /// Least time in the stage before it may advance (paused time excluded).
    pub min_duration: Duration,
    /// Least requests served in the stage (both variants) before it may advance.
    pub min_requests: u64,
    /// Roles that must each approve before the stage may advance.
    pub approval: Vec<Role>,
    /// Longest the stage may stay undecided before it pauses for a human.
    pub max_duration: Option<Duration>,
    /// Probe suites the candidate must pass before the stage opens.
    pub require_suites: Vec<SuiteRequirement>,
}

/// What happens when a stage fails its gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Send everyone back to stable and end the rollout.
    #[default]
    Rollback,
    /// Stop exposing the candidate and wait for a human.
    Pause,
}

/// One `[rollouts.NAME]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutConfig {
    /// The rollout's name.
    pub name: String,
    /// The deployment it changes.
    pub deployment: String,
    /// The variant being rolled out.
    pub candidate: String,
    /// Where subjects come from.
    pub subject: SubjectSource,
    /// Salt of the assignment hash (default: the rollout's name), so a
    /// restarted process or a resumed rollout keeps everyone where they were.
    pub salt: String,
    /// The plan.
    pub stages: Vec<StageConfig>,
    /// What a failed stage does.
    pub on_failure: OnFailure,
    /// The gates every non-shadow stage must pass.
    pub gates: Vec<GateConfig>,
    /// How often gates are evaluated.
    pub evaluate_every: Duration,
    /// Who advances.
    pub controller: ControllerMode,
    /// What serves a candidate-assigned request when the candidate fails
    /// before answering (or its breaker is open).
    pub fallback: Fallback,
}

/// A rollout's `fallback` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// The stable variant serves; the failure still counts against the
    /// candidate in the gates.
    #[default]
    Stable,
    /// The client gets the candidate's error.
    None,
}

impl RolloutConfig {
    /// Cohorts whose members get the candidate at stage `i`: those of every
    /// cohort stage up to and including `i`.
    pub fn cohorts_through(&self, i: usize) -> Vec<&str> {
        self.stages
            .iter()
            .take(i + 1)
            .filter_map(|s| match &s.kind {
                StageKind::Cohort(c) => Some(c.iter().map(String::as_str)),
                _ => None,
            })
            .flatten()
            .collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminToken {
    name: String,
    role: Role,
    token_env: Option<String>,
    token_file: Option<String>,
    sha256: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    header: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCohort {
    #[serde(default)]
    subjects: BTreeSet<String>,
    #[serde(default, rename = "match")]
    matches: RawMatch,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    kind: String,
    percent: Option<f64>,
    cohorts: Option<Vec<String>>,
    min_duration: Option<String>,
    #[serde(default)]
    min_requests: u64,
    #[serde(default)]
    approval: Vec<Role>,
    max_duration: Option<String>,
    sample: Option<f64>,
    max_in_flight: Option<usize>,
    timeout: Option<String>,
    #[serde(default)]
    require_suites: Vec<RawSuiteRequirement>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSuiteRequirement {
    suite: String,
    #[serde(default = "all")]
    min_pass_rate: f64,
}

fn all() -> f64 {
    1.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    signal: String,
    max_regression: toml::Value,
    alpha: Option<f64>,
    min_samples: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    deployment: String,
    candidate: String,
    #[serde(default = "default_subject")]
    subject: String,
    salt: Option<String>,
    stages: Vec<toml::Value>,
    #[serde(default)]
    on_failure: OnFailure,
    #[serde(default)]
    gates: Vec<toml::Value>,
    evaluate_every: Option<String>,
    controller: Option<ControllerMode>,
    #[serde(default)]
    fallback: Fallback,
}

fn default_subject() -> String {
    "user".into()
}

pub(super) fn build_admin_tokens(cx: &mut Cx, v: Option<toml::Value>) -> Vec<AdminTokenConfig> {
    let Some(v) = v else { return Vec::new() };
    let toml::Value::Array(items) = v else {
        cx.err(
            "admin_tokens",
            "must be an array of tables: use [[admin_tokens]]",
        );
        return Vec::new();
    };
    let mut out: Vec<AdminTokenConfig> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("admin_tokens[{i}]");
        let Some(raw) = cx.decode::<RawAdminToken>(&path, item) else {
            continue;
        };
        if raw.name.trim().is_empty() {
            cx.err(format!("{path}.name"), "must not be empty");
        }
        if out.iter().any(|t| t.name == raw.name) {
            cx.err(
                format!("{path}.name"),
                format!("duplicate admin token name \"{}\"", raw.name),
            );
        }
        let Some(secret) = super::hashed_secret(
            cx,
            &path,
            ("token_env", raw.token_env),
            ("token_file", raw.token_file),
            raw.sha256,
            "token",
        ) else {
            continue;
        };
        out.push(AdminTokenConfig {
            name: raw.name,
            role: raw.role,
            secret,
        });
    }
    out
}

pub(super) fn build_cohorts(cx: &mut Cx, v: Option<toml::Value>) -> BTreeMap<String, CohortConfig> {
    let mut out = BTreeMap::new();
    let Some(v) = v else { return out };
    let toml::Value::Table(t) = v else {
        cx.err("cohorts", "must be a table: use [cohorts.NAME]");
        return out;
    };
    for (name, cv) in t {
        let path = format!("cohorts.{}", key(&name));
        let Some(raw) = cx.decode::<RawCohort>(&path, cv) else {
            out.insert(
                name.clone(),
                CohortConfig {
                    name,
                    ..Default::default()
                },
            );
            continue;
        };
        if raw.subjects.is_empty()
            && raw.matches.metadata.is_empty()
            && raw.matches.header.is_empty()
        {
            cx.err(
                &path,
                "an empty cohort matches nobody: set `subjects = [...]` or `match = { metadata.KEY = \"VALUE\" }`",
            );
        }
        for h in raw.matches.header.keys() {
            if h.is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                cx.err(
                    format!("{path}.match.header.{}", key(h)),
                    "not a valid header name",
                );
            }
        }
        out.insert(
            name.clone(),
            CohortConfig {
                name,
                subjects: raw.subjects,
                match_metadata: raw.matches.metadata,
                match_headers: raw
                    .matches
                    .header
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
            },
        );
    }
    out
}

fn build_stage(
    cx: &mut Cx,
    path: &str,
    v: toml::Value,
    cohorts: &BTreeMap<String, CohortConfig>,
) -> Option<StageConfig> {
    let raw: RawStage = cx.decode(path, v)?;
    let min_duration = match raw.min_duration {
        Some(s) => parse_duration(cx, &join_path(path, "min_duration"), &s)?,
        None => Duration::ZERO,
    };
    if raw.kind != "shadow" {
        for (set, f) in [
            (raw.sample.is_some(), "sample"),
            (raw.max_in_flight.is_some(), "max_in_flight"),
            (raw.timeout.is_some(), "timeout"),
        ] {
            if set {
                cx.err(
                    join_path(path, f),
                    format!("only a shadow stage takes `{f}` (it sets how traffic is mirrored)"),
                );
            }
        }
    }
    let mut require_suites = Vec::new();
    for (i, r) in raw.require_suites.iter().enumerate() {
        let rp = format!("{}[{i}]", join_path(path, "require_suites"));
        if r.suite.trim().is_empty() {
            cx.err(join_path(&rp, "suite"), "name a suite file (JSONL)");
        }
        if !(r.min_pass_rate > 0.0 && r.min_pass_rate <= 1.0) {
            cx.err(
                join_path(&rp, "min_pass_rate"),
                format!(
                    "must be greater than 0 and at most 1, got {}",
                    r.min_pass_rate
                ),
            );
        }
        require_suites.push(SuiteRequirement {
            suite: r.suite.clone(),
            min_pass_rate: r.min_pass_rate,
        });
    }
    let kind = match raw.kind.as_str() {
        "shadow" => {
            if raw.percent.is_some() || raw.cohorts.is_some() {
                cx.err(path, "a shadow stage takes neither `percent` nor `cohorts`");
            }
            let mut sh = ShadowConfig::default();
            if let Some(x) = raw.sample {
                if !(x > 0.0 && x <= 1.0) {
                    cx.err(
                        join_path(path, "sample"),
                        format!(
                            "must be greater than 0 and at most 1 (a share of requests), got {x}"
                        ),
                    );
                }
                sh.sample = x;
            }
            if let Some(n) = raw.max_in_flight {
                if n == 0 {
                    cx.err(join_path(path, "max_in_flight"), "must be at least 1");
                }
                sh.max_in_flight = n;
            }
            if let Some(t) = &raw.timeout {
                sh.timeout = parse_duration(cx, &join_path(path, "timeout"), t)?;
            }
            StageKind::Shadow(sh)
        }
        "cohort" => {
            if raw.percent.is_some() {
                cx.err(
                    join_path(path, "percent"),
                    "a cohort stage takes `cohorts`, not `percent`",
                );
            }
            let list = raw.cohorts.unwrap_or_default();
            if list.is_empty() {
                cx.err(join_path(path, "cohorts"), "name at least one cohort");
            }
            for c in &list {
                if !cohorts.contains_key(c) {
                    cx.err(
                        join_path(path, "cohorts"),
                        unknown_ref("cohort", c, cohorts.keys().map(String::as_str).collect()),
                    );
                }
            }
            StageKind::Cohort(list)
        }
        "percent" => {
            if raw.cohorts.is_some() {
                cx.err(
                    join_path(path, "cohorts"),
                    "a percent stage takes `percent`, not `cohorts`",
                );
            }
            let Some(p) = raw.percent else {
                cx.err(
                    join_path(path, "percent"),
                    "missing: the share of subjects, e.g. percent = 5",
                );
                return None;
            };
            let bp = (p * 100.0).round();
            if !(p > 0.0 && p <= 100.0) || (p * 100.0 - bp).abs() > 1e-6 {
                cx.err(
                    join_path(path, "percent"),
                    format!("must be greater than 0 and at most 100 in steps of 0.01, got {p}"),
                );
                return None;
            }
            StageKind::Percent {
                basis_points: bp as u32,
            }
        }
        other => {
            let hint = did_you_mean(other, ["shadow", "cohort", "percent"])
                .map(|s| format!("; did you mean \"{s}\"?"))
                .unwrap_or_default();
            cx.err(
                join_path(path, "kind"),
                format!("unknown stage kind \"{other}\" (known: shadow, cohort, percent){hint}"),
            );
            return None;
        }
    };
    let max_duration = match raw.max_duration {
        Some(s) => {
            let d = parse_duration(cx, &join_path(path, "max_duration"), &s)?;
            if d < min_duration {
                cx.err(
                    join_path(path, "max_duration"),
                    "must not be shorter than min_duration",
                );
            }
            Some(d)
        }
        None => None,
    };
    Some(StageConfig {
        kind,
        min_duration,
        min_requests: raw.min_requests,
        approval: raw.approval,
        max_duration,
        require_suites,
    })
}

fn build_gate(cx: &mut Cx, path: &str, v: toml::Value) -> Option<GateConfig> {
    let raw: RawGate = cx.decode(path, v)?;
    let Some(signal) = Signal::parse(&raw.signal) else {
        let hint = did_you_mean(&raw.signal, SIGNALS.iter().copied())
            .map(|s| format!("; did you mean \"{s}\"?"))
            .unwrap_or_default();
        cx.err(
            join_path(path, "signal"),
            format!(
                "unknown signal \"{}\" (known: {}){hint}",
                raw.signal,
                SIGNALS.join(", ")
            ),
        );
        return None;
    };
    let mpath = join_path(path, "max_regression");
    let max_regression = match raw.max_regression {
        toml::Value::Float(f) => Margin::Absolute(f),
        toml::Value::Integer(i) => Margin::Absolute(i as f64),
        toml::Value::String(s) => match s.trim().strip_suffix('%').map(|n| n.trim().parse::<f64>())
        {
            Some(Ok(p)) => Margin::Relative(p / 100.0),
            _ => {
                cx.err(&mpath, format!("invalid margin \"{s}\": a number in the signal's unit, or a percentage such as \"10%\""));
                return None;
            }
        },
        other => {
            cx.err(
                &mpath,
                format!(
                    "expected a number or a percentage string, got {}",
                    other.type_str()
                ),
            );
            return None;
        }
    };
    let m = match max_regression {
        Margin::Absolute(m) | Margin::Relative(m) => m,
    };
    if !m.is_finite() || m < 0.0 {
        cx.err(&mpath, "must be zero or more");
    }
    if matches!(
        signal,
        Signal::ErrorRate | Signal::RefusalRate | Signal::FeedbackDownRate | Signal::FlagRate(_)
    ) && matches!(max_regression, Margin::Absolute(m) if m >= 1.0)
    {
        cx.err(
            &mpath,
            "a rate difference must be below 1 (0.005 is half a percentage point)",
        );
    }
    let alpha = raw.alpha.unwrap_or(0.05);
    if alpha.is_nan() || alpha <= 0.0 || alpha >= 0.5 {
        cx.err(
            join_path(path, "alpha"),
            format!("must be between 0 and 0.5, got {alpha}"),
        );
    }
    Some(GateConfig {
        signal,
        max_regression,
        alpha,
        min_samples: raw.min_samples.unwrap_or(100).max(1),
    })
}

pub(super) fn build_rollouts(
    cx: &mut Cx,
    v: Option<toml::Value>,
    deployments: &BTreeMap<String, DeploymentConfig>,
    cohorts: &BTreeMap<String, CohortConfig>,
) -> BTreeMap<String, RolloutConfig> {
    let mut out = BTreeMap::new();
    let Some(v) = v else { return out };
    let toml::Value::Table(t) = v else {
        cx.err("rollouts", "must be a table: use [rollouts.NAME]");
        return out;
    };
    for (name, rv) in t {
        let path = format!("rollouts.{}", key(&name));
        let Some(raw) = cx.decode::<RawRollout>(&path, rv) else {
            continue;
        };
        match deployments.get(&raw.deployment) {
            None => cx.err(
                format!("{path}.deployment"),
                unknown_ref(
                    "deployment",
                    &raw.deployment,
                    deployments.keys().map(String::as_str).collect(),
                ),
            ),
            Some(d) => {
                if !d.variants.contains_key(&raw.candidate) {
                    cx.err(
                        format!("{path}.candidate"),
                        unknown_ref(
                            &format!("variant of deployment \"{}\"", d.name),
                            &raw.candidate,
                            d.variants.keys().map(String::as_str).collect(),
                        ),
                    );
                } else if raw.candidate == d.stable {
                    cx.err(
                        format!("{path}.candidate"),
                        format!(
                            "\"{}\" is already the stable variant of \"{}\"",
                            raw.candidate, d.name
                        ),
                    );
                }
            }
        }
        let subject = match raw.subject.as_str() {
            "user" => SubjectSource::User,
            "api_key" => SubjectSource::ApiKey,
            s => {
                match s.strip_prefix("header:") {
                    Some(h)
                        if !h.is_empty()
                            && h.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
                    {
                        SubjectSource::Header(h.to_ascii_lowercase())
                    }
                    _ => {
                        cx.err(
                        format!("{path}.subject"),
                        format!("invalid subject \"{s}\": use \"user\", \"api_key\" or \"header:NAME\""),
                    );
                        SubjectSource::User
                    }
                }
            }
        };
        if raw.stages.is_empty() {
            cx.err(
                format!("{path}.stages"),
                "a rollout needs at least one stage",
            );
        }
        let mut stages = Vec::new();
        for (i, sv) in raw.stages.into_iter().enumerate() {
            if let Some(s) = build_stage(cx, &format!("{path}.stages[{i}]"), sv, cohorts) {
                stages.push(s);
            }
        }
        let mut last = 0;
        for (i, s) in stages.iter().enumerate() {
            if let StageKind::Percent { basis_points } = s.kind {
                if basis_points < last {
                    cx.err(
                        format!("{path}.stages[{i}].percent"),
                        format!(
                            "percent stages must not shrink ({} after {}): a subject once exposed stays exposed",
                            basis_points as f64 / 100.0,
                            last as f64 / 100.0
                        ),
                    );
                }
                last = basis_points;
            }
        }
        let mut gates = Vec::new();
        for (i, gv) in raw.gates.into_iter().enumerate() {
            if let Some(g) = build_gate(cx, &format!("{path}.gates[{i}]"), gv) {
                gates.push(g);
            }
        }
        let evaluate_every = match raw.evaluate_every {
            Some(s) => parse_duration(cx, &format!("{path}.evaluate_every"), &s)
                .unwrap_or(Duration::from_secs(5)),
            None => Duration::from_secs(5),
        };
        let controller = raw.controller.unwrap_or(if gates.is_empty() {
            ControllerMode::Manual
        } else {
            ControllerMode::Auto
        });
        out.insert(
            name.clone(),
            RolloutConfig {
                gates,
                evaluate_every,
                controller,
                salt: raw.salt.unwrap_or_else(|| name.clone()),
                name,
                deployment: raw.deployment,
                candidate: raw.candidate,
                subject,
                stages,
                on_failure: raw.on_failure,
                fallback: raw.fallback,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, Role, StageKind, SubjectSource};

    const BASE: &str = r#"
[[api_keys]]
name = "app"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"

[providers.sim]
kind = "simulated"

[deployments.support]
stable = "v1"
principles = ["no-pii-leak"]
variants.v1 = { provider = "sim", model = "a" }
variants.v2 = { provider = "sim", model = "b" }

[principles.no-pii-leak]
applies_to = ["output"]
action = "flag"
detectors = [{ kind = "pii" }]

[cohorts.internal]
subjects = ["alice@corp.example", "bob@corp.example"]
[cohorts.beta]
match = { metadata.tier = "beta", header.x-team = "ml" }

[[admin_tokens]]
name = "ops"
role = "operator"
token_env = "SLUICE_OPS_TOKEN"
"#;

    fn errors(extra: &str) -> Vec<String> {
        match Config::parse(&format!("{BASE}{extra}")) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_reference_rollout_parses() {
        let c = Config::parse(&format!(
            "{BASE}{}",
            r#"
[rollouts.support-v2]
deployment = "support"
candidate = "v2"
subject = "header:X-User"
stages = [
  { kind = "shadow",  min_duration = "10m", min_requests = 200 },
  { kind = "cohort",  cohorts = ["internal"], min_duration = "30m" },
  { kind = "percent", percent = 1,  min_duration = "1h" },
  { kind = "percent", percent = 5,  min_duration = "2h", approval = ["operator"] },
  { kind = "percent", percent = 0.5e2 },
  { kind = "percent", percent = 100 },
]
on_failure = "pause"
"#
        ))
        .expect("valid");
        let r = &c.rollouts["support-v2"];
        assert_eq!(r.salt, "support-v2");
        assert_eq!(r.subject, SubjectSource::Header("x-user".into()));
        assert_eq!(r.stages.len(), 6);
        assert_eq!(r.stages[3].approval, vec![Role::Operator]);
        assert_eq!(r.stages[4].kind, StageKind::Percent { basis_points: 5000 });
        assert_eq!(r.stages[3].kind.label(), "percent-5");
        assert_eq!(c.cohorts["beta"].match_headers["x-team"], "ml");
        assert_eq!(c.admin_tokens[0].role, Role::Operator);
        assert_eq!(r.cohorts_through(5), vec!["internal"]);
    }

    #[test]
    fn rollout_mistakes_are_named() {
        let e = errors(
            r#"
[rollouts.bad]
deployment = "suport"
candidate = "v9"
subject = "cookie"
stages = [
  { kind = "percentage", percent = 5 },
  { kind = "cohort", cohorts = ["internl"] },
  { kind = "percent", percent = 10 },
  { kind = "percent", percent = 5 },
  { kind = "percent", percent = 150 },
]
"#,
        )
        .join("\n");
        for expected in [
            "rollouts.bad.deployment: unknown deployment \"suport\" (known: support); did you mean \"support\"?",
            "rollouts.bad.subject: invalid subject \"cookie\"",
            "rollouts.bad.stages[0].kind: unknown stage kind \"percentage\" (known: shadow, cohort, percent); did you mean \"percent\"?",
            "rollouts.bad.stages[1].cohorts: unknown cohort \"internl\" (known: beta, internal); did you mean \"internal\"?",
            "percent stages must not shrink (5 after 10)",
            "rollouts.bad.stages[4].percent: must be greater than 0 and at most 100",
        ] {
            assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
        }
        let e = errors("[rollouts.same]\ndeployment = \"support\"\ncandidate = \"v1\"\nstages = [{ kind = \"percent\", percent = 5 }]\n");
        assert!(e[0].contains("already the stable variant"), "{e:?}");
        let e = errors("[cohorts.empty]\n");
        assert!(
            e[0].starts_with("cohorts.empty: an empty cohort matches nobody"),
            "{e:?}"
        );
        let e = errors("[[admin_tokens]]\nname = \"x\"\nrole = \"god\"\nsha256 = \"00\"\n");
        assert!(e[0].starts_with("admin_tokens[1].role"), "{e:?}");
    }

    #[test]
    fn gates_parse_with_defaults_and_named_mistakes() {
        let c = Config::parse(&format!(
            "{BASE}{}",
            r#"
[rollouts.r]
deployment = "support"
candidate = "v2"
evaluate_every = "2s"
stages = [{ kind = "percent", percent = 5, max_duration = "1h" }]

[[rollouts.r.gates]]
signal = "error_rate"
max_regression = 0.005

[[rollouts.r.gates]]
signal = "latency_p95"
max_regression = "10%"
alpha = 0.01
min_samples = 500

[[rollouts.r.gates]]
signal = "flag_rate:no-pii-leak"
max_regression = 0.001
"#
        ))
        .expect("valid");
        let r = &c.rollouts["r"];
        assert_eq!(r.controller, super::ControllerMode::Auto);
        assert_eq!(r.evaluate_every, std::time::Duration::from_secs(2));
        assert_eq!(r.gates.len(), 3);
        assert_eq!(r.gates[0].alpha, 0.05);
        assert_eq!(r.gates[0].min_samples, 100);
        assert_eq!(r.gates[1].max_regression, super::Margin::Relative(0.10));
        assert_eq!(
            r.gates[2].signal,
            super::Signal::FlagRate("no-pii-leak".into())
        );
        assert_eq!(
            r.stages[0].max_duration,
            Some(std::time::Duration::from_secs(3600))
        );

        let e = errors(
            r#"
[rollouts.r]
deployment = "support"
candidate = "v2"
stages = [{ kind = "percent", percent = 5, min_duration = "2h", max_duration = "1h" }]
gates = [
  { signal = "eror_rate", max_regression = 0.01 },
  { signal = "error_rate", max_regression = "lots" },
  { signal = "error_rate", max_regression = 2 },
  { signal = "error_rate", max_regression = 0.01, alpha = 0.7 },
]
"#,
        )
        .join("\n");
        for expected in [
            "rollouts.r.stages[0].max_duration: must not be shorter than min_duration",
            "rollouts.r.gates[0].signal: unknown signal \"eror_rate\"",
            "did you mean \"error_rate\"?",
            "rollouts.r.gates[1].max_regression: invalid margin \"lots\"",
            "rollouts.r.gates[2].max_regression: a rate difference must be below 1",
            "rollouts.r.gates[3].alpha: must be between 0 and 0.5",
        ] {
            assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
        }
    }
}
