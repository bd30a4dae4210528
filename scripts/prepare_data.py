#!/usr/bin/env python3
"""Converts downloaded benchmark files into lorakit's JSONL training format.

Standard library only. Called by scripts/fetch-data.sh, one sub-command per data set:

    prepare_data.py e2e TASK_JSON OUT_DIR

writes OUT_DIR/{train,validation,test}.jsonl and prints the counts. Each line is
{"prompt": ..., "completion": ..., "references": [...]}: lorakit trains on the completion
and ignores the other keys; "references" holds every reference text of the same input, for
evaluation (BLEU/ROUGE against all references).

Splits are by input (the meaning representation for E2E), never by line, so that no input is
in two splits: the distinct inputs are ordered by the SHA-256 of their text and cut 80/10/10.
The order does not depend on the Python version, the platform or a random generator.
"""

import argparse
import hashlib
import json
import os
import sys
from collections import OrderedDict

SPLITS = ("train", "validation", "test")
FRACTIONS = (0.8, 0.1, 0.1)


def split_keys(keys):
    """Distinct keys -> {key: split name}, by SHA-256 order, 80/10/10 of the keys."""
    ordered = sorted(keys, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
    n = len(ordered)
    n_train = round(n * FRACTIONS[0])
    n_val = round(n * FRACTIONS[1])
    out = {}
    for i, k in enumerate(ordered):
        out[k] = "train" if i < n_train else "validation" if i < n_train + n_val else "test"
    return out


def clean(text):
    """Collapses runs of whitespace (the E2E references hold stray double spaces)."""
    return " ".join(text.split())


def write_splits(out_dir, rows_by_split):
    os.makedirs(out_dir, exist_ok=True)
    for split in SPLITS:
        with open(os.path.join(out_dir, split + ".jsonl"), "w", encoding="utf-8") as f:
            for row in rows_by_split[split]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- E2E NLG (BIG-bench gem/e2e_nlg) -----------------------------------------------------

E2E_KEYS = (
    "name",
    "eatType",
    "food",
    "priceRange",
    "customer rating",
    "area",
    "familyFriendly",
    "near",
)


def e2e_mr(text):
    """'name: Blue Spice, eatType: coffee shop' -> 'name[Blue Spice], eatType[coffee shop]',
    the E2E data set's own notation. Fails on anything it does not recognise."""
    parts = []
    for item in text.split(", "):
        key, sep, value = item.partition(": ")
        if not sep or key not in E2E_KEYS or not value or ": " in value or "[" in value:
            raise ValueError(f"unexpected meaning representation {text!r} (item {item!r})")
        parts.append(f"{key}[{value}]")
    return ", ".join(parts)


def e2e_prompt(mr):
    # The prompt ends without a space; the completion starts with one, which byte-level BPE
    # tokenisers join to its first word (" The"), as in running text. lorakit tokenises
    # prompt and completion separately, so this boundary is always a token boundary.
    return f"Meaning representation: {mr}\nDescription:"


def prepare_e2e(task_json, out_dir):
    with open(task_json, encoding="utf-8") as f:
        task = json.load(f)
    examples = task["examples"]
    # Meaning representation -> its references, in file order.
    refs = OrderedDict()
    for ex in examples:
        if not isinstance(ex.get("input"), str) or not isinstance(ex.get("target"), str):
            raise ValueError(f"unexpected example {ex!r}")
        mr = e2e_mr(ex["input"].strip())
        target = clean(ex["target"])
        if target:
            refs.setdefault(mr, []).append(target)
    split_of = split_keys(list(refs))
    rows = {s: [] for s in SPLITS}
    for mr, targets in refs.items():
        prompt = e2e_prompt(mr)
        for t in targets:
            rows[split_of[mr]].append({"prompt": prompt, "completion": " " + t, "references": targets})
    write_splits(out_dir, rows)
    total_mrs = len(refs)
    for s in SPLITS:
        mrs = sum(1 for v in split_of.values() if v == s)
        print(f"e2e {s}: {len(rows[s])} examples, {mrs} meaning representations", file=sys.stderr)
    print(
        f"e2e total: {sum(len(r) for r in rows.values())} examples, {total_mrs} meaning representations",
        file=sys.stderr,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="dataset", required=True)
    e2e = sub.add_parser("e2e", help="E2E NLG from BIG-bench gem/e2e_nlg/task.json")
    e2e.add_argument("task_json")
    e2e.add_argument("out_dir")
    args = ap.parse_args()
    if args.dataset == "e2e":
        prepare_e2e(args.task_json, args.out_dir)


if __name__ == "__main__":
    main()
