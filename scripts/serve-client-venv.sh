#!/usr/bin/env bash
# Creates (once) the git-ignored virtual environment .venv-serve/ with the pinned official
# `openai` Python client that tests/serve/openai_client.py drives `lorakit serve` with, and
# prints its python's path. Safe to run from several processes at once.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-serve"
pin="openai==3.57.0"

exec 9>"$root/.venv-serve.lock"
flock 9
if ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '${pin#openai==}')" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$pin" >&2
fi
echo "$venv/bin/python"
