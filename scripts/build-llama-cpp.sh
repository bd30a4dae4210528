#!/usr/bin/env bash
# Builds llama.cpp (CPU only) as the tests' judge: the llama.cpp vendored in the PyPI sdist of
# llama-cpp-python (pinned, sha256-checked, fetched with pip), its `llama` and `llama-common`
# libraries and scripts/llama-judge.cpp linked against them, into the git-ignored tools/llama.cpp/. Also unpacks
# the sdist's convert_lora_to_gguf.py and gguf-py (used by scripts/make-gguf-adapter-fixture.py).
# Does nothing when the build is there and current; safe to run from several processes at once.
# Installs cmake with apt-get when it is missing (as root).
#
#   scripts/build-llama-cpp.sh           prints the path of the judge binary on stdout
#   scripts/build-llama-cpp.sh --server  also builds llama-server (for bench/serve_vs_llama.sh)
#                                        and prints its path instead
#
# Only what the tests need is compiled (the libraries, common/ for llama.cpp's Jinja chat
# templates; no tools, examples or server): about 6 minutes on 2 cores. --server is opt-in (CI
# never builds it): a second CMake tree, build-server-VERSION, with common/, mtmd and the server
# (no web UI, no download of one, no OpenSSL): 32 more minutes on 2 cores shared with other
# compilations; bin/llama-server is the result.
set -euo pipefail

with_server=0
case "${1:-}" in
  "") ;;
  --server) with_server=1 ;;
  *) echo "usage: $0 [--server]" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${LORAKIT_LLAMA_CPP_DIR:-$root/tools/llama.cpp}"
version="0.3.36"
sdist="llama_cpp_python-$version.tar.gz"
sdist_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
judge_src="$root/scripts/llama-judge.cpp"
judge="$out/bin/llama-judge"
# The build is current when it was made from this version and this judge source.
stamp_want="$version $(cat "$judge_src" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"

current() { [[ -x "$judge" && -f "$out/stamp" && "$(cat "$out/stamp")" == "$stamp_want" ]]; }
server="$out/bin/llama-server"
server_current() { [[ -x "$server" && -f "$out/stamp-server" && "$(cat "$out/stamp-server")" == "$version" ]]; }
done_() { if [[ $with_server == 1 ]]; then echo "$server"; else echo "$judge"; fi; }
if current && { [[ $with_server == 0 ]] || server_current; }; then
  done_
  exit 0
fi
mkdir -p "$out"
exec 9>"$out/.build.lock"
flock 9
if current && { [[ $with_server == 0 ]] || server_current; }; then
  done_
  exit 0
fi
start=$SECONDS

if ! command -v cmake >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing cmake (apt-get) ..." >&2
    "$root/scripts/apt-install.sh" cmake >&2
  else
    echo "error: cmake is missing; install it (apt-get install cmake) and rerun $0" >&2
    exit 1
  fi
fi
for tool in g++ python3 tar; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing" >&2; exit 1; }
done

src="$out/src-$version"
if [[ ! -f "$src/.unpacked" ]]; then
  tmp="$(mktemp -d "$out/.fetch.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching llama.cpp (pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==$version) ..." >&2
  # --no-binary for this package only: pip then builds the sdist's metadata with wheels of its
  # build tools instead of compiling cmake from source.
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$tmp" >&2
  echo "$sdist_sha256  $tmp/$sdist" | sha256sum -c --quiet - >&2
  tar -xzf "$tmp/$sdist" -C "$tmp"
  rm -rf "$src"
  mv "$tmp/llama_cpp_python-$version/vendor/llama.cpp" "$src"
  touch "$src/.unpacked"
  rm -rf "$tmp"
  trap - EXIT
fi

jobs="$(nproc)"
if [[ $with_server == 1 ]] && ! server_current; then
  sbuild="$out/build-server-$version"
  echo "building llama-server $version (CPU, $jobs jobs) ..." >&2
  cmake -S "$src" -B "$sbuild" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=ON >&2
  cmake --build "$sbuild" --target llama-server -j "$jobs" >&2
  mkdir -p "$out/bin"
  cp "$(find "$sbuild" -type f -name llama-server -perm -u+x | head -n1)" "$server.tmp"
  mv "$server.tmp" "$server"
  echo "$version" > "$out/stamp-server"
  echo "llama-server built in $((SECONDS - start)) s" >&2
  if current; then
    done_
    exit 0
  fi
fi
build="$out/build-$version"
echo "building llama.cpp $version (CPU, the llama and common libraries only, $jobs jobs) ..." >&2
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_OPENSSL=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=ON >&2
cmake --build "$build" --target llama llama-common -j "$jobs" >&2

mkdir -p "$out/bin"
libs=$(find "$build" -name '*.a' | sort)
g++ -O2 -std=c++17 -I "$src/include" -I "$src/ggml/include" -I "$src/common" -I "$src/vendor" \
  "$judge_src" -o "$judge.tmp" \
  -Wl,--start-group $libs -Wl,--end-group -lpthread -ldl -lm
mv "$judge.tmp" "$judge"
echo "$stamp_want" > "$out/stamp"
echo "llama.cpp built in $((SECONDS - start)) s" >&2
done_
