#!/usr/bin/env python3
"""Reference data for Gemma 3 270M (base, Q4_K_M GGUF) from the `gguf` package and transformers.

    scripts/fetch-model.sh gemma3-270m
    bench/.venv/bin/python scripts/make-gemma3-fixture.py [--only blocks|tokenizer|reference ...]

Reads models/gemma-3-270m.Q4_K_M.gguf (sha256 checked) and writes into tests/data/gemma3-270m/:

* `blocks.gguf` + `blocks.expected.safetensors` (`blocks`, needs only gguf + numpy): the first rows
  of one tensor of every type in the file, copied block for block, and their values as
  `gguf.quants.dequantize` computes them (the dequantisation transformers uses for this file).
* `tokenizer_cases.json` (`tokenizer`): `AutoTokenizer.from_pretrained(models, gguf_file=...)` on the
  45 strings of tests/fixtures/tokenizer/tokenizer_cases.json plus Gemma-specific ones (turn markers,
  byte fallback, whitespace runs): ids with and without special tokens, tokens, decode; the special
  tokens, whether BOS is added, the chat template (none in this file), and FNV-1a digests of the
  vocabulary, the merges and the added tokens of transformers' backend tokenizer.
* `reference.json` (`reference`): `AutoModelForCausalLM.from_pretrained(models, gguf_file=...,
  dtype=float32)` (eager attention): for a short prompt and one longer than the sliding window,
  the ids (BOS as the tokenizer adds it), the log-prob of each next token, the argmax and the
  top-1/top-2 logit gap at every position; greedy 32 new tokens for the short prompt; the config
  transformers derived from the GGUF (`model.config.to_dict()`); and checks of how the loader
  mapped the norm weights.

Apart from `load_seconds` (transformers' tokenizer load time) the output is deterministic: torch runs
single-threaded so that reruns give the same floats.
"""

import argparse
import hashlib
import json
import platform
import struct
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "gemma-3-270m.Q4_K_M.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CASES = ROOT / "tests/fixtures/tokenizer/tokenizer_cases.json"

# One tensor per type in the file, and how many rows of it to copy.
BLOCK_TENSORS = [
    ("blk.0.attn_norm.weight", None),  # F32, 1-D: all of it
    ("token_embd.weight", 4),  # Q8_0
    ("blk.0.attn_q.weight", 4),  # Q5_0
    ("blk.0.attn_output.weight", 4),  # Q4_K
    ("blk.0.ffn_down.weight", 4),  # Q6_K
]

# Strings beyond the shared 45 that exercise what is particular to Gemma's vocabulary.
GEMMA_CASES = [
    "<start_of_turn>user\nWrite a haiku about rain.<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after an explicit bos",
    "<eos><pad><mask>[multimodal]<unused0><start_of_image><end_of_image>",
    "a  b   c    d     e" + " " * 31 + "f" + " " * 40 + "g",
    "\t\t\t\tx\n\n\n\n\ny\n \n  \n\t \t",
    "  \n\n  indented\n    more",
    "private use \ue000\ue123 and \U000f0000 and \U00020000 \u0378",
    "control \x00\x01\x7f bytes",
    "▁ literal metaspace ▁▁",
    "emoji 🧑🏿‍🚀 and math ∮ E⋅da = Q/ε₀",
]

SHORT_PROMPT = "The capital of France is Paris. The capital of Germany is"


def long_prompt():
    """E2E-style restaurant descriptions (meaning representation and a reference sentence), far past
    the 512-token sliding window, built deterministically from attribute combinations."""
    names = ["The Eagle", "Aromi", "The Mill", "Blue Spice", "Cotto", "Zizzi", "The Punter", "Alimentum",
             "Fitzbillies", "The Wrestlers", "Giraffe", "Strada", "The Phoenix", "Browns Cambridge"]
    foods = ["French", "Italian", "Japanese", "Indian", "English", "Chinese", "fast food"]
    areas = ["city centre", "riverside"]
    prices = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
    ratings = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
    near = ["Café Rouge", "the Burger King", "Raja Indian Cuisine", "The Portland Arms", "Rainbow Vegetarian Café"]
    lines = []
    for i, name in enumerate(names):
        food, area = foods[i % len(foods)], areas[i % len(areas)]
        price, rating, by = prices[i % len(prices)], ratings[(i * 5) % len(ratings)], near[i % len(near)]
        family = "yes" if i % 3 else "no"
        mr = (f"name[{name}], eatType[restaurant], food[{food}], priceRange[{price}], "
              f"customer rating[{rating}], area[{area}], familyFriendly[{family}], near[{by}]")
        kid = "is family friendly" if family == "yes" else "is not suitable for children"
        ref = (f"{name} is a {food} restaurant in the {area} near {by}. It has a {price} price range, "
               f"a customer rating of {rating}, and {kid}.")
        lines.append(f"Meaning representation: {mr}\nDescription: {ref}\n")
    return "\n".join(lines)


def fnv1a64(chunks):
    h = 0xCBF29CE484222325
    for chunk in chunks:
        for b in chunk:
            h ^= b
            h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def check_model(models):
    path = models / GGUF_NAME
    if not path.is_file():
        sys.exit(f"no {path}: run scripts/fetch-model.sh gemma3-270m")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        sys.exit(f"{path} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}")
    return path


def write_safetensors(path, tensors):
    """Minimal float32 safetensors writer, so `blocks` needs nothing beyond gguf + numpy."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)


def make_blocks(gguf_path, out):
    import gguf
    from gguf.constants import GGML_QUANT_SIZES

    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    writer = gguf.GGUFWriter(str(out / "blocks.gguf"), arch="lorakit-fixture")
    writer.add_string("general.name", "rows of gemma-3-270m.Q4_K_M.gguf")
    expected = {}
    for name, rows in BLOCK_TENSORS:
        t = by_name[name]
        qtype = t.tensor_type
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        row_len = int(t.shape[0])  # ne0
        raw = np.asarray(t.data)
        if rows is None:
            blocks = raw.view(np.uint8).reshape(-1).copy()
            n_rows = None
        else:
            row_bytes = row_len // block_size * type_size
            blocks = raw.view(np.uint8).reshape(-1)[: rows * row_bytes].reshape(rows, row_bytes).copy()
            n_rows = rows
        values = gguf.quants.dequantize(blocks, qtype)
        if n_rows is not None:
            assert values.shape == (n_rows, row_len), (name, values.shape)
        writer.add_tensor(name, blocks, raw_dtype=qtype)
        expected[name] = values.astype(np.float32)
        print(f"  {name}: {qtype.name}, {values.shape}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    write_safetensors(out / "blocks.expected.safetensors", expected)


def make_tokenizer(models, out):
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(models), gguf_file=GGUF_NAME)
    load_s = time.perf_counter() - t0
    backend = json.loads(tok.backend_tokenizer.to_str())
    model = backend["model"]
    id_to_token = {i: t for t, i in model["vocab"].items()}
    vocab_digest = fnv1a64(id_to_token[i].encode() + b"\x00" for i in range(len(id_to_token)))
    merges = [m if isinstance(m, list) else m.split(" ", 1) for m in model["merges"]]
    merges_digest = fnv1a64(a.encode() + b"\x00" + b.encode() + b"\x01" for a, b in merges)
    added = sorted((a["id"], a["content"], a["special"]) for a in backend["added_tokens"])
    added_digest = fnv1a64(f"{i}\x00{c}\x00{int(s)}\x01".encode() for i, c, s in added)

    shared = json.loads(CASES.read_text())["cases"]
    texts = [c["text"] for c in shared] + GEMMA_CASES
    cases = []
    for text in texts:
        ids = tok(text)["input_ids"]
        plain = tok(text, add_special_tokens=False)["input_ids"]
        decoded = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        cases.append({
            "text": text,
            "ids": ids,
            "ids_without_special_tokens": plain,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": decoded,
            "decoded_skip_special_tokens": tok.decode(ids, skip_special_tokens=True,
                                                      clean_up_tokenization_spaces=False),
            "decoded_default": tok.decode(ids),
            "roundtrip_exact": tok.decode(plain, clean_up_tokenization_spaces=False) == text,
        })
    special = {name: getattr(tok, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    doc = {
        "source": f"models/{GGUF_NAME} (sha256 {GGUF_SHA256})",
        "call": "AutoTokenizer.from_pretrained(models, gguf_file=...)(text)['input_ids'] "
                "(add_special_tokens=True, the default)",
        "decode_call": "tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False); "
                       "decoded_default: tokenizer.decode(ids)",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokenizer_class": type(tok).__name__,
        "load_seconds": round(load_s, 2),
        **special,
        **{f"{name}_id": tok.convert_tokens_to_ids(value) for name, value in special.items()},
        "bos_added_by_default": tok("x")["input_ids"][:1] == [tok.bos_token_id],
        "vocab_size": len(tok),
        "backend": {
            "normalizer": backend["normalizer"],
            "pre_tokenizer": backend["pre_tokenizer"],
            "post_processor": backend["post_processor"],
            "decoder": backend["decoder"],
            "model": {k: v for k, v in model.items() if k not in ("vocab", "merges")},
            "n_vocab": len(model["vocab"]),
            "n_merges": len(merges),
            "first_merges": merges[:20],
            "n_added_tokens": len(added),
            "n_special_added_tokens": sum(1 for a in added if a[2]),
            "digests": "FNV-1a 64 over: vocab, token UTF-8 + 0x00 in id order; merges, left + 0x00 + right + 0x01 "
                       "in order; added tokens, '{id}\\0{content}\\0{special 0/1}\\1' by id",
            "vocab_fnv1a64": vocab_digest,
            "merges_fnv1a64": merges_digest,
            "added_tokens_fnv1a64": added_digest,
        },
        "chat_template": tok.chat_template,
        "n_shared_cases": len(shared),
        "n_cases": len(cases),
        "cases": cases,
    }
    (out / "tokenizer_cases.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"  {len(cases)} cases, vocab {len(tok)}, {len(merges)} merges, load {load_s:.1f} s")


def make_reference(models, gguf_path, out):
    import gguf
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(models), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        str(models), gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    config = model.config.to_dict()
    window = model.config.sliding_window

    # How the loader mapped the file's tensors (the decoder must do the same).
    reader = gguf.GGUFReader(str(gguf_path))
    raw = {t.name: t for t in reader.tensors}

    def file_f32(name):
        t = raw[name]
        return torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).copy())

    layer0 = model.model.layers[0]
    norm_map = {
        "blk.0.attn_norm.weight": layer0.input_layernorm.weight,
        "blk.0.post_attention_norm.weight": layer0.post_attention_layernorm.weight,
        "blk.0.ffn_norm.weight": layer0.pre_feedforward_layernorm.weight,
        "blk.0.post_ffw_norm.weight": layer0.post_feedforward_layernorm.weight,
        "blk.0.attn_q_norm.weight": layer0.self_attn.q_norm.weight,
        "blk.0.attn_k_norm.weight": layer0.self_attn.k_norm.weight,
        "output_norm.weight": model.model.norm.weight,
    }
    checks = {}
    for name, param in norm_map.items():
        w = file_f32(name)
        assert torch.equal(param.detach(), w - 1.0), name
    checks["norm_weights"] = "HF weight == GGUF value - 1 (f32) for every *norm.weight; Gemma3RMSNorm multiplies by (1 + weight)"
    linear_map = {
        "blk.0.attn_q.weight": layer0.self_attn.q_proj.weight,
        "blk.0.attn_k.weight": layer0.self_attn.k_proj.weight,
        "blk.0.attn_v.weight": layer0.self_attn.v_proj.weight,
        "blk.0.attn_output.weight": layer0.self_attn.o_proj.weight,
        "blk.0.ffn_gate.weight": layer0.mlp.gate_proj.weight,
        "blk.0.ffn_up.weight": layer0.mlp.up_proj.weight,
        "blk.0.ffn_down.weight": layer0.mlp.down_proj.weight,
        "token_embd.weight": model.model.embed_tokens.weight,
    }
    for name, param in linear_map.items():
        assert torch.equal(param.detach(), file_f32(name).reshape(param.shape)), name
    checks["linear_weights"] = "HF weight == dequantised GGUF tensor, row for row (no q/k row permutation)"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    checks["lm_head"] = "tied to model.embed_tokens.weight (the file has no output.weight)"
    checks["embed_scale"] = float(model.model.embed_tokens.embed_scale)
    checks["attention_scaling"] = float(layer0.self_attn.scaling)
    checks["sliding_window_per_layer"] = [layer.self_attn.sliding_window for layer in model.model.layers]
    checks["attn_implementation"] = model.config._attn_implementation

    def record(text, greedy):
        ids = tok(text)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        top2 = torch.topk(logits, 2, dim=-1).values
        rec = {
            "text": text,
            "n_tokens": len(ids),
            "ids": ids,
            "next_token_logprobs": [float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)],
            "argmax": [int(a) for a in logits.argmax(-1)],
            "argmax_logprob": [float(v) for v in logp.max(-1).values],
            "top2_gap": [float(v) for v in (top2[:, 0] - top2[:, 1])],
        }
        if greedy:
            with torch.no_grad():
                g = model.generate(x, do_sample=False, max_new_tokens=32)
            new = [int(t) for t in g[0, len(ids):]]
            assert len(new) == 32, f"generation stopped after {len(new)} tokens"
            rec["greedy_call"] = "model.generate(ids, do_sample=False, max_new_tokens=32)"
            rec["greedy_new_ids"] = new
            rec["greedy_text"] = tok.decode(new)
        return rec

    short = record(SHORT_PROMPT, greedy=True)
    long = record(long_prompt(), greedy=False)
    assert long["n_tokens"] > window, (long["n_tokens"], window)
    doc = {
        "source": f"models/{GGUF_NAME} (sha256 {GGUF_SHA256})",
        "call": "AutoModelForCausalLM.from_pretrained(models, gguf_file=..., dtype=torch.float32, "
                "attn_implementation='eager'); logits in float32, log_softmax in float64",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "gguf": getattr(gguf, "__version__", "0.19.0"), "python": platform.python_version()},
        "logprob_convention": "next_token_logprobs[t] = log p(ids[t+1] | ids[..=t]); argmax[t], "
                              "argmax_logprob[t] and top2_gap[t] (top-1 minus top-2 logit) at position t",
        "loader_checks": checks,
        "prompts": {"short": short, "long": long},
        "config": config,
    }
    (out / "reference.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"  short {short['n_tokens']} tokens, long {long['n_tokens']} tokens (window {window}); "
          f"greedy: {short['greedy_text']!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "tests/data/gemma3-270m")
    ap.add_argument("--only", nargs="+", choices=["blocks", "tokenizer", "reference"],
                    default=["blocks", "tokenizer", "reference"])
    a = ap.parse_args()
    gguf_path = check_model(a.models)
    a.out.mkdir(parents=True, exist_ok=True)
    for part in a.only:
        print(f"{part}:")
        if part == "blocks":
            make_blocks(gguf_path, a.out)
        elif part == "tokenizer":
            make_tokenizer(a.models, a.out)
        else:
            make_reference(a.models, gguf_path, a.out)


if __name__ == "__main__":
    main()
