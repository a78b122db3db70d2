"""TTT-MIM on the fused engine: masked-patch reconstruction of the selected parameters.

Plain models reconstruct the masked input (fused patch-grid ops; the full-resolution mask is
never built); models with ``enable_mim`` take YOLOZU's structured branch (feature-level
reconstruction against the geometry teacher, plus 0.1 x the model's entropy term).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from yolozu.tta import ttt_mim as _mim

from .. import ops
from ..arena import ParamArena
from ..common import SUPPORTED_DTYPES
from ..engine import UpdateEngine
from .loop import Method, StepOutcome

try:  # the structured loss YOLOZU uses when rtdetr_pose is importable
    from rtdetr_pose.losses import mim_reconstruction_loss as structured_loss
except ImportError:  # pragma: no cover
    structured_loss = _mim.reconstruction_loss

ENTROPY_WEIGHT = 0.1
#: the reference's step entry
ENTRY_LAYOUT = ("step", "loss", "mask_ratio", "grad_norm", "grad_norm_clipped", "mim_loss", "entropy_loss",
                "update_norm", "total_update_norm", "rolled_back")


def draw_grid(x: torch.Tensor, patch_size: int, mask_prob: float, generator: torch.Generator | None):
    """The reference's patch grid (same generator call); a seeded draw off the CPU runs on the CPU and
    goes to a CUDA input's device from pinned memory without a host sync."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if height <= 0 or width <= 0:
        raise ValueError("height/width must be positive")
    if patch_size <= 0:
        raise ValueError("patch_size must be positive")
    shape = (max(1, int((height + patch_size - 1) / patch_size)), max(1, int((width + patch_size - 1) / patch_size)))
    if generator is not None and x.device != generator.device:
        grid = torch.rand(shape, generator=generator, device=generator.device) < float(mask_prob)
        if x.device.type == "cuda":
            return grid.pin_memory().to(x.device, non_blocking=True)
        return grid.to(x.device)
    return torch.rand(shape, generator=generator, device=x.device) < float(mask_prob)


def mask_ratio(grid: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Mean of the cropped full-resolution mask (fp32, as the reference's), counted from the grid."""
    count = ops.mask_count(grid, (1, 1, height, width), patch_size)
    return count.to(torch.float32) / float(height * width)


def full_mask(grid: torch.Tensor, x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The full-resolution mask ``generate_block_mask`` would have returned for ``grid``."""
    return ops.expand_patch_mask(grid, int(x.shape[-2]), int(x.shape[-1]), patch_size)


def fast_input(x: Any) -> bool:
    """Whether the fused patch ops take ``x`` (a float BCHW/CHW tensor)."""
    return isinstance(x, torch.Tensor) and x.ndim in (3, 4) and x.dtype in SUPPORTED_DTYPES


def mask_input(x: Any, grid: torch.Tensor, patch_size: int, mask_value: float) -> torch.Tensor:
    """``apply_mask(x, mask)`` on the grid; other inputs take the reference (and its errors)."""
    if fast_input(x):
        return ops.apply_patch_mask(x, grid, patch_size=patch_size, mask_value=mask_value)
    return _mim.apply_mask(x, full_mask(grid, x, patch_size), mask_value=mask_value)


def recon_loss(pred: Any, x: Any, grid: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``reconstruction_loss(pred, x, mask=mask)`` on the grid when shapes, dtypes and devices agree."""
    if (fast_input(x) and isinstance(pred, torch.Tensor) and pred.shape == x.shape and pred.dtype == x.dtype
            and pred.device == x.device):
        return ops.masked_reconstruction_loss(pred, x, grid, patch_size=patch_size)
    return _mim.reconstruction_loss(pred, x, mask=full_mask(grid, x, patch_size))


def plain_forward(model: Any, x: Any, grid: torch.Tensor, patch_size: int, mask_value: float):
    """Masked forward and loss of ``ttt_mim_step``; returns ``(loss, None, None, mask_ratio)``."""
    output = model(mask_input(x, grid, patch_size, mask_value))
    loss = recon_loss(_mim._default_recon_fn(output), x, grid, patch_size)
    return loss, None, None, mask_ratio(grid, int(x.shape[-2]), int(x.shape[-1]), patch_size)


def structured_forward(model: Any, x: Any, grid: torch.Tensor, patch_size: int, mask_value: float):
    """Forward and loss of ``ttt_structured_mim_step``; returns ``(loss, loss_mim, entropy, ratio)``."""
    mask = full_mask(grid, x, patch_size)
    output = model(x, geom_input=_mim._default_geom_input(x), feature_mask=mask, return_mim=True)
    if not isinstance(output, dict):
        raise RuntimeError("structured MIM expects model output dict")
    mim = output.get("mim")
    if not isinstance(mim, dict):
        raise RuntimeError("structured MIM expected output['mim']")
    recon_feat, teacher_feat = mim.get("recon_feat"), mim.get("teacher_feat")
    if recon_feat is None or teacher_feat is None:
        raise RuntimeError("structured MIM expected recon_feat and teacher_feat")
    mask_out = mim.get("mask")
    loss_mim = structured_loss(recon_feat, teacher_feat, mask=mask_out)
    entropy = mim.get("entropy")
    loss = loss_mim
    if entropy is not None:
        entropy = entropy.to(dtype=loss_mim.dtype)
        loss = loss + (ENTROPY_WEIGHT * entropy)
    if mask_out is not None:
        ratio = mask_out.to(dtype=torch.float32).mean()
    else:
        ratio = mask_ratio(grid, int(x.shape[-2]), int(x.shape[-1]), patch_size)
    return loss, loss_mim, entropy, ratio


class MIM(Method):
    """Masked-patch reconstruction (YOLOZU's structured branch for models with ``enable_mim``)."""

    def select(self) -> list[torch.Tensor]:
        config = self.config
        self.patch_size, self.mask_prob = int(config.mim_patch_size), float(config.mim_mask_prob)
        self.mask_value = float(config.mim_mask_value)
        self.structured = _mim.supports_structured_mim(self.ctx.model)
        return super().select()

    def passes(self, x: Any, grid: torch.Tensor, arena: ParamArena,
               zero_grad: Callable[[], None]) -> tuple[torch.Tensor, ...]:
        """Masked forward, loss and backward: (loss, mask ratio[, mim loss, entropy]) as device scalars."""
        forward = structured_forward if self.structured else plain_forward
        loss, loss_mim, entropy, ratio = forward(self.ctx.model, x, grid, self.patch_size, self.mask_value)
        zero_grad()
        arena.backward(loss)
        return tuple(t for t in (loss, ratio, loss_mim, entropy) if t is not None)

    def step_body(self, arena: ParamArena, engine: UpdateEngine):
        """The patch grid is drawn on the host before the step and goes in as the graph's second input."""
        return lambda x, grid: self.passes(x, grid, arena, arena.clear_grads)

    def adapt(self, x: Any, step: int, arena: ParamArena, engine: UpdateEngine, write_snapshot: bool) -> StepOutcome:
        grid = draw_grid(x, self.patch_size, self.mask_prob, self.ctx.generator)
        if self.step_graph is not None:
            stats, values = self.step_graph.step((x, grid), write_snapshot=write_snapshot)
        else:
            stats, values = engine.step(write_snapshot=write_snapshot,
                                        extra=self.passes(x, grid, arena, arena.zero_grad))
        return StepOutcome(loss=values[0], stats=stats, layout=ENTRY_LAYOUT, metrics={
            "mask_ratio": float(values[1]),
            "mim_loss": values[2] if len(values) > 2 else None,
            "entropy_loss": values[3] if len(values) > 3 else None,
        })

    def after_step(self, outcome: StepOutcome) -> None:
        self.ctx.mask_ratios.append(outcome.metrics["mask_ratio"])


METHOD = MIM
