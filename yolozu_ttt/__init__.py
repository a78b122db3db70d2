"""yolozu_ttt: a compiled, fused test-time adaptation backend for YOLOZU.

``yolozu_ttt.run_ttt`` is a drop-in replacement for ``yolozu.tta.integration.run_ttt``.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def build_info() -> dict[str, Any]:
    """What this install can do: compiled engine, OpenMP threads, Triton, CUDA, methods."""
    from . import _native
    from .common import triton_version

    try:
        import torch

        cuda = bool(torch.cuda.is_available())
        torch_version: str | None = str(torch.__version__)
    except Exception:  # pragma: no cover
        cuda, torch_version = False, None
    from .run import accelerated_methods

    native = _native._C
    return {
        "version": __version__,
        "cpp_extension": native is not None,
        "cpp_extension_error": _native.LOAD_ERROR,
        "openmp": bool(native.openmp()) if native is not None else False,
        "threads": int(native.num_threads()) if native is not None else 1,
        "triton": triton_version(),
        "cuda": cuda,
        "torch": torch_version,
        "accelerated_methods": accelerated_methods(),
    }


def __getattr__(name: str) -> Any:
    """``yolozu_ttt.run_ttt``, imported on first use: importing the package itself reaches no YOLOZU
    name, so the command line can report an unsupported YOLOZU (``seam.UnsupportedYolozu``) in one
    line instead of a traceback."""
    if name == "run_ttt":
        from .run import run_ttt

        return run_ttt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["__version__", "build_info", "run_ttt"]
