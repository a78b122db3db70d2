"""Facts every layer shares, defined once: the engine's stat layouts, the dtypes it holds, where
Triton runs (:func:`use_triton`) and the one check of a step's options.

Imported by the Python layer and by the Triton kernels (``yolozu_ttt.kernels``); it imports
nothing of this package, so the kernels never import the ops module that imports them. The C++
engine writes the same layouts by index (``csrc/engine.h``); a test checks the orders agree.
"""
from __future__ import annotations

import importlib.util
import os
from collections import namedtuple

import torch

#: ``TRITON_INTERPRET=1`` set before import: CPU tensors take the Triton kernels in Triton's
#: interpreter (the GPU code path on any machine). Read once, here only.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: ``YOLOZU_TTT_CUDA_GRAPH=1`` set before import: the update engine captures the fused update of a
#: CUDA arena in a CUDA graph and replays it (``yolozu_ttt.engine``). Read once, here only.
CUDA_GRAPH = os.environ.get("YOLOZU_TTT_CUDA_GRAPH", "0") == "1"

#: Triton is installed (optional: absent off Linux; only CUDA and the interpreter need it). Found, not
#: imported: importing it costs ~80 ms of every process's start-up, which a CPU run never uses (the
#: kernels modules import it when they first run).
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def triton_version() -> str | None:
    """The installed Triton's version from its package metadata (None without Triton), not imported:
    an export records it in its meta after the run, where importing Triton would cost a CPU process
    ~0.1-0.3 s it never uses (and an import a SIGTERM could interrupt)."""
    if not HAVE_TRITON:
        return None
    import importlib.metadata

    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # importable without metadata: its own attribute
        import triton

        return str(getattr(triton, "__version__", None) or "") or None


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether work on ``tensor`` takes the Triton kernels (the loss ops and the update engine).

    CUDA tensors: yes (when Triton is installed).  CPU tensors: only when the environment
    variable ``TRITON_INTERPRET=1`` was set before import (the kernels then run in Triton's
    interpreter).  Anything else uses the torch implementation (ops) or the C++ engine (update).
    """
    if not HAVE_TRITON:
        return False
    if tensor.device.type == "cuda":
        return True
    return INTERPRET and tensor.device.type == "cpu"


def check_step_options(lr: float, beta1: float, beta2: float, restore_prob: float) -> None:
    """The one validation of a fused step's options, run once per ``engine.StepSpec`` (both
    backends take the spec's options as they are and keep only memory-safety checks)."""
    if not restore_prob >= 0.0:
        raise ValueError("yolozu_ttt: restore_prob must be >= 0")
    if not lr >= 0.0:
        raise ValueError("yolozu_ttt: lr must be >= 0")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError("yolozu_ttt: betas must lie in [0, 1)")


#: Parameter (and fused-op input) dtypes the engine and the kernels handle.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: What one fused step writes into its float64 stats buffer, in this order (both engines).
STAT_KEYS = ("grad_norm", "grad_norm_clipped", "update_norm", "total_update_norm", "anchor_loss", "clip_coef",
             "restored")
#: What ``grad_stats`` writes: the grad norm (with the anchor gradient) and the anchor value.
GRAD_STAT_KEYS = ("grad_norm", "anchor_loss")
#: What ``sar_perturb`` writes: the ascent direction's norm and whether the ascent was applied (1/0).
SAR_STAT_KEYS = ("direction_norm", "applied")

#: One fused step's scalars on the host, read back once per step (``UpdateEngine.step``).
StepStats = namedtuple("StepStats", STAT_KEYS)


class RowStats(namedtuple("RowStats", STAT_KEYS)):
    """One fused step's scalars of K rows (replicas), read back once per step: each field a tuple of
    K floats, row i's at index i (``UpdateEngine.step`` over an arena of rows). Both backends write
    them as a (K, len(STAT_KEYS)) float64 buffer, row-major."""

    __slots__ = ()

    @classmethod
    def from_values(cls, values: list[float], k: int) -> "RowStats":
        """The stats of ``values``: K rows of ``len(STAT_KEYS)`` floats, row-major."""
        n = len(STAT_KEYS)
        return cls(*(tuple(values[j:n * k:n]) for j in range(n)))

    @property
    def k(self) -> int:
        """The number of rows."""
        return len(self[0])

    def row(self, i: int) -> StepStats:
        """Row ``i``'s stats, as a single run's."""
        return StepStats(*(field[i] for field in self))
