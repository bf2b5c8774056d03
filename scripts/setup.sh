#!/usr/bin/env bash
# README command 1: install what is missing, build, and run the main job on the
# default example spec (specs/mixtral-mini.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)"
spec=specs/mixtral-mini.yaml
set -x
./build/moegen check "$spec"
./build/moegen info "$spec"
./build/moegen ref "$spec" --random 1 --tokens 8
