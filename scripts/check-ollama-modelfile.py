#!/usr/bin/env python3
"""Checks the TEMPLATE and SYSTEM of a Modelfile that `lorakit export --modelfile` wrote against
the model's own chat template as transformers renders it (with the generation prompt, as Ollama
always asks for a reply). The TEMPLATE is executed by Go's text/template, Ollama's engine
(scripts/ollama-template.go; needs `go`, e.g. `apt-get install golang-go`).

    bench/.venv/bin/python scripts/check-ollama-modelfile.py MODELFILE HF_TOKENIZER_DIR
"""
import json
import pathlib
import re
import subprocess
import sys

from transformers import AutoTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say 'done' — nothing else. ünïcödé 😀\nThanks."},
    ],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ],
]


def directive(text, name):
    m = re.search(rf'^{name} """(.*?)"""$', text, re.S | re.M)
    return m.group(1) if m else ""


def main():
    modelfile, tok_dir = sys.argv[1], sys.argv[2]
    text = pathlib.Path(modelfile).read_text()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    want = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    go = pathlib.Path(__file__).with_name("ollama-template.go")
    payload = {"template": directive(text, "TEMPLATE"), "system": directive(text, "SYSTEM"), "conversations": CONVERSATIONS}
    got = json.loads(subprocess.run(["go", "run", str(go)], input=json.dumps(payload), capture_output=True, text=True, check=True).stdout)
    bad = 0
    for conv, w, g in zip(CONVERSATIONS, want, got):
        ok = w == g
        bad += not ok
        print(("same" if ok else "DIFFERENT") + f": {[m['role'] for m in conv]}")
        if not ok:
            print(f"  transformers: {w!r}\n  ollama:       {g!r}")
    print(f"{len(CONVERSATIONS) - bad} of {len(CONVERSATIONS)} conversations render identically")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
