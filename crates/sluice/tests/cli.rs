//! The `sluice` binary as a user runs it: config checking, serving with a
//! graceful SIGTERM that flushes every record, `sluice requests`, the demo.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{bin, start_server};
use serde_json::{json, Value};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

#[test]
fn every_example_config_is_accepted() {
    let mut n = 0;
    for entry in std::fs::read_dir(examples_dir()).expect("examples/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        n += 1;
        let out = bin().arg("check-config").arg(&path).output().expect("runs");
        assert!(
            out.status.success(),
            "{} rejected:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok ("));
    }
    assert!(n >= 3, "expected example configs, found {n}");
}

#[test]
fn a_bad_config_lists_every_problem_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
listen = "localhost"
[[api_keys]]
name = "app"
sha256 = "abc"
[providers.openai-main]
kind = "openai"
timeout = "forever"
[deployments.support]
stable = "v1"
variants.v1 = { provider = "opnai", model = "gpt-4o-mini" }
"#,
    )
    .expect("write");
    let out = bin().arg("check-config").arg(&path).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "listen: invalid address \"localhost\"",
        "api_keys[0].sha256: must be 64 hex digits",
        "providers.openai-main.timeout: invalid duration \"forever\"",
        "deployments.support.variants.v1.provider: unknown provider \"opnai\" (known: openai-main); did you mean \"openai-main\"?",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(err.contains("4 problem(s)"), "{err}");
}

#[test]
fn strict_check_requires_secrets() {
    let path = examples_dir().join("quickstart-openai.toml");
    let out = bin()
        .arg("check-config")
        .arg("--strict")
        .arg(&path)
        .env_remove("OPENAI_API_KEY")
        .env_remove("SLUICE_APP_KEY")
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OPENAI_API_KEY is not set"));
    let out = bin()
        .arg("check-config")
        .arg("--strict")
        .arg(&path)
        .env("OPENAI_API_KEY", "sk-x")
        .env("SLUICE_APP_KEY", "sk-y")
        .output()
        .expect("runs");
    assert!(out.status.success());
}

#[test]
fn hash_key_prints_the_digest() {
    let out = bin().args(["hash-key", "sk-local"]).output().expect("runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sluice_core::secret::digest_hex("sk-local")
    );
}

const SIM_CONFIG: &str = r#"
[[api_keys]]
name = "app"
key_env = "TEST_APP_KEY"

[providers.sim]
kind = "simulated"
seed = 3
latency = { median_ms = 300, p99_ms = 600 }
error_rate = 0.05

[deployments.support]
stable = "v1"
variants.v1 = { provider = "sim", model = "sim-1" }
"#;

/// A temporary directory holding `SIM_CONFIG` as `sluice.toml`, with the
/// config's path and a store path beside it.
fn sim_files() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, SIM_CONFIG).expect("write");
    let db = dir.path().join("s.db").to_string_lossy().into_owned();
    (dir, config, db)
}

#[test]
fn sigterm_finishes_in_flight_streams_and_flushes_every_record() {
    let (_dir, config, db) = sim_files();
    let server = start_server(&config, &db, &[("TEST_APP_KEY", "sk-app")]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    const N: usize = 120;
    const IN_FLIGHT: usize = 8;
    let url = format!("{}/v1/chat/completions", server.base);
    let pid = server.child.id();
    let (statuses, tails) = rt.block_on(async {
        let c = reqwest::Client::new();
        let statuses = futures_util::future::join_all((0..N).map(|i| {
            let c = c.clone();
            let url = url.clone();
            async move {
                let r = c
                    .post(&url)
                    .bearer_auth("sk-app")
                    .json(&json!({"model": "support", "stream": i % 2 == 0,
                                  "messages": [{"role": "user", "content": format!("q{i}")}]}))
                    .send()
                    .await
                    .expect("sent");
                let s = r.status().as_u16();
                let _ = r.bytes().await;
                s
            }
        }))
        .await;
        // Open streams, then ask the server to stop while they are mid-way.
        let mut open = Vec::new();
        for i in 0..IN_FLIGHT {
            let r = c
                .post(&url)
                .bearer_auth("sk-app")
                .json(
                    &json!({"model": "support", "stream": true, "seed": 1000 + i,
                              "messages": [{"role": "user", "content": "a long answer please"}]}),
                )
                .send()
                .await
                .expect("sent");
            open.push(r);
        }
        let killed = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success());
        let mut tails = Vec::new();
        for r in open {
            let s = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            tails.push((s, body));
        }
        (statuses, tails)
    });
    let mut server = server;
    let status = server.child.wait().expect("exits");
    assert!(status.success(), "serve exited with {status}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 502),
        "{statuses:?}"
    );
    for (s, body) in &tails {
        if *s == 200 {
            assert!(
                body.ends_with("data: [DONE]\n\n") || body.contains("\"error\""),
                "an in-flight stream was cut by shutdown: {body}"
            );
        }
    }

    // Every request, including the in-flight ones, is in the store.
    let out = bin()
        .args(["requests", "--db", &db, "--last", "100000", "--json"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(rows.len(), N + IN_FLIGHT);
    let errors = rows.iter().filter(|r| r["status"] != 200).count();
    assert_eq!(errors, statuses.iter().filter(|s| **s != 200).count());
    assert!(rows
        .iter()
        .all(|r| r["deployment"] == "support" && r["api_key"] == "app"));

    let out = bin()
        .args(["requests", "--db", &db, "--last", "5"])
        .output()
        .expect("runs");
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.matches("req_").count(), 5, "{table}");
    assert!(
        table.contains("latency ms") && table.contains("support"),
        "{table}"
    );
}

#[test]
fn serve_refuses_to_start_without_its_secrets() {
    let (_dir, config, _) = sim_files();
    let out = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            ":memory:",
            "--config",
        ])
        .arg(&config)
        .env_remove("TEST_APP_KEY")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("api_keys[0] (app): environment variable TEST_APP_KEY is not set"),
        "{err}"
    );
}

/// The `THP_enabled` line of a process's status, if the kernel shows it.
#[cfg(target_os = "linux")]
fn thp_enabled(pid: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
}

#[cfg(target_os = "linux")]
#[test]
fn serve_runs_without_transparent_huge_pages_unless_the_allocator_is_told() {
    let Some(ours) = thp_enabled("self") else {
        eprintln!("this kernel does not show THP_enabled in /proc/PID/status; nothing to check");
        return;
    };
    let (_dir, config, db) = sim_files();
    let server = start_server(&config, &db, &[("TEST_APP_KEY", "sk-app")]);
    let pid = server.child.id().to_string();
    assert_eq!(thp_enabled(&pid).as_deref(), Some("0"));
    drop(server);
    // MIMALLOC_ALLOW_THP hands the choice back to the allocator; with it set
    // to 1 the process keeps whatever it inherited.
    let server = start_server(
        &config,
        &db,
        &[("TEST_APP_KEY", "sk-app"), ("MIMALLOC_ALLOW_THP", "1")],
    );
    let pid = server.child.id().to_string();
    assert_eq!(thp_enabled(&pid), Some(ours));
}

#[test]
fn requests_on_a_missing_store_says_so() {
    let out = bin()
        .args(["requests", "--db", "/nonexistent/sluice.db"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sluice.db"));
}

#[test]
fn the_demo_runs_without_keys_or_network() {
    let out = bin()
        .args(["demo", "--no-wait", "--listen", "127.0.0.1:0"])
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("recorded "))
        .expect("a recorded line");
    let nums: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.parse::<u64>().is_ok())
        .collect();
    assert_eq!(nums.len(), 2, "{line}");
    assert_eq!(nums[0], nums[1], "every request recorded: {line}");
    // The regressing candidate is rolled back by the gates, with the verdict.
    assert!(
        stdout.contains("support-v2: rollback by controller"),
        "{stdout}"
    );
    assert!(
        stdout.contains("gate failed: error_rate: candidate"),
        "{stdout}"
    );
    // The healthy one is walked to everyone by the controller.
    assert!(
        stdout.contains("support-v3: advance by controller: running percent-100 → promoted"),
        "{stdout}"
    );
    assert!(stdout.contains("all gates pass"), "{stdout}");
    assert!(
        stdout.contains("support") && stdout.contains("p99 ms"),
        "{stdout}"
    );
}

const ROLLOUT_CONFIG: &str = r#"
[[api_keys]]
name = "app"
key_env = "TEST_APP_KEY"

[[admin_tokens]]
name = "ops"
role = "operator"
token_env = "TEST_OPS_TOKEN"

[providers.sim]
kind = "simulated"
latency = { median_ms = 5, p99_ms = 20 }

[deployments.support]
stable = "v1"
variants.v1 = { provider = "sim", model = "sim-1" }
variants.v2 = { provider = "sim", model = "sim-2", system_prompt_file = "prompts/v2.txt" }

[rollouts.support-v2]
deployment = "support"
candidate = "v2"
stages = [
  { kind = "percent", percent = 50, min_duration = "1h" },
  { kind = "percent", percent = 100 },
]
"#;

fn rollout_cmd(server: &str, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = bin()
        .arg("rollout")
        .args(args)
        .args(["--server", server])
        .env("SLUICE_TOKEN", token)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn rollout_cli_drives_a_rollout_that_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("prompts")).expect("mkdir");
    std::fs::write(
        dir.path().join("prompts/v2.txt"),
        "You are support agent v2.\n",
    )
    .expect("write");
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, ROLLOUT_CONFIG).expect("write");
    let db = dir.path().join("s.db").to_string_lossy().into_owned();
    let env = [("TEST_APP_KEY", "sk-app"), ("TEST_OPS_TOKEN", "ops-secret")];
    let mut server = start_server(&config, &db, &env);

    let (ok, out, _) = rollout_cmd(&server.base, "ops-secret", &["status"]);
    assert!(ok);
    assert!(
        out.contains("support-v2") && out.contains("pending"),
        "{out}"
    );
    let (ok, _, err) = rollout_cmd(&server.base, "wrong", &["status"]);
    assert!(!ok);
    assert!(err.contains("Unknown admin token"), "{err}");
    let (ok, out, err) = rollout_cmd(
        &server.base,
        "ops-secret",
        &["start", "support-v2", "--reason", "ship it"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("running") && out.contains("1/2 percent-50"),
        "{out}"
    );
    let (ok, _, err) = rollout_cmd(&server.base, "ops-secret", &["advance", "support-v2"]);
    assert!(!ok);
    assert!(
        err.contains("error (409)") && err.contains("min_duration"),
        "{err}"
    );

    // Traffic in the stage; the candidate's prompt comes from its file.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let url = format!("{}/v1/chat/completions", server.base);
    let variants: Vec<String> = rt.block_on(async {
        let c = reqwest::Client::new();
        let mut v = Vec::new();
        for i in 0..20 {
            let r = c
                .post(&url)
                .bearer_auth("sk-app")
                .json(&json!({"model": "support", "user": format!("u{i}"), "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .expect("sent");
            v.push(r.headers()["x-sluice-variant"].to_str().expect("v").to_string());
        }
        v
    });
    assert!(
        variants.iter().any(|v| v == "v1") && variants.iter().any(|v| v == "v2"),
        "{variants:?}"
    );

    // kill -9: no graceful anything. The committed transition must survive.
    server.child.kill().expect("kill -9");
    server.child.wait().expect("reaped");
    let server = start_server(&config, &db, &env);
    let (ok, out, err) = rollout_cmd(&server.base, "ops-secret", &["status", "support-v2"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("running") && out.contains("1/2 percent-50"),
        "{out}"
    );
    assert!(
        out.contains("ship it") && out.contains("ops (operator)"),
        "history survives: {out}"
    );
    let (ok, out, _) = rollout_cmd(
        &server.base,
        "ops-secret",
        &["rollback", "support-v2", "--reason", "enough"],
    );
    assert!(ok);
    assert!(out.contains("rolled_back"), "{out}");
    drop(server);

    // Recorded requests name the stage and why each got its variant.
    let out = bin()
        .args(["requests", "--db", &db, "--last", "100", "--json"])
        .output()
        .expect("runs");
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(
        rows.iter().all(|r| r["rollout"] == "support-v2"
            && r["stage"] == 0
            && r["assignment"] == "bucket"),
        "{rows:?}"
    );
}

#[test]
fn sighup_reloads_a_valid_config_and_keeps_the_old_one_otherwise() {
    let (_dir, config, db) = sim_files();
    let server = start_server(&config, &db, &[("TEST_APP_KEY", "sk-app")]);
    let pid = server.child.id().to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let status_of = |model: &str| {
        let url = format!("{}/v1/chat/completions", server.base);
        let model = model.to_string();
        rt.block_on(async move {
            reqwest::Client::new()
                .post(&url)
                .bearer_auth("sk-app")
                .json(&json!({"model": model, "seed": 1, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .expect("sent")
                .status()
                .as_u16()
        })
    };
    let hup_and_wait = |expect_model: &str, expect: u16| {
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill")
            .success());
        // The reload is asynchronous: poll (bounded) until it shows.
        for _ in 0..100 {
            if status_of(expect_model) == expect {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    };
    assert_eq!(status_of("extra"), 404);
    // Invalid: refused, the old config keeps serving.
    std::fs::write(
        &config,
        format!("{SIM_CONFIG}\n[deployments.extra]\nstable = \"nope\"\n"),
    )
    .expect("write");
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(status_of("support"), 200);
    assert_eq!(status_of("extra"), 404);
    // Valid: takes effect without a restart.
    std::fs::write(
        &config,
        format!("{SIM_CONFIG}\n[deployments.extra]\nstable = \"v1\"\nvariants.v1 = {{ provider = \"sim\", model = \"sim-x\" }}\n"),
    )
    .expect("write");
    assert!(
        hup_and_wait("extra", 200),
        "the new deployment is served after SIGHUP"
    );
}

#[test]
fn sim_reports_every_scenario_with_its_target() {
    let out = bin()
        .args(["sim", "--runs", "12", "--max-requests", "20000", "--json"])
        .output()
        .expect("runs");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let scenarios = v["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 9);
    for s in scenarios {
        assert_eq!(s["runs"], 12);
        let total = s["rollback_rate"].as_f64().expect("r")
            + s["promote_rate"].as_f64().expect("p")
            + s["needs_human_rate"].as_f64().expect("h");
        assert!((total - 1.0).abs() < 1e-9, "{s}");
    }
    let better = scenarios
        .iter()
        .find(|s| s["truth"] == "better")
        .expect("better");
    assert!(
        better["promote_rate"].as_f64().expect("p") > 0.8,
        "{better}"
    );
    let aa = &scenarios[0];
    assert!(
        aa["naive_rollback_rate"].as_f64().expect("n") >= aa["rollback_rate"].as_f64().expect("r"),
        "{aa}"
    );
}

#[test]
fn policy_test_shows_what_fires_and_the_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("p.toml");
    std::fs::write(
        &config,
        r#"
allow_anonymous = true
[providers.sim]
kind = "simulated"
[deployments.d]
stable = "v1"
variants.v1 = { provider = "sim", model = "m" }
principles = ["no-pii-leak", "no-secrets"]
[principles.no-pii-leak]
applies_to = ["output"]
action = "redact"
detectors = [{ kind = "pii", entities = ["email", "credit_card"] }]
[principles.no-secrets]
applies_to = ["input", "output"]
action = "block"
detectors = [{ kind = "secrets" }]
"#,
    )
    .expect("write");
    let out = bin()
        .args(["policy", "test", "--json", "--config"])
        .arg(&config)
        .arg("Mail jane@corp.io, card 4111 1111 1111 1111.")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v["result"],
        "Mail [REDACTED:email], card [REDACTED:credit_card]."
    );
    assert_eq!(v["findings"][0]["spans"][0]["start"], 5);
    let out = bin()
        .args([
            "policy",
            "test",
            "--input",
            "--principle",
            "no-secrets",
            "--config",
        ])
        .arg(&config)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(b"key AKIAIOSFODNN7EXAMPLE")?;
            c.wait_with_output()
        })
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("aws_access_key") && text.contains("400 policy_violation"),
        "{text}"
    );
    let out = bin()
        .args(["policy", "test", "--principle", "nope", "--config"])
        .arg(&config)
        .arg("x")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("known: no-pii-leak, no-secrets"));
}
