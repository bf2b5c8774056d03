#!/usr/bin/env bash
# README command 1: install what is missing, build, then compile the default
# example spec (specs/mixtral-mini.yaml) into model.so and run it against the
# reference.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
spec=specs/mixtral-mini.yaml
set -x
./build/moegen check "$spec"
./build/moegen info "$spec"
./build/moegen "$spec" -o build/mixtral-mini.so
./build/moegen run build/mixtral-mini.so --random 1 --tokens 64 --check
