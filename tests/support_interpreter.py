"""Triton's interpreter (``TRITON_INTERPRET=1``): markers, its availability, and re-running a test file under it."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
from support_models import make_model


UNDER_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

skip_under_interpreter = pytest.mark.skipif(UNDER_INTERPRETER, reason="already under the interpreter")

only_under_interpreter = pytest.mark.skipif(not UNDER_INTERPRETER, reason="runs inside the interpreter subprocess")

def assert_triton_engine_runs() -> None:
    """Under the interpreter, a CPU arena's update engine is Triton's."""
    from yolozu_ttt.arena import ParamArena
    from yolozu_ttt.engine import backend_module

    model = make_model()
    with ParamArena(model, [model.bn.weight]) as arena:
        assert arena.backend == "triton" and backend_module(arena.backend).__name__.endswith("kernels.update")

_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def k(x_ptr, n, out_ptr, R: tl.constexpr):
    acc = tl.zeros([R], dtype=tl.float32)
    for i in range(0, n, R):
        idx = i + tl.arange(0, R)
        acc += tl.load(x_ptr + idx, mask=idx < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))
out = torch.zeros(1)
k[(1,)](torch.ones(40), 40, out, R=16)
assert out.item() == 40.0
"""

@functools.lru_cache(maxsize=None)
def triton_interpreter_problem() -> str | None:
    """Why the installed Triton's interpreter cannot run our kernels, or None when it can.

    Triton 3.6's interpreter with NumPy 2 fails on any loop to a runtime bound ("only
    0-dimensional arrays can be converted to Python scalars"); the compiled kernels are unaffected.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return f"this Triton's interpreter cannot run a loop to a runtime bound: {last[:200]}"

def run_under_interpreter(*pytest_args: str) -> None:
    """Run the selected tests again with TRITON_INTERPRET=1 (set before triton is imported, hence a
    subprocess): the GPU code path, Triton kernels in the interpreter on CPU tensors."""
    problem = triton_interpreter_problem()
    if problem:
        pytest.skip(problem)
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
