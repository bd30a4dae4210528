#!/usr/bin/env python3
"""Reference outputs of tiny random decoder models of nine architectures (tests/data/arch/).

Run from the repository root with the benchmark venv (bench/requirements.txt: torch 2.15.0,
transformers 5.24.0, peft 0.21.2, safetensors 0.8.0, gguf 0.19.0, numpy 2.4.6):

    bench/.venv/bin/python scripts/make-arch-fixtures.py [FAMILY ...]

Families: llama, llama3, qwen2, mistral, qwen3, gemma3_text, phi3, olmo2, gpt2 (default: all).
For each one it builds a random model with the transformers config class (vocab 256, hidden 64,
2-3 layers), initialises the weights with a fixed seed so that the logits are far from uniform,
and writes tests/data/arch/<family>/:

  config.json, generation_config.json, model.safetensors   save_pretrained (float32)
  batch.safetensors        input_ids, labels int64 [2, 20] (labels -100 on the prompt)
  logits_base.safetensors  logits (HF in float64, stored f32), logits_f32 (HF in float32) [2, 20, 256]
  lora/                    PEFT adapter (r=4, alpha=8, every Linear of the blocks, A, B ~ N(0, 0.1^2))
  logits_lora.safetensors  unmerged (PEFT, f64) and merged (merge_and_unload, f64), stored f32
  grads_lora.safetensors   d loss / d lora_A, lora_B in f64 (adapter key names), stored f32
  grads_full.safetensors   d loss / d every base parameter in f64 (HF names), stored f32
  model.f32.gguf           the same weights, names, row orders and metadata keys as llama.cpp's
                           convert_hf_to_gguf.py writes them (F32), with a 256-token byte vocabulary
  meta.json                config, init rule, seeds, batch, versions, losses, every check

"float64" means the HF modules with their internal float32 casts removed (RMSNorm, RoPE cos/sin,
attention softmax); a TorchFunctionMode asserts that no float32 tensor appears in those runs.
An independent float64 re-implementation (`ref_forward`, plain torch, reads only the written
files) must reproduce the HF logits, the LoRA gradients and the full gradients to ~1e-12; that
checks the math described in tests/data/arch/README.md. Loss: logits[:, t] predicts
labels[:, t+1], one token-level mean over the targets whose label is not -100.
Each GGUF file is read back (every tensor bit-exact), run through ref_forward after undoing the
converter's transforms (llama architecture: with adjacent-pair RoPE on the permuted q/k rows, as
llama.cpp computes), and loaded with transformers' GGUF loader where it supports the architecture.

Deterministic: fixed seeds and one CPU thread; a second run writes byte-identical files (the
f32 logits depend on the CPU's kernels, so compare on the same machine).
"""

import contextlib
import copy
import importlib.metadata
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import gguf
import peft
import safetensors
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.olmo2 import modeling_olmo2
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

torch.set_num_threads(1)
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/data/arch"
SCRIPT = "scripts/make-arch-fixtures.py"

V = 256  # vocabulary
T = 20  # sequence length, longer than every sliding window (mistral 6, gemma3 5)
BATCH_SEED = 20
R, ALPHA = 4, 8  # LoRA rank and alpha: scaling 2
LORA_STD = 0.1

LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
COMMON = dict(vocab_size=V, hidden_size=64, pad_token_id=None, bos_token_id=1, eos_token_id=2)

# name -> HF classes, config keyword arguments, LoRA targets, seed, GGUF architecture.
FAMILIES = {
    "llama": dict(
        cls=LlamaForCausalLM, cfg=LlamaConfig, seed=101, gguf_arch="llama",
        kw=dict(COMMON, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                tie_word_embeddings=False),
        targets=LLAMA_TARGETS),
    "llama3": dict(
        cls=LlamaForCausalLM, cfg=LlamaConfig, seed=102, gguf_arch="llama",
        kw=dict(COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=1, head_dim=12, max_position_embeddings=128, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64},
                tie_word_embeddings=True),
        targets=LLAMA_TARGETS),
    "qwen2": dict(
        cls=Qwen2ForCausalLM, cfg=Qwen2Config, seed=103, gguf_arch="qwen2",
        kw=dict(COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                use_sliding_window=False, tie_word_embeddings=True),
        targets=LLAMA_TARGETS),
    "mistral": dict(
        cls=MistralForCausalLM, cfg=MistralConfig, seed=104, gguf_arch="llama",
        kw=dict(COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                sliding_window=6, tie_word_embeddings=False),
        targets=LLAMA_TARGETS),
    "qwen3": dict(
        cls=Qwen3ForCausalLM, cfg=Qwen3Config, seed=105, gguf_arch="qwen3",
        kw=dict(COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                use_sliding_window=False, attention_bias=False, tie_word_embeddings=True),
        targets=LLAMA_TARGETS),
    "gemma3_text": dict(
        cls=Gemma3ForCausalLM, cfg=Gemma3TextConfig, seed=106, gguf_arch="gemma3",
        kw=dict(COMMON, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=1, head_dim=12, query_pre_attn_scalar=20,
                max_position_embeddings=64, rms_norm_eps=1e-6, sliding_window=5,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                final_logit_softcapping=10.0, attn_logit_softcapping=None,
                hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
        targets=LLAMA_TARGETS),
    "phi3": dict(
        cls=Phi3ForCausalLM, cfg=Phi3Config, seed=107, gguf_arch="phi3",
        kw=dict(COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64,
                original_max_position_embeddings=64, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                tie_word_embeddings=False),
        targets=["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    "olmo2": dict(
        cls=Olmo2ForCausalLM, cfg=Olmo2Config, seed=108, gguf_arch="olmo2",
        kw=dict(COMMON, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                tie_word_embeddings=False),
        targets=LLAMA_TARGETS),
    "gpt2": dict(
        cls=GPT2LMHeadModel, cfg=GPT2Config, seed=109, gguf_arch="gpt2",
        kw=dict(vocab_size=V, n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=None,
                activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None),
        targets=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True),
}

INIT_RULE = {
    "norm weight (RMSNorm, LayerNorm)": "U(0.5, 1.5); Gemma3RMSNorm (output * (1 + w)): w ~ U(-0.5, 0.5)",
    "norm bias (GPT-2 LayerNorm)": "N(0, 0.1^2)",
    "token embedding": "N(0, 1) if the head is untied, N(0, 0.35^2) if it is tied",
    "GPT-2 position embedding (wpe)": "N(0, 0.35^2)",
    "untied lm_head": "N(0, 0.3^2)",
    "other weight matrices": "N(0, 1/fan_in) (nn.Linear [out, in]: fan_in = in; GPT-2 Conv1D [in, out]: fan_in = in)",
    "biases": "N(0, 0.1^2)",
    "order": "torch.Generator().manual_seed(seed), parameters drawn in sorted(name) order, float32",
    "lora": "A, B ~ N(0, 0.1^2): torch.Generator().manual_seed(seed + 1000), lora parameters in sorted(name) order",
}


# ----------------------------------------------------------------------------------------------
# Batch and loss


def make_batch():
    g = torch.Generator().manual_seed(BATCH_SEED)
    ids = torch.randint(0, V, (2, T), generator=g)
    ids[0, 0] = 0  # both ends of the vocabulary
    ids[1, T - 1] = V - 1
    ids[1, 10] = ids[1, 3]  # a repeated token (embedding gradient rows accumulate)
    labels = ids.clone()
    labels[0, :4] = -100  # row 0: prompt of 4, last label masked as well
    labels[0, T - 1] = -100
    labels[1, :7] = -100  # row 1: prompt of 7
    return ids, labels


def loss_of(logits, labels):
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    nll = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll[mask].sum() / mask.sum()


# ----------------------------------------------------------------------------------------------
# Float64 without the float32 casts inside the HF modules


def rope_inv_freq(rp, head_dim):
    """inv_freq in float64 for a rope parameter dict (HF modeling_rope_utils formulas)."""
    theta = float(rp["rope_theta"])
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    kind = rp.get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wl >= high_wl) & (wl <= low_wl)
        return torch.where(medium, smoothed, out)
    raise ValueError(kind)


def _head_dim(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


INV_FREQ_CHECK = {}  # max relative difference of the f64 inv_freq to HF's f32 buffer


def _rope_f64(self, x, position_ids, layer_type=None):
    if layer_type is None:
        rp, hf_inv, scale = self.config.rope_parameters, self.inv_freq, self.attention_scaling
    else:
        rp = self.config.rope_parameters[layer_type]
        hf_inv = getattr(self, f"{layer_type}_inv_freq")
        scale = getattr(self, f"{layer_type}_attention_scaling")
    assert scale == 1.0
    inv = rope_inv_freq(rp, _head_dim(self.config))
    rel = float(((inv - hf_inv.double()).abs() / inv).max())
    key = (type(self).__name__, layer_type)
    INV_FREQ_CHECK[key] = max(INV_FREQ_CHECK.get(key, 0.0), rel)
    assert rel < 1e-6, (key, rel)
    freqs = position_ids[..., None].to(torch.float64) * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rms_f64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _gemma_rms_f64(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


_softmax = F.softmax


def _softmax_f64(input, dim=None, _stacklevel=3, dtype=None):
    if input.dtype == torch.float64 and dtype == torch.float32:
        dtype = torch.float64
    return _softmax(input, dim=dim, dtype=dtype)


PATCHES = [(getattr(m, f"{p}RMSNorm"), "forward", _rms_f64) for m, p in [
    (modeling_llama, "Llama"), (modeling_mistral, "Mistral"), (modeling_qwen2, "Qwen2"),
    (modeling_qwen3, "Qwen3"), (modeling_phi3, "Phi3"), (modeling_olmo2, "Olmo2")]]
PATCHES += [(getattr(m, f"{p}RotaryEmbedding"), "forward", _rope_f64) for m, p in [
    (modeling_llama, "Llama"), (modeling_mistral, "Mistral"), (modeling_qwen2, "Qwen2"),
    (modeling_qwen3, "Qwen3"), (modeling_phi3, "Phi3"), (modeling_olmo2, "Olmo2"),
    (modeling_gemma3, "Gemma3")]]
PATCHES += [(modeling_gemma3.Gemma3RMSNorm, "forward", _gemma_rms_f64), (F, "softmax", _softmax_f64)]


class _NoLowPrecision(TorchFunctionMode):
    """Records every torch function that returns a floating tensor that is not float64."""

    def __init__(self):
        super().__init__()
        self.bad = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        stack = [out]
        while stack:
            o = stack.pop()
            if isinstance(o, (tuple, list)):
                stack.extend(o)
            elif isinstance(o, torch.Tensor) and o.is_floating_point() and o.dtype != torch.float64:
                self.bad.add(getattr(func, "__name__", str(func)))
        return out


@contextlib.contextmanager
def exact_f64():
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in PATCHES]
    for obj, attr, fn in PATCHES:
        setattr(obj, attr, fn)
    mode = _NoLowPrecision()
    try:
        with mode:
            yield
    finally:
        for obj, attr, fn in saved:
            setattr(obj, attr, fn)
    assert not mode.bad, f"float32 tensors inside the float64 run: {sorted(mode.bad)}"


# ----------------------------------------------------------------------------------------------
# Models


def init_weights(model, seed, tied):
    g = torch.Generator().manual_seed(seed)
    kind = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            kind[f"{mname}.{pname}" if mname else pname] = type(mod).__name__
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            k = kind[name]
            if "Norm" in k:
                if name.endswith("bias"):
                    v = torch.randn(p.shape, generator=g) * 0.1
                elif k == "Gemma3RMSNorm":
                    v = torch.rand(p.shape, generator=g) - 0.5
                else:
                    v = torch.rand(p.shape, generator=g) + 0.5
            elif p is emb:
                v = torch.randn(p.shape, generator=g) * (0.35 if tied else 1.0)
            elif name.endswith("wpe.weight"):
                v = torch.randn(p.shape, generator=g) * 0.35
            elif name == "lm_head.weight":
                v = torch.randn(p.shape, generator=g) * 0.3
            elif p.ndim == 2:
                fan_in = p.shape[0] if k == "Conv1D" else p.shape[1]
                v = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
            else:
                assert name.endswith("bias"), name
                v = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(v)


def load_base(fam, d, dtype):
    m = fam["cls"].from_pretrained(d, dtype=dtype, attn_implementation="eager")
    m.eval()
    for p in m.parameters():
        assert p.dtype == dtype
    if m.config.tie_word_embeddings:
        assert m.lm_head.weight is m.get_input_embeddings().weight
    return m


def load_peft(fam, d, dtype, trainable=False):
    pm = PeftModel.from_pretrained(load_base(fam, d, dtype), d / "lora", is_trainable=trainable)
    for n, p in pm.named_parameters():
        assert p.dtype == dtype, (n, p.dtype)
    return pm


def logits_of(model, ids, f64):
    with torch.no_grad(), (exact_f64() if f64 else contextlib.nullcontext()):
        return model(input_ids=ids).logits


def grads_of(model, ids, labels, f64, strip=None):
    model.train()
    model.zero_grad()
    with exact_f64() if f64 else contextlib.nullcontext():
        loss = loss_of(model(input_ids=ids).logits, labels)
        loss.backward()
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n.replace(strip, "") if strip else n] = p.grad.detach().clone()
    return loss.item(), out


def rel_errs(g32, g64):
    return {k: float((g32[k].double() - g64[k]).abs().max() / g64[k].abs().max()) for k in sorted(g64)}


def max_abs(a, b):
    return float((a.double() - b.double()).abs().max())


def top2gap(logits):
    top = logits.double().topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def f32(d):
    return {k: v.float().contiguous() for k, v in sorted(d.items())}


# ----------------------------------------------------------------------------------------------
# Independent float64 re-implementation (reads only config.json, model.safetensors, lora/)


def _rms(x, w, eps, gemma=False):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * (1.0 + w) if gemma else y * w


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _rotate(x, inv, pos):
    """RoPE, rotate_half layout: pairs (i, i + d/2), angle pos * inv[i]."""
    ang = pos[:, None].double() * inv[None, :]
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), -1)
    return x * cos + rot * sin


def _rotate_interleaved(x, inv, pos):
    """RoPE on adjacent pairs (2i, 2i + 1) (llama.cpp's LLAMA_ROPE_TYPE_NORM), angle pos * inv[i]."""
    ang = pos[:, None].double() * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


def _attend(q, k, v, scale, window):
    """q [B, H, T, D], k, v [B, KV, T, D]; causal (and sliding-window) softmax attention."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # query head h uses KV head h // n_rep
    v = v.repeat_interleave(n_rep, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    t = torch.arange(q.shape[2])
    allowed = t[None, :] <= t[:, None]
    if window is not None:
        allowed &= t[None, :] > t[:, None] - window
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def ref_forward(family, cfg, W, ids, lora=None, lora_scale=0.0, rope_interleaved=False):
    """Logits [B, T, V] in float64. W: f64 tensors by HF name (a tied head reads the embedding).
    lora: {module path: (A [r, in], B [out, r])}; y = W x + b + s * B (A x).
    rope_interleaved: rotate adjacent pairs, for q/k weights in GGUF (llama-permuted) row order."""
    B_, T_ = ids.shape
    pos = torch.arange(T_)

    def lin(x, path):
        y = x @ W[path + ".weight"].T
        if path + ".bias" in W:
            y = y + W[path + ".bias"]
        if lora and path in lora:
            a, b = lora[path]
            y = y + lora_scale * (x @ a.T) @ b.T
        return y

    if family == "gpt2":
        def conv1d(x, path):  # GPT-2 Conv1D: weight [in, out]
            y = x @ W[path + ".weight"] + W[path + ".bias"]
            if lora and path in lora:
                a, b = lora[path]
                y = y + lora_scale * (x @ a.T) @ b.T
            return y

        H, nh, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
        hd = H // nh
        x = W["transformer.wte.weight"][ids] + W["transformer.wpe.weight"][pos]
        for i in range(cfg["n_layer"]):
            p = f"transformer.h.{i}."
            h = _layer_norm(x, W[p + "ln_1.weight"], W[p + "ln_1.bias"], eps)
            q, k, v = conv1d(h, p + "attn.c_attn").split(H, dim=-1)
            q, k, v = (t.view(B_, T_, nh, hd).transpose(1, 2) for t in (q, k, v))
            a = _attend(q, k, v, hd ** -0.5, None).transpose(1, 2).reshape(B_, T_, H)
            x = x + conv1d(a, p + "attn.c_proj")
            h = _layer_norm(x, W[p + "ln_2.weight"], W[p + "ln_2.bias"], eps)
            x = x + conv1d(_gelu_tanh(conv1d(h, p + "mlp.c_fc")), p + "mlp.c_proj")
        x = _layer_norm(x, W["transformer.ln_f.weight"], W["transformer.ln_f.bias"], eps)
        return x @ W["transformer.wte.weight"].T

    gemma, olmo2, phi3 = family == "gemma3_text", family == "olmo2", family == "phi3"
    H, nh, nkv, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    hd = cfg.get("head_dim") or H // nh
    L = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types") or ["full_attention"] * L
    assert not cfg.get("use_sliding_window", False)

    def norm(x, name):
        return _rms(x, W[name], eps, gemma)

    x = W["model.embed_tokens.weight"][ids]
    if gemma:
        x = x * math.sqrt(H)
    for i in range(L):
        p = f"model.layers.{i}."
        if gemma:
            rp = cfg["rope_parameters"][layer_types[i]]
            window = cfg["sliding_window"] if layer_types[i] == "sliding_attention" else None
            scale = cfg["query_pre_attn_scalar"] ** -0.5
        else:
            rp = cfg["rope_parameters"]
            window = cfg.get("sliding_window") if family == "mistral" else None
            scale = hd ** -0.5
        inv = rope_inv_freq(rp, hd)
        h = x if olmo2 else norm(x, p + "input_layernorm.weight")
        if phi3:
            q, k, v = lin(h, p + "self_attn.qkv_proj").split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        else:
            q, k, v = (lin(h, p + f"self_attn.{n}_proj") for n in "qkv")
        if olmo2:  # over the whole projection, before the head split
            q = _rms(q, W[p + "self_attn.q_norm.weight"], eps)
            k = _rms(k, W[p + "self_attn.k_norm.weight"], eps)
        q = q.view(B_, T_, nh, hd).transpose(1, 2)
        k = k.view(B_, T_, nkv, hd).transpose(1, 2)
        v = v.view(B_, T_, nkv, hd).transpose(1, 2)
        if family in ("qwen3", "gemma3_text"):  # per head, over head_dim
            q = norm(q, p + "self_attn.q_norm.weight")
            k = norm(k, p + "self_attn.k_norm.weight")
        rotate = _rotate_interleaved if rope_interleaved else _rotate
        q, k = rotate(q, inv, pos), rotate(k, inv, pos)
        a = _attend(q, k, v, scale, window).transpose(1, 2).reshape(B_, T_, nh * hd)
        a = lin(a, p + "self_attn.o_proj")
        if gemma or olmo2:
            a = norm(a, p + "post_attention_layernorm.weight")
        x = x + a
        if olmo2:
            h = x
        else:
            h = norm(x, p + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight"))
        if phi3:
            gate, up = lin(h, p + "mlp.gate_up_proj").chunk(2, dim=-1)
        else:
            gate, up = lin(h, p + "mlp.gate_proj"), lin(h, p + "mlp.up_proj")
        act = _gelu_tanh(gate) if gemma else F.silu(gate)
        m = lin(act * up, p + "mlp.down_proj")
        if gemma or olmo2:
            m = norm(m, p + "post_feedforward_layernorm.weight")
        x = x + m
    x = norm(x, "model.norm.weight")
    head = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    logits = x @ head.T
    if gemma and cfg.get("final_logit_softcapping"):
        c = cfg["final_logit_softcapping"]
        logits = torch.tanh(logits / c) * c
    return logits


def read_files(d):
    cfg = json.loads((d / "config.json").read_text())
    W = {k: v.double() for k, v in load_file(d / "model.safetensors").items()}
    acfg = json.loads((d / "lora/adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / (math.sqrt(acfg["r"]) if acfg.get("use_rslora") else acfg["r"])
    raw = load_file(d / "lora/adapter_model.safetensors")
    lora = {}
    for k in raw:
        if k.endswith(".lora_A.weight"):
            path = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora[path] = (raw[k].double(), raw[k.replace(".lora_A.", ".lora_B.")].double())
    assert 2 * len(lora) == len(raw)
    return cfg, W, lora, scale, raw


def ref_grads(family, cfg, W, ids, labels, lora=None, scale=0.0):
    """Full gradients (lora None) or LoRA gradients, by autograd through ref_forward."""
    if lora is None:
        Wg = {k: v.clone().requires_grad_(True) for k, v in W.items()}
        loss = loss_of(ref_forward(family, cfg, Wg, ids), labels)
        loss.backward()
        return loss.item(), {k: v.grad for k, v in Wg.items()}
    lg = {p: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for p, (a, b) in lora.items()}
    loss = loss_of(ref_forward(family, cfg, W, ids, lg, scale), labels)
    loss.backward()
    out = {}
    for p, (a, b) in lg.items():
        out[f"base_model.model.{p}.lora_A.weight"] = a.grad
        out[f"base_model.model.{p}.lora_B.weight"] = b.grad
    return loss.item(), out


# Sensitivity probes: how far the logits move when one feature is dropped (config edits for
# ref_forward). They show that a test at atol 1e-4 notices each feature.
PROBES = {
    "llama": {"rope_theta 1e4 -> 1e5": lambda c: c["rope_parameters"].update(rope_theta=1e5)},
    "llama3": {"no llama3 rope scaling": lambda c: c["rope_parameters"].update(rope_type="default")},
    "mistral": {"no sliding window": lambda c: c.update(sliding_window=None)},
    "gemma3_text": {
        "no final softcap": lambda c: c.update(final_logit_softcapping=None),
        "no sliding window": lambda c: c.update(sliding_window=None),
        "local rope_theta = global": lambda c: c["rope_parameters"]["sliding_attention"].update(rope_theta=1e6),
        "scale 1/sqrt(head_dim)": lambda c: c.update(query_pre_attn_scalar=c["head_dim"]),
    },
}



# ----------------------------------------------------------------------------------------------
# GGUF, laid out as llama.cpp's convert_hf_to_gguf.py (conversion/*.py) writes these architectures

GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
             "gemma3": gguf.MODEL_ARCH.GEMMA3, "phi3": gguf.MODEL_ARCH.PHI3, "olmo2": gguf.MODEL_ARCH.OLMO2,
             "gpt2": gguf.MODEL_ARCH.GPT2}
GPT2_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")

# Where this file differs from what the converter would write, or what a GGUF consumer loses.
GGUF_NOTES = {
    "llama3": ["rope_freqs.weight uses rope_parameters.original_max_position_embeddings (64); the converter "
               "reads a top-level original_max_position_embeddings, absent from a transformers 5 config.json, "
               "and would fall back to 8192"],
    "mistral": ["MistralForCausalLM converts to the llama architecture without a sliding-window key: "
                "a GGUF consumer runs full causal attention, which is not this model"],
    "gemma3_text": ["GGUF has no query_pre_attn_scalar and no layer_types: llama.cpp uses 1/sqrt(head_dim) "
                    "(27B: 1/sqrt(n_embd/n_head)) and every 6th layer full (here: all three sliding)",
                    "norm weights are stored as f32(w + 1), used as is by llama.cpp"],
    "phi3": ["rope.scaling.original_context_length from the top-level original_max_position_embeddings "
             "(the converter reads rope_parameters, which has no such key for default RoPE)"],
    "gpt2": ["context_length from n_positions (the converter reads n_ctx, absent from the 5.24 config.json)"],
}

# Config keys that transformers 5.24's GGUF loader does not take from these files (it has no
# mapping for them, or takes a default that does not fit a 256-token vocabulary).
GGUF_HF_OVERRIDES = {
    "llama3": {"rope_parameters": FAMILIES["llama3"]["kw"]["rope_parameters"]},
    "qwen3": {"head_dim": 12},
    "gemma3_text": {"query_pre_attn_scalar": 20, "final_logit_softcapping": 10.0, "pad_token_id": None,
                    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
    "phi3": {"pad_token_id": None},
    "gpt2": {"n_positions": 32},
}
GGUF_HF_WHY = {
    "llama3": "the loader ignores rope_freqs.weight and maps no llama3 rope keys: default RoPE",
    "qwen3": "no attention.key_length mapping for qwen3: head_dim defaults to 128 (q_proj size mismatch)",
    "gemma3_text": "query_pre_attn_scalar defaults to 256, layer_types to the every-6th-full pattern "
                   "(all three layers sliding), final_logit_softcapping is not mapped; pad_token_id defaults to 0",
    "phi3": "pad_token_id defaults to 32000, outside the 256-token vocabulary",
    "gpt2": "context_length is mapped to n_ctx, so n_positions stays 1024 (wpe size mismatch)",
}


def llama_permute(w, n_head):
    """LlamaModel.permute: rows of each head reordered from (half, i) to (i, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(c):
    """LlamaModel.generate_extra_tensors: rope_freqs.weight, llama.cpp divides inv_freq by it."""
    rp = c["rope_parameters"]
    dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    freqs = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]  # see the README: the converter reads a top-level key
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < old / hi:
            out.append(1.0)
        elif wl > old / lo:
            out.append(factor)
        else:
            smooth = (old / wl - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_metadata(w, arch, c):
    """The keys set_gguf_parameters() of the converter's model class writes (ALL_F32 file type)."""
    if arch == "gpt2":  # GPT2Model.set_gguf_parameters (no TextModel defaults)
        w.add_block_count(c["n_layer"])
        w.add_context_length(c.get("n_ctx", c["n_positions"]))  # 5.24 config.json has no n_ctx
        w.add_embedding_length(c["n_embd"])
        w.add_feed_forward_length(4 * c["n_embd"])
        w.add_head_count(c["n_head"])
        w.add_layer_norm_eps(c["layer_norm_epsilon"])
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        return
    nh, H = c["num_attention_heads"], c["hidden_size"]
    if arch == "phi3":  # Phi3MiniModel.set_gguf_parameters
        rp = c["rope_parameters"]
        w.add_context_length(c["max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(rp.get("original_max_position_embeddings", c["original_max_position_embeddings"]))
        w.add_embedding_length(H)
        w.add_feed_forward_length(c["intermediate_size"])
        w.add_block_count(c["num_hidden_layers"])
        w.add_head_count(nh)
        w.add_head_count_kv(c["num_key_value_heads"])
        w.add_layer_norm_rms_eps(c["rms_norm_eps"])
        w.add_rope_dimension_count(int(rp.get("partial_rotary_factor", 1.0) * H) // nh)
        w.add_rope_freq_base(rp["rope_theta"])
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_sliding_window(c.get("sliding_window") or 0)
        return
    # TextModel.set_gguf_parameters, then the model class's additions
    rp = c["rope_parameters"]
    full = rp.get("full_attention", rp)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(full["rope_theta"])  # llama3: scaling via rope_freqs.weight, no keys
    if "sliding_attention" in rp:
        w.add_rope_freq_base_swa(rp["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if c.get("head_dim") is not None:
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "llama":  # LlamaModel (also MistralForCausalLM: no sliding-window key)
        w.add_vocab_size(c["vocab_size"])
        w.add_rope_dimension_count(c.get("head_dim") or H // nh)
    if arch == "gemma3":  # Gemma3Model
        assert c.get("attn_logit_softcapping") is None
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(c["final_logit_softcapping"])
        if c.get("sliding_window_pattern") != 1:
            w.add_sliding_window(c["sliding_window"])
    if arch == "olmo2" and "sliding_window" in c:
        w.add_sliding_window(c["sliding_window"])


def gguf_vocab(w, c):
    """No tokenizer exists for these models; a 256-entry byte vocabulary that llama.cpp accepts:
    SentencePiece-style ("llama") with one <0xNN> BYTE token per id, so token id == byte value.
    (gguf-py cannot write the empty merges list a "gpt2" vocabulary without merges would need.)"""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<0x{i:02X}>" for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([gguf.TokenType.BYTE] * V)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if c.get(key) is not None:  # SpecialVocab takes these from config.json
            add(c[key])
    w.add_add_bos_token(False)


def gguf_tensors(name, arch, c, W):
    """(gguf name, f32 tensor, hf name, transform) in the converter's order (extra tensors first)."""
    n_layers = c.get("num_hidden_layers") or c["n_layer"]
    tmap = gguf.get_tensor_name_map(GGUF_ARCH[arch], n_layers)
    out = []
    if arch == "llama" and c["rope_parameters"].get("rope_type") == "llama3":
        out.append(("rope_freqs.weight", llama3_rope_factors(c), None, "llama3 rope factors"))
    for hf in sorted(W):
        t, how = W[hf], "as is"
        if arch == "llama" and hf.endswith("q_proj.weight"):
            t, how = llama_permute(t, c["num_attention_heads"]), "llama permute (n_head)"
        elif arch == "llama" and hf.endswith("k_proj.weight"):
            t, how = llama_permute(t, c["num_key_value_heads"]), "llama permute (n_head_kv)"
        elif arch == "gemma3" and hf.endswith("norm.weight"):
            t, how = t + 1, "+ 1"
        elif arch == "gpt2" and hf.endswith(GPT2_CONV1D):
            t, how = t.transpose(1, 0), "transpose"
        g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert g is not None, hf
        out.append((g, t.float().contiguous(), hf, how))
    return out


def write_gguf(name, d, c):
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3",
            "olmo2": "olmo2", "gpt2": "gpt2"}[FAMILIES[name]["gguf_arch"]]
    W = load_file(d / "model.safetensors")
    tensors = gguf_tensors(name, arch, c, W)
    w = gguf.GGUFWriter(d / "model.f32.gguf", gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]])
    w.add_type("model")
    w.add_name(f"lorakit tiny {name}")
    gguf_metadata(w, arch, c)
    gguf_vocab(w, c)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for g, t, _, _ in tensors:
        w.add_tensor(g, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arch, tensors


def read_gguf(path):
    r = gguf.GGUFReader(path)
    meta = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):  # the reader's header pseudo-fields
            continue
        if f.name.startswith("tokenizer.ggml.") and f.name.endswith(("tokens", "scores", "token_type")):
            meta[f.name] = f"[{len(f.data)} entries]"
        else:
            v = f.contents()
            meta[f.name] = float(np.float32(v)) if isinstance(v, float) else v
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in r.tensors}
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
    return meta, tensors


def check_gguf(name, d, ids, base64, rcfg, W64):
    arch, written = write_gguf(name, d, rcfg)
    meta, G = read_gguf(d / "model.f32.gguf")
    assert meta["general.architecture"] == arch
    info = {"architecture": arch, "metadata": meta, "tensors": {}, "checks": {},
            "notes": GGUF_NOTES.get(name, [])}
    # 1. every tensor round-trips bit-exactly through the file; the inverse transform gives the HF tensor
    W_back = {}
    for g, t, hf, how in written:
        assert torch.equal(G[g].reshape(t.shape), t), g
        info["tensors"][g] = {"from": hf, "transform": how, "shape_torch_order": list(t.shape)}
        if hf is None:
            continue
        x = G[g].reshape(t.shape).double()
        if how.startswith("llama permute"):
            n = rcfg["num_attention_heads"] if "(n_head)" in how else rcfg["num_key_value_heads"]
            assert torch.equal(llama_unpermute(G[g].reshape(t.shape), n), W64[hf].float())
            W_back[hf] = x  # kept in GGUF row order, for the interleaved-rope check
        elif how == "+ 1":
            W_back[hf] = x - 1
        elif how == "transpose":
            W_back[hf] = x.transpose(0, 1)
        else:
            W_back[hf] = x
    assert sorted(W_back) == sorted(W64)
    if arch == "llama" and "rope_freqs.weight" in G:
        c3 = copy.deepcopy(rcfg)
        c3["rope_parameters"]["rope_type"] = "default"
        inv_gguf = rope_inv_freq(c3["rope_parameters"], rcfg["head_dim"]) / G["rope_freqs.weight"].double()
        inv_hf = rope_inv_freq(rcfg["rope_parameters"], rcfg["head_dim"])
        info["checks"]["rope_freqs_vs_hf_llama3_inv_freq_max_rel"] = float(((inv_gguf - inv_hf) / inv_hf).abs().max())
        assert info["checks"]["rope_freqs_vs_hf_llama3_inv_freq_max_rel"] < 1e-6
    if arch == "gemma3":
        info["checks"]["gemma_norm_minus_1_vs_hf_max_abs"] = max(
            max_abs(W_back[k], W64[k]) for k in W64 if k.endswith("norm.weight"))
    # 2. the GGUF weights (inverse-transformed) through ref_forward: llama arch with adjacent-pair
    #    RoPE on the permuted q/k rows, as llama.cpp runs it; the others with rotate_half (NEOX)
    with torch.no_grad():
        lg = ref_forward(name, rcfg, W_back, ids, rope_interleaved=(arch == "llama"))
    info["checks"]["ref_on_gguf_weights_vs_hf_f64_max_abs"] = max_abs(lg, base64)
    assert info["checks"]["ref_on_gguf_weights_vs_hf_f64_max_abs"] < (1e-6 if arch == "gemma3" else 1e-12)
    # 3. transformers' own GGUF loader (it fills the config from the GGUF keys): as is, then with the
    #    config keys it cannot read from these files given explicitly (GGUF_HF_OVERRIDES)
    def hf_load(**overrides):
        try:
            m = AutoModelForCausalLM.from_pretrained(d, gguf_file="model.f32.gguf", dtype=torch.float64,
                                                     attn_implementation="eager", **overrides)
            m.eval()
            diff = max_abs(logits_of(m, ids, True), base64)
            # gemma3: transformers subtracts 1 from the f32 (w + 1) norms, which loses up to 6e-8
            return {"loaded_as": type(m).__name__, "max_abs_vs_hf_f64": diff,
                    "equal": diff < (2e-6 if arch == "gemma3" else 1e-9)}
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}

    info["transformers_load"] = hf_load()
    if name in GGUF_HF_OVERRIDES:
        ov = GGUF_HF_OVERRIDES[name]
        info["transformers_load_with_overrides"] = dict(hf_load(**ov), overrides=ov, why=GGUF_HF_WHY[name])
    if name == "mistral":  # read as llama: no sliding window
        c2 = copy.deepcopy(rcfg)
        c2["sliding_window"] = None
        with torch.no_grad():
            nowin = ref_forward(name, c2, W64, ids)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file="model.f32.gguf", dtype=torch.float64,
                                                 attn_implementation="eager")
        info["transformers_load"]["max_abs_vs_hf_f64_without_sliding_window"] = max_abs(logits_of(m, ids, True), nowin)
    return info


# ----------------------------------------------------------------------------------------------
# One family


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def run_family(name, ids, labels):
    fam = FAMILIES[name]
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    checks = {}
    INV_FREQ_CHECK.clear()

    # --- model
    cfg = fam["cfg"](**fam["kw"])
    torch.manual_seed(0)
    model = fam["cls"](cfg)
    model.set_attn_implementation("eager")
    init_weights(model, fam["seed"], cfg.tie_word_embeddings)
    model.eval()
    model.save_pretrained(d)
    with torch.no_grad():
        mem32 = model(input_ids=ids).logits
    save_file({"input_ids": ids, "labels": labels}, d / "batch.safetensors")

    # --- base logits, from the written files
    m64, m32 = load_base(fam, d, torch.float64), load_base(fam, d, torch.float32)
    base64, base32 = logits_of(m64, ids, True), logits_of(m32, ids, False)
    checks["reload_vs_in_memory_f32_max_abs"] = max_abs(mem32, base32)
    assert checks["reload_vs_in_memory_f32_max_abs"] == 0.0
    save_file(f32({"logits": base64, "logits_f32": base32}), d / "logits_base.safetensors")

    # --- adapter: made once in f32 (as PEFT stores it); every run loads the written file
    lcfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=fam["targets"], lora_dropout=0.0,
                      fan_in_fan_out=fam.get("fan_in_fan_out", False), bias="none",
                      task_type="CAUSAL_LM")
    pm = get_peft_model(load_base(fam, d, torch.float32), lcfg)
    g = torch.Generator().manual_seed(fam["seed"] + 1000)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_STD)
    pm.eval()
    with torch.no_grad():
        mem_lora32 = pm(input_ids=ids).logits
    pm.save_pretrained(d / "lora")
    (d / "lora/README.md").unlink()
    acfg_path = d / "lora/adapter_config.json"
    acfg = json.loads(acfg_path.read_text())
    acfg["base_model_name_or_path"] = f"tests/data/arch/{name}"
    acfg["target_modules"] = sorted(acfg["target_modules"])
    acfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")

    # --- LoRA logits: unmerged and merged (f64), plus f32 for the noise floor
    unmerged = logits_of(load_peft(fam, d, torch.float64), ids, True)
    merged_model = load_peft(fam, d, torch.float64).merge_and_unload()
    merged = logits_of(merged_model, ids, True)
    unmerged32 = logits_of(load_peft(fam, d, torch.float32), ids, False)
    checks["lora_reload_vs_in_memory_f32_max_abs"] = max_abs(mem_lora32, unmerged32)
    assert checks["lora_reload_vs_in_memory_f32_max_abs"] == 0.0
    save_file(f32({"unmerged": unmerged, "merged": merged}), d / "logits_lora.safetensors")

    # --- LoRA gradients
    loss_l64, gl64 = grads_of(load_peft(fam, d, torch.float64, True), ids, labels, True, ".default")
    loss_l32, gl32 = grads_of(load_peft(fam, d, torch.float32, True), ids, labels, False, ".default")
    adapter_keys = sorted(load_file(d / "lora/adapter_model.safetensors"))
    assert sorted(gl64) == adapter_keys, (sorted(gl64)[:3], adapter_keys[:3])
    for k, v in gl64.items():
        assert v.abs().max() > 0, k
    save_file(f32(gl64), d / "grads_lora.safetensors")

    # --- full fine-tuning gradients
    loss_f64, gf64 = grads_of(load_base(fam, d, torch.float64), ids, labels, True)
    loss_f32, gf32 = grads_of(load_base(fam, d, torch.float32), ids, labels, False)
    save_file(f32(gf64), d / "grads_full.safetensors")
    assert abs(loss_f64 - loss_of(base64, labels).item()) < 1e-12

    # --- checks against the independent f64 implementation, from the written files only
    rcfg, W, lora, scale, _ = read_files(d)
    if rcfg["tie_word_embeddings"]:
        assert "lm_head.weight" not in W
    assert scale == ALPHA / R
    with torch.no_grad():
        ref_base = ref_forward(name, rcfg, W, ids)
        ref_lora = ref_forward(name, rcfg, W, ids, lora, scale)
    rl_loss, rgl = ref_grads(name, rcfg, W, ids, labels, lora, scale)
    rf_loss, rgf = ref_grads(name, rcfg, W, ids, labels)
    assert sorted(rgl) == adapter_keys and sorted(rgf) == sorted(gf64), (sorted(rgf), sorted(gf64))
    checks.update({
        "ref_vs_hf_f64_base_logits_max_abs": max_abs(ref_base, base64),
        "ref_vs_hf_f64_lora_logits_max_abs": max_abs(ref_lora, unmerged),
        "ref_vs_hf_f64_lora_loss_abs": abs(rl_loss - loss_l64),
        "ref_vs_hf_f64_full_loss_abs": abs(rf_loss - loss_f64),
        "ref_vs_hf_f64_lora_grads_max_rel": max(rel_errs(rgl, gl64).values()),
        "ref_vs_hf_f64_full_grads_max_rel": max(rel_errs(rgf, gf64).values()),
        "merged_vs_unmerged_f64_max_abs": max_abs(merged, unmerged),
        "f32_vs_f64_base_logits_max_abs": max_abs(base32, base64),
        "f32_vs_f64_lora_logits_max_abs": max_abs(unmerged32, unmerged),
        "lora_effect_max_abs": max_abs(unmerged, base64),
        "base_loss_f32_vs_f64_abs": abs(loss_f32 - loss_f64),
        "lora_loss_f32_vs_f64_abs": abs(loss_l32 - loss_l64),
    })
    limits = {
        "ref_vs_hf_f64_base_logits_max_abs": 1e-10, "ref_vs_hf_f64_lora_logits_max_abs": 1e-10,
        "ref_vs_hf_f64_lora_loss_abs": 1e-11, "ref_vs_hf_f64_full_loss_abs": 1e-11,
        "ref_vs_hf_f64_lora_grads_max_rel": 1e-9, "ref_vs_hf_f64_full_grads_max_rel": 1e-9,
        "merged_vs_unmerged_f64_max_abs": 1e-10, "f32_vs_f64_base_logits_max_abs": 1e-4,
        "f32_vs_f64_lora_logits_max_abs": 1e-4, "base_loss_f32_vs_f64_abs": 1e-5,
        "lora_loss_f32_vs_f64_abs": 1e-5,
    }
    for k, lim in limits.items():
        assert checks[k] <= lim, (name, k, checks[k], lim)
    assert checks["lora_effect_max_abs"] > 0.5
    gaps = {"base": top2gap(base64), "lora_unmerged": top2gap(unmerged), "lora_merged": top2gap(merged)}
    assert min(gaps.values()) > 1e-3, gaps  # 10x the suggested logit tolerance
    checks["min_top2gap"] = gaps
    checks["rope_inv_freq_f64_vs_hf_f32_max_rel"] = {
        k[0] + (f"/{k[1]}" if k[1] else ""): v for k, v in sorted(INV_FREQ_CHECK.items(), key=str)}
    probes = {}
    for pname, edit in PROBES.get(name, {}).items():
        c2 = copy.deepcopy(rcfg)
        edit(c2)
        with torch.no_grad():
            probes[pname] = max_abs(ref_forward(name, c2, W, ids), ref_base)
        assert probes[pname] > 1e-2, (name, pname, probes[pname])
    if name == "gemma3_text":
        # transformers 5.24's Gemma3Attention never passes attn_logit_softcapping to the attention
        # function: a model with the key set gives the same logits.
        capped = fam["cls"].from_pretrained(d, dtype=torch.float64, attn_implementation="eager",
                                            attn_logit_softcapping=1.0)
        probes["attn_logit_softcapping=1.0 (HF, has no effect)"] = max_abs(logits_of(capped, ids, True), base64)
        assert probes["attn_logit_softcapping=1.0 (HF, has no effect)"] == 0.0

    gguf_info = check_gguf(name, d, ids, base64, rcfg, W)

    n_targets = int((labels[:, 1:] != -100).sum())
    meta = {
        "family": name,
        "hf_class": fam["cls"].__name__,
        "config": rcfg,
        "parameters": sum(p.numel() for p in m32.parameters()),
        "init": INIT_RULE,
        "seeds": {"weights": fam["seed"], "lora": fam["seed"] + 1000, "batch": BATCH_SEED},
        "batch": {"input_ids": ids.tolist(), "labels": labels.tolist(), "n_targets": n_targets},
        "lora": {"r": R, "lora_alpha": ALPHA, "scaling": ALPHA / R, "target_modules": sorted(fam["targets"]),
                 "fan_in_fan_out": fam.get("fan_in_fan_out", False), "init": "A, B ~ N(0, 0.1^2)"},
        "loss": {"base_f64": loss_f64, "base_hf_f32": loss_f32, "lora_f64": loss_l64, "lora_hf_f32": loss_l32},
        "grads_lora": {"hf_f32_vs_f64_rel": rel_errs(gl32, gl64),
                       "max_abs": {k: float(v.abs().max()) for k, v in sorted(gl64.items())}},
        "grads_full": {"hf_f32_vs_f64_rel": rel_errs(gf32, gf64),
                       "max_abs": {k: float(v.abs().max()) for k, v in sorted(gf64.items())}},
        "checks": checks,
        "sensitivity_max_abs_logit_change": probes,
        "gguf": gguf_info,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "safetensors": safetensors.__version__,
                     "numpy": np.__version__, "gguf": importlib.metadata.version("gguf")},
        "script": SCRIPT,
    }
    write_json(d / "meta.json", meta)
    print(f"{name:12s} loss {loss_f64:.6f} lora {loss_l64:.6f} | ref-hf {checks['ref_vs_hf_f64_base_logits_max_abs']:.1e}"
          f" grads {checks['ref_vs_hf_f64_full_grads_max_rel']:.1e} | merged {checks['merged_vs_unmerged_f64_max_abs']:.1e}"
          f" f32 {checks['f32_vs_f64_base_logits_max_abs']:.1e} | gap {min(gaps.values()):.3f}")
    print(f"{'':12s} gguf {gguf_info['checks']} transformers {gguf_info['transformers_load']}"
          f" {gguf_info.get('transformers_load_with_overrides', '')}")


def main(argv):
    names = argv or list(FAMILIES)
    ids, labels = make_batch()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        run_family(name, ids, labels)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
