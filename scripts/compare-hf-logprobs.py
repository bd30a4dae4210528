#!/usr/bin/env python3
"""Per-token log-probs of a text under an HF model directory, by transformers and by
`lorakit score`, side by side: the check that a directory lorakit wrote (merge, train --full)
means to transformers what it means to lorakit.

    bench/.venv/bin/python scripts/compare-hf-logprobs.py DIR "some text" [--lorakit target/release/lorakit]

Prints the largest |difference| and both greedy next tokens at every position; exits 1 when the
difference exceeds --tol (default 1e-3).
"""
import argparse
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("text")
    ap.add_argument("--lorakit", default="target/release/lorakit")
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.dir)
    ids = tok(a.text, add_special_tokens=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    theirs = [lp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    out = subprocess.run(
        [a.lorakit, "score", "--model", a.dir, "--ids", ",".join(map(str, ids))],
        check=True, capture_output=True, text=True,
    ).stdout
    ours = [t["logprob"] for t in json.loads(out)["tokens"]][1:]
    worst = max(abs(o - t) for o, t in zip(ours, theirs))
    print(f"{len(ids)} tokens; transformers {model.config.model_type}; max |Δ logprob| = {worst:.3e}")
    sys.exit(0 if worst <= a.tol else 1)


if __name__ == "__main__":
    main()
