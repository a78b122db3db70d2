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

Layout: ``@triton.jit`` kernels, then the launchers.  ``yolozu_ttt.ops`` owns what the
torch path shares: it checks the patch grid (``normalize_patch_mask``, whose result, the
*layout*, the launchers take), counts the masked elements and turns the sum into the loss
(and the upstream gradient into the backward's scale).  Tensors are handled as
``(B, C, H, W)``; a 3-D ``(C, H, W)`` input is ``B = 1``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..common import INTERPRET
from ._shared import _last_program, _sum_partials, _to_storage, num_warps, ticket_counter
from .constants import RBLOCK


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
def _masked_diff(pred_ptr, target_ptr, mask_ptr, blk, plane, n_ch, hw, width, grid_w, mask_stride_b, mask_stride_c,
                 PATCH: tl.constexpr, BLOCK: tl.constexpr):
    """Block ``blk`` of ``plane``: (element offsets, in-bounds flag, mask bit, ``d = pred - target``
    in fp32); only masked pixels are read, ``d = 0`` elsewhere."""
    offs, ok, masked = _block_pixels(blk, plane, mask_ptr, mask_stride_b, mask_stride_c, n_ch, hw, width,
                                     grid_w, PATCH, BLOCK)
    offs = plane * hw + offs
    ld = ok & masked
    p = tl.load(pred_ptr + offs, mask=ld, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offs, mask=ld, other=0.0).to(tl.float32)
    return offs, ok, masked, p - t


@triton.jit
def _apply_patch_mask_kernel(x_ptr, out_ptr, mask_ptr, n_ch, hw, width, grid_w, mask_stride_b, mask_stride_c,
                             mask_value, PATCH: tl.constexpr, BLOCK: tl.constexpr):
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
def _masked_sse_kernel(pred_ptr, target_ptr, partial_ptr, count_part_ptr, counter_ptr, loss_ptr, count_ptr, mask_ptr,
                       n_ch, hw, width, grid_w, mask_stride_b, mask_stride_c, PATCH: tl.constexpr,
                       BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """The masked reconstruction loss in one launch: per program, the partial
    ``sum_{masked} (pred - target)^2`` (fp32) and the masked-element count; the last program sums
    both in a fixed order and writes ``loss = sse / count`` (0 for an empty mask) and the count.

    Parameters:
        pred_ptr, target_ptr: contiguous ``(B, C, H, W)``, same dtype.
        partial_ptr: fp32 scratch, one partial per program (``B * C * cdiv(H * W, BLOCK)``).
        count_part_ptr: int32 scratch, one masked count per program.
        counter_ptr: int32 ticket counter (0 before and after the launch).
        loss_ptr: out 0-d in the dtype of ``pred``.  count_ptr: out 0-d int64, the masked elements.
        Other arguments as in ``_apply_patch_mask_kernel``.
    """
    blk = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)
    # 1. d = pred - target on masked pixels, fp32 (unmasked lanes read nothing: d = 0).
    _, ok, masked, d = _masked_diff(pred_ptr, target_ptr, mask_ptr, blk, plane, n_ch, hw, width, grid_w,
                                    mask_stride_b, mask_stride_c, PATCH, BLOCK)
    # 2. Partial sum of d^2 and the masked count (deterministic: summed in order afterwards).
    slot = plane * tl.num_programs(0) + blk
    tl.store(partial_ptr + slot, tl.sum(d * d, axis=0))
    tl.store(count_part_ptr + slot, tl.sum((ok & masked).to(tl.int32), axis=0))
    # 3. The last program: sse / count (0 if none), like ops._per_masked.
    if _last_program(counter_ptr):
        n = tl.num_programs(0) * tl.num_programs(1)
        total = _sum_partials(partial_ptr, n, RBLOCK)
        cnt = tl.zeros([RBLOCK], tl.int64)
        for i in range(0, n, RBLOCK):
            idx = i + tl.arange(0, RBLOCK)
            cnt += tl.load(count_part_ptr + idx, mask=idx < n, other=0, cache_modifier=".cg").to(tl.int64)
        count = tl.sum(cnt, axis=0)
        loss = tl.where(count > 0, total / tl.maximum(count, 1).to(tl.float32), 0.0)
        tl.store(loss_ptr, _to_storage(loss, loss_ptr.dtype.element_ty))
        tl.store(count_ptr, count)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _masked_sse_bwd_kernel(pred_ptr, target_ptr, dpred_ptr, g_ptr, count_ptr, mask_ptr, n_ch, hw, width, grid_w,
                           mask_stride_b, mask_stride_c, PATCH: tl.constexpr, BLOCK: tl.constexpr):
    """``dpred = where(mask, scale * (pred - target), 0)`` with ``scale = 2 g / n_mask`` (0 for an
    empty mask), computed on device.

    Parameters:
        dpred_ptr: out, contiguous ``(B, C, H, W)`` in the dtype of ``pred``.
        g_ptr: the upstream gradient (one element, any float dtype).
        count_ptr: 0-d int64, the masked elements (the forward's, or ``ops`` counted from the grid).
        Other arguments as in ``_masked_sse_kernel``.
    """
    blk = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)
    count = tl.load(count_ptr)
    scale = tl.where(count > 0, (2.0 * tl.load(g_ptr).to(tl.float32)) / tl.maximum(count, 1).to(tl.float32), 0.0)
    # 1. d = pred - target on masked pixels (unmasked lanes read nothing and write 0).
    offs, ok, masked, d = _masked_diff(pred_ptr, target_ptr, mask_ptr, blk, plane, n_ch, hw, width, grid_w,
                                       mask_stride_b, mask_stride_c, PATCH, BLOCK)
    # 2. dpred = scale * d.
    g = tl.where(masked, scale * d, 0.0)
    tl.store(dpred_ptr + offs, g.to(dpred_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------
# Launchers (``layout``: ``yolozu_ttt.ops.normalize_patch_mask``'s result for the input's shape)
# ---------------------------------------------------------------------------------------

_RBLOCK = RBLOCK  # partials summed per step by the last program


@functools.lru_cache(maxsize=256)
def _block(hw: int) -> tuple[int, int]:
    cap = 16384 if INTERPRET else 2048
    block = min(triton.next_power_of_2(max(hw, 1)), cap)
    return block, num_warps(block)


def _launch_args(t: torch.Tensor, layout: tuple, patch_size: int):
    grid4, sb, sc, (B, C, H, W) = layout
    if grid4.device != t.device:
        grid4 = grid4.to(t.device)
    grid4 = grid4.view(torch.uint8)
    hw = H * W
    block, num_warps = _block(hw)
    launch = (triton.cdiv(hw, block), B * C)
    return grid4, (C, hw, W, int(grid4.shape[-1]), sb, sc), launch, block, num_warps


def apply_patch_mask_forward(x: torch.Tensor, layout: tuple, patch_size: int, mask_value: float) -> torch.Tensor:
    """``x`` with every pixel of a masked patch set to ``mask_value`` (new tensor, like ``x``; one launch)."""
    x = x.contiguous()
    grid4, args, launch, block, num_warps = _launch_args(x, layout, patch_size)
    out = torch.empty_like(x)
    if x.numel() > 0:
        _apply_patch_mask_kernel[launch](
            x, out, grid4, *args, float(mask_value), PATCH=int(patch_size), BLOCK=block, num_warps=num_warps
        )
    return out


def masked_sse_loss(pred: torch.Tensor, target: torch.Tensor, layout: tuple, patch_size: int):
    """``(loss, count)`` in one launch: ``loss = sum_{mask} (pred - target)^2 / count`` (0 for an
    empty mask) as a 0-d tensor in ``pred``'s dtype, ``count`` the masked elements (0-d int64)."""
    pred = pred.contiguous()
    target = target.to(pred.dtype).contiguous()
    grid4, args, launch, block, num_warps = _launch_args(pred, layout, patch_size)
    dev = pred.device
    loss = torch.empty((), dtype=pred.dtype, device=dev)
    count = torch.empty((), dtype=torch.int64, device=dev)
    if pred.numel() == 0:
        return loss.zero_(), count.zero_()
    n = launch[0] * launch[1]
    partial = torch.empty(n, dtype=torch.float32, device=dev)
    count_part = torch.empty(n, dtype=torch.int32, device=dev)
    _masked_sse_kernel[launch](pred, target, partial, count_part, ticket_counter(dev), loss, count, grid4, *args,
                               PATCH=int(patch_size), BLOCK=block, RBLOCK=_RBLOCK, num_warps=num_warps)
    return loss, count


def masked_sse_backward(pred: torch.Tensor, target: torch.Tensor, layout: tuple, patch_size: int,
                        grad: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``where(mask, 2 g (pred - target) / count, 0)`` in ``pred``'s dtype (one launch); ``grad`` the
    upstream gradient (one element), ``count`` the masked elements (0-d int64), both on device."""
    pred = pred.contiguous()
    target = target.to(pred.dtype).contiguous()
    grid4, args, launch, block, num_warps = _launch_args(pred, layout, patch_size)
    dpred = torch.empty_like(pred)
    if pred.numel() > 0:
        _masked_sse_bwd_kernel[launch](
            pred, target, dpred, grad, count, grid4, *args, PATCH=int(patch_size), BLOCK=block, num_warps=num_warps
        )
    return dpred
