#!/usr/bin/env python3
"""Reference loss and LoRA gradients for GPT-2 (tests/data/gpt2-grads/), computed by HF
transformers + PEFT in float64 from the tiny-gpt2 fixture.

Run from the repository root:
    /work/main/bench/.venv/bin/python scripts/make-gpt2-grad-fixture.py

Two cases, same batch (2 x 10 ids, some labels -100):
  c_attn/ : the fixture adapter tests/fixtures/tiny-gpt2/lora-r4-c_attn (r=4, alpha=8)
  all/    : a fresh adapter r=2, alpha=6 on c_attn, c_proj, c_fc with A, B ~ N(0, 0.1^2)
            (seed 5; B != 0 so that every lora_A gets a gradient), written here as a PEFT dir.
Loss convention (tests/fixtures/README.md "Loss"): logits[:, t] predicts labels[:, t+1], one
token-level mean over all targets whose label is not -100.
"""
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests/fixtures/tiny-gpt2")
OUT = os.path.join(ROOT, "tests/data/gpt2-grads")

INPUT_IDS = [
    [175, 196, 25, 502, 67, 211, 407, 103, 348, 185],
    [72, 345, 366, 42, 218, 392, 167, 486, 68, 432],
]
# Row 0: prompt of 3 and the last label masked; row 1: prompt of 5. 6 + 5 = 11 targets.
LABELS = [
    [-100, -100, -100, 502, 67, 211, 407, 103, 348, -100],
    [-100, -100, -100, -100, -100, 392, 167, 486, 68, 432],
]


def loss_of(model, ids, labels):
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="mean",
    )


def grads_of(model, dtype):
    model.train()
    model.zero_grad()
    ids = torch.tensor(INPUT_IDS)
    labels = torch.tensor(LABELS)
    loss = loss_of(model, ids, labels)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name, name
            grads[name.replace(".default", "")] = p.grad.detach().clone()
    return loss.item(), grads


def base(dtype):
    m = GPT2LMHeadModel.from_pretrained(FIX, dtype=dtype, attn_implementation="eager")
    return m


def run_case(name, make_peft):
    out = {}
    for dtype in (torch.float64, torch.float32):
        model = make_peft(base(dtype)).to(dtype)
        out[dtype] = grads_of(model, dtype)
    loss64, g64 = out[torch.float64]
    loss32, g32 = out[torch.float32]
    errs = {
        k: ((g32[k].double() - g64[k]).abs().max() / g64[k].abs().max()).item() for k in g64
    }
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in sorted(g64.items())}, os.path.join(d, "grads.safetensors"))
    meta = {
        "loss": loss64,
        "loss_hf_f32": loss32,
        "n_targets": sum(1 for row in LABELS for y in row[1:] if y != -100),
        "hf_f32_vs_f64_rel_grad_err": errs,
        "max_abs_grad": {k: v.abs().max().item() for k, v in g64.items()},
    }
    with open(os.path.join(d, "grad_meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    print(name, "loss", loss64, "f32", loss32, "max rel f32 err", max(errs.values()))


def main():
    os.makedirs(OUT, exist_ok=True)
    save_file(
        {"input_ids": torch.tensor(INPUT_IDS), "labels": torch.tensor(LABELS)},
        os.path.join(OUT, "batch.safetensors"),
    )

    run_case(
        "c_attn",
        lambda m: PeftModel.from_pretrained(m, os.path.join(FIX, "lora-r4-c_attn"), is_trainable=True),
    )

    all_dir = os.path.join(OUT, "all", "adapter")

    # The fresh adapter is made once (f32, as PEFT saves it); both dtypes then load that file.
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"],
                     lora_dropout=0.0, fan_in_fan_out=True, task_type="CAUSAL_LM")
    pm = get_peft_model(base(torch.float32), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(all_dir)
    os.remove(os.path.join(all_dir, "README.md"))
    cfgp = os.path.join(all_dir, "adapter_config.json")
    c = json.load(open(cfgp))
    c["base_model_name_or_path"] = "tiny-gpt2"
    with open(cfgp, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)

    run_case("all", lambda m: PeftModel.from_pretrained(m, all_dir, is_trainable=True))


if __name__ == "__main__":
    sys.exit(main())
