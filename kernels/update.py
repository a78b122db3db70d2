"""Fused, filtered in-place parameter update over a flat parameter arena (Triton).

The GPU twin of the C++ engine in ``csrc/update.cpp`` (``yolozu_ttt._C``), with the same names
(``fused_step``, ``grad_stats``, ``sar_perturb``) so the caller can dispatch between them. One
:class:`TritonArenaGroup` binds the flat buffers of one dtype (float32 / bfloat16 / float16):

    param, grad, base, snap   the arena dtype, ``numel`` elements each (``snap`` optional)
    exp_avg, exp_avg_sq       float32 Adam moments
    offsets, sizes            the parameter tensors packed back to back, in order
    has_grad                  one byte per segment, written on the host by autograd hooks

Every launcher only enqueues work: nothing reads device memory back to the host. The step's
scalars come back in ONE float32 device tensor (see ``STAT_KEYS``), so a training step costs one
host read. The clip coefficient is computed on device and read from device memory by the Adam
pass. Reductions are deterministic: each program writes its partial sums (fp32 block sum,
stored as fp64) to its own slot of a workspace, and one single-program kernel sums the slots in
a fixed order; no float atomics anywhere, so two runs give bit-identical results.

CoTTA rides on the Adam pass: with a teacher bound (``set_teacher``) the EMA
``t <- t*m + (1-m)*p_new`` and the stochastic restore ``p <- base`` (counter-based draws keyed by
``restore_key(seed, counter, group)``, the same hash and key as ``_C``) happen in the same pass, and
the norms are those of the final parameters.

Blocks never straddle segments (the block table maps block -> segment, start, end), so the
per-segment scalars (Adam bias corrections, has_grad, anchor coefficient) are loaded once per
program. Adam step counts live on the host (they depend only on the host-side ``has_grad``); the
per-step segment table (4 floats per segment) goes to the device with one non-blocking copy from
pinned memory.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

STAT_KEYS = ("grad_norm", "grad_norm_clipped", "update_norm", "total_update_norm", "anchor_loss", "clip_coef",
             "restored")
SAR_KEYS = ("norm", "applied")

_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_N_PART = 6  # partial-sum rows: 0 ||g||^2, 1 ||g*coef||^2, 2 ||dp||^2, 3 ||p-base||^2, 4 anchor, 5 restored
_SEG_COLS = 4  # per-step segment table: -lr/bc1, sqrt(bc2), 2*lambda/numel, has_grad
_RBLOCK = 1024  # finalize kernels: slots summed per iteration


# ------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------
@triton.jit
def _block(blocks_ptr, pid):
    """Row ``pid`` of the block table: (segment, first element, end element, segment numel)."""
    row = blocks_ptr + pid * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to the storage dtype, round-to-nearest-even (NaN stays NaN).

    bfloat16 is rounded on the bits so the result is the same on the GPU and in the Triton
    interpreter (whose fp32 -> bf16 cast truncates); the final cast is then exact.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rne = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        nan = (bits | 0x00400000) & 0xFFFF0000
        rounded = tl.where(x != x, nan, rne).to(tl.float32, bitcast=True)
        return rounded.to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finalizer on uint32; the multiplies wrap on purpose (as in tl.randint's Philox)."""
    M1: tl.constexpr = 0x85EBCA6B
    M2: tl.constexpr = 0xC2B2AE35
    h = h ^ (h >> 16)
    h = tl.mul(h, M1, sanitize_overflow=False)
    h = h ^ (h >> 13)
    h = tl.mul(h, M2, sanitize_overflow=False)
    return h ^ (h >> 16)


@triton.jit
def _uniform01(offs, key):
    """CoTTA restore draw of element ``offs``: ``(fmix32(offs ^ key) >> 8) * 2^-24`` in [0, 1) (as _C)."""
    h = _fmix32(offs.to(tl.uint32) ^ key)
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _sum_slots(part_ptr, n_slots, RBLOCK: tl.constexpr):
    """Sum ``n_slots`` fp64 partials in a fixed order (deterministic)."""
    acc = tl.zeros([RBLOCK], dtype=tl.float64)
    for i in range(0, n_slots, RBLOCK):
        idx = i + tl.arange(0, RBLOCK)
        acc += tl.load(part_ptr + idx, mask=idx < n_slots, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _f32_norm(sumsq):
    """sqrt of a fp64 sum of squares, overflowing to inf where an fp32 sum would (as _C)."""
    return tl.sqrt(sumsq.to(tl.float32).to(tl.float64)).to(tl.float32)  # fp64 sqrt is IEEE


@triton.jit
def _grad_pass_kernel(
    p_ptr,
    g_ptr,
    base_ptr,
    blocks_ptr,
    seg_ptr,
    part_ptr,
    part_stride,
    part_base,
    HAS_ANCHOR: tl.constexpr,
    ANCHOR_VALUE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Per block: ||g + 2*lambda*(p-base)/n||^2 (anchor term with HAS_ANCHOR) and, with
    ANCHOR_VALUE, sum (p-base)^2 / n, over segments with a grad."""
    pid = tl.program_id(0).to(tl.int64)
    seg, start, end, seg_numel = _block(blocks_ptr, pid)
    anchor_coef = tl.load(seg_ptr + seg * 4 + 2)
    grad_end = start + (end - start) * tl.load(seg_ptr + seg * 4 + 3).to(tl.int64)  # has_grad

    offs = start + tl.arange(0, BLOCK_SIZE)
    gmask = offs < grad_end
    g = tl.load(g_ptr + offs, mask=gmask, other=0.0).to(tl.float32)

    # 1. EATA anchor gradient: d/dp lambda*mean((p-base)^2) = 2*lambda*(p-base)/n, and its value
    if HAS_ANCHOR or ANCHOR_VALUE:
        p = tl.load(p_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
        base = tl.load(base_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
        d = p - base
        if HAS_ANCHOR:
            g = g + anchor_coef * d
    if ANCHOR_VALUE:
        anchor = tl.sum(d * d, axis=0).to(tl.float64) / seg_numel.to(tl.float64)
        tl.store(part_ptr + 4 * part_stride + part_base + pid, anchor)
    else:
        tl.store(part_ptr + 4 * part_stride + part_base + pid, 0.0)

    # 2. ||g||^2 (before clipping)
    tl.store(part_ptr + part_base + pid, tl.sum(g * g, axis=0).to(tl.float64))


@triton.jit
def _clip_coef_kernel(part_ptr, part_stride, n_slots, stats_ptr, max_norm, RBLOCK: tl.constexpr):
    """||g||, anchor value and clip_grad_norm_'s coefficient, all on device."""
    grad_sumsq = _sum_slots(part_ptr, n_slots, RBLOCK)
    anchor = _sum_slots(part_ptr + 4 * part_stride, n_slots, RBLOCK)
    # 3. coef = min(max_norm / (||g|| + 1e-6), 1) in fp32, NaN propagates (torch clamp semantics)
    total = _f32_norm(grad_sumsq)
    coef = tl.div_rn(max_norm, total + 1e-6)
    coef = tl.where(coef > 1.0, 1.0, coef)
    tl.store(stats_ptr + 0, total)
    tl.store(stats_ptr + 4, anchor.to(tl.float32))
    tl.store(stats_ptr + 5, coef)


@triton.jit(do_not_specialize=["restore_key"])
def _adam_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    base_ptr,
    snap_ptr,
    teacher_ptr,
    blocks_ptr,
    seg_ptr,
    stats_ptr,
    part_ptr,
    part_stride,
    part_base,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    ema_m,
    ema_w,
    restore_q,
    restore_key,
    HAS_CLIP: tl.constexpr,
    HAS_ANCHOR: tl.constexpr,
    WRITE_SNAPSHOT: tl.constexpr,
    HAS_EMA: tl.constexpr,
    HAS_RESTORE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One fused Adam step (torch.optim.Adam defaults and operation order, fp32 math), then the
    CoTTA teacher EMA and stochastic restore when asked."""
    pid = tl.program_id(0).to(tl.int64)
    seg, start, end, seg_numel = _block(blocks_ptr, pid)
    neg_step_size = tl.load(seg_ptr + seg * 4)  # -lr / (1 - beta1^t)
    bc2_sqrt = tl.load(seg_ptr + seg * 4 + 1)  # sqrt(1 - beta2^t)
    anchor_coef = tl.load(seg_ptr + seg * 4 + 2)  # 2 * lambda / n
    grad_end = start + (end - start) * tl.load(seg_ptr + seg * 4 + 3).to(tl.int64)  # has_grad

    offs = start + tl.arange(0, BLOCK_SIZE)
    mask = offs < end
    gmask = offs < grad_end  # torch's Adam skips tensors whose .grad is None

    p_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
    # 5. pre-step snapshot, bit-exact (every segment); after the grad load: it may be the grad buffer
    if WRITE_SNAPSHOT:
        tl.store(snap_ptr + offs, p_raw, mask=mask)
    p_old = p_raw.to(tl.float32)
    base_raw = tl.load(base_ptr + offs, mask=mask, other=0.0)
    base = base_raw.to(tl.float32)

    # 1. EATA anchor gradient: g <- g + 2*lambda*(p-base)/n ; anchor = sum_i mean((p_i-base_i)^2)
    if HAS_ANCHOR:
        d = tl.where(gmask, p_old - base, 0.0)
        g = g + anchor_coef * d
        if not HAS_CLIP:
            anchor = tl.sum(d * d, axis=0).to(tl.float64) / seg_numel.to(tl.float64)
            tl.store(part_ptr + 4 * part_stride + part_base + pid, anchor)
    elif not HAS_CLIP:
        tl.store(part_ptr + 4 * part_stride + part_base + pid, 0.0)

    # 2-3. clip: g <- g * coef, coef computed on device by _clip_coef_kernel
    if HAS_CLIP:
        gc = g * tl.load(stats_ptr + 5)
    else:
        gc = g
        tl.store(part_ptr + part_base + pid, tl.sum(g * g, axis=0).to(tl.float64))
    tl.store(part_ptr + part_stride + part_base + pid, tl.sum(gc * gc, axis=0).to(tl.float64))

    # 4. Adam: m <- m + (1-b1)(g-m) ; v <- v*b2 + ((1-b2)*g)*g
    #          p <- p + ((-lr/bc1) * m) / (sqrt(v)/sqrt(bc2) + eps)
    m = tl.load(m_ptr + offs, mask=gmask, other=0.0)
    v = tl.load(v_ptr + offs, mask=gmask, other=0.0)
    m = m + one_minus_beta1 * (gc - m)
    v = v * beta2 + (one_minus_beta2 * gc) * gc
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p_new_s = _to_storage(p_old + tl.div_rn(neg_step_size * m, denom), p_ptr.dtype.element_ty)
    tl.store(m_ptr + offs, m, mask=gmask)
    tl.store(v_ptr + offs, v, mask=gmask)
    p_new = tl.where(gmask, p_new_s.to(tl.float32), p_old)

    # 6. CoTTA teacher EMA on the updated student: t <- t*m + (1-m)*p_new (every segment)
    if HAS_EMA:
        t = tl.load(teacher_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(teacher_ptr + offs, _to_storage(t * ema_m + ema_w * p_new, teacher_ptr.dtype.element_ty), mask=mask)

    # 7. CoTTA stochastic restore: p <- base where u(j) < q (every segment, counter-based RNG)
    if HAS_RESTORE:
        hit = (_uniform01(offs, restore_key.to(tl.uint32, bitcast=True)) < restore_q) & mask
        tl.store(p_ptr + offs, tl.where(hit, base_raw, p_new_s), mask=gmask | hit)
        p_new = tl.where(hit, base, p_new)
        tl.store(part_ptr + 5 * part_stride + part_base + pid, tl.sum(hit.to(tl.float32), axis=0).to(tl.float64))
    else:
        tl.store(p_ptr + offs, p_new_s, mask=gmask)
        tl.store(part_ptr + 5 * part_stride + part_base + pid, 0.0)

    # 8. ||p_new - p_old||^2 and ||p_new - base||^2 (the stored, rounded, final p_new)
    du = p_new - p_old
    dt = p_new - base
    tl.store(part_ptr + 2 * part_stride + part_base + pid, tl.sum(du * du, axis=0).to(tl.float64))
    tl.store(part_ptr + 3 * part_stride + part_base + pid, tl.sum(dt * dt, axis=0).to(tl.float64))


@triton.jit
def _step_stats_kernel(part_ptr, part_stride, n_slots, stats_ptr, HAS_CLIP: tl.constexpr, RBLOCK: tl.constexpr):
    """The step's norms from the partials, in a fixed order."""
    tl.store(stats_ptr + 1, _f32_norm(_sum_slots(part_ptr + part_stride, n_slots, RBLOCK)))
    tl.store(stats_ptr + 2, _f32_norm(_sum_slots(part_ptr + 2 * part_stride, n_slots, RBLOCK)))
    tl.store(stats_ptr + 3, _f32_norm(_sum_slots(part_ptr + 3 * part_stride, n_slots, RBLOCK)))
    tl.store(stats_ptr + 6, _sum_slots(part_ptr + 5 * part_stride, n_slots, RBLOCK).to(tl.float32))
    if not HAS_CLIP:
        tl.store(stats_ptr + 0, _f32_norm(_sum_slots(part_ptr, n_slots, RBLOCK)))
        tl.store(stats_ptr + 4, _sum_slots(part_ptr + 4 * part_stride, n_slots, RBLOCK).to(tl.float32))
        tl.store(stats_ptr + 5, 1.0)


@triton.jit
def _grad_stats_kernel(part_ptr, part_stride, n_slots, out_ptr, RBLOCK: tl.constexpr):
    """(||g||, anchor value) from the grad-pass partials."""
    tl.store(out_ptr + 0, _f32_norm(_sum_slots(part_ptr, n_slots, RBLOCK)))
    tl.store(out_ptr + 1, _sum_slots(part_ptr + 4 * part_stride, n_slots, RBLOCK).to(tl.float32))


@triton.jit
def _sar_norm_kernel(p_ptr, g_ptr, blocks_ptr, seg_ptr, part_ptr, part_base,
                     ADAPTIVE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Per block: ||d||^2 with d = g (adaptive: g*|p|) over segments with a grad."""
    pid = tl.program_id(0).to(tl.int64)
    seg, start, end, _ = _block(blocks_ptr, pid)
    grad_end = start + (end - start) * tl.load(seg_ptr + seg * 4 + 3).to(tl.int64)  # has_grad
    offs = start + tl.arange(0, BLOCK_SIZE)
    gmask = offs < grad_end
    d = tl.load(g_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
    if ADAPTIVE:
        d = d * tl.abs(tl.load(p_ptr + offs, mask=gmask, other=0.0).to(tl.float32))
    tl.store(part_ptr + part_base + pid, tl.sum(d * d, axis=0).to(tl.float64))


@triton.jit
def _sar_scale_kernel(part_ptr, n_slots, out_ptr, rho, RHO_POSITIVE: tl.constexpr, RBLOCK: tl.constexpr):
    """norm = ||d|| ; applied = rho > 0 and norm > 0 ; scale = rho / (norm + 1e-12)."""
    norm = _f32_norm(_sum_slots(part_ptr, n_slots, RBLOCK))
    scale = (rho / (norm.to(tl.float64) + 1e-12)).to(tl.float32)
    tl.store(out_ptr + 0, norm)
    if RHO_POSITIVE:
        tl.store(out_ptr + 1, tl.where(norm > 0.0, 1.0, 0.0))  # NaN norm: not applied
    else:
        tl.store(out_ptr + 1, 0.0)
    tl.store(out_ptr + 2, scale)


@triton.jit
def _sar_apply_kernel(p_ptr, g_ptr, snap_ptr, blocks_ptr, seg_ptr, out_ptr,
                      ADAPTIVE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """If applied (read on device): snap <- p (every segment) ; p <- p + scale*d (with a grad)."""
    pid = tl.program_id(0).to(tl.int64)
    seg, start, end, _ = _block(blocks_ptr, pid)
    applied = tl.load(out_ptr + 1).to(tl.int64)  # 1 or 0, decided on device
    has_grad = tl.load(seg_ptr + seg * 4 + 3).to(tl.int64)
    scale = tl.load(out_ptr + 2)
    offs = start + tl.arange(0, BLOCK_SIZE)
    mask = offs < start + (end - start) * applied
    gmask = offs < start + (end - start) * (applied * has_grad)
    p_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
    tl.store(snap_ptr + offs, p_raw, mask=mask)
    p = p_raw.to(tl.float32)
    d = tl.load(g_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
    if ADAPTIVE:
        d = d * tl.abs(p)
    tl.store(p_ptr + offs, _to_storage(p + scale * d, p_ptr.dtype.element_ty), mask=gmask)


@triton.jit
def _ema_kernel(t_ptr, s_ptr, n, momentum, one_minus_momentum, BLOCK_SIZE: tl.constexpr):
    """CoTTA teacher: t <- t*m + (1-m)*s (fp32 math)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(t_ptr + offs, _to_storage(t * momentum + one_minus_momentum * s, t_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_tensor(t: Any, what: str, numel: int | None, device: torch.device | None,
                  dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"yolozu_ttt.kernels.update: {what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"yolozu_ttt.kernels.update: {what} must be contiguous")
    if t.dtype not in dtypes:
        raise TypeError(f"yolozu_ttt.kernels.update: {what} has dtype {t.dtype}, expected one of {dtypes}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"yolozu_ttt.kernels.update: {what} has {t.numel()} elements, param has {numel}")
    if device is not None and t.device != device:
        raise ValueError(f"yolozu_ttt.kernels.update: {what} is on {t.device}, param on {device}")
    return t


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not _interpret():
        raise ValueError("yolozu_ttt.kernels.update: CPU tensors need TRITON_INTERPRET=1 "
                         "(use yolozu_ttt._C for CPU arenas)")


def _warps(block_size: int) -> int:
    return 8 if block_size >= 2048 else 4


class TritonArenaGroup:
    """The flat buffers of one dtype arena group, bound for the Triton kernels.

    Parameters:
        param: flat contiguous parameter buffer (float32, bfloat16 or float16), updated in place.
        grad: flat gradient buffer, same dtype and size.
        exp_avg, exp_avg_sq: float32 Adam moments, same size.
        base: base snapshot (same dtype), the anchor of the total-update norm and EATA.
        snap: pre-step snapshot buffer (same dtype) or None (then ``write_snapshot`` and SAR fail).
            It may be ``grad`` itself: the step loads each grad before it stores the snapshot
            over it (not for ``sar_perturb``, whose backup must outlive the next backward).
        offsets, sizes: the segment table; segments must tile the arena in order.
        has_grad: a byte buffer (e.g. ``bytearray``) with one entry per segment, read on the host
            at every step (nonzero = the segment has a grad), or None = every segment has one.
        block_size: elements per program (power of two); blocks never straddle segments.

    The group keeps references to every tensor. Adam step counts are kept on the host, per
    segment, and advance only for segments with a grad (like torch.optim.Adam's per-param state).
    """

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, base: torch.Tensor, snap: torch.Tensor | None,
                 offsets: Sequence[int], sizes: Sequence[int], has_grad: Any = None, *,
                 block_size: int = 2048):
        floats = tuple(_DTYPES)
        self.param = _check_tensor(param, "param", None, None, floats)
        n, dev, dt = param.numel(), param.device, param.dtype
        self.grad = _check_tensor(grad, "grad", n, dev, (dt,))
        self.exp_avg = _check_tensor(exp_avg, "exp_avg", n, dev, (torch.float32,))
        self.exp_avg_sq = _check_tensor(exp_avg_sq, "exp_avg_sq", n, dev, (torch.float32,))
        self.base = _check_tensor(base, "base", n, dev, (dt,))
        self.snap = None if snap is None else _check_tensor(snap, "snap", n, dev, (dt,))
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError("yolozu_ttt.kernels.update: block_size must be a power of two >= 16")
        self.block_size = int(block_size)
        self.offsets = [int(o) for o in offsets]
        self.sizes = [int(s) for s in sizes]
        if len(self.offsets) != len(self.sizes):
            raise ValueError("yolozu_ttt.kernels.update: offsets and sizes differ in length")
        blocks: list[int] = []
        expect = 0
        for s, (off, size) in enumerate(zip(self.offsets, self.sizes)):
            if off != expect or size < 0:
                raise ValueError("yolozu_ttt.kernels.update: segments must tile the arena in order")
            expect += size
            for b in range(0, size, self.block_size):
                blocks += [s, off + b, off + min(size, b + self.block_size), size]
        if expect != n:
            raise ValueError(f"yolozu_ttt.kernels.update: segments cover {expect} elements, arena has {n}")
        if has_grad is not None:
            view = memoryview(has_grad)
            if view.itemsize != 1 or view.nbytes != len(self.sizes):
                raise ValueError("yolozu_ttt.kernels.update: has_grad must be a byte buffer with one entry per segment")
        self.has_grad = has_grad
        self.num_blocks = len(blocks) // 4
        # block table (block -> segment, start, end, segment numel), built once on device
        self._blocks = torch.tensor(blocks or [0, 0, 0, 1], dtype=torch.int64).to(dev)
        sizes_f = np.asarray(self.sizes, dtype=np.float64)
        self._anchor_scale = np.divide(2.0, sizes_f, out=np.zeros_like(sizes_f), where=sizes_f > 0)
        self._steps = np.zeros(len(self.sizes), dtype=np.int64)
        self.teacher: torch.Tensor | None = None

    def set_snapshot(self, snap: torch.Tensor | None) -> None:
        """Bind (or with None, unbind) the pre-step snapshot buffer: same size, dtype and device as param."""
        self.snap = None if snap is None else _check_tensor(snap, "snap", self.param.numel(), self.param.device,
                                                               (self.param.dtype,))

    def set_teacher(self, teacher: torch.Tensor | None) -> None:
        """Bind (or with None, unbind) the CoTTA teacher buffer: same size, dtype and device as param."""
        if teacher is not None:
            _check_tensor(teacher, "teacher", self.param.numel(), self.param.device, (self.param.dtype,))
        self.teacher = teacher

    # ---- mirrors of _C.ArenaGroup ---------------------------------------------------------
    @property
    def numel(self) -> int:
        return int(self.param.numel())

    @property
    def num_segments(self) -> int:
        return len(self.sizes)

    @property
    def steps(self) -> list[int]:
        return [int(s) for s in self._steps]

    @property
    def device(self) -> torch.device:
        return self.param.device

    def reset_state(self) -> None:
        """Zero the Adam moments and step counts."""
        self._steps[:] = 0
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()

    # ---- per-step host tables ---------------------------------------------------------------
    def _flags(self) -> np.ndarray:
        if self.has_grad is None:
            return np.ones(len(self.sizes), dtype=bool)
        return np.frombuffer(bytes(self.has_grad), dtype=np.uint8) != 0

    def _segment_rows(self, anchor_lambda: float, adam: tuple[float, float, float] | None) -> np.ndarray:
        """(segments, 4) float64: -lr/bc1, sqrt(bc2), 2*lambda/n, has_grad. ``adam`` advances steps.

        Vectorised over segments; the powers come from libm's ``pow`` once per distinct step count
        (usually one), like the C++ engine's ``std::pow``, so both engines use the same tables.
        """
        flags = self._flags()
        rows = np.zeros((len(self.sizes), 4), dtype=np.float64)
        rows[:, 1] = 1.0
        if adam is not None and flags.any():
            lr, beta1, beta2 = adam
            self._steps[flags] += 1
            steps, index = np.unique(self._steps[flags], return_inverse=True)
            bc1 = np.array([1.0 - math.pow(beta1, float(t)) for t in steps])[index]
            bc2 = np.array([1.0 - math.pow(beta2, float(t)) for t in steps])[index]
            rows[flags, 0] = -(lr / bc1)
            rows[flags, 1] = np.sqrt(bc2)
        rows[:, 2] = anchor_lambda * self._anchor_scale
        rows[:, 3] = flags
        return rows.reshape(-1)


def _prepare(groups: Sequence[TritonArenaGroup]) -> tuple[list[TritonArenaGroup], torch.device]:
    gs = list(groups)
    if not gs:
        raise ValueError("yolozu_ttt.kernels.update: groups must not be empty")
    for g in gs:
        if not isinstance(g, TritonArenaGroup):
            raise TypeError(f"yolozu_ttt.kernels.update: expected TritonArenaGroup, got {type(g).__name__}")
    device = gs[0].device
    if any(g.device != device for g in gs):
        raise ValueError("yolozu_ttt.kernels.update: all groups must be on one device")
    _check_device(device)
    return gs, device


def _upload(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host float64 rows -> float32 device tensor without a host sync (pinned, non-blocking)."""
    t = torch.from_numpy(rows.astype(np.float32) if rows.size else np.zeros(1, dtype=np.float32))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _segment_tables(gs: list[TritonArenaGroup], device: torch.device, anchor_lambda: float,
                    adam: tuple[float, float, float] | None) -> list[torch.Tensor]:
    """One upload for all groups; returns each group's view of it."""
    parts = [g._segment_rows(anchor_lambda, adam) for g in gs]
    starts = np.cumsum([0] + [p.size for p in parts[:-1]]).tolist()
    table = _upload(np.concatenate(parts), device)
    return [table[s:] for s in starts]


def _slots(gs: list[TritonArenaGroup]) -> tuple[list[int], int]:
    bases, total = [], 0
    for g in gs:
        bases.append(total)
        total += g.num_blocks
    return bases, total


def _mix32(h: int) -> int:
    """murmur3's fmix32 on a Python int (mod 2^32)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def restore_key(seed: int, counter: int, group: int) -> int:
    """The 32-bit restore key of one (seed, step counter, group); bit-identical to ``_C.restore_key``."""
    seed, counter, group = (int(v) & 0xFFFFFFFFFFFFFFFF for v in (seed, counter, group))
    h = _mix32((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    h = _mix32(h ^ (seed >> 32))
    h = _mix32(h ^ ((counter * 0x632BE5AB) & 0xFFFFFFFF))
    h = _mix32(h ^ ((counter >> 32) & 0xFFFFFFFF))
    return _mix32(h ^ (((group + 1) * 0x85157AF5) & 0xFFFFFFFF))


def _as_i32(key: int) -> int:
    """A uint32 as the int32 with the same bits (a kernel argument Triton types as i32)."""
    return key - (1 << 32) if key >= 1 << 31 else key


def fused_step(groups: Sequence[TritonArenaGroup], lr: float, beta1: float = 0.9, beta2: float = 0.999,
               eps: float = 1e-8, max_grad_norm: float | None = None, anchor_lambda: float = 0.0,
               write_snapshot: bool = True, ema_momentum: float | None = None, restore_prob: float = 0.0,
               restore_seed: int = 0, restore_counter: int = 0) -> torch.Tensor:
    """One fused step over all groups; the Triton twin of ``yolozu_ttt._C.fused_step``.

    Parameters:
        groups: the arena groups (one per dtype), all on one device; they share one global grad
            norm and clip coefficient.
        lr, beta1, beta2, eps: torch.optim.Adam hyper-parameters (no weight decay, no amsgrad).
        max_grad_norm: clip like torch.nn.utils.clip_grad_norm_ (None: no clipping).
        anchor_lambda: EATA anchor weight; adds 2*lambda*(p-base)/n to each segment's grad.
        write_snapshot: write snap <- p (pre-step values, bit-exact) in the same pass.
        ema_momentum: CoTTA teacher EMA t <- t*m + (1-m)*p on the updated params, m clamped to
            [0, 1], every element (needs ``set_teacher``); None: no EMA.
        restore_prob: CoTTA stochastic restore after the EMA: element j of group i goes back to
            ``base`` where ``(fmix32(j ^ restore_key(restore_seed, restore_counter, i)) >> 8) * 2^-24
            < restore_prob`` (the same draws as ``_C``); 0: none, >= 1: every element.
        restore_seed, restore_counter: the key of the counter-based restore RNG.

    Returns a float32 tensor of shape (7,) on the groups' device, ordered as ``STAT_KEYS``:
    grad_norm, grad_norm_clipped, update_norm, total_update_norm (norms of the final params),
    anchor_loss, clip_coef, restored (elements restored; exact below 2^24).
    Nothing is read back to the host; the non-finite check is ``~torch.isfinite(out)``.
    """
    if not float(restore_prob) >= 0.0:
        raise ValueError("yolozu_ttt.kernels.update: restore_prob must be >= 0")
    if not lr >= 0.0:
        raise ValueError("yolozu_ttt.kernels.update: lr must be >= 0")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError("yolozu_ttt.kernels.update: betas must lie in [0, 1)")
    gs, device = _prepare(groups)
    if write_snapshot and any(g.snap is None for g in gs):
        raise ValueError("yolozu_ttt.kernels.update: write_snapshot needs a snapshot buffer")
    has_ema = ema_momentum is not None
    if has_ema and any(g.teacher is None for g in gs):
        raise ValueError("yolozu_ttt.kernels.update: ema_momentum needs a teacher buffer (set_teacher)")
    ema_m = min(max(float(ema_momentum), 0.0), 1.0) if has_ema else 0.0
    has_restore = float(restore_prob) > 0.0
    clip = max_grad_norm is not None
    anchor_lambda = float(anchor_lambda)
    has_anchor = anchor_lambda != 0.0
    # Bias corrections from the host step counts (advanced here, for segments with a grad).
    tables = _segment_tables(gs, device, anchor_lambda, (float(lr), float(beta1), float(beta2)))
    bases, n_slots = _slots(gs)
    part = torch.empty((_N_PART, max(n_slots, 1)), dtype=torch.float64, device=device)
    if n_slots == 0:
        part.zero_()
    stride = part.shape[1]
    stats = torch.empty(len(STAT_KEYS), dtype=torch.float32, device=device)

    # 1-3. with clipping: grad-norm pass, then the coefficient on device
    if clip:
        for g, table, base in zip(gs, tables, bases):
            if g.num_blocks:
                _grad_pass_kernel[(g.num_blocks,)](
                    g.param, g.grad, g.base, g._blocks, table, part, stride, base,
                    HAS_ANCHOR=has_anchor, ANCHOR_VALUE=has_anchor, BLOCK_SIZE=g.block_size, num_warps=_warps(g.block_size))
        _clip_coef_kernel[(1,)](part, stride, n_slots, stats, float(max_grad_norm), RBLOCK=_RBLOCK)

    # 4-8. Adam pass (reads the coefficient from device memory), snapshot, EMA, restore, norms
    for i, (g, table, base) in enumerate(zip(gs, tables, bases)):
        if g.num_blocks:
            key = restore_key(restore_seed, restore_counter, i) if has_restore else 0
            _adam_kernel[(g.num_blocks,)](
                g.param, g.grad, g.exp_avg, g.exp_avg_sq, g.base,
                g.snap if write_snapshot else g.param, g.teacher if has_ema else g.param,
                g._blocks, table, stats, part, stride, base,
                1.0 - beta1, beta2, 1.0 - beta2, eps, ema_m, 1.0 - ema_m, float(restore_prob), _as_i32(key),
                HAS_CLIP=clip, HAS_ANCHOR=has_anchor, WRITE_SNAPSHOT=bool(write_snapshot),
                HAS_EMA=has_ema, HAS_RESTORE=has_restore,
                BLOCK_SIZE=g.block_size, num_warps=_warps(g.block_size))
    _step_stats_kernel[(1,)](part, stride, n_slots, stats, HAS_CLIP=clip, RBLOCK=_RBLOCK)
    return stats


def grad_stats(groups: Sequence[TritonArenaGroup], anchor_lambda: float = 0.0,
               anchor_value: bool = False) -> torch.Tensor:
    """(grad norm, anchor value) without changing anything: float32 device tensor of shape (2,).

    Parameters:
        groups: the arena groups, all on one device.
        anchor_lambda: EATA anchor weight; the grad norm includes the anchor gradient.
        anchor_value: compute the anchor value even at ``anchor_lambda == 0`` (else it is 0 there).
    """
    gs, device = _prepare(groups)
    anchor_lambda = float(anchor_lambda)
    tables = _segment_tables(gs, device, anchor_lambda, None)
    bases, n_slots = _slots(gs)
    part = torch.zeros((_N_PART, max(n_slots, 1)), dtype=torch.float64, device=device)
    stride = part.shape[1]
    out = torch.empty(2, dtype=torch.float32, device=device)
    for g, table, base in zip(gs, tables, bases):
        if g.num_blocks:
            _grad_pass_kernel[(g.num_blocks,)](
                g.param, g.grad, g.base, g._blocks, table, part, stride, base,
                HAS_ANCHOR=anchor_lambda != 0.0, ANCHOR_VALUE=anchor_lambda != 0.0 or bool(anchor_value),
                BLOCK_SIZE=g.block_size, num_warps=_warps(g.block_size))
    _grad_stats_kernel[(1,)](part, stride, n_slots, out, RBLOCK=_RBLOCK)
    return out


def sar_perturb(groups: Sequence[TritonArenaGroup], rho: float, adaptive: bool) -> torch.Tensor:
    """SAR ascent step with the snapshot as backup; the Triton twin of ``_C.sar_perturb``.

    Parameters:
        groups: the arena groups (each needs a ``snap`` buffer), all on one device.
        rho: neighbourhood size (already scaled by the caller, e.g. rho * first_step_scale).
        adaptive: ASAM direction d = g*|p| instead of g.

    1. norm = ||d|| over segments with a grad (d = g, or g*|p| if adaptive);
    2. if rho > 0 and norm > 0 (decided on device): snap <- p for every segment, then
       p <- p + rho/(norm + 1e-12) * d for segments with a grad.
    Returns a float32 device tensor (2,): [norm, applied (1.0 or 0.0)].
    """
    gs, device = _prepare(groups)
    if any(g.snap is None for g in gs):
        raise ValueError("yolozu_ttt.kernels.update: sar_perturb needs a snapshot buffer")
    if any(g.snap.data_ptr() == g.grad.data_ptr() for g in gs):
        raise ValueError("yolozu_ttt.kernels.update: sar_perturb needs a snapshot buffer apart from the grad buffer")
    tables = _segment_tables(gs, device, 0.0, None)
    bases, n_slots = _slots(gs)
    part = torch.zeros(max(n_slots, 1), dtype=torch.float64, device=device)
    out = torch.empty(3, dtype=torch.float32, device=device)
    for g, table, base in zip(gs, tables, bases):
        if g.num_blocks:
            _sar_norm_kernel[(g.num_blocks,)](g.param, g.grad, g._blocks, table, part, base,
                                              ADAPTIVE=bool(adaptive), BLOCK_SIZE=g.block_size,
                                              num_warps=_warps(g.block_size))
    _sar_scale_kernel[(1,)](part, n_slots, out, float(rho), RHO_POSITIVE=float(rho) > 0.0, RBLOCK=_RBLOCK)
    if float(rho) > 0.0:
        for g, table in zip(gs, tables):
            if g.num_blocks:
                _sar_apply_kernel[(g.num_blocks,)](g.param, g.grad, g.snap, g._blocks, table, out,
                                                   ADAPTIVE=bool(adaptive), BLOCK_SIZE=g.block_size,
                                                   num_warps=_warps(g.block_size))
    return out[:2]


def ema_(teacher: torch.Tensor, student: torch.Tensor, momentum: float, *, block_size: int = 4096) -> torch.Tensor:
    """CoTTA teacher update in place: t <- t*m + (1-m)*s, m clamped to [0, 1]; returns ``teacher``.

    Parameters:
        teacher: flat contiguous buffer (float32, bfloat16 or float16), updated in place.
        student: contiguous buffer with as many elements (any of those dtypes), same device.
        momentum: EMA momentum m.
    """
    _check_tensor(teacher, "teacher", None, None, tuple(_DTYPES))
    _check_tensor(student, "student", teacher.numel(), teacher.device, tuple(_DTYPES))
    _check_device(teacher.device)
    m = min(max(float(momentum), 0.0), 1.0)
    n = teacher.numel()
    if n:
        _ema_kernel[(triton.cdiv(n, block_size),)](teacher, student, n, m, 1.0 - m,
                                                    BLOCK_SIZE=block_size, num_warps=_warps(block_size))
    return teacher


def restore_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst <- src (bit-exact rollback from a snapshot)."""
    return dst.copy_(src)


def stats_dict(stats: torch.Tensor) -> dict[str, float]:
    """``fused_step``'s tensor as the dict ``_C.fused_step`` returns (one host read)."""
    return dict(zip(STAT_KEYS, stats.tolist()))
