#!/usr/bin/env bash
# Installs what `--features mpi` needs: OpenMPI (library, headers, mpirun) and libclang (the
# `mpi` crate generates its bindings with bindgen). Debian/Ubuntu packages; once per machine.
set -euo pipefail
have() {
    command -v mpirun >/dev/null && command -v mpicc >/dev/null &&
        compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null
}
have && exit 0
"$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" libopenmpi-dev openmpi-bin libclang-dev
have
mpirun --version | head -1
