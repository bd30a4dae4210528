//! ROUGE-L as Google's `rouge-score` package computes it (`RougeScorer(["rougeL"])`, no
//! stemmer): text lowercased, every run of characters outside `[a-z0-9]` replaced by a space,
//! split on whitespace; precision = LCS / prediction tokens, recall = LCS / reference tokens,
//! F = 2PR / (P + R). With several references the one with the highest F counts (the first on
//! ties, as `score_multi`). The corpus score is the mean F over examples, × 100.
//! `tests/data/bleu/` checks it against rouge-score.

/// rouge-score's default tokenizer (without stemming).
pub fn tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Length of the longest common subsequence, O(|a|·|b|) time, O(|b|) memory.
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F-measure (0..1) of `prediction` against one reference.
pub fn rouge_l_f(reference: &str, prediction: &str) -> f64 {
    let r = tokenize(reference);
    let p = tokenize(prediction);
    if r.is_empty() || p.is_empty() {
        return 0.0;
    }
    let lcs = lcs_len(&r, &p) as f64;
    let precision = lcs / p.len() as f64;
    let recall = lcs / r.len() as f64;
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// The best F over the references (0..1).
pub fn rouge_l_multi<S: AsRef<str>>(references: &[S], prediction: &str) -> f64 {
    references
        .iter()
        .map(|r| rouge_l_f(r.as_ref(), prediction))
        .fold(0.0, f64::max)
}

/// Mean over examples of the best-reference ROUGE-L F, × 100.
pub fn corpus_rouge_l<S: AsRef<str>>(hyps: &[S], refs: &[Vec<S>]) -> f64 {
    assert_eq!(hyps.len(), refs.len(), "one reference set per hypothesis");
    if hyps.is_empty() {
        return 0.0;
    }
    let sum: f64 = hyps
        .iter()
        .zip(refs)
        .map(|(h, rs)| rouge_l_multi(rs, h.as_ref()))
        .sum();
    100.0 * sum / hyps.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_keeps_only_lowercase_alphanumerics() {
        assert_eq!(
            tokenize("The Café's 2nd-best, 'eatType'!"),
            ["the", "caf", "s", "2nd", "best", "eattype"]
        );
    }

    #[test]
    fn lcs_and_f() {
        assert_eq!(lcs_len(&[1, 2, 3, 4], &[2, 4, 3]), 2);
        // LCS "the cat the mat"? no: ref 6 tokens, pred 4, LCS 3 ("the cat mat").
        let f = rouge_l_f("the cat sat on the mat", "the cat a mat");
        let (p, r) = (3.0 / 4.0, 3.0 / 6.0);
        assert!((f - 2.0 * p * r / (p + r)).abs() < 1e-12);
        assert_eq!(rouge_l_f("", "x"), 0.0);
        assert_eq!(rouge_l_multi(&["a b", "a b c"], "a b c"), 1.0);
    }
}
