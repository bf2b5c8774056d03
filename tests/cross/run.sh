#!/usr/bin/env bash
# tests/cross/run.sh MOEGEN AARCH64_BUILD: every spec in specs/, shrunk as
# scripts/check_specs.sh does, compiled with --triple aarch64-linux-gnu
# (no --cpu: the generic AArch64 CPU, NEON) into an aarch64 model.so linked
# with the aarch64 runtime archive, then run against the reference by the
# aarch64 `moegen run` (moe_check_runner) under qemu-user. Also: the cross
# compile prints nothing (no host CPU features handed to LLVM), and triples
# without a runtime are refused. Exits 77 when qemu-aarch64 is missing.
#
# SVE: a few specs compiled for SVE CPUs of a known vector length (a64fx,
# 512 bits; neoverse-v1, 256) run under qemu with that length against the
# reference; their up/down tiles are SVE (fmla on z registers) with no
# vector spills, neoverse-n1 (no SVE) has no SVE at all, and moe_create
# refuses the 512-bit code in a process with 256-bit vectors or no SVE (the
# code relies on the length it was generated for).
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
# name cpu qemu-cpu: SVE of a fixed length, and the vscale_range it implies
sve_runs=("a64fx max,sve512=on,sve-default-vector-length=64 4"
	  "neoverse-v1 max,sve256=on,sve-default-vector-length=32 2")
sve_specs=(mixtral-mini qwen3-30b-a3b deepseek-v3 soft-moe)
small=(--set model.hidden=64 --set experts.intermediate=64)
for run in "${sve_runs[@]}"; do
	read -r cpu qcpu vscale <<<"$run"
	for name in "${sve_specs[@]}"; do
		sets=("${small[@]}")
		grep -q '^shared_experts:' "specs/$name.yaml" &&
			sets+=(--set shared_experts.intermediate=32)
		so=$tmp/$name-$cpu.so
		if ! "$moegen" "specs/$name.yaml" "${sets[@]}" --triple aarch64-linux-gnu \
			--cpu "$cpu" -o "$so" >"$tmp/$name.log" 2>&1 || [ -s "$tmp/$name.log" ]; then
			echo "FAIL $name ($cpu): cross compile: $(head -5 "$tmp/$name.log")"
			fail=$((fail + 1))
			continue
		fi
		if ! out=$(timeout 300 qemu-aarch64 -cpu "$qcpu" -L /usr/aarch64-linux-gnu \
			"$runner" "$so" --random 3 --tokens 13 --threads 1 --reps 1 --check 2>&1); then
			echo "FAIL $name ($cpu, qemu $qcpu): $(grep -E 'check|error' <<<"$out" | head -3)"
			fail=$((fail + 1))
			continue
		fi
		ran=$((ran + 1))
		echo "ok $name ($cpu, SVE): $(grep -m1 'max rel err' <<<"$out")"
	done
	# the generated functions carry the length; the tiles are SVE, unspilled
	"$moegen" specs/mixtral-mini.yaml "${small[@]}" --triple aarch64-linux-gnu --cpu "$cpu" \
		--emit ll -o "$tmp/m.ll"
	"$moegen" specs/mixtral-mini.yaml "${small[@]}" --triple aarch64-linux-gnu --cpu "$cpu" \
		--emit asm -o "$tmp/m.s"
	if ! grep -q "vscale_range($vscale,$vscale)" "$tmp/m.ll"; then
		echo "FAIL $cpu: no vscale_range($vscale,$vscale) in the IR"
		fail=$((fail + 1))
	fi
	for fn in moe_up moe_down; do
		body=$(sed -n "/^$fn:/,/^.Lfunc_end/p" "$tmp/m.s")
		if ! grep -qE $'^\tfmla\tz[0-9]+\.s' <<<"$body" ||
			grep -qE $'^\t(ldr|str|ldp|stp|ld1w|st1w)\t[qz].*\[sp' <<<"$body"; then
			echo "FAIL $cpu: $fn is not SVE FMAs without vector spills"
			fail=$((fail + 1))
		fi
	done
done
"$moegen" specs/mixtral-mini.yaml "${small[@]}" --triple aarch64-linux-gnu --cpu neoverse-n1 \
	--emit asm -o "$tmp/n1.s"
if grep -qE '\<z[0-9]+\.|\<p[0-9]+/' "$tmp/n1.s"; then
	echo "FAIL neoverse-n1: SVE registers in code for a CPU without SVE"
	fail=$((fail + 1))
fi
for q in sve256=on,sve-default-vector-length=32 sve=off; do
	if out=$(timeout 300 qemu-aarch64 -cpu max,$q -L /usr/aarch64-linux-gnu "$runner" \
		"$tmp/mixtral-mini-a64fx.so" --random 3 --tokens 13 --threads 1 --reps 1 \
		--check 2>&1) || ! grep -q "generated for 512-bit SVE vectors" <<<"$out"; then
		echo "FAIL: 512-bit SVE code was not refused with qemu $q: $(head -3 <<<"$out")"
		fail=$((fail + 1))
	fi
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
