//! `sluice policy test`: which principles fire on a text, where, and what
//! the text would become.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::Table;
use sluice_core::config::{Applies, PolicyAction};
use sluice_core::policy::{redact, Constitution, Principle};
use sluice_core::Config;

/// Runs the command.
pub fn test(
    config: &Path,
    principle: Option<String>,
    input: bool,
    text: String,
    json: bool,
) -> Result<ExitCode> {
    let raw = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read config file {}", config.display()))?;
    let cfg = match Config::parse(&raw) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let selected: Vec<_> = cfg
        .principles
        .values()
        .filter(|p| principle.as_ref().is_none_or(|id| &p.id == id))
        .collect();
    if selected.is_empty() {
        let known: Vec<&str> = cfg.principles.keys().map(String::as_str).collect();
        anyhow::bail!(
            "no principle {}(known: {})",
            principle
                .map(|p| format!("named \"{p}\" "))
                .unwrap_or_default(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    let mut principles = Vec::new();
    for p in selected {
        principles.push(Arc::new(Principle::compile(p).map_err(anyhow::Error::msg)?));
    }
    let constitution = Constitution { principles };
    let text = if text == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the text from standard input")?;
        s
    } else {
        text
    };
    let stage = if input {
        Applies::Input
    } else {
        Applies::Output
    };
    let findings = constitution.check(stage, &text);
    let external: Vec<String> = constitution
        .principles
        .iter()
        .filter(|p| p.applies(stage))
        .flat_map(|p| {
            p.detectors
                .iter()
                .filter(|d| matches!(d, sluice_core::policy::Compiled::External(_)))
                .map(move |d| format!("{} ({})", p.config.id, d.kind()))
        })
        .collect();
    let blocked = findings.iter().find(|f| f.action == PolicyAction::Block);
    let result = match blocked {
        Some(b) if input => format!(
            "request refused with 400 policy_violation (principle {})",
            b.principle
        ),
        Some(b) => constitution
            .principles
            .iter()
            .find(|p| p.config.id == b.principle)
            .map(|p| {
                format!(
                    "answer replaced (finish_reason content_filter): {}",
                    p.config.message
                )
            })
            .unwrap_or_default(),
        None => redact(&text, &findings),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "stage": if input { "input" } else { "output" },
                "findings": findings,
                "result": result,
                "not_run": external,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if findings.is_empty() {
        println!(
            "no principle fires on this {}",
            if input { "input" } else { "output" }
        );
    } else {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(["principle", "action", "detector", "what", "where (bytes)"]);
        for f in &findings {
            for s in &f.spans {
                t.add_row([
                    f.principle.clone(),
                    f.action.name().to_string(),
                    f.detector.clone(),
                    s.label.clone(),
                    format!("{}..{}", s.start, s.end),
                ]);
            }
        }
        println!("{t}");
    }
    println!("result: {result}");
    if !external.is_empty() {
        println!(
            "not run here (they call out at serving time): {}",
            external.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
