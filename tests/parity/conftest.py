"""Parity tests: the package from the tree and the moegen command."""

import os
import pathlib
import shutil
import sys

import pytest

REPO = pathlib.Path(os.environ.get("MOE_SOURCE_DIR") or pathlib.Path(__file__).resolve().parents[2])
sys.path.insert(0, str(REPO / "python"))


@pytest.fixture(scope="session")
def moegen_cmd():
    """$MOEGEN, else build/moegen, else moegen on PATH."""
    exe = os.environ.get("MOEGEN") or str(REPO / "build" / "moegen")
    if not os.path.exists(exe):
        exe = shutil.which("moegen")
    if not exe:
        pytest.skip("the moegen command is not built (set MOEGEN or build ./build/moegen)")
    return exe
