"""The bookkeeping side of bench/compare.sh; standard library only (runs on the system python3).

Subcommands:
  data     the training rows: the reference fixture's token stream cut into rows of N ids
  record   turn one run's raw output (PEFT JSON, or lorakit metrics.jsonl / --stats line) and its
           /usr/bin/time peak RSS into one JSON line for runs.jsonl
  record-peak  matmul_peak / compare_peft.py peak lines -> runs.jsonl lines (part "peak")
  table    medians over the rounds and lorakit/PEFT ratios, as a markdown table; with peak runs,
           also the matmul ceilings and the model FLOP utilisation (MFU) of the training runs
"""

import argparse
import array
import json
import re
import statistics
import struct
import sys


def fail(msg):
    print(f"compare_report.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def cmd_data(a):
    b = open(a.batches, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    if h["input_ids"]["dtype"] != "I64":
        fail(f"{a.batches}: input_ids is {h['input_ids']['dtype']}, expected I64")
    s, e = h["input_ids"]["data_offsets"]
    ids = array.array("q")
    ids.frombytes(b[8 + n + s:8 + n + e])
    if sys.byteorder != "little":
        ids.byteswap()
    ids = ids.tolist()
    rows = len(ids) // a.seq_len
    if rows < a.min_rows:
        fail(f"{a.batches} has {len(ids)} tokens: {rows} rows of {a.seq_len}, fewer than {a.min_rows}")
    with open(a.out, "w") as f:
        for r in range(rows):
            f.write(json.dumps({"input_ids": ids[r * a.seq_len:(r + 1) * a.seq_len]}) + "\n")
    print(rows)


def read_rss_kb(path):
    text = open(path).read().split()
    if not text or not text[-1].isdigit():
        fail(f"no peak RSS in {path} (/usr/bin/time -f %M output): {' '.join(text)[:200]!r}")
    return int(text[-1])


def cmd_record(a):
    rec = {"part": a.part, "config": a.config, "tool": a.tool, "precision": a.precision, "round": a.round,
           "rss_kb": read_rss_kb(a.rss)}
    if a.tool == "peft":
        lines = [l for l in open(a.peft_json).read().splitlines() if l.startswith("{")]
        if not lines:
            fail(f"no JSON result in {a.peft_json}")
        r = json.loads(lines[-1])
        rec["tokens_per_s"] = r["tokens_per_s"] if "tokens_per_s" in r else r["target_tokens_per_s"]
        if a.part == "e2e":
            for k in ("seconds", "steps", "target_tokens", "first_loss", "last_loss"):
                rec[k] = r[k]
        elif a.part == "train":
            rec["first_loss"] = r["losses"][0]
            rec["median_step_s"] = r["median_step_s"]
            rec["steps"] = len(r["step_seconds"])
        else:
            rec["text"] = r["text"]
            rec["prompt_tokens"] = r["prompt_tokens"]
            rec["prefill_s"] = r["prefill_s"]
    elif a.part == "e2e":
        rows = [json.loads(l) for l in open(a.metrics) if '"loss"' in l]
        if not rows:
            fail(f"no step rows in {a.metrics}")
        rec["seconds"] = sum(r["seconds"] for r in rows)
        rec["steps"] = len(rows)
        rec["target_tokens"] = sum(r["target_tokens"] for r in rows)
        rec["tokens_per_s"] = rec["target_tokens"] / rec["seconds"]
        rec["first_loss"], rec["last_loss"] = rows[0]["loss"], rows[-1]["loss"]
    elif a.part == "train":
        rows = [json.loads(l) for l in open(a.metrics) if '"loss"' in l]
        if not rows:
            fail(f"no step rows in {a.metrics}")
        timed = rows[1:] if len(rows) > 1 else rows
        t = statistics.median(r["seconds"] for r in timed)
        rec["tokens_per_s"] = timed[0]["tokens"] / t
        rec["median_step_s"] = t
        rec["first_loss"] = rows[0]["loss"]
        rec["steps"] = len(rows)
    else:
        err = open(a.stats).read()
        m = re.search(r"prompt (\d+) tokens, prefill ([0-9.]+) s; (\d+) new tokens, decode ([0-9.]+) tokens/s", err)
        if not m:
            fail(f"no `--stats` line in lorakit's stderr ({a.stats}): {err[-300:]!r}")
        rec["prompt_tokens"], rec["prefill_s"] = int(m[1]), float(m[2])
        rec["new_tokens"], rec["tokens_per_s"] = int(m[3]), float(m[4])
        out = open(a.stdout).read()
        if not out.startswith(a.prompt):
            fail(f"lorakit's output does not start with the prompt: {out[:200]!r}")
        rec["text"] = out[len(a.prompt):].rstrip("\n")
    print(json.dumps(rec))
    extra = f", step-1 loss {rec['first_loss']:.4f}" if "first_loss" in rec else ""
    if a.part == "e2e":
        extra += f", {rec['steps']} steps, {rec['seconds']:.1f} s, {rec['target_tokens']} target tokens"
    print(f"compare.sh:   {a.tool} {a.precision}: {rec['tokens_per_s']:.1f} tokens/s, "
          f"peak RSS {rec['rss_kb'] / 1e6:.2f} GB{extra}", file=sys.stderr)


def cmd_record_peak(a):
    n = 0
    for line in open(a.lines):
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        print(json.dumps({"part": "peak", "config": r["shape"], "tool": a.tool, "precision": r["precision"],
                          "round": a.round, "gflops": r["gflops"]}))
        n += 1
    if n == 0:
        fail(f"no result lines in {a.lines}")


# Model FLOPs per trained token of the bench's run (SmolLM2-135M, rows of 256 tokens, every token a
# target, frozen base): forward 2·P and input-gradient 2·P for the P weights of every linear layer
# and the LM head, plus causal attention (Q·Kᵀ and P·V: 4·h·c per layer forward, c = the mean
# context (T + 1) / 2; twice that backward). The LoRA factors (r = 8) add < 0.2% and are left out;
# recomputation inside a tool is not model FLOPs.
SMOLLM2 = {"layers": 30, "hidden": 576, "kv_dim": 192, "intermediate": 1536, "vocab": 49152}


def train_flops_per_token(seq_len=256, c=SMOLLM2):
    h = c["hidden"]
    linear = c["layers"] * (2 * h * h + 2 * h * c["kv_dim"] + 3 * h * c["intermediate"])
    head = c["vocab"] * h
    attn_fwd = c["layers"] * 4 * h * (seq_len + 1) / 2
    return 4 * (linear + head) + 3 * attn_fwd


def fmt(values, digits):
    med = statistics.median(values)
    cell = f"{med:.{digits}f}"
    if len(values) > 1:
        cell += f" ({min(values):.{digits}f}–{max(values):.{digits}f})"
    return cell, med


CONFIG_NAMES = {"padded": "padded batches", "packed": "packed rows", "qv": "LoRA q,v", "all": "LoRA all-linear", "base": "base model", "unmerged": "unmerged adapter",
                "merged": "merged adapter"}


def cmd_table(a):
    runs = [json.loads(l) for l in open(a.runs) if l.strip()]
    if not runs:
        fail(f"no runs recorded in {a.runs}")

    def values(part, config, tool, precision, key):
        return [r[key] for r in runs
                if (r["part"], r["config"], r["tool"], r["precision"]) == (part, config, tool, precision)]

    out = []
    out.append("| measure | lorakit | PEFT | lorakit / PEFT |")
    out.append("| --- | ---: | ---: | ---: |")
    notes = []

    def row(label, lk, pf, digits, scale=1.0):
        if not lk or not pf:
            return
        lc, lm = fmt([v * scale for v in lk], digits)
        pc, pm = fmt([v * scale for v in pf], digits)
        out.append(f"| {label} | {lc} | {pc} | {lm / pm:.2f} |")

    order = {"f32": 0, "bf16": 1, "int8": 2, "gguf": 3, "gguf-f32": 4, "gguf-bf16": 5, "gguf-int8": 6}
    lk_prec = sorted({r["precision"] for r in runs if r["tool"] == "lorakit" and r["part"] == "train"}, key=order.get)
    pf_prec = [p for p in ("fp32", "bf16") if any(r["tool"] == "peft" and r["precision"] == p for r in runs)]
    pf_name = {"fp32": "PEFT fp32", "bf16": "PEFT bf16 autocast"}
    configs = [c for c in ("qv", "all") if any(r["part"] == "train" and r["config"] == c for r in runs)]
    for key, what, digits, scale in (("tokens_per_s", "train tokens/s", 0, 1.0),
                                     ("rss_kb", "train peak RSS (GB)", 2, 1e-6)):
        for c in configs:
            for lp in lk_prec:
                for pp in pf_prec:
                    row(f"{what}, {CONFIG_NAMES[c]}: lorakit {lp} vs {pf_name[pp]}",
                        values("train", c, "lorakit", lp, key), values("train", c, "peft", pp, key), digits, scale)
    for c in configs:
        # QLoRA against lorakit's own bf16 path (the same run, the same shapes).
        for q in [p for p in lk_prec if p.startswith("gguf") or p == "int8"]:
            qt, bt = values("train", c, "lorakit", q, "tokens_per_s"), values("train", c, "lorakit", "bf16", "tokens_per_s")
            if qt and bt:
                what = {"gguf-int8": "QLoRA over the Q4_1 blocks, 8-bit backward",
                        "int8": "bf16 with the 8-bit backward"}.get(q, "QLoRA over the Q4_1 blocks")
                notes.append(f"train tokens/s, {CONFIG_NAMES[c]}: lorakit {q} ({what}) / lorakit bf16 = "
                             f"{statistics.median(qt) / statistics.median(bt):.2f}")
    for c in configs:
        losses = {f"lorakit {lp}": values("train", c, "lorakit", lp, "first_loss") for lp in lk_prec}
        losses.update({pf_name[pp]: values("train", c, "peft", pp, "first_loss") for pp in pf_prec})
        losses = {k: v for k, v in losses.items() if v}
        if losses:
            notes.append(f"step-1 loss, {CONFIG_NAMES[c]} (B = 0, so the base model's; should agree): "
                         + ", ".join(f"{k} {statistics.median(v):.4f}" for k, v in losses.items()))
    dec_prec = sorted({r["precision"] for r in runs if r["tool"] == "lorakit" and r["part"] == "decode"}, key=order.get)
    for c in ("base", "unmerged", "merged"):
        for lp in dec_prec:
            row(f"decode tokens/s, {CONFIG_NAMES[c]}: lorakit {lp} vs transformers fp32",
                values("decode", c, "lorakit", lp, "tokens_per_s"), values("decode", c, "peft", "fp32", "tokens_per_s"), 1)
    for c in ("base", "unmerged", "merged"):
        for lp in dec_prec:
            row(f"decode peak RSS (GB), {CONFIG_NAMES[c]}: lorakit {lp} vs transformers fp32",
                values("decode", c, "lorakit", lp, "rss_kb"), values("decode", c, "peft", "fp32", "rss_kb"), 2, 1e-6)
    for c in ("base", "unmerged", "merged"):
        lt = [r["text"] for r in runs if r["part"] == "decode" and r["config"] == c and r["tool"] == "lorakit"
              and r["precision"] == "f32"]
        pt = [r["text"] for r in runs if r["part"] == "decode" and r["config"] == c and r["tool"] == "peft"]
        if lt and pt:
            x, y = lt[0], pt[0]
            k = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
            same = "identical" if x == y else f"first difference at character {k} of {max(len(x), len(y))}"
            notes.append(f"greedy text, {CONFIG_NAMES[c]}, lorakit f32 vs transformers fp32: {same}")
        lp_tok = [r["prompt_tokens"] for r in runs if r["part"] == "decode" and r["config"] == c]
        if lp_tok and len(set(lp_tok)) > 1:
            notes.append(f"WARNING: prompt token counts differ between the tools ({sorted(set(lp_tok))})")
    e2e_prec = sorted({r["precision"] for r in runs if r["tool"] == "lorakit" and r["part"] == "e2e"}, key=order.get)
    for lc in ("padded", "packed"):
        for lp in e2e_prec:
            for pp in pf_prec:
                lk, pf = values("e2e", lc, "lorakit", lp, "seconds"), values("e2e", "padded", "peft", pp, "seconds")
                if lk and pf:
                    # Seconds: lower is better, so the ratio is PEFT / lorakit (the speed-up).
                    lcell, lm = fmt(lk, 1)
                    pcell, pm = fmt(pf, 1)
                    out.append(f"| {a.epoch_data} epoch seconds (speed-up = PEFT / lorakit), lorakit {lp} {CONFIG_NAMES[lc]} vs "
                               f"{pf_name[pp]} padded, length-grouped | {lcell} | {pcell} | {pm / lm:.2f} |")
                row(f"{a.epoch_data} epoch target tokens/s, lorakit {lp} {CONFIG_NAMES[lc]} vs {pf_name[pp]} padded, length-grouped",
                    values("e2e", lc, "lorakit", lp, "tokens_per_s"), values("e2e", "padded", "peft", pp, "tokens_per_s"), 0)
    for r in sorted({(r["config"], r["tool"], r["precision"]) for r in runs if r["part"] == "e2e"}):
        sel = [x for x in runs if (x["part"], x["config"], x["tool"], x["precision"]) == ("e2e",) + r]
        notes.append(f"{a.epoch_data} epoch, {r[1]} {r[2]} {CONFIG_NAMES[r[0]]}: {sel[0]['steps']} optimiser steps, "
                     f"{sel[0]['target_tokens']} target tokens, loss {sel[0]['first_loss']:.3f} → {sel[0]['last_loss']:.3f}")
    peak_rows = [r for r in runs if r["part"] == "peak"]
    if peak_rows:
        out.append("")
        out.append("| matmul GFLOP/s (2 threads) | lorakit | torch | lorakit / torch |")
        out.append("| --- | ---: | ---: | ---: |")
        shapes = []
        for r in peak_rows:
            if (r["precision"], r["config"]) not in shapes:
                shapes.append((r["precision"], r["config"]))
        for prec, shape in shapes:
            lk = values("peak", shape, "lorakit", prec, "gflops")
            pt = values("peak", shape, "peft", prec, "gflops")
            label = {"roof": "instruction roof (512-bit FMA / dot-product chains or AMX tile products, registers only)",
                     "mix": "one forward pass's mix of the shapes, time-weighted"}.get(shape, shape)
            lc = fmt(lk, 0)[0] if lk else "–"
            pc = fmt(pt, 0)[0] if pt else "–"
            ratio = f"{statistics.median(lk) / statistics.median(pt):.2f}" if lk and pt else "–"
            out.append(f"| {prec} {label} | {lc} | {pc} | {ratio} |")
        train_rows = [r for r in runs if r["part"] == "train"]
        if train_rows:
            fpt = train_flops_per_token()
            notes.append(f"model FLOPs per trained token (SmolLM2-135M, 256-token rows, frozen base): "
                         f"{fpt / 1e9:.3f} GFLOP (formula in compare_report.py)")
            out.append("")
            # Each path against every roof of the same run: f32 FMAs, bf16 (the tiles' where the
            # CPU has AMX) and 8-bit (AMX-INT8 or AVX512-VNNI, integer operations counted as FLOPs).
            roofs = [(kind, values("peak", "roof", "lorakit", kind, "gflops")) for kind in ("f32", "bf16", "int8")]
            roofs = [(kind, v) for kind, v in roofs if v]
            out.append("| model FLOP utilisation (MFU) | tokens/s | model GFLOP/s | "
                       + " | ".join(f"of the {kind} roof" for kind, _ in roofs)
                       + " | of the best measured matmul mix |")
            out.append("| --- | ---: | ---: | " + " | ".join("---:" for _ in roofs) + " | ---: |")
            for c in configs:
                for tool, precs in (("lorakit", lk_prec), ("peft", pf_prec)):
                    for p in precs:
                        tps = values("train", c, tool, p, "tokens_per_s")
                        if not tps:
                            continue
                        # int8 paths run bf16 forwards and 8-bit input gradients: against the bf16 mix.
                        kind = "bf16" if p.endswith(("bf16", "int8")) else "f32"
                        mixes = [statistics.median(v) for v in (values("peak", "mix", "lorakit", kind, "gflops"),
                                                                 values("peak", "mix", "peft", kind, "gflops")) if v]
                        model = statistics.median(tps) * fpt / 1e9
                        of_roofs = " | ".join(f"{100 * model / statistics.median(v):.0f}%" for _, v in roofs)
                        of_mix = f"{100 * model / max(mixes):.0f}%" if mixes else "–"
                        name = f"lorakit {p}" if tool == "lorakit" else pf_name[p]
                        out.append(f"| {CONFIG_NAMES[c]}, {name} | {statistics.median(tps):.0f} | {model:.0f} | "
                                   f"{of_roofs} | {of_mix} |")
    print("\n".join(out))
    if notes:
        print()
        for n in notes:
            print(f"- {n}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--batches", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--min-rows", type=int, default=4)
    r = sub.add_parser("record")
    r.add_argument("--part", choices=["train", "decode", "e2e"], required=True)
    r.add_argument("--config", required=True)
    r.add_argument("--tool", choices=["lorakit", "peft"], required=True)
    r.add_argument("--precision", required=True)
    r.add_argument("--round", type=int, required=True)
    r.add_argument("--rss", required=True, help="/usr/bin/time -f %%M -o FILE")
    r.add_argument("--peft-json")
    r.add_argument("--metrics", help="lorakit train's OUT/metrics.jsonl")
    r.add_argument("--stats", help="lorakit generate --stats: its stderr")
    r.add_argument("--stdout", help="lorakit generate: its stdout (prompt + text)")
    r.add_argument("--prompt", default="")
    k = sub.add_parser("record-peak")
    k.add_argument("--tool", choices=["lorakit", "peft"], required=True)
    k.add_argument("--round", type=int, required=True)
    k.add_argument("--lines", required=True)
    t = sub.add_parser("table")
    t.add_argument("--runs", required=True)
    t.add_argument("--epoch-data", default="e2e", help="the data set of the epoch part, for its labels")
    a = p.parse_args()
    {"data": cmd_data, "record": cmd_record, "record-peak": cmd_record_peak, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
