"""Stream mode's adapted state: the tensors it changes, packed into one byte tensor (broadcast to
every rank), saved beside the part files and loaded once, checked against the run's fingerprint."""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any

from .publish import WriteFailed, strerror

STREAM_STATE = "stream-state.pt"


class StoredReport:
    """What YOLOZU's ``main`` needs from a ``TTTReport``: ``to_dict()``."""

    def __init__(self, data: dict[str, Any] | None):
        self._data = data

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data) if self._data is not None else {}


def stream_tensors(model: Any, config: Any) -> list[Any]:
    """The selected parameters (YOLOZU's ``select_parameters`` with the run's filter) and every
    buffer (running statistics included): everything stream adaptation can change."""
    from yolozu.tta.ttt_mim import select_parameters

    params = select_parameters(model, update_filter=str(config.update_filter), include=config.include,
                               exclude=config.exclude)
    seen: set[int] = set()
    out = []
    for t in [*params, *(b for _, b in model.named_buffers() if b is not None)]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def pack(tensors: list[Any]) -> Any:
    import torch

    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    with torch.no_grad():
        return torch.cat([t.detach().reshape(-1).contiguous().view(torch.uint8) for t in tensors])


def unpack(flat: Any, tensors: list[Any]) -> None:
    import torch

    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel() * t.element_size()
            chunk = flat[offset:offset + n].to(t.device).clone()  # clone: offset 0, aligned for any dtype
            t.copy_(chunk.view(t.dtype).view(t.shape))
            offset += n
    if offset != flat.numel():
        raise RuntimeError(f"stream state has {flat.numel()} bytes, the model needs {offset}")


def nbytes(tensors: list[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)






def save_state(path: Path, fingerprint: str, report: dict[str, Any], engine: Any, flat: Any) -> None:
    """The adapted state, written to a temporary file beside ``path`` and renamed into place; a
    write error is a :class:`WriteFailed` naming ``path`` (a BaseException: YOLOZU's ``except
    Exception`` around ``run_ttt`` does not catch it)."""
    import torch

    tmp = path.with_name(f".{STREAM_STATE}.tmp-{os.getpid()}")
    try:
        torch.save({"fingerprint": fingerprint, "report": json.dumps(report), "engine": json.dumps(engine),
                    "flat": flat}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteFailed(f"cannot write {path}: {strerror(exc) if isinstance(exc, OSError) else exc}") from None


def load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved state (``report``, ``engine``, ``flat``) if it was made by this export (same
    ``fingerprint``), else None."""
    if not path.is_file():
        return None
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("fingerprint") != fingerprint:
        return None
    return {"report": json.loads(saved["report"]), "engine": json.loads(saved.get("engine") or "null"),
            "flat": saved["flat"]}


def clear_leftovers(parts_dir: Path) -> None:
    """A stream state cut short by a kill (its temporary file)."""
    for path in parts_dir.glob(f".{STREAM_STATE}.tmp-*"):
        with contextlib.suppress(OSError):
            path.unlink()
