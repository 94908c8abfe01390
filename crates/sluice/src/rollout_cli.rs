//! `sluice rollout ACTION [NAME]`: drive rollouts through a running gateway's
//! admin API and print readable tables.

use std::process::ExitCode;

use anyhow::{Context, Result};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::Table;
use serde_json::{json, Value};

/// What to do.
pub struct Request {
    /// `status`, `start`, `advance`, ...
    pub action: String,
    /// The rollout (optional for `status`).
    pub name: Option<String>,
    /// Why (recorded in the history).
    pub reason: Option<String>,
    /// Gateway base URL.
    pub server: String,
    /// Admin token.
    pub token: String,
    /// Print the raw JSON instead of tables.
    pub json: bool,
}

/// The actions the CLI accepts.
pub const ACTIONS: &[&str] = &[
    "status", "start", "advance", "pause", "resume", "rollback", "promote", "abort", "approve",
];

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn stage_cell(v: &Value) -> String {
    match v["status"].as_str() {
        Some("running") | Some("paused") => format!(
            "{}/{} {}",
            v["stage"].as_u64().unwrap_or(0) + 1,
            v["stages"].as_array().map_or(0, Vec::len),
            v["stage_label"].as_str().unwrap_or("")
        ),
        _ => "-".to_string(),
    }
}

/// One table row per rollout.
pub fn summary_table(rollouts: &[Value]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "rollout",
        "deployment",
        "stable → candidate",
        "status",
        "stage",
        "time in stage",
        "requests stable/candidate",
        "waiting for",
    ]);
    for v in rollouts {
        let active = matches!(v["status"].as_str(), Some("running" | "paused"));
        t.add_row([
            v["name"].as_str().unwrap_or("").to_string(),
            v["deployment"].as_str().unwrap_or("").to_string(),
            format!(
                "{} → {}",
                v["stable"].as_str().unwrap_or(""),
                v["candidate"].as_str().unwrap_or("")
            ),
            v["status"].as_str().unwrap_or("").to_string(),
            stage_cell(v),
            if active {
                duration(v["time_in_stage_ms"].as_u64().unwrap_or(0))
            } else {
                "-".into()
            },
            format!(
                "{}/{}",
                v["requests"]["stable"].as_u64().unwrap_or(0),
                v["requests"]["candidate"].as_u64().unwrap_or(0)
            ),
            v["blockers"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| {
                    if active {
                        "ready to advance".into()
                    } else {
                        "-".into()
                    }
                }),
        ]);
    }
    t
}

fn plan_table(v: &Value) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["#", "stage", "min duration", "min requests", "approval", ""]);
    let current = v["stage"].as_u64();
    let active = matches!(v["status"].as_str(), Some("running" | "paused"));
    for s in v["stages"].as_array().into_iter().flatten() {
        let i = s["index"].as_u64().unwrap_or(0);
        t.add_row([
            (i + 1).to_string(),
            s["label"].as_str().unwrap_or("").to_string(),
            duration(s["min_duration_ms"].as_u64().unwrap_or(0)),
            s["min_requests"].to_string(),
            s["approval"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
            if active && current == Some(i) {
                "◀ here".into()
            } else {
                String::new()
            },
        ]);
    }
    t
}

pub fn history_table(v: &Value) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["time (UTC)", "actor", "action", "from", "to", "reason"]);
    for e in v["history"].as_array().into_iter().flatten() {
        t.add_row([
            crate::table::utc(e["ts_ms"].as_i64().unwrap_or(0)),
            format!(
                "{} ({})",
                e["actor"].as_str().unwrap_or(""),
                e["role"].as_str().unwrap_or("")
            ),
            e["action"].as_str().unwrap_or("").to_string(),
            format!(
                "{} @{}",
                e["from_status"].as_str().unwrap_or(""),
                e["from_stage"].as_u64().unwrap_or(0) + 1
            ),
            format!(
                "{} @{}",
                e["to_status"].as_str().unwrap_or(""),
                e["to_stage"].as_u64().unwrap_or(0) + 1
            ),
            e["reason"].as_str().unwrap_or("").to_string(),
        ]);
    }
    t
}

/// The latest verdict of each gate.
pub fn gates_table(v: &Value) -> Option<Table> {
    let gates = v["gates"].as_array().filter(|g| !g.is_empty())?;
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "gate",
        "verdict",
        "n stable/candidate",
        "p-value",
        "details",
    ]);
    for g in gates {
        t.add_row([
            g["signal"].as_str().unwrap_or("").to_string(),
            g["outcome"].as_str().unwrap_or("").to_string(),
            format!(
                "{}/{}",
                g["n_stable"].as_u64().unwrap_or(0),
                g["n_candidate"].as_u64().unwrap_or(0)
            ),
            g["p_value"]
                .as_f64()
                .map(|p| format!("{p:.3}"))
                .unwrap_or_else(|| "-".into()),
            g["summary"].as_str().unwrap_or("").to_string(),
        ]);
    }
    Some(t)
}

/// Runs the command.
pub async fn run(req: Request) -> Result<ExitCode> {
    anyhow::ensure!(
        ACTIONS.contains(&req.action.as_str()),
        "unknown action `{}` (known: {})",
        req.action,
        ACTIONS.join(", ")
    );
    anyhow::ensure!(
        !req.token.is_empty(),
        "no admin token: set SLUICE_TOKEN (or pass --token) to a token from [[admin_tokens]]"
    );
    let base = req.server.trim_end_matches('/');
    let client = reqwest::Client::new();
    let send = match (&req.action[..], &req.name) {
        ("status", None) => client.get(format!("{base}/admin/rollouts")),
        ("status", Some(n)) => client.get(format!("{base}/admin/rollouts/{n}")),
        (_, None) => anyhow::bail!("`sluice rollout {}` needs the rollout's NAME", req.action),
        (a, Some(n)) => client
            .post(format!("{base}/admin/rollouts/{n}/{a}"))
            .json(&json!({"reason": req.reason})),
    };
    let resp = send.bearer_auth(&req.token).send().await.with_context(|| {
        format!("cannot reach the sluice admin API at {base} (pass --server URL)")
    })?;
    let status = resp.status();
    let body: Value = resp.json().await.with_context(|| {
        format!("the server at {base} did not answer with JSON (is it sluice?)")
    })?;
    if !status.is_success() {
        let msg = body["error"]["message"]
            .as_str()
            .unwrap_or("request failed");
        eprintln!("error ({}): {msg}", status.as_u16());
        return Ok(ExitCode::FAILURE);
    }
    if req.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    match (&req.action[..], &req.name) {
        ("status", None) => {
            let list = body["data"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no rollouts are configured");
            } else {
                println!("{}", summary_table(&list));
            }
        }
        ("status", Some(_)) => {
            println!("{}", summary_table(std::slice::from_ref(&body)));
            if let Some(why) = body["needs_human"].as_str() {
                println!("NEEDS A HUMAN: {why}");
            }
            if let Some(t) = gates_table(&body) {
                println!(
                    "gates (evaluated every {} ms):\n{t}",
                    body["evaluate_every_ms"]
                );
            }
            println!("plan:\n{}", plan_table(&body));
            println!("history:\n{}", history_table(&body));
        }
        _ => {
            println!(
                "{}: {} → {} {}",
                body["name"].as_str().unwrap_or(""),
                req.action,
                body["status"].as_str().unwrap_or(""),
                stage_cell(&body)
            );
            println!("{}", summary_table(std::slice::from_ref(&body)));
        }
    }
    Ok(ExitCode::SUCCESS)
}
