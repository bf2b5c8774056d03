#!/usr/bin/env bash
# runner_emu.sh: the GPU machine's flow without a GPU. A model.so is built
# ahead of time with --target cpu,cuda, its CUDA C is compiled for the host
# emulation (tests/cuda_emu), and moe_runner runs check and bench on it
# through the emulated libcuda.so.1. Exit 77 (skipped) without NVRTC or c++.
#   tests/gpu/runner_emu.sh [BUILD_DIR]       (default: build)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
moegen=$build/moegen runner=$build/moe_runner
dir=$(mktemp -d /tmp/moegen-runner-emu.XXXXXX)
trap 'rm -rf "$dir"' EXIT
command -v c++ >/dev/null || { echo "no C++ compiler: skipped"; exit 77; }
san=
lsan=()
if grep -q 'MOE_SANITIZE:BOOL=ON' "$build/CMakeCache.txt" 2>/dev/null; then
	san="-fsanitize=address,undefined"
	# moegen loads NVRTC with dlopen for --target cpu,cuda; LeakSanitizer's
	# exit-time tracer can crash walking NVRTC's dynamic TLS (seen with the
	# bf16-activation switch-base-8 build: "Tracer caught signal 11" in DTLS,
	# no leak reported). Leak checking of moegen stays on everywhere else.
	lsan=(env "ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0")
fi
cc -std=c11 -O1 -shared -fPIC $san -o "$dir/libcuda_emu.so" tests/cuda_emu/driver.c
fail=0
# name spec tokens bench [sets...]
run() {
	local name=$1 spec=$2 tokens=$3 bench=$4
	shift 4
	local sets=()
	for s in "$@"; do sets+=(--set "$s"); done
	if ! "${lsan[@]}" "$moegen" "$spec" "${sets[@]}" --target cpu,cuda -o "$dir/$name.so" 2>"$dir/err"; then
		if grep -q -i nvrtc "$dir/err"; then
			cat "$dir/err"
			echo "NVRTC cannot be opened: skipped"
			exit 77
		fi
		cat "$dir/err"
		exit 1
	fi
	"${lsan[@]}" "$moegen" "$spec" "${sets[@]}" --target cuda --emit cu -o "$dir/$name.cu"
	c++ -std=c++17 -Og -shared -fPIC -ffp-contract=off -w $san -Itests/cuda_emu \
		-DMOE_EMU_SOURCE="\"$dir/$name.cu\"" -o "$dir/$name.emu.so" tests/cuda_emu/module.cpp
	local env=(env MOE_LIBCUDA="$dir/libcuda_emu.so" MOE_EMU_MODULE="$dir/$name.emu.so")
	"${env[@]}" "$runner" check "$dir/$name.so" --tokens "$tokens" --csv "$dir/check.csv" \
		--label emu || fail=1
	if ((bench)); then
		"${env[@]}" "$runner" bench "$dir/$name.so" --tokens 1,40 --copies 2 \
			--csv "$dir/bench.csv" --label emu || fail=1
	fi
}
# f32 weights (CUDA-core tiles), both router paths, batch invariance
run mixtral-mini specs/mixtral-mini.yaml 1,7,70 1
# bf16 tensor cores, groups, shared experts
run deepseek-v3 specs/deepseek-v3.yaml 5,40 0 model.layers=1 model.moe_layers=all \
	model.hidden=128 experts.count=16 experts.intermediate=64 router.top_k=4 \
	shared_experts.intermediate=96
# capacity (no batch invariance), bf16 activations
run switch specs/switch-base-8.yaml 48 0 model.layers=1 model.moe_layers=all model.hidden=64 \
	experts.intermediate=128 dtype.activations=bf16
cat "$dir/check.csv" "$dir/bench.csv"
# every check row passed; the bench wrote its rows
awk -F, 'NR > 1 && $NF != "ok" { bad = 1 } END { exit bad }' "$dir/check.csv" || fail=1
(($(wc -l <"$dir/check.csv") == 7 && $(wc -l <"$dir/bench.csv") == 3)) || fail=1
exit $fail
