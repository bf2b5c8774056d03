#!/usr/bin/env bash
# Regenerate generated/<target>/ from specs/ (or, with --check, regenerate into
# a temporary directory and fail when the committed files differ: stale).
# Specs whose router mode a target does not generate yet are listed, not written.
set -euo pipefail
cd "$(dirname "$0")/.."
moegen=${MOEGEN:-build/moegen}
check=0
[ "${1:-}" = "--check" ] && check=1
out=generated
[ $check = 1 ] && out=$(mktemp -d) && trap 'rm -rf "$out"' EXIT

gen_cpu() {
	local dir=$out/x86-64-v3 spec name log
	mkdir -p "$dir"
	for spec in specs/*.yaml; do
		name=$(basename "$spec" .yaml)
		if ! log=$("$moegen" "$spec" --emit ll --cpu x86-64-v3 \
			--triple x86_64-unknown-linux-gnu -o "$dir/$name.ll" 2>&1); then
			if grep -q 'not generated' <<<"$log"; then
				echo "skip x86-64-v3/$name: $(grep -m1 'not generated' <<<"$log")"
			else
				echo "$log" >&2
				exit 1
			fi
		fi
	done
	# bf16 compute (the bf16 dot instructions): x86-64-v3 plus AVX-512 with bf16
	"$moegen" specs/qwen3-30b-a3b.yaml --set dtype.weights=bf16 --emit ll --cpu x86-64-v3 \
		--features +avx512f,+avx512vl,+avx512bw,+avx512dq,+avx512bf16 \
		--triple x86_64-unknown-linux-gnu -o "$dir/qwen3-30b-a3b.bf16.ll"
}

gen_cuda() {
	local dir=$out/cuda spec name log
	mkdir -p "$dir"
	for spec in specs/*.yaml; do
		name=$(basename "$spec" .yaml)
		if ! log=$("$moegen" "$spec" --target cuda --emit cu -o "$dir/$name.cu" 2>&1); then
			if grep -q 'not generated' <<<"$log"; then
				echo "skip cuda/$name: $(grep -m1 'not generated' <<<"$log")"
			else
				echo "$log" >&2
				exit 1
			fi
		fi
	done
}

gen_cpu
gen_cuda
if [ $check = 1 ]; then
	stale=0
	for t in x86-64-v3 cuda; do
		if ! diff -r "generated/$t" "$out/$t" >/dev/null; then
			echo "generated/$t is stale: run scripts/regen.sh and commit the diff" >&2
			diff -r "generated/$t" "$out/$t" | head -40 >&2
			stale=1
		else
			echo "generated/$t is up to date"
		fi
	done
	exit $stale
fi
