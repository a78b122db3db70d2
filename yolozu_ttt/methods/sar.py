"""SAR on the fused engine: sharpness-aware entropy minimisation in two forward/backward passes.

First pass: grads into the arena, grad norm and clip on the flat buffers, then one fused ascent
step that writes the pre-step snapshot as its backup. Second pass at the perturbed point, restore
from the snapshot, and Adam on the second grads (unclipped, like the reference). Nothing is read
in between: the grad norm and the ascent's stats come back with the step's one read, so the step
decides nothing on the host (graph mode captures it whole).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from yolozu.tta import integration as _ref

from ..arena import ParamArena
from ..engine import UpdateEngine
from .loop import Method, StepOutcome, entropy


#: the reference's step entry
ENTRY_LAYOUT = ("step", "loss", "loss_first", "loss_second", "grad_norm", "grad_norm_clipped", "update_norm",
                "total_update_norm", "rolled_back", "sar_rho", "sar_rho_applied", "sar_adaptive", "sar_first_step_scale")


def pass_loss(model: Any, x: torch.Tensor, arena: ParamArena, zero_grad: Callable[[], None]) -> torch.Tensor:
    """Forward, entropy and backward into the arena's grad buffers, zeroed by ``zero_grad`` first."""
    zero_grad()
    loss = entropy(_ref._extract_logits(model(x)))
    arena.backward(loss)
    return loss


def ascend(arena: ParamArena, engine: UpdateEngine, rho: float, adaptive: bool,
           max_grad_norm: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clip the first grads, then the ascent step, its backup in the arena's own snapshot (the
    pre-step values whenever rho > 0); returns the pre-clip grad norm and the ascent's (direction
    norm, applied) as device tensors, read with the step. A NaN direction norm applies: the
    parameters with a grad become NaN, as the reference's NaN scale makes them."""
    grad_norm = engine.clip_grads(max_grad_norm)
    if rho <= 0.0:
        return grad_norm, None
    arena.hold_snapshot()
    return grad_norm, engine.sar_perturb(rho, adaptive)


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

    def passes(self, x: Any, arena: ParamArena, engine: UpdateEngine,
               zero_grad: Callable[[], None]) -> tuple[torch.Tensor, ...]:
        """Both passes and the ascent between them, parameters restored after: the device scalars
        (first loss, second loss, pre-clip grad norm[, the ascent's direction norm and applied])."""
        model = self.ctx.model
        loss_first = pass_loss(model, x, arena, zero_grad)
        grad_norm, ascent = ascend(arena, engine, self.rho_value, self.adaptive, self.config.max_grad_norm)
        loss_second = pass_loss(model, x, arena, zero_grad)
        if ascent is None:
            return loss_first, loss_second, grad_norm
        arena.restore_snapshot()  # the backup: the pre-step values (a no-op copy where not applied)
        return loss_first, loss_second, grad_norm, ascent

    def step_body(self, arena: ParamArena, engine: UpdateEngine):
        """Nothing is decided on the host between the passes: the whole step can be captured."""
        return lambda x: self.passes(x, arena, engine, arena.clear_grads)

    def adapt(self, x: Any, step: int, arena: ParamArena, engine: UpdateEngine, write_snapshot: bool) -> StepOutcome:
        # with an ascent its backup is the step's snapshot (a rollback restores it)
        write_snapshot = write_snapshot and self.rho_value <= 0.0
        if self.step_graph is not None:
            stats, values = self.step_graph.step((x,), write_snapshot=write_snapshot)
        else:
            stats, values = engine.step(write_snapshot=write_snapshot,
                                        extra=self.passes(x, arena, engine, arena.zero_grad))
        first, second, grad_norm = values[:3]
        applied = len(values) > 3 and values[4] != 0.0
        clipped = grad_norm if self.config.max_grad_norm is not None else None
        return StepOutcome(loss=second, stats=stats, forwards=2, backwards=2, layout=ENTRY_LAYOUT, metrics={
            "loss_first": float(first), "loss_second": float(second), "grad_norm": grad_norm,
            "grad_norm_clipped": clipped, "sar_rho": self.rho, "sar_rho_applied": self.rho_value if applied else 0.0,
            "sar_adaptive": self.adaptive, "sar_first_step_scale": self.first_step_scale,
        })


METHOD = SAR
