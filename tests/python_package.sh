#!/usr/bin/env bash
# `pip install ./python` into a fresh virtual environment brings the compiler:
# moegen.compile() works with no moegen on PATH and no $MOEGEN, and the model
# it builds runs. Needs PyPI (scikit-build-core, numpy); exits 77 (skipped)
# with a message when the environment cannot be created or reached.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d /tmp/moegen-pip.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m venv "$tmp/venv" >/dev/null 2>&1; then
	echo "skipped: python3 -m venv failed"
	exit 77
fi
if ! "$tmp/venv/bin/pip" install -q "$src/python" >"$tmp/pip.log" 2>&1; then
	if grep -qiE "network|connection|resolve|No matching distribution" "$tmp/pip.log"; then
		echo "skipped: PyPI not reachable:"; tail -3 "$tmp/pip.log"
		exit 77
	fi
	echo "pip install ./python failed:"; tail -30 "$tmp/pip.log"
	exit 1
fi
cd "$tmp"
env -u MOEGEN PATH=/usr/bin:/bin "$tmp/venv/bin/python" - "$src/specs/mixtral-mini.yaml" <<'PY'
import os, shutil, sys
import numpy as np
import moegen
assert shutil.which("moegen") is None, "moegen must not be on PATH for this test"
exe = moegen._moegen_exe(None)
assert exe.startswith(os.path.dirname(moegen.__file__)), exe
out = moegen.compile(sys.argv[1], "m.so", sets=["model.hidden=32"])
m = moegen.load(out, seed=1)
y = m.forward(np.ones((3, 32), np.float32))
assert m.info.hidden == 32 and y.shape == (3, 32) and np.isfinite(y).all()
print("python_package: the installed package compiled and ran", m.info.name, "with", exe)
PY
