"""TTT-MIM on the fused engine: masked-patch reconstruction of the selected parameters.

Plain models reconstruct the masked input (fused patch-grid ops; the full-resolution mask is
never built); models with ``enable_mim`` take YOLOZU's structured branch (feature-level
reconstruction against the geometry teacher, plus 0.1 x the model's entropy term).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from ..seam import ttt_mim as _mim

from ..masking import draw_grid, full_mask, mask_input, mask_ratio, recon_loss, vmap_feature_loss
from .loop import Method, StepOutcome

try:  # the structured loss YOLOZU uses when rtdetr_pose is importable
    from rtdetr_pose.losses import mim_reconstruction_loss as structured_loss
except ImportError:  # pragma: no cover
    structured_loss = _mim.reconstruction_loss

ENTROPY_WEIGHT = 0.1
#: the reference's step entry
ENTRY_LAYOUT = ("step", "loss", "mask_ratio", "grad_norm", "grad_norm_clipped", "mim_loss", "entropy_loss",
                "update_norm", "total_update_norm", "rolled_back")


def plain_forward(model: Any, x: Any, grid: torch.Tensor, patch_size: int, mask_value: float, batched: bool = False):
    """Masked forward and loss of ``ttt_mim_step``; returns ``(loss, None, None, mask_ratio)``
    (``batched``: under vmap, see ``masking.recon_loss``)."""
    output = model(mask_input(x, grid, patch_size, mask_value))
    loss = recon_loss(_mim._default_recon_fn(output), x, grid, patch_size, batched=batched)
    return loss, None, None, mask_ratio(grid, int(x.shape[-2]), int(x.shape[-1]), patch_size)


def structured_forward(model: Any, x: Any, grid: torch.Tensor, patch_size: int, mask_value: float,
                       feature_loss=structured_loss):
    """Forward and loss of ``ttt_structured_mim_step``; returns ``(loss, loss_mim, entropy, ratio)``
    (the sample-parallel replicas pass the ``vmap``-able feature loss)."""
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
    loss_mim = feature_loss(recon_feat, teacher_feat, mask=mask_out)
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

    def why_not_parallel(self) -> str | None:
        if self.structured and structured_loss is _mim.reconstruction_loss:  # pragma: no cover
            return "MIM's structured branch without rtdetr_pose's loss (the one masking.vmap_feature_loss follows)"
        return None

    def inputs(self, x: Any, i: int) -> tuple[Any, torch.Tensor]:
        """The batch and the patch grid, drawn on the host before the step from image i's stream (its
        run's generator, seeded as alone; unseeded, torch's global stream)."""
        return x, draw_grid(x, self.patch_size, self.mask_prob, self.ctxs[i].generator)

    def loss(self, net: Any, x: Any, grid: torch.Tensor, batched: bool = False) -> tuple[torch.Tensor, ...]:
        """One image's masked forward and loss: (loss, mask ratio[, mim loss, entropy]); ``batched``:
        under vmap, the losses without a host branch (``masking``)."""
        if self.structured:
            feature_loss = vmap_feature_loss if batched else structured_loss
            got = structured_forward(net, x, grid, self.patch_size, self.mask_value, feature_loss)
        else:
            got = plain_forward(net, x, grid, self.patch_size, self.mask_value, batched)
        loss, loss_mim, entropy, ratio = got
        return tuple(t for t in (loss, ratio, loss_mim, entropy) if t is not None)

    def passes(self, run: Any, x: Any, grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Masked forward, loss and backward: (loss, mask ratio[, mim loss, entropy]) as device values."""
        return run.backward(functools.partial(self.loss, batched=run.vmapped), x, grid)

    def outcome(self, stats: Any, values: list[float], step: int, i: int) -> StepOutcome:
        return StepOutcome(loss=values[0], stats=stats, layout=ENTRY_LAYOUT, metrics={
            "mask_ratio": float(values[1]),
            "mim_loss": values[2] if len(values) > 2 else None,
            "entropy_loss": values[3] if len(values) > 3 else None,
        })

    def after_step(self, outcome: StepOutcome, i: int) -> None:
        self.ctxs[i].mask_ratios.append(outcome.metrics["mask_ratio"])


METHOD = MIM
