"""Patch masking and masked reconstruction loss driven by the patch grid (TTT-MIM).

One op family: YOLOZU's ``generate_block_mask`` draws a ``(gh, gw)`` grid of patches and
repeats it ``patch_size`` times along both axes (cropped to ``H x W``).  These kernels
read the *grid* and expand it on the fly (``cell = (h // PS) * gw + w // PS``): the full
resolution mask is never materialised.

* ``apply_patch_mask``:  ``out = where(mask, mask_value, x)``; ``dx = where(mask, 0, g)``
  (the same kernel with ``mask_value = 0`` applied to ``g``).
* ``masked_reconstruction_loss``: ``loss = sum_{mask} (pred - target)^2 / n_mask`` over every
  channel, fp32 accumulation, one read of ``pred`` and ``target``; ``n_mask`` is computed
  exactly from the grid; an empty mask gives 0 with a zero gradient (like the reference).
  ``dpred = where(mask, 2 g (pred - target) / n_mask, 0)``, ``dtarget = -dpred``.

Layout: ``@triton.jit`` kernels, then launchers (mask normalisation and the exact
mask count are shared with the torch path: ``yolozu_ttt.ops.normalize_patch_mask`` /
``mask_count``), then ``ApplyPatchMaskFunction`` / ``MaskedReconstructionLossFunction``.
Tensors are handled as ``(B, C, H, W)``; a 3-D ``(C, H, W)`` input is ``B = 1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import mask_count, normalize_patch_mask


@triton.jit
def _block_pixels(blk, plane, mask_ptr, mask_stride_b, mask_stride_c, n_ch, hw, width, grid_w,
                  PATCH: tl.constexpr, BLOCK: tl.constexpr):
    """Pixel offsets of block ``blk`` of ``plane``, their in-bounds flag and their patch-mask bit.

    plane -> (b, c) -> its grid; pixel -> (h, w) -> cell (h // PATCH, w // PATCH).
    """
    b = plane // n_ch
    c = plane - b * n_ch
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < hw
    h = offs // width
    w = offs - h * width
    cell = (h // PATCH) * grid_w + (w // PATCH)
    masked = tl.load(mask_ptr + b * mask_stride_b + c * mask_stride_c + cell, mask=ok, other=0) != 0
    return offs, ok, masked


@triton.jit
def _apply_patch_mask_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    n_ch,
    hw,
    width,
    grid_w,
    mask_stride_b,
    mask_stride_c,
    mask_value,
    PATCH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``out = where(grid[b, c, h // PATCH, w // PATCH], mask_value, x)``.

    Parameters:
        x_ptr, out_ptr: contiguous ``(B, C, H, W)`` tensors of the same dtype.
        mask_ptr: uint8 patch grid, contiguous ``(Bm, Cm, gh, gw)``.
        n_ch: C.  hw: H * W.  width: W.  grid_w: gw.
        mask_stride_b, mask_stride_c: grid strides for b and c (0 where broadcast).
        mask_value: fill value (cast to the dtype of ``out``).
        PATCH: patch size.  BLOCK: pixels of one plane handled by one program.
    Grid: ``(cdiv(H * W, BLOCK), B * C)``.
    """
    blk = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)
    # 1. Pixel -> (h, w) -> its patch cell's mask bit.
    offs, ok, masked = _block_pixels(blk, plane, mask_ptr, mask_stride_b, mask_stride_c, n_ch, hw, width,
                                     grid_w, PATCH, BLOCK)
    # 2. out = mask ? value : x.
    base = plane * hw
    x = tl.load(x_ptr + base + offs, mask=ok & ~masked, other=0.0)
    out = tl.where(masked, mask_value, x).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + base + offs, out, mask=ok)


@triton.jit
def _masked_sse_kernel(
    pred_ptr,
    target_ptr,
    partial_ptr,
    mask_ptr,
    n_ch,
    hw,
    width,
    grid_w,
    mask_stride_b,
    mask_stride_c,
    PATCH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-program partial ``sum_{masked} (pred - target)^2`` in fp32.

    Parameters:
        pred_ptr, target_ptr: contiguous ``(B, C, H, W)``, same dtype.
        partial_ptr: out fp32 ``(B * C * cdiv(H * W, BLOCK),)``, one partial per program.
        Other arguments as in ``_apply_patch_mask_kernel``.
    """
    blk = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)
    n_blk = tl.num_programs(0)
    offs, ok, masked = _block_pixels(blk, plane, mask_ptr, mask_stride_b, mask_stride_c, n_ch, hw, width,
                                     grid_w, PATCH, BLOCK)
    # 1. Only masked pixels are read: d = pred - target, fp32.
    base = plane * hw
    ld = ok & masked
    p = tl.load(pred_ptr + base + offs, mask=ld, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + base + offs, mask=ld, other=0.0).to(tl.float32)
    d = p - t
    # 2. Partial sum of d^2 (deterministic: the partials are summed afterwards).
    tl.store(partial_ptr + plane * n_blk + blk, tl.sum(d * d, axis=0))


@triton.jit
def _masked_sse_bwd_kernel(
    pred_ptr,
    target_ptr,
    dpred_ptr,
    scale_ptr,
    mask_ptr,
    n_ch,
    hw,
    width,
    grid_w,
    mask_stride_b,
    mask_stride_c,
    PATCH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``dpred = where(mask, scale * (pred - target), 0)`` with ``scale = 2 g / n_mask``.

    Parameters:
        dpred_ptr: out, contiguous ``(B, C, H, W)`` in the dtype of ``pred``.
        scale_ptr: 0-d fp32 device scalar ``2 g / n_mask`` (0 for an empty mask).
        Other arguments as in ``_masked_sse_kernel``.
    """
    blk = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)
    offs, ok, masked = _block_pixels(blk, plane, mask_ptr, mask_stride_b, mask_stride_c, n_ch, hw, width,
                                     grid_w, PATCH, BLOCK)
    base = plane * hw
    ld = ok & masked
    scale = tl.load(scale_ptr)
    # 1. d = pred - target on masked pixels (unmasked lanes read nothing and write 0).
    p = tl.load(pred_ptr + base + offs, mask=ld, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + base + offs, mask=ld, other=0.0).to(tl.float32)
    # 2. dpred = scale * d.
    g = tl.where(masked, scale * (p - t), 0.0)
    tl.store(dpred_ptr + base + offs, g.to(dpred_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def _block(hw: int) -> tuple[int, int]:
    import os

    cap = 16384 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 2048
    block = min(triton.next_power_of_2(max(hw, 1)), cap)
    return block, (8 if block >= 2048 else 4)


def _launch_args(t: torch.Tensor, patch_mask: torch.Tensor, patch_size: int):
    grid4, sb, sc, (B, C, H, W) = normalize_patch_mask(patch_mask, t.shape, patch_size)
    grid4 = grid4.to(t.device).view(torch.uint8)
    hw = H * W
    block, num_warps = _block(hw)
    launch = (triton.cdiv(hw, block), B * C)
    return grid4, (C, hw, W, int(grid4.shape[-1]), sb, sc), launch, block, num_warps


def apply_patch_mask_forward(x: torch.Tensor, patch_mask: torch.Tensor, patch_size: int, mask_value: float) -> torch.Tensor:
    """``x`` with every pixel of a masked patch set to ``mask_value`` (new tensor, like ``x``)."""
    x = x.contiguous()
    grid4, args, launch, block, num_warps = _launch_args(x, patch_mask, patch_size)
    out = torch.empty_like(x)
    if x.numel() > 0:
        _apply_patch_mask_kernel[launch](
            x, out, grid4, *args, float(mask_value), PATCH=int(patch_size), BLOCK=block, num_warps=num_warps
        )
    return out


def masked_sse_forward(pred: torch.Tensor, target: torch.Tensor, patch_mask: torch.Tensor, patch_size: int):
    """``(loss, count)``: mean of masked squared error (0-d, dtype of ``pred``) and the mask count."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    pred = pred.contiguous()
    target = target.to(pred.dtype).contiguous()
    grid4, args, launch, block, num_warps = _launch_args(pred, patch_mask, patch_size)
    partial = torch.zeros(launch[0] * launch[1], dtype=torch.float32, device=pred.device)
    if pred.numel() > 0:
        _masked_sse_kernel[launch](pred, target, partial, grid4, *args, PATCH=int(patch_size), BLOCK=block, num_warps=num_warps)
    count = mask_count(patch_mask, pred.shape, patch_size).to(pred.device)
    total = partial.sum()
    loss = torch.where(count > 0, total / count.clamp(min=1).to(torch.float32), torch.zeros_like(total))
    return loss.to(pred.dtype), count


def masked_sse_backward(grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, patch_mask: torch.Tensor, patch_size: int):
    """``d loss / d pred`` (``d loss / d target`` is its negative)."""
    pred = pred.contiguous()
    target = target.to(pred.dtype).contiguous()
    grid4, args, launch, block, num_warps = _launch_args(pred, patch_mask, patch_size)
    count = mask_count(patch_mask, pred.shape, patch_size).to(pred.device)
    g = grad.reshape(()).to(device=pred.device, dtype=torch.float32)
    scale = torch.where(count > 0, 2.0 * g / count.clamp(min=1).to(torch.float32), torch.zeros_like(g))
    dpred = torch.empty_like(pred)
    if pred.numel() > 0:
        _masked_sse_bwd_kernel[launch](
            pred, target, dpred, scale, grid4, *args, PATCH=int(patch_size), BLOCK=block, num_warps=num_warps
        )
    return dpred


class ApplyPatchMaskFunction(torch.autograd.Function):
    """``ApplyPatchMaskFunction.apply(x, patch_mask, patch_size, mask_value)``."""

    @staticmethod
    def forward(ctx, x, patch_mask, patch_size, mask_value):
        ctx.save_for_backward(patch_mask)
        ctx.patch_size = int(patch_size)
        return apply_patch_mask_forward(x, patch_mask, patch_size, mask_value)

    @staticmethod
    def backward(ctx, grad):
        (patch_mask,) = ctx.saved_tensors
        # Gradient flows through unmasked pixels only: the forward kernel with value 0.
        return apply_patch_mask_forward(grad, patch_mask, ctx.patch_size, 0.0), None, None, None


class MaskedReconstructionLossFunction(torch.autograd.Function):
    """``MaskedReconstructionLossFunction.apply(pred, target, patch_mask, patch_size)``."""

    @staticmethod
    def forward(ctx, pred, target, patch_mask, patch_size):
        loss, _ = masked_sse_forward(pred, target, patch_mask, patch_size)
        ctx.save_for_backward(pred, target, patch_mask)
        ctx.patch_size = int(patch_size)
        return loss

    @staticmethod
    def backward(ctx, grad):
        pred, target, patch_mask = ctx.saved_tensors
        dpred = masked_sse_backward(grad, pred, target, patch_mask, ctx.patch_size)
        dtarget = (-dpred).to(target.dtype) if ctx.needs_input_grad[1] else None
        return (dpred if ctx.needs_input_grad[0] else None), dtarget, None, None
