#!/usr/bin/env bash
# tests/fuzz/run.sh [SECONDS] [TARGET...]: build the libFuzzer targets with
# clang (-fsanitize=fuzzer,address,undefined), replay every regression input
# under tests/fuzz/regress/TARGET/, then fuzz each target for SECONDS (default
# 30) in one process per target (targets side by side, one per core), from seed corpora (specs/, tests/cases, tests/import,
# and small checkpoints tests/fuzz/seeds.py generates). Targets: spec, import,
# safetensors, index, gguf (default: all). Work files go to $MOE_FUZZ_DIR (default
# build-fuzz/): binaries, the growing corpora, crash artifacts, logs. Exits
# non-zero on a failed regression input or a new crash; prints per target the
# executions, the time and the coverage libFuzzer reports.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
secs=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(spec import safetensors index gguf)
out=${MOE_FUZZ_DIR:-$root/build-fuzz}
cc=${MOE_FUZZ_CC:-clang}
mkdir -p "$out/bin" "$out/corpus" "$out/artifacts" "$out/logs"

flags=(-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -g -O1
       -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wno-unused-parameter
       -Icompiler -Icompiler/import -Iruntime -Iruntime/core -Iruntime/io -Iruntime/ref -Iruntime/cpu
       -Iruntime/cuda -Itests/fuzz $(pkg-config --cflags libcjson yaml-0.1))
front=(compiler/front/spec_load.c compiler/front/spec_check.c compiler/front/diag.c
       compiler/link/output.c runtime/core/desc.c)
libs=($(pkg-config --libs libcjson yaml-0.1) -lm)

build() {
	local t=$1 src=()
	case $t in
	spec) src=(tests/fuzz/fuzz_spec.c "${front[@]}") ;;
	import) src=(tests/fuzz/fuzz_import.c compiler/import/import.c compiler/report.c
	        compiler/front/info.c runtime/io/gguf.c runtime/io/dequant.c runtime/io/safetensors.c runtime/ref/ref_util.c runtime/core/mem.c
	        runtime/ref/ref_quant.c "${front[@]}") ;;
	safetensors) src=(tests/fuzz/fuzz_safetensors.c runtime/io/safetensors.c) ;;
	index) src=(tests/fuzz/fuzz_index.c runtime/io/safetensors.c) ;;
	gguf) src=(tests/fuzz/fuzz_gguf.c runtime/io/gguf.c runtime/io/dequant.c runtime/ref/ref_util.c runtime/core/mem.c
	      runtime/ref/ref_quant.c runtime/core/desc.c) ;;
	*) echo "run.sh: unknown target '$t' (spec, import, safetensors, index, gguf)" >&2; exit 2 ;;
	esac
	"$cc" "${flags[@]}" "${src[@]}" "${libs[@]}" -o "$out/bin/fuzz_$t"
}

seed() {
	local t=$1 c=$out/corpus/$1
	mkdir -p "$c"
	case $t in
	spec) cp specs/*.yaml "$c/"
	      for f in tests/cases/*/*.yaml; do cp "$f" "$c/case-$(basename "$(dirname "$f")")-$(basename "$f")"; done ;;
	import) for d in tests/import/*/; do cp "$d/config.json" "$c/$(basename "$d").json"; done ;;
	safetensors | index | gguf) cp "$out"/seeds/$t/* "$c/" ;;
	esac
}

# One target: build, replay, fuzz. Its report goes to logs/TARGET.report.
one() {
	local t=$1 log=$out/logs/$1.log
	echo "== fuzz $t: build"
	build "$t"
	local reg=tests/fuzz/regress/$t
	if [ -d "$reg" ] && [ -n "$(ls -A "$reg")" ]; then
		echo "== fuzz $t: replay $(ls "$reg" | wc -l) regression inputs"
		if ! "$out/bin/fuzz_$t" "$reg"/* >"$out/logs/$t-regress.log" 2>&1; then
			echo "FAIL: a regression input of $t fails again:"; tail -30 "$out/logs/$t-regress.log"
			return 1
		fi
	fi
	seed "$t"
	mkdir -p "$out/artifacts/$t"
	echo "== fuzz $t: ${secs}s"
	local rc=0
	if ! "$out/bin/fuzz_$t" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 \
		-max_len=65536 -print_final_stats=1 -artifact_prefix="$out/artifacts/$t/" \
		"$out/corpus/$t" >"$log" 2>&1; then
		echo "FAIL: fuzz_$t found a crash (artifacts in $out/artifacts/$t):"; tail -40 "$log"
		rc=1
	fi
	local execs cov
	execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo ?)
	cov=$(grep -oE '(#[0-9]+)[[:space:]]+(DONE|INITED)[[:space:]]+cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || echo "cov: ?")
	echo "   $t: $execs executions in ${secs}s, $cov, corpus $(ls "$out/corpus/$t" | wc -l) files"
	return $rc
}

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# the generated checkpoints, once, before targets run side by side
case " ${targets[*]} " in
*" safetensors "* | *" index "* | *" gguf "*) python3 tests/fuzz/seeds.py "$out/seeds" ;;
esac
# The targets run side by side, one per core (each fuzzer is one process);
# each one's lines are printed together, in the order of the targets.
jobs=$(nproc)
pids=()
for t in "${targets[@]}"; do
	while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
		wait -n || true
	done
	one "$t" >"$out/logs/$t.report" 2>&1 &
	pids+=($!)
done
status=0
for i in "${!targets[@]}"; do
	wait "${pids[$i]}" || status=1
	cat "$out/logs/${targets[$i]}.report"
done
exit $status
