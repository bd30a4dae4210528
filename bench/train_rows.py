#!/usr/bin/env python3
"""The benchmarks' training data: 256-token rows of real SmolLM2 tokens, from the reference
fixture's token stream, as lorakit JSONL ({"input_ids": [...]}).

Usage: bench/train_rows.py OUT.jsonl
"""
import array
import json
import os
import struct
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
src = os.path.join(root, "tests/fixtures/smollm2-peft-r8-qv/training/batches.safetensors")
b = open(src, "rb").read()
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
s, e = h["input_ids"]["data_offsets"]
ids = array.array("q")
ids.frombytes(b[8 + n + s:8 + n + e])
ids = ids.tolist()
with open(sys.argv[1], "w") as f:
    for r in range(len(ids) // 256):
        f.write(json.dumps({"input_ids": ids[r * 256:(r + 1) * 256]}) + "\n")
