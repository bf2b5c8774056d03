#!/usr/bin/env bash
# Parity with Hugging Face transformers (docs/parity.md) and the Python binding's
# tests (docs/python.md): a virtual environment with torch and transformers from
# PyPI, moegen built if MOEGEN is not set, then pytest. Exits 0 with a
# "skipped:" line only when torch cannot be installed. Extra arguments go to
# pytest (e.g. -k mixtral), which runs one worker per core.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
venv=${MOE_PARITY_VENV:-build-parity/venv}
python=${PYTHON:-python3}

t0=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
	"$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch, transformers, safetensors, numpy, pytest, matplotlib, gguf, accelerate' 2>/dev/null; then
	echo "parity: installing tests/parity/requirements.txt into $venv (torch is about 3 GB)"
	if ! "$venv/bin/python" -m pip install -q -r tests/parity/requirements.txt; then
		if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
			echo "skipped: torch could not be installed from PyPI (see pip's output above)"
			exit 0
		fi
		echo "parity: error: pip failed for a package other than torch" >&2
		exit 1
	fi
fi
t1=$(date +%s)
echo "parity: python packages ready in $((t1 - t0)) s"

if [ -z "${MOEGEN:-}" ]; then
	build=${MOE_PARITY_BUILD:-build}
	cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build "$build" -j"$(nproc)" --target moegen
	export MOEGEN=$root/$build/moegen
fi
export MOE_SOURCE_DIR=$root

# One worker per core (pytest-xdist; each test has its own temporary
# directory). A venv made before xdist was in the requirements gets it here;
# without it (PyPI unreachable) the tests run in one process.
workers=()
if ! "$venv/bin/python" -c 'import xdist' 2>/dev/null; then
	"$venv/bin/python" -m pip install -q pytest-xdist || true
fi
if "$venv/bin/python" -c 'import xdist' 2>/dev/null; then
	workers=(-n "$(nproc)")
fi
"$venv/bin/python" -m pytest -q -rxXfs -p no:cacheprovider "${workers[@]}" --rootdir "$root" \
	tests/parity python/tests "$@"
