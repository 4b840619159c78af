//! ROUGE-1, ROUGE-2 and ROUGE-L F-measures as Google's `rouge-score` package computes them
//! without stemming (what `evaluate.load("rouge")` reports):
//!
//! ```text
//! tokens(s) = lower-case s, every run of characters outside [a-z0-9] a space, split
//! ROUGE-n   = F of the clipped n-gram overlap: P = overlap / ngrams(pred), R = overlap / ngrams(ref)
//! ROUGE-L   = F with the longest common subsequence: P = lcs / |pred|, R = lcs / |ref|
//! F         = 2 P R / (P + R), 0 when P + R = 0
//! ```
//! A corpus score is the mean of the pairs' scores.

use std::collections::HashMap;

/// `rouge-score`'s default tokenisation.
pub fn tokens(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let spaced: String = lower
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                ' '
            }
        })
        .collect();
    spaced.split_whitespace().map(str::to_string).collect()
}

fn f_measure(overlap: usize, pred: usize, reference: usize) -> f64 {
    if pred == 0 || reference == 0 {
        return 0.0;
    }
    let (p, r) = (
        overlap as f64 / pred as f64,
        overlap as f64 / reference as f64,
    );
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

fn ngrams(t: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut out = HashMap::new();
    if t.len() >= n {
        for w in t.windows(n) {
            *out.entry(w).or_insert(0) += 1;
        }
    }
    out
}

/// ROUGE-n F-measure of `pred` against `reference`.
pub fn rouge_n(pred: &str, reference: &str, n: usize) -> f64 {
    let (p, r) = (tokens(pred), tokens(reference));
    let (pg, rg) = (ngrams(&p, n), ngrams(&r, n));
    let overlap: usize = pg
        .iter()
        .map(|(g, &c)| c.min(rg.get(g).copied().unwrap_or(0)))
        .sum();
    f_measure(overlap, pg.values().sum(), rg.values().sum())
}

/// ROUGE-L F-measure of `pred` against `reference`.
pub fn rouge_l(pred: &str, reference: &str) -> f64 {
    let (p, r) = (tokens(pred), tokens(reference));
    let mut row = vec![0usize; r.len() + 1];
    for a in &p {
        let mut diag = 0;
        for (j, b) in r.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if a == b { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    f_measure(row[r.len()], p.len(), r.len())
}

/// Mean ROUGE-1, ROUGE-2 and ROUGE-L over pairs `(prediction, reference)`.
pub fn corpus(pairs: &[(String, String)]) -> [f64; 3] {
    if pairs.is_empty() {
        return [0.0; 3];
    }
    let mut s = [0.0; 3];
    for (p, r) in pairs {
        s[0] += rouge_n(p, r, 1);
        s[1] += rouge_n(p, r, 2);
        s[2] += rouge_l(p, r);
    }
    s.map(|x| x / pairs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values `rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])` gives
    /// (rouge-score 0.1.2), worked by hand here.
    #[test]
    fn scores_match_rouge_score() {
        let (p, r) = ("The cat sat on the mat.", "the cat was on the MAT");
        // unigrams: pred the x2 cat sat on mat (6), ref the x2 cat was on mat (6), overlap 5.
        assert!((rouge_n(p, r, 1) - 5.0 / 6.0).abs() < 1e-12);
        // bigrams: pred {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat was,
        // was on, on the, the mat}: overlap 3 of 5 each.
        assert!((rouge_n(p, r, 2) - 0.6).abs() < 1e-12);
        // LCS: the cat on the mat = 5 of 6 each.
        assert!((rouge_l(p, r) - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(
            tokens("Don't stop-me, NOW!"),
            ["don", "t", "stop", "me", "now"]
        );
        assert_eq!(rouge_l("", "a b"), 0.0);
        assert_eq!(rouge_n("x y", "a b", 1), 0.0);
        // Different lengths: pred 2 tokens, ref 4, LCS 2: P 1, R 0.5, F 2/3.
        assert!((rouge_l("a c", "a b c d") - 2.0 / 3.0).abs() < 1e-12);
        let c = corpus(&[(p.into(), r.into()), ("x".into(), "y".into())]);
        assert!((c[0] - 5.0 / 12.0).abs() < 1e-12);
    }
}
