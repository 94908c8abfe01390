//! `sluice-load`: the load harness. See bench/README.md.
//!
//! ```text
//! sluice-load mock  [--listen ADDR] [--latency 0|20ms|lognormal:20ms:80ms] [--chunks N] [--interval 1ms]
//! sluice-load passthrough --upstream ADDR [--listen ADDR]
//! sluice-load run   [--scenarios direct,nginx,sluice,...] [--rates 500,2000,5000] [--modes non-stream,stream]
//!                   [--duration 10s] [--warmup 2s] [--find-max] [--out FILE.json]
//! sluice-load soak  [--scenario sluice-policies] [--rate 1000] [--duration 10m] [--out FILE.json]
//! sluice-load rollback [--rates 2000,5000] [--trials 5] [--before 3s] [--after 1s] [--out FILE.json]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sluice_bench::load::mock::{self, Latency, MockConfig};
use sluice_bench::load::run::{self, Plan};
use sluice_bench::load::targets::{Programs, Scenario};
use sluice_bench::load::{gen, procstat, rollback, targets};

#[derive(Parser)]
#[command(
    name = "sluice-load",
    about = "Load harness: sluice against its peers on one mock upstream"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Runtime threads of the harness's own processes (the generator and
    /// the mock it starts), 0 for one per core. On a machine the target
    /// shares with them, fewer leaves it more CPU; the target's own
    /// threads are not affected.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
}

#[derive(clap::Args, Clone)]
struct MockArgs {
    /// Time before an answer (or a stream's first chunk): 0, 20ms, or
    /// lognormal:MEDIAN:P99.
    #[arg(long, default_value = "0")]
    latency: Latency,
    /// Content chunks per streamed answer.
    #[arg(long, default_value_t = 10)]
    chunks: usize,
    /// Time between streamed chunks.
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    interval: Duration,
}

impl MockArgs {
    fn config(&self) -> MockConfig {
        MockConfig {
            latency: self.latency,
            chunks: self.chunks,
            interval: self.interval,
        }
    }
    fn args(&self) -> Vec<String> {
        vec![
            "--latency".into(),
            match self.latency {
                Latency::Fixed(d) if d.is_zero() => "0".into(),
                Latency::Fixed(d) => format!("{}us", d.as_micros()),
                Latency::LogNormal { median, p99 } => {
                    format!("lognormal:{}us:{}us", median.as_micros(), p99.as_micros())
                }
            },
            "--chunks".into(),
            self.chunks.to_string(),
            "--interval".into(),
            format!("{}us", self.interval.as_micros()),
        ]
    }
}

#[derive(clap::Args, Clone)]
struct ProgramArgs {
    /// The sluice binary (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/sluice")]
    sluice_bin: PathBuf,
    /// nginx (Debian's `nginx` package).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx_bin: PathBuf,
    /// The LiteLLM proxy command (`pip install 'litellm[proxy]==1.101.0'`).
    #[arg(long, default_value = "litellm")]
    litellm_bin: PathBuf,
    /// Pin the load generator and the mock to CPU 0 and the system under
    /// test to the other CPUs, so they do not steal each other's time.
    #[arg(long)]
    pin: bool,
    /// Keep each sluice target's log (at `info`) and a copy of its store
    /// (every request record) in this directory.
    #[arg(long)]
    logs: Option<PathBuf>,
    /// sluice's `workers` setting: 0 serves on its shared work-stealing
    /// runtime, N on N dedicated threads.
    #[arg(long, default_value_t = 0)]
    sluice_workers: usize,
    /// sluice's `max_connections` setting: 0 for no cap.
    #[arg(long, default_value_t = 0)]
    sluice_max_connections: usize,
}

impl ProgramArgs {
    fn programs(&self) -> Programs {
        Programs {
            sluice: self.sluice_bin.clone(),
            nginx: self.nginx_bin.clone(),
            litellm: self.litellm_bin.clone(),
            logs: self.logs.clone(),
            sluice_workers: self.sluice_workers,
            sluice_max_connections: self.sluice_max_connections,
            target_cpus: self.pin.then(|| {
                let n = std::thread::available_parallelism().map_or(2, |n| n.get());
                format!("1-{}", n.saturating_sub(1).max(1))
            }),
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the mock upstream until killed.
    Mock {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[command(flatten)]
        mock: MockArgs,
    },
    /// Serve a bare reverse proxy on sluice's stack (hyper on tokio) to
    /// `upstream` until killed: the `hyper-proxy` scenario.
    Passthrough {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Where to forward (the mock).
        #[arg(long)]
        upstream: SocketAddr,
    },
    /// Run scenarios side by side at each rate.
    Run {
        /// Comma-separated: direct, nginx, hyper-proxy (a bare hyper
        /// proxy: the stack's own cost), sluice, sluice-policies,
        /// sluice-rollout, litellm.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "direct,nginx,sluice,sluice-policies,sluice-rollout,litellm"
        )]
        scenarios: Vec<Scenario>,
        /// Comma-separated arrival rates (requests per second).
        #[arg(long, value_delimiter = ',', default_value = "500,2000,5000")]
        rates: Vec<u32>,
        /// Comma-separated: non-stream, stream.
        #[arg(long, value_delimiter = ',', default_value = "non-stream,stream")]
        modes: Vec<String>,
        /// Counted time per run.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Uncounted warm-up per run: as many requests as this long at the
        /// full rate, sent with the rate climbing from a tenth of it to all
        /// of it (so it lasts about 1.8 times as long).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Also find the highest rate each scenario sustains (p99 < 50 ms,
        /// < 1 % errors), non-streamed.
        #[arg(long)]
        find_max: bool,
        /// Repeat the whole sequence this many times at each mode and rate
        /// and summarise with medians (a virtual machine's scheduling noise
        /// moves single p99 readings by milliseconds).
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Start every scenario of a round together and send to each in
        /// turn for this long at a time (e.g. 500ms) within one arrival
        /// process, so the floor and every scenario share the machine's good
        /// and bad moments; without it they run one after another.
        #[arg(long, value_parser = humantime::parse_duration)]
        interleave: Option<Duration>,
        /// Write every result as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        mock: MockArgs,
        #[command(flatten)]
        programs: ProgramArgs,
    },
    /// Roll a rollout back while sluice serves at each rate: how long the
    /// rollback takes to answer, and that nothing sent after it reaches the
    /// candidate. Each trial starts sluice fresh.
    Rollback {
        /// Comma-separated arrival rates (requests per second).
        #[arg(long, value_delimiter = ',', default_value = "500,2000,5000")]
        rates: Vec<u32>,
        /// Trials per rate.
        #[arg(long, default_value_t = 5)]
        trials: u32,
        /// Ramp-up before the full rate.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Full-rate time before the rollback.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        before: Duration,
        /// Full-rate time after the rollback is sent.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        after: Duration,
        /// Write every trial as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        mock: MockArgs,
        #[command(flatten)]
        programs: ProgramArgs,
    },
    /// Hold one scenario at a rate for a long time; report memory over time.
    Soak {
        #[arg(long, default_value = "sluice-policies")]
        scenario: Scenario,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        mock: MockArgs,
        #[command(flatten)]
        programs: ProgramArgs,
    },
}

/// Pins this process (every thread) to CPU 0.
fn pin_self() -> Result<()> {
    let ok = Command::new("taskset")
        .args(["-a", "-cp", "0", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset")?
        .success();
    if !ok {
        bail!("taskset could not pin the load generator");
    }
    Ok(())
}

/// Pins this process when `pin`, then starts the mock (see [`spawn_mock`]).
fn start_mock(
    m: &MockArgs,
    pin: bool,
    threads: usize,
) -> Result<(std::process::Child, SocketAddr)> {
    if pin {
        pin_self()?;
    }
    spawn_mock(m, pin, threads)
}

/// Starts the mock as its own process (so its CPU is not the generator's);
/// pinned to CPU 0 with the generator when `pin`.
fn spawn_mock(
    m: &MockArgs,
    pin: bool,
    threads: usize,
) -> Result<(std::process::Child, SocketAddr)> {
    let exe = std::env::current_exe().context("locating sluice-load")?;
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    let mut child = cmd
        .arg("mock")
        .args(m.args())
        .args(["--threads", &threads.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the mock")?;
    let out = child.stdout.take().context("mock stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    let addr = line
        .trim()
        .strip_prefix("mock listening on ")
        .context("mock did not start")?
        .parse()?;
    Ok((child, addr))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = cli.threads;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let rt = builder.enable_all().build()?;
    match cli.cmd {
        Cmd::Mock { listen, mock } => rt.block_on(async {
            let l = mock::listen(listen)?;
            println!("mock listening on {}", l.local_addr()?);
            mock::serve(l, mock.config()).await;
            Ok(())
        }),
        Cmd::Passthrough { listen, upstream } => rt.block_on(async {
            let l = mock::listen(listen)?;
            println!("passthrough listening on {}", l.local_addr()?);
            sluice_bench::load::passthrough::serve(l, upstream).await;
            Ok(())
        }),
        Cmd::Run {
            scenarios,
            rates,
            modes,
            duration,
            warmup,
            find_max,
            rounds,
            interleave,
            out,
            mock,
            programs,
        } => {
            let mut streams = Vec::new();
            for m in &modes {
                match m.as_str() {
                    "non-stream" => streams.push(false),
                    "stream" => streams.push(true),
                    other => bail!("unknown mode {other:?} (non-stream, stream)"),
                }
            }
            let (mut mock_child, addr) = start_mock(&mock, programs.pin, threads)?;
            let plan = Plan {
                scenarios: scenarios.clone(),
                rates,
                streams,
                duration,
                warmup,
                programs: programs.programs(),
                rounds,
                interleave,
            };
            let started = std::time::Instant::now();
            let runs = rt.block_on(run::run_plan(&plan, addr, |r| {
                eprintln!(
                    "{}",
                    run::table(std::slice::from_ref(r))
                        .lines()
                        .last()
                        .unwrap_or("")
                );
            }));
            let mut maxima = Vec::new();
            let mut max_runs = Vec::new();
            if find_max {
                let ladder = [
                    500, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000, 10000, 12000, 15000,
                    20000, 25000,
                ];
                for s in &scenarios {
                    let (r, best) = rt.block_on(run::find_max(
                        *s,
                        addr,
                        &plan.programs,
                        false,
                        &ladder,
                        (Duration::from_secs(4), Duration::from_secs(1)),
                        |r| {
                            eprintln!(
                                "max search {}: {}",
                                r.scenario.name(),
                                run::table(std::slice::from_ref(r))
                                    .lines()
                                    .last()
                                    .unwrap_or("")
                            )
                        },
                    ));
                    maxima
                        .push(serde_json::json!({"scenario": s.name(), "max_sustained_rps": best}));
                    max_runs.extend(r);
                }
            }
            let _ = mock_child.kill();
            let _ = mock_child.wait();
            println!("{}", run::table(&runs));
            println!("{}", run::summary(&runs));
            for m in &maxima {
                println!("highest sustained rate (p99 < 50 ms, < 1 % errors): {m}");
            }
            if let Some(path) = out {
                let doc = serde_json::json!({
                    "date": chrono_date(),
                    "machine": machine(),
                    "pinned": programs.pin,
                    "harness_threads": threads,
                    "mock": {"latency": format!("{:?}", mock.latency), "chunks": mock.chunks, "interval_us": mock.interval.as_micros() as u64},
                    "duration_s": duration.as_secs_f64(),
                    "warmup_s": warmup.as_secs_f64(),
                    "wall_s": started.elapsed().as_secs_f64(),
                    "rounds": rounds,
                    "interleave_ms": interleave.map(|d| d.as_millis() as u64),
                    "runs": runs,
                    "max_sustained": maxima,
                    "max_search_runs": max_runs,
                });
                std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        Cmd::Rollback {
            rates,
            trials,
            warmup,
            before,
            after,
            out,
            mock,
            programs,
        } => {
            let (mut mock_child, addr) = start_mock(&mock, programs.pin, threads)?;
            let p = programs.programs();
            let mut all = Vec::new();
            for &rate in &rates {
                for n in 1..=trials {
                    let target = targets::start(Scenario::SluiceRollback, addr, &p)
                        .map_err(anyhow::Error::msg)?;
                    let probes = rt
                        .block_on(run::ready(
                            &target.url,
                            target.bearer.as_deref(),
                            Duration::from_secs(10),
                        ))
                        .map_err(anyhow::Error::msg)?;
                    let spec = rollback::RollbackSpec {
                        url: target.url.clone(),
                        bearer: targets::KEY.to_string(),
                        admin_port: target
                            .admin_port
                            .context("the rollback scenario has an admin listener")?,
                        admin_token: targets::OPS.to_string(),
                        rollout: "support-v2".to_string(),
                        body: run::body(false),
                        rate,
                        warmup,
                        before,
                        after,
                        timeout: Duration::from_secs(30),
                        max_outstanding: 20_000,
                    };
                    let mut t = rt.block_on(rollback::trial(&spec));
                    let rows = target.stop().map_err(anyhow::Error::msg)?;
                    if let Some(rows) = rows {
                        let rows = rows.saturating_sub(probes);
                        t.recorded = Some(rows);
                        t.no_event_lost = Some(run::no_event_lost(rows, t.answered, t.sent));
                    }
                    eprintln!(
                        "rollback at {rate}/s, trial {n}: status {}, answered in {:.1} ms, last candidate send {:?} ms, {} of {} sent after the answer reached the candidate, p99 {:.2} ms the second before, {:.2} ms around it, recorded {:?} of {} sent",
                        t.rollback_status,
                        t.answer_ms,
                        t.last_candidate_sent_ms.map(|m| (m * 10.0).round() / 10.0),
                        t.candidate_after_answer,
                        t.sent_after_answer,
                        t.p99_before_us as f64 / 1000.0,
                        t.p99_around_us as f64 / 1000.0,
                        t.recorded,
                        t.sent,
                    );
                    all.push(t);
                }
            }
            let _ = mock_child.kill();
            let _ = mock_child.wait();
            println!("{}", rollback::table(&all));
            if let Some(path) = out {
                let doc = serde_json::json!({
                    "date": chrono_date(),
                    "machine": machine(),
                    "sluice_workers": programs.sluice_workers,
                    "sluice_max_connections": programs.sluice_max_connections,
                    "warmup_s": warmup.as_secs_f64(),
                    "before_s": before.as_secs_f64(),
                    "after_s": after.as_secs_f64(),
                    "trials": all,
                });
                std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
                eprintln!("wrote {}", path.display());
            }
            if all
                .iter()
                .any(|t| t.rollback_status != 200 || t.candidate_after_answer > 0)
            {
                bail!("a rollback failed, or a request sent after it reached the candidate");
            }
            Ok(())
        }
        Cmd::Soak {
            scenario,
            rate,
            duration,
            out,
            mock,
            programs,
        } => {
            let (mut mock_child, addr) = start_mock(&mock, programs.pin, threads)?;
            let p = programs.programs();
            let target = targets::start(scenario, addr, &p).map_err(anyhow::Error::msg)?;
            let pid = target.pid().context("soak needs a target process")?;
            let sampler = procstat::RssSampler::start(pid, Duration::from_secs(5));
            let load = rt.block_on(gen::run(gen::LoadSpec {
                url: target.url.clone(),
                bearer: target.bearer.clone(),
                body: run::body(false),
                rate,
                duration,
                warmup: Duration::from_secs(10),
                stream: false,
                max_outstanding: 20_000,
                timeout: Duration::from_secs(30),
            }));
            let (peak, samples) = sampler.finish();
            let sent = load.sent;
            let rows = target.stop().map_err(anyhow::Error::msg)?;
            let _ = mock_child.kill();
            let _ = mock_child.wait();
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            // Skip the warm-up's samples (10 s at one every 5 s).
            let steady: Vec<u64> = samples.iter().skip(2).copied().collect();
            let start = steady.first().copied().unwrap_or(0);
            let end = steady.last().copied().unwrap_or(0);
            println!(
                "soak {} at {rate}/s for {duration:?}: RSS start {:.1} MiB, end {:.1} MiB, peak {:.1} MiB; p99 {:.2} ms; {} ok, {} errors; recorded {:?} of {sent} sent",
                scenario.name(),
                mib(start),
                mib(end),
                mib(peak),
                load.latency_us.p99 as f64 / 1000.0,
                load.ok,
                load.errors + load.saturated,
                rows,
            );
            if let Some(path) = out {
                let doc = serde_json::json!({
                    "date": chrono_date(),
                    "machine": machine(),
                    "scenario": scenario.name(),
                    "rate": rate,
                    "duration_s": duration.as_secs_f64(),
                    "rss_start_mib": mib(start),
                    "rss_end_mib": mib(end),
                    "rss_peak_mib": mib(peak),
                    "rss_samples_mib": samples.iter().map(|b| mib(*b)).collect::<Vec<_>>(),
                    "load": load,
                    "recorded": rows,
                    "sent": sent,
                });
                std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
            }
            Ok(())
        }
    }
}

/// Today's date (UTC) as YYYY-MM-DD.
fn chrono_date() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}
