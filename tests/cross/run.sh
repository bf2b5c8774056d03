#!/usr/bin/env bash
# tests/cross/run.sh MOEGEN AARCH64_BUILD: every spec in specs/, shrunk as
# scripts/check_specs.sh does, compiled with --triple aarch64-linux-gnu
# (no --cpu: the generic AArch64 CPU, NEON) into an aarch64 model.so linked
# with the aarch64 runtime archive, then run against the reference by the
# aarch64 `moegen run` (moe_check_runner) under qemu-user. Also: the cross
# compile prints nothing (no host CPU features handed to LLVM), and triples
# without a runtime are refused. Exits 77 when qemu-aarch64 is missing.
#
# One thread: qemu-user 7.2 as installed here hangs in pthread_create (a
# five-line program that creates and joins one thread hangs too), so the
# thread pool is not exercised under emulation.
set -euo pipefail
moegen=$1
build=$2
cd "$(dirname "$0")/../.."
if ! command -v qemu-aarch64 >/dev/null; then
	echo "skipped: qemu-aarch64 not installed (scripts/deps.sh installs qemu-user)"
	exit 77
fi
runner=$build/moe_check_runner
test -x "$runner"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0 ran=0
for spec in specs/*.yaml; do
	name=$(basename "$spec" .yaml)
	sets=(--set model.hidden=64)
	if grep -q 'kind: single_neuron' "$spec"; then
		sets+=(--set experts.count=256 --set product_key.sub_keys=16
		       --set product_key.query_dim=16 --set product_key.top_k=4)
	else
		sets+=(--set experts.intermediate=64)
	fi
	grep -q '^shared_experts:' "$spec" && sets+=(--set shared_experts.intermediate=32)
	if ! "$moegen" "$spec" "${sets[@]}" --triple aarch64-linux-gnu -o "$tmp/$name.so" \
		>"$tmp/$name.log" 2>&1 || [ -s "$tmp/$name.log" ]; then
		echo "FAIL $name: cross compile: $(head -5 "$tmp/$name.log")"
		fail=$((fail + 1))
		continue
	fi
	for T in 13; do
		if ! out=$(timeout 300 qemu-aarch64 -L /usr/aarch64-linux-gnu "$runner" \
			"$tmp/$name.so" --random 3 --tokens $T --threads 1 --reps 1 --check 2>&1); then
			echo "FAIL $name T=$T: $(grep -E 'check|error' <<<"$out" | head -3)"
			fail=$((fail + 1))
			continue
		fi
		ran=$((ran + 1))
	done
	echo "ok $name (aarch64): $(grep -m1 'max rel err' <<<"$out")"
done
for t in x86_64-pc-windows-msvc riscv64-linux-gnu armv7-linux-gnueabi; do
	if "$moegen" specs/mixtral-mini.yaml --triple $t --emit obj -o "$tmp/x.o" >"$tmp/r.log" 2>&1 ||
		! grep -q "has no moegen runtime" "$tmp/r.log"; then
		echo "FAIL: triple $t was not refused: $(cat "$tmp/r.log")"
		fail=$((fail + 1))
	fi
done
echo "cross_aarch64: $ran checks passed, $fail failures"
[ $fail -eq 0 ]
