"""Where a tensor's work runs: Triton (CUDA, or CPU under TRITON_INTERPRET=1) or the CPU engine."""
from __future__ import annotations

import os

import torch


def triton_interpret() -> bool:
    """Whether Triton kernels run in the interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """CUDA tensors take Triton kernels; CPU tensors too when the interpreter is on."""
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and triton_interpret()
