#!/usr/bin/env bash
# Makes `go` available for the Ollama template check (tests/integration/gguf_adapter.rs runs
# scripts/ollama-template.go with Go's text/template, the engine Ollama runs): installs the Debian
# package golang-go with apt-get when go is missing (as root, through scripts/apt-install.sh). Prints the path of go.
set -euo pipefail
if ! command -v go >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: go is missing; install it (apt-get install golang-go) and rerun $0" >&2
    exit 1
  fi
  echo "installing go (apt-get install golang-go) ..." >&2
  # Several test processes may arrive at once: one installs, the others wait for the lock.
  exec 9>/tmp/lorakit-install-go.lock
  flock 9
  if ! command -v go >/dev/null; then
    "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" golang-go >&2
  fi
fi
command -v go
