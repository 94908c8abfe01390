//! Always-valid statistics for comparing a candidate with the stable variant
//! while watching continuously.
//!
//! ## Differences of means and rates: the mixture SPRT
//!
//! For an estimator `δ̂` of a difference `δ` with (estimated) variance `V`,
//! the normal-mixture sequential probability ratio of Johari, Koomen,
//! Pekelis and Walsh ("Always Valid Inference: Continuous Monitoring of A/B
//! Tests", Operations Research 70(3), 2022; arXiv:1512.04922), mixing over
//! `θ ~ N(θ₀, τ²)`, is
//!
//! ```text
//! Λ(θ₀) = sqrt(V / (V + τ²)) · exp( τ² (δ̂ − θ₀)² / (2 V (V + τ²)) )
//! ```
//!
//! `Λ` is a non-negative martingale under `δ = θ₀`, so by Ville's inequality
//! `P(∃t: Λₜ ≥ 1/α) ≤ α`: `p = min(1, 1/max Λ)` is an always-valid p-value,
//! and `{θ : Λ(θ) < 1/α}` is a confidence sequence, valid at every moment
//! however often it is looked at:
//!
//! ```text
//! δ̂ ± sqrt( 2 V (V + τ²) / τ² · ( ln(1/α) + ½ ln((V + τ²) / V) ) )
//! ```
//!
//! Validity is exact for Gaussian data with known variance and asymptotic
//! with estimated variances (as in the paper's deployment at Optimizely).
//!
//! ## Quantiles (latency p95): quantile confidence sequences
//!
//! Following Howard and Ramdas ("Sequential estimation of quantiles with
//! applications to A/B-testing and best-arm identification", Bernoulli 28(3),
//! 2022; arXiv:1906.09712), the event "sample ≤ q_p" is Bernoulli(p) at the
//! true p-quantile, so a confidence sequence `p ± u` for that Bernoulli mean
//! gives the quantile confidence sequence `[Q̂(p − u), Q̂(p + u)]` from the
//! empirical quantile function. `u` uses the same mixture boundary with
//! `V = p(1 − p)/n`.

/// A two-sided always-valid confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// Lower bound.
    pub low: f64,
    /// Upper bound.
    pub high: f64,
}

/// Half-width of the mixture-SPRT confidence sequence at level `alpha` for
/// an estimator with variance `v`, mixing variance `tau2`.
pub fn msprt_radius(v: f64, tau2: f64, alpha: f64) -> f64 {
    if v.is_nan() || tau2.is_nan() || v <= 0.0 || tau2 <= 0.0 {
        return if v == 0.0 { 0.0 } else { f64::INFINITY };
    }
    let a = alpha.clamp(1e-12, 0.999_999);
    (2.0 * v * (v + tau2) / tau2 * ((1.0 / a).ln() + 0.5 * ((v + tau2) / v).ln())).sqrt()
}

/// The mixture likelihood ratio `Λ(θ₀)` for estimate `est`, variance `v`.
pub fn msprt_ratio(est: f64, theta0: f64, v: f64, tau2: f64) -> f64 {
    if v.is_nan() || tau2.is_nan() || v <= 0.0 || tau2 <= 0.0 {
        return 1.0;
    }
    let d = est - theta0;
    let log = 0.5 * (v / (v + tau2)).ln() + tau2 * d * d / (2.0 * v * (v + tau2));
    log.min(700.0).exp()
}

/// The always-valid p-value for `δ = θ₀`, given the running maximum of the
/// ratio seen so far (pass 1.0 initially).
pub fn always_valid_p(max_ratio: f64) -> f64 {
    (1.0 / max_ratio.max(1.0)).min(1.0)
}

/// The always-valid confidence interval for `δ`.
pub fn msprt_interval(est: f64, v: f64, tau2: f64, alpha: f64) -> Interval {
    let r = msprt_radius(v, tau2, alpha);
    Interval {
        low: est - r,
        high: est + r,
    }
}

/// Standard normal quantile (Acklam's rational approximation, relative error
/// below 1.2e-9), for the fixed-horizon comparison.
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let plow = 0.024_25;
    if p < plow {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - plow {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    }
}

/// The fixed-horizon (1 − alpha) interval `est ± z·sqrt(v)`. Valid at one
/// pre-planned look only; shown beside the sequential one to make the cost
/// of peeking visible.
pub fn fixed_horizon_interval(est: f64, v: f64, alpha: f64) -> Interval {
    let r = normal_quantile(1.0 - alpha / 2.0) * v.max(0.0).sqrt();
    Interval {
        low: est - r,
        high: est + r,
    }
}

/// The confidence-sequence radius `u` around the quantile level `p` after
/// `n` samples (each arm at level `alpha`).
pub fn quantile_level_radius(p: f64, n: u64, alpha: f64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let var = p * (1.0 - p);
    // Mixing variance tuned to a few hundred samples, where latency gates
    // typically decide.
    let tau2 = var / 500.0;
    msprt_radius(var / n as f64, tau2, alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed independently from the closed form above with
    /// Python's `math` module:
    /// `sqrt(2*V*(V+t)/t*(log(1/a)+0.5*log((V+t)/V)))`.
    #[test]
    fn radius_matches_independent_values() {
        // V = 1e-4, tau2 = 1e-4, alpha = 0.05 → 0.036563948…
        assert!((msprt_radius(1e-4, 1e-4, 0.05) - 0.036_563_948_7).abs() < 1e-9);
        // V = 2.5e-6, tau2 = 2.5e-5, alpha = 0.05 → 0.004803200…
        assert!((msprt_radius(2.5e-6, 2.5e-5, 0.05) - 0.004_803_200_96).abs() < 1e-9);
        // The sequential interval is wider than the fixed-horizon one.
        assert!(msprt_radius(1e-4, 1e-4, 0.05) > 1.959_96 * 1e-2);
    }

    #[test]
    fn ratio_and_p_value_agree_with_the_interval() {
        let (v, t, a) = (1e-4, 1e-4, 0.05);
        let r = msprt_radius(v, t, a);
        // On the interval's edge the ratio is exactly 1/alpha.
        let lr = msprt_ratio(r, 0.0, v, t);
        assert!((lr - 1.0 / a).abs() < 1e-6, "{lr}");
        assert!((always_valid_p(lr) - a).abs() < 1e-9);
        assert_eq!(always_valid_p(0.5), 1.0);
    }

    /// Reference values of the standard normal quantile (Abramowitz & Stegun
    /// table 26.5).
    #[test]
    fn normal_quantile_matches_tables() {
        for (p, z) in [
            (0.975, 1.959_964),
            (0.95, 1.644_854),
            (0.5, 0.0),
            (0.01, -2.326_348),
            (0.999, 3.090_232),
        ] {
            assert!(
                (normal_quantile(p) - z).abs() < 1e-5,
                "{p}: {}",
                normal_quantile(p)
            );
        }
    }

    #[test]
    fn quantile_radius_shrinks_with_samples() {
        let r100 = quantile_level_radius(0.95, 100, 0.025);
        let r10k = quantile_level_radius(0.95, 10_000, 0.025);
        assert!(r100 > r10k && r10k > 0.0 && r10k < 0.01, "{r100} {r10k}");
    }
}
