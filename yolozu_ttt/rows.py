"""RowArena: K rows (replicas) of one group's selected parameters, for the update engine.

Sample-parallel runs adapt K images at once, each by its own replica of the selected parameters.
A :class:`RowArena` holds their per-element state as flat (K, N) buffers, row i replica i's, N the
parameters' elements back to back (``sizes``, in order): the values, grads, base (each row's start)
and Adam moments, plus the snapshot rows a step writes. ``UpdateEngine(RowArena(...))`` binds it as
one group of K rows: one fused call steps every row, each with its own stats
(:class:`~yolozu_ttt.common.RowStats`), and :meth:`UpdateEngine.stop_rows
<yolozu_ttt.engine.UpdateEngine.stop_rows>` rolls a row back from its snapshot row
(:meth:`restore_rows`) and freezes it while the others go on.

The caller owns the (K, N) tensors (e.g. views its passes write the grads into); the arena binds
them as they are, keeps their layout and never reallocates them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .arena import ArenaListener, GroupBinding, GroupBuffers, Watch
from .common import SUPPORTED_DTYPES
from .engine import backend_for


def _rows_like(t: Any, what: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` checked to be a contiguous tensor of ``like``'s shape and device and of ``dtype``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"yolozu_ttt: RowArena: {what} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape or t.device != like.device or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"yolozu_ttt: RowArena: {what} must be a contiguous {tuple(like.shape)} {dtype} tensor "
                         f"on {like.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t


class RowArena:
    """K rows of flat per-element state: see the module docstring.

    Parameters:
        flat: (K, N) values (float32, bfloat16 or float16), updated in place by the engine.
        grad: (K, N) grads, same dtype.
        base: (K, N) each row's start (the anchor of the total-update norm, EATA and the restore).
        sizes: the parameters' element counts, summing to N.
        exp_avg, exp_avg_sq: (K, N) float32 Adam moments (None: allocated here).
    """

    def __init__(self, flat: torch.Tensor, grad: torch.Tensor, base: torch.Tensor, sizes: Sequence[int], *,
                 exp_avg: torch.Tensor | None = None, exp_avg_sq: torch.Tensor | None = None):
        if not isinstance(flat, torch.Tensor) or flat.dim() != 2 or flat.dtype not in SUPPORTED_DTYPES:
            raise ValueError("yolozu_ttt: RowArena: flat must be a (K, N) float32, bfloat16 or float16 tensor")
        sizes = [int(n) for n in sizes]
        if any(n < 0 for n in sizes) or sum(sizes) != flat.shape[1]:
            raise ValueError(f"yolozu_ttt: RowArena: sizes {sizes} must sum to the rows' {flat.shape[1]} elements")
        _rows_like(flat, "flat", flat, flat.dtype)
        _rows_like(grad, "grad", flat, flat.dtype)
        _rows_like(base, "base", flat, flat.dtype)
        moments = [torch.zeros(flat.shape, dtype=torch.float32, device=flat.device) if m is None
                   else _rows_like(m, name, flat, torch.float32)
                   for m, name in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq"))]
        self.rows, self.row_numel = int(flat.shape[0]), int(flat.shape[1])
        self.flat, self.grad, self.base = flat, grad, base
        self.exp_avg, self.exp_avg_sq = moments
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        buffers = GroupBuffers(backend=backend_for(flat), offsets=offsets, sizes=sizes, flat=flat.view(-1),
                               grad=grad.view(-1), exp_avg=moments[0].view(-1), exp_avg_sq=moments[1].view(-1),
                               base=base.view(-1), has_grad=bytearray(b"\x01" * len(sizes)))
        self.watch = Watch()
        #: the one group (the engine binds ``groups``; ``base`` is what the C++ engine reads)
        self.groups = [GroupBinding(buffers=buffers, params=[], originals=[], base=base.view(-1), watch=self.watch)]

    def listen(self, listener: ArenaListener | None) -> None:
        """``listener`` (the update engine's backend objects; held weakly) is told when the snapshot
        buffer changes; None: no one. One at a time (the arena holds buffers only)."""
        self.watch.listen(listener)

    @property
    def backend(self) -> str:
        return self.groups[0].backend

    @property
    def device(self) -> torch.device:
        return self.flat.device

    @property
    def numel(self) -> int:
        return self.flat.numel()

    @property
    def has_grad(self) -> bytearray:
        """One byte per parameter, shared by the rows (0: the parameter has no grad this step, so no
        row steps it, as a run alone skips a tensor without a grad); all set by default."""
        return self.groups[0].has_grad

    @property
    def snap(self) -> torch.Tensor | None:
        """The held snapshot rows (K, N), or None."""
        snap = self.groups[0].snap
        return None if snap is None else snap.view(self.rows, self.row_numel)

    # ---- the snapshot rows ----------------------------------------------------------------
    def hold_snapshot(self, *, in_grad: bool = False) -> None:
        """Bind a snapshot buffer unless one is held: the grad rows themselves (``in_grad``: the
        step reads each grad before it writes the snapshot over it; ends at :meth:`zero_grad`) or
        (K, N) rows of its own."""
        g = self.groups[0]
        if g.snap is None:
            g.set_snap(g.buffers.grad if in_grad else torch.empty_like(g.flat))

    def drop_snapshot(self) -> None:
        """Unbind the snapshot buffer."""
        self.groups[0].set_snap(None)

    def save_snapshot(self) -> None:
        """Copy every row's values into the held snapshot rows."""
        self._snap_or_raise().copy_(self.flat)

    def restore_snapshot(self) -> None:
        """Every row back to its snapshot row, bit-exactly (SAR's backup after its second pass)."""
        with torch.no_grad():
            self.flat.copy_(self._snap_or_raise())

    def restore_rows(self, rows: Sequence[int]) -> None:
        """Rows ``rows`` back to their snapshot rows, bit-exactly (the others untouched)."""
        snap = self._snap_or_raise()
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.flat.index_copy_(0, index, snap.index_select(0, index))

    def _snap_or_raise(self) -> torch.Tensor:
        snap = self.snap
        if snap is None:
            raise RuntimeError("yolozu_ttt: rollback needs a snapshot: no step wrote one")
        return snap

    # ---- grads ----------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the grad rows; a snapshot held in them ends here."""
        g = self.groups[0]
        if g.snap is g.buffers.grad:
            g.set_snap(None)
        self.grad.zero_()

    def mark_all_grads(self) -> None:
        """Treat every parameter as having a grad."""
        self.has_grad[:] = b"\x01" * len(self.has_grad)

    def scale_grads(self, coef: torch.Tensor) -> None:
        """Multiply each row's grads by its coefficient (``coef``: (K,) or a scalar, on any device)."""
        with torch.no_grad():
            coef = coef.to(self.grad.device)
            self.grad.mul_(coef.reshape(-1, 1) if coef.numel() > 1 else coef)
