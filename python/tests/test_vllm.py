"""moegen.vllm against vLLM's own CPU experts: in one process (vllm_check.py)
and in two, data + expert parallel through vLLM's all-to-all (vllm_ep_check.py).

vLLM is far too big for the test virtual environment: the check runs with the
Python of a separate environment that has it — this Python when it imports
vllm, else $MOE_VLLM_VENV (default ~/.cache/moegen/vllm-venv, see
docs/python.md, "vLLM"), else the test is skipped with a message."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


def vllm_python():
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = os.environ.get("MOE_VLLM_VENV") or os.path.expanduser("~/.cache/moegen/vllm-venv")
    py = os.path.join(venv, "bin", "python")
    return py if os.path.exists(py) else None


def check(script, moegen_cmd, repo):
    """Run script with the vLLM Python; it must exit 0 and end with OK."""
    py = vllm_python()
    if py is None:
        pytest.skip("vllm is not installed here and no vLLM environment at $MOE_VLLM_VENV or "
                    "~/.cache/moegen/vllm-venv (docs/python.md, 'vLLM', says how to make one)")
    env = dict(os.environ, MOEGEN=moegen_cmd, PYTHONPATH=str(repo / "python"),
               VLLM_TARGET_DEVICE="cpu")
    r = subprocess.run([py, str(HERE / script)], env=env, capture_output=True, text=True,
                       timeout=900)
    print(r.stdout)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), r.stdout + r.stderr[-4000:]


def test_vllm_experts_match_vllm_cpu_experts(moegen_cmd, repo):
    check("vllm_check.py", moegen_cmd, repo)


def test_vllm_dp_ep_all2all_drives_moegen_experts(moegen_cmd, repo):
    """DP=2 / EP=2 in two processes through vLLM's allgather-reducescatter path."""
    check("vllm_ep_check.py", moegen_cmd, repo)
