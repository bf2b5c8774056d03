#!/usr/bin/env bash
# build_artifacts.sh: everything the GPU machine needs, built here (a machine
# with moegen's build dependencies and NVRTC, no GPU), into one folder:
#   DIR/moe_runner            the runner (links only libc, libm, libdl)
#   DIR/lib/libcjson.so.1     the one library model.so needs beyond libc
#   DIR/check/NAME.so         every spec shrunk with --set, --target cpu,cuda
#                             (CPU kernels for x86-64-v3: any AVX2 machine)
#   DIR/full/NAME.so          layers at full size (numerics and benchmark)
#   DIR/skipped.txt           specs the CUDA target refuses, with the reason
#   DIR/device_check.sh, DIR/torch_peers.py
# Then, on the GPU machine: bash DIR/device_check.sh (results under $OUT).
#   tests/gpu/build_artifacts.sh [DIR]          (default: .gpu; BUILD_DIR=build)
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.gpu}
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j2 --target moegen moe_runner >/dev/null
rm -rf "$dir"
mkdir -p "$dir/check" "$dir/full" "$dir/lib"
cp "$build/moe_runner" tests/gpu/device_check.sh tests/gpu/torch_peers.py "$dir/"
: >"$dir/skipped.txt"

# out spec [sets...]: a model.so of one MoE layer (moe_init_random fills
# every MoE layer of a model: a whole model's weights would not fit the
# check's time), or a line in skipped.txt when the CUDA target refuses it
compile() {
	local out=$1 spec=$2
	shift 2
	local sets=(--set model.layers=1 --set model.moe_layers=all)
	for s in "$@"; do sets+=(--set "$s"); done
	if ! "$build/moegen" "$spec" "${sets[@]}" --target cpu,cuda --cpu x86-64-v3 -o "$out" \
		2>"$dir/err"; then
		if grep -q "not generated for target cuda\|refused\|is not generated" "$dir/err"; then
			printf '%s: %s\n' "$(basename "$out" .so)" "$(grep -m1 error "$dir/err")" \
				>>"$dir/skipped.txt"
		else
			cat "$dir/err" >&2
			exit 1
		fi
	fi
}

# every spec, shrunk: hidden 256, width 200 (not a multiple of the tile)
for spec in specs/*.yaml; do
	name=$(basename "$spec" .yaml)
	sets=(model.hidden=256 experts.intermediate=200)
	if grep -q 'kind: single_neuron' "$spec"; then
		sets=(model.hidden=256)
	elif grep -q '^shared_experts:' "$spec"; then
		sets+=(shared_experts.intermediate=160)
	fi
	compile "$dir/check/$name.so" "$spec" "${sets[@]}"
done
# variants: bf16 activations, f16 weights
compile "$dir/check/qwen3-30b-a3b-bf16act.so" specs/qwen3-30b-a3b.yaml model.hidden=256 \
	experts.intermediate=128 dtype.activations=bf16
compile "$dir/check/mixtral-8x7b-f16.so" specs/mixtral-8x7b.yaml model.hidden=512 \
	experts.intermediate=256 dtype.weights=f16
# full size, bf16 weights; DeepSeek-V3 as one tensor-parallel shard of 8
compile "$dir/full/qwen3-30b-a3b.so" specs/qwen3-30b-a3b.yaml
compile "$dir/full/olmoe-1b-7b.so" specs/olmoe-1b-7b.yaml
compile "$dir/full/mixtral-8x7b.so" specs/mixtral-8x7b.yaml
compile "$dir/full/deepseek-v3-tp8.so" specs/deepseek-v3.yaml experts.intermediate=256 \
	shared_experts.intermediate=256
rm -f "$dir/err"

# what model.so needs at run time: libc, libm and libcjson (carried)
need=$(readelf -d "$dir/full/qwen3-30b-a3b.so" | grep -Po 'NEEDED.*\[\K[^]]+' | sort -u)
for lib in $need; do
	case $lib in
	libc.so.* | libm.so.* | ld-linux*) ;;
	libcjson.so.*) cp -L "$(ldconfig -p | grep -Po "$lib.*=> \K.*" | head -1)" "$dir/lib/" ;;
	*)
		echo "model.so needs $lib: not expected" >&2
		exit 1
		;;
	esac
done
echo "model.so needs: $need" | tr '\n' ' '
echo
ls "$dir/check" | wc -l | xargs echo "check models:"
cat "$dir/skipped.txt"
du -sh "$dir"
