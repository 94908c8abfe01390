//! Sticky, monotone assignment of requests to the stable or candidate variant.
//!
//! ## The bucket hash
//!
//! `bucket(salt, subject) = fmix64(fnv1a64(salt ‖ 0xFF ‖ subject)) mod 10000`
//!
//! FNV-1a (64-bit) walks the bytes once; MurmurHash3's 64-bit finaliser
//! (`fmix64`) then spreads every input bit over the whole word, which plain
//! FNV does not do for its low bits. The `0xFF` separator (never valid UTF-8)
//! keeps `("ab", "c")` and `("a", "bc")` apart. The modulo bias is below
//! 10⁻¹⁵. No key is random, so a subject lands in the same bucket in every
//! process and after every restart; the rollout's salt (its name by default)
//! makes different rollouts independent.
//!
//! A subject gets the candidate in a percent stage iff its bucket is below
//! percent × 100, so a subject exposed at 1 % stays exposed at 5 % and 25 %.

use std::collections::BTreeMap;

use crate::config::{CohortConfig, RolloutConfig, StageKind, SubjectSource};

/// Number of buckets (so a bucket is 0.01 % of subjects).
pub const BUCKETS: u32 = 10_000;

/// FNV-1a 64 of the salt, a separator, and the subject.
fn fnv1a64(salt: &str, subject: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.bytes().chain([0xFF]).chain(subject.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// MurmurHash3's 64-bit finaliser.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// The subject's bucket in `0..10000` for a rollout salt.
pub fn bucket(salt: &str, subject: &str) -> u32 {
    (fmix64(fnv1a64(salt, subject)) % u64::from(BUCKETS)) as u32
}

/// Why a request got its variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No rollout exposes the candidate to this request.
    Stable,
    /// The subject belongs to a cohort of this or an earlier cohort stage.
    Cohort,
    /// The subject's bucket decided (either way).
    Bucket,
    /// An operator key pinned the variant.
    Pinned,
    /// The rollout was promoted: the candidate serves everyone.
    Promoted,
}

impl Reason {
    /// The name recorded with the request.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Stable => "stable",
            Reason::Cohort => "cohort",
            Reason::Bucket => "bucket",
            Reason::Pinned => "pinned",
            Reason::Promoted => "promoted",
        }
    }
}

/// The facts about a request that assignment looks at.
#[derive(Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The request's `user` field.
    pub user: Option<&'a str>,
    /// Name of the API key used.
    pub api_key: Option<&'a str>,
    /// The request's `metadata`.
    pub metadata: Option<&'a BTreeMap<String, String>>,
    /// Looks a request header up by lowercase name.
    pub header: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> RequestFacts<'a> {
    /// The subject under a rollout's subject source.
    pub fn subject(&self, source: &SubjectSource) -> Option<std::borrow::Cow<'a, str>> {
        match source {
            SubjectSource::User => self.user.map(std::borrow::Cow::Borrowed),
            SubjectSource::ApiKey => self.api_key.map(std::borrow::Cow::Borrowed),
            SubjectSource::Header(h) => (self.header)(h).map(std::borrow::Cow::Owned),
        }
        .filter(|s| !s.is_empty())
    }
}

/// Whether a request belongs to a cohort: its subject is listed, or all of the
/// cohort's metadata and header conditions hold (when it has any).
pub fn in_cohort(c: &CohortConfig, subject: Option<&str>, facts: &RequestFacts<'_>) -> bool {
    if subject.is_some_and(|s| c.subjects.contains(s)) {
        return true;
    }
    if c.match_metadata.is_empty() && c.match_headers.is_empty() {
        return false;
    }
    let meta_ok = c.match_metadata.iter().all(|(k, v)| {
        facts
            .metadata
            .and_then(|m| m.get(k))
            .is_some_and(|x| x == v)
    });
    let headers_ok = c
        .match_headers
        .iter()
        .all(|(k, v)| (facts.header)(k).is_some_and(|x| &x == v));
    meta_ok && headers_ok
}

/// The outcome of assignment within a running rollout stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Serve the candidate.
    pub candidate: bool,
    /// Why.
    pub reason: Reason,
    /// Whether the same subject will get the same answer next time (false
    /// for requests without a subject, assigned per request).
    pub sticky: bool,
}

/// Decides stable or candidate for a request at stage `stage` of a running
/// rollout. `random_bucket` is called only for requests without a subject.
pub fn decide(
    rollout: &RolloutConfig,
    stage: usize,
    cohorts: &BTreeMap<String, CohortConfig>,
    facts: &RequestFacts<'_>,
    random_bucket: impl FnOnce() -> u32,
) -> Decision {
    let Some(st) = rollout.stages.get(stage) else {
        return Decision {
            candidate: false,
            reason: Reason::Stable,
            sticky: true,
        };
    };
    let subject = facts.subject(&rollout.subject);
    let subject = subject.as_deref();
    if matches!(st.kind, StageKind::Shadow(_)) {
        return Decision {
            candidate: false,
            reason: Reason::Stable,
            sticky: true,
        };
    }
    // Members of any cohort stage up to this one (no allocation: this runs
    // on every request).
    let member = rollout.stages[..=stage].iter().any(|s| match &s.kind {
        StageKind::Cohort(names) => names
            .iter()
            .filter_map(|name| cohorts.get(name))
            .any(|c| in_cohort(c, subject, facts)),
        _ => false,
    });
    if member {
        return Decision {
            candidate: true,
            reason: Reason::Cohort,
            sticky: subject.is_some(),
        };
    }
    match st.kind {
        StageKind::Percent { basis_points } => {
            let (b, sticky) = match subject {
                Some(s) => (bucket(&rollout.salt, s), true),
                None => (random_bucket() % BUCKETS, false),
            };
            Decision {
                candidate: b < basis_points,
                reason: Reason::Bucket,
                sticky,
            }
        }
        _ => Decision {
            candidate: false,
            reason: Reason::Stable,
            sticky: subject.is_some(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OnFailure, StageConfig};
    use proptest::prelude::*;
    use std::time::Duration;

    fn no_header(_: &str) -> Option<String> {
        None
    }

    fn facts<'a>(
        user: Option<&'a str>,
        meta: Option<&'a BTreeMap<String, String>>,
    ) -> RequestFacts<'a> {
        RequestFacts {
            user,
            api_key: Some("app"),
            metadata: meta,
            header: &no_header,
        }
    }

    fn stage(kind: StageKind) -> StageConfig {
        StageConfig {
            kind,
            min_duration: Duration::ZERO,
            min_requests: 0,
            approval: vec![],
            max_duration: None,
            require_suites: vec![],
        }
    }

    fn plan() -> RolloutConfig {
        RolloutConfig {
            name: "r".into(),
            deployment: "d".into(),
            candidate: "v2".into(),
            subject: SubjectSource::User,
            salt: "r".into(),
            stages: vec![
                stage(StageKind::Shadow(Default::default())),
                stage(StageKind::Cohort(vec!["internal".into()])),
                stage(StageKind::Percent { basis_points: 100 }),
                stage(StageKind::Percent { basis_points: 2500 }),
            ],
            on_failure: OnFailure::Rollback,
            fallback: crate::config::Fallback::Stable,
            gates: vec![],
            evaluate_every: Duration::from_secs(5),
            controller: crate::config::ControllerMode::Manual,
        }
    }

    fn cohorts() -> BTreeMap<String, CohortConfig> {
        let mut m = BTreeMap::new();
        m.insert(
            "internal".into(),
            CohortConfig {
                name: "internal".into(),
                subjects: ["alice".to_string()].into(),
                match_metadata: [("tier".to_string(), "beta".to_string())].into(),
                match_headers: BTreeMap::new(),
            },
        );
        m
    }

    /// Pinned values: the hash must never change, or every running rollout
    /// would reshuffle its users on upgrade.
    #[test]
    fn bucket_values_are_stable_across_versions() {
        assert_eq!(
            bucket("support-v2", "alice@corp.example"),
            bucket("support-v2", "alice@corp.example")
        );
        let golden = [
            ("support-v2", "alice@corp.example"),
            ("support-v2", "bob@corp.example"),
            ("other", "alice@corp.example"),
            ("", ""),
        ]
        .map(|(s, u)| bucket(s, u));
        assert_eq!(golden, GOLDEN);
        assert_ne!(bucket("ab", "c"), bucket("a", "bc"));
    }
    const GOLDEN: [u32; 4] = [6559, 283, 1766, 2295];

    #[test]
    fn stages_expose_the_right_people() {
        let p = plan();
        let c = cohorts();
        let beta: BTreeMap<String, String> = [("tier".to_string(), "beta".to_string())].into();
        // Shadow: nobody.
        assert!(!decide(&p, 0, &c, &facts(Some("alice"), None), || 0).candidate);
        // Cohort: members by subject or by metadata, nobody else.
        let d = decide(&p, 1, &c, &facts(Some("alice"), None), || 0);
        assert_eq!((d.candidate, d.reason), (true, Reason::Cohort));
        assert!(decide(&p, 1, &c, &facts(Some("zed"), Some(&beta)), || 0).candidate);
        assert!(!decide(&p, 1, &c, &facts(Some("zed"), None), || 0).candidate);
        // Later percent stages keep cohort members in.
        let d = decide(&p, 3, &c, &facts(Some("alice"), None), || 0);
        assert_eq!((d.candidate, d.reason), (true, Reason::Cohort));
        // No subject: per-request, unsticky.
        let d = decide(&p, 2, &c, &facts(None, None), || 50);
        assert_eq!(
            (d.candidate, d.sticky, d.reason),
            (true, false, Reason::Bucket)
        );
        let d = decide(&p, 2, &c, &facts(None, None), || 150);
        assert!(!d.candidate && !d.sticky);
    }

    /// Largest gap between the share of subjects below each percent and that
    /// percent, in percentage points, over 100k subjects.
    fn max_deviation(salt: &str) -> f64 {
        let mut counts = [0u32; 100];
        const N: u32 = 100_000;
        for i in 0..N {
            counts[(bucket(salt, &format!("user-{i}@example.com")) / 100) as usize] += 1;
        }
        let mut cumulative = 0u32;
        let mut worst = 0.0f64;
        for pct in 1..=100u32 {
            cumulative += counts[(pct - 1) as usize];
            let share = 100.0 * f64::from(cumulative) / f64::from(N);
            worst = worst.max((share - f64::from(pct)).abs());
        }
        worst
    }

    /// Over 100k subjects every percent gets its share within ±0.5 pp, for
    /// rollout names of the kind people write.
    #[test]
    fn buckets_are_uniform_for_rollout_names() {
        for salt in [
            "support-v2",
            "checkout-prompt-3",
            "agent-2026-11",
            "r",
            "summarize-claude",
            "search-rerank-v10",
        ] {
            let d = max_deviation(salt);
            assert!(d <= 0.5, "{salt}: {d} pp");
        }
    }

    proptest! {
        // For arbitrary salts the ±0.5 pp band sits at the 99 % point of the
        // Kolmogorov distribution (n = 100k): an ideal random hash misses it
        // for about one salt in a hundred (measured over 300 salts: this hash
        // 1, SHA-256 4). The property therefore uses the 99.999 % point,
        // 0.8 pp, so it fails only on a real defect, not on chance.
        #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

        /// Any salt spreads 100k subjects evenly over the buckets.
        #[test]
        fn buckets_are_uniform(salt in "[a-z0-9-]{1,16}") {
            let d = max_deviation(&salt);
            prop_assert!(d <= 0.8, "{}: {} pp", salt, d);
        }
    }

    proptest! {
        /// Whoever is in at a lower percent is in at every higher percent.
        #[test]
        fn assignment_is_monotone(subject in "\\PC{1,40}", lo in 1u32..10_000, step in 0u32..10_000) {
            let hi = (lo + step).min(10_000);
            let mut p = plan();
            p.stages = vec![stage(StageKind::Percent { basis_points: lo }), stage(StageKind::Percent { basis_points: hi })];
            let f = facts(Some(&subject), None);
            let at_lo = decide(&p, 0, &BTreeMap::new(), &f, || 0).candidate;
            let at_hi = decide(&p, 1, &BTreeMap::new(), &f, || 0).candidate;
            prop_assert!(!at_lo || at_hi);
        }

        /// The same subject always gets the same bucket.
        #[test]
        fn buckets_are_deterministic(salt in "\\PC{0,20}", subject in "\\PC{0,40}") {
            prop_assert_eq!(bucket(&salt, &subject), bucket(&salt.clone(), &subject.clone()));
            prop_assert!(bucket(&salt, &subject) < BUCKETS);
        }
    }
}
