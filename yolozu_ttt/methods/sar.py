"""SAR on the fused engine: sharpness-aware entropy minimisation in two forward/backward passes.

First pass: grads into the arena, grad norm and clip on the flat buffers, then one fused ascent
step that writes the pre-step snapshot as its backup. Second pass at the perturbed point, restore
from the snapshot, and Adam on the second grads (unclipped, like the reference).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from yolozu.tta import integration as _ref

from ..arena import ParamArena
from ..engine import UpdateEngine, read
from .loop import Method, StepOutcome, entropy


#: the reference's step entry
ENTRY_LAYOUT = ("step", "loss", "loss_first", "loss_second", "grad_norm", "grad_norm_clipped", "update_norm",
                "total_update_norm", "rolled_back", "sar_rho", "sar_rho_applied", "sar_adaptive", "sar_first_step_scale")


def pass_loss(model: Any, x: torch.Tensor, arena: ParamArena) -> torch.Tensor:
    """Forward, entropy and backward into the arena's (zeroed) grad buffers."""
    arena.zero_grad()
    loss = entropy(_ref._extract_logits(model(x)))
    arena.backward(loss)
    return loss


def poison(arena: ParamArena) -> None:
    """The reference's ascent with a NaN direction norm: back up, then every param with a grad is NaN."""
    arena.hold_snapshot()
    arena.save_snapshot()
    arena.fill_updated(float("nan"))


def ascend(arena: ParamArena, engine: UpdateEngine, rho: float, adaptive: bool,
           max_grad_norm: float | None) -> tuple[float, bool]:
    """Clip the first grads, then the ascent step (snapshot = backup); returns (pre-clip grad norm, applied)."""
    grad_norm = engine.clip_grads(max_grad_norm)
    if rho <= 0.0:
        return read(grad_norm)[0], False
    arena.hold_snapshot()  # the ascent's backup, kept through the second pass
    grad, direction_norm, applied = engine.sar_perturb(rho, adaptive, grad_norm)
    if not applied and math.isnan(direction_norm):
        poison(arena)
        applied = True
    return grad, applied


class SAR(Method):
    """Entropy at the sharpest nearby point: an ascent pass, then the update from the second grads."""

    batch_error = "SAR requires tensor batches from adapter.build_loader()"

    def select(self) -> list[torch.Tensor]:
        config = self.config
        self.rho, self.adaptive = float(config.sar_rho), bool(config.sar_adaptive)
        self.first_step_scale = float(config.sar_first_step_scale)
        self.rho_value = max(0.0, self.rho) * max(0.0, self.first_step_scale)
        return super().select()

    def max_grad_norm(self) -> float | None:
        return None  # the reference clips the first grads (the ascent), not the second ones

    def start(self, arena: ParamArena, engine: UpdateEngine) -> None:
        if self.rho_value > 0.0:
            arena.keep_own_snapshot()  # the backup lives through every second pass anyway

    def adapt(self, x: Any, step: int, arena: ParamArena, engine: UpdateEngine, write_snapshot: bool) -> StepOutcome:
        model = self.ctx.model
        loss_first = pass_loss(model, x, arena)
        grad_norm, applied = ascend(arena, engine, self.rho_value, self.adaptive, self.config.max_grad_norm)
        loss_second = pass_loss(model, x, arena)
        if applied:
            arena.restore_snapshot()
        stats, (first, second) = engine.step(write_snapshot=write_snapshot and not applied,
                                             extra=(loss_first, loss_second))
        clipped = grad_norm if self.config.max_grad_norm is not None else None
        return StepOutcome(loss=second, stats=stats, forwards=2, backwards=2, layout=ENTRY_LAYOUT, metrics={
            "loss_first": float(first), "loss_second": float(second), "grad_norm": grad_norm,
            "grad_norm_clipped": clipped, "sar_rho": self.rho, "sar_rho_applied": self.rho_value if applied else 0.0,
            "sar_adaptive": self.adaptive, "sar_first_step_scale": self.first_step_scale,
        })


METHOD = SAR
