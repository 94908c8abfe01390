//! Checking a streamed answer as it flows.
//!
//! [`OutputGuard`] receives the answer's text piece by piece and decides
//! what may be released now. It holds back only the trailing bytes that could
//! still grow into a match of a `block` or `redact` principle (each detector
//! says how many: the current word for an email, the current run of digits
//! for a card number), so text reaches the client as soon as it is known to
//! be safe. A match found across piece boundaries is found exactly as in the
//! whole text: each scan starts at a token boundary well before the released
//! point, and a match is accepted only once it can no longer grow.

use std::collections::HashSet;

use crate::config::{Applies, PolicyAction};
use crate::policy::detectors::{floor_boundary, Span};
use crate::policy::{Constitution, Finding, Principle};
use std::sync::Arc;

/// Context re-scanned before the released point (bytes).
const CONTEXT: usize = 512;
/// Most a stream is ever held back (bytes).
const MAX_HOLDBACK: usize = 8192;

/// What to do after a piece.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Release this text (possibly empty).
    Emit(String),
    /// Release this text, then end the stream: a `block` principle fired.
    Block {
        /// Safe text before the violation.
        emit: String,
        /// The blocking finding.
        finding: Finding,
    },
}

/// Guards one streamed answer (one choice).
pub struct OutputGuard {
    /// The output principles, with their index in the constitution.
    principles: Arc<[(usize, Arc<Principle>)]>,
    text: String,
    emitted: usize,
    seen: HashSet<(usize, usize, usize, Span)>,
    findings: Vec<Finding>,
    redactions: Vec<Span>,
    blocked: bool,
    /// The release point of the last scan: while it does not move, a new
    /// piece can neither complete a match nor release text.
    last_tail: Option<usize>,
}

impl OutputGuard {
    /// A guard for the output principles of `constitution`.
    pub fn new(constitution: &Constitution) -> Self {
        OutputGuard {
            principles: constitution
                .principles
                .iter()
                .enumerate()
                .filter(|(_, p)| p.applies(Applies::Output))
                .map(|(i, p)| (i, p.clone()))
                .collect(),
            text: String::new(),
            emitted: 0,
            seen: HashSet::new(),
            findings: Vec::new(),
            redactions: Vec::new(),
            blocked: false,
            last_tail: None,
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, delta: &str) -> Step {
        self.text.push_str(delta);
        self.step(false)
    }

    /// The answer is complete: release everything still held.
    pub fn finish(&mut self) -> Step {
        self.step(true)
    }

    /// Every finding so far (spans are offsets in the whole answer).
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// The whole answer as generated (before redaction).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether a block principle ended the stream.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    fn window_start(&self) -> usize {
        let target = floor_boundary(&self.text, self.emitted.saturating_sub(CONTEXT));
        if target == 0 {
            return 0;
        }
        // Back up to whitespace so no token is cut in half.
        let lo = floor_boundary(&self.text, target.saturating_sub(256));
        match self.text[lo..target].rfind(char::is_whitespace) {
            Some(p) => lo + p,
            None => lo,
        }
    }

    fn step(&mut self, done: bool) -> Step {
        if self.blocked {
            return Step::Emit(String::new());
        }
        let principles = self.principles.clone();
        let len = self.text.len();
        let hold = if done {
            0
        } else {
            principles
                .iter()
                .filter(|(_, p)| {
                    matches!(p.config.action, PolicyAction::Block | PolicyAction::Redact)
                })
                .flat_map(|(_, p)| p.detectors.iter().map(|d| d.holdback(&self.text)))
                .max()
                .unwrap_or(0)
                .min(MAX_HOLDBACK)
        };
        let tail_start = floor_boundary(&self.text, len - hold.min(len));
        if !done && self.last_tail == Some(tail_start) {
            return Step::Emit(String::new());
        }
        self.last_tail = Some(tail_start);
        let wstart = self.window_start();
        let window = &self.text[wstart..];
        let mut block: Option<Finding> = None;
        // Earliest start of a block/redact match that may still grow: nothing
        // from there on may be released yet.
        let mut pending = usize::MAX;
        for (pi, p) in principles.iter() {
            for (di, d) in p.detectors.iter().enumerate() {
                if d.needs_whole_text() && !done {
                    continue;
                }
                let mut spans = Vec::new();
                d.scan(window, &mut spans);
                let mut fresh = Vec::new();
                for s in spans {
                    let abs = Span {
                        start: s.start + wstart,
                        end: s.end + wstart,
                        label: s.label,
                    };
                    if !done && abs.end > tail_start {
                        if matches!(p.config.action, PolicyAction::Block | PolicyAction::Redact) {
                            pending = pending.min(abs.start);
                        }
                        continue; // may still grow
                    }
                    if self.seen.insert((*pi, di, 0, abs.clone())) {
                        fresh.push(abs);
                    }
                }
                if fresh.is_empty() {
                    continue;
                }
                fresh.sort();
                if p.config.action == PolicyAction::Redact {
                    self.redactions.extend(fresh.iter().cloned());
                }
                let finding = Finding {
                    principle: p.config.id.clone(),
                    detector: d.kind().to_string(),
                    action: p.config.action,
                    severity: p.config.severity,
                    stage: Applies::Output,
                    spans: fresh,
                };
                if p.config.action == PolicyAction::Block {
                    let better = block
                        .as_ref()
                        .is_none_or(|b| finding.spans[0].start < b.spans[0].start);
                    if better {
                        block = Some(finding.clone());
                    }
                }
                match self
                    .findings
                    .iter_mut()
                    .find(|f| f.principle == finding.principle && f.detector == finding.detector)
                {
                    Some(f) => {
                        f.spans.extend(finding.spans);
                        f.spans.sort();
                    }
                    None => self.findings.push(finding),
                }
            }
        }
        if let Some(b) = block {
            self.blocked = true;
            let stop = floor_boundary(&self.text, b.spans[0].start.max(self.emitted));
            let emit = self.release(stop);
            return Step::Block { emit, finding: b };
        }
        let end = if done {
            len
        } else {
            floor_boundary(&self.text, tail_start.min(pending)).max(self.emitted)
        };
        Step::Emit(self.release(end))
    }

    /// Releases `text[emitted..end]` with redactions applied.
    fn release(&mut self, end: usize) -> String {
        let from = self.emitted;
        if end <= from {
            return String::new();
        }
        let mut spans: Vec<&Span> = self
            .redactions
            .iter()
            .filter(|s| s.end > from && s.start < end)
            .collect();
        spans.sort_by_key(|s| (s.start, std::cmp::Reverse(s.end)));
        let mut out = String::with_capacity(end - from);
        let mut at = from;
        for s in spans {
            if s.end <= at {
                continue;
            }
            let start = floor_boundary(&self.text, s.start.max(at));
            out.push_str(&self.text[at..start]);
            out.push_str(&format!("[REDACTED:{}]", s.label));
            at = floor_boundary(&self.text, s.end.min(end));
            if s.end > end {
                // Cannot happen for accepted spans; be safe anyway.
                at = end;
            }
        }
        if at < end {
            out.push_str(&self.text[at..end]);
        }
        self.emitted = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::constitution;
    use proptest::prelude::*;

    fn run(c: &Constitution, pieces: &[&str]) -> (String, Vec<Finding>, bool) {
        let mut g = OutputGuard::new(c);
        let mut out = String::new();
        let mut blocked = false;
        for p in pieces {
            match g.push(p) {
                Step::Emit(s) => out.push_str(&s),
                Step::Block { emit, .. } => {
                    out.push_str(&emit);
                    blocked = true;
                    break;
                }
            }
        }
        if !blocked {
            match g.finish() {
                Step::Emit(s) => out.push_str(&s),
                Step::Block { emit, .. } => {
                    out.push_str(&emit);
                    blocked = true;
                }
            }
        }
        let mut f = g.findings().to_vec();
        f.sort_by(|a, b| {
            a.principle
                .cmp(&b.principle)
                .then(a.detector.cmp(&b.detector))
        });
        (out, f, blocked)
    }

    #[test]
    fn a_card_split_over_three_chunks_is_redacted() {
        let c = constitution("");
        let (out, f, _) = run(&c, &["Your card 4111 11", "11 1111 ", "1111 is on file."]);
        assert_eq!(out, "Your card [REDACTED:credit_card] is on file.");
        assert_eq!(f[0].spans[0].label, "credit_card");
    }

    #[test]
    fn text_flows_without_waiting_for_the_end() {
        let mut c = constitution("");
        c.principles.retain(|p| p.config.id == "no-pii");
        let mut g = OutputGuard::new(&c);
        assert_eq!(g.push("Hello there, "), Step::Emit("Hello there,".into()));
        assert_eq!(g.push("how are you"), Step::Emit(" how are ".into()));
        assert_eq!(g.finish(), Step::Emit("you".into()));
    }

    #[test]
    fn a_secret_ends_the_stream_before_it_leaks() {
        let c = constitution("");
        let (out, f, blocked) = run(&c, &["Use key AKIAIOSF", "ODNN7EXAMPLE to log in."]);
        assert!(blocked);
        assert_eq!(out, "Use key ");
        assert_eq!(f[0].principle, "no-secrets");
    }

    fn sample() -> impl Strategy<Value = String> {
        let parts = prop_oneof![
            Just("Contact jane.doe@corp.io today. ".to_string()),
            Just("Card 4111 1111 1111 1111 works. ".to_string()),
            Just("Order 4111 1111 1111 1112 shipped. ".to_string()),
            Just("SSN 123-45-6789 on file. ".to_string()),
            Just("Call +44 20 7946 0958 or (212) 555-7890. ".to_string()),
            Just("IBAN GB82 WEST 1234 5698 7654 32 ok. ".to_string()),
            Just("Plain words and numbers 12345 here. ".to_string()),
            Just("Ünïcödé text — with dashes. ".to_string()),
            "[a-z ]{0,30}",
        ];
        proptest::collection::vec(parts, 1..8).prop_map(|v| v.concat())
    }

    proptest! {
        /// Any split of a text yields the same output and the same findings
        /// as checking it whole.
        #[test]
        fn splitting_never_changes_the_verdict(text in sample(), cuts in proptest::collection::vec(0usize..400, 0..12)) {
            let c = constitution("");
            let whole = run(&c, &[text.as_str()]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|x| floor_boundary(&text, x % (text.len() + 1))).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces = Vec::new();
            let mut prev = 0;
            for c in cuts.into_iter().chain([text.len()]) {
                pieces.push(&text[prev..c]);
                prev = c;
            }
            let split = run(&c, &pieces);
            prop_assert_eq!(&split.0, &whole.0);
            prop_assert_eq!(&split.1, &whole.1);
            // And the whole-text result equals the batch check plus redaction.
            let batch = c.check(Applies::Output, &text);
            prop_assert_eq!(whole.0, crate::policy::redact(&text, &batch));
        }
    }

    proptest! {
        /// Arbitrary text, arbitrarily split, never panics any detector or
        /// the guard, and never releases more than was generated.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}", cuts in proptest::collection::vec(0usize..400, 0..10)) {
            let c = constitution("");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|x| floor_boundary(&text, x % (text.len() + 1))).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut pieces = Vec::new();
            let mut prev = 0;
            for c in cuts.into_iter().chain([text.len()]) {
                pieces.push(&text[prev..c]);
                prev = c;
            }
            let (out, _, blocked) = run(&c, &pieces);
            if !blocked && !text.contains("REDACTED") {
                let batch = c.check(Applies::Output, &text);
                prop_assert_eq!(out, crate::policy::redact(&text, &batch));
            }
            let _ = c.check(Applies::Input, &text);
        }
    }
}
