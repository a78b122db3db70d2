"""Fused, filtered in-place parameter update over a flat parameter arena (Triton).

The GPU twin of the C++ engine (``yolozu_ttt._C``), with its interface: ``fused_step``,
``grad_stats`` and ``sar_perturb`` take the groups and a caller's float64 ``out`` buffer on the
groups' device, and write their scalars into it in the layouts of ``yolozu_ttt.common``
(``STAT_KEYS``, ``GRAD_STAT_KEYS``, ``SAR_STAT_KEYS``). One :class:`TritonArenaGroup` binds the
flat buffers of one dtype (float32 / bfloat16 / float16):

    param, grad, base, snap   the arena dtype, ``numel`` elements each (``snap`` optional)
    exp_avg, exp_avg_sq       float32 Adam moments
    offsets, sizes            the parameter tensors packed back to back, in order
    has_grad                  one byte per segment, written on the host by autograd hooks

Every launcher only enqueues work: nothing reads device memory back to the host, so a training
step costs the caller one host read of ``out``. The clip coefficient is computed on device and
read from ``out`` by the Adam pass. Reductions are deterministic: each program writes its partial
sums (fp32 block sum, stored as fp64) to its own slot of a workspace (rows ``PART_*``), and one
single-program kernel sums the slots in a fixed order; no float atomics anywhere, so two runs give
bit-identical results.

The step, numbered as in the C++ engine and the README: 1 EATA anchor gradient, 2 grad norm,
3 clip coefficient, 4 Adam, 5 pre-step snapshot, 6 CoTTA teacher EMA, 7 CoTTA stochastic restore
(counter-based draws keyed by ``restore_key(seed, counter, group)``, the same hash and key as
``_C``), 8 update / total-update norms (of the final parameters) and restored count.

Blocks never straddle segments (the block table maps block -> segment, start, end, segment
numel; columns ``BLK_*``; a zero-size segment gets one empty block), so the per-segment inputs
are loaded once per program. Everything that does not change between steps lives on the device
from the group's construction (the block table) or from the first step that needs it (the
per-segment anchor coefficients ``2*lambda/n`` for one lambda, the Adam bias-correction table for
one (lr, beta1, beta2), indexed by the step count). The Adam step counts live on the device, one
per block (each program owns its own counter, so no program reads a count another one writes):
the Adam pass adds the segment's has-grad flag to it and looks its bias corrections up in the
table. The host's per-step work is therefore O(1) in the number of parameter tensors: one
non-blocking copy of the has-grad bytes (the autograd hooks' ``bytearray``, viewed once as a
tensor) and the launches. :func:`prepare_step` splits a step into that host work and a launch
that reads only device memory the group owns (``StepLaunch``), so ``yolozu_ttt.engine`` can
capture the launch in a CUDA graph and replay it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ..common import GRAD_STAT_KEYS, INTERPRET, SAR_STAT_KEYS, STAT_KEYS, SUPPORTED_DTYPES, check_step_options
from ._shared import _fmix32, _to_storage
from ._shared import num_warps as _warps
from .constants import CLIP_EPS, RBLOCK, SAR_EPS, UNIFORM_BITS, restore_key  # noqa: F401 (restore_key: the API)


def _index(keys: Sequence[str], key: str) -> tl.constexpr:
    """Position of ``key`` in a ``yolozu_ttt.common`` layout, as a kernel constant."""
    return tl.constexpr(keys.index(key))


# Rows of the fp64 partial-sum workspace: one slot per program, summed in a fixed order.
PART_GRAD = tl.constexpr(0)  # ||g||^2 (with the anchor gradient, before clipping)
PART_CLIPPED = tl.constexpr(1)  # ||g * coef||^2
PART_UPDATE = tl.constexpr(2)  # ||p_new - p_old||^2
PART_TOTAL = tl.constexpr(3)  # ||p_new - base||^2
PART_ANCHOR = tl.constexpr(4)  # sum_i mean((p_i - base_i)^2)
PART_RESTORED = tl.constexpr(5)  # elements restored
PART_ROWS = 6

# Columns of the Adam bias-correction table (float32, row t = step count t; row 0 = (0, 1)).
BIAS_NEG_STEP_SIZE = tl.constexpr(0)  # -lr / (1 - beta1^t)
BIAS_BC2_SQRT = tl.constexpr(1)  # sqrt(1 - beta2^t)
BIAS_COLS = 2

# Columns of the block table (int64, one row per program, built once per group).
BLK_SEG = tl.constexpr(0)
BLK_START = tl.constexpr(1)  # first element
BLK_END = tl.constexpr(2)  # end element
BLK_SEG_NUMEL = tl.constexpr(3)
BLK_COLS = tl.constexpr(4)

# Where the kernels write in ``out`` (the layouts of yolozu_ttt.common).
GRAD_NORM = _index(STAT_KEYS, "grad_norm")
GRAD_NORM_CLIPPED = _index(STAT_KEYS, "grad_norm_clipped")
UPDATE_NORM = _index(STAT_KEYS, "update_norm")
TOTAL_UPDATE_NORM = _index(STAT_KEYS, "total_update_norm")
ANCHOR_LOSS = _index(STAT_KEYS, "anchor_loss")
CLIP_COEF = _index(STAT_KEYS, "clip_coef")
RESTORED = _index(STAT_KEYS, "restored")
GS_GRAD_NORM = _index(GRAD_STAT_KEYS, "grad_norm")
GS_ANCHOR_LOSS = _index(GRAD_STAT_KEYS, "anchor_loss")
SAR_DIRECTION_NORM = _index(SAR_STAT_KEYS, "direction_norm")
SAR_APPLIED = _index(SAR_STAT_KEYS, "applied")

_RBLOCK = RBLOCK  # finalize kernels: slots summed per iteration
_CLIP_EPS = tl.constexpr(CLIP_EPS)
_SAR_EPS = tl.constexpr(SAR_EPS)
_DRAW_SHIFT = tl.constexpr(32 - UNIFORM_BITS)
_DRAW_UNIT = tl.constexpr(2.0 ** -UNIFORM_BITS)


# ------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------
@triton.jit
def _block(blocks_ptr, flags_ptr, pid, BLOCK_SIZE: tl.constexpr):
    """Program ``pid``'s block: (segment, element offsets, in-block mask, with-grad mask, segment
    numel, has-grad flag 0/1 as int64).

    The with-grad mask is empty when the segment has no grad this step (torch's Adam skips
    tensors whose ``.grad`` is None); ``flags_ptr`` holds one byte per segment.
    """
    row = blocks_ptr + pid * BLK_COLS
    seg = tl.load(row + BLK_SEG)
    start = tl.load(row + BLK_START)
    end = tl.load(row + BLK_END)
    flag = (tl.load(flags_ptr + seg) != 0).to(tl.int64)
    grad_end = start + (end - start) * flag
    offs = start + tl.arange(0, BLOCK_SIZE)
    return seg, offs, offs < end, offs < grad_end, tl.load(row + BLK_SEG_NUMEL), flag


@triton.jit
def _put(part_ptr, part_stride, ROW: tl.constexpr, slot, value):
    """Store a program's partial into slot ``slot`` of workspace row ``ROW`` (``PART_*``, fp64)."""
    tl.store(part_ptr + ROW * part_stride + slot, value)


@triton.jit
def _sum_slots(part_ptr, n_slots, RBLOCK: tl.constexpr):
    """Sum ``n_slots`` fp64 partials in a fixed order (deterministic)."""
    acc = tl.zeros([RBLOCK], dtype=tl.float64)
    for i in range(0, n_slots, RBLOCK):
        idx = i + tl.arange(0, RBLOCK)
        acc += tl.load(part_ptr + idx, mask=idx < n_slots, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _row_sum(part_ptr, part_stride, ROW: tl.constexpr, n_slots, RBLOCK: tl.constexpr):
    """The sum of workspace row ``ROW``."""
    return _sum_slots(part_ptr + ROW * part_stride, n_slots, RBLOCK)


@triton.jit
def _sumsq(x):
    """A block's sum of squares: summed in fp32, returned as fp64 (NaN stays NaN, inf stays inf)."""
    return tl.sum(x * x, axis=0).to(tl.float64)


@triton.jit
def _f32_norm(sumsq):
    """fp32 norm of a fp64 sum of squares, overflowing to inf where an fp32 sum would (as _C).

    The sum is rounded to fp32 first (inf past FLT_MAX, NaN stays NaN), then its fp64 sqrt (IEEE)
    is rounded to fp32: torch's fp32 sqrt of that sum, correctly rounded.
    """
    return tl.sqrt(sumsq.to(tl.float32).to(tl.float64)).to(tl.float32)


@triton.jit
def _clip_coef(norm, max_norm):
    """3. torch.nn.utils.clip_grad_norm_'s coefficient in fp32: min(max_norm / (||g|| + 1e-6), 1).

    A NaN norm gives a NaN coefficient (torch's clamp propagates it).
    """
    coef = tl.div_rn(max_norm, norm + _CLIP_EPS)
    return tl.where(coef > 1.0, 1.0, coef)


@triton.jit
def _uniform01(offs, key):
    """CoTTA restore draw of element ``offs``: ``(fmix32(offs ^ key) >> 8) * 2^-24`` in [0, 1) (as _C)."""
    h = _fmix32(offs.to(tl.uint32) ^ key)
    return (h >> _DRAW_SHIFT).to(tl.float32) * _DRAW_UNIT


@triton.jit
def _put_grad_partials(part_ptr, part_stride, slot, g, d, seg_numel, ANCHOR_VALUE: tl.constexpr):
    """2. the block's ||g||^2 and, with ANCHOR_VALUE, its share sum(d^2)/n of the anchor value (else 0)."""
    _put(part_ptr, part_stride, PART_GRAD, slot, _sumsq(g))
    if ANCHOR_VALUE:
        _put(part_ptr, part_stride, PART_ANCHOR, slot, tl.sum(d * d, axis=0).to(tl.float64) / seg_numel.to(tl.float64))
    else:
        _put(part_ptr, part_stride, PART_ANCHOR, slot, 0.0)


@triton.jit
def _grad_pass_kernel(
    p_ptr,
    g_ptr,
    base_ptr,
    blocks_ptr,
    flags_ptr,
    anchor_ptr,
    part_ptr,
    part_stride,
    part_base,
    HAS_ANCHOR: tl.constexpr,
    ANCHOR_VALUE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Per block, over segments with a grad: ||g + 2*lambda*(p-base)/n||^2 and sum (p-base)^2 / n.

    Parameters:
        p_ptr, g_ptr, base_ptr: the flat parameter, grad and base buffers (arena dtype).
        blocks_ptr: the block table (int64, ``BLK_COLS`` per program).
        flags_ptr: the has-grad flags (uint8, one per segment).
        anchor_ptr: the anchor coefficients ``2*lambda/n`` (float32, one per segment), with HAS_ANCHOR.
        part_ptr, part_stride: the fp64 workspace (``PART_ROWS`` rows of ``part_stride`` slots);
            writes rows ``PART_GRAD`` and ``PART_ANCHOR``.
        part_base: this group's first slot (groups share the workspace).
        HAS_ANCHOR: add the anchor gradient to g.
        ANCHOR_VALUE: write the anchor value's partials (else zeros).
        BLOCK_SIZE: elements per program.
    """
    pid = tl.program_id(0).to(tl.int64)
    seg, offs, _, gmask, seg_numel, _ = _block(blocks_ptr, flags_ptr, pid, BLOCK_SIZE)
    g = tl.load(g_ptr + offs, mask=gmask, other=0.0).to(tl.float32)

    # 1. EATA anchor gradient: d/dp lambda*mean((p-base)^2) = 2*lambda*(p-base)/n
    if HAS_ANCHOR or ANCHOR_VALUE:
        p = tl.load(p_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
        d = p - tl.load(base_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
    else:
        d = tl.zeros_like(g)
    if HAS_ANCHOR:
        g = g + tl.load(anchor_ptr + seg) * d

    # 2. ||g||^2 (before clipping) and the anchor value
    _put_grad_partials(part_ptr, part_stride, part_base + pid, g, d, seg_numel, ANCHOR_VALUE)


@triton.jit
def _adam_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    base_ptr,
    snap_ptr,
    teacher_ptr,
    blocks_ptr,
    flags_ptr,
    anchor_ptr,
    bias_ptr,
    steps_ptr,
    out_ptr,
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
    key_ptr,
    gate_ptr,
    HAS_CLIP: tl.constexpr,
    HAS_ANCHOR: tl.constexpr,
    WRITE_SNAPSHOT: tl.constexpr,
    HAS_EMA: tl.constexpr,
    HAS_RESTORE: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One fused Adam step (torch.optim.Adam defaults and operation order, fp32 math), then the
    CoTTA teacher EMA and stochastic restore when asked, and the step's partial sums.

    Parameters:
        p_ptr, g_ptr, base_ptr: the flat parameter, grad and base buffers (arena dtype).
        m_ptr, v_ptr: the float32 Adam moments.
        snap_ptr: the pre-step snapshot (arena dtype; may be the grad buffer), with WRITE_SNAPSHOT.
        teacher_ptr: the CoTTA teacher (arena dtype), with HAS_EMA.
        blocks_ptr, flags_ptr, anchor_ptr: the block table, the has-grad flags and the anchor
            coefficients (with HAS_ANCHOR).
        bias_ptr: the bias-correction table (float32, ``BIAS_COLS`` per step count).
        steps_ptr: the Adam step count of each block (int32), advanced here where the segment has a grad.
        out_ptr: the caller's float64 stats (``STAT_KEYS``); with HAS_CLIP the coefficient is
            read from ``out[CLIP_COEF]``.
        part_ptr, part_stride, part_base: the fp64 workspace and this group's first slot; writes
            ``PART_CLIPPED``, ``PART_UPDATE``, ``PART_TOTAL``, ``PART_RESTORED`` and, without
            clipping (no grad pass ran), ``PART_GRAD`` and ``PART_ANCHOR``.
        one_minus_beta1, beta2, one_minus_beta2, eps: Adam's scalars.
        ema_m, ema_w: the teacher EMA's m and 1 - m.
        restore_q, key_ptr: the restore probability and this group's 32-bit key (an int32 on the
            device, written by the host before the launch).
        gate_ptr: with GATED, a float64 on the device: 0 closes the step (no segment counts as
            having a grad: no parameter, moment, step count, teacher or restore changes).
        HAS_CLIP, HAS_ANCHOR, WRITE_SNAPSHOT, HAS_EMA, HAS_RESTORE, GATED: the step's parts.
        BLOCK_SIZE: elements per program.
    """
    pid = tl.program_id(0).to(tl.int64)
    slot = part_base + pid
    seg, offs, mask, gmask, seg_numel, flag = _block(blocks_ptr, flags_ptr, pid, BLOCK_SIZE)
    if GATED:  # decided on the device (e.g. EATA: anything selected)
        open_ = tl.load(gate_ptr) != 0.0
        gmask = tl.where(open_, gmask, False)
        flag = flag * open_.to(tl.int64)
        live = tl.where(open_, mask, False)
    else:
        live = mask
    # the step count t of this block's segment (advanced only with a grad) and its bias corrections
    t = tl.load(steps_ptr + pid) + flag.to(tl.int32)
    tl.store(steps_ptr + pid, t)
    neg_step_size = tl.load(bias_ptr + t * BIAS_COLS + BIAS_NEG_STEP_SIZE)
    bc2_sqrt = tl.load(bias_ptr + t * BIAS_COLS + BIAS_BC2_SQRT)

    p_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
    # 5. pre-step snapshot, bit-exact (every segment); after the grad load: it may be the grad buffer
    if WRITE_SNAPSHOT:
        tl.store(snap_ptr + offs, p_raw, mask=mask)
    p_old = p_raw.to(tl.float32)
    base_raw = tl.load(base_ptr + offs, mask=mask, other=0.0)
    base = base_raw.to(tl.float32)

    # 1. EATA anchor gradient: g <- g + 2*lambda*(p-base)/n ; anchor = sum_i mean((p_i-base_i)^2)
    d = tl.where(gmask, p_old - base, 0.0)
    if HAS_ANCHOR:
        g = g + tl.load(anchor_ptr + seg) * d

    # 2. ||g||^2 and the anchor value (with clipping, the grad pass has summed them already)
    # 3. clip: g <- g * coef, coef computed on device from the grad pass's sums
    if HAS_CLIP:
        gc = g * tl.load(out_ptr + CLIP_COEF).to(tl.float32)
    else:
        _put_grad_partials(part_ptr, part_stride, slot, g, d, seg_numel, HAS_ANCHOR)
        gc = g
    _put(part_ptr, part_stride, PART_CLIPPED, slot, _sumsq(gc))

    # 4. Adam: m <- m + (1-b1)(g-m) ; v <- v*b2 + ((1-b2)*g)*g
    #          p <- p + ((-lr/bc1) * m) / (sqrt(v)/sqrt(bc2) + eps)
    m = tl.load(m_ptr + offs, mask=gmask, other=0.0)
    v = tl.load(v_ptr + offs, mask=gmask, other=0.0)
    m = m + one_minus_beta1 * (gc - m)
    v = v * beta2 + (one_minus_beta2 * gc) * gc
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p_new_s = _to_storage(p_old + tl.div_rn(neg_step_size * m, denom),
                          p_ptr.dtype.element_ty)
    tl.store(m_ptr + offs, m, mask=gmask)
    tl.store(v_ptr + offs, v, mask=gmask)
    p_new = tl.where(gmask, p_new_s.to(tl.float32), p_old)

    # 6. CoTTA teacher EMA on the updated student: t <- t*m + (1-m)*p_new (every segment)
    if HAS_EMA:
        t = tl.load(teacher_ptr + offs, mask=live, other=0.0).to(tl.float32)
        tl.store(teacher_ptr + offs, _to_storage(t * ema_m + ema_w * p_new, teacher_ptr.dtype.element_ty), mask=live)

    # 7. CoTTA stochastic restore: p <- base where u(j) < q (every segment, counter-based RNG)
    if HAS_RESTORE:
        hit = (_uniform01(offs, tl.load(key_ptr).to(tl.uint32, bitcast=True)) < restore_q) & live
        tl.store(p_ptr + offs, tl.where(hit, base_raw, p_new_s), mask=gmask | hit)
        p_new = tl.where(hit, base, p_new)
        n_restored = tl.sum(hit.to(tl.float32), axis=0).to(tl.float64)
    else:
        tl.store(p_ptr + offs, p_new_s, mask=gmask)
        n_restored = 0.0

    # 8. ||p_new - p_old||^2, ||p_new - base||^2 (the stored, rounded, final p_new), restored count
    _put(part_ptr, part_stride, PART_UPDATE, slot, _sumsq(p_new - p_old))
    _put(part_ptr, part_stride, PART_TOTAL, slot, _sumsq(p_new - base))
    _put(part_ptr, part_stride, PART_RESTORED, slot, n_restored)


@triton.jit
def _put_grad_stats(part_ptr, part_stride, n_slots, out_ptr, NORM_AT: tl.constexpr, ANCHOR_AT: tl.constexpr,
                    RBLOCK: tl.constexpr):
    """2. out[NORM_AT] = ||g|| and out[ANCHOR_AT] = the anchor value, from the workspace; returns ||g||."""
    norm = _f32_norm(_row_sum(part_ptr, part_stride, PART_GRAD, n_slots, RBLOCK))
    tl.store(out_ptr + NORM_AT, norm)
    tl.store(out_ptr + ANCHOR_AT, _row_sum(part_ptr, part_stride, PART_ANCHOR, n_slots, RBLOCK).to(tl.float32))
    return norm


@triton.jit
def _grad_stats_kernel(part_ptr, part_stride, n_slots, out_ptr, max_norm, NORM_AT: tl.constexpr,
                       ANCHOR_AT: tl.constexpr, CLIP: tl.constexpr, RBLOCK: tl.constexpr):
    """||g|| and the anchor value from the grad pass's partials and, with CLIP, the clip coefficient.

    Parameters:
        part_ptr, part_stride, n_slots: the fp64 workspace and the slots in use.
        out_ptr: the caller's float64 buffer; writes out[NORM_AT], out[ANCHOR_AT] and, with CLIP,
            out[CLIP_COEF] (``fused_step``'s layout).
        max_norm: the clipping threshold (with CLIP).
        RBLOCK: slots summed per iteration.
    """
    norm = _put_grad_stats(part_ptr, part_stride, n_slots, out_ptr, NORM_AT, ANCHOR_AT, RBLOCK)
    if CLIP:
        tl.store(out_ptr + CLIP_COEF, _clip_coef(norm, max_norm))


@triton.jit
def _step_stats_kernel(part_ptr, part_stride, n_slots, out_ptr, HAS_CLIP: tl.constexpr, RBLOCK: tl.constexpr):
    """The step's stats (``STAT_KEYS``) from the partials, in a fixed order.

    Parameters:
        part_ptr, part_stride, n_slots: the fp64 workspace and the slots in use.
        out_ptr: the caller's float64 stats; without HAS_CLIP this kernel also writes the grad
            norm, the anchor value and the coefficient 1 (with it, ``_grad_stats_kernel`` did).
        RBLOCK: slots summed per iteration.
    """
    if not HAS_CLIP:
        _put_grad_stats(part_ptr, part_stride, n_slots, out_ptr, GRAD_NORM, ANCHOR_LOSS, RBLOCK)
        tl.store(out_ptr + CLIP_COEF, 1.0)
    # 8. the norms of the clipped grad, of the update and of the drift; the restored count
    tl.store(out_ptr + GRAD_NORM_CLIPPED, _f32_norm(_row_sum(part_ptr, part_stride, PART_CLIPPED, n_slots, RBLOCK)))
    tl.store(out_ptr + UPDATE_NORM, _f32_norm(_row_sum(part_ptr, part_stride, PART_UPDATE, n_slots, RBLOCK)))
    tl.store(out_ptr + TOTAL_UPDATE_NORM, _f32_norm(_row_sum(part_ptr, part_stride, PART_TOTAL, n_slots, RBLOCK)))
    tl.store(out_ptr + RESTORED, _row_sum(part_ptr, part_stride, PART_RESTORED, n_slots, RBLOCK))


@triton.jit
def _sar_norm_kernel(p_ptr, g_ptr, blocks_ptr, flags_ptr, part_ptr, part_base,
                     ADAPTIVE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Per block: ||d||^2 over segments with a grad.

    Parameters:
        p_ptr, g_ptr: the flat parameter and grad buffers.
        blocks_ptr, flags_ptr: the block table and the has-grad flags.
        part_ptr, part_base: the fp64 workspace (one row) and this group's first slot.
        ADAPTIVE: d = g*|p| instead of g.  BLOCK_SIZE: elements per program.
    """
    pid = tl.program_id(0).to(tl.int64)
    _, offs, _, gmask, _, _ = _block(blocks_ptr, flags_ptr, pid, BLOCK_SIZE)
    d = tl.load(g_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
    if ADAPTIVE:
        d = d * tl.abs(tl.load(p_ptr + offs, mask=gmask, other=0.0).to(tl.float32))
    tl.store(part_ptr + part_base + pid, _sumsq(d))


@triton.jit
def _sar_scale_kernel(part_ptr, n_slots, out_ptr, scale_ptr, rho, RHO_POSITIVE: tl.constexpr, RBLOCK: tl.constexpr):
    """norm = ||d|| (fp32) ; applied = rho > 0 and not norm <= 0 (a NaN norm applies: NaN params, like
    the reference) ; scale = rho / (norm + 1e-12).

    Parameters:
        part_ptr, n_slots: the direction's partial sums.
        out_ptr: the caller's float64 buffer (``SAR_STAT_KEYS``): the norm and applied (1.0 / 0.0).
        scale_ptr: float32 scratch for the scale, read by ``_sar_apply_kernel``.
        rho: the neighbourhood size.  RHO_POSITIVE: rho > 0.  RBLOCK: slots summed per iteration.
    """
    norm = _f32_norm(_sum_slots(part_ptr, n_slots, RBLOCK))
    tl.store(out_ptr + SAR_DIRECTION_NORM, norm)
    if RHO_POSITIVE:
        tl.store(out_ptr + SAR_APPLIED, tl.where(norm <= 0.0, 0.0, 1.0))
    else:
        tl.store(out_ptr + SAR_APPLIED, 0.0)
    tl.store(scale_ptr, (rho / (norm.to(tl.float64) + _SAR_EPS)).to(tl.float32))


@triton.jit
def _sar_apply_kernel(p_ptr, g_ptr, snap_ptr, blocks_ptr, flags_ptr, out_ptr, scale_ptr,
                      ADAPTIVE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """snap <- p (every segment) ; if applied (read on device): p <- p + scale*d (with a grad).

    Parameters:
        p_ptr, g_ptr, snap_ptr: the flat parameter, grad and snapshot buffers.
        blocks_ptr, flags_ptr: the block table and the has-grad flags.
        out_ptr: the float64 buffer ``_sar_scale_kernel`` wrote (its applied flag is read).
        scale_ptr: the float32 scale.  ADAPTIVE: d = g*|p|.  BLOCK_SIZE: elements per program.
    """
    pid = tl.program_id(0).to(tl.int64)
    _, offs, mask, gmask, _, _ = _block(blocks_ptr, flags_ptr, pid, BLOCK_SIZE)
    applied = tl.load(out_ptr + SAR_APPLIED) != 0.0  # decided on device
    gmask = tl.where(applied, gmask, False)
    p_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
    tl.store(snap_ptr + offs, p_raw, mask=mask)
    p = p_raw.to(tl.float32)
    d = tl.load(g_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
    if ADAPTIVE:
        d = d * tl.abs(p)
    tl.store(p_ptr + offs, _to_storage(p + tl.load(scale_ptr) * d, p_ptr.dtype.element_ty), mask=gmask)


# ------------------------------------------------------------------------------------------
# Host side: checks, the arena group and what it builds once, the per-step host work
# ------------------------------------------------------------------------------------------
#: Rows of a fresh bias-correction table (step counts 0 .. rows-1); it doubles when a step needs more.
_BIAS_MIN_ROWS = 256


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


def _check_out(out: Any, keys: Sequence[str], device: torch.device) -> torch.Tensor:
    """``out`` must be a contiguous 1-D float64 tensor on ``device`` with room for ``keys``."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"yolozu_ttt.kernels.update: out must be a torch.Tensor, got {type(out).__name__}")
    problems = []
    if out.dtype != torch.float64:
        problems.append(f"dtype {out.dtype}, expected torch.float64")
    if out.device != device:
        problems.append(f"device {out.device}, expected the groups' {device}")
    if out.dim() != 1 or out.numel() < len(keys):
        problems.append(f"shape {tuple(out.shape)}, expected 1-D with at least {len(keys)} elements {tuple(keys)}")
    elif not out.is_contiguous():
        problems.append("a stride other than 1, expected contiguous")
    if problems:
        raise ValueError("yolozu_ttt.kernels.update: out has " + "; ".join(problems))
    return out


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not INTERPRET:
        raise ValueError("yolozu_ttt.kernels.update: CPU tensors need TRITON_INTERPRET=1 "
                         "(use yolozu_ttt._C for CPU arenas)")


def _upload(rows: np.ndarray, device: torch.device, dtype: np.dtype) -> torch.Tensor:
    """A host array as a device tensor without a host sync (pinned, non-blocking, on CUDA). For the
    tables built once: the caching host allocator keeps the pinned copy until the copy is done."""
    t = torch.from_numpy(np.ascontiguousarray(rows, dtype=dtype).reshape(-1))
    if t.numel() == 0:
        t = torch.zeros(1, dtype=t.dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
        has_grad: a byte buffer (e.g. ``bytearray``) with one entry per segment, read at every
            step (nonzero = the segment has a grad), or None = every segment has one. A writable
            buffer is viewed once as a tensor and copied to the device at each step (one
            non-blocking copy); a read-only one (``bytes``) is copied once.
        block_size: elements per program (power of two); blocks never straddle segments.

    The group keeps references to every tensor. Adam step counts are kept on the device, per
    block, and advance only for segments with a grad (like torch.optim.Adam's per-param state).
    """

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, base: torch.Tensor, snap: torch.Tensor | None,
                 offsets: Sequence[int], sizes: Sequence[int], has_grad: Any = None, *,
                 block_size: int = 2048):
        self.param = _check_tensor(param, "param", None, None, SUPPORTED_DTYPES)
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
        columns: tuple[list[int], ...] = ([], [], [], [])  # segment, start, end, segment numel
        first_block = []
        expect = 0
        for s, (off, size) in enumerate(zip(self.offsets, self.sizes)):
            if off != expect or size < 0:
                raise ValueError("yolozu_ttt.kernels.update: segments must tile the arena in order")
            expect += size
            first_block.append(len(columns[0]))
            for b in range(0, max(size, 1), self.block_size):  # a zero-size segment: one empty block
                for column, value in zip(columns, (s, off + b, off + min(size, b + self.block_size), size)):
                    column.append(value)
        if expect != n:
            raise ValueError(f"yolozu_ttt.kernels.update: segments cover {expect} elements, arena has {n}")
        n_seg = len(self.sizes)
        flags_src = None
        if has_grad is not None:
            view = memoryview(has_grad)
            if view.itemsize != 1 or view.nbytes != n_seg:
                raise ValueError("yolozu_ttt.kernels.update: has_grad must be a byte buffer with one entry per segment")
            if n_seg and not view.readonly:
                flags_src = torch.frombuffer(has_grad, dtype=torch.uint8)  # a view: the hooks' writes show
        self.has_grad = has_grad
        self.num_blocks = len(columns[0])
        self._grid = (self.num_blocks,)
        self._warps = _warps(self.block_size)
        # --- built once: the block table, the first block of each segment, 2/n per segment
        blocks = np.zeros((max(self.num_blocks, 1), BLK_COLS), dtype=np.int64)
        for col, column in zip((BLK_SEG, BLK_START, BLK_END, BLK_SEG_NUMEL), columns):
            blocks[:len(column), col] = column
        self._blocks = _upload(blocks, dev, np.int64)
        self._first_block = np.asarray(first_block, dtype=np.int64)
        sizes_f = np.asarray(self.sizes, dtype=np.float64)
        self._anchor_scale = np.divide(2.0, sizes_f, out=np.zeros_like(sizes_f), where=sizes_f > 0)
        # --- device state: has-grad flags (refreshed per step), Adam step count per block,
        # the restore key; tables built on first use (anchor coefficients, bias corrections)
        if flags_src is None and has_grad is not None:
            flags = np.frombuffer(bytes(memoryview(has_grad)), dtype=np.uint8)
        else:
            flags = np.ones(n_seg, dtype=np.uint8)
        self._flags = _upload(flags, dev, np.uint8)
        self._flags_src = flags_src
        self._steps = torch.zeros(max(self.num_blocks, 1), dtype=torch.int32, device=dev)
        self._adam_steps = 0  # fused steps since the last reset: a bound on every step count
        self._key = torch.zeros(1, dtype=torch.int32, device=dev)
        self._anchor_lambda: float | None = None
        self._anchor: torch.Tensor | None = None
        self._bias_key: tuple[float, float, float] | None = None
        self._bias: torch.Tensor | None = None
        self._bias_rows = 0
        self._reserved_steps = 0  # the table covers at least this many steps (reserve_steps)
        self._plans: dict[tuple[int, ...], _Plan] = {}
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

    @property
    def steps(self) -> list[int]:
        """Adam step count per segment (as ``_C.ArenaGroup.steps``); reads the device."""
        if not self.sizes:
            return []
        counts = self._steps.cpu().numpy()
        return [int(c) for c in counts[self._first_block]]

    @property
    def device(self) -> torch.device:
        return self.param.device

    def reset_state(self) -> None:
        """Zero the Adam moments and step counts."""
        self._steps.zero_()
        self._adam_steps = 0
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()

    # ---- per step: O(1) host work in the number of segments ---------------------------------
    def _upload_flags(self) -> None:
        """The has-grad bytes to the device: one copy, non-blocking (a pageable source is staged by
        CUDA before the call returns, so the hooks may write the buffer again right away). Not while
        a CUDA graph is being captured: a graph cannot hold a copy from pageable memory, and a
        captured step's flags are the ones ``prepare_step`` uploaded before the capture."""
        if self._flags_src is not None and not (self._flags.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._flags.copy_(self._flags_src, non_blocking=True)

    def _anchor_coefs(self, anchor_lambda: float) -> torch.Tensor:
        """``2*lambda/n`` per segment (float32 on the device), rebuilt only when lambda changes."""
        if anchor_lambda != self._anchor_lambda or self._anchor is None:
            self._anchor = _upload(anchor_lambda * self._anchor_scale, self.device, np.float32)
            self._anchor_lambda = anchor_lambda
        return self._anchor

    def reserve_steps(self, steps: int) -> None:
        """Size the bias-correction table for ``steps`` steps from the next one on, so it is not
        reallocated mid-run (a CUDA graph of the step bakes its pointer in)."""
        self._reserved_steps = max(self._reserved_steps, int(steps))

    def _bias_table(self, lr: float, beta1: float, beta2: float) -> torch.Tensor:
        """The bias corrections for step counts 0 .. rows-1 (``BIAS_*`` columns; row 0 = (0, 1)),
        for the step about to run (step counts up to ``_adam_steps + 1``); rebuilt when (lr, betas)
        change, doubled when the steps outgrow it. The powers come from libm's ``pow`` (as the
        C++ engine's ``std::pow``), in float64, rounded to float32 once."""
        key = (lr, beta1, beta2)
        need = max(self._adam_steps, self._reserved_steps) + 1
        if key != self._bias_key or need >= self._bias_rows:
            rows = max(_BIAS_MIN_ROWS, 2 * self._bias_rows if key == self._bias_key else 0)
            while rows <= need:
                rows *= 2
            table = np.zeros((rows, BIAS_COLS), dtype=np.float64)
            table[0, 1] = 1.0
            for t in range(1, rows):
                table[t, 0] = -(lr / (1.0 - math.pow(beta1, float(t))))
                table[t, 1] = math.sqrt(1.0 - math.pow(beta2, float(t)))
            self._bias = _upload(table, self.device, np.float32)
            self._bias_key, self._bias_rows = key, rows
        return self._bias  # type: ignore[return-value]


class _Plan:
    """What one tuple of groups keeps between calls: the fp64 partial-sum workspace (``PART_ROWS`` x
    slots; every slot in use is written before it is read), each group's first slot, SAR's scale."""

    def __init__(self, gs: list[TritonArenaGroup], device: torch.device):
        self.groups = gs
        self.bases, total = [], 0
        for g in gs:
            self.bases.append(total)
            total += g.num_blocks
        self.n_slots = total
        self.part = torch.empty((PART_ROWS, max(total, 1)), dtype=torch.float64, device=device)
        self.stride = self.part.stride(0)
        self.sar_scale = torch.empty(1, dtype=torch.float32, device=device)
        self.items = list(zip(gs, self.bases))


def _prepare(groups: Sequence[TritonArenaGroup], out: Any, keys: Sequence[str]) -> tuple[list[TritonArenaGroup], _Plan]:
    """Checks, then the plan of ``groups`` (built on first use, kept by the first group)."""
    gs = list(groups)
    if not gs:
        raise ValueError("yolozu_ttt.kernels.update: groups must not be empty")
    for g in gs:
        if not isinstance(g, TritonArenaGroup):
            raise TypeError(f"yolozu_ttt.kernels.update: expected TritonArenaGroup, got {type(g).__name__}")
    device = gs[0].device
    key = tuple(map(id, gs))
    plan = gs[0]._plans.get(key)
    if plan is None:
        if any(g.device != device for g in gs):
            raise ValueError("yolozu_ttt.kernels.update: all groups must be on one device")
        _check_device(device)
        plan = _Plan(gs, device)
        if len(gs[0]._plans) >= 8:
            gs[0]._plans.clear()
        gs[0]._plans[key] = plan
    if not (type(out) is torch.Tensor and out.dtype == torch.float64 and out.device == device and out.dim() == 1
            and out.numel() >= len(keys) and out.is_contiguous()):
        _check_out(out, keys, device)
    return gs, plan


def _as_i32(key: int) -> int:
    """A uint32 as the int32 with the same bits (a kernel argument Triton types as i32)."""
    return key - (1 << 32) if key >= 1 << 31 else key


def _grad_pass(plan: _Plan, has_anchor: bool, anchor_value: bool, anchor_lambda: float) -> None:
    """1-2. every group's grad-pass partials (rows ``PART_GRAD`` and ``PART_ANCHOR``) into the workspace."""
    part, stride = plan.part, plan.stride
    for g, base in plan.items:
        if g.num_blocks:
            anchor = g._anchor_coefs(anchor_lambda) if has_anchor else g._flags
            _grad_pass_kernel[g._grid](
                g.param, g.grad, g.base, g._blocks, g._flags, anchor, part, stride, base,
                HAS_ANCHOR=has_anchor, ANCHOR_VALUE=anchor_value, BLOCK_SIZE=g.block_size, num_warps=g._warps)


# ------------------------------------------------------------------------------------------
# Launchers (the engine interface, as yolozu_ttt._C's)
# ------------------------------------------------------------------------------------------
class StepLaunch:
    """One fused step after its host work (checks, the has-grad and restore-key uploads, the tables).

    ``run()`` enqueues the step's kernels; they read and write only device memory that outlives
    the call (the groups' buffers and tables, the plan's workspace, ``out``), so a CUDA graph of
    ``run()`` replays the same step for as long as :meth:`key` is unchanged (``key`` names every
    scalar and pointer the launches bake in; the per-step inputs are uploaded before ``run``).
    """

    __slots__ = ("plan", "out", "args")

    def __init__(self, plan: _Plan, out: torch.Tensor, args: tuple):
        self.plan, self.out, self.args = plan, out, args

    def key(self) -> tuple:
        """What a replay of ``run`` depends on besides the uploaded per-step inputs."""
        ptrs = []
        for g, _ in self.plan.items:
            ptrs.extend(t.data_ptr() if t is not None else 0 for t in (g.snap, g.teacher, g._anchor, g._bias))
        gate = self.args[-1]
        args = self.args[:-1] + (None if gate is None else gate.data_ptr(),)
        return (tuple(map(id, self.plan.groups)), self.out.data_ptr(), args, tuple(ptrs))

    def run(self) -> None:
        """Enqueue the step's kernels (no host work beyond the launches)."""
        plan, out = self.plan, self.out
        (lr, beta1, beta2, eps, max_grad_norm, anchor_lambda, write_snapshot, has_ema, ema_m, restore_prob,
         gate) = self.args
        part, stride, n_slots = plan.part, plan.stride, plan.n_slots
        clip = max_grad_norm is not None
        has_anchor = anchor_lambda != 0.0
        has_restore = restore_prob > 0.0
        # 1-3. with clipping: grad-norm pass, then the coefficient on device
        if clip:
            _grad_pass(plan, has_anchor, has_anchor, anchor_lambda)
            _grad_stats_kernel[(1,)](part, stride, n_slots, out, max_grad_norm, NORM_AT=GRAD_NORM,
                                     ANCHOR_AT=ANCHOR_LOSS, CLIP=True, RBLOCK=_RBLOCK)
        # 1-8. Adam pass (reads the coefficient from out), snapshot, EMA, restore, partial sums
        one_minus_beta1, one_minus_beta2, ema_w = 1.0 - beta1, 1.0 - beta2, 1.0 - ema_m
        for g, base in plan.items:
            if g.num_blocks:
                _adam_kernel[g._grid](
                    g.param, g.grad, g.exp_avg, g.exp_avg_sq, g.base,
                    g.snap if write_snapshot else g.param, g.teacher if has_ema else g.param,
                    g._blocks, g._flags, g._anchor if has_anchor else g._flags, g._bias, g._steps, out, part,
                    stride, base, one_minus_beta1, beta2, one_minus_beta2, eps, ema_m, ema_w, restore_prob, g._key,
                    out if gate is None else gate, HAS_CLIP=clip, HAS_ANCHOR=has_anchor,
                    WRITE_SNAPSHOT=write_snapshot, HAS_EMA=has_ema, HAS_RESTORE=has_restore, GATED=gate is not None,
                    BLOCK_SIZE=g.block_size, num_warps=g._warps)
        _step_stats_kernel[(1,)](part, stride, n_slots, out, HAS_CLIP=clip, RBLOCK=_RBLOCK)


def prepare_step(groups: Sequence[TritonArenaGroup], out: torch.Tensor, lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, max_grad_norm: float | None = None,
                 anchor_lambda: float = 0.0, write_snapshot: bool = True, ema_momentum: float | None = None,
                 restore_prob: float = 0.0, restore_seed: int = 0, restore_counter: int = 0,
                 gate: torch.Tensor | None = None) -> StepLaunch:
    """The host half of :func:`fused_step` (same parameters): checks the arguments, uploads the
    has-grad flags (and the restore keys), builds what is missing of the tables, and returns the
    launch. Nothing changes unless the launch runs, except the device flags and keys."""
    lr, beta1, beta2, eps, restore_prob = float(lr), float(beta1), float(beta2), float(eps), float(restore_prob)
    check_step_options(lr, beta1, beta2, restore_prob, "yolozu_ttt.kernels.update")
    gs, plan = _prepare(groups, out, STAT_KEYS)
    write_snapshot = bool(write_snapshot)
    has_ema = ema_momentum is not None
    for g in gs:
        if write_snapshot and g.snap is None:
            raise ValueError("yolozu_ttt.kernels.update: write_snapshot needs a snapshot buffer")
        if has_ema and g.teacher is None:
            raise ValueError("yolozu_ttt.kernels.update: ema_momentum needs a teacher buffer (set_teacher)")
    ema_m = min(max(float(ema_momentum), 0.0), 1.0) if has_ema else 0.0  # type: ignore[arg-type]
    anchor_lambda = float(anchor_lambda)
    has_restore = restore_prob > 0.0
    for i, g in enumerate(gs):
        g._upload_flags()
        g._bias_table(lr, beta1, beta2)
        if anchor_lambda != 0.0:
            g._anchor_coefs(anchor_lambda)
        if has_restore:
            key = _as_i32(restore_key(restore_seed, restore_counter, i))
            g._key.copy_(torch.tensor([key], dtype=torch.int32), non_blocking=True)
        g._adam_steps += 1
    if gate is not None and not (type(gate) is torch.Tensor and gate.dtype == torch.float64
                                 and gate.device == out.device and gate.numel() == 1):
        raise ValueError("yolozu_ttt.kernels.update: gate must be a 1-element float64 tensor on the groups' device")
    clip = None if max_grad_norm is None else float(max_grad_norm)
    return StepLaunch(plan, out, (lr, beta1, beta2, eps, clip, anchor_lambda, write_snapshot, has_ema, ema_m,
                                  restore_prob, gate))


def fused_step(groups: Sequence[TritonArenaGroup], out: torch.Tensor, lr: float, beta1: float = 0.9,
               beta2: float = 0.999, eps: float = 1e-8, max_grad_norm: float | None = None,
               anchor_lambda: float = 0.0, write_snapshot: bool = True, ema_momentum: float | None = None,
               restore_prob: float = 0.0, restore_seed: int = 0, restore_counter: int = 0,
               gate: torch.Tensor | None = None) -> None:
    """One fused step over all groups; the Triton twin of ``yolozu_ttt._C.fused_step``.

    Parameters:
        groups: the arena groups (one per dtype), all on one device; they share one global grad
            norm and clip coefficient.
        out: contiguous 1-D float64 tensor on the groups' device, at least ``len(STAT_KEYS)`` long;
            out[0:7] receives, in the order of ``yolozu_ttt.common.STAT_KEYS``: grad_norm,
            grad_norm_clipped, update_norm, total_update_norm (norms of the final params; NaN
            where the sum of squares holds a NaN, inf where an fp32 sum overflows), anchor_loss,
            clip_coef, restored (elements restored).
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
        gate: None, or a 1-element float64 tensor on the device read by the kernels: 0 applies
            nothing (as if no segment had a grad; the stats are still written, the update norm 0).

    Nothing is read back to the host; the non-finite check is ``~torch.isfinite(out)``. The host
    work is O(1) in the number of segments (:func:`prepare_step`), then :meth:`StepLaunch.run`.
    """
    prepare_step(groups, out, lr, beta1, beta2, eps, max_grad_norm, anchor_lambda, write_snapshot, ema_momentum,
                 restore_prob, restore_seed, restore_counter, gate).run()


def grad_stats(groups: Sequence[TritonArenaGroup], out: torch.Tensor, anchor_lambda: float = 0.0,
               anchor_value: bool = False) -> None:
    """The grad norm and the anchor value without changing anything; the twin of ``_C.grad_stats``.

    Parameters:
        groups: the arena groups, all on one device.
        out: contiguous 1-D float64 tensor on the groups' device with at least two elements;
            out[0:2] receives (grad_norm, anchor_loss), ``yolozu_ttt.common.GRAD_STAT_KEYS``.
        anchor_lambda: EATA anchor weight; the grad norm includes the anchor gradient.
        anchor_value: compute the anchor value even at ``anchor_lambda == 0`` (else it is 0 there).
    """
    gs, plan = _prepare(groups, out, GRAD_STAT_KEYS)
    anchor_lambda = float(anchor_lambda)
    for g in gs:
        g._upload_flags()
    _grad_pass(plan, anchor_lambda != 0.0, anchor_lambda != 0.0 or bool(anchor_value), anchor_lambda)
    _grad_stats_kernel[(1,)](plan.part, plan.stride, plan.n_slots, out, 0.0, NORM_AT=GS_GRAD_NORM,
                             ANCHOR_AT=GS_ANCHOR_LOSS, CLIP=False, RBLOCK=_RBLOCK)


def sar_perturb(groups: Sequence[TritonArenaGroup], out: torch.Tensor, rho: float, adaptive: bool) -> None:
    """SAR ascent step with the snapshot as backup; the Triton twin of ``_C.sar_perturb``.

    Parameters:
        groups: the arena groups (each needs a ``snap`` buffer apart from its grad buffer), all on
            one device.
        out: contiguous 1-D float64 tensor on the groups' device with at least two elements;
            out[0:2] receives (direction norm, applied 1.0 / 0.0), ``yolozu_ttt.common.SAR_STAT_KEYS``.
        rho: neighbourhood size (already scaled by the caller, e.g. rho * first_step_scale).
        adaptive: ASAM direction d = g*|p| instead of g.

    1. norm = ||d|| over segments with a grad (d = g, or g*|p| if adaptive);
    2. if rho > 0: snap <- p for every segment (the backup always holds the pre-ascent values);
       then, unless norm is zero (decided on device; a NaN norm applies, making the parameters
       with a grad NaN, as the reference's NaN scale does), p <- p + rho/(norm + 1e-12) * d for
       segments with a grad.
    """
    gs, plan = _prepare(groups, out, SAR_STAT_KEYS)
    if any(g.snap is None for g in gs):
        raise ValueError("yolozu_ttt.kernels.update: sar_perturb needs a snapshot buffer")
    if any(g.snap.data_ptr() == g.grad.data_ptr() for g in gs):
        raise ValueError("yolozu_ttt.kernels.update: sar_perturb needs a snapshot buffer apart from the grad buffer")
    adaptive = bool(adaptive)
    for g in gs:
        g._upload_flags()
    part, scale = plan.part, plan.sar_scale
    for g, base in plan.items:
        if g.num_blocks:
            _sar_norm_kernel[g._grid](g.param, g.grad, g._blocks, g._flags, part, base,
                                      ADAPTIVE=adaptive, BLOCK_SIZE=g.block_size, num_warps=g._warps)
    _sar_scale_kernel[(1,)](part, plan.n_slots, out, scale, float(rho), RHO_POSITIVE=float(rho) > 0.0, RBLOCK=_RBLOCK)
    if float(rho) > 0.0:
        for g, _ in plan.items:
            if g.num_blocks:
                _sar_apply_kernel[g._grid](g.param, g.grad, g.snap, g._blocks, g._flags, out, scale,
                                           ADAPTIVE=adaptive, BLOCK_SIZE=g.block_size, num_warps=g._warps)
