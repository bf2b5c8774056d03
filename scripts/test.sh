#!/usr/bin/env bash
# README command 2: the whole test suite, in a normal build and in a sanitizer
# (ASan + UBSan) build, plus the formatting check. .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
jobs=$(nproc)

echo "== format"
files=$(git ls-files 'compiler/*.[ch]' 'runtime/*.[ch]' 'tests/*.[ch]' 'compiler/**/*.[ch]' 'runtime/**/*.[ch]' 'tests/**/*.[ch]')
clang-format --dry-run --Werror $files

echo "== build (release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"

echo "== build (asan+ubsan)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DMOE_SANITIZE=ON >/dev/null
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	ctest --test-dir build-asan --output-on-failure -j"$jobs"

echo "== fuzzing (libFuzzer + ASan + UBSan, 10 s per target; regression inputs replayed first)"
bash tests/fuzz/run.sh "${MOE_FUZZ_SECONDS:-10}"

echo "== python binding and parity with transformers"
# The virtual environment (torch, transformers from PyPI) lives outside the
# clone so a machine installs it once; tests/parity/run.sh creates it when
# missing, and prints "skipped:" only when torch cannot be installed at all.
export MOE_PARITY_VENV=${MOE_PARITY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/moegen/parity-venv}
mkdir -p "$(dirname "$MOE_PARITY_VENV")"
MOEGEN=$PWD/build/moegen bash tests/parity/run.sh
