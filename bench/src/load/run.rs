//! Runs scenarios side by side against one mock and reports added latency
//! over the floor (`direct`) at the same rate.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::gen::{self, LoadResult, LoadSpec};
use super::procstat;
use super::targets::{self, Programs, Scenario};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Systems under test (`direct` is always run first as the floor).
    pub scenarios: Vec<Scenario>,
    /// Arrival rates, requests per second.
    pub rates: Vec<u32>,
    /// Non-streamed (`false`) and/or streamed (`true`).
    pub streams: Vec<bool>,
    /// Counted time per run.
    pub duration: Duration,
    /// Uncounted warm-up per run.
    pub warmup: Duration,
    /// The programs.
    pub programs: Programs,
    /// How many times the whole sequence runs at each mode and rate; each
    /// round has its own floor, and [`summary`] takes medians over rounds.
    pub rounds: u32,
    /// Run every scenario of a round at once, taking turns in slices of
    /// this length within one arrival process, instead of one after another.
    pub interleave: Option<Duration>,
}

/// One scenario at one rate and mode.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Which system.
    pub scenario: Scenario,
    /// Streamed answers?
    pub stream: bool,
    /// What the generator measured.
    pub load: LoadResult,
    /// Added over `direct` at the same rate and mode, microseconds
    /// (p50, p99, p99.9).
    pub added_us: Option<[i64; 3]>,
    /// Streams: added time to first token, p50 and p99.
    pub added_ttft_us: Option<[i64; 2]>,
    /// Peak resident memory of the target's processes, MiB.
    pub peak_rss_mib: Option<f64>,
    /// CPU seconds the target used per 1000 requests.
    pub cpu_s_per_1000: Option<f64>,
    /// Of those, the seconds spent in the kernel on the target's behalf
    /// (system calls, the network stack): the rest is its own code.
    pub kernel_cpu_s_per_1000: Option<f64>,
    /// Context switches of the target's threads per request sent (each a
    /// thread sleeping or preempted; see `procstat::context_switches`).
    pub switches_per_request: Option<f64>,
    /// Time the target's threads spent runnable but waiting for a CPU, per
    /// request sent, microseconds (see `procstat::run_queue_wait`).
    pub wait_us_per_request: Option<f64>,
    /// sluice: its own overhead per request (arrival to answer minus the
    /// upstream wait), from its histogram: bucket bounds holding p50, p99,
    /// p99.9, microseconds.
    pub overhead_us: Option<[u64; 3]>,
    /// sluice with `workers = N`: requests whose handler ran on another
    /// serving thread than its connection's.
    pub offloaded: Option<u64>,
    /// sluice: rows recorded in its store after a graceful stop.
    pub recorded: Option<u64>,
    /// sluice: whether every request that reached it was recorded (see
    /// [`no_event_lost`]).
    pub no_event_lost: Option<bool>,
    /// Why the run could not happen, if it could not.
    pub failed: Option<String>,
    /// Which repetition of the plan this run belongs to (from 1).
    pub round: u32,
    /// Share of the machine's CPU the hypervisor took during the load, %.
    pub steal_pct: Option<f64>,
}

/// The request body every target gets.
pub fn body(stream: bool) -> bytes::Bytes {
    bytes::Bytes::from(format!(
        r#"{{"model":"support","messages":[{{"role":"user","content":"Where is my order #1234? It has not arrived yet and I would like to know when it will."}}],"stream":{stream}}}"#
    ))
}

/// Waits until `url` answers a chat request with 200; returns how many
/// requests that took (sluice records them too).
pub async fn ready(url: &str, bearer: Option<&str>, within: Duration) -> Result<u64, String> {
    let start = std::time::Instant::now();
    let mut sent = 0;
    loop {
        let r = gen::run(LoadSpec {
            url: url.to_string(),
            bearer: bearer.map(str::to_string),
            body: body(false),
            rate: 10,
            duration: Duration::from_millis(300),
            warmup: Duration::ZERO,
            stream: false,
            max_outstanding: 10,
            timeout: Duration::from_secs(20),
        })
        .await;
        sent += r.sent;
        if r.ok > 0 && r.errors == 0 {
            return Ok(sent);
        }
        if start.elapsed() > within {
            return Err(format!(
                "{url} did not answer within {within:?}: {:?}",
                r.statuses
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Starts `scenario` and waits until it answers a real request (an open
/// port is not a ready server: LiteLLM keeps loading after it binds);
/// returns it and how many requests that took (sluice records them too).
async fn launch(
    scenario: Scenario,
    mock: SocketAddr,
    programs: &Programs,
) -> Result<(targets::Running, u64), String> {
    let p = programs.clone();
    let target = tokio::task::spawn_blocking(move || targets::start(scenario, mock, &p))
        .await
        .map_err(|e| e.to_string())??;
    let probes = ready(
        &target.url,
        target.bearer.as_deref(),
        Duration::from_secs(180),
    )
    .await?;
    Ok((target, probes))
}

/// A ready target whose CPU time and memory are being watched.
struct Watched {
    target: targets::Running,
    probes: u64,
    cpu0: Option<procstat::CpuTime>,
    switches0: Option<u64>,
    wait0: Option<Duration>,
    rss: Option<procstat::RssSampler>,
}

impl Watched {
    fn start((target, probes): (targets::Running, u64)) -> Watched {
        let pid = target.pid();
        Watched {
            cpu0: pid.map(procstat::cpu_time),
            switches0: pid.map(procstat::context_switches),
            wait0: pid.map(procstat::run_queue_wait),
            rss: pid.map(|p| procstat::RssSampler::start(p, Duration::from_millis(100))),
            target,
            probes,
        }
    }

    /// After the load (already in `run.load`): fills in CPU per request,
    /// peak memory and sluice's own overhead, stops the target and checks
    /// its rows against the requests sent.
    async fn settle(self, run: &mut Run) {
        let Watched {
            target,
            probes,
            cpu0,
            switches0,
            wait0,
            rss,
        } = self;
        let sent = run.load.sent.max(1) as f64;
        if let (Some(pid), Some(cpu0)) = (target.pid(), cpu0) {
            let used = procstat::cpu_time(pid).since(cpu0);
            let per_1000 = |d: Duration| d.as_secs_f64() / sent * 1000.0;
            run.cpu_s_per_1000 = Some(per_1000(used.total()));
            run.kernel_cpu_s_per_1000 = Some(per_1000(used.kernel));
        }
        if let (Some(pid), Some(before)) = (target.pid(), switches0) {
            let n = procstat::context_switches(pid).saturating_sub(before);
            run.switches_per_request = Some(n as f64 / sent);
        }
        if let (Some(pid), Some(before)) = (target.pid(), wait0) {
            let waited = procstat::run_queue_wait(pid).saturating_sub(before);
            run.wait_us_per_request = Some(waited.as_secs_f64() * 1e6 / sent);
        }
        if let Some(s) = rss {
            run.peak_rss_mib = Some(s.finish().0 as f64 / (1024.0 * 1024.0));
        }
        run.overhead_us = target.overhead_us();
        run.offloaded = target.offloaded();
        let (sent, answered) = (run.load.sent, run.load.answered);
        match tokio::task::spawn_blocking(move || target.stop()).await {
            Ok(Ok(Some(rows))) => {
                // The readiness probes are recorded too.
                let rows = rows.saturating_sub(probes);
                run.recorded = Some(rows);
                run.no_event_lost = Some(no_event_lost(rows, answered, sent));
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => run.failed = Some(format!("stopping: {e}")),
            Err(e) => run.failed = Some(e.to_string()),
        }
    }
}

/// Whether no event was lost: every request sent was recorded, or, when
/// some never reached sluice (no response head came back: refused, or
/// written on a connection closed under `max_connections` before it was
/// read), at least every answered one was and nothing beyond what was
/// sent. A record missing for a request sluice answered is a lost event.
pub fn no_event_lost(recorded: u64, answered: u64, sent: u64) -> bool {
    recorded == sent || (answered..=sent).contains(&recorded)
}

/// The load every target gets (`url` and `bearer` filled in per target).
fn load_spec(stream: bool, rate: u32, duration: Duration, warmup: Duration) -> LoadSpec {
    LoadSpec {
        url: String::new(),
        bearer: None,
        body: body(stream),
        rate,
        duration,
        warmup,
        stream,
        max_outstanding: 20_000,
        timeout: Duration::from_secs(10),
    }
}

/// The hypervisor's share of the machine since `ticks0`, %.
fn steal_since(ticks0: Option<(u64, u64)>) -> Option<f64> {
    match (ticks0, procstat::machine_ticks()) {
        (Some(a), Some(b)) => Some(procstat::steal_percent(a, b)),
        _ => None,
    }
}

/// Runs one scenario once at `rate`.
pub async fn one(
    scenario: Scenario,
    mock: SocketAddr,
    programs: &Programs,
    rate: u32,
    stream: bool,
    duration: Duration,
    warmup: Duration,
) -> Run {
    let mut run = blank(scenario, stream, rate, 1);
    let watched = match launch(scenario, mock, programs).await {
        Ok(t) => Watched::start(t),
        Err(e) => {
            run.failed = Some(e);
            return run;
        }
    };
    let ticks0 = procstat::machine_ticks();
    run.load = gen::run(LoadSpec {
        url: watched.target.url.clone(),
        bearer: watched.target.bearer.clone(),
        ..load_spec(stream, rate, duration, warmup)
    })
    .await;
    run.steal_pct = steal_since(ticks0);
    watched.settle(&mut run).await;
    run
}

/// Runs the plan: for each mode and rate, `direct` then every scenario.
pub async fn run_plan(plan: &Plan, mock: SocketAddr, progress: impl Fn(&Run)) -> Vec<Run> {
    let mut out = Vec::new();
    for &stream in &plan.streams {
        for &rate in &plan.rates {
            for round in 1..=plan.rounds.max(1) {
                let runs = match plan.interleave {
                    Some(slice) => {
                        interleaved_round(plan, mock, stream, rate, round, slice, &progress).await
                    }
                    None => run_round(plan, mock, stream, rate, round, &progress).await,
                };
                out.extend(runs);
            }
        }
    }
    out
}

/// One round at one mode and rate: `direct`, then every other scenario,
/// each compared with this round's floor.
async fn run_round(
    plan: &Plan,
    mock: SocketAddr,
    stream: bool,
    rate: u32,
    round: u32,
    progress: &impl Fn(&Run),
) -> Vec<Run> {
    let mut out = Vec::new();
    let mut floor: Option<Run> = None;
    let mut order = vec![Scenario::Direct];
    order.extend(
        plan.scenarios
            .iter()
            .copied()
            .filter(|s| *s != Scenario::Direct),
    );
    for s in order {
        let mut r = one(
            s,
            mock,
            &plan.programs,
            rate,
            stream,
            plan.duration,
            plan.warmup,
        )
        .await;
        r.round = round;
        if let Some(f) = &floor {
            compare(&mut r, f);
        }
        progress(&r);
        if s == Scenario::Direct {
            floor = Some(r.clone());
        }
        out.push(r);
    }
    out
}

/// Fills in `added_us` and `added_ttft_us` of `r` against the floor `f`.
fn compare(r: &mut Run, f: &Run) {
    r.added_us = Some([
        r.load.latency_us.p50 as i64 - f.load.latency_us.p50 as i64,
        r.load.latency_us.p99 as i64 - f.load.latency_us.p99 as i64,
        r.load.latency_us.p999 as i64 - f.load.latency_us.p999 as i64,
    ]);
    if let (Some(a), Some(b)) = (&r.load.ttft_us, &f.load.ttft_us) {
        r.added_ttft_us = Some([a.p50 as i64 - b.p50 as i64, a.p99 as i64 - b.p99 as i64]);
    }
}

/// A run that has not happened yet.
fn blank(scenario: Scenario, stream: bool, rate: u32, round: u32) -> Run {
    Run {
        scenario,
        stream,
        load: LoadResult {
            rate,
            ..LoadResult::default()
        },
        added_us: None,
        added_ttft_us: None,
        peak_rss_mib: None,
        cpu_s_per_1000: None,
        kernel_cpu_s_per_1000: None,
        switches_per_request: None,
        wait_us_per_request: None,
        overhead_us: None,
        offloaded: None,
        recorded: None,
        no_event_lost: None,
        failed: None,
        round,
        steal_pct: None,
    }
}

/// One round at one mode and rate with every scenario running at once:
/// all targets are started and checked first, then one arrival process
/// sends to each in turn for `slice` at a time (see
/// [`gen::run_interleaved`]), so every scenario and the floor share the
/// same moments of the machine. CPU and memory are each target's own;
/// steal is the whole round's.
async fn interleaved_round(
    plan: &Plan,
    mock: SocketAddr,
    stream: bool,
    rate: u32,
    round: u32,
    slice: Duration,
    progress: &impl Fn(&Run),
) -> Vec<Run> {
    let mut order = vec![Scenario::Direct];
    order.extend(
        plan.scenarios
            .iter()
            .copied()
            .filter(|s| *s != Scenario::Direct),
    );
    let mut runs: Vec<Run> = order
        .iter()
        .map(|s| blank(*s, stream, rate, round))
        .collect();
    // Start everything; a target that cannot start or answer is reported
    // and left out of the load.
    let mut live: Vec<(usize, targets::Running, u64)> = Vec::new();
    for (i, s) in order.iter().copied().enumerate() {
        match launch(s, mock, &plan.programs).await {
            Ok((target, probes)) => live.push((i, target, probes)),
            Err(e) => runs[i].failed = Some(e),
        }
    }
    let goals: Vec<gen::Target> = live
        .iter()
        .map(|(_, t, _)| gen::Target {
            url: t.url.clone(),
            bearer: t.bearer.clone(),
        })
        .collect();
    let watched: Vec<(usize, Watched)> = live
        .into_iter()
        .map(|(i, t, probes)| (i, Watched::start((t, probes))))
        .collect();
    let ticks0 = procstat::machine_ticks();
    let spec = load_spec(stream, rate, plan.duration, plan.warmup);
    let results = gen::run_interleaved(&spec, &goals, slice).await;
    let steal = steal_since(ticks0);
    for ((i, w), load) in watched.into_iter().zip(results) {
        let run = &mut runs[i];
        run.load = load;
        run.steal_pct = steal;
        w.settle(run).await;
    }
    let floor = runs
        .first()
        .filter(|f| f.failed.is_none() && f.load.ok > 0)
        .cloned();
    for r in runs.iter_mut().skip(1) {
        if let Some(f) = &floor {
            compare(r, f);
        }
    }
    for r in &runs {
        progress(r);
    }
    runs
}

/// The middle value (the lower middle for an even count).
fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// Medians over rounds, per mode, rate and scenario: added latency, its
/// spread, CPU, and the ratio of added p99 to nginx's in the same rounds.
/// One row per scenario that ran; `direct` shows the floor itself.
pub fn summary(runs: &[Run]) -> String {
    let mut s = String::from(
        "| mode | rate | scenario | rounds | median p99 ms | median added p50 / p99 / p99.9 ms | added p99 range ms | added p99 ÷ nginx's | median CPU s / 1k req | of which kernel | median switches / req | median wait for a CPU µs / req | steal % | worst send lag p99 ms | every event recorded |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut keys: Vec<(bool, u32, Scenario)> = Vec::new();
    for r in runs {
        let k = (r.stream, r.load.rate, r.scenario);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (stream, rate, scenario) in keys {
        let of = |sc: Scenario| -> Vec<&Run> {
            runs.iter()
                .filter(|r| {
                    r.stream == stream
                        && r.load.rate == rate
                        && r.scenario == sc
                        && r.failed.is_none()
                        && r.load.ok > 0
                })
                .collect()
        };
        let mine = of(scenario);
        if mine.is_empty() {
            continue;
        }
        let p99 = median(mine.iter().map(|r| r.load.latency_us.p99).collect()).unwrap_or(0);
        let added = |i: usize| {
            median(
                mine.iter()
                    .filter_map(|r| r.added_us.map(|a| a[i]))
                    .collect(),
            )
        };
        let range = {
            let v: Vec<i64> = mine
                .iter()
                .filter_map(|r| r.added_us.map(|a| a[1]))
                .collect();
            match (v.iter().min(), v.iter().max()) {
                (Some(a), Some(b)) => format!("{} … {}", added_ms(*a), added_ms(*b)),
                _ => "—".into(),
            }
        };
        let nginx = median(
            of(Scenario::Nginx)
                .iter()
                .filter_map(|r| r.added_us.map(|a| a[1]))
                .collect(),
        );
        let ratio = match (added(1), nginx) {
            _ if scenario == Scenario::Direct || scenario == Scenario::Nginx => "—".into(),
            (Some(a), Some(n)) if n > 0 => format!("{:.1}×", a as f64 / n as f64),
            (Some(_), Some(_)) => "nginx added ≤ 0".into(),
            _ => "—".into(),
        };
        let of_runs = |f: fn(&Run) -> Option<f64>, decimals| {
            or_dash(median(mine.iter().filter_map(|r| f(r)).collect()), decimals)
        };
        let cpu = of_runs(|r| r.cpu_s_per_1000, 3);
        let kernel = of_runs(|r| r.kernel_cpu_s_per_1000, 3);
        let switches = of_runs(|r| r.switches_per_request, 2);
        let wait = of_runs(|r| r.wait_us_per_request, 0);
        let steal = of_runs(|r| r.steal_pct, 1);
        // The generator's own lateness in the worst round: a round in which
        // it could not send on time measured the machine, not the target.
        let lag = mine
            .iter()
            .map(|r| r.load.send_lag_us.p99)
            .max()
            .map_or_else(|| "—".into(), ms);
        let recorded = if mine.iter().all(|r| r.no_event_lost.is_none()) {
            "—".to_string()
        } else if mine.iter().all(|r| r.no_event_lost == Some(true)) {
            "yes".to_string()
        } else {
            "NO".to_string()
        };
        s.push_str(&format!(
            "| {} | {rate} | {} | {} | {:.2} | {} | {range} | {ratio} | {cpu} | {kernel} | {switches} | {wait} | {steal} | {lag} | {recorded} |\n",
            if stream { "stream" } else { "non-stream" },
            scenario.name(),
            mine.len(),
            p99 as f64 / 1000.0,
            match (added(0), added(1), added(2)) {
                (Some(a), Some(b), Some(c)) => format!("{} / {} / {}", added_ms(a), added_ms(b), added_ms(c)),
                _ => "(floor)".into(),
            },
        ));
    }
    s
}

/// Whether a run sustained its rate: p99 under 50 ms, under 1 % errors,
/// and throughput within 5 % of the rate.
pub fn sustained(r: &Run) -> bool {
    let l = &r.load;
    r.failed.is_none()
        && l.counted > 0
        && l.latency_us.p99 < 50_000
        && (l.errors + l.saturated) as f64 <= 0.01 * l.counted as f64
        && l.throughput >= 0.95 * f64::from(l.rate)
}

/// Raises the rate along `ladder` until the scenario stops sustaining it;
/// returns every run and the highest sustained rate. Each step runs for
/// (counted duration, warm-up).
pub async fn find_max(
    scenario: Scenario,
    mock: SocketAddr,
    programs: &Programs,
    stream: bool,
    ladder: &[u32],
    (duration, warmup): (Duration, Duration),
    progress: impl Fn(&Run),
) -> (Vec<Run>, u32) {
    let mut best = 0;
    let mut runs = Vec::new();
    for &rate in ladder {
        let r = one(scenario, mock, programs, rate, stream, duration, warmup).await;
        progress(&r);
        let ok = sustained(&r);
        runs.push(r);
        if !ok {
            break;
        }
        best = rate;
    }
    (runs, best)
}

/// Microseconds as milliseconds with two places.
fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// A difference in microseconds as signed milliseconds with two places.
fn added_ms(us: i64) -> String {
    format!("{:+.2}", us as f64 / 1000.0)
}

/// A value with `decimals` places, or a dash when there is none.
fn or_dash(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}"))
        .unwrap_or_else(|| "—".into())
}

/// A Markdown table of runs.
pub fn table(runs: &[Run]) -> String {
    let mut s = String::from(
        "| round | mode | rate | scenario | ok | errors | p50 ms | p99 ms | p99.9 ms | added p50 / p99 / p99.9 ms | added TTFT p50 / p99 ms | own overhead p50 / p99 / p99.9 | send lag p50 / p99 ms | throughput | peak RSS MiB | CPU s / 1k req | of which kernel | switches / req | wait for a CPU µs / req | recorded | steal % |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let l = &r.load;
        if let Some(f) = &r.failed {
            s.push_str(&format!(
                "| {} | {} | {} | {} | — | — | — | — | — | — | — | — | — | — | — | — | — | — | — | failed: {f} | — |\n",
                r.round,
                if r.stream { "stream" } else { "non-stream" },
                l.rate,
                r.scenario.name()
            ));
            continue;
        }
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {:.0}/s | {} | {} | {} | {} | {} | {} | {} |\n",
            r.round,
            if r.stream { "stream" } else { "non-stream" },
            l.rate,
            r.scenario.name(),
            l.ok,
            l.errors + l.saturated,
            ms(l.latency_us.p50),
            ms(l.latency_us.p99),
            ms(l.latency_us.p999),
            match r.added_us {
                _ if l.ok == 0 => "—".into(),
                Some(a) => format!("{} / {} / {}", added_ms(a[0]), added_ms(a[1]), added_ms(a[2])),
                None => "(floor)".into(),
            },
            match r.added_ttft_us {
                Some(a) if l.ok > 0 => format!("{} / {}", added_ms(a[0]), added_ms(a[1])),
                _ => "—".into(),
            },
            r.overhead_us
                .map(|o| {
                    let b = |v: u64| {
                        if v == u64::MAX {
                            ">100 ms".to_string()
                        } else if v < 1000 {
                            format!("≤{v} µs")
                        } else {
                            format!("≤{:.1} ms", v as f64 / 1000.0)
                        }
                    };
                    format!("{} / {} / {}", b(o[0]), b(o[1]), b(o[2]))
                })
                .unwrap_or_else(|| "—".into()),
            ms(l.send_lag_us.p50),
            ms(l.send_lag_us.p99),
            l.throughput,
            or_dash(r.peak_rss_mib, 1),
            or_dash(r.cpu_s_per_1000, 3),
            or_dash(r.kernel_cpu_s_per_1000, 3),
            or_dash(r.switches_per_request, 2),
            or_dash(r.wait_us_per_request, 0),
            match (r.recorded, r.no_event_lost) {
                (Some(n), Some(true)) if n == l.sent => format!("{n} = sent"),
                (Some(n), Some(true)) => {
                    format!("{n} ≥ {} answered ({} sent)", l.answered, l.sent)
                }
                (Some(n), _) if l.answered < l.sent => {
                    format!("{n} < {} answered ({} sent)", l.answered, l.sent)
                }
                (Some(n), _) => format!("{n} ≠ {} sent", l.sent),
                _ => "—".into(),
            },
            or_dash(r.steal_pct, 1),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_lost_only_when_an_answered_request_has_no_record() {
        // Every request sent is recorded.
        assert!(no_event_lost(1000, 1000, 1000));
        // Three never reached sluice (no response head): their records
        // cannot exist; any of them that did reach it may be recorded.
        assert!(no_event_lost(997, 997, 1000));
        assert!(no_event_lost(999, 997, 1000));
        // A request sluice answered has no record.
        assert!(!no_event_lost(996, 997, 1000));
        assert!(!no_event_lost(999, 1000, 1000));
        // More records than requests sent: something else wrote rows.
        assert!(!no_event_lost(1001, 1000, 1000));
    }

    fn counted(scenario: Scenario, round: u32, p99_us: u64, lag_p99_us: u64) -> Run {
        let mut r = blank(scenario, false, 2000, round);
        r.load.ok = 100;
        r.load.latency_us.p99 = p99_us;
        r.load.send_lag_us.p99 = lag_p99_us;
        r
    }

    #[test]
    fn the_summary_shows_each_scenarios_worst_send_lag() {
        let runs = vec![
            counted(Scenario::Direct, 1, 2_000, 1_500),
            counted(Scenario::Direct, 2, 2_100, 7_500),
            counted(Scenario::Nginx, 1, 2_200, 1_800),
            counted(Scenario::Nginx, 2, 2_300, 1_900),
        ];
        let s = summary(&runs);
        let row = |name: &str| {
            s.lines()
                .find(|l| l.contains(&format!("| {name} |")))
                .unwrap_or_else(|| panic!("no {name} row in\n{s}"))
                .to_string()
        };
        // The column sits just before "every event recorded".
        let lag_cell = |line: String| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            cells[cells.len() - 3].to_string()
        };
        assert_eq!(lag_cell(row("direct")), "7.50");
        assert_eq!(lag_cell(row("nginx")), "1.90");
        assert!(s.starts_with("| mode |") && s.contains("| worst send lag p99 ms |"));
    }
}
