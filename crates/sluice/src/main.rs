//! The `sluice` command: serve the gateway, check a config, inspect recorded
//! requests, and run the self-contained demo.

/// mimalloc: the request path allocates many small, short-lived buffers
/// across threads, where it is markedly cheaper than the system allocator.
/// (The `system-allocator` feature keeps the system's, for malloc tracers.)
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod demo;
mod eval_cli;
mod policy_cli;
mod rollout_cli;
mod sim_cli;
mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sluice_core::Config;
use sluice_gateway::{ConfigSource, EnvSecrets, Gateway, SecretResolver};
use sluice_store::Store;

/// sluice: release model, prompt and agent versions in stages, watched and
/// judged, behind an OpenAI-compatible gateway.
#[derive(Parser)]
#[command(name = "sluice", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Show which principles fire on a text, where, and what it would become.
    Test {
        /// Configuration file.
        #[arg(long, short, default_value = "sluice.toml")]
        config: PathBuf,
        /// Only this principle.
        #[arg(long)]
        principle: Option<String>,
        /// Treat the text as a request input (default: a model output).
        #[arg(long)]
        input: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The text, or - to read standard input.
        text: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway.
    Serve {
        /// Configuration file.
        #[arg(long, short, default_value = "sluice.toml")]
        config: PathBuf,
        /// Listen address, overriding `listen` in the config.
        #[arg(long)]
        listen: Option<String>,
        /// SQLite store path, overriding `store.path` in the config.
        #[arg(long)]
        db: Option<String>,
        /// How long in-flight requests may take to finish on shutdown
        /// (default: `shutdown_grace` in the config, 30s).
        #[arg(long, value_parser = humantime_duration)]
        grace: Option<Duration>,
    },
    /// Validate a configuration file and print every problem with its path.
    CheckConfig {
        /// Configuration file.
        file: PathBuf,
        /// Also check that every secret (env var, file) it names is available.
        #[arg(long)]
        strict: bool,
    },
    /// Print recently recorded requests.
    Requests {
        /// SQLite store path.
        #[arg(long, default_value = "sluice.db")]
        db: String,
        /// How many requests to show.
        #[arg(long, default_value_t = 20)]
        last: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the gateway on simulated variants, send traffic, and show what
    /// was recorded. Needs no keys and no network.
    Demo {
        /// Most requests the built-in client sends (it stops earlier once the
        /// demo rollout is promoted).
        #[arg(long, default_value_t = 8000)]
        requests: usize,
        /// How many requests are in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Listen address (falls back to a free port if taken).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Keep the store at this path instead of a temporary file.
        #[arg(long)]
        db: Option<String>,
        /// Exit after the summary instead of serving until Ctrl-C.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show or change rollouts on a running gateway (admin token from SLUICE_TOKEN).
    Rollout {
        /// status | start | advance | pause | resume | rollback | promote | abort | approve
        action: String,
        /// The rollout (all rollouts for `status` when omitted).
        name: Option<String>,
        /// Why; recorded in the rollout's history.
        #[arg(long)]
        reason: Option<String>,
        /// Base URL of the gateway.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "SLUICE_SERVER")]
        server: String,
        /// Admin token.
        #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true, default_value = "")]
        token: String,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Work with the constitution.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Simulate many rollouts through the real gate and controller code and
    /// report false rollbacks, detection and time to decision per scenario.
    Sim {
        /// Runs per scenario.
        #[arg(long, default_value_t = 1000)]
        runs: usize,
        /// Requests after which an undecided stage asks a human.
        #[arg(long, default_value_t = 100_000)]
        max_requests: u64,
        /// Seed (the same seed gives the same table).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run probe suites against a variant through the real provider and
    /// policy code; exits 1 below --min-pass-rate (or on a regression with
    /// --no-regressions), 2 when the run cannot happen.
    Eval(eval_cli::Options),
    /// Print the SHA-256 of an API key, for `sha256 = "..."` in [[api_keys]].
    HashKey {
        /// The key (read from standard input when omitted).
        key: Option<String>,
    },
}

pub(crate) fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration \"{s}\": {e}"))
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Turns transparent huge pages off for this process (Linux), unless
/// `MIMALLOC_ALLOW_THP` is set: then mimalloc reads it (0 turns them off the
/// same way, 1 leaves them to the kernel's setting, since mimalloc is built
/// with `no_thp` and never asks for them). Returns false when the kernel
/// refused.
///
/// mimalloc commits its arenas up front. Where the kernel backs them with
/// 2 MiB pages (always, or when asked), a few small live buffers keep a
/// whole 2 MiB page resident: with a 200 ms upstream and 1 000 requests in
/// flight the gateway held about 110 MB with huge pages and about 76 MB
/// without, at the same latency and CPU. The kernel checks the flag at each
/// page fault, so it covers memory mapped before this call too.
fn decline_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers, touches no memory
        // of ours and only sets a flag on this process.
        return unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } == 0;
    }
    true
}

fn main() -> ExitCode {
    let small_pages = decline_huge_pages();
    let cli = Cli::parse();
    init_tracing(match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    });
    if !small_pages {
        // Kernels before 3.15 lack the call: the gateway runs the same, with
        // more resident memory.
        tracing::debug!("prctl(PR_SET_THP_DISABLE) failed; transparent huge pages stay on");
    }
    let result = match cli.command {
        Command::CheckConfig { file, strict } => check_config(&file, strict),
        Command::HashKey { key } => hash_key(key),
        Command::Requests { db, last, json } => requests(&db, last, json),
        Command::Serve {
            config,
            listen,
            db,
            grace,
        } => runtime().and_then(|rt| rt.block_on(serve(&config, listen, db, grace))),
        Command::Rollout {
            action,
            name,
            reason,
            server,
            token,
            json,
        } => runtime().and_then(|rt| {
            rt.block_on(rollout_cli::run(rollout_cli::Request {
                action,
                name,
                reason,
                server,
                token,
                json,
            }))
        }),
        Command::Policy {
            command:
                PolicyCommand::Test {
                    config,
                    principle,
                    input,
                    json,
                    text,
                },
        } => policy_cli::test(&config, principle, input, text, json),
        Command::Sim {
            runs,
            max_requests,
            seed,
            json,
        } => sim_cli::run(
            sluice_core::sim::Settings {
                runs,
                max_requests,
                seed,
                threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
                ..Default::default()
            },
            json,
        ),
        Command::Eval(o) => runtime().and_then(|rt| rt.block_on(eval_cli::run(o))),
        Command::Demo {
            requests,
            concurrency,
            listen,
            db,
            no_wait,
        } => runtime().and_then(|rt| {
            rt.block_on(demo::run(demo::Options {
                requests,
                concurrency,
                listen,
                db,
                wait: !no_wait,
            }))
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn read_config(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read config file {} (pass --config PATH; see examples/ for starting points)",
            path.display()
        )
    })
}

/// Parses a config, printing every problem with its path when it is invalid.
fn parse_reporting(path: &Path, text: &str) -> Option<Config> {
    match Config::parse(text) {
        Ok(c) => Some(c),
        Err(errors) => {
            eprintln!("{}: {} problem(s)", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            None
        }
    }
}

fn check_config(file: &Path, strict: bool) -> Result<ExitCode> {
    let text = read_config(file)?;
    let Some(config) = parse_reporting(file, &text) else {
        return Ok(ExitCode::FAILURE);
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let mut unreadable = Vec::new();
    for d in config.deployments.values() {
        for v in d.variants.values() {
            if let Some(f) = &v.system_prompt_file {
                let p = base.join(f);
                if let Err(e) = std::fs::read_to_string(&p) {
                    unreadable.push(format!(
                        "deployments.{}.variants.{}.system_prompt_file: cannot read {}: {e}",
                        d.name,
                        v.name,
                        p.display()
                    ));
                }
            }
        }
    }
    for p in config.principles.values() {
        for (i, d) in p.detectors.iter().enumerate() {
            if let sluice_core::config::DetectorConfig::Judge {
                rubric_file: Some(f),
                ..
            } = d
            {
                let path = base.join(f);
                if let Err(e) = std::fs::read_to_string(&path) {
                    unreadable.push(format!(
                        "principles.{}.detectors[{i}].rubric_file: cannot read {}: {e}",
                        p.id,
                        path.display()
                    ));
                }
            }
        }
    }
    let mut suites: Vec<(String, &str)> = Vec::new();
    for p in config.principles.values() {
        for (i, f) in p.probes.iter().enumerate() {
            suites.push((format!("principles.{}.probes[{i}]", p.id), f));
        }
    }
    for r in config.rollouts.values() {
        for (i, st) in r.stages.iter().enumerate() {
            for (j, req) in st.require_suites.iter().enumerate() {
                suites.push((
                    format!("rollouts.{}.stages[{i}].require_suites[{j}].suite", r.name),
                    &req.suite,
                ));
            }
        }
    }
    for (at, f) in suites {
        match sluice_gateway::eval::load_suite(Some(base), f) {
            Ok(suite) => {
                for e in sluice_gateway::eval::check_suite(&suite, &config) {
                    unreadable.push(format!("{at}: {e}"));
                }
            }
            Err(e) => unreadable.push(format!("{at}: {e}")),
        }
    }
    if !unreadable.is_empty() {
        eprintln!("{}: {} problem(s)", file.display(), unreadable.len());
        for u in &unreadable {
            eprintln!("  {u}");
        }
        return Ok(ExitCode::FAILURE);
    }
    let mut missing = Vec::new();
    for (path, src) in config.secret_sources() {
        if let Err(e) = EnvSecrets.resolve(&src) {
            missing.push(format!("{path}: {e}"));
        }
    }
    for m in &missing {
        if strict {
            eprintln!("  {m}");
        } else {
            eprintln!("warning: {m} (needed by `sluice serve`)");
        }
    }
    if strict && !missing.is_empty() {
        eprintln!(
            "{}: {} secret(s) unavailable",
            file.display(),
            missing.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "{}: ok ({} provider{}, {} deployment{}, {} rollout{}, {} API key{})",
        file.display(),
        config.providers.len(),
        plural(config.providers.len()),
        config.deployments.len(),
        plural(config.deployments.len()),
        config.rollouts.len(),
        plural(config.rollouts.len()),
        config.api_keys.len(),
        plural(config.api_keys.len()),
    );
    Ok(ExitCode::SUCCESS)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn hash_key(key: Option<String>) -> Result<ExitCode> {
    let key = match key {
        Some(k) => k,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_line(&mut s)
                .context("cannot read the key from standard input")?;
            s
        }
    };
    let key = key.trim();
    anyhow::ensure!(!key.is_empty(), "the key is empty");
    println!("{}", sluice_core::secret::digest_hex(key));
    Ok(ExitCode::SUCCESS)
}

fn requests(db: &str, last: usize, json: bool) -> Result<ExitCode> {
    let store = Store::open_existing(db)
        .with_context(|| format!("cannot open store {db} (pass --db PATH)"))?;
    let rows = store.recent(last)?;
    if json {
        for r in rows.iter().rev() {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!("{}", table::requests(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(
    path: &Path,
    listen: Option<String>,
    db: Option<String>,
    grace: Option<Duration>,
) -> Result<ExitCode> {
    let text = read_config(path)?;
    let Some(mut config) = parse_reporting(path, &text) else {
        return Ok(ExitCode::FAILURE);
    };
    if let Some(l) = listen {
        config.listen = l
            .parse()
            .with_context(|| format!("--listen {l}: expected IP:PORT such as 127.0.0.1:8080"))?;
    }
    if let Some(db) = db {
        config.store.path = db;
    }
    let grace = grace.unwrap_or(config.limits.shutdown_grace);
    let summary = describe(&config);
    let store_path = config.store.path.clone();
    let source = ConfigSource {
        config,
        path: Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())),
    };
    let gateway = Gateway::bind(source, std::sync::Arc::new(EnvSecrets)).await?;
    println!("sluice listening on http://{}", gateway.local_addr());
    if let Some(a) = gateway.admin_addr() {
        println!("admin API on http://{a}");
    }
    let rec = gateway.recovery();
    println!(
        "store: {store_path} (schema v{}, integrity ok{})",
        rec.schema,
        if rec.replayed > 0 {
            format!(
                ", {} record(s) recovered from the spill journal",
                rec.replayed
            )
        } else {
            String::new()
        }
    );
    for line in summary {
        println!("  {line}");
    }
    let report = gateway
        .run(sluice_gateway::shutdown_signal(), grace)
        .await?;
    let e = report.events;
    println!(
        "sluice stopped: {} request record(s) written, {} lost{}",
        e.written,
        e.lost(),
        if report.drained {
            ""
        } else {
            " (grace period ran out)"
        }
    );
    Ok(if e.lost() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One line per deployment: its name, stable variant, provider and model.
pub fn describe(config: &Config) -> Vec<String> {
    config
        .deployments
        .values()
        .map(|d| {
            let v = d.stable_variant();
            let kind = config
                .providers
                .get(&v.provider)
                .map(|p| p.kind.name())
                .unwrap_or("?");
            format!(
                "deployment {} → variant {} ({} {} via {}){}",
                d.name,
                v.name,
                kind,
                v.model,
                v.provider,
                if d.variants.len() > 1 {
                    format!(", {} variants", d.variants.len())
                } else {
                    String::new()
                }
            )
        })
        .collect()
}
