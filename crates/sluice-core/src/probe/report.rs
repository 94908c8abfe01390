//! A suite run's results and their renderings: JSON (serde), Markdown for a
//! pull request, JUnit XML for CI systems.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::AssertionResult;

/// Longest answer text kept in a report, in characters.
pub const MAX_OUTPUT_CHARS: usize = 2000;

/// One run (repeat) of a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Every assertion held and the call succeeded.
    pub pass: bool,
    /// The answer as served (cut at [`MAX_OUTPUT_CHARS`]).
    pub output: String,
    /// Time the call took, ms.
    pub latency_ms: f64,
    /// Its cost, when priced.
    pub cost_usd: Option<f64>,
    /// Why the call failed, if it did.
    pub error: Option<String>,
    /// Each assertion's outcome.
    pub assertions: Vec<AssertionResult>,
}

impl RunResult {
    /// Cuts the output to the report limit.
    pub fn clip(mut self) -> Self {
        if let Some((i, _)) = self.output.char_indices().nth(MAX_OUTPUT_CHARS) {
            self.output.truncate(i);
            self.output.push('…');
        }
        self
    }
}

/// One case over its repeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// The case id.
    pub id: String,
    /// Its line in the suite.
    pub line: usize,
    /// Its tags.
    pub tags: Vec<String>,
    /// Enough repeats passed.
    pub pass: bool,
    /// Repeats that passed.
    pub passed_runs: u32,
    /// Repeats that had to pass.
    pub needed_runs: u32,
    /// Each repeat.
    pub runs: Vec<RunResult>,
}

impl CaseResult {
    /// Why the case failed, in one line (the first failing repeat's first
    /// failing assertion or error).
    pub fn reason(&self) -> String {
        let Some(run) = self.runs.iter().find(|r| !r.pass) else {
            return String::new();
        };
        let why = match &run.error {
            Some(e) => e.clone(),
            None => run
                .assertions
                .iter()
                .filter(|a| !a.pass)
                .map(|a| format!("{}: {}", a.kind, a.detail))
                .collect::<Vec<_>>()
                .join("; "),
        };
        if self.runs.len() > 1 {
            format!(
                "{}/{} repeats passed (needed {}); {why}",
                self.passed_runs,
                self.runs.len(),
                self.needed_runs
            )
        } else {
            why
        }
    }
}

/// Passed and total cases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Passed.
    pub passed: u64,
    /// All.
    pub total: u64,
}

impl Tally {
    /// passed / total (1 for none).
    pub fn rate(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.passed as f64 / self.total as f64
        }
    }
}

/// A run compared with the same suite on a baseline variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The baseline variant.
    pub variant: String,
    /// Its pass rate.
    pub pass_rate: f64,
    /// Cases that pass on the baseline and fail on the candidate.
    pub regressions: Vec<String>,
    /// Cases that fail on the baseline and pass on the candidate.
    pub fixes: Vec<String>,
}

/// One suite run on one variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteReport {
    /// The suite (as named on the command line or in config).
    pub suite: String,
    /// Its SHA-256.
    pub suite_hash: String,
    /// `deployment/variant`.
    pub deployment: String,
    /// The variant.
    pub variant: String,
    /// Start, Unix ms.
    pub started_ms: i64,
    /// Wall time, ms.
    pub duration_ms: f64,
    /// All cases.
    pub totals: Tally,
    /// Per tag.
    pub tags: BTreeMap<String, Tally>,
    /// Each case.
    pub cases: Vec<CaseResult>,
    /// The comparison with a baseline, when one ran.
    pub baseline: Option<Comparison>,
}

impl SuiteReport {
    /// Builds the report and its tallies.
    pub fn new(
        suite: &super::Suite,
        deployment: &str,
        variant: &str,
        started_ms: i64,
        duration_ms: f64,
        cases: Vec<CaseResult>,
    ) -> SuiteReport {
        let mut totals = Tally::default();
        let mut tags: BTreeMap<String, Tally> = BTreeMap::new();
        for c in &cases {
            totals.total += 1;
            totals.passed += u64::from(c.pass);
            for t in &c.tags {
                let e = tags.entry(t.clone()).or_default();
                e.total += 1;
                e.passed += u64::from(c.pass);
            }
        }
        SuiteReport {
            suite: suite.name.clone(),
            suite_hash: suite.hash.clone(),
            deployment: deployment.to_string(),
            variant: variant.to_string(),
            started_ms,
            duration_ms,
            totals,
            tags,
            cases,
            baseline: None,
        }
    }

    /// The overall pass rate.
    pub fn pass_rate(&self) -> f64 {
        self.totals.rate()
    }

    /// Compares with the same suite run on `baseline` and keeps the result.
    pub fn compare(&mut self, baseline: &SuiteReport) {
        let base: BTreeMap<&str, bool> = baseline
            .cases
            .iter()
            .map(|c| (c.id.as_str(), c.pass))
            .collect();
        let mut regressions = Vec::new();
        let mut fixes = Vec::new();
        for c in &self.cases {
            match (base.get(c.id.as_str()), c.pass) {
                (Some(true), false) => regressions.push(c.id.clone()),
                (Some(false), true) => fixes.push(c.id.clone()),
                _ => {}
            }
        }
        self.baseline = Some(Comparison {
            variant: baseline.variant.clone(),
            pass_rate: baseline.pass_rate(),
            regressions,
            fixes,
        });
    }

    /// Failing case ids.
    pub fn failures(&self) -> impl Iterator<Item = &CaseResult> {
        self.cases.iter().filter(|c| !c.pass)
    }

    /// One line: `suite on variant: 18/20 cases pass (90.0 %)`.
    pub fn headline(&self) -> String {
        format!(
            "{} on {}: {}/{} cases pass ({:.1} %)",
            self.suite,
            self.deployment,
            self.totals.passed,
            self.totals.total,
            100.0 * self.pass_rate()
        )
    }

    /// The reason a gate gives when this run is below `min_pass_rate`:
    /// headline and the first failing cases.
    pub fn gate_reason(&self, min_pass_rate: f64) -> String {
        let failing: Vec<String> = self
            .failures()
            .take(5)
            .map(|c| format!("{} ({})", c.id, c.reason()))
            .collect();
        let more = self.failures().count().saturating_sub(5);
        format!(
            "suite {}, below the required {:.1} %; failing: {}{}",
            self.headline(),
            100.0 * min_pass_rate,
            failing.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )
    }

    /// A Markdown report: summary, tags, regressions, failing cases.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Probe suite `{}` on `{}`\n",
            self.suite, self.deployment
        );
        let _ = writeln!(
            s,
            "**{}/{} cases pass ({:.1} %)** in {:.1} s · suite sha256 `{}`\n",
            self.totals.passed,
            self.totals.total,
            100.0 * self.pass_rate(),
            self.duration_ms / 1000.0,
            &self.suite_hash[..self.suite_hash.len().min(12)]
        );
        if let Some(b) = &self.baseline {
            let _ = writeln!(
                s,
                "Baseline `{}`: {:.1} % · **{} regression{}** · {} fix{}\n",
                b.variant,
                100.0 * b.pass_rate,
                b.regressions.len(),
                if b.regressions.len() == 1 { "" } else { "s" },
                b.fixes.len(),
                if b.fixes.len() == 1 { "" } else { "es" }
            );
            if !b.regressions.is_empty() {
                let _ = writeln!(s, "## Regressions (pass on baseline, fail here)\n");
                for id in &b.regressions {
                    let why = self
                        .cases
                        .iter()
                        .find(|c| &c.id == id)
                        .map(CaseResult::reason)
                        .unwrap_or_default();
                    let _ = writeln!(s, "- `{id}`: {}", md_escape(&why));
                }
                s.push('\n');
            }
        }
        if !self.tags.is_empty() {
            let _ = writeln!(
                s,
                "| tag | passed | total | pass rate |\n|---|---:|---:|---:|"
            );
            for (t, n) in &self.tags {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.1} % |",
                    md_escape(t),
                    n.passed,
                    n.total,
                    100.0 * n.rate()
                );
            }
            s.push('\n');
        }
        let failing: Vec<&CaseResult> = self.failures().collect();
        if failing.is_empty() {
            let _ = writeln!(s, "Every case passed.");
        } else {
            let _ = writeln!(
                s,
                "## Failing cases\n\n| case | line | why |\n|---|---:|---|"
            );
            for c in failing {
                let _ = writeln!(
                    s,
                    "| `{}` | {} | {} |",
                    c.id,
                    c.line,
                    md_escape(&c.reason())
                );
            }
        }
        s
    }

    /// JUnit XML: one test suite, one test case per case; a failing case
    /// carries a `<failure>` with its reason, a case whose calls all errored
    /// an `<error>`.
    pub fn junit(&self) -> String {
        let failures = self.failures().filter(|c| !all_errored(c)).count();
        let errors = self.failures().filter(|c| all_errored(c)).count();
        let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            s,
            "<testsuites name=\"sluice eval\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{:.3}\">",
            self.totals.total,
            self.duration_ms / 1000.0
        );
        let _ = writeln!(
            s,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{:.3}\">",
            xml_escape(&format!("{} [{}]", self.suite, self.deployment)),
            self.totals.total,
            self.duration_ms / 1000.0
        );
        let _ = writeln!(
            s,
            "    <properties><property name=\"suite_sha256\" value=\"{}\"/><property name=\"variant\" value=\"{}\"/></properties>",
            xml_escape(&self.suite_hash),
            xml_escape(&self.deployment)
        );
        for c in &self.cases {
            let time: f64 = c.runs.iter().map(|r| r.latency_ms).sum::<f64>() / 1000.0;
            let _ = write!(
                s,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{time:.3}\"",
                xml_escape(&self.suite),
                xml_escape(&c.id)
            );
            if c.pass {
                s.push_str("/>\n");
                continue;
            }
            let tag = if all_errored(c) { "error" } else { "failure" };
            let output = c
                .runs
                .iter()
                .find(|r| !r.pass)
                .map(|r| r.output.as_str())
                .unwrap_or("");
            let _ = writeln!(
                s,
                ">\n      <{tag} message=\"{}\">{}</{tag}>\n      <system-out>{}</system-out>\n    </testcase>",
                xml_escape(&c.reason()),
                xml_escape(&c.reason()),
                xml_escape(output)
            );
        }
        s.push_str("  </testsuite>\n</testsuites>\n");
        s
    }
}

fn all_errored(c: &CaseResult) -> bool {
    !c.runs.is_empty() && c.runs.iter().all(|r| r.error.is_some())
}

/// Escapes text for XML attributes and content; drops characters XML 1.0
/// cannot carry.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(ch),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Suite;

    fn case(id: &str, pass: bool, tags: &[&str]) -> CaseResult {
        CaseResult {
            id: id.into(),
            line: 1,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            pass,
            passed_runs: u32::from(pass),
            needed_runs: 1,
            runs: vec![RunResult {
                pass,
                output: "out <&>".into(),
                latency_ms: 10.0,
                cost_usd: None,
                error: None,
                assertions: vec![AssertionResult {
                    kind: "contains".into(),
                    pass,
                    detail: "contains \"x\"".into(),
                }],
            }],
        }
    }

    fn report(variant: &str, cases: Vec<CaseResult>) -> SuiteReport {
        let s = Suite::parse(
            "s.jsonl",
            br#"{"id": "a", "messages": [{"role": "user", "content": "x"}]}"#,
        )
        .unwrap();
        SuiteReport::new(&s, &format!("chat/{variant}"), variant, 0, 1500.0, cases)
    }

    #[test]
    fn tallies_regressions_and_renderings() {
        let base = report(
            "v1",
            vec![
                case("a", true, &["x"]),
                case("b", false, &["x", "y"]),
                case("c", true, &[]),
            ],
        );
        let mut cand = report(
            "v2",
            vec![
                case("a", false, &["x"]),
                case("b", true, &["x", "y"]),
                case("c", true, &[]),
            ],
        );
        cand.compare(&base);
        assert_eq!(
            cand.totals,
            Tally {
                passed: 2,
                total: 3
            }
        );
        assert_eq!(
            cand.tags["x"],
            Tally {
                passed: 1,
                total: 2
            }
        );
        let b = cand.baseline.as_ref().unwrap();
        assert_eq!(b.regressions, ["a"]);
        assert_eq!(b.fixes, ["b"]);
        let md = cand.markdown();
        assert!(md.contains("**2/3 cases pass (66.7 %)**"), "{md}");
        assert!(md.contains("**1 regression**"), "{md}");
        assert!(md.contains("- `a`: contains: contains \"x\""), "{md}");
        let xml = cand.junit();
        assert!(
            xml.contains("tests=\"3\" failures=\"1\" errors=\"0\""),
            "{xml}"
        );
        assert!(
            xml.contains("<testcase classname=\"s.jsonl\" name=\"a\""),
            "{xml}"
        );
        assert!(
            xml.contains("<system-out>out &lt;&amp;&gt;</system-out>"),
            "{xml}"
        );
        assert!(cand.gate_reason(0.98).contains("failing: a (contains"));
    }

    #[test]
    fn xml_escaping_drops_what_xml_cannot_carry() {
        assert_eq!(xml_escape("a\u{1}b\"<"), "ab&quot;&lt;");
        let long = RunResult {
            output: "é".repeat(MAX_OUTPUT_CHARS + 5),
            ..case("a", true, &[]).runs[0].clone()
        }
        .clip();
        assert_eq!(long.output.chars().count(), MAX_OUTPUT_CHARS + 1);
    }
}
