//! Gate verdicts: is the candidate worse than stable by more than the margin?
//!
//! Each evaluation builds an always-valid (1 − α) confidence interval for the
//! regression `δ = candidate − stable` of the gate's signal (see
//! [`crate::stats`]) and answers:
//! - **fail** when the whole interval lies above the margin (a regression
//!   beyond the margin is shown),
//! - **pass** when the whole interval lies below it (non-inferiority shown),
//! - **inconclusive** otherwise, or while either arm has fewer than
//!   `min_samples` observations.
//!
//! Because the interval holds at every moment simultaneously, a candidate no
//! worse than the margin is wrongly failed with probability at most α, however
//! many times the gate is evaluated. [`Method::FixedHorizon`] is the naive
//! alternative, kept for `sluice sim` to show what peeking costs.

use serde::Serialize;

use crate::config::{GateConfig, Margin, Signal};
use crate::signals::{ArmAggregates, Moments, PairedAggregates, PairedRate, StageAggregates};
use crate::stats::{
    always_valid_p, fixed_horizon_interval, msprt_interval, msprt_ratio, normal_quantile,
    quantile_level_radius,
};

/// What a gate concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Non-inferiority shown.
    Pass,
    /// A regression beyond the margin shown.
    Fail,
    /// Not enough evidence either way yet.
    Inconclusive,
}

/// Which interval decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Always-valid: safe to evaluate continuously.
    Sequential,
    /// Fixed-horizon: valid for one planned look only.
    FixedHorizon,
}

/// A gate's verdict with its numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// The signal judged.
    pub signal: String,
    /// The conclusion.
    pub outcome: Outcome,
    /// Observations on stable.
    pub n_stable: u64,
    /// Observations on the candidate.
    pub n_candidate: u64,
    /// Stable's estimate.
    pub stable: Option<f64>,
    /// The candidate's estimate.
    pub candidate: Option<f64>,
    /// candidate − stable.
    pub difference: Option<f64>,
    /// Lower bound of the interval for the difference.
    pub ci_low: Option<f64>,
    /// Upper bound.
    pub ci_high: Option<f64>,
    /// The margin in the signal's unit (relative margins resolved).
    pub margin: Option<f64>,
    /// Always-valid p-value for "no difference" (rates and means).
    pub p_value: Option<f64>,
    /// The α used.
    pub alpha: f64,
    /// A sentence a person can read.
    pub summary: String,
}

impl Verdict {
    fn inconclusive(gate: &GateConfig, n_s: u64, n_c: u64, summary: String) -> Verdict {
        Verdict {
            signal: gate.signal.name(),
            outcome: Outcome::Inconclusive,
            n_stable: n_s,
            n_candidate: n_c,
            stable: None,
            candidate: None,
            difference: None,
            ci_low: None,
            ci_high: None,
            margin: None,
            p_value: None,
            alpha: gate.alpha,
            summary,
        }
    }
}

enum Data<'a> {
    /// (n, mean, per-observation variance) per arm.
    Mean((u64, f64, f64), (u64, f64, f64)),
    /// Histograms per arm.
    Quantile(
        &'a crate::signals::LogHistogram,
        &'a crate::signals::LogHistogram,
    ),
    Missing(String),
    /// Paired differences: pairs, stable's mean, mean difference, per-pair
    /// variance of the difference, and a note for the summary.
    Paired {
        n: u64,
        stable: f64,
        diff: f64,
        var: f64,
        note: String,
    },
}

/// Whether a signal can be judged in a shadow stage: users never see the
/// candidate's answers there, so there is no feedback. (Streamed requests
/// are mirrored as streams, so time to first token is judged.)
pub fn judged_in_shadow(signal: &Signal) -> bool {
    !matches!(signal, Signal::FeedbackDownRate)
}

fn paired_data<'a>(signal: &Signal, p: &'a PairedAggregates) -> Data<'a> {
    let rate = |r: &PairedRate, what: &str| Data::Paired {
        n: r.n,
        stable: r.stable_rate(),
        diff: r.mean_difference(),
        var: r.variance(),
        note: format!(
            "paired over {} requests: {what} on the candidate only {}, on stable only {}",
            r.n, r.candidate_only, r.stable_only
        ),
    };
    let moments = |d: &Moments, s: &Moments, what: &str| Data::Paired {
        n: d.n,
        stable: s.mean,
        diff: d.mean,
        var: d.variance(),
        note: format!("paired over {} requests: mean {what} difference", d.n),
    };
    match signal {
        Signal::ErrorRate => rate(&p.errors, "errors"),
        Signal::RefusalRate => rate(&p.refusals, "refusals"),
        Signal::FlagRate(id) => match p.flags.get(id) {
            Some(r) => rate(r, &format!("\"{id}\" fired")),
            None => Data::Missing(format!(
                "no verdicts of principle \"{id}\" on mirrored pairs yet"
            )),
        },
        Signal::CostPerRequest => {
            if p.cost.n == 0 && (p.stable.unpriced > 0 || p.candidate.unpriced > 0) {
                return Data::Missing("no price configured for these models ([prices])".into());
            }
            moments(&p.cost, &p.cost_stable, "cost")
        }
        Signal::OutputTokens => moments(&p.output_tokens, &p.output_tokens_stable, "output-token"),
        Signal::LatencyP95 => Data::Quantile(&p.stable.latency, &p.candidate.latency),
        // Streamed requests are mirrored as streams: both sides have a TTFT.
        Signal::TtftP95 => Data::Quantile(&p.stable.ttft, &p.candidate.ttft),
        Signal::FeedbackDownRate => Data::Missing(format!(
            "{} is not judged in a shadow stage (mirrored answers reach no user)",
            signal.name()
        )),
    }
}

fn data<'a>(signal: &Signal, s: &'a ArmAggregates, c: &'a ArmAggregates) -> Data<'a> {
    let rate = |b: &crate::signals::Bernoulli| (b.n, b.mean(), b.variance());
    match signal {
        Signal::ErrorRate => Data::Mean(rate(&s.errors), rate(&c.errors)),
        Signal::RefusalRate => Data::Mean(rate(&s.refusals), rate(&c.refusals)),
        Signal::FeedbackDownRate => Data::Mean(rate(&s.thumbs_down), rate(&c.thumbs_down)),
        Signal::FlagRate(p) => match (s.flags.get(p), c.flags.get(p)) {
            (Some(a), Some(b)) => Data::Mean(rate(a), rate(b)),
            _ => Data::Missing(format!("no verdicts of principle \"{p}\" recorded yet")),
        },
        Signal::CostPerRequest => {
            if s.cost.n == 0 && (s.unpriced > 0 || c.unpriced > 0) {
                return Data::Missing("no price configured for these models ([prices])".into());
            }
            Data::Mean(
                (s.cost.n, s.cost.mean, s.cost.variance()),
                (c.cost.n, c.cost.mean, c.cost.variance()),
            )
        }
        Signal::OutputTokens => Data::Mean(
            (
                s.output_tokens.n,
                s.output_tokens.mean,
                s.output_tokens.variance(),
            ),
            (
                c.output_tokens.n,
                c.output_tokens.mean,
                c.output_tokens.variance(),
            ),
        ),
        Signal::LatencyP95 => Data::Quantile(&s.latency, &c.latency),
        Signal::TtftP95 => Data::Quantile(&s.ttft, &c.ttft),
    }
}

fn fmt(signal: &Signal, x: f64) -> String {
    match signal {
        Signal::LatencyP95 | Signal::TtftP95 => format!("{x:.0} ms"),
        Signal::CostPerRequest => format!("${x:.6}"),
        Signal::OutputTokens => format!("{x:.1}"),
        _ => format!("{:.2} %", 100.0 * x),
    }
}

fn fmt_signed(signal: &Signal, x: f64) -> String {
    let s = fmt(signal, x.abs());
    if x < 0.0 {
        format!("−{s}")
    } else {
        format!("+{s}")
    }
}

/// Evaluates one gate on a stage's aggregates.
pub fn evaluate(gate: &GateConfig, aggs: &StageAggregates, method: Method) -> Verdict {
    judge(
        gate,
        data(&gate.signal, &aggs.stable, &aggs.candidate),
        method,
    )
}

/// Evaluates one gate on a shadow stage's mirrored pairs: rates by their
/// discordant pairs and quantities by per-pair differences (the same input
/// on both sides removes the between-request variance an unpaired test
/// carries); latency quantiles on each side's marginal distribution.
pub fn evaluate_paired(gate: &GateConfig, paired: &PairedAggregates, method: Method) -> Verdict {
    judge(gate, paired_data(&gate.signal, paired), method)
}

fn judge(gate: &GateConfig, data: Data<'_>, method: Method) -> Verdict {
    let sig = &gate.signal;
    let mut note = None;
    let (lo, hi, est_s, est_c, n_s, n_c, p_value) = match data {
        Data::Missing(why) => return Verdict::inconclusive(gate, 0, 0, why),
        Data::Paired {
            n,
            stable,
            diff,
            var,
            note: nt,
        } => {
            if let Some(v) = too_few(gate, n, n) {
                return v;
            }
            let v = var / n as f64;
            let margin = resolve(gate.max_regression, stable);
            let tau = if margin > 0.0 {
                margin
            } else {
                0.1 * var.sqrt()
            };
            let tau2 = (tau * tau).max(1e-18);
            let ci = match method {
                Method::Sequential => msprt_interval(diff, v, tau2, gate.alpha),
                Method::FixedHorizon => fixed_horizon_interval(diff, v, gate.alpha),
            };
            let p = always_valid_p(msprt_ratio(diff, 0.0, v, tau2));
            note = Some(nt);
            (ci.low, ci.high, stable, stable + diff, n, n, Some(p))
        }
        Data::Mean((n_s, m_s, v_s), (n_c, m_c, v_c)) => {
            if let Some(v) = too_few(gate, n_s, n_c) {
                return v;
            }
            let diff = m_c - m_s;
            let v = v_s / n_s as f64 + v_c / n_c as f64;
            let margin = resolve(gate.max_regression, m_s);
            // Mixing scale: the margin itself (the effect size that matters),
            // or a tenth of a standard deviation when the margin is zero.
            let tau = if margin > 0.0 {
                margin
            } else {
                0.1 * ((v_s + v_c) / 2.0).sqrt()
            };
            let tau2 = (tau * tau).max(1e-18);
            let ci = match method {
                Method::Sequential => msprt_interval(diff, v, tau2, gate.alpha),
                Method::FixedHorizon => fixed_horizon_interval(diff, v, gate.alpha),
            };
            let p = always_valid_p(msprt_ratio(diff, 0.0, v, tau2));
            (ci.low, ci.high, m_s, m_c, n_s, n_c, Some(p))
        }
        Data::Quantile(hs, hc) => {
            let (n_s, n_c) = (hs.count(), hc.count());
            if let Some(v) = too_few(gate, n_s, n_c) {
                return v;
            }
            let p = 0.95;
            // Each arm's quantile interval at α/2: together they hold with 1 − α.
            let radius = |n: u64| match method {
                Method::Sequential => quantile_level_radius(p, n, gate.alpha / 2.0),
                Method::FixedHorizon => {
                    normal_quantile(1.0 - gate.alpha / 4.0) * (p * (1.0 - p) / n as f64).sqrt()
                }
            };
            let (u_s, u_c) = (radius(n_s), radius(n_c));
            let q = |h: &crate::signals::LogHistogram, level: f64| {
                if level >= 1.0 {
                    f64::INFINITY
                } else {
                    h.quantile(level.max(0.0)).unwrap_or(0.0)
                }
            };
            let est_s = q(hs, p);
            let est_c = q(hc, p);
            let lo = q(hc, p - u_c) - q(hs, p + u_s);
            let hi = q(hc, p + u_c) - q(hs, p - u_s);
            (lo, hi, est_s, est_c, n_s, n_c, None)
        }
    };
    let margin = resolve(gate.max_regression, est_s);
    let diff = est_c - est_s;
    let outcome = if lo > margin {
        Outcome::Fail
    } else if hi < margin {
        Outcome::Pass
    } else {
        Outcome::Inconclusive
    };
    let ci = format!(
        "{} … {}",
        if lo.is_finite() {
            fmt_signed(sig, lo)
        } else {
            "−∞".into()
        },
        if hi.is_finite() {
            fmt_signed(sig, hi)
        } else {
            "+∞".into()
        }
    );
    let mut summary = format!(
        "{}: candidate {} vs stable {} ({}; {:.0} % interval {ci}) {} margin {}",
        sig.name(),
        fmt(sig, est_c),
        fmt(sig, est_s),
        fmt_signed(sig, diff),
        100.0 * (1.0 - gate.alpha),
        match outcome {
            Outcome::Fail => "beyond",
            Outcome::Pass => "within",
            Outcome::Inconclusive => "straddles",
        },
        fmt(sig, margin),
    );
    if let Some(n) = note {
        summary.push_str(&format!(" [{n}]"));
    }
    Verdict {
        signal: sig.name(),
        outcome,
        n_stable: n_s,
        n_candidate: n_c,
        stable: Some(est_s),
        candidate: Some(est_c),
        difference: Some(diff),
        ci_low: lo.is_finite().then_some(lo),
        ci_high: hi.is_finite().then_some(hi),
        margin: Some(margin),
        p_value,
        alpha: gate.alpha,
        summary,
    }
}

/// The verdict while either arm has fewer than `min_samples` observations.
fn too_few(gate: &GateConfig, n_s: u64, n_c: u64) -> Option<Verdict> {
    (n_s < gate.min_samples || n_c < gate.min_samples).then(|| {
        Verdict::inconclusive(
            gate,
            n_s,
            n_c,
            format!(
                "waiting for {} samples per arm (stable {n_s}, candidate {n_c})",
                gate.min_samples
            ),
        )
    })
}

fn resolve(m: Margin, stable: f64) -> f64 {
    match m {
        Margin::Absolute(a) => a,
        Margin::Relative(r) => r * stable.abs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::{Observation, PairedAggregates};

    fn gate(signal: Signal, margin: Margin) -> GateConfig {
        GateConfig {
            signal,
            max_regression: margin,
            alpha: 0.05,
            min_samples: 100,
        }
    }

    fn errors(aggs: &mut StageAggregates, candidate: bool, n: u64, k: u64) {
        for i in 0..n {
            aggs.arm_mut(candidate).observe(&Observation {
                error: i < k,
                refusal: Some(false),
                latency_ms: Some(100.0),
                ..Default::default()
            });
        }
    }

    #[test]
    fn decides_rates_both_ways_and_waits_for_samples() {
        let g = gate(Signal::ErrorRate, Margin::Absolute(0.005));
        let mut a = StageAggregates::default();
        errors(&mut a, false, 50, 1);
        errors(&mut a, true, 50, 20);
        let v = evaluate(&g, &a, Method::Sequential);
        assert_eq!(v.outcome, Outcome::Inconclusive, "{}", v.summary);
        assert!(v.summary.contains("waiting for 100 samples"));
        // 1 % vs 10 % over 5000 each: a clear failure.
        let mut a = StageAggregates::default();
        errors(&mut a, false, 5000, 50);
        errors(&mut a, true, 5000, 500);
        let v = evaluate(&g, &a, Method::Sequential);
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.summary);
        assert!(v.ci_low.expect("low") > 0.005);
        assert!(v.p_value.expect("p") < 1e-6);
        // 1 % vs 1 % over 20000 each: non-inferiority within half a point.
        let mut a = StageAggregates::default();
        errors(&mut a, false, 20_000, 200);
        errors(&mut a, true, 20_000, 200);
        let v = evaluate(&g, &a, Method::Sequential);
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.summary);
        assert!(v.ci_high.expect("high") < 0.005);
    }

    #[test]
    fn the_sequential_interval_is_wider_than_the_naive_one() {
        let g = gate(Signal::ErrorRate, Margin::Absolute(0.0));
        let mut a = StageAggregates::default();
        errors(&mut a, false, 2000, 40);
        errors(&mut a, true, 2000, 60);
        let s = evaluate(&g, &a, Method::Sequential);
        let f = evaluate(&g, &a, Method::FixedHorizon);
        assert!(s.ci_low.expect("l") < f.ci_low.expect("l"));
        assert!(s.ci_high.expect("h") > f.ci_high.expect("h"));
    }

    #[test]
    fn latency_quantiles_are_compared_with_relative_margins() {
        let g = gate(Signal::LatencyP95, Margin::Relative(0.10));
        let mut a = StageAggregates::default();
        for i in 0..4000u64 {
            let base = 100.0 + (i % 100) as f64; // p95 ≈ 195 ms
            a.stable.observe(&Observation {
                latency_ms: Some(base),
                ..Default::default()
            });
            a.candidate.observe(&Observation {
                latency_ms: Some(base * 1.5),
                ..Default::default()
            });
        }
        let v = evaluate(&g, &a, Method::Sequential);
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.summary);
        assert!(
            v.summary.starts_with("latency_p95: candidate"),
            "{}",
            v.summary
        );
        let mut same = StageAggregates::default();
        for i in 0..4000u64 {
            let base = 100.0 + (i % 100) as f64;
            same.stable.observe(&Observation {
                latency_ms: Some(base),
                ..Default::default()
            });
            same.candidate.observe(&Observation {
                latency_ms: Some(base),
                ..Default::default()
            });
        }
        assert_eq!(
            evaluate(&g, &same, Method::Sequential).outcome,
            Outcome::Pass
        );
    }

    #[test]
    fn paired_rates_use_discordant_pairs() {
        let g = gate(Signal::ErrorRate, Margin::Absolute(0.01));
        let ok = Observation {
            refusal: Some(false),
            latency_ms: Some(100.0),
            output_tokens: Some(50),
            ..Default::default()
        };
        let err = Observation {
            error: true,
            ..Default::default()
        };
        // Both sides fail on the same 10 % of inputs: no regression, and the
        // pairing shows it with far fewer requests than an unpaired test.
        let mut same = PairedAggregates::default();
        for i in 0..1500 {
            let o = if i % 10 == 0 { &err } else { &ok };
            same.observe(o, o);
        }
        let v = evaluate_paired(&g, &same, Method::Sequential);
        assert_eq!(v.outcome, Outcome::Pass, "{}", v.summary);
        assert!(
            v.summary
                .contains("on the candidate only 0, on stable only 0"),
            "{}",
            v.summary
        );
        let unpaired = evaluate(
            &g,
            &StageAggregates {
                stable: same.stable.clone(),
                candidate: same.candidate.clone(),
                ..Default::default()
            },
            Method::Sequential,
        );
        assert_eq!(
            unpaired.outcome,
            Outcome::Inconclusive,
            "{}",
            unpaired.summary
        );
        // The candidate fails on 5 % more inputs: a regression.
        let mut worse = PairedAggregates::default();
        for i in 0..2000 {
            worse.observe(&ok, if i % 20 == 0 { &err } else { &ok });
        }
        let v = evaluate_paired(&g, &worse, Method::Sequential);
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.summary);
        assert_eq!(v.n_candidate, 2000);
        // Output tokens: a constant +20 per answer is caught as a mean
        // difference.
        let t = gate(Signal::OutputTokens, Margin::Relative(0.1));
        let mut longer = PairedAggregates::default();
        for i in 0..300u64 {
            let s = Observation {
                output_tokens: Some(40 + i % 30),
                ..ok.clone()
            };
            let c = Observation {
                output_tokens: Some(60 + i % 30),
                ..ok.clone()
            };
            longer.observe(&s, &c);
        }
        let v = evaluate_paired(&t, &longer, Method::Sequential);
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.summary);
        assert!((v.difference.unwrap() - 20.0).abs() < 1e-9);
        let fb = gate(Signal::FeedbackDownRate, Margin::Absolute(0.01));
        assert!(!judged_in_shadow(&fb.signal));
    }

    #[test]
    fn a_slower_first_token_in_shadow_fails_the_ttft_gate() {
        let t = gate(Signal::TtftP95, Margin::Relative(0.2));
        assert!(judged_in_shadow(&t.signal));
        let mut pairs = PairedAggregates::default();
        for i in 0..400u64 {
            let base = 100.0 + (i % 50) as f64;
            let s = Observation {
                latency_ms: Some(base * 4.0),
                ttft_ms: Some(base),
                ..Default::default()
            };
            let c = Observation {
                ttft_ms: Some(base * 2.0),
                ..s.clone()
            };
            pairs.observe(&s, &c);
        }
        let v = evaluate_paired(&t, &pairs, Method::Sequential);
        assert_eq!(v.outcome, Outcome::Fail, "{}", v.summary);
        // Non-streamed pairs carry no TTFT: nothing to judge yet.
        let mut plain = PairedAggregates::default();
        let o = Observation {
            latency_ms: Some(100.0),
            ..Default::default()
        };
        for _ in 0..400 {
            plain.observe(&o, &o);
        }
        let v = evaluate_paired(&t, &plain, Method::Sequential);
        assert_eq!(v.outcome, Outcome::Inconclusive, "{}", v.summary);
    }

    #[test]
    fn missing_data_is_inconclusive_and_says_why() {
        let g = gate(Signal::FlagRate("no-pii".into()), Margin::Absolute(0.01));
        let v = evaluate(&g, &StageAggregates::default(), Method::Sequential);
        assert_eq!(v.outcome, Outcome::Inconclusive);
        assert!(v.summary.contains("no-pii"));
    }
}
