#!/usr/bin/env bash
# apt-get install PACKAGE... for the project's scripts (cmake for llama.cpp, golang-go, OpenMPI),
# one at a time: on a fresh machine the tests start several installs at once, and dpkg admits one
# (a second apt-get fails at once with "Could not get lock /var/lib/dpkg/lock-frontend"). All of
# them queue on one lock file; an apt-get from outside the project is waited for up to 10
# minutes; a failed download is tried again twice. Needs root or sudo.
set -euo pipefail
[[ $# -gt 0 ]] || { echo "usage: $0 PACKAGE..." >&2; exit 2; }
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "error: installing $* needs root (apt-get install $*)" >&2; exit 1; }
  sudo="sudo"
fi
exec 9>"${TMPDIR:-/tmp}/lorakit-apt.lock"
flock 9
export DEBIAN_FRONTEND=noninteractive
apt=($sudo apt-get -qq -o DPkg::Lock::Timeout=600)
for attempt in 1 2 3; do
  if "${apt[@]}" update && "${apt[@]}" install -y --no-install-recommends "$@" >/dev/null; then
    exit 0
  fi
  [[ $attempt == 3 ]] || { echo "apt-get install $* failed (attempt $attempt of 3); again in $((attempt * 15)) s" >&2; sleep $((attempt * 15)); }
done
echo "error: apt-get install $* failed 3 times" >&2
exit 1
