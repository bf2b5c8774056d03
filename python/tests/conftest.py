"""Shared fixtures: the repository root, the moegen command, tiny models."""

import os
import pathlib
import shutil
import sys

import pytest

REPO = pathlib.Path(os.environ.get("MOE_SOURCE_DIR") or pathlib.Path(__file__).resolve().parents[2])
sys.path.insert(0, str(REPO / "python"))  # the package from the tree, installed or not


def moegen_exe():
    """The moegen command: $MOEGEN, else build/moegen, else PATH; None if absent."""
    env = os.environ.get("MOEGEN")
    if env:
        return env
    p = REPO / "build" / "moegen"
    if p.exists():
        return str(p)
    return shutil.which("moegen")


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="session")
def moegen_cmd():
    exe = moegen_exe()
    if not exe or not os.path.exists(exe):
        pytest.skip("the moegen command is not built (set MOEGEN or build ./build/moegen)")
    return exe
