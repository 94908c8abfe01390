//! The configuration model and its validation.
//!
//! Parsing happens in two steps so that a user sees *every* problem at once,
//! each with its TOML path:
//! 1. the text is parsed as a TOML table (syntax errors stop here);
//! 2. each section and entry is decoded and checked on its own, and every
//!    failure is collected as a [`ConfigError`] with a path such as
//!    `deployments.support.variants.v2.provider`.
//!
//! Nothing here reads the environment or files: secrets stay as
//! [`SecretSource`]s until the gateway resolves them at startup.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::secret::{parse_digest_hex, KeyDigest, SecretSource};

mod policy;
mod resilience;
mod rollout;

pub use self::resilience::ServerLimits;
pub use crate::resilience::{BreakerConfig, RetryConfig};

pub use policy::{
    Applies, DetectorConfig, OnError, PolicyAction, PrincipleConfig, Severity, DETECTOR_KINDS,
};

pub use rollout::{
    AdminTokenConfig, CohortConfig, ControllerMode, Fallback, GateConfig, Margin, OnFailure, Role,
    RolloutConfig, ShadowConfig, Signal, StageConfig, StageKind, SubjectSource, SuiteRequirement,
    SIGNALS,
};

/// The price of a model, USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per million input tokens.
    pub input_per_mtok: f64,
    /// Per million output tokens.
    pub output_per_mtok: f64,
}

impl Price {
    /// The cost of one request in USD.
    pub fn cost(&self, tokens_in: u64, tokens_out: u64) -> f64 {
        (tokens_in as f64 * self.input_per_mtok + tokens_out as f64 * self.output_per_mtok) / 1e6
    }
}

/// The provider kinds sluice can talk to.
pub const PROVIDER_KINDS: &[&str] = &["openai", "anthropic", "simulated"];

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default request body limit (4 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// One problem found in a configuration, with the TOML path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted TOML path, e.g. `deployments.support.variants.v2.provider`
    /// (empty for whole-file problems such as a syntax error).
    pub path: String,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} problem{} in configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// What request and response bodies the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogBodies {
    /// Request and response bodies are stored in full.
    #[default]
    Full,
    /// Only metadata (ids, timings, tokens, status) is stored.
    Metadata,
    /// Bodies are stored after the PII and secrets detectors replaced what
    /// they found with `[REDACTED:KIND]`.
    Redacted,
}

/// What the event writer does when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backpressure {
    /// Append the record to an on-disk journal next to the store, replayed
    /// into the store as soon as the writer catches up (and at startup).
    #[default]
    Spill,
    /// Drop the record; every drop is counted in `/metrics` and `/healthz`.
    Shed,
}

/// When a request's record must be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Records are committed in groups right after the response; a crash
    /// loses at most the records of the last commit window.
    #[default]
    Batched,
    /// The response (the last bytes of a stream) is sent only after the
    /// request's record is committed.
    Strict,
}

/// The `[store]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// SQLite file path, or `:memory:`.
    pub path: String,
    /// Which bodies are recorded.
    pub log_bodies: LogBodies,
    /// Capacity of the bounded channel between the request path and the writer.
    pub queue_capacity: usize,
    /// Most events written in one transaction.
    pub batch_max: usize,
    /// What happens when the writer's queue is full.
    pub on_backpressure: Backpressure,
    /// When a record must be committed relative to its response.
    pub durability: Durability,
    /// Longest time a handed-over record waits before its group is committed.
    pub commit_window: Duration,
}

/// How a client API key is configured.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiKeySecret {
    /// The digest is known from the config.
    Sha256(KeyDigest),
    /// The key is read at startup and hashed.
    Source(SecretSource),
}

/// One `[[api_keys]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyConfig {
    /// Name recorded with each request made with this key.
    pub name: String,
    /// Where the key comes from.
    pub secret: ApiKeySecret,
    /// Deployments this key may call; `None` means all.
    pub deployments: Option<Vec<String>>,
    /// What the key may do beyond calling deployments.
    pub role: KeyRole,
}

/// The role of a client API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyRole {
    /// Calls deployments.
    #[default]
    Client,
    /// May also pin a variant with the `x-sluice-variant` request header
    /// (for testing a candidate before it is exposed).
    Operator,
}

/// Latency distribution of the simulated provider: lognormal with the given
/// median and 99th percentile.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyConfig {
    /// Median total latency in milliseconds.
    pub median_ms: f64,
    /// 99th-percentile total latency in milliseconds.
    pub p99_ms: f64,
}

/// Settings of the `simulated` provider.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedConfig {
    /// Seed mixed into every generated response.
    pub seed: u64,
    /// Latency distribution.
    pub latency: LatencyConfig,
    /// Share of requests answered with an upstream error (HTTP 500).
    pub error_rate: f64,
    /// Share of responses that leak PII-like strings (emails, phone numbers).
    pub pii_rate: f64,
    /// Share of responses that refuse.
    pub refusal_rate: f64,
    /// Multiplier on response length (1.0 = about 40 words).
    pub verbosity: f64,
    /// Share of requests offering tools that answer with a tool call.
    pub tool_call_rate: f64,
}

/// Settings of an `openai` (any OpenAI-compatible) provider.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiConfig {
    /// Base URL including the version segment, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// API key source; `None` sends no `Authorization` header.
    pub api_key: Option<SecretSource>,
    /// Extra headers sent upstream.
    pub headers: BTreeMap<String, String>,
}

/// Settings of an `anthropic` (Messages API) provider.
#[derive(Debug, Clone, PartialEq)]
pub struct AnthropicConfig {
    /// Base URL without `/v1`, e.g. `https://api.anthropic.com`.
    pub base_url: String,
    /// API key source (sent as `x-api-key`).
    pub api_key: Option<SecretSource>,
    /// Value of the `anthropic-version` header.
    pub version: String,
    /// `max_tokens` used when the client sets none (the Messages API requires one).
    pub default_max_tokens: u32,
}

/// Kind-specific provider settings.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderKind {
    /// Any OpenAI-compatible upstream.
    OpenAi(OpenAiConfig),
    /// Anthropic's Messages API.
    Anthropic(AnthropicConfig),
    /// The built-in simulator for demos and tests (no network).
    Simulated(SimulatedConfig),
}

impl ProviderKind {
    /// The `kind = "..."` string.
    pub fn name(&self) -> &'static str {
        match self {
            ProviderKind::OpenAi(_) => "openai",
            ProviderKind::Anthropic(_) => "anthropic",
            ProviderKind::Simulated(_) => "simulated",
        }
    }
}

/// One `[providers.NAME]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    /// The provider's name in the config.
    pub name: String,
    /// Kind-specific settings.
    pub kind: ProviderKind,
    /// Total time allowed for a non-streamed call; for streams, the time to the
    /// first byte and the longest silence between two chunks.
    pub timeout: Duration,
    /// Time allowed to establish a connection.
    pub connect_timeout: Duration,
    /// Streams: time allowed until the response headers and first chunk.
    pub first_byte_timeout: Duration,
    /// Streams: longest silence allowed between two chunks.
    pub idle_timeout: Duration,
    /// Streams: longest a whole stream may last.
    pub stream_timeout: Duration,
    /// Idle connections kept open to the provider for reuse; a connection
    /// finishing beyond it is closed, and the next burst pays new
    /// connections (and TLS handshakes) again.
    pub max_idle_connections: usize,
    /// When and how failed calls are retried.
    pub retry: RetryConfig,
    /// The endpoint's circuit breaker.
    pub breaker: BreakerConfig,
}

/// One variant: a concrete provider + model + prompt + parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantConfig {
    /// The variant's name within its deployment.
    pub name: String,
    /// Name of the provider that serves it.
    pub provider: String,
    /// Upstream model name.
    pub model: String,
    /// System prompt prepended to every conversation (before the client's own
    /// system messages).
    pub system_prompt: Option<String>,
    /// A file holding the system prompt, relative to the config file; read
    /// when the gateway starts or reloads.
    pub system_prompt_file: Option<String>,
    /// Default request parameters (temperature, max_tokens, ...) applied when
    /// the client did not set them.
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// One `[deployments.NAME]` entry: the name clients put in `model`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentConfig {
    /// The deployment's name.
    pub name: String,
    /// Name of the variant serving everyone now.
    pub stable: String,
    /// All variants, by name.
    pub variants: BTreeMap<String, VariantConfig>,
    /// Principles of the constitution enforced on this deployment.
    pub principles: Vec<String>,
    /// Variants tried in order when the stable variant fails before
    /// answering (or its breaker is open).
    pub fallbacks: Vec<String>,
    /// Most requests to this deployment at once; beyond it, 429.
    pub max_in_flight: Option<usize>,
}

impl DeploymentConfig {
    /// The stable variant (validation guarantees it exists).
    pub fn stable_variant(&self) -> &VariantConfig {
        &self.variants[&self.stable]
    }
}

/// A validated sluice configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address the gateway listens on.
    pub listen: SocketAddr,
    /// Separate address for the admin API (`/admin/...`); when set, the
    /// admin routes are served only there.
    pub admin_listen: Option<SocketAddr>,
    /// Overload and slow-client limits.
    pub limits: ServerLimits,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Serve requests without an API key (only when no keys are configured).
    pub allow_anonymous: bool,
    /// The store.
    pub store: StoreConfig,
    /// Client API keys.
    pub api_keys: Vec<ApiKeyConfig>,
    /// Providers by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Deployments by name.
    pub deployments: BTreeMap<String, DeploymentConfig>,
    /// Named sets of users.
    pub cohorts: BTreeMap<String, CohortConfig>,
    /// Rollout plans by name.
    pub rollouts: BTreeMap<String, RolloutConfig>,
    /// Tokens for the admin API.
    pub admin_tokens: Vec<AdminTokenConfig>,
    /// Prices by upstream model name.
    pub prices: BTreeMap<String, Price>,
    /// The constitution: principles by id.
    pub principles: BTreeMap<String, PrincipleConfig>,
}

impl Config {
    /// Parses and validates a configuration, returning every problem found.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                return Err(ConfigErrors(vec![ConfigError {
                    path: String::new(),
                    message: format!("invalid TOML: {}", e.to_string().trim_end()),
                }]))
            }
        };
        let mut cx = Cx::default();
        let config = build(&mut cx, table);
        if cx.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(cx.errors))
        }
    }

    /// Every secret source the config names, with the TOML path naming it.
    pub fn secret_sources(&self) -> Vec<(String, SecretSource)> {
        let mut out = Vec::new();
        for (i, k) in self.api_keys.iter().enumerate() {
            if let ApiKeySecret::Source(s) = &k.secret {
                out.push((format!("api_keys[{i}]"), s.clone()));
            }
        }
        for (i, t) in self.admin_tokens.iter().enumerate() {
            if let ApiKeySecret::Source(s) = &t.secret {
                out.push((format!("admin_tokens[{i}]"), s.clone()));
            }
        }
        for (name, p) in &self.providers {
            let src = match &p.kind {
                ProviderKind::OpenAi(o) => o.api_key.clone(),
                ProviderKind::Anthropic(a) => a.api_key.clone(),
                ProviderKind::Simulated(_) => None,
            };
            if let Some(s) = src {
                out.push((format!("providers.{name}"), s));
            }
        }
        out
    }
}

#[derive(Default)]
struct Cx {
    errors: Vec<ConfigError>,
}

impl Cx {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Decodes `value` as `T`, recording a path-precise error on failure.
    fn decode<T: DeserializeOwned>(&mut self, path: &str, value: toml::Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let inner = e.path().to_string();
                let full = join_path(path, if inner == "." { "" } else { &inner });
                self.err(full, clean_serde_message(&e.inner().to_string()));
                None
            }
        }
    }
}

fn join_path(prefix: &str, rest: &str) -> String {
    match (prefix.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_string(),
        (_, true) => prefix.to_string(),
        _ if rest.starts_with('[') => format!("{prefix}{rest}"),
        _ => format!("{prefix}.{rest}"),
    }
}

fn clean_serde_message(m: &str) -> String {
    let mut m = m.trim_end().trim_end_matches('.').replace('\n', " ");
    // toml appends " in `key`", which the path already says.
    if let Some(p) = m.rfind(" in `") {
        if m.ends_with('`') {
            m.truncate(p);
        }
    }
    m
}

/// Quotes a TOML key when it is not a bare key.
fn key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        k.to_string()
    } else {
        format!("\"{}\"", k.replace('"', "\\\""))
    }
}

/// The closest candidate by edit distance, when it is close enough to be a
/// plausible typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    let w = word.to_lowercase();
    for c in candidates {
        let lc = c.to_lowercase();
        // A word that extends or shortens a known one is a near miss too, and
        // so is a typo of one segment of a compound name (`opnai` for
        // `openai-main`).
        let d = if lc.len() >= 4 && (w.starts_with(&lc) || lc.starts_with(&w)) && w.len() >= 4 {
            1
        } else {
            let whole = levenshtein(&w, &lc);
            let segment = lc
                .split(['-', '_', '.'])
                .filter(|seg| seg.len() >= 4 && lc.contains(['-', '_', '.']))
                .map(|seg| levenshtein(&w, seg) + 1)
                .min()
                .unwrap_or(usize::MAX);
            whole.min(segment)
        };
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.filter(|(d, _)| *d <= (word.len() / 3).max(1) + 1)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn known_list(mut names: Vec<&str>) -> String {
    if names.is_empty() {
        return "none are configured".to_string();
    }
    names.sort_unstable();
    format!("known: {}", names.join(", "))
}

fn unknown_ref(what: &str, value: &str, known: Vec<&str>) -> String {
    let hint = did_you_mean(value, known.iter().copied())
        .map(|s| format!("; did you mean \"{s}\"?"))
        .unwrap_or_default();
    format!("unknown {what} \"{value}\" ({}){hint}", known_list(known))
}

fn parse_duration(cx: &mut Cx, path: &str, s: &str) -> Option<Duration> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d > Duration::ZERO => Some(d),
        Ok(_) => {
            cx.err(path, "must be longer than zero");
            None
        }
        Err(e) => {
            cx.err(
                path,
                format!("invalid duration \"{s}\": {e} (examples: \"500ms\", \"30s\", \"2m\")"),
            );
            None
        }
    }
}

fn check_rate(cx: &mut Cx, path: String, v: f64) {
    if !(0.0..=1.0).contains(&v) || v.is_nan() {
        cx.err(path, format!("must be between 0.0 and 1.0, got {v}"));
    }
}

fn secret_source(
    cx: &mut Cx,
    path: &str,
    env_field: &str,
    env: Option<String>,
    file_field: &str,
    file: Option<String>,
) -> Option<SecretSource> {
    match (env, file) {
        (Some(_), Some(_)) => {
            cx.err(
                path,
                format!("set only one of `{env_field}` and `{file_field}`"),
            );
            None
        }
        (Some(e), None) if e.trim().is_empty() => {
            cx.err(format!("{path}.{env_field}"), "must not be empty");
            None
        }
        (Some(e), None) => Some(SecretSource::Env(e)),
        (None, Some(f)) if f.trim().is_empty() => {
            cx.err(format!("{path}.{file_field}"), "must not be empty");
            None
        }
        (None, Some(f)) => Some(SecretSource::File(f)),
        (None, None) => None,
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<String>,
    #[serde(default)]
    log_bodies: LogBodies,
    queue_capacity: Option<usize>,
    batch_max: Option<usize>,
    #[serde(default)]
    on_backpressure: Backpressure,
    #[serde(default)]
    durability: Durability,
    commit_window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    name: String,
    key_env: Option<String>,
    key_file: Option<String>,
    sha256: Option<String>,
    deployments: Option<Vec<String>>,
    #[serde(default)]
    role: KeyRole,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpenAi {
    base_url: Option<String>,
    api_key_env: Option<String>,
    api_key_file: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnthropic {
    base_url: Option<String>,
    api_key_env: Option<String>,
    api_key_file: Option<String>,
    version: Option<String>,
    default_max_tokens: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSimulated {
    #[serde(default)]
    seed: u64,
    latency: Option<LatencyConfig>,
    #[serde(default)]
    error_rate: f64,
    #[serde(default)]
    pii_rate: f64,
    #[serde(default)]
    refusal_rate: f64,
    verbosity: Option<f64>,
    #[serde(default)]
    tool_call_rate: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    provider: String,
    model: String,
    system_prompt: Option<String>,
    system_prompt_file: Option<String>,
    #[serde(default)]
    params: serde_json::Map<String, serde_json::Value>,
}

/// Request parameters a variant may set as defaults.
pub const VARIANT_PARAMS: &[&str] = &[
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "reasoning_effort",
    "parallel_tool_calls",
    "service_tier",
];

fn take<T: DeserializeOwned>(
    cx: &mut Cx,
    table: &mut toml::Table,
    path: &str,
    field: &str,
) -> Option<T> {
    let v = table.remove(field)?;
    cx.decode(&join_path(path, field), v)
}

fn build(cx: &mut Cx, mut t: toml::Table) -> Config {
    let listen_s: String = take(cx, &mut t, "", "listen").unwrap_or(DEFAULT_LISTEN.to_string());
    let listen = match listen_s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            cx.err(
                "listen",
                format!(
                    "invalid address \"{listen_s}\": expected IP:PORT such as \"127.0.0.1:8080\""
                ),
            );
            DEFAULT_LISTEN
                .parse()
                .expect("default listen address parses")
        }
    };
    let max_body_bytes: usize =
        take(cx, &mut t, "", "max_body_bytes").unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes == 0 || max_body_bytes > 1 << 30 {
        cx.err(
            "max_body_bytes",
            format!("must be between 1 and 1073741824 (1 GiB), got {max_body_bytes}"),
        );
    }
    let allow_anonymous: bool = take(cx, &mut t, "", "allow_anonymous").unwrap_or(false);

    let raw_store: RawStore = take(cx, &mut t, "", "store").unwrap_or_default();
    let store = StoreConfig {
        path: raw_store.path.unwrap_or_else(|| "sluice.db".to_string()),
        log_bodies: raw_store.log_bodies,
        queue_capacity: raw_store.queue_capacity.unwrap_or(65_536),
        batch_max: raw_store.batch_max.unwrap_or(1024),
        on_backpressure: raw_store.on_backpressure,
        durability: raw_store.durability,
        commit_window: raw_store
            .commit_window
            .and_then(|s| parse_duration(cx, "store.commit_window", &s))
            .unwrap_or(Duration::from_millis(50)),
    };
    if store.commit_window > Duration::from_secs(10) {
        cx.err("store.commit_window", "must be at most 10s");
    }
    let admin_listen = match take::<String>(cx, &mut t, "", "admin_listen") {
        None => None,
        Some(a) => match a.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                cx.err(
                    "admin_listen",
                    format!("invalid address \"{a}\": expected IP:PORT such as \"127.0.0.1:8081\""),
                );
                None
            }
        },
    };
    let limits = resilience::server_limits(cx, &mut t);
    if store.path.trim().is_empty() {
        cx.err(
            "store.path",
            "must not be empty (use \":memory:\" for an in-memory store)",
        );
    }
    if store.queue_capacity == 0 {
        cx.err("store.queue_capacity", "must be at least 1");
    }
    if store.batch_max == 0 {
        cx.err("store.batch_max", "must be at least 1");
    }

    let raw_keys = t
        .get("api_keys")
        .and_then(toml::Value::as_array)
        .map_or(0, Vec::len);
    let api_keys = build_api_keys(cx, t.remove("api_keys"));
    let providers = build_providers(cx, t.remove("providers"));
    let deployments = build_deployments(cx, t.remove("deployments"), &providers);
    let principles = policy::build_principles(cx, t.remove("principles"), &providers);
    for d in deployments.values() {
        for p in &d.principles {
            if !principles.contains_key(p) {
                cx.err(
                    format!("deployments.{}.principles", key(&d.name)),
                    unknown_ref(
                        "principle",
                        p,
                        principles.keys().map(String::as_str).collect(),
                    ),
                );
            }
        }
    }
    let cohorts = rollout::build_cohorts(cx, t.remove("cohorts"));
    let rollouts = rollout::build_rollouts(cx, t.remove("rollouts"), &deployments, &cohorts);
    for r in rollouts.values() {
        for (i, g) in r.gates.iter().enumerate() {
            if let Signal::FlagRate(p) = &g.signal {
                let enforced = deployments
                    .get(&r.deployment)
                    .is_some_and(|d| d.principles.iter().any(|x| x == p));
                if !enforced {
                    cx.err(
                        format!("rollouts.{}.gates[{i}].signal", key(&r.name)),
                        format!(
                            "principle \"{p}\" is not enforced on deployment \"{}\" (add it to its `principles`)",
                            r.deployment
                        ),
                    );
                }
            }
        }
    }
    let admin_tokens = rollout::build_admin_tokens(cx, t.remove("admin_tokens"));
    let prices: BTreeMap<String, Price> = take(cx, &mut t, "", "prices").unwrap_or_default();
    for (m, p) in &prices {
        if p.input_per_mtok.is_nan()
            || p.output_per_mtok.is_nan()
            || p.input_per_mtok < 0.0
            || p.output_per_mtok < 0.0
        {
            cx.err(format!("prices.{}", key(m)), "prices must be zero or more");
        }
    }

    for (i, k) in api_keys.iter().enumerate() {
        for d in k.deployments.iter().flatten() {
            if !deployments.contains_key(d) {
                cx.err(
                    format!("api_keys[{i}].deployments"),
                    unknown_ref(
                        "deployment",
                        d,
                        deployments.keys().map(String::as_str).collect(),
                    ),
                );
            }
        }
    }
    if raw_keys > 0 && allow_anonymous {
        cx.err(
            "allow_anonymous",
            "cannot be true while [[api_keys]] are configured: remove the keys or this setting",
        );
    }
    if raw_keys == 0 && !allow_anonymous {
        cx.err(
            "api_keys",
            "no API keys configured: add an [[api_keys]] entry (key_env, key_file or sha256), \
             or set `allow_anonymous = true` to serve without authentication",
        );
    }

    let known_top = [
        "listen",
        "admin_listen",
        "max_in_flight",
        "header_timeout",
        "keep_alive_timeout",
        "body_timeout",
        "max_header_bytes",
        "shutdown_grace",
        "listen_backlog",
        "max_connections",
        "workers",
        "max_body_bytes",
        "allow_anonymous",
        "store",
        "api_keys",
        "providers",
        "deployments",
        "cohorts",
        "rollouts",
        "admin_tokens",
        "prices",
        "principles",
    ];
    for k in t.keys() {
        let hint = did_you_mean(k, known_top)
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        cx.err(key(k), format!("unknown setting{hint}"));
    }

    Config {
        listen,
        admin_listen,
        limits,
        max_body_bytes,
        allow_anonymous,
        store,
        api_keys,
        providers,
        deployments,
        cohorts,
        rollouts,
        admin_tokens,
        prices,
        principles,
    }
}

/// A secret given as exactly one of an environment variable, a file, or its
/// SHA-256 digest (API keys and admin tokens).
fn hashed_secret(
    cx: &mut Cx,
    path: &str,
    env: (&str, Option<String>),
    file: (&str, Option<String>),
    sha256: Option<String>,
    what: &str,
) -> Option<ApiKeySecret> {
    let set = [env.1.is_some(), file.1.is_some(), sha256.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set != 1 {
        cx.err(
            path,
            format!("set exactly one of `{}`, `{}` or `sha256`", env.0, file.0),
        );
        return None;
    }
    if let Some(h) = sha256 {
        return match parse_digest_hex(&h) {
            Some(d) => Some(ApiKeySecret::Sha256(d)),
            None => {
                cx.err(
                    format!("{path}.sha256"),
                    format!("must be 64 hex digits (the SHA-256 of the {what}, e.g. from `sluice hash-key`)"),
                );
                None
            }
        };
    }
    secret_source(cx, path, env.0, env.1, file.0, file.1).map(ApiKeySecret::Source)
}

fn build_api_keys(cx: &mut Cx, v: Option<toml::Value>) -> Vec<ApiKeyConfig> {
    let Some(v) = v else { return Vec::new() };
    let toml::Value::Array(items) = v else {
        cx.err("api_keys", "must be an array of tables: use [[api_keys]]");
        return Vec::new();
    };
    let mut out: Vec<ApiKeyConfig> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("api_keys[{i}]");
        let Some(raw) = cx.decode::<RawApiKey>(&path, item) else {
            continue;
        };
        if raw.name.trim().is_empty() {
            cx.err(format!("{path}.name"), "must not be empty");
        }
        if out.iter().any(|k| k.name == raw.name) {
            cx.err(
                format!("{path}.name"),
                format!("duplicate API key name \"{}\"", raw.name),
            );
        }
        let Some(secret) = hashed_secret(
            cx,
            &path,
            ("key_env", raw.key_env),
            ("key_file", raw.key_file),
            raw.sha256,
            "key",
        ) else {
            continue;
        };
        out.push(ApiKeyConfig {
            name: raw.name,
            secret,
            deployments: raw.deployments,
            role: raw.role,
        });
    }
    out
}

fn build_providers(cx: &mut Cx, v: Option<toml::Value>) -> BTreeMap<String, ProviderConfig> {
    let mut out = BTreeMap::new();
    let Some(v) = v else { return out };
    let toml::Value::Table(t) = v else {
        cx.err(
            "providers",
            "must be a table of providers: use [providers.NAME]",
        );
        return out;
    };
    for (name, pv) in t {
        let path = format!("providers.{}", key(&name));
        let toml::Value::Table(mut pt) = pv else {
            cx.err(&path, "must be a table");
            continue;
        };
        let kind: Option<String> = take(cx, &mut pt, &path, "kind");
        let Some(kind) = kind else {
            if !cx.errors.iter().any(|e| e.path == format!("{path}.kind")) {
                cx.err(
                    format!("{path}.kind"),
                    format!("missing (known kinds: {})", PROVIDER_KINDS.join(", ")),
                );
            }
            continue;
        };
        let timeout_s: Option<String> = take(cx, &mut pt, &path, "timeout");
        let connect_s: Option<String> = take(cx, &mut pt, &path, "connect_timeout");
        let first_byte_s: Option<String> = take(cx, &mut pt, &path, "first_byte_timeout");
        let idle_s: Option<String> = take(cx, &mut pt, &path, "idle_timeout");
        let stream_s: Option<String> = take(cx, &mut pt, &path, "stream_timeout");
        let max_idle_connections: usize =
            take(cx, &mut pt, &path, "max_idle_connections").unwrap_or(1024);
        let retry = resilience::retry(cx, &path, pt.remove("retry"));
        let breaker = resilience::breaker(cx, &path, pt.remove("breaker"));
        let timeout = match timeout_s {
            Some(s) => parse_duration(cx, &format!("{path}.timeout"), &s),
            None => Some(Duration::from_secs(60)),
        };
        let or_timeout = |cx: &mut Cx, field: &str, v: Option<String>| match v {
            Some(s) => parse_duration(cx, &format!("{path}.{field}"), &s),
            None => timeout,
        };
        let first_byte_timeout = or_timeout(cx, "first_byte_timeout", first_byte_s);
        let idle_timeout = or_timeout(cx, "idle_timeout", idle_s);
        let stream_timeout = match stream_s {
            Some(s) => parse_duration(cx, &format!("{path}.stream_timeout"), &s),
            None => Some(Duration::from_secs(600)),
        };
        let connect_timeout = match connect_s {
            Some(s) => parse_duration(cx, &format!("{path}.connect_timeout"), &s),
            None => Some(Duration::from_secs(10)),
        };
        let rest = toml::Value::Table(pt);
        let kind = match kind.as_str() {
            "openai" => cx.decode::<RawOpenAi>(&path, rest).map(|r| {
                let (base_url, api_key) = endpoint(
                    cx,
                    &path,
                    r.base_url,
                    "https://api.openai.com/v1",
                    r.api_key_env,
                    r.api_key_file,
                );
                ProviderKind::OpenAi(OpenAiConfig {
                    base_url,
                    api_key,
                    headers: r.headers,
                })
            }),
            "anthropic" => cx.decode::<RawAnthropic>(&path, rest).map(|r| {
                let (base_url, api_key) = endpoint(
                    cx,
                    &path,
                    r.base_url,
                    "https://api.anthropic.com",
                    r.api_key_env,
                    r.api_key_file,
                );
                let default_max_tokens = r.default_max_tokens.unwrap_or(4096);
                if default_max_tokens == 0 {
                    cx.err(format!("{path}.default_max_tokens"), "must be at least 1");
                }
                ProviderKind::Anthropic(AnthropicConfig {
                    base_url,
                    api_key,
                    version: r.version.unwrap_or_else(|| "2023-06-01".to_string()),
                    default_max_tokens,
                })
            }),
            "simulated" => cx.decode::<RawSimulated>(&path, rest).map(|r| {
                let latency = r.latency.unwrap_or(LatencyConfig {
                    median_ms: 300.0,
                    p99_ms: 1200.0,
                });
                if latency.median_ms.is_nan() || latency.median_ms < 0.0 {
                    cx.err(format!("{path}.latency.median_ms"), "must be zero or more");
                }
                if latency.p99_ms.is_nan() || latency.p99_ms < latency.median_ms {
                    cx.err(
                        format!("{path}.latency.p99_ms"),
                        format!(
                            "must be at least median_ms ({}), got {}",
                            latency.median_ms, latency.p99_ms
                        ),
                    );
                }
                check_rate(cx, format!("{path}.error_rate"), r.error_rate);
                check_rate(cx, format!("{path}.pii_rate"), r.pii_rate);
                check_rate(cx, format!("{path}.refusal_rate"), r.refusal_rate);
                check_rate(cx, format!("{path}.tool_call_rate"), r.tool_call_rate);
                let verbosity = r.verbosity.unwrap_or(1.0);
                if verbosity.is_nan() || verbosity <= 0.0 || verbosity > 100.0 {
                    cx.err(
                        format!("{path}.verbosity"),
                        format!("must be greater than 0 and at most 100, got {verbosity}"),
                    );
                }
                ProviderKind::Simulated(SimulatedConfig {
                    seed: r.seed,
                    latency,
                    error_rate: r.error_rate,
                    pii_rate: r.pii_rate,
                    refusal_rate: r.refusal_rate,
                    verbosity,
                    tool_call_rate: r.tool_call_rate,
                })
            }),
            other => {
                let hint = did_you_mean(other, PROVIDER_KINDS.iter().copied())
                    .map(|s| format!("; did you mean \"{s}\"?"))
                    .unwrap_or_default();
                cx.err(
                    format!("{path}.kind"),
                    format!(
                        "unknown provider kind \"{other}\" (known: {}){hint}",
                        PROVIDER_KINDS.join(", ")
                    ),
                );
                None
            }
        };
        if let (
            Some(kind),
            Some(timeout),
            Some(connect_timeout),
            Some(first_byte_timeout),
            Some(idle_timeout),
            Some(stream_timeout),
        ) = (
            kind,
            timeout,
            connect_timeout,
            first_byte_timeout,
            idle_timeout,
            stream_timeout,
        ) {
            out.insert(
                name.clone(),
                ProviderConfig {
                    name,
                    kind,
                    timeout,
                    connect_timeout,
                    first_byte_timeout,
                    idle_timeout,
                    stream_timeout,
                    max_idle_connections,
                    retry,
                    breaker,
                },
            );
        } else {
            // Keep the name resolvable so variants that use it don't also
            // report "unknown provider"; the real error is already recorded.
            out.insert(
                name.clone(),
                ProviderConfig {
                    name,
                    kind: ProviderKind::Simulated(SimulatedConfig {
                        seed: 0,
                        latency: LatencyConfig {
                            median_ms: 0.0,
                            p99_ms: 0.0,
                        },
                        error_rate: 0.0,
                        pii_rate: 0.0,
                        refusal_rate: 0.0,
                        verbosity: 1.0,
                        tool_call_rate: 0.0,
                    }),
                    timeout: Duration::from_secs(1),
                    connect_timeout: Duration::from_secs(1),
                    first_byte_timeout: Duration::from_secs(1),
                    idle_timeout: Duration::from_secs(1),
                    stream_timeout: Duration::from_secs(1),
                    max_idle_connections,
                    retry,
                    breaker,
                },
            );
        }
    }
    out
}

/// A real provider's base URL (checked, without a trailing slash) and key source.
fn endpoint(
    cx: &mut Cx,
    path: &str,
    base_url: Option<String>,
    default_url: &str,
    key_env: Option<String>,
    key_file: Option<String>,
) -> (String, Option<SecretSource>) {
    let url = base_url.unwrap_or_else(|| default_url.to_string());
    check_url(cx, &format!("{path}.base_url"), &url);
    let key = secret_source(cx, path, "api_key_env", key_env, "api_key_file", key_file);
    (url.trim_end_matches('/').to_string(), key)
}

fn check_url(cx: &mut Cx, path: &str, url: &str) {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace) => {}
        _ => cx.err(
            path,
            format!("invalid URL \"{url}\": expected http://HOST[:PORT][/PATH] or https://..."),
        ),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c))
}

fn build_deployments(
    cx: &mut Cx,
    v: Option<toml::Value>,
    providers: &BTreeMap<String, ProviderConfig>,
) -> BTreeMap<String, DeploymentConfig> {
    let mut out = BTreeMap::new();
    let Some(v) = v else {
        cx.err(
            "deployments",
            "no deployments configured: add [deployments.NAME] with a stable variant",
        );
        return out;
    };
    let toml::Value::Table(t) = v else {
        cx.err("deployments", "must be a table: use [deployments.NAME]");
        return out;
    };
    if t.is_empty() {
        cx.err(
            "deployments",
            "no deployments configured: add [deployments.NAME] with a stable variant",
        );
    }
    for (name, dv) in t {
        let path = format!("deployments.{}", key(&name));
        if !valid_name(&name) {
            cx.err(
                &path,
                "deployment names may use letters, digits and - _ . : / @ (at most 128 characters)",
            );
        }
        let toml::Value::Table(mut dt) = dv else {
            cx.err(&path, "must be a table");
            continue;
        };
        let stable: Option<String> = take(cx, &mut dt, &path, "stable");
        let principles: Vec<String> = take(cx, &mut dt, &path, "principles").unwrap_or_default();
        let fallbacks: Vec<String> = take(cx, &mut dt, &path, "fallbacks").unwrap_or_default();
        let max_in_flight: Option<usize> = take(cx, &mut dt, &path, "max_in_flight");
        if max_in_flight == Some(0) {
            cx.err(format!("{path}.max_in_flight"), "must be at least 1");
        }
        let variants_v = dt.remove("variants");
        for k in dt.keys() {
            let hint = did_you_mean(
                k,
                [
                    "stable",
                    "variants",
                    "principles",
                    "fallbacks",
                    "max_in_flight",
                ],
            )
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
            cx.err(
                format!("{path}.{}", key(k)),
                format!("unknown setting{hint}"),
            );
        }
        let mut variants = BTreeMap::new();
        match variants_v {
            None => cx.err(
                format!("{path}.variants"),
                "missing: define at least one variant, e.g. variants.v1 = { provider = \"...\", model = \"...\" }",
            ),
            Some(toml::Value::Table(vt)) => {
                for (vname, vv) in vt {
                    let vpath = format!("{path}.variants.{}", key(&vname));
                    if !valid_name(&vname) {
                        cx.err(&vpath, "variant names may use letters, digits and - _ . : / @");
                    }
                    let Some(raw) = cx.decode::<RawVariant>(&vpath, vv) else {
                        continue;
                    };
                    if !providers.contains_key(&raw.provider) {
                        cx.err(
                            format!("{vpath}.provider"),
                            unknown_ref(
                                "provider",
                                &raw.provider,
                                providers.keys().map(String::as_str).collect(),
                            ),
                        );
                    }
                    if raw.model.trim().is_empty() {
                        cx.err(format!("{vpath}.model"), "must not be empty");
                    }
                    if raw.system_prompt.is_some() && raw.system_prompt_file.is_some() {
                        cx.err(&vpath, "set only one of `system_prompt` and `system_prompt_file`");
                    }
                    for p in raw.params.keys() {
                        if !VARIANT_PARAMS.contains(&p.as_str()) {
                            let hint = did_you_mean(p, VARIANT_PARAMS.iter().copied())
                                .map(|s| format!("; did you mean `{s}`?"))
                                .unwrap_or_default();
                            cx.err(
                                format!("{vpath}.params.{}", key(p)),
                                format!(
                                    "not a parameter a variant can set (allowed: {}){hint}",
                                    VARIANT_PARAMS.join(", ")
                                ),
                            );
                        }
                    }
                    variants.insert(
                        vname.clone(),
                        VariantConfig {
                            name: vname,
                            provider: raw.provider,
                            model: raw.model,
                            system_prompt: raw.system_prompt,
                            system_prompt_file: raw.system_prompt_file,
                            params: raw.params,
                        },
                    );
                }
            }
            Some(_) => cx.err(format!("{path}.variants"), "must be a table of variants"),
        }
        let stable = match stable {
            Some(s) => {
                if !variants.is_empty() && !variants.contains_key(&s) {
                    cx.err(
                        format!("{path}.stable"),
                        unknown_ref("variant", &s, variants.keys().map(String::as_str).collect()),
                    );
                }
                s
            }
            None => {
                if !cx.errors.iter().any(|e| e.path == format!("{path}.stable")) {
                    cx.err(
                        format!("{path}.stable"),
                        "missing: name the variant that serves everyone now",
                    );
                }
                String::new()
            }
        };
        for (i, f) in fallbacks.iter().enumerate() {
            if !variants.is_empty() && !variants.contains_key(f) {
                cx.err(
                    format!("{path}.fallbacks[{i}]"),
                    unknown_ref("variant", f, variants.keys().map(String::as_str).collect()),
                );
            } else if *f == stable {
                cx.err(
                    format!("{path}.fallbacks[{i}]"),
                    format!("\"{f}\" is the stable variant; fallbacks are tried after it fails"),
                );
            } else if fallbacks[..i].contains(f) {
                cx.err(
                    format!("{path}.fallbacks[{i}]"),
                    format!("\"{f}\" is listed twice"),
                );
            }
        }
        out.insert(
            name.clone(),
            DeploymentConfig {
                name,
                stable,
                variants,
                principles,
                fallbacks,
                max_in_flight,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:8080"
max_body_bytes = 4194304

[store]
path = "sluice.db"
log_bodies = "full"

[[api_keys]]
name = "app"
key_env = "SLUICE_APP_KEY"

[providers.openai-main]
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
timeout = "60s"

[providers.anthropic-main]
kind = "anthropic"
api_key_env = "ANTHROPIC_API_KEY"

[providers.sim]
kind = "simulated"
seed = 7
latency = { median_ms = 300, p99_ms = 1200 }
error_rate = 0.01

[deployments.support]
stable = "v1"
variants.v1 = { provider = "openai-main", model = "gpt-4o-mini", system_prompt = "You are a support agent." }
variants.v2 = { provider = "sim", model = "sim-1" }
"#;

    #[test]
    fn reliability_settings_parse_with_defaults() {
        let c = Config::parse(GOOD).expect("parses");
        let p = &c.providers["openai-main"];
        assert_eq!(p.first_byte_timeout, Duration::from_secs(60));
        assert_eq!(p.idle_timeout, Duration::from_secs(60));
        assert_eq!(p.stream_timeout, Duration::from_secs(600));
        assert_eq!(p.max_idle_connections, 1024);
        assert_eq!(p.retry, RetryConfig::default());
        assert_eq!(p.breaker, BreakerConfig::default());
        assert_eq!(c.limits, ServerLimits::default());
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.store.on_backpressure, Backpressure::Spill);
        assert_eq!(c.store.durability, Durability::Batched);
        assert_eq!(c.store.commit_window, Duration::from_millis(50));

        let text = GOOD.replace(
            "timeout = \"60s\"\n",
            "timeout = \"60s\"\nfirst_byte_timeout = \"5s\"\nidle_timeout = \"2s\"\nmax_idle_connections = 4096\n\
             retry = { attempts = 3, backoff = \"50ms\", max_backoff = \"1s\", budget = 0.1 }\n\
             breaker = { failure_rate = 0.3, min_requests = 5, cooldown = \"3s\", probes = 1 }\n",
        ) + "fallbacks = [\"v2\"]\nmax_in_flight = 10\n";
        let text = text.replace(
            "max_body_bytes = 4194304",
            "max_body_bytes = 4194304\nadmin_listen = \"127.0.0.1:9090\"\nmax_in_flight = 100\nheader_timeout = \"2s\"\nkeep_alive_timeout = \"90s\"",
        ).replace("log_bodies = \"full\"", "log_bodies = \"redacted\"\non_backpressure = \"shed\"\ndurability = \"strict\"");
        let c = Config::parse(&text).expect("parses");
        let p = &c.providers["openai-main"];
        assert_eq!(p.first_byte_timeout, Duration::from_secs(5));
        assert_eq!(p.idle_timeout, Duration::from_secs(2));
        assert_eq!(p.max_idle_connections, 4096);
        assert_eq!(p.retry.attempts, 3);
        assert_eq!(p.retry.budget, 0.1);
        assert_eq!(p.breaker.failure_rate, 0.3);
        assert_eq!(p.breaker.probes, 1);
        let d = &c.deployments["support"];
        assert_eq!(d.fallbacks, vec!["v2".to_string()]);
        assert_eq!(d.max_in_flight, Some(10));
        assert_eq!(
            c.admin_listen,
            Some("127.0.0.1:9090".parse().expect("addr"))
        );
        assert_eq!(c.limits.max_in_flight, 100);
        assert_eq!(c.limits.header_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.keep_alive_timeout, Duration::from_secs(90));
        assert_eq!(c.store.log_bodies, LogBodies::Redacted);
        assert_eq!(c.store.on_backpressure, Backpressure::Shed);
        assert_eq!(c.store.durability, Durability::Strict);
    }

    #[test]
    fn bad_reliability_settings_are_reported_with_their_paths() {
        let text = GOOD.replace(
            "timeout = \"60s\"\n",
            "timeout = \"60s\"\nretry = { attempts = 0, budget = 2.0, backof = \"1s\" }\n",
        );
        let e = errors(&text);
        assert!(
            e.iter()
                .any(|m| m.starts_with("providers.openai-main.retry.backof: unknown field")),
            "{e:?}"
        );
        let text = GOOD.replace(
            "timeout = \"60s\"\n",
            "timeout = \"60s\"\nretry = { attempts = 0, budget = 2.0 }\nbreaker = { failure_rate = 0.0, probes = 0, cooldown = \"soon\" }\n",
        );
        let e = errors(&text);
        for want in [
            "providers.openai-main.retry.attempts: must be between 1 (no retries) and 10, got 0",
            "providers.openai-main.retry.budget: must be between 0.0 and 1.0, got 2",
            "providers.openai-main.breaker.failure_rate: must be greater than 0.0",
            "providers.openai-main.breaker.probes: must be at least 1",
            "providers.openai-main.breaker.cooldown: invalid duration \"soon\"",
        ] {
            assert!(
                e.iter().any(|m| m.starts_with(want)),
                "missing {want}: {e:?}"
            );
        }
        let e = errors(&(GOOD.to_string() + "fallbacks = [\"v3\", \"v1\"]\nmax_in_flight = 0\n"));
        for want in [
            "deployments.support.fallbacks[0]: unknown variant \"v3\"",
            "deployments.support.fallbacks[1]: \"v1\" is the stable variant",
            "deployments.support.max_in_flight: must be at least 1",
        ] {
            assert!(
                e.iter().any(|m| m.starts_with(want)),
                "missing {want}: {e:?}"
            );
        }
        let e = errors(&GOOD.replace(
            "max_body_bytes = 4194304",
            "max_body_bytes = 4194304\nadmin_listen = \"localhost\"\nmax_header_bytes = 10\nmax_in_flight = 0\nlisten_backlog = 0\nworkers = 1000",
        ));
        for want in [
            "admin_listen: invalid address \"localhost\"",
            "max_header_bytes: must be between 8192 and 1048576, got 10",
            "max_in_flight: must be at least 1",
            "listen_backlog: must be between 1 and 65535, got 0",
            "workers: must be between 0 (the shared runtime) and 256, got 1000",
        ] {
            assert!(
                e.iter().any(|m| m.starts_with(want)),
                "missing {want}: {e:?}"
            );
        }
        let e = errors(&GOOD.replace("log_bodies = \"full\"", "on_backpressure = \"block\""));
        assert!(
            e.iter()
                .any(|m| m.starts_with("store.on_backpressure: unknown variant `block`")),
            "{e:?}"
        );
    }

    fn errors(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn the_reference_config_is_valid() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.providers.len(), 3);
        let d = &c.deployments["support"];
        assert_eq!(d.stable_variant().model, "gpt-4o-mini");
        assert_eq!(c.providers["openai-main"].timeout, Duration::from_secs(60));
        assert_eq!(c.secret_sources().len(), 3);
    }

    #[test]
    fn unknown_provider_is_reported_with_path_and_suggestion() {
        let bad = GOOD.replace(
            "{ provider = \"sim\", model = \"sim-1\" }",
            "{ provider = \"sin\", model = \"sim-1\" }",
        );
        let e = errors(&bad);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(
            e[0],
            "deployments.support.variants.v2.provider: unknown provider \"sin\" \
             (known: anthropic-main, openai-main, sim); did you mean \"sim\"?"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let bad = GOOD
            .replace("kind = \"openai\"", "kind = \"opnai\"")
            .replace("error_rate = 0.01", "error_rate = 1.5")
            .replace("stable = \"v1\"", "stable = \"v3\"")
            .replace("timeout = \"60s\"", "timeout = \"soon\"")
            .replace("log_bodies = \"full\"", "log_bodies = \"some\"");
        let bad = format!("listen_addr = 1\n{bad}");
        let e = errors(&bad);
        let joined = e.join("\n");
        assert!(joined.contains("providers.openai-main.kind: unknown provider kind \"opnai\" (known: openai, anthropic, simulated); did you mean \"openai\"?"), "{joined}");
        assert!(
            joined.contains("providers.sim.error_rate: must be between 0.0 and 1.0"),
            "{joined}"
        );
        assert!(
            joined.contains("deployments.support.stable: unknown variant \"v3\""),
            "{joined}"
        );
        assert!(
            joined.contains("providers.openai-main.timeout: invalid duration \"soon\""),
            "{joined}"
        );
        assert!(
            joined.contains("store.log_bodies: unknown variant `some`"),
            "{joined}"
        );
        assert!(
            joined.contains("listen_addr: unknown setting; did you mean `listen`?"),
            "{joined}"
        );
        assert_eq!(e.len(), 6, "{joined}");
    }

    #[test]
    fn unknown_fields_inside_entries_are_named() {
        let bad = GOOD.replace("seed = 7", "sed = 7");
        let e = errors(&bad);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("providers.sim"), "{e:?}");
        assert!(e[0].contains("unknown field `sed`"), "{e:?}");
    }

    #[test]
    fn type_errors_name_the_field() {
        let bad = GOOD.replace("max_body_bytes = 4194304", "max_body_bytes = \"big\"");
        let e = errors(&bad);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("max_body_bytes: "), "{e:?}");
    }

    #[test]
    fn syntax_errors_are_reported() {
        let e = errors("listen = ");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("invalid TOML"), "{e:?}");
    }

    #[test]
    fn api_keys_are_required_unless_anonymous_is_allowed() {
        let no_keys = GOOD.replace(
            "[[api_keys]]\nname = \"app\"\nkey_env = \"SLUICE_APP_KEY\"\n",
            "",
        );
        assert!(errors(&no_keys)
            .iter()
            .any(|e| e.starts_with("api_keys: no API keys")));
        let anon = format!("allow_anonymous = true\n{no_keys}");
        assert!(errors(&anon).is_empty());
        let both = format!("allow_anonymous = true\n{GOOD}");
        assert!(errors(&both)[0].starts_with("allow_anonymous: cannot be true"));
    }

    #[test]
    fn api_key_sources_are_exclusive_and_digests_checked() {
        let both = GOOD.replace(
            "key_env = \"SLUICE_APP_KEY\"",
            "key_env = \"SLUICE_APP_KEY\"\nsha256 = \"00\"",
        );
        assert!(errors(&both)[0].contains("exactly one of"));
        let bad_hex = GOOD.replace("key_env = \"SLUICE_APP_KEY\"", "sha256 = \"nothex\"");
        assert!(errors(&bad_hex)[0].starts_with("api_keys[0].sha256: must be 64 hex digits"));
    }

    #[test]
    fn variant_params_are_checked() {
        let bad = GOOD.replace(
            "model = \"sim-1\" }",
            "model = \"sim-1\", params = { temprature = 0.2 } }",
        );
        let e = errors(&bad);
        assert!(
            e[0].starts_with("deployments.support.variants.v2.params.temprature"),
            "{e:?}"
        );
        assert!(e[0].contains("did you mean `temperature`?"), "{e:?}");
    }

    #[test]
    fn did_you_mean_only_suggests_close_words() {
        assert_eq!(
            did_you_mean("opnai", ["openai", "anthropic"]),
            Some("openai")
        );
        assert_eq!(did_you_mean("zzzzzz", ["openai", "anthropic"]), None);
        assert_eq!(
            did_you_mean("opnai", ["openai-main", "sim"]),
            Some("openai-main")
        );
        assert_eq!(did_you_mean("v3", ["v1", "v2"]), Some("v1"));
        assert_eq!(did_you_mean("gpt", ["anthropic-main"]), None);
    }

    proptest::proptest! {
        /// Arbitrary text never panics the config parser.
        #[test]
        fn parser_never_panics_on_text(text in "\\PC{0,200}") {
            let _ = Config::parse(&text);
        }

        /// Plausible-but-wrong configs (random values in known places) never
        /// panic and always yield errors with non-empty messages.
        #[test]
        fn parser_reports_problems_in_mutated_configs(
            key in "(listen|max_body_bytes|kind|seed|timeout|stable|provider|model|error_rate|path)",
            value in "(\"\"|\"x\"|-1|0|1.5|true|\\[\\]|\\{\\})",
        ) {
            let text = GOOD
                .lines()
                .map(|l| {
                    let k = l.split('=').next().unwrap_or("").trim();
                    if k == key { format!("{key} = {value}") } else { l.to_string() }
                })
                .collect::<Vec<_>>()
                .join("\n");
            if let Err(e) = Config::parse(&text) {
                proptest::prop_assert!(e.0.iter().all(|e| !e.message.is_empty()));
            }
        }
    }
}
