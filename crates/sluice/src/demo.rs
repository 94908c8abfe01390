//! `sluice demo`: the whole product on one machine with no keys and no
//! network. It starts the gateway on a temporary SQLite store with
//! `simulated` variants, drives traffic through it with a built-in client (a
//! mix of streamed and non-streamed requests from many users), and prints what
//! the store recorded per variant.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use sluice_core::Config;
use sluice_gateway::{EnvSecrets, Gateway, GatewayError};

/// The API key the demo configures.
pub const DEMO_KEY: &str = "sk-sluice-demo";
/// The admin token the demo configures.
pub const DEMO_ADMIN_TOKEN: &str = "sluice-demo-admin";

/// Demo settings from the command line.
pub struct Options {
    /// Requests to send.
    pub requests: usize,
    /// Concurrency of the client.
    pub concurrency: usize,
    /// Preferred listen address.
    pub listen: String,
    /// Store path (a temporary file when `None`).
    pub db: Option<String>,
    /// Serve until Ctrl-C after the summary.
    pub wait: bool,
}

/// The demo's configuration: two deployments on simulated providers.
pub fn demo_config(listen: &str, db: &str) -> String {
    format!(
        r#"# sluice demo: simulated providers only (no keys, no network)
listen = "{listen}"

[store]
path = "{db}"
log_bodies = "full"

[[api_keys]]
name = "demo"
sha256 = "{key}"

[[admin_tokens]]
name = "demo-operator"
role = "admin"
sha256 = "{admin}"

[providers.sim-stable]
kind = "simulated"
seed = 7
latency = {{ median_ms = 60, p99_ms = 300 }}
error_rate = 0.01
refusal_rate = 0.02

[providers.sim-flaky]
kind = "simulated"
seed = 11
latency = {{ median_ms = 45, p99_ms = 250 }}
error_rate = 0.25
verbosity = 1.4

[providers.sim-candidate]
kind = "simulated"
seed = 13
latency = {{ median_ms = 45, p99_ms = 250 }}
error_rate = 0.005
verbosity = 0.8

[deployments.support]
stable = "v1"
variants.v1 = {{ provider = "sim-stable", model = "sim-support-1", system_prompt = "You are a support agent." }}
variants.v2 = {{ provider = "sim-flaky", model = "sim-support-2", system_prompt = "You are a concise support agent." }}
variants.v3 = {{ provider = "sim-candidate", model = "sim-support-3", system_prompt = "You are a concise, careful support agent." }}

[cohorts.internal]
subjects = ["user-1", "user-2", "user-3", "user-4", "user-5", "user-6", "user-7", "user-8", "user-9", "user-10", "user-11", "user-12"]

[rollouts.support-v2]
deployment = "support"
candidate = "v2"
subject = "user"
evaluate_every = "250ms"
stages = [
  {{ kind = "shadow", min_duration = "{step}", min_requests = 40 }},
  {{ kind = "cohort", cohorts = ["internal"], min_duration = "{step}" }},
  {{ kind = "percent", percent = 50, min_duration = "{step}" }},
  {{ kind = "percent", percent = 100, min_duration = "{step}" }},
]

[[rollouts.support-v2.gates]]
signal = "error_rate"
max_regression = 0.05
min_samples = 60

[rollouts.support-v3]
deployment = "support"
candidate = "v3"
subject = "user"
evaluate_every = "250ms"
stages = [
  {{ kind = "shadow", min_duration = "{step}", min_requests = 40 }},
  {{ kind = "cohort", cohorts = ["internal"], min_duration = "{step}" }},
  {{ kind = "percent", percent = 50, min_duration = "{step}" }},
  {{ kind = "percent", percent = 100, min_duration = "{step}" }},
]

[[rollouts.support-v3.gates]]
signal = "error_rate"
max_regression = 0.05
min_samples = 60

[[rollouts.support-v3.gates]]
signal = "refusal_rate"
max_regression = 0.05
min_samples = 60

[deployments.summarize]
stable = "v1"
variants.v1 = {{ provider = "sim-stable", model = "sim-summarize-1", params = {{ temperature = 0.2, max_tokens = 200 }} }}
"#,
        key = sluice_core::secret::digest_hex(DEMO_KEY),
        admin = sluice_core::secret::digest_hex(DEMO_ADMIN_TOKEN),
        step = "700ms",
        db = db.replace('\\', "\\\\").replace('"', "\\\""),
    )
}

const PROMPTS: &[&str] = &[
    "How do I get a refund for my order?",
    "My package has not arrived yet, what should I do?",
    "Can I change the email address on my account?",
    "Why was I charged twice this month?",
    "How do I reset my password?",
    "Do you ship to Norway?",
    "Summarize our returns policy in two sentences.",
    "What is the status of order 1042?",
];

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    streamed: AtomicU64,
}

/// Runs the demo.
pub async fn run(opts: Options) -> Result<ExitCode> {
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let db = match &opts.db {
        Some(p) => p.clone(),
        None => tmp
            .path()
            .join("sluice-demo.db")
            .to_string_lossy()
            .into_owned(),
    };
    let gateway = match bind(&opts.listen, &db).await {
        Ok(g) => g,
        Err(GatewayError::Bind { addr, source }) => {
            eprintln!("note: {addr} is not available ({source}); using a free port instead");
            bind("127.0.0.1:0", &db).await?
        }
        Err(e) => return Err(e.into()),
    };
    let addr = gateway.local_addr();
    let store = gateway.store();
    let state = gateway.state();
    let base = format!("http://{addr}");
    println!("sluice demo: gateway on {base} (simulated providers, store {db})");
    for line in crate::describe(&state.snapshot.load().config) {
        println!("  {line}");
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(gateway.run(
        async move {
            let _ = stop_rx.await;
        },
        Duration::from_secs(10),
    ));

    let since = chrono_now_ms();
    let started = Instant::now();
    let tally = Arc::new(Tally::default());
    let bar = ProgressBar::new(opts.requests as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests  {per_sec}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .context("cannot build the demo client")?;
    let url = format!("{base}/v1/chat/completions");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let traffic = {
        let stop = stop.clone();
        let sent = sent.clone();
        let tally = tally.clone();
        let bar = bar.clone();
        let client = client.clone();
        async move {
            futures_util::stream::iter(0..opts.requests)
                .take_while(|_| {
                    let go = !stop.load(Ordering::Relaxed);
                    async move { go }
                })
                .for_each_concurrent(opts.concurrency.max(1), |i| {
                    let client = client.clone();
                    let url = url.clone();
                    let tally = tally.clone();
                    let bar = bar.clone();
                    let sent = sent.clone();
                    async move {
                        sent.fetch_add(1, Ordering::Relaxed);
                        let ok = send_one(&client, &url, i, &tally).await;
                        if ok {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        bar.set_message(format!("{} failed", tally.failed.load(Ordering::Relaxed)));
                        bar.inc(1);
                    }
                })
                .await;
            stop.store(true, Ordering::Relaxed);
        }
    };
    let walker = walk_rollout(&client, &base, &bar, started, stop.clone());
    let (_, outcome) = tokio::join!(traffic, walker);
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    state.events.flush().await;
    let total = sent.load(Ordering::Relaxed);

    println!();
    match outcome {
        Ok(Some(line)) => println!("{line}"),
        Ok(None) => {}
        Err(e) => eprintln!("warning: the rollout walk stopped: {e:#}"),
    }
    println!(
        "sent {total} requests in {:.1}s ({} streamed): {} ok, {} failed (simulated upstream errors)",
        elapsed.as_secs_f64(),
        tally.streamed.load(Ordering::Relaxed),
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    let summary = store.summary(since)?;
    println!("{}", crate::table::summary(&summary));
    let recorded: u64 = summary.iter().map(|s| s.requests).sum();
    println!("recorded {recorded} of {total} requests in the store");

    if opts.wait {
        println!();
        println!("sluice keeps serving on {base}  (API key: {DEMO_KEY}; Ctrl-C to stop)");
        println!("  curl {base}/v1/chat/completions -H 'Authorization: Bearer {DEMO_KEY}' \\");
        println!("       -H 'Content-Type: application/json' \\");
        println!("       -d '{{\"model\": \"support\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'");
        println!("  curl {base}/metrics");
        println!("  sluice requests --db {db} --last 10   (while the demo runs)");
        sluice_gateway::shutdown_signal().await;
    }
    drop(state);
    let _ = stop_tx.send(());
    let report = server.await.context("gateway task failed")??;
    let lost = report.events.lost();
    if lost > 0 {
        eprintln!("error: {lost} request record(s) were lost");
        return Ok(ExitCode::FAILURE);
    }
    if recorded != total {
        eprintln!("error: {total} requests were sent but {recorded} recorded");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn bind(listen: &str, db: &str) -> Result<Gateway, GatewayError> {
    let config = Config::parse(&demo_config(listen, db))
        .map_err(|e| GatewayError::Config(e.0.iter().map(ToString::to_string).collect()))?;
    Gateway::bind(config, Arc::new(EnvSecrets)).await
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn admin_call(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value> {
    let req = match body {
        Some(b) => client.post(format!("{base}{path}")).json(&b),
        None => client.get(format!("{base}{path}")),
    };
    let resp = req.bearer_auth(DEMO_ADMIN_TOKEN).send().await?;
    let status = resp.status();
    let v: Value = resp.json().await?;
    anyhow::ensure!(
        status.is_success(),
        "{}",
        v["error"]["message"]
            .as_str()
            .unwrap_or("admin call failed")
    );
    Ok(v)
}

/// Prints above the progress bar, or plainly when there is no terminal.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// Prints the history entries of a rollout not printed yet.
async fn print_new_history(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    bar: &ProgressBar,
    started: Instant,
    printed: &mut usize,
) -> Result<Value> {
    let v = admin_call(client, base, &format!("/admin/rollouts/{name}"), None).await?;
    let history = v["history"].as_array().cloned().unwrap_or_default();
    for e in history.iter().skip(*printed) {
        let stages = v["stages"].as_array().cloned().unwrap_or_default();
        let label = |i: u64| {
            stages
                .get(i as usize)
                .and_then(|s| s["label"].as_str())
                .unwrap_or("?")
                .to_string()
        };
        let from = format!(
            "{} {}",
            e["from_status"].as_str().unwrap_or(""),
            label(e["from_stage"].as_u64().unwrap_or(0))
        );
        let to = match e["to_status"].as_str() {
            Some("running") => format!("running {}", label(e["to_stage"].as_u64().unwrap_or(0))),
            Some(other) => other.to_string(),
            None => "?".into(),
        };
        say(
            bar,
            format!(
                "{:>6.1}s  {name}: {} by {}: {from} → {to}",
                started.elapsed().as_secs_f64(),
                e["action"].as_str().unwrap_or(""),
                e["actor"].as_str().unwrap_or("")
            ),
        );
        if let Some(reason) = e["reason"].as_str().filter(|r| !r.is_empty()) {
            say(bar, format!("          {reason}"));
        }
    }
    *printed = history.len();
    Ok(v)
}

/// Runs one rollout to its end, letting the controller decide, printing
/// every transition with its verdicts. Returns the final status.
async fn watch_rollout(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    bar: &ProgressBar,
    started: Instant,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<String> {
    admin_call(
        client,
        base,
        &format!("/admin/rollouts/{name}/start"),
        Some(json!({"reason": "demo: release it"})),
    )
    .await?;
    let mut printed = 0;
    loop {
        let v = print_new_history(client, base, name, bar, started, &mut printed).await?;
        let status = v["status"].as_str().unwrap_or("").to_string();
        if matches!(status.as_str(), "promoted" | "rolled_back" | "aborted") {
            return Ok(status);
        }
        if status == "paused" {
            // Only the controller pauses here: a stage stayed undecided.
            admin_call(
                client,
                base,
                &format!("/admin/rollouts/{name}/rollback"),
                Some(json!({"reason": "demo: undecided, rolling back"})),
            )
            .await?;
            continue;
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(format!(
                "{status} (traffic ended first; rerun with more --requests)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// The demo's release story: a first candidate that regresses is rolled
/// back by the gates; a second one is promoted to everyone.
async fn walk_rollout(
    client: &reqwest::Client,
    base: &str,
    bar: &ProgressBar,
    started: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<Option<String>> {
    let first = watch_rollout(client, base, "support-v2", bar, started, &stop).await?;
    if stop.load(Ordering::Relaxed) && first != "rolled_back" {
        return Ok(Some(format!("support-v2 is {first}")));
    }
    let second = watch_rollout(client, base, "support-v3", bar, started, &stop).await?;
    stop.store(true, Ordering::Relaxed);
    Ok(Some(format!(
        "after {:.1}s: support-v2 (25 % errors) was {first} by the gates; support-v3 was {second}{}",
        started.elapsed().as_secs_f64(),
        if second == "promoted" { " and now serves everyone" } else { "" }
    )))
}

/// Sends request `i`; returns whether it succeeded.
async fn send_one(client: &reqwest::Client, url: &str, i: usize, tally: &Tally) -> bool {
    let deployment = if i % 5 == 4 { "summarize" } else { "support" };
    let stream = i % 3 == 0;
    let prompt = format!("{} (ticket {})", PROMPTS[i % PROMPTS.len()], i);
    let mut body = json!({
        "model": deployment,
        "messages": [{"role": "user", "content": prompt}],
        "user": format!("user-{}", i % 97),
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        tally.streamed.fetch_add(1, Ordering::Relaxed);
    }
    let resp = match client
        .post(url)
        .bearer_auth(DEMO_KEY)
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => return false,
    };
    if !resp.status().is_success() {
        let _ = resp.bytes().await;
        return false;
    }
    match resp.bytes().await {
        Ok(b) => !stream || !String::from_utf8_lossy(&b).contains("\"error\""),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_is_valid() {
        let c = Config::parse(&demo_config("127.0.0.1:0", "/tmp/x \"y\".db")).expect("valid");
        assert_eq!(c.deployments.len(), 2);
        assert_eq!(c.store.path, "/tmp/x \"y\".db");
    }
}
