#!/usr/bin/env python3
"""Writes a Llama GGUF with Llama-3.1-8B's shapes and random weights, for memory and speed
measurements of `lorakit train --precision gguf` at that size (quality is meaningless).

32 layers, hidden 4096, feed-forward 14336, 32 heads / 8 KV heads of 128, vocab 128256, rope
theta 500000; every matrix (embedding and untied output included) in Q4_0 or Q4_K blocks of
random bytes with small finite f16 scales, norms 1.0 in F32. The tokenizer is SmolLM2's (its
GGUF keys, read from --tokenizer-from), padded with reserved tokens to the vocab size, so
SmolLM2 token ids are valid input. About 4.5 GB in Q4_0; stream-written, one tensor in memory.

Usage: scripts/make-shaped-gguf.py OUT.gguf [--type q4_0|q4_k] [--layers N]
           [--tokenizer-from models/SmolLM2-135M-Instruct.Q4_1.gguf]
Needs the `gguf` and `numpy` packages (bench/.venv has them).
"""
import argparse
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

HIDDEN, FF, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 128256
# Short enough that lorakit's rope tables stay small; the measurements use 512 tokens.
CONTEXT = 8192


def field_strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def field_scalar(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]].tolist()[0]


def random_blocks(rng, rows, cols, qtype):
    """[rows, cols] of `qtype` as uint8 [rows, bytes per row]: random level bytes, f16 scale
    fields set to small finite values."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = cols // block
    b = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
    if qtype == T.Q4_0:
        # w = d·(q − 8), |w| ≤ 8·|d|: d ~ ±0.002 keeps a 4096-wide product near unit scale.
        d = rng.uniform(-0.002, 0.002, size=(rows, nb)).astype(np.float16)
        b[:, :, 0:2] = d.view(np.uint8).reshape(rows, nb, 2)
    elif qtype == T.Q4_K:
        # w = d·sc·q − dmin·m with 6-bit sc, m: small d and dmin.
        d = rng.uniform(0, 3e-5, size=(rows, nb)).astype(np.float16)
        dmin = rng.uniform(0, 3e-5 * 7.5, size=(rows, nb)).astype(np.float16)
        b[:, :, 0:2] = d.view(np.uint8).reshape(rows, nb, 2)
        b[:, :, 2:4] = dmin.view(np.uint8).reshape(rows, nb, 2)
    else:
        sys.exit(f"unsupported type {qtype.name}")
    return b.reshape(rows, nb * size)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--type", default="q4_0", choices=["q4_0", "q4_k"])
    ap.add_argument("--layers", type=int, default=32)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument(
        "--tokenizer-from",
        default=os.path.join(root, "models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    qtype = {"q4_0": T.Q4_0, "q4_k": T.Q4_K}[a.type]
    rng = np.random.default_rng(a.seed)

    tok = gguf.GGUFReader(a.tokenizer_from)
    tokens = field_strings(tok, "tokenizer.ggml.tokens")
    merges = field_strings(tok, "tokenizer.ggml.merges")
    types = [int(tok.fields["tokenizer.ggml.token_type"].parts[i][0])
             for i in tok.fields["tokenizer.ggml.token_type"].data]
    if len(tokens) > VOCAB:
        sys.exit(f"{a.tokenizer_from} has {len(tokens)} tokens, more than {VOCAB}")
    n0 = len(tokens)
    tokens += [f"<|reserved_{i}|>" for i in range(VOCAB - n0)]
    types += [gguf.TokenType.UNUSED] * (VOCAB - n0)

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("Llama-3.1-8B-shaped random weights")
    w.add_block_count(a.layers)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if qtype == T.Q4_0 else gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_tokenizer_model(field_scalar_str(tok, "tokenizer.ggml.model"))
    if "tokenizer.ggml.pre" in tok.fields:
        w.add_tokenizer_pre(field_scalar_str(tok, "tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in [
        ("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
        ("tokenizer.ggml.eos_token_id", w.add_eos_token_id),
        ("tokenizer.ggml.padding_token_id", w.add_pad_token_id),
    ]:
        if key in tok.fields:
            add(field_scalar(tok, key))

    # (name, [rows, cols] or [n], kind)
    plan = [("token_embd.weight", (VOCAB, HIDDEN), "q")]
    for i in range(a.layers):
        p = f"blk.{i}"
        plan += [
            (f"{p}.attn_norm.weight", (HIDDEN,), "norm"),
            (f"{p}.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), "q"),
            (f"{p}.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "q"),
            (f"{p}.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), "q"),
            (f"{p}.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), "q"),
            (f"{p}.ffn_norm.weight", (HIDDEN,), "norm"),
            (f"{p}.ffn_gate.weight", (FF, HIDDEN), "q"),
            (f"{p}.ffn_up.weight", (FF, HIDDEN), "q"),
            (f"{p}.ffn_down.weight", (HIDDEN, FF), "q"),
        ]
    plan += [("output_norm.weight", (HIDDEN,), "norm"), ("output.weight", (VOCAB, HIDDEN), "q")]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    for name, shape, kind in plan:
        if kind == "norm":
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            rows, cols = shape
            byte_shape = (rows, cols // block * size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), rows * byte_shape[1], raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for name, shape, kind in plan:
        if kind == "norm":
            data = np.ones(shape, dtype=np.float32)
        else:
            data = random_blocks(rng, shape[0], shape[1], qtype)
        total += data.nbytes
        w.write_tensor_data(data)
    w.close()
    print(f"{a.out}: {len(plan)} tensors, {total / 1e9:.2f} GB of data, {a.layers} layers, {a.type}")


def field_scalar_str(reader, key):
    f = reader.fields[key]
    return bytes(f.parts[f.data[0]]).decode("utf-8")


if __name__ == "__main__":
    main()
