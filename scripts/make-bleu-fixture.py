#!/usr/bin/env python3
"""Writes tests/data/bleu/cases.json: corpus BLEU from sacrebleu and ROUGE-L from
rouge-score on hand-made and seeded random corpora, for lorakit's own implementations
(crates/lorakit/src/eval/{bleu,rouge}.rs) to match.

    python3 -m venv /tmp/bleu-venv
    /tmp/bleu-venv/bin/pip install sacrebleu==2.4.3 rouge-score==0.1.2
    /tmp/bleu-venv/bin/python scripts/make-bleu-fixture.py

BLEU is sacrebleu's default `BLEU()` (13a tokenizer, mixed case, 4-grams, `exp` smoothing,
closest reference length) over a variable number of references per hypothesis (missing ones
passed as None, as sacrebleu allows). ROUGE-L is `RougeScorer(["rougeL"], use_stemmer=False)
.score_multi(references, hypothesis)` (the best-F reference), F-measure averaged over the
corpus, × 100. The random corpora come from `random.Random(seed)`, so the output is the same
on every run.
"""

import json
import os
import random
import sys

import rouge_score
import sacrebleu
from rouge_score import rouge_scorer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "bleu", "cases.json")

E2E_LIKE = [
    (
        "The Blue Spice is a pub near Rainbow Vegetarian Café in the riverside area.",
        [
            "Situated near the Rainbow Vegetarian Café in the riverside area of the city, The Blue Spice pub, is ideal if you fancy traditional English food whilst out with the kids.",
            "Blue Spice is a pub serving English food near the Rainbow Vegetarian Café in riverside.",
        ],
    ),
    (
        "Alimentum is a cheap restaurant with a 5 out of 5 customer rating.",
        [
            "Alimentum is a restaurant with a price range of less than £20 and a customer rating of 5 out of 5.",
            "With a 5 out of 5 rating, Alimentum is a cheap restaurant.",
            "The restaurant Alimentum is cheap and highly rated (5 out of 5).",
        ],
    ),
    (
        "Aromi is a family-friendly coffee shop in the city centre serving Japanese food.",
        ["Aromi is a coffee shop in the city centre. It serves Japanese food and is family friendly."],
    ),
    (
        "The Eagle is a coffee shop near Burger King. It is not family-friendly.",
        [
            "The Eagle coffee shop, near Burger King, is not family-friendly.",
            "Near Burger King is The Eagle, a coffee shop that does not welcome children.",
        ],
    ),
    ("Zizzi is a pub.", ["Zizzi is an adult pub with a high price range.", "Zizzi is a pub."]),
]

TRICKY = [
    ("It costs £3.50 - or 3-4 pounds, i.e. 1,000 pence.", ["It costs 3.50 pounds, or 1,000 pence (roughly)."]),
    ("Tom &amp; Jerry said &quot;hi&quot; &lt;loudly&gt;.", ['Tom & Jerry said "hi" <loudly>.']),
    ("naïve café résumé — “quoted” text…", ["naive cafe resume - \"quoted\" text...", "naïve café résumé"]),
    ("tabs\tand  double  spaces   ", ["tabs and double spaces"]),
    ("a <skipped> word and a hyphen-\nated line\nbreak", ["a word and a hyphenated line break"]),
    ("Prices: $5/$10 {approx} [sic] @home #1 ~ok^ `x` |y|", ["Prices : $ 5 / $ 10 { approx } [ sic ] @ home # 1 ~ ok ^ ` x ` | y |"]),
    ("U.S.A. vs. U.K., 2.5% up.", ["USA vs UK, 2.5 % up."]),
    ("UPPER lower MiXeD", ["upper LOWER mixed"]),
]

WORDS = (
    "the a an restaurant pub coffee shop near river city centre food is serves cheap expensive "
    "family friendly rated high low customer rating Japanese Italian French English Indian "
    "it and with of in by for , . ! ? ( ) - 5 3 1 out £20 £20-25 Café's".split()
)


def random_corpus(seed, n, max_refs, min_len, max_len):
    rng = random.Random(seed)

    def sent():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_len, max_len)))

    hyps, refs = [], []
    for _ in range(n):
        r = [sent() for _ in range(rng.randint(1, max_refs))]
        # Hypotheses share words with a reference: perturb one.
        base = rng.choice(r).split()
        h = [w if rng.random() < 0.7 else rng.choice(WORDS) for w in base]
        if rng.random() < 0.3:
            h = h[: max(1, len(h) // 2)]
        hyps.append(" ".join(h))
        refs.append(r)
    return hyps, refs


def scores(hyps, refs):
    nmax = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(nmax)]
    bleu = sacrebleu.metrics.BLEU()
    b = bleu.corpus_score(hyps, streams)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    per = [scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return {
        "signature": str(bleu.get_signature()),
        "hypotheses": hyps,
        "references": refs,
        "bleu": {
            "score": b.score,
            "precisions": b.precisions,
            "brevity_penalty": b.bp,
            "sys_len": b.sys_len,
            "ref_len": b.ref_len,
            "counts": b.counts,
            "totals": b.totals,
        },
        "rouge_l": {"score": 100.0 * sum(per) / len(per), "per_example_f": per},
    }


def main():
    cases = {}
    cases["e2e_like"] = scores(*map(list, zip(*E2E_LIKE)))
    cases["tricky_tokens"] = scores(*map(list, zip(*TRICKY)))
    cases["random_200"] = scores(*random_corpus(0, 200, 4, 3, 25))
    cases["random_short"] = scores(*random_corpus(1, 30, 3, 1, 4))
    cases["no_4gram_match"] = scores(
        ["the cat sat on a mat today", "dogs run fast in parks"],
        [["the cat sat upon a mat today"], ["dogs can run fast in big parks"]],
    )
    cases["empty_hypothesis"] = scores(["", "the cat sat on the mat"], [["a b c"], ["the cat sat on the mat"]])
    out = {
        "generator": "scripts/make-bleu-fixture.py",
        "sacrebleu": sacrebleu.__version__,
        "rouge_score": getattr(rouge_score, "__version__", "0.1.2"),
        "python": sys.version.split()[0],
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    for name, c in cases.items():
        print(f"{name}: BLEU {c['bleu']['score']:.4f}  ROUGE-L {c['rouge_l']['score']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
