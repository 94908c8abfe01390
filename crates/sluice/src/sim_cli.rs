//! `sluice sim`: simulated rollouts through the real assignment, aggregation,
//! gate and controller code, with the targets they must meet.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, Table};
use sluice_core::sim::{run_scenario, standard_scenarios, ScenarioResult, Settings};

fn pct(x: f64) -> String {
    format!("{:.1} %", 100.0 * x)
}

/// Whether a result meets its target, and the target in words.
fn target(r: &ScenarioResult, alpha: f64) -> (bool, String) {
    match r.truth {
        "same" => (
            r.rollback_rate <= alpha,
            format!("false rollbacks ≤ {}", pct(alpha)),
        ),
        "worse" => (r.rollback_rate >= 0.95, "detected ≥ 95.0 %".to_string()),
        _ => (
            r.rollback_rate <= alpha,
            format!("wrongly rolled back ≤ {}", pct(alpha)),
        ),
    }
}

/// Runs the standard scenarios and prints the table (or JSON).
pub fn run(settings: Settings, json: bool) -> Result<ExitCode> {
    let started = Instant::now();
    let alpha = 0.05;
    let mut results = Vec::new();
    for s in standard_scenarios() {
        results.push(run_scenario(&s, &settings));
    }
    let elapsed = started.elapsed();
    let all_met = results.iter().all(|r| target(r, alpha).0);
    if json {
        let out: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let (met, what) = target(r, alpha);
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["target"] = what.into();
                v["target_met"] = met.into();
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "runs_per_scenario": settings.runs,
                "max_requests_per_run": settings.max_requests,
                "evaluate_every_requests": settings.tick,
                "candidate_percent": settings.percent,
                "alpha": alpha,
                "seconds": elapsed.as_secs_f64(),
                "scenarios": out,
                "all_targets_met": all_met,
            }))?
        );
    } else {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header([
            "scenario",
            "gate (α = 0.05)",
            "rolled back",
            "promoted",
            "needs a human",
            "median requests to decision",
            "naive test, peeked: rolled back",
            "target",
        ]);
        for r in &results {
            let (met, what) = target(r, alpha);
            t.add_row([
                r.scenario.clone(),
                r.gate.clone(),
                pct(r.rollback_rate),
                pct(r.promote_rate),
                pct(r.needs_human_rate),
                r.median_requests_to_decision
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                pct(r.naive_rollback_rate),
                format!("{} {what}", if met { "✓" } else { "✗" }),
            ]);
        }
        for i in 2..7 {
            if let Some(c) = t.column_mut(i) {
                c.set_cell_alignment(CellAlignment::Right);
            }
        }
        println!(
            "{} runs per scenario, {}% of users on the candidate, gates evaluated every {} requests, \
             a human is asked after {} requests without a decision",
            settings.runs, settings.percent, settings.tick, settings.max_requests
        );
        println!("{t}");
        println!(
            "the sequential gates are always-valid mixture SPRT / quantile confidence sequences; \
             the naive column judges the same data with a fixed-horizon interval at every evaluation"
        );
        println!(
            "{} in {:.1}s",
            if all_met {
                "all targets met"
            } else {
                "SOME TARGETS MISSED"
            },
            elapsed.as_secs_f64()
        );
    }
    Ok(if all_met {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
