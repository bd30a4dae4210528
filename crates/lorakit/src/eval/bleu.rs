//! Corpus BLEU exactly as sacrebleu 2.x computes its default `BLEU()`: the `13a` tokenizer (as
//! mteval-v13a), no lowercasing, n-grams up to 4, counts clipped by the maximum count over the
//! references, the brevity penalty with the reference length closest to each hypothesis (the
//! shorter one on ties), and sacrebleu's default `exp` smoothing (mteval's: the k-th order with
//! no match counts as 1 / (2^k · total)). `tests/data/bleu/` checks it against sacrebleu.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

const MAX_ORDER: usize = 4;

/// What sacrebleu reports besides the score.
#[derive(Debug, Clone, PartialEq)]
pub struct BleuScore {
    /// 0..100.
    pub score: f64,
    /// n-gram precisions (1..4), 0..100, after smoothing.
    pub precisions: [f64; MAX_ORDER],
    pub brevity_penalty: f64,
    pub sys_len: usize,
    pub ref_len: usize,
    pub correct: [usize; MAX_ORDER],
    pub total: [usize; MAX_ORDER],
}

/// Python's `str.split()` whitespace: Unicode White_Space plus the ASCII separators
/// U+001C..U+001F that Python also treats as whitespace.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|t| !t.is_empty())
}

/// sacrebleu's `Tokenizer13a` (with the `rstrip` its BLEU applies first): the tokens joined by
/// single spaces.
pub fn tokenize_13a(line: &str) -> String {
    static RES: OnceLock<[(Regex, &str); 4]> = OnceLock::new();
    let res = RES.get_or_init(|| {
        let re = |p: &str| Regex::new(p).expect("13a regex");
        [
            // Punctuation and symbols: {-~, [-`, space-&, (-+, :-@, /
            (re(r"([\{-~\[-` -&\(-\+:-@/])"), " $1 "),
            // Period and comma unless preceded by a digit.
            (re(r"([^0-9])([\.,])"), "$1 $2 "),
            // Period and comma unless followed by a digit.
            (re(r"([\.,])([^0-9])"), " $1 $2"),
            // Dash preceded by a digit.
            (re(r"([0-9])(-)"), "$1 $2 "),
        ]
    });
    let mut line = line.trim_end_matches(is_py_space).to_owned();
    line = line.replace("<skipped>", "");
    line = line.replace("-\n", "");
    line = line.replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut line = format!(" {line} ");
    for (re, rep) in res.iter() {
        line = re.replace_all(&line, *rep).into_owned();
    }
    py_split(&line).collect::<Vec<_>>().join(" ")
}

/// n-gram counts of orders 1..=MAX_ORDER (keys: the n-gram's tokens) and the token count.
fn ngrams(tokenized: &str) -> (HashMap<Vec<&str>, usize>, usize) {
    let toks: Vec<&str> = py_split(tokenized).collect();
    let mut counts = HashMap::new();
    for n in 1..=MAX_ORDER {
        for w in toks.windows(n) {
            *counts.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    (counts, toks.len())
}

/// Corpus BLEU of `hyps[i]` against `refs[i]` (one or more references each).
/// Panics if the lengths differ or an example has no reference (callers validate the data).
pub fn corpus_bleu<S: AsRef<str>>(hyps: &[S], refs: &[Vec<S>]) -> BleuScore {
    assert_eq!(hyps.len(), refs.len(), "one reference set per hypothesis");
    let mut correct = [0usize; MAX_ORDER];
    let mut total = [0usize; MAX_ORDER];
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    for (hyp, rs) in hyps.iter().zip(refs) {
        assert!(!rs.is_empty(), "every hypothesis needs a reference");
        let ref_toks: Vec<String> = rs.iter().map(|r| tokenize_13a(r.as_ref())).collect();
        // Maximum count of each n-gram over the references.
        let mut ref_max: HashMap<Vec<&str>, usize> = HashMap::new();
        let mut ref_lens = Vec::with_capacity(rs.len());
        for r in &ref_toks {
            let (counts, len) = ngrams(r);
            ref_lens.push(len);
            for (g, c) in counts {
                let e = ref_max.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        let hyp_tok = tokenize_13a(hyp.as_ref());
        let (hyp_counts, hyp_len) = ngrams(&hyp_tok);
        // Closest reference length; the shorter one on ties.
        let mut closest: Option<(usize, usize)> = None; // (diff, len)
        for &l in &ref_lens {
            let diff = hyp_len.abs_diff(l);
            closest = match closest {
                None => Some((diff, l)),
                Some((d, cl)) if diff < d || (diff == d && l < cl) => Some((diff, l)),
                keep => keep,
            };
        }
        sys_len += hyp_len;
        ref_len += closest.map_or(0, |c| c.1);
        for (g, c) in &hyp_counts {
            let n = g.len() - 1;
            correct[n] += (*c).min(ref_max.get(g).copied().unwrap_or(0));
            total[n] += c;
        }
    }
    bleu_from_stats(correct, total, sys_len, ref_len)
}

/// sacrebleu's `compute_bleu` with `smooth_method='exp'`, `effective_order=False`.
fn bleu_from_stats(
    correct: [usize; MAX_ORDER],
    total: [usize; MAX_ORDER],
    sys_len: usize,
    ref_len: usize,
) -> BleuScore {
    let bp = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0f64; MAX_ORDER];
    let mut out = BleuScore {
        score: 0.0,
        precisions,
        brevity_penalty: bp,
        sys_len,
        ref_len,
        correct,
        total,
    };
    if correct.iter().all(|&c| c == 0) {
        return out;
    }
    let mut smooth = 1.0f64;
    for n in 0..MAX_ORDER {
        if total[n] == 0 {
            break;
        }
        if correct[n] == 0 {
            smooth *= 2.0;
            precisions[n] = 100.0 / (smooth * total[n] as f64);
        } else {
            precisions[n] = 100.0 * correct[n] as f64 / total[n] as f64;
        }
    }
    // sacrebleu's my_log: log(0) is floored at -9999999999.
    let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
    let mean = precisions.iter().map(|&p| log(p)).sum::<f64>() / MAX_ORDER as f64;
    out.score = bp * mean.exp();
    out.precisions = precisions;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_13a_splits_punctuation_but_not_numbers() {
        assert_eq!(
            tokenize_13a("Hello, world. It costs 3.50 - or 3-4 (\"cheap\")!"),
            "Hello , world . It costs 3.50 - or 3 - 4 ( \" cheap \" ) !"
        );
        assert_eq!(tokenize_13a("a &amp; b&lt;c  "), "a & b < c");
    }

    #[test]
    fn identical_is_100_and_disjoint_is_0() {
        let h = ["the cat sat on the mat"];
        let r = [vec!["the cat sat on the mat"]];
        assert!((corpus_bleu(&h, &r).score - 100.0).abs() < 1e-9);
        let r = [vec!["dogs bark loudly at night"]];
        assert_eq!(corpus_bleu(&h, &r).score, 0.0);
    }

    #[test]
    fn brevity_penalty_uses_the_closest_reference() {
        let h = ["the cat sat"];
        let r = [vec!["the cat sat on the mat", "the cat sat down"]];
        let s = corpus_bleu(&h, &r);
        assert_eq!((s.sys_len, s.ref_len), (3, 4));
        assert!((s.brevity_penalty - (1.0f64 - 4.0 / 3.0).exp()).abs() < 1e-12);
    }
}
