"""The PyTorch / transformers / PEFT side of bench/compare.sh (run with bench/.venv's python).

Subcommands, each printing one JSON object on its last stdout line:
  convert  GGUF -> HF directory (transformers' own GGUF loader dequantises to float32)
  train    a plain PyTorch LoRA training loop, timed per step
  decode   greedy batch-1 generation, timed like `lorakit generate --stats`
  epoch    one epoch of a prompt/completion JSONL (the quickstart's E2E recipe): padded batches
           grouped by length, as transformers' Trainer does with group_by_length
  peak     torch's matmul throughput on the shapes of crates/lorakit/examples/matmul_peak.rs
           (one JSON object per line there, the same keys)

Every run is its own process, so that /usr/bin/time's peak RSS belongs to one measurement.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

# Module names of "all-linear" on a Llama model, spelled out (PEFT's own "all-linear" resolves to
# the same seven, lm_head excluded; being explicit keeps the two tools' configurations checkably equal).
TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def emit(obj):
    obj["peak_rss_kb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(obj), flush=True)


def fail(msg):
    print(f"compare_peft.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def setup_torch(threads):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch


def read_safetensors(path):
    from safetensors.numpy import load_file

    return load_file(path)


def cmd_convert(a):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(a.gguf):
        fail(f"no GGUF file at {a.gguf}; run scripts/fetch-model.sh")
    if os.path.exists(a.out):
        fail(f"{a.out} exists; remove it first")
    d, name = os.path.split(os.path.abspath(a.gguf))
    # transformers 5 loads a GGUF through its "gguf" quantizer: without the `kernels` package it
    # dequantises every weight to a dense float32 nn.Linear (what we want), but then refuses
    # save_pretrained ("quantized with gguf and is not serializable"). So copy the dense weights
    # into a fresh model built from the same config, minus its quantization_config, and save that.
    # (`dtype` is the v5 name; `torch_dtype` is a deprecated alias.)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    odd = {type(m).__name__ for m in src.modules() if "linear" in type(m).__name__.lower()} - {"Linear"}
    if odd:
        fail(f"transformers kept GGUF weights packed ({sorted(odd)}); uninstall `kernels` or pass GgufConfig(dequantize=True)")
    cfg = AutoConfig.for_model(**{k: v for k, v in src.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        fail(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    del src
    tmp = a.out + ".tmp"  # written whole, then renamed: an interrupted run leaves no half model
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    check = check_against_fixture(torch, tmp, a.fixture) if a.fixture else None
    os.replace(tmp, a.out)
    n = sum(p.numel() for p in model.parameters())
    emit({"out": a.out, "parameters": n, "architecture": cfg.architectures, "fixture_check": check})


def check_against_fixture(torch, model_dir, fixture):
    """The saved model's logits on the fixture's `item` prompt against the reference (PEFT-side) logits
    that lorakit's own tests compare with: proves both tools run the same weights."""
    meta = json.load(open(os.path.join(fixture, "meta.json")))
    ref = read_safetensors(os.path.join(fixture, "logits_base_item.safetensors"))
    model = load_model(torch, model_dir).eval()
    ids = torch.tensor([meta["prompts"]["item"]["ids"]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    argmax_ok = logits.argmax(-1).tolist() == ref["item.argmax"].tolist()
    lse_err = (torch.logsumexp(logits, -1) - torch.from_numpy(ref["item.lse"])).abs().max().item()
    strided_err = (logits[:, ::16] - torch.from_numpy(ref["item.strided16"])).abs().max().item()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(model_dir)
    plain = meta["prompts"]["plain"]
    tok_ok = tok(plain["text"])["input_ids"] == plain["ids"]
    if not argmax_ok or strided_err > 1e-2 or not tok_ok:
        fail(f"converted model disagrees with {fixture}: argmax equal {argmax_ok}, max |logit diff| "
             f"{strided_err:.3g}, tokenizer equal {tok_ok}")
    return {"argmax_equal": argmax_ok, "max_abs_logit_diff": strided_err, "max_abs_lse_diff": lse_err,
            "tokenizer_equal": tok_ok}


def load_model(torch, path):
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        fail(f"no HF model at {path} (config.json missing)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def cmd_train(a):
    torch = setup_torch(a.threads)
    from peft import LoraConfig, get_peft_model

    rows = [json.loads(l)["input_ids"] for l in open(a.data) if l.strip()]
    if len(rows) < a.batch_size:
        fail(f"{a.data} has {len(rows)} rows, fewer than one batch of {a.batch_size}")
    model = load_model(torch, a.model)
    model.config.use_cache = False
    cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS[a.targets],
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay)
    model.train()
    nb = len(rows) // a.batch_size  # like `lorakit train --no-shuffle`: batch k = rows kB..kB+B-1
    times, losses, tokens = [], [], None
    for step in range(a.steps):
        k = step % nb
        ids = torch.tensor(rows[k * a.batch_size:(k + 1) * a.batch_size], dtype=torch.long)
        tokens = ids.numel()
        t0 = time.perf_counter()
        if a.precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(input_ids=ids, labels=ids)
        else:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
        if not all(map(lambda x: x == x, losses)):
            fail(f"loss is NaN at step {step + 1}")
    timed = times[1:] if len(times) > 1 else times
    med = statistics.median(timed)
    emit({"tool": "peft", "tokens_per_step": tokens, "median_step_s": med, "tokens_per_s": tokens / med,
          "step_seconds": times, "losses": losses, "trainable_parameters": trainable,
          "threads": torch.get_num_threads()})


def cmd_epoch(a):
    """One epoch over prompt/completion lines, tokenised as `lorakit train` does (the prompt with the
    tokenizer's special tokens, the completion without, then EOS; loss on completion and EOS only),
    in padded batches of similar lengths (transformers' LengthGroupedSampler: random mega-batches of
    50 batches, each sorted by length, longest first), with the quickstart's optimiser and schedule."""
    torch = setup_torch(a.threads)
    import random

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    examples = []
    for n, line in enumerate(open(a.data), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        prompt = tok(obj["prompt"], add_special_tokens=True)["input_ids"]
        completion = tok(obj["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append((prompt + completion, [-100] * len(prompt) + completion))
    rng = random.Random(a.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    mega = 50 * a.batch_size
    grouped = []
    for i in range(0, len(order), mega):
        grouped += sorted(order[i:i + mega], key=lambda j: -len(examples[j][0]))
    batches = [grouped[i:i + a.batch_size] for i in range(0, len(grouped), a.batch_size)]

    model = load_model(torch, a.model)
    model.config.use_cache = False
    cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS[a.targets],
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay)
    steps = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / a.warmup if s < a.warmup else max(0.0, (steps - s) / max(1, steps - a.warmup)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    target_tokens = real_tokens = padded_tokens = 0
    losses = []
    t0 = time.perf_counter()
    step_seconds = []
    for b in batches:
        t_step = time.perf_counter()
        width = max(len(examples[j][0]) for j in b)
        ids = torch.full((len(b), width), pad, dtype=torch.long)
        labels = torch.full((len(b), width), -100, dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for row, j in enumerate(b):
            x, y = examples[j]
            ids[row, :len(x)] = torch.tensor(x)
            labels[row, :len(y)] = torch.tensor(y)
            mask[row, :len(x)] = 1
        # transformers shifts the labels itself: position t predicts token t + 1.
        target_tokens += int((labels[:, 1:] != -100).sum())
        real_tokens += int(mask.sum())
        padded_tokens += ids.numel()
        if a.precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
        else:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if losses[-1] != losses[-1]:
            fail(f"loss is NaN at step {len(losses)}")
        step_seconds.append(time.perf_counter() - t_step)
    seconds = time.perf_counter() - t0
    emit({"tool": "peft", "precision": a.precision, "steps": steps, "seconds": seconds,
          "target_tokens": target_tokens, "tokens": real_tokens, "padded_tokens": padded_tokens,
          "target_tokens_per_s": target_tokens / seconds, "first_loss": losses[0], "last_loss": losses[-1],
          "step_seconds": step_seconds,
          "threads": torch.get_num_threads()})


def cmd_decode(a):
    torch = setup_torch(a.threads)
    from transformers import AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    model = load_model(torch, a.model)
    if a.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, a.adapter)
        if a.merge:
            model = model.merge_and_unload()
    model.eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    enc = tok(a.prompt, return_tensors="pt")  # special tokens as `lorakit generate --prompt` adds them

    class Clock(BaseStreamer):
        """Timestamps the first new token: generate() puts the prompt first, then each new token."""

        def __init__(self):
            self.puts, self.first = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    clock = Clock()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                             do_sample=False, streamer=clock, pad_token_id=tok.eos_token_id)
        t1 = time.perf_counter()
    new = out.shape[1] - enc["input_ids"].shape[1]
    if new != a.new_tokens:
        fail(f"generated {new} tokens, expected {a.new_tokens}")
    # Same definition as `lorakit generate --stats`: prefill = time to the first new token;
    # decode rate = (new tokens - 1) / (total - prefill).
    prefill = clock.first - t0
    rate = (new - 1) / max(t1 - clock.first, 1e-9)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
    emit({"tool": "peft", "tokens_per_s": rate, "prefill_s": prefill, "total_s": t1 - t0,
          "prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": int(new), "text": text,
          "threads": torch.get_num_threads()})


# The SmolLM2-135M linear layers at 1024 tokens (batch 4 x 256), as in examples/matmul_peak.rs:
# name, m, k, n, how often one forward pass meets the shape.
PEAK_SHAPES = [
    ("q_proj/o_proj", 1024, 576, 576, 2),
    ("k_proj/v_proj", 1024, 576, 192, 2),
    ("gate_proj/up_proj", 1024, 576, 1536, 2),
    ("down_proj", 1024, 1536, 576, 1),
    ("lm_head", 1024, 576, 49152, 1),
]


def cmd_peak(a):
    torch = setup_torch(a.threads)
    for dtype, label in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        flop_total = time_total = 0.0
        for name, m, k, n, count in PEAK_SHAPES:
            x = torch.randn(m, k).to(dtype)
            w = torch.randn(n, k).to(dtype)
            reps = 3 if n > 10_000 else 10
            with torch.no_grad():
                x @ w.t()  # warm-up
                best = 0.0
                for _ in range(reps):
                    t0 = time.perf_counter()
                    x @ w.t()
                    best = max(best, 2.0 * m * n * k / (time.perf_counter() - t0))
            print(json.dumps({"precision": label, "shape": f"{name} {m}x{k}x{n}", "threads": a.threads,
                              "gflops": round(best / 1e9, 1)}), flush=True)
            flop_total += count * 2.0 * m * n * k
            time_total += count * 2.0 * m * n * k / best
        print(json.dumps({"precision": label, "shape": "mix", "threads": a.threads,
                          "gflops": round(flop_total / time_total / 1e9, 1)}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--gguf", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--fixture", help="tests/fixtures/smollm2-peft-r8-qv: check the logits against it")
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--targets", choices=sorted(TARGETS), required=True)
    t.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--r", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("epoch")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    e.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--r", type=int, default=4)
    e.add_argument("--alpha", type=float, default=32)
    e.add_argument("--lr", type=float, default=2e-3)
    e.add_argument("--warmup", type=int, default=10)
    e.add_argument("--weight-decay", type=float, default=0.01)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    d = sub.add_parser("decode")
    d.add_argument("--model", required=True)
    d.add_argument("--adapter")
    d.add_argument("--merge", action="store_true")
    d.add_argument("--prompt", required=True)
    d.add_argument("--new-tokens", type=int, default=128)
    d.add_argument("--threads", type=int, default=2)
    k = sub.add_parser("peak")
    k.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.cmd == "decode" and a.merge and not a.adapter:
        fail("--merge needs --adapter")
    {"convert": cmd_convert, "train": cmd_train, "epoch": cmd_epoch, "decode": cmd_decode,
     "peak": cmd_peak}[a.cmd](a)


if __name__ == "__main__":
    main()
