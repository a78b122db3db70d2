"""SAR on the fused engine: sharpness-aware entropy minimisation in two forward/backward passes.

First pass: grads into the arena, grad norm and clip on the flat buffers, then one fused ascent
step that writes the pre-step snapshot as its backup. Second pass at the perturbed point, restore
from the snapshot, and Adam on the second grads (unclipped, like the reference). Nothing is read
in between: the grad norm and the ascent's stats come back with the step's one read, so the step
decides nothing on the host.
"""
from __future__ import annotations

from typing import Any

import torch
from ..seam import integration as _ref

from .loop import Method, StepOutcome, entropy


#: the reference's step entry
ENTRY_LAYOUT = ("step", "loss", "loss_first", "loss_second", "grad_norm", "grad_norm_clipped", "update_norm",
                "total_update_norm", "rolled_back", "sar_rho", "sar_rho_applied", "sar_adaptive", "sar_first_step_scale")


class SAR(Method):
    """Entropy at the sharpest nearby point: an ascent pass, then the update from the second grads."""

    batch_error = "SAR requires tensor batches from adapter.build_loader()"
    preclip_norm_reported = True

    def select(self) -> list[torch.Tensor]:
        config = self.config
        self.rho, self.adaptive = float(config.sar_rho), bool(config.sar_adaptive)
        self.first_step_scale = float(config.sar_first_step_scale)
        self.rho_value = max(0.0, self.rho) * max(0.0, self.first_step_scale)
        self.snapshot_backup = self.rho_value > 0.0  # the ascent's backup is the step's snapshot
        return super().select()

    def max_grad_norm(self) -> float | None:
        return None  # the reference clips the first grads (the ascent), not the second ones

    def update_options(self) -> dict[str, Any]:
        # with an ascent its backup is the step's snapshot (a rollback restores it)
        return {"write_snapshot": False} if self.snapshot_backup else {}

    def start(self) -> None:
        if self.snapshot_backup:
            self.arena.keep_own_snapshot()  # the backup lives through every second pass anyway

    @staticmethod
    def loss(net: Any, x: torch.Tensor) -> torch.Tensor:
        """One image's entropy."""
        return entropy(_ref._extract_logits(net(x)))

    def passes(self, run: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The first pass; its grads clipped (pre-clip norm kept), the ascent with the pre-step
        values as backup; the second pass at the perturbed point, its grads in place of the first;
        the parameters restored: (first loss, second loss, pre-clip grad norm[, the ascent's
        direction norm and applied]). A NaN direction norm applies: the parameters with a grad
        become NaN, as the reference's NaN scale makes them."""
        (loss_first,) = run.backward(self.loss, x)
        grad_norm = run.engine.clip_grads(self.config.max_grad_norm)
        ascent = ()
        if self.rho_value > 0.0:
            run.arena.hold_snapshot()
            ascent = (run.engine.sar_perturb(self.rho_value, self.adaptive),)
        (loss_second,) = run.backward(self.loss, x, replace=True)
        if ascent:
            run.arena.restore_snapshot()  # the backup: the pre-step values (a no-op copy where not applied)
        return (loss_first, loss_second, grad_norm) + ascent

    def outcome(self, stats: Any, values: list[float], step: int, i: int) -> StepOutcome:
        first, second, grad_norm = values[:3]
        applied = len(values) > 3 and values[4] != 0.0
        return StepOutcome(loss=second, stats=stats, forwards=2, backwards=2, layout=ENTRY_LAYOUT, metrics={
            "loss_first": float(first), "loss_second": float(second), "grad_norm": grad_norm,
            "sar_rho": self.rho, "sar_rho_applied": self.rho_value if applied else 0.0,
            "sar_adaptive": self.adaptive, "sar_first_step_scale": self.first_step_scale,
        })


METHOD = SAR
