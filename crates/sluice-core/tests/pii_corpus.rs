//! A labelled corpus of PII and hard negatives (Luhn-failing order numbers,
//! SSN-shaped dates and invalid SSNs, allowed example addresses, version
//! numbers): precision and recall of the `pii` detector are asserted.

use sluice_core::policy::detectors::{find_pii, PII_ENTITIES};

#[test]
fn pii_precision_and_recall_on_the_labelled_corpus() {
    let corpus = include_str!("data/pii_corpus.tsv");
    let entities: Vec<String> = PII_ENTITIES.iter().map(|s| s.to_string()).collect();
    let allow = vec!["@example.com".to_string()];
    let (mut tp, mut fp, mut fn_) = (0u32, 0u32, 0u32);
    let mut misses = Vec::new();
    for line in corpus
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (label, text) = line.split_once('\t').expect("label<TAB>text");
        let mut spans = Vec::new();
        find_pii(text, &entities, &allow, &mut spans);
        let found: Vec<&str> = spans
            .iter()
            .map(|s| {
                if s.label.starts_with("ip") {
                    "ip"
                } else {
                    s.label.as_str()
                }
            })
            .collect();
        if label == "none" {
            fp += found.len() as u32;
            if !found.is_empty() {
                misses.push(format!("false positive {found:?}: {text}"));
            }
        } else if found.contains(&label) {
            tp += 1;
            fp += found.iter().filter(|f| **f != label).count() as u32;
        } else {
            fn_ += 1;
            misses.push(format!("missed {label}: {text} (found {found:?})"));
        }
    }
    let precision = f64::from(tp) / f64::from(tp + fp).max(1.0);
    let recall = f64::from(tp) / f64::from(tp + fn_).max(1.0);
    eprintln!("pii corpus: {tp} true positives, {fp} false positives, {fn_} misses; precision {precision:.3}, recall {recall:.3}; {misses:?}");
    assert!(precision >= 0.95, "precision {precision:.2}: {misses:#?}");
    assert!(recall >= 0.95, "recall {recall:.2}: {misses:#?}");
}
