"""TTT-MIM's patch-grid mask on the fused ops (``yolozu_ttt.ops``), with the reference's fallbacks.

The mask is kept as its patch grid (one flag per patch): the full-resolution mask the reference's
``generate_block_mask`` returns is built only where an input falls back to the reference's ops.
"""
from __future__ import annotations

from typing import Any

import torch
from .seam import ttt_mim as _mim

from . import ops
from .common import SUPPORTED_DTYPES


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


def recon_loss(pred: Any, x: Any, grid: torch.Tensor, patch_size: int, batched: bool = False) -> torch.Tensor:
    """``reconstruction_loss(pred, x, mask=mask)`` on the grid when shapes, dtypes and devices agree;
    other inputs take the reference (and its errors), or, ``batched`` (under vmap, where its host
    branch and mask indexing cannot run), its broadcasting loss as a masked mean, up to float
    summation order."""
    if (fast_input(x) and isinstance(pred, torch.Tensor) and pred.shape == x.shape and pred.dtype == x.dtype
            and pred.device == x.device):
        return ops.masked_reconstruction_loss(pred, x, grid, patch_size=patch_size)
    if not batched:
        return _mim.reconstruction_loss(pred, x, mask=full_mask(grid, x, patch_size))
    diff = (pred - x) ** 2
    return masked_mean(diff, full_mask(grid, x, patch_size).expand_as(diff), diff.sum() * 0.0)


# ---- under ``vmap`` (a group's replicas): the reference's losses branch on the host and index by
# mask, so where they would run, a where/mean stands in --------------------------------------------
def vmap_feature_loss(recon_feat: torch.Tensor, teacher_feat: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """The structured branch's loss (``rtdetr_pose.losses.mim_reconstruction_loss``: L1 over the masked
    locations, ``diff.sum() * 0`` for an empty mask) without its host branch and mask indexing."""
    diff = torch.abs(recon_feat - teacher_feat)
    if mask is None:
        return diff.mean()
    hit = (mask.unsqueeze(0).unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)).expand_as(diff).to(torch.bool)
    return masked_mean(diff, hit, diff.sum() * 0.0)


def masked_mean(values: torch.Tensor, hit: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` where ``hit``, else (nothing hit) ``empty``."""
    count = hit.sum()
    return torch.where(count > 0, torch.where(hit, values, 0.0).sum() / count.clamp(min=1).to(values.dtype), empty)
