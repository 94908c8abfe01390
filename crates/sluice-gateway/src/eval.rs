//! Running probe suites against a variant through the real provider and
//! policy code: the same upstream request a user's call would make (the
//! variant's model, system prompt and defaults), the same output policies,
//! then the case's assertions.
//!
//! Used by `sluice eval` and by stage gates that require a suite.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use sluice_core::chat::{ChatRequest, Usage};
use sluice_core::config::Config;
use sluice_core::probe::report::{CaseResult, RunResult, SuiteReport};
use sluice_core::probe::{parse_score, Answer, Assertion, AssertionResult, JudgeSpec, Suite};
use sluice_providers::ProviderError;

use crate::policy::{External, PolicyLog};
use crate::snapshot::{Deployment, Snapshot};

/// A new run id: `eval_` and a time-ordered UUIDv7 in hex.
pub fn new_run_id() -> String {
    format!("eval_{}", uuid::Uuid::now_v7().simple())
}

/// Reads and parses a suite file; relative paths are read from `base`.
pub fn load_suite(base: Option<&Path>, path: &str) -> Result<Suite, String> {
    let full = resolve_path(base, path);
    let bytes = std::fs::read(&full)
        .map_err(|e| format!("cannot read probe suite {}: {e}", full.display()))?;
    Suite::parse(path, &bytes).map_err(|e| e.to_string())
}

/// A path relative to the config directory.
pub fn resolve_path(base: Option<&Path>, path: &str) -> PathBuf {
    match base {
        Some(b) if Path::new(path).is_relative() => b.join(path),
        _ => PathBuf::from(path),
    }
}

/// What a suite names that the config lacks: unknown principles and judge
/// providers.
pub fn check_suite(suite: &Suite, config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for p in suite.principles() {
        if !config.principles.contains_key(p) {
            let known: Vec<&str> = config.principles.keys().map(String::as_str).collect();
            out.push(format!(
                "suite {} names principle \"{p}\", which is not configured (principles: {})",
                suite.name,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
    }
    for p in suite.judge_providers() {
        if !config.providers.contains_key(p) {
            out.push(format!(
                "suite {}: llm-judge names provider \"{p}\", which is not in [providers]",
                suite.name
            ));
        }
    }
    out
}

/// Finds a variant: `deployment/variant`, or a variant name that exactly
/// one deployment has.
pub fn find_variant<'a>(
    snap: &'a Snapshot,
    spec: &str,
) -> Result<(&'a Deployment, String), String> {
    if let Some((d, v)) = spec.split_once('/') {
        let dep = snap.deployments.get(d).ok_or_else(|| {
            format!(
                "no deployment \"{d}\" (deployments: {})",
                snap.deployments
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if !dep.config.variants.contains_key(v) {
            return Err(format!(
                "deployment \"{d}\" has no variant \"{v}\" (variants: {})",
                dep.config
                    .variants
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        return Ok((dep, v.to_string()));
    }
    let owners: Vec<&Deployment> = snap
        .deployments
        .values()
        .filter(|d| d.config.variants.contains_key(spec))
        .collect();
    match owners.as_slice() {
        [one] => Ok((one, spec.to_string())),
        [] => {
            let all: Vec<String> = snap
                .deployments
                .values()
                .flat_map(|d| {
                    d.config
                        .variants
                        .keys()
                        .map(move |v| format!("{}/{v}", d.config.name))
                })
                .collect();
            Err(format!(
                "no deployment has a variant \"{spec}\" (variants: {})",
                all.join(", ")
            ))
        }
        many => Err(format!(
            "variant \"{spec}\" is in several deployments ({}): name it as DEPLOYMENT/{spec}",
            many.iter()
                .map(|d| d.config.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// One call to a variant, answered and checked by the deployment's output
/// policies.
#[derive(Debug)]
pub struct Answered {
    /// Wall time of the call (and policies), ms.
    pub latency_ms: f64,
    /// The completion as it would be served, or why the call failed.
    pub outcome: Result<Served, ProviderError>,
}

/// A successful answer.
#[derive(Debug)]
pub struct Served {
    /// The completion as served (after policies).
    pub body: Value,
    /// The first choice's text as the model gave it.
    pub raw_text: String,
    /// As served.
    pub text: String,
    /// Token usage.
    pub usage: Option<Usage>,
    /// Cost, when the model has a price.
    pub cost_usd: Option<f64>,
    /// Output policy verdicts.
    pub policy: PolicyLog,
    /// Time to the first generated output, ms (streamed calls).
    pub ttft_ms: Option<f64>,
}

/// The first choice's text of a completion.
pub fn first_text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Calls `variant` of `deployment` with the client request `req` (rewritten
/// for the variant as the gateway does), within `timeout`, and applies the
/// deployment's output policies (external detectors included) to the whole
/// answer. `stream` asks the upstream for a stream (so time to first token
/// is measured) and reassembles it.
pub async fn call_variant(
    ext: &External,
    snap: &Snapshot,
    deployment: &Deployment,
    variant: &str,
    req: &ChatRequest,
    timeout: Duration,
    stream: bool,
) -> Answered {
    let started = Instant::now();
    let outcome = call_inner(ext, snap, deployment, variant, req, timeout, stream).await;
    Answered {
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        outcome,
    }
}

async fn call_inner(
    ext: &External,
    snap: &Snapshot,
    deployment: &Deployment,
    variant: &str,
    req: &ChatRequest,
    timeout: Duration,
    stream: bool,
) -> Result<Served, ProviderError> {
    let unsupported = |message: String| ProviderError::Unsupported {
        param: "model".into(),
        message,
    };
    let v = deployment.config.variants.get(variant).ok_or_else(|| {
        unsupported(format!(
            "deployment {} has no variant {variant}",
            deployment.config.name
        ))
    })?;
    let provider: &Arc<crate::upstream::Upstream> = deployment
        .providers
        .get(variant)
        .ok_or_else(|| unsupported(format!("variant {variant} has no provider client")))?;
    let mut up = crate::pipeline::prepare(req, v).map_err(|e| ProviderError::Unsupported {
        param: "params".into(),
        message: e.message,
    })?;
    let started = Instant::now();
    let called = async {
        if !stream {
            up.stream = None;
            up.stream_options = None;
            return provider.complete(&up).await.map(|c| (c, None));
        }
        up.stream = Some(true);
        up.stream_options = Some(sluice_core::chat::StreamOptions {
            include_usage: Some(true),
            ..Default::default()
        });
        let mut chunks = provider.stream(&up).await?;
        let mut acc = sluice_core::stream::StreamAccumulator::new();
        let mut ttft = None;
        while let Some(chunk) = chunks.next().await {
            if acc.push(&chunk?.value) && ttft.is_none() {
                ttft = Some(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let mut c = sluice_providers::Completion::from_value(acc.completion());
        c.usage = acc.usage().or(c.usage);
        Ok((c, ttft))
    };
    let (mut completion, ttft_ms) = match tokio::time::timeout(timeout, called).await {
        // `Upstream` has already scrubbed upstream error text.
        Ok(r) => r?,
        Err(_) => {
            return Err(ProviderError::Timeout {
                provider: v.provider.clone(),
                after: timeout,
                phase: if stream { "whole stream" } else { "response" },
            })
        }
    };
    let raw_text = first_text(&completion.body);
    let mut policy = PolicyLog::default();
    crate::policy::check_completion(
        ext,
        snap,
        &deployment.constitution,
        &mut completion.body,
        &mut policy,
    )
    .await;
    let price = snap.config.prices.get(&v.model).copied();
    let cost_usd = match (price, completion.usage) {
        (Some(p), Some(u)) => Some(p.cost(u.prompt_tokens, u.completion_tokens)),
        _ => None,
    };
    Ok(Served {
        text: first_text(&completion.body),
        raw_text,
        usage: completion.usage,
        cost_usd,
        policy,
        body: completion.body,
        ttft_ms,
    })
}

/// How a suite run behaves.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Time allowed per call (judge calls included).
    pub timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            concurrency: 8,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Runs every case (× its repeats) of `suite` on `variant`, `concurrency`
/// calls at a time; `progress` is called after each call. Checks first that
/// everything the suite names exists.
pub async fn run_suite(
    ext: &External,
    snap: &Snapshot,
    deployment: &Deployment,
    variant: &str,
    suite: &Suite,
    opts: &RunOptions,
    progress: &(dyn Fn() + Sync),
) -> Result<SuiteReport, String> {
    let problems = check_suite(suite, &snap.config);
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let started_ms = crate::now_ms();
    let started = Instant::now();
    let jobs: Vec<(usize, u32)> = suite
        .cases
        .iter()
        .enumerate()
        .flat_map(|(i, c)| (0..c.repeat).map(move |r| (i, r)))
        .collect();
    let stop = AtomicBool::new(false);
    let mut results: Vec<(usize, u32, RunResult)> = futures_util::stream::iter(jobs)
        .map(|(i, r)| {
            let case = &suite.cases[i];
            let stop = &stop;
            async move {
                let run = if stop.load(Ordering::Relaxed) {
                    skipped()
                } else {
                    run_case(ext, snap, deployment, variant, case, opts).await
                };
                progress();
                (i, r, run)
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .collect()
        .await;
    results.sort_by_key(|(i, r, _)| (*i, *r));
    let mut cases: Vec<CaseResult> = Vec::with_capacity(suite.cases.len());
    let mut it = results.into_iter().peekable();
    for (i, case) in suite.cases.iter().enumerate() {
        let mut runs = Vec::new();
        while let Some((_, _, run)) = it.next_if(|(j, _, _)| *j == i) {
            runs.push(run.clip());
        }
        let passed = runs.iter().filter(|r| r.pass).count() as u32;
        let needed = case.needed(case.repeat);
        cases.push(CaseResult {
            id: case.id.clone(),
            line: case.line,
            tags: case.tags.clone(),
            pass: passed >= needed,
            passed_runs: passed,
            needed_runs: needed,
            runs,
        });
    }
    Ok(SuiteReport::new(
        suite,
        &format!("{}/{variant}", deployment.config.name),
        variant,
        started_ms,
        started.elapsed().as_secs_f64() * 1000.0,
        cases,
    ))
}

fn skipped() -> RunResult {
    RunResult {
        pass: false,
        output: String::new(),
        latency_ms: 0.0,
        cost_usd: None,
        error: Some("not run".into()),
        assertions: Vec::new(),
    }
}

async fn run_case(
    ext: &External,
    snap: &Snapshot,
    deployment: &Deployment,
    variant: &str,
    case: &sluice_core::probe::Case,
    opts: &RunOptions,
) -> RunResult {
    let req = match case.request(&deployment.config.name) {
        Ok(r) => r,
        Err(e) => {
            return RunResult {
                error: Some(e),
                ..skipped()
            }
        }
    };
    let answered = call_variant(ext, snap, deployment, variant, &req, opts.timeout, false).await;
    let served = match answered.outcome {
        Ok(s) => s,
        Err(e) => {
            return RunResult {
                pass: false,
                output: String::new(),
                latency_ms: answered.latency_ms,
                cost_usd: None,
                error: Some(format!("{} ({})", e, e.kind())),
                assertions: Vec::new(),
            }
        }
    };
    let answer = Answer {
        text: served.text.clone(),
        raw_text: served.raw_text.clone(),
        latency_ms: answered.latency_ms,
        cost_usd: served.cost_usd,
    };
    let lookup = |id: &str| snap.principles.get(id).map(|p| p.as_ref());
    let mut assertions = Vec::with_capacity(case.asserts.len());
    for a in &case.asserts {
        let r = match a {
            Assertion::LlmJudge(spec) => judge(snap, spec, &req, &answer.text, opts.timeout).await,
            other => match other.check(&answer, &lookup) {
                Some(r) => r,
                None => continue,
            },
        };
        assertions.push(r);
    }
    RunResult {
        pass: assertions.iter().all(|a| a.pass),
        output: served.text,
        latency_ms: answered.latency_ms,
        cost_usd: served.cost_usd,
        error: None,
        assertions,
    }
}

/// Asks the judge provider to grade `answer` against the rubric.
async fn judge(
    snap: &Snapshot,
    spec: &JudgeSpec,
    req: &ChatRequest,
    answer: &str,
    timeout: Duration,
) -> AssertionResult {
    let result = |pass: bool, detail: String| AssertionResult {
        kind: "llm-judge".into(),
        pass,
        detail,
    };
    let Some(p) = snap.providers.get(&spec.provider) else {
        return result(false, format!("unknown judge provider {}", spec.provider));
    };
    let question = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == sluice_core::chat::Role::User)
        .map(|m| m.text())
        .unwrap_or_default();
    let jr = ChatRequest::from_value(json!({
        "model": spec.model.clone().unwrap_or_else(|| "judge".into()),
        "messages": [
            {"role": "system", "content": format!(
                "You grade an assistant's answer against a rubric.\n\nRubric: {}\n\n\
                 Reply with JSON only: {{\"score\": a number from 0 (fails the rubric) to 1 (fully meets it), \"reason\": \"one sentence\"}}. \
                 PASS or FAIL as the first word is also accepted.",
                spec.rubric
            )},
            {"role": "user", "content": format!("Question:\n{question}\n\nAnswer:\n{answer}")},
        ],
        "temperature": 0,
        "max_tokens": 200,
    }));
    let jr = match jr {
        Ok(r) => r,
        Err(e) => return result(false, format!("judge request: {}", e.message)),
    };
    let c = match tokio::time::timeout(timeout, p.complete(&jr)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return result(false, format!("judge call failed: {e}")),
        Err(_) => return result(false, format!("judge gave no verdict within {timeout:?}")),
    };
    let text = first_text(&c.body);
    match parse_score(&text) {
        Some(s) => result(
            s >= spec.threshold,
            format!("judge scored {s:.2} (threshold {:.2})", spec.threshold),
        ),
        None => {
            let short: String = text.chars().take(80).collect();
            result(false, format!("unreadable judge verdict: {short:?}"))
        }
    }
}

/// Runs the suites stage `stage` of rollout `rc` requires against its
/// candidate, storing every run (trigger `gate:ROLLOUT/STAGE`) and a verdict
/// per suite. `Ok` lists each suite's headline; `Err` is the first failing
/// suite's report, the reason the stage may not open.
pub async fn stage_suites(
    app: &crate::AppState,
    snap: &Snapshot,
    rc: &sluice_core::config::RolloutConfig,
    stage: usize,
) -> Result<Vec<String>, String> {
    let Some(st) = rc.stages.get(stage) else {
        return Ok(Vec::new());
    };
    if st.require_suites.is_empty() {
        return Ok(Vec::new());
    }
    let deployment = snap
        .deployments
        .get(&rc.deployment)
        .ok_or_else(|| format!("deployment {} is not configured", rc.deployment))?;
    let mut passed = Vec::new();
    for req in &st.require_suites {
        let suite = match snap.suites.get(&req.suite) {
            Some(s) => s.clone(),
            None => Arc::new(load_suite(snap.base_dir.as_deref(), &req.suite)?),
        };
        let report = run_suite(
            &app.external,
            snap,
            deployment,
            &rc.candidate,
            &suite,
            &RunOptions::default(),
            &|| {},
        )
        .await?;
        let ok = report.pass_rate() >= req.min_pass_rate;
        let reason = if ok {
            format!(
                "suite {} (required {:.1} %)",
                report.headline(),
                100.0 * req.min_pass_rate
            )
        } else {
            report.gate_reason(req.min_pass_rate)
        };
        let store = app.store.clone();
        let (name, suite_name) = (rc.name.clone(), req.suite.clone());
        let stage_u32 = u32::try_from(stage).unwrap_or(u32::MAX);
        let verdict = json!({
            "signal": format!("suite:{suite_name}"),
            "outcome": if ok { "pass" } else { "fail" },
            "pass_rate": report.pass_rate(),
            "min_pass_rate": req.min_pass_rate,
            "suite_hash": report.suite_hash,
            "summary": reason,
        });
        let run_id = new_run_id();
        let stored = tokio::task::spawn_blocking(move || {
            store.put_eval_run(&run_id, &format!("gate:{name}/{stage_u32}"), &report)?;
            store.put_verdict(
                &name,
                stage_u32,
                crate::now_ms(),
                &format!("suite:{suite_name}"),
                if ok { "pass" } else { "fail" },
                &verdict.to_string(),
            )
        })
        .await;
        match stored {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(rollout = rc.name, "cannot store a suite run: {e}"),
            Err(e) => tracing::error!(rollout = rc.name, "cannot store a suite run: {e}"),
        }
        if !ok {
            return Err(reason);
        }
        passed.push(reason);
    }
    Ok(passed)
}
