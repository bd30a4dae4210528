#!/usr/bin/env python3
"""Write the subspace-similarity and amplification test fixture and its independent expected values.

    pip install numpy scipy
    python3 scripts/make-subspace-fixture.py [OUT_DIR]

OUT_DIR defaults to tests/data/subspace/. It gets two PEFT adapters for the tiny Llama of
tests/fixtures/tiny-llama (hidden 64, 4 heads, 2 KV heads of 16, 2 layers) on q_proj and v_proj:

* `adapter-r2/`: r = 2, alpha = 4; A, B seeded Gaussian.
* `adapter-r6/`: r = 6, alpha = 12; its first two rows of A are adapter-r2's rows plus small noise and
  its first two columns of B likewise, the rest independent, so that φ is neither 0 nor 1.

and the expected values, computed here with NumPy/SciPy in float64 from the float32 values stored:

* `expected_A.csv`, `expected_B.csv`: `module,layer,i,j,phi`, φ(i, j) between adapter-r2 (i) and
  adapter-r6 (j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j), U = top right singular vectors of
  lora_A (scipy.linalg.svd) or top left singular vectors of lora_B.
* `expected_amplification.csv`: for adapter-r6 on tiny-llama's weights: ‖W0‖_F, ‖ΔW‖_F,
  ‖Uᵀ W0 V‖_F for ΔW's top-r singular vectors (from a dense SVD of ΔW = s·B·A) and
  √(σ1² + … + σr²) of W0.

Safetensors files are written and read by hand (8-byte header length, JSON header, raw little-endian
data), so numpy and scipy are the only dependencies. Deterministic for a given numpy version.
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import scipy.linalg

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/data/subspace"
TINY = ROOT / "tests/fixtures/tiny-llama"

SHAPES = {"q_proj": (64, 64), "v_proj": (32, 64)}  # [out, in]
LAYERS = 2


def write_safetensors(path, tensors):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<f4").reshape(info["shape"])
    return out


def key(layer, module, which):
    return f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{which}.weight"


def config(r, alpha):
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-llama",
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
        "layers_to_transform": None, "modules_to_save": None,
    }


def phi_grid(u1, u2):
    p1, p2 = u1.shape[1], u2.shape[1]
    phi = np.zeros((p1, p2))
    for i in range(1, p1 + 1):
        for j in range(1, p2 + 1):
            phi[i - 1, j - 1] = np.linalg.norm(u1[:, :i].T @ u2[:, :j], "fro") ** 2 / min(i, j)
    return phi


def main():
    rng = np.random.default_rng(20211)
    t1, t2 = {}, {}
    for layer in range(LAYERS):
        for module, (out, inp) in SHAPES.items():
            a1 = rng.standard_normal((2, inp))
            b1 = rng.standard_normal((out, 2))
            a2 = rng.standard_normal((6, inp))
            b2 = rng.standard_normal((out, 6))
            a2[:2] = a1 + 0.3 * rng.standard_normal((2, inp))
            b2[:, :2] = b1 + 0.3 * rng.standard_normal((out, 2))
            # Distinct row scales keep the singular values well separated.
            a1 *= np.array([[2.0], [1.0]])
            a2 *= np.array([[3.0], [2.5], [2.0], [1.5], [1.0], [0.5]])
            t1[key(layer, module, "A")], t1[key(layer, module, "B")] = a1 * 0.1, b1 * 0.01
            t2[key(layer, module, "A")], t2[key(layer, module, "B")] = a2 * 0.1, b2 * 0.01
    for name, t, r, alpha in [("adapter-r2", t1, 2, 4), ("adapter-r6", t2, 6, 12)]:
        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        write_safetensors(d / "adapter_model.safetensors", t)
        (d / "adapter_config.json").write_text(json.dumps(config(r, alpha), indent=2) + "\n")

    # Expected values from what was stored (float32), computed in float64.
    s1 = read_safetensors(OUT / "adapter-r2/adapter_model.safetensors")
    s2 = read_safetensors(OUT / "adapter-r6/adapter_model.safetensors")
    for which in "AB":
        lines = ["module,layer,i,j,phi"]
        for module in SHAPES:
            for layer in range(LAYERS):
                m1 = s1[key(layer, module, which)].astype(np.float64)
                m2 = s2[key(layer, module, which)].astype(np.float64)
                if which == "A":  # right singular vectors of A [r, in]
                    u1 = scipy.linalg.svd(m1, full_matrices=False)[2].T
                    u2 = scipy.linalg.svd(m2, full_matrices=False)[2].T
                else:  # left singular vectors of B [out, r]
                    u1 = scipy.linalg.svd(m1, full_matrices=False)[0]
                    u2 = scipy.linalg.svd(m2, full_matrices=False)[0]
                phi = phi_grid(u1, u2)
                for i in range(phi.shape[0]):
                    for j in range(phi.shape[1]):
                        lines.append(f"{module},{layer},{i + 1},{j + 1},{phi[i, j]:.12f}")
        (OUT / f"expected_{which}.csv").write_text("\n".join(lines) + "\n")

    w = read_safetensors(TINY / "model.safetensors")
    scale = 12 / 6
    lines = ["module,layer,r,norm_w0,norm_delta,proj_delta_dirs,proj_w0_dirs"]
    for layer in range(LAYERS):
        for module in SHAPES:
            w0 = w[f"model.layers.{layer}.self_attn.{module}.weight"].astype(np.float64)
            a = s2[key(layer, module, "A")].astype(np.float64)
            b = s2[key(layer, module, "B")].astype(np.float64)
            dw = scale * b @ a
            u, s, vt = scipy.linalg.svd(dw, full_matrices=False)
            r = 6
            proj = np.linalg.norm(u[:, :r].T @ w0 @ vt[:r].T, "fro")
            sw = scipy.linalg.svdvals(w0)
            lines.append(f"{module},{layer},{r},{np.linalg.norm(w0):.12f},{np.linalg.norm(dw):.12f},"
                         f"{proj:.12f},{np.sqrt(np.sum(sw[:r] ** 2)):.12f}")
    (OUT / "expected_amplification.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
