#!/usr/bin/env bash
# bench_spec_keys.sh: time the spec loader on specs with very many keys (the
# duplicate-key scan must stay O(n log n)). A benchmark, not a test: run it by
# hand and record the figures in docs/robustness.md.
#   scripts/bench_spec_keys.sh [N]   (N keys, default 1000000; MOEGEN=path/to/moegen)
set -euo pipefail
n=${1:-1000000}
moegen=${MOEGEN:-build/moegen}
dir=$(mktemp -d "${TMPDIR:-/tmp}/moegen-keys.XXXXXX")
trap 'rm -rf "$dir"' EXIT

# unique: N distinct keys in the root mapping; dup: N keys, 1000 distinct
# (N - 1000 duplicates); nested: N keys spread over 1000 mappings.
awk -v n="$n" 'BEGIN { print "moegen: 1"; for (i = 0; i < n; i++) printf "k%d: %d\n", i, i }' \
	>"$dir/unique.yaml"
awk -v n="$n" 'BEGIN { print "moegen: 1"; for (i = 0; i < n; i++) printf "k%d: %d\n", i % 1000, i }' \
	>"$dir/dup.yaml"
awk -v n="$n" 'BEGIN { print "moegen: 1"; for (i = 0; i < n; i++) {
	if (i % (n / 1000) == 0) printf "m%d:\n", i; printf "  k%d: %d\n", i, i } }' \
	>"$dir/nested.yaml"

now() { date +%s.%N; }
echo "moegen spec loader, $n keys ($(nproc) cores, $(uname -m))"
for f in unique dup nested; do
	for cmd in "-d spec" "check"; do
		t0=$(now)
		rc=0
		# shellcheck disable=SC2086
		"$moegen" $cmd "$dir/$f.yaml" >/dev/null 2>&1 || rc=$?
		t1=$(now)
		awk -v f="$f" -v c="$cmd" -v rc="$rc" -v a="$t0" -v b="$t1" \
			'BEGIN { printf "%-7s %-8s exit %d  %6.2f s\n", f, c, rc, b - a }'
	done
done
