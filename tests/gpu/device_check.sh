#!/usr/bin/env bash
# device_check.sh: the check of moegen's CUDA path on a GPU machine that has
# only the NVIDIA driver (and python3 with torch for the peers), from the
# artifacts of tests/gpu/build_artifacts.sh in this script's folder. Writes
# under $OUT (default ./device-out): log.txt, check.csv, bench.csv,
# torch.csv, nvidia-smi.txt, steps.csv. Each step has a time limit; the whole
# stays under six minutes (the limits add up to 360 s). Exit status 1 if any
# check failed.
#   bash DIR/device_check.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$PWD/device-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
runner=$here/moe_runner
log=$out/log.txt
fail=0
exec > >(tee -a "$log") 2>&1
echo "step,seconds,status" >"$out/steps.csv"
step() { # name limit command...
	local name=$1 limit=$2
	shift 2
	echo "== $name (limit ${limit} s)"
	local t0=$SECONDS
	timeout "$limit" "$@"
	local rc=$?
	echo "$name,$((SECONDS - t0)),$rc" >>"$out/steps.csv"
	((rc == 0)) || { echo "== $name: exit $rc"; fail=1; }
}

date -u
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
	--format=csv
echo "model.so needs:"
ldd "$here/full/qwen3-30b-a3b.so"
echo "skipped (refused by the CUDA target at compile time):"
cat "$here/skipped.txt"

numerics_small() {
	local rc=0
	for so in "$here"/check/*.so; do
		timeout 25 "$runner" check "$so" --tokens 1,7,32,33,300,2000 \
			--csv "$out/check.csv" --label shrunk || rc=1
	done
	return $rc
}
numerics_full() {
	local rc=0
	timeout 45 "$runner" check "$here/full/qwen3-30b-a3b.so" --tokens 1,64,1000 \
		--csv "$out/check.csv" --label full || rc=1
	timeout 45 "$runner" check "$here/full/mixtral-8x7b.so" --tokens 1,64 \
		--csv "$out/check.csv" --label full || rc=1
	return $rc
}
bench() {
	local rc=0
	for m in qwen3-30b-a3b:3 olmoe-1b-7b:3 mixtral-8x7b:2 deepseek-v3-tp8:2; do
		timeout 45 "$runner" bench "$here/full/${m%:*}.so" --tokens 1,16,256,4096 \
			--copies "${m#*:}" --csv "$out/bench.csv" --label "${m%:*}" || rc=1
	done
	return $rc
}
export here out runner
export -f numerics_small numerics_full bench
step numerics_shrunk 90 bash -c numerics_small
step numerics_full 80 bash -c numerics_full
step bench_moegen 105 bash -c bench
step torch_peers 45 python3 "$here/torch_peers.py" --csv "$out/torch.csv"
# out-of-bounds accesses and races in the kernels (a shrunk layer with groups
# and shared experts; both router paths)
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
step memcheck 20 "$sanitizer" --tool memcheck --error-exitcode 3 "$runner" check \
	"$here/check/deepseek-v2-lite.so" --tokens 7,33
step racecheck 20 "$sanitizer" --tool racecheck --error-exitcode 3 "$runner" check \
	"$here/check/deepseek-v2-lite.so" --tokens 33
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
echo "== summary"
cat "$out/steps.csv"
[ -f "$out/check.csv" ] && awk -F, 'NR > 1 { n++; if ($NF == "ok") ok++ } END {
	printf "numerics: %d of %d rows ok\n", ok, n }' "$out/check.csv"
[ -f "$out/check.csv" ] && grep -v ',ok$' "$out/check.csv"
[ -f "$out/bench.csv" ] && cat "$out/bench.csv"
[ -f "$out/torch.csv" ] && cat "$out/torch.csv"
exit $fail
