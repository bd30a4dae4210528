#!/usr/bin/env python3
"""Reference gradients for full fine-tuning (`lorakit train --full`) on the tiny Llama fixture.

Loads tests/fixtures/tiny-llama with transformers in float64 (RMSNorm and RoPE patched to stay in
float64, as the shared fixtures' f64 references do), runs the batch of
tests/fixtures/tiny-llama/lora-a-r4-qv/grad/batch.safetensors, takes the token-level mean
cross-entropy over labels != -100 (logits[:, t] predicts labels[:, t+1]), backpropagates, and
writes tests/data/full-ft/grads.safetensors (f32) and meta.json:
  - every layer weight and norm, and model.norm.weight: the full gradient;
  - model.embed_tokens.weight: the rows of the batch's input ids (`.rows`, ids in `.row_ids`), and
    the gradient's total squared norm in meta.json (every other row is zero);
  - lm_head.weight: every 64th row (`.strided64`) and the rows of the target labels
    (`.target_rows`, ids in `.target_ids`).

Run with the benchmark venv (torch, transformers): bench/.venv/bin/python scripts/make-full-ft-fixture.py
"""
import json
import pathlib

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM
from transformers.models.llama import modeling_llama

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests/fixtures/tiny-llama"
BATCH = MODEL / "lora-a-r4-qv/grad/batch.safetensors"
OUT = ROOT / "tests/data/full-ft"


def rms_forward(self, x):
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def rope_forward(self, x, position_ids):
    inv = self.inv_freq.double()[None, :, None].expand(position_ids.shape[0], -1, 1)
    freqs = (inv @ position_ids[:, None, :].double()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def main():
    modeling_llama.LlamaRMSNorm.forward = rms_forward
    modeling_llama.LlamaRotaryEmbedding.forward = rope_forward
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float64, attn_implementation="eager")
    model.train()
    batch = load_file(BATCH)
    ids, labels = batch["input_ids"], batch["labels"]
    logits = model(input_ids=ids).logits
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    nll = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = nll[mask].sum() / mask.sum()
    loss.backward()

    out = {}
    meta = {"loss": loss.item(), "targets": int(mask.sum()), "script": "scripts/make-full-ft-fixture.py"}
    for name, p in model.named_parameters():
        g = p.grad.detach()
        if name == "model.embed_tokens.weight":
            rows = torch.unique(ids.flatten())
            out[name + ".rows"] = g[rows].float().contiguous()
            out[name + ".row_ids"] = rows.to(torch.int64)
            meta["embed_grad_sq_norm"] = float((g * g).sum())
        elif name == "lm_head.weight":
            out[name + ".strided64"] = g[::64].float().contiguous()
            t = torch.unique(tgt[mask])
            out[name + ".target_rows"] = g[t].float().contiguous()
            out[name + ".target_ids"] = t.to(torch.int64)
        else:
            out[name] = g.float().contiguous()
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(out, OUT / "grads.safetensors")
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"loss {loss.item():.12f}, {len(out)} tensors -> {OUT}")


if __name__ == "__main__":
    main()
