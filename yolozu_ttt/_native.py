"""Loads the compiled extension ``yolozu_ttt._C`` and remembers why when it cannot."""
from __future__ import annotations

try:
    from . import _C  # type: ignore[attr-defined]

    LOAD_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised by doctor on broken installs
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def require_native():
    """Return the compiled module or raise with the reason it failed to load."""
    if _C is None:
        raise ImportError(f"yolozu_ttt._C is not available ({LOAD_ERROR}); reinstall with `pip install -e .`")
    return _C
