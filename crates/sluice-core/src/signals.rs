//! Incremental per-arm aggregates of the signals gates judge.
//!
//! Every structure here is O(1) to update and bounded in memory: counters for
//! rates, Welford moments for means, and a log-bucket histogram (about 1 %
//! relative precision) for latency distributions. No evaluation ever rescans
//! requests.

use std::collections::BTreeMap;

use serde::Serialize;

/// Counts of a yes/no signal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Bernoulli {
    /// Observations.
    pub n: u64,
    /// Of which "yes".
    pub k: u64,
}

impl Bernoulli {
    /// Adds one observation.
    pub fn add(&mut self, yes: bool) {
        self.n += 1;
        self.k += u64::from(yes);
    }

    /// Removes one observation (feedback that changed its mind).
    pub fn remove(&mut self, yes: bool) {
        self.n = self.n.saturating_sub(1);
        if yes {
            self.k = self.k.saturating_sub(1);
        }
    }

    /// The observed rate.
    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.k as f64 / self.n as f64
        }
    }

    /// Per-observation variance, smoothed so that 0 of n still has some
    /// uncertainty: p̃(1 − p̃) with p̃ = (k + ½)/(n + 1).
    pub fn variance(&self) -> f64 {
        let p = (self.k as f64 + 0.5) / (self.n as f64 + 1.0);
        p * (1.0 - p)
    }
}

/// Running mean and variance (Welford).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Moments {
    /// Observations.
    pub n: u64,
    /// Their mean.
    pub mean: f64,
    m2: f64,
}

impl Moments {
    /// Adds one observation.
    pub fn add(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.n += 1;
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
    }

    /// Sample variance.
    pub fn variance(&self) -> f64 {
        if self.n < 2 {
            0.0
        } else {
            self.m2 / (self.n - 1) as f64
        }
    }
}

/// Smallest value the histogram resolves (ms); smaller values share bucket 0.
const HIST_MIN: f64 = 0.05;
/// Growth factor between buckets (about 1 % relative precision).
const HIST_GROWTH: f64 = 1.02;
/// Buckets: 0.05 ms · 1.02^1100 ≈ 1.5e8 ms, far beyond any timeout.
const HIST_BUCKETS: usize = 1100;

/// A log-bucket histogram of non-negative values (milliseconds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogHistogram {
    counts: Vec<u32>,
    total: u64,
}

impl LogHistogram {
    fn index(x: f64) -> usize {
        if x.is_nan() || x <= HIST_MIN {
            return 0;
        }
        (((x / HIST_MIN).ln() / HIST_GROWTH.ln()) as usize + 1).min(HIST_BUCKETS - 1)
    }

    /// The value a bucket stands for (its geometric middle).
    fn value(i: usize) -> f64 {
        if i == 0 {
            HIST_MIN / 2.0
        } else {
            HIST_MIN * HIST_GROWTH.powf(i as f64 - 0.5)
        }
    }

    /// Adds a value.
    pub fn add(&mut self, x: f64) {
        if !x.is_finite() || x < 0.0 {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; HIST_BUCKETS];
        }
        self.counts[Self::index(x)] += 1;
        self.total += 1;
    }

    /// Values added.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The empirical `q`-quantile (q clamped to [0, 1]); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                return Some(Self::value(i));
            }
        }
        Some(Self::value(HIST_BUCKETS - 1))
    }
}

/// What one request contributes to its arm.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// The request failed on the server or upstream side.
    pub error: bool,
    /// The answer was a refusal (`None` for failed requests).
    pub refusal: Option<bool>,
    /// Total latency, ms (successful requests).
    pub latency_ms: Option<f64>,
    /// Time to first token, ms (streams).
    pub ttft_ms: Option<f64>,
    /// Cost in USD, when the model has a price.
    pub cost: Option<f64>,
    /// Output tokens.
    pub output_tokens: Option<u64>,
    /// Principle flags: (principle, fired).
    pub flags: Vec<(String, bool)>,
}

/// All signals of one arm in one stage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArmAggregates {
    /// Requests observed.
    pub requests: u64,
    /// Server-side/upstream failures among all requests.
    pub errors: Bernoulli,
    /// Refusals among successful requests.
    pub refusals: Bernoulli,
    /// Latency of successful requests.
    pub latency: LogHistogram,
    /// Time to first token of streams.
    pub ttft: LogHistogram,
    /// Cost per successful request.
    pub cost: Moments,
    /// Successful requests without a price (cost unknown).
    pub unpriced: u64,
    /// Output tokens per successful request.
    pub output_tokens: Moments,
    /// Thumbs-down among requests with thumbs feedback.
    pub thumbs_down: Bernoulli,
    /// Feedback scores.
    pub scores: Moments,
    /// Flag rate per principle.
    pub flags: BTreeMap<String, Bernoulli>,
}

impl ArmAggregates {
    /// Adds one request.
    pub fn observe(&mut self, o: &Observation) {
        self.requests += 1;
        self.errors.add(o.error);
        if o.error {
            return;
        }
        if let Some(r) = o.refusal {
            self.refusals.add(r);
        }
        if let Some(l) = o.latency_ms {
            self.latency.add(l);
        }
        if let Some(t) = o.ttft_ms {
            self.ttft.add(t);
        }
        match o.cost {
            Some(c) => self.cost.add(c),
            None => self.unpriced += 1,
        }
        if let Some(t) = o.output_tokens {
            self.output_tokens.add(t as f64);
        }
        for (p, fired) in &o.flags {
            self.flags.entry(p.clone()).or_default().add(*fired);
        }
    }

    /// Applies thumbs feedback; `previous` is what this request had before.
    pub fn thumbs(&mut self, previous: Option<bool>, down: bool) {
        if let Some(p) = previous {
            self.thumbs_down.remove(p);
        }
        self.thumbs_down.add(down);
    }
}

/// Both arms of one stage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageAggregates {
    /// The stable variant's requests assigned by the rollout.
    pub stable: ArmAggregates,
    /// The candidate's.
    pub candidate: ArmAggregates,
    /// Mirrored pairs (shadow stages).
    pub paired: PairedAggregates,
}

impl StageAggregates {
    /// The arm for a side.
    pub fn arm_mut(&mut self, candidate: bool) -> &mut ArmAggregates {
        if candidate {
            &mut self.candidate
        } else {
            &mut self.stable
        }
    }
}

/// A yes/no signal over pairs: how often each side said yes when the other
/// said no (the discordant pairs McNemar's test looks at), and the
/// per-pair differences (candidate − stable, each −1, 0 or 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PairedRate {
    /// Pairs where only the candidate said yes.
    pub candidate_only: u64,
    /// Pairs where only stable said yes.
    pub stable_only: u64,
    /// Pairs where both did.
    pub both: u64,
    /// Pairs compared.
    pub n: u64,
}

impl PairedRate {
    /// Adds one pair.
    pub fn add(&mut self, stable: bool, candidate: bool) {
        self.n += 1;
        match (stable, candidate) {
            (true, true) => self.both += 1,
            (false, true) => self.candidate_only += 1,
            (true, false) => self.stable_only += 1,
            (false, false) => {}
        }
    }

    /// Stable's rate over the pairs.
    pub fn stable_rate(&self) -> f64 {
        ratio(self.both + self.stable_only, self.n)
    }

    /// The mean paired difference (candidate − stable rate).
    pub fn mean_difference(&self) -> f64 {
        ratio(self.candidate_only, self.n) - ratio(self.stable_only, self.n)
    }

    /// Per-pair variance of the difference, smoothed like
    /// [`Bernoulli::variance`] so that zero discordant pairs still carry
    /// some uncertainty.
    pub fn variance(&self) -> f64 {
        let n = self.n as f64 + 1.0;
        let b = (self.candidate_only as f64 + 0.25) / n;
        let c = (self.stable_only as f64 + 0.25) / n;
        (b + c - (b - c) * (b - c)).max(0.0)
    }
}

fn ratio(k: u64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        k as f64 / n as f64
    }
}

/// Signals of a shadow stage: each request answered by stable (served) and
/// by the candidate (mirrored). Rates are kept as discordant-pair counts and
/// quantities as per-pair differences, so the gates compare like with like:
/// the same input on both sides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairedAggregates {
    /// Complete pairs seen.
    pub pairs: u64,
    /// Each side's marginal signals over the pairs (latency quantiles are
    /// judged on these).
    pub stable: ArmAggregates,
    /// The candidate's.
    pub candidate: ArmAggregates,
    /// Errors on either side.
    pub errors: PairedRate,
    /// Refusals, over pairs where both sides answered.
    pub refusals: PairedRate,
    /// Principle flags, over pairs where both sides answered.
    pub flags: BTreeMap<String, PairedRate>,
    /// Cost differences (both priced).
    pub cost: Moments,
    /// Stable's cost over the same pairs.
    pub cost_stable: Moments,
    /// Output-token differences.
    pub output_tokens: Moments,
    /// Stable's output tokens over the same pairs.
    pub output_tokens_stable: Moments,
    /// Latency differences, ms.
    pub latency: Moments,
}

impl PairedAggregates {
    /// Adds one pair.
    pub fn observe(&mut self, stable: &Observation, candidate: &Observation) {
        self.pairs += 1;
        self.stable.observe(stable);
        self.candidate.observe(candidate);
        self.errors.add(stable.error, candidate.error);
        if stable.error || candidate.error {
            return;
        }
        if let (Some(s), Some(c)) = (stable.refusal, candidate.refusal) {
            self.refusals.add(s, c);
        }
        for (p, s) in &stable.flags {
            if let Some((_, c)) = candidate.flags.iter().find(|(q, _)| q == p) {
                self.flags.entry(p.clone()).or_default().add(*s, *c);
            }
        }
        if let (Some(s), Some(c)) = (stable.cost, candidate.cost) {
            self.cost.add(c - s);
            self.cost_stable.add(s);
        }
        if let (Some(s), Some(c)) = (stable.output_tokens, candidate.output_tokens) {
            self.output_tokens.add(c as f64 - s as f64);
            self.output_tokens_stable.add(s as f64);
        }
        if let (Some(s), Some(c)) = (stable.latency_ms, candidate.latency_ms) {
            self.latency.add(c - s);
        }
    }
}

/// Phrases that mark a refusal, matched case-insensitively at the start of
/// an answer (after leading whitespace) or as a whole short answer.
const REFUSAL_MARKERS: &[&str] = &[
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
    "i am sorry, but i cannot",
    "sorry, i can't",
    "sorry, but i can't",
    "i can't help with",
    "i can't assist with",
    "i cannot help with",
    "i cannot assist with",
    "i'm unable to help",
    "i'm unable to assist",
    "i am unable to",
    "i won't be able to help",
    "i must decline",
    "i'm not able to help",
    "i can't provide",
    "i cannot provide",
];

/// Whether an answer is a refusal: it opens with a refusal phrase (models
/// refuse up front; a refusal phrase deep inside a long answer usually
/// quotes or qualifies rather than declines).
pub fn is_refusal(text: &str) -> bool {
    static MARKERS: std::sync::OnceLock<aho_corasick::AhoCorasick> = std::sync::OnceLock::new();
    let markers = MARKERS.get_or_init(|| {
        aho_corasick::AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .build(REFUSAL_MARKERS)
            .expect("refusal markers compile")
    });
    let text = text.trim_start();
    // The head is the first 120 characters; when they are all ASCII they
    // are the first 120 bytes, and lowercasing them is what the
    // case-insensitive search does anyway.
    let ascii = &text.as_bytes()[..text.len().min(120)];
    if ascii.is_ascii() {
        return markers.is_match(ascii);
    }
    let head: String = text
        .chars()
        .take(120)
        .map(|c| if c == '’' { '\'' } else { c })
        .collect::<String>()
        .to_lowercase();
    markers.is_match(&head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn moments_match_the_textbook() {
        let mut m = Moments::default();
        for x in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0] {
            m.add(x);
        }
        assert_eq!(m.mean, 5.0);
        // Sample variance of this classic set is 32/7.
        assert!((m.variance() - 32.0 / 7.0).abs() < 1e-12);
    }

    proptest::proptest! {
        /// One pass over the markers finds what a search per marker finds.
        #[test]
        fn refusal_search_agrees_with_one_search_per_marker(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "I'm sorry, but I ", "i CAN’T", "can't", " help with", "Sorry, ", "I am unable to",
                    "  ", "\n", "İ", "é", "I must decline", "provide", "Here is ", "x",
                ]),
                0..12,
            ),
        ) {
            let text = pieces.concat();
            let head = text
                .trim_start()
                .chars()
                .take(120)
                .map(|c| if c == '’' { '\'' } else { c })
                .collect::<String>()
                .to_lowercase();
            let expected = REFUSAL_MARKERS.iter().any(|m| head.contains(m));
            proptest::prop_assert_eq!(is_refusal(&text), expected, "{}", text);
        }
    }

    #[test]
    fn refusals_are_recognised() {
        assert!(is_refusal("I'm sorry, but I can't help with that request."));
        assert!(is_refusal("  I can’t assist with that."));
        assert!(!is_refusal(
            "Here is how to get a refund: open the orders page."
        ));
        assert!(!is_refusal(&format!(
            "{} I can't help with fraud.",
            "Sure. ".repeat(40)
        )));
    }

    #[test]
    fn feedback_can_change_its_mind() {
        let mut a = ArmAggregates::default();
        a.thumbs(None, true);
        a.thumbs(Some(true), false);
        assert_eq!((a.thumbs_down.n, a.thumbs_down.k), (1, 0));
    }

    proptest! {
        /// Paired-rate counts agree with the per-pair differences.
        #[test]
        fn paired_rates_match_the_per_pair_differences(pairs in proptest::collection::vec((proptest::bool::ANY, proptest::bool::ANY), 1..300)) {
            let mut r = PairedRate::default();
            for (s, c) in &pairs {
                r.add(*s, *c);
            }
            let diffs: Vec<f64> = pairs.iter().map(|(s, c)| f64::from(u8::from(*c)) - f64::from(u8::from(*s))).collect();
            let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
            prop_assert!((r.mean_difference() - mean).abs() < 1e-12);
            let stable = pairs.iter().filter(|(s, _)| *s).count() as f64 / pairs.len() as f64;
            prop_assert!((r.stable_rate() - stable).abs() < 1e-12);
            prop_assert!(r.variance() > 0.0 && r.variance() <= 1.0);
            prop_assert_eq!(r.n, pairs.len() as u64);
        }

        /// Histogram quantiles are within 2 % of exact ones.
        #[test]
        fn histogram_quantiles_are_close(mut xs in proptest::collection::vec(1.0f64..100_000.0, 1..400), q in 0.01f64..1.0) {
            let mut h = LogHistogram::default();
            for x in &xs {
                h.add(*x);
            }
            xs.sort_by(f64::total_cmp);
            let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
            let exact = xs[rank - 1];
            let approx = h.quantile(q).expect("non-empty");
            prop_assert!((approx / exact - 1.0).abs() < 0.02, "{} vs {}", approx, exact);
        }
    }
}
