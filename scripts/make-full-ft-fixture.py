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
Then a short full fine-tuning run from the same model on the same batch: AdamW (lr 1e-3,
betas 0.9/0.999, eps 1e-8, weight decay 0.01 on matrices and embeddings, 0 on norms, as HF's
Trainer groups them), 3 steps; meta.json gets the loss before each step (`trajectory_losses`),
grads.safetensors the weights after the last step of a few tensors (`after3.NAME`).

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
    # The short full fine-tuning trajectory.
    model.zero_grad()
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    plain = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
    )
    losses = []
    for _ in range(3):
        opt.zero_grad()
        logits = model(input_ids=ids).logits
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        step_loss = nll[mask].sum() / mask.sum()
        losses.append(step_loss.item())
        step_loss.backward()
        opt.step()
    meta["trajectory_losses"] = losses
    params = dict(model.named_parameters())
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.1.input_layernorm.weight", "model.norm.weight"]:
        out["after3." + name] = params[name].detach().float().contiguous()
    out["after3.lm_head.weight.strided64"] = params["lm_head.weight"].detach()[::64].float().contiguous()

    OUT.mkdir(parents=True, exist_ok=True)
    save_file(out, OUT / "grads.safetensors")
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"loss {loss.item():.12f}, {len(out)} tensors -> {OUT}")


if __name__ == "__main__":
    main()
