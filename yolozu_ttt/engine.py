"""The fused update over a ParamArena: one call per step, one host read of its scalars.

CPU groups run the C++ engine (``yolozu_ttt._C``); CUDA groups, and CPU groups under
``TRITON_INTERPRET=1``, run ``yolozu_ttt.kernels.update``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from . import _native
from .arena import ParamArena

STAT_KEYS = ("grad_norm", "grad_norm_clipped", "update_norm", "total_update_norm", "anchor_loss", "clip_coef",
             "restored")


def engine_module(arena: ParamArena) -> Any:
    """The module with the fused functions of the arena's backend: ``yolozu_ttt._C`` or Triton's."""
    if arena.groups[0].backend == "cpp":
        return _native.require_native()
    from .kernels import update

    return update


class UpdateEngine:
    """Adam (torch defaults) with clipping, snapshot and update norms, fused over the arena."""

    def __init__(self, arena: ParamArena, *, lr: float, max_grad_norm: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.arena = arena
        self.lr = float(lr)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        backends = {g.backend for g in arena.groups}
        if len(backends) != 1:
            raise RuntimeError(f"yolozu_ttt: parameters span several engines {sorted(backends)}")
        self.backend = backends.pop()

    def _engines(self) -> list:
        return [g.engine for g in self.arena.groups]

    def step(self, *, anchor_lambda: float = 0.0, write_snapshot: bool = True,
             extra: Sequence[torch.Tensor] = (), ema_momentum: float | None = None, restore_prob: float = 0.0,
             restore_seed: int = 0, restore_counter: int = 0) -> tuple[dict[str, float], list[float]]:
        """Apply one update (with CoTTA's teacher EMA and restore when asked); return its scalars and
        the values of ``extra`` (one host read)."""
        kwargs = dict(lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                      max_grad_norm=self.max_grad_norm, anchor_lambda=float(anchor_lambda),
                      write_snapshot=bool(write_snapshot), ema_momentum=ema_momentum,
                      restore_prob=float(restore_prob), restore_seed=int(restore_seed),
                      restore_counter=int(restore_counter))
        if write_snapshot:  # a snapshot already held (SAR's backup) is used as it is
            self.arena.hold_snapshot(in_grad=True)
        fused = engine_module(self.arena).fused_step(self._engines(), **kwargs)
        if self.backend == "cpp":
            return fused, [float(t.detach()) for t in extra]
        out = fused
        values = torch.cat([out.float().reshape(-1)] + [t.detach().float().reshape(1).to(out.device) for t in extra]).tolist()
        return dict(zip(STAT_KEYS, values[: len(STAT_KEYS)])), values[len(STAT_KEYS):]
