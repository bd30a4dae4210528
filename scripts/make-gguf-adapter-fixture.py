#!/usr/bin/env python3
"""Reference GGUF LoRA adapters made by llama.cpp's own converter, and PEFT's logits for them.

    scripts/build-llama-cpp.sh          # unpacks convert_lora_to_gguf.py and gguf-py
    scripts/fetch-model.sh
    bench/.venv/bin/python scripts/make-gguf-adapter-fixture.py

Writes tests/data/gguf-adapter/ (see its README.md):

* `allmods/`: a PEFT adapter (PEFT 0.21) on SmolLM2-135M's seven linear modules of layers 0, 1
  and 29, r = 4 with rank_pattern {down_proj: 2}, lora_alpha 8; A as PEFT initialises it, B
  random (seeded), so that it changes the output.
* `qv.f32.gguf`, `qv.q8_0.gguf`: `convert_lora_to_gguf.py` (llama.cpp as vendored in
  llama-cpp-python 0.3.36) on the trained q/v adapter
  `tests/fixtures/smollm2-peft-r8-qv/adapter`.
* `allmods.f32.gguf`, `allmods.f16.gguf`, `allmods.bf16.gguf`: the same converter on `allmods/`.
  The converter needs only the base model's config.json (`--base tests/fixtures/smollm2`).
* `allmods_logits.safetensors`: float32 logits of transformers 5.24 + PEFT on the SmolLM2 Q4_1
  GGUF (transformers dequantises it with gguf-py) with `allmods/` unmerged, for the prompt
  `plain` of tests/fixtures/smollm2/meta.json, as the records the tests read (`plain.strided16`, `.lse`,
  `.argmax`, `.top2gap`).
* `quantize.gguf` (written by gguf-py's GGUFWriter): `x`, F32 rows [8, 64] (random, plus an
  all-zero block, a block whose largest magnitude is negative and values on rounding ties),
  and `x.q8_0`, `x.q4_0`: the same rows quantised by `gguf.quants.quantize`, the reference for
  lorakit's quantiser.
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

root = Path(__file__).resolve().parent.parent
fixtures = root / "tests/fixtures"
out = root / "tests/data/gguf-adapter"
llama_src = root / "tools/llama.cpp/src-0.3.36"
converter = llama_src / "convert_lora_to_gguf.py"
model_file = root / "models/SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(adapter_dir: Path, outtype: str, dest: Path):
    subprocess.run(
        [sys.executable, str(converter), "--base", str(fixtures / "smollm2"),
         "--outtype", outtype, "--outfile", str(dest), str(adapter_dir)],
        check=True,
    )


def make_allmods(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=[0, 1, 29],
        rank_pattern={"down_proj": 2},
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(14)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1414)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    # Recorded, never followed (the converter gets --base); not this machine's path.
    peft_model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    peft_model.save_pretrained(out / "allmods")
    # PEFT's generated model card names the local base path; the adapter needs none.
    (out / "allmods/README.md").unlink()
    return peft_model


def records(logits: torch.Tensor, name: str):
    top2 = torch.topk(logits, 2, dim=-1).values
    return {
        f"{name}.strided16": logits[:, ::16].contiguous(),
        f"{name}.lse": torch.logsumexp(logits.double(), dim=-1).float(),
        f"{name}.argmax": logits.argmax(dim=-1),
        f"{name}.top2gap": (top2[:, 0] - top2[:, 1]).contiguous(),
    }


def make_quantize_reference():
    sys.path.insert(0, str(llama_src / "gguf-py"))
    import numpy as np
    import gguf

    rng = np.random.default_rng(1414)
    x = (rng.standard_normal((8, 64)) * 0.1).astype(np.float32)
    x[1, :32] = 0.0                                   # an all-zero block
    x[2, :32] = np.linspace(-1.0, 0.5, 32)            # largest magnitude negative
    x[3, :32] = np.arange(-16, 16) / 16 * 8 / 127     # values on q8_0 rounding ties
    x[4, :32] = (np.arange(32) - 16) / 8.0            # q4_0 ties at x * id + 8.5
    w = gguf.GGUFWriter(str(out / "quantize.gguf"), "llama")
    w.add_tensor("x", x)
    for t in [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0]:
        w.add_tensor(f"x.{t.name.lower()}", gguf.quants.quantize(x, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    make_quantize_reference()
    model = AutoModelForCausalLM.from_pretrained(
        str(model_file.parent), gguf_file=model_file.name, dtype=torch.float32
    )
    model.eval()
    peft_model = make_allmods(model)
    ids = json.loads((fixtures / "smollm2/meta.json").read_text())["prompts"]["plain"]["ids"]
    with torch.no_grad():
        logits = peft_model(torch.tensor([ids])).logits[0].float()
    save_file(records(logits, "plain"), out / "allmods_logits.safetensors")

    convert(fixtures / "smollm2-peft-r8-qv/adapter", "f32", out / "qv.f32.gguf")
    convert(fixtures / "smollm2-peft-r8-qv/adapter", "q8_0", out / "qv.q8_0.gguf")
    for t in ["f32", "f16", "bf16"]:
        convert(out / "allmods", t, out / f"allmods.{t}.gguf")


if __name__ == "__main__":
    main()
