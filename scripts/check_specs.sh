#!/usr/bin/env bash
# Every spec in specs/, shrunk with --set so it runs in seconds, compiled for the
# CPU and run against the reference (moegen run --check) at several token
# counts. A spec whose router mode the CPU does not generate yet must be
# refused with the "not generated" error; anything else fails.
set -euo pipefail
cd "$(dirname "$0")/.."
moegen=${MOEGEN:-build/moegen}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0 ran=0 refused=0
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
	if ! log=$("$moegen" "$spec" "${sets[@]}" -O1 -o "$tmp/$name.so" 2>&1); then
		if grep -q 'not generated for target cpu' <<<"$log"; then
			echo "refused $name: $(grep -m1 'not generated' <<<"$log")"
			refused=$((refused + 1))
			continue
		fi
		echo "FAIL $name: compile: $log"
		fail=$((fail + 1))
		continue
	fi
	for T in ${MOE_CHECK_TOKENS:-1 7 64}; do
		if ! out=$("$moegen" run "$tmp/$name.so" --random 3 --tokens $T --reps 1 --check 2>&1); then
			echo "FAIL $name T=$T:"
			echo "$out"
			fail=$((fail + 1))
		fi
	done
	echo "ok $name ($(grep -m1 'max rel err' <<<"$out"))"
	ran=$((ran + 1))
done
echo "$ran specs checked against the reference, $refused refused, $fail failures"
[ $fail = 0 ]
