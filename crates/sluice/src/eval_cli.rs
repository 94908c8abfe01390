//! `sluice eval`: run probe suites against a variant (and optionally a
//! baseline), print a summary, write JSON / Markdown / JUnit reports, store
//! every run, and exit non-zero when the candidate falls short.
//!
//! Exit codes: 0 every suite met the bar; 1 a suite is below
//! `--min-pass-rate` (or regressed with `--no-regressions`); 2 the run could
//! not happen (bad config, unreadable suite, unknown variant).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, Table};
use indicatif::{ProgressBar, ProgressStyle};
use sluice_core::probe::report::SuiteReport;
use sluice_core::probe::Suite;
use sluice_gateway::eval::{find_variant, load_suite, run_suite, RunOptions};
use sluice_gateway::policy::External;
use sluice_gateway::{EnvSecrets, Snapshot};
use sluice_store::{Store, StoreLocation};

/// What to run (the `sluice eval` arguments).
#[derive(clap::Args)]
pub struct Options {
    /// Configuration file.
    #[arg(long, short, default_value = "sluice.toml")]
    pub config: PathBuf,
    /// A suite file (JSONL); repeat for several.
    #[arg(long = "suite", value_name = "FILE")]
    pub suites: Vec<PathBuf>,
    /// Also run the `probes` suites of this principle.
    #[arg(long)]
    pub principle: Option<String>,
    /// The variant under test: VARIANT or DEPLOYMENT/VARIANT.
    #[arg(long)]
    pub variant: String,
    /// Run the same suites on this variant and report regressions.
    #[arg(long)]
    pub baseline: Option<String>,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Least share of cases that must pass, per suite.
    #[arg(long, default_value_t = 1.0)]
    pub min_pass_rate: f64,
    /// Fail when a case passes on the baseline and fails on the variant.
    #[arg(long)]
    pub no_regressions: bool,
    /// Write JSON, Markdown and JUnit XML reports here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// SQLite store path, overriding `store.path` in the config.
    #[arg(long)]
    pub db: Option<String>,
    /// Time allowed per call.
    #[arg(long, default_value = "60s", value_parser = crate::humantime_duration)]
    pub timeout: Duration,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
}

const UNABLE: u8 = 2;

fn unable(msg: impl std::fmt::Display) -> Result<ExitCode> {
    eprintln!("error: {msg}");
    Ok(ExitCode::from(UNABLE))
}

/// Runs the command.
pub async fn run(o: Options) -> Result<ExitCode> {
    if !(o.min_pass_rate >= 0.0 && o.min_pass_rate <= 1.0) {
        return unable(format!(
            "--min-pass-rate must be between 0 and 1, got {}",
            o.min_pass_rate
        ));
    }
    let text = match std::fs::read_to_string(&o.config) {
        Ok(t) => t,
        Err(e) => {
            return unable(format!(
                "cannot read config file {}: {e}",
                o.config.display()
            ))
        }
    };
    let Some(config) = crate::parse_reporting(&o.config, &text) else {
        return Ok(ExitCode::from(UNABLE));
    };
    let base = o
        .config
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let mut paths: Vec<String> = o
        .suites
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut relative_to_config = Vec::new();
    if let Some(id) = &o.principle {
        let Some(p) = config.principles.get(id) else {
            let known: Vec<&str> = config.principles.keys().map(String::as_str).collect();
            return unable(format!(
                "no principle \"{id}\" (principles: {})",
                known.join(", ")
            ));
        };
        if p.probes.is_empty() {
            return unable(format!(
                "principle \"{id}\" names no probe suites: add `probes = [\"probes/FILE.jsonl\"]` to [principles.{id}]"
            ));
        }
        relative_to_config.extend(p.probes.iter().cloned());
    }
    if paths.is_empty() && relative_to_config.is_empty() {
        return unable("name a suite with --suite FILE (or --principle ID to run its probes)");
    }
    let store_path = o.db.clone().unwrap_or_else(|| config.store.path.clone());
    // Suites call providers directly: client keys and admin tokens are not
    // needed (nor their secrets).
    let mut config = config;
    config.api_keys.clear();
    config.admin_tokens.clear();
    let snap = match Snapshot::build(config, &EnvSecrets, Some(&base)) {
        Ok(s) => s,
        Err(errors) => {
            return unable(format!(
                "cannot use this configuration:\n  {}",
                errors.join("\n  ")
            ))
        }
    };
    let mut suites: Vec<Suite> = Vec::new();
    for p in paths.drain(..) {
        match load_suite(None, &p) {
            Ok(s) => suites.push(s),
            Err(e) => return unable(e),
        }
    }
    for p in &relative_to_config {
        match load_suite(Some(&base), p) {
            Ok(s) => suites.push(s),
            Err(e) => return unable(e),
        }
    }
    for s in &suites {
        let problems = sluice_gateway::eval::check_suite(s, &snap.config);
        if !problems.is_empty() {
            return unable(problems.join("\n  "));
        }
    }
    let (deployment, variant) = match find_variant(&snap, &o.variant) {
        Ok(x) => x,
        Err(e) => return unable(format!("--variant: {e}")),
    };
    let baseline = match &o.baseline {
        None => None,
        Some(b) => match find_variant(&snap, b) {
            Ok((d, v)) if d.config.name == deployment.config.name => Some(v),
            Ok((d, v)) => {
                return unable(format!(
                    "--baseline {}/{v} is in another deployment than --variant {}/{variant}",
                    d.config.name, deployment.config.name
                ))
            }
            Err(e) => return unable(format!("--baseline: {e}")),
        },
    };
    let store = Store::open(StoreLocation::from_config(&store_path))
        .with_context(|| format!("cannot open the store at {store_path}"))?;
    let ext = External::default();
    let opts = RunOptions {
        concurrency: o.concurrency.max(1),
        timeout: o.timeout,
    };
    let calls: u64 =
        suites.iter().map(Suite::calls).sum::<u64>() * if baseline.is_some() { 2 } else { 1 };
    let bar = ProgressBar::new(calls);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} calls ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let tick = || bar.inc(1);
    let mut reports: Vec<(SuiteReport, Option<SuiteReport>)> = Vec::new();
    for suite in &suites {
        let base_report = match &baseline {
            Some(b) => {
                bar.set_message(format!("{} on {b}", suite.name));
                let r = run_suite(&ext, &snap, deployment, b, suite, &opts, &tick)
                    .await
                    .map_err(anyhow::Error::msg)?;
                Some(r)
            }
            None => None,
        };
        bar.set_message(format!("{} on {variant}", suite.name));
        let mut r = run_suite(&ext, &snap, deployment, &variant, suite, &opts, &tick)
            .await
            .map_err(anyhow::Error::msg)?;
        if let Some(b) = &base_report {
            r.compare(b);
        }
        reports.push((r, base_report));
    }
    bar.finish_and_clear();
    let mut run_ids = Vec::new();
    for (r, b) in &reports {
        for rep in std::iter::once(r).chain(b.iter()) {
            let id = sluice_gateway::eval::new_run_id();
            store
                .put_eval_run(&id, "cli", rep)
                .context("cannot store the run")?;
            run_ids.push(id);
        }
    }
    if let Some(dir) = &o.out {
        write_reports(dir, &reports)?;
    }
    let mut failed = false;
    if o.json {
        let all: Vec<&SuiteReport> = reports.iter().map(|(r, _)| r).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    for (r, _) in &reports {
        let below = r.pass_rate() < o.min_pass_rate;
        let regressed = r
            .baseline
            .as_ref()
            .is_some_and(|b| !b.regressions.is_empty());
        let verdict = if below {
            failed = true;
            format!(
                "FAIL: pass rate {:.1} % is below the required {:.1} %",
                100.0 * r.pass_rate(),
                100.0 * o.min_pass_rate
            )
        } else if regressed && o.no_regressions {
            failed = true;
            "FAIL: regressions against the baseline (--no-regressions)".to_string()
        } else {
            format!(
                "ok: pass rate {:.1} % (required {:.1} %)",
                100.0 * r.pass_rate(),
                100.0 * o.min_pass_rate
            )
        };
        if o.json {
            eprintln!("{}: {verdict}", r.headline());
        } else {
            print_summary(r, &verdict);
        }
    }
    if !o.json {
        if let Some(dir) = &o.out {
            println!("reports written to {}", dir.display());
        }
        println!("stored as {} in {store_path}", run_ids.join(", "));
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn stem(name: &str) -> String {
    Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "suite".into())
}

fn write_reports(dir: &Path, reports: &[(SuiteReport, Option<SuiteReport>)]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create report directory {}", dir.display()))?;
    let mut used = std::collections::BTreeSet::new();
    for (r, b) in reports {
        let mut name = stem(&r.suite);
        let mut n = 2;
        while !used.insert(name.clone()) {
            name = format!("{}-{n}", stem(&r.suite));
            n += 1;
        }
        let write = |file: String, text: String| -> Result<()> {
            let p = dir.join(file);
            std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))
        };
        write(format!("{name}.json"), serde_json::to_string_pretty(r)?)?;
        write(format!("{name}.md"), r.markdown())?;
        write(format!("{name}.junit.xml"), r.junit())?;
        if let Some(b) = b {
            write(
                format!("{name}.baseline.json"),
                serde_json::to_string_pretty(b)?,
            )?;
        }
    }
    Ok(())
}

fn print_summary(r: &SuiteReport, verdict: &str) {
    println!("{}", r.headline());
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["", "passed", "total", "pass rate"]);
    t.add_row(vec![
        "all cases".to_string(),
        r.totals.passed.to_string(),
        r.totals.total.to_string(),
        format!("{:.1} %", 100.0 * r.pass_rate()),
    ]);
    for (tag, n) in &r.tags {
        t.add_row(vec![
            format!("tag {tag}"),
            n.passed.to_string(),
            n.total.to_string(),
            format!("{:.1} %", 100.0 * n.rate()),
        ]);
    }
    if let Some(b) = &r.baseline {
        t.add_row(vec![
            format!("baseline {}", b.variant),
            String::new(),
            String::new(),
            format!("{:.1} %", 100.0 * b.pass_rate),
        ]);
    }
    for i in 1..4 {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    println!("{t}");
    if let Some(b) = &r.baseline {
        if b.regressions.is_empty() {
            println!("no regressions against {}", b.variant);
        } else {
            println!(
                "{} regression(s) against {} (pass there, fail here):",
                b.regressions.len(),
                b.variant
            );
            for id in &b.regressions {
                let why = r
                    .cases
                    .iter()
                    .find(|c| &c.id == id)
                    .map(|c| c.reason())
                    .unwrap_or_default();
                println!("  {id}: {why}");
            }
        }
        if !b.fixes.is_empty() {
            println!("fixed since {}: {}", b.variant, b.fixes.join(", "));
        }
    }
    let failing: Vec<_> = r.failures().collect();
    if !failing.is_empty() {
        println!("failing cases:");
        for c in failing.iter().take(20) {
            println!("  {} (line {}): {}", c.id, c.line, c.reason());
        }
        if failing.len() > 20 {
            println!("  … and {} more (see the reports)", failing.len() - 20);
        }
    }
    println!("{verdict}\n");
}
