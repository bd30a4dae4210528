#!/usr/bin/env python3
"""Write the GGUF reader's test fixture and its independent expected values.

    python3 -m venv /tmp/ggufenv && /tmp/ggufenv/bin/pip install gguf numpy
    /tmp/ggufenv/bin/python scripts/make-gguf-fixture.py [OUT_DIR]

OUT_DIR defaults to tests/data/gguf/. It gets:

* `fixture.gguf`: a GGUF v3 file written by the `gguf` package's GGUFWriter, with one tensor per
  GGML type that lorakit dequantises (random but valid block data with sane f16 scales), one
  tensor of a type lorakit does not dequantise (TQ2_0), a 3-D tensor, and metadata keys of every
  value type (including strings, arrays of several element types and a nested array). The data
  alignment is 64 (`general.alignment`), not the default 32, so the reader must honour the key.
* `fixture.expected.safetensors`: for every tensor lorakit dequantises, the float32 values that
  `gguf.quants.dequantize` (the reference) computes, under the tensor's name, shaped like the
  tensor (outermost dimension first). F64 tensors use numpy's `astype(float32)`.

The metadata values are fixed here and repeated in the Rust tests (crates/lorakit/src/io/gguf/tests.rs).
The random data uses a fixed seed, so the script is deterministic for a given gguf/numpy version.
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, GGUFValueType as V
from gguf.constants import GGML_QUANT_SIZES

rng = np.random.default_rng(20240607)


def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def sane_scales(n):
    """n f16 scales: mostly small normals of both signs, plus one subnormal and one zero."""
    s = (rng.standard_normal(n) * 0.05).astype(np.float32)
    if n >= 3:
        s[1] = 3.0e-6  # f16 subnormal
        s[2] = 0.0
    return s


# Byte offsets of the f16 fields in each block: (offset of d, offset of dmin/m or None).
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
    T.IQ4_NL: [0],
    T.IQ4_XS: [0],
    T.TQ2_0: [64],
}


def random_blocks(qtype, n_rows, row_len):
    """Random block bytes for a (n_rows, row_len) tensor, with every f16 scale field set sane."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert row_len % block_size == 0
    n_blocks = n_rows * row_len // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        blocks[:, off : off + 2] = f16_bytes(sane_scales(n_blocks))
    return blocks.reshape(n_rows, row_len // block_size * type_size)


def main():
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests/data/gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = out_dir / "fixture.gguf"
    expected_path = out_dir / "fixture.expected.safetensors"

    w = gguf.GGUFWriter(str(gguf_path), arch="lorakit-fixture")
    w.add_custom_alignment(64)
    w.add_string("general.name", "lorakit GGUF fixture")
    # One key per scalar value type.
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float32("test.f32", 0.15625)
    w.add_float64("test.f64", -1.0e-300)
    w.add_bool("test.bool_true", True)
    w.add_bool("test.bool_false", False)
    w.add_string("test.string", "h\u00e9llo, GGUF \u2713")
    w.add_key_value("test.empty_string", "", V.STRING)  # add_string() skips empty strings
    w.add_uint32("test.int_as_float", 7)
    w.add_int32("test.negative_i32", -1)
    # Arrays of several element types, and an array of arrays.
    w.add_array("test.arr_str", ["a", "bc", "\u00fc", ""])
    w.add_key_value("test.arr_i32", [1, -2, 3], V.ARRAY, sub_type=V.INT32)
    w.add_key_value("test.arr_u8", [0, 255], V.ARRAY, sub_type=V.UINT8)
    w.add_key_value("test.arr_f32", [0.5, -2.0], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("test.arr_bool", [True, False, True], V.ARRAY, sub_type=V.BOOL)
    w.add_key_value("test.arr_u64", [1, 2**64 - 1], V.ARRAY, sub_type=V.UINT64)
    w.add_key_value("test.arr_nested", [[1, 2], [3]], V.ARRAY, sub_type=V.ARRAY)

    expected = {}

    # Plain float types. Row length 64, 2 rows (3 for F32 to differ from the others).
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    specials = np.array([np.inf, -np.inf, -0.0, 1e-45, np.finfo(np.float32).max], dtype=np.float32)
    f32[0, : len(specials)] = specials
    f32.view(np.uint32)[0, 5] = 0x7FC00001  # a NaN with a payload must pass through bit for bit
    w.add_tensor("t.f32", f32)
    expected["t.f32"] = gguf.quants.dequantize(f32.view(np.uint8), T.F32).reshape(f32.shape)

    f16 = (rng.standard_normal((2, 64)) * 4).astype(np.float16)
    f16[0, :5] = np.array([np.inf, -np.inf, -0.0, 6.0e-8, 65504.0], dtype=np.float16)  # no NaN: see tests.rs
    w.add_tensor("t.f16", f16)
    expected["t.f16"] = gguf.quants.dequantize(f16, T.F16)

    bf16 = rng.integers(0, 2**16, size=(2, 64), dtype=np.uint16)  # every bit pattern is valid, NaNs too
    bf16_bytes = bf16.view(np.uint8)
    w.add_tensor("t.bf16", bf16_bytes, raw_dtype=T.BF16)
    expected["t.bf16"] = gguf.quants.dequantize(bf16_bytes, T.BF16)

    f64 = rng.standard_normal((2, 32)) * 10.0
    f64[0, :4] = [1e300, -1e300, 1e-310, 0.1]  # overflow to inf, underflow, rounding
    w.add_tensor("t.f64", f64)
    with np.errstate(over="ignore"):  # 1e300 -> inf is intended
        expected["t.f64"] = f64.astype(np.float32)

    # A 3-D tensor: numpy shape (2, 3, 8) is stored as dims [8, 3, 2].
    f32_3d = rng.standard_normal((2, 3, 8)).astype(np.float32)
    w.add_tensor("t.f32_3d", f32_3d)
    expected["t.f32_3d"] = f32_3d

    # Block-quantised types: random blocks, 2 rows of 2 blocks (K-quants: 2 rows of 256, 1 block each
    # plus one 2-block row tensor for Q4_K).
    for qtype, rows, row_len in [
        (T.Q4_0, 2, 64),
        (T.Q4_1, 2, 64),
        (T.Q5_0, 2, 64),
        (T.Q5_1, 2, 64),
        (T.Q8_0, 2, 64),
        (T.IQ4_NL, 2, 64),
        (T.Q2_K, 2, 256),
        (T.Q3_K, 2, 256),
        (T.Q4_K, 2, 512),
        (T.Q5_K, 2, 256),
        (T.Q6_K, 2, 256),
        (T.IQ4_XS, 2, 256),
    ]:
        name = "t." + qtype.name.lower()
        blocks = random_blocks(qtype, rows, row_len)
        w.add_tensor(name, blocks, raw_dtype=qtype)
        values = gguf.quants.dequantize(blocks, qtype)
        assert values.shape == (rows, row_len) and values.dtype == np.float32
        expected[name] = values

    # A type lorakit does not dequantise: open() must accept it, tensor_f32() must name it.
    w.add_tensor("t.tq2_0", random_blocks(T.TQ2_0, 1, 256), raw_dtype=T.TQ2_0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    write_safetensors(expected_path, expected)
    print(f"wrote {gguf_path} ({gguf_path.stat().st_size} bytes) and {expected_path} ({expected_path.stat().st_size} bytes)")


def write_safetensors(path, tensors):
    """Minimal safetensors writer (float32 only), so the script needs nothing beyond gguf + numpy."""
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        data = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)


if __name__ == "__main__":
    main()
