"""The Triton kernels of the fused update over a flat parameter arena (launched by ``kernels.update``).

Reductions are deterministic: each program writes its partial sums (fp32 block sum, stored as
fp64) to its own slot of a workspace (rows ``PART_*``), and one single-program kernel sums the
slots in a fixed order; no float atomics anywhere, so two runs give bit-identical results. The
clip coefficient is computed on device and read from ``out`` by the Adam pass.

The step, numbered as in the C++ engine and the README: 1 EATA anchor gradient, 2 grad norm,
3 clip coefficient, 4 Adam, 5 pre-step snapshot, 6 CoTTA teacher EMA, 7 CoTTA stochastic restore
(counter-based draws keyed by ``restore_key(seed, counter, group)``, the same hash and key as
``_C``, the key finished on the device from the row's seed prefix and the step's counter words), 8 update / total-update norms (of the final parameters) and restored count.

Over K rows (replicas; every per-element buffer holds K rows of the arena's elements, row-major)
the grid is (blocks, K): program (b, r) runs block b of row r, with row r's step counts, gate,
restore key and workspace slots (row r's slots are ``[r * n_slots, (r + 1) * n_slots)``), and the
finalize kernels run one program per row, writing row r's scalars at ``out[r * len(keys):]``.
K = 1 is one run's step.

Blocks never straddle segments (the block table maps block -> segment, start, end, segment
numel; columns ``BLK_*``; a zero-size segment gets one empty block), so the per-segment inputs
are loaded once per program. The Adam step counts live on the device, one per block (each
program owns its own counter, so no program reads a count another one writes): the Adam pass adds
the segment's has-grad flag to it and looks its bias corrections up in the table (columns
``BIAS_*``).
"""
from __future__ import annotations

from typing import Sequence

import triton
import triton.language as tl

from ..common import GRAD_STAT_KEYS, SAR_STAT_KEYS, STAT_KEYS
from ._shared import _fmix32, _to_storage
from .constants import CLIP_EPS, RBLOCK, SAR_EPS, UNIFORM_BITS


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
NUM_STATS = tl.constexpr(len(STAT_KEYS))  # each row's share of ``out``
NUM_GRAD_STATS = tl.constexpr(len(GRAD_STAT_KEYS))
NUM_SAR_STATS = tl.constexpr(len(SAR_STAT_KEYS))

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
def _row():
    """This program's row (the grid's second axis) as int64."""
    return tl.program_id(1).to(tl.int64)


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
    row_numel,
    row_slots,
    HAS_ANCHOR: tl.constexpr,
    ANCHOR_VALUE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Per block of each row, over segments with a grad: ||g + 2*lambda*(p-base)/n||^2 and sum (p-base)^2 / n.

    Parameters:
        p_ptr, g_ptr, base_ptr: the flat parameter, grad and base buffers (arena dtype).
        blocks_ptr: the block table (int64, ``BLK_COLS`` per program).
        flags_ptr: the has-grad flags (uint8, one per segment).
        anchor_ptr: the anchor coefficients ``2*lambda/n`` (float32, one per segment), with HAS_ANCHOR.
        part_ptr, part_stride: the fp64 workspace (``PART_ROWS`` rows of ``part_stride`` slots);
            writes rows ``PART_GRAD`` and ``PART_ANCHOR``.
        part_base: this group's first slot (groups share the workspace).
        row_numel, row_slots: one row's elements and workspace slots (row r at r * each).
        HAS_ANCHOR: add the anchor gradient to g.
        ANCHOR_VALUE: write the anchor value's partials (else zeros).
        BLOCK_SIZE: elements per program.
    """
    pid = tl.program_id(0).to(tl.int64)
    row = _row()
    p_ptr += row * row_numel
    g_ptr += row * row_numel
    base_ptr += row * row_numel
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
    _put_grad_partials(part_ptr, part_stride, row * row_slots + part_base + pid, g, d, seg_numel, ANCHOR_VALUE)


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
    row_numel,
    row_slots,
    num_blocks,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    ema_m,
    ema_w,
    restore_q,
    prefix_ptr,
    counter_ptr,
    group_word,
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
        steps_ptr: the Adam step count of each (row, block) (int32, row-major), advanced here where
            the segment has a grad.
        out_ptr: the caller's float64 stats (``STAT_KEYS`` per row); with HAS_CLIP the row's
            coefficient is read from its ``CLIP_COEF``.
        part_ptr, part_stride, part_base: the fp64 workspace and this group's first slot; writes
            ``PART_CLIPPED``, ``PART_UPDATE``, ``PART_TOTAL``, ``PART_RESTORED`` and, without
            clipping (no grad pass ran), ``PART_GRAD`` and ``PART_ANCHOR``.
        row_numel, row_slots, num_blocks: one row's elements, workspace slots and blocks.
        one_minus_beta1, beta2, one_minus_beta2, eps: Adam's scalars.
        ema_m, ema_w: the teacher EMA's m and 1 - m.
        restore_q: the restore probability.
        prefix_ptr, counter_ptr, group_word: the restore key's parts: each row's seed prefix (int32
            on the device, ``constants.seed_prefix``), the step counter's two words (int32 on the
            device, written by the host before the launch) and this group's word (an int32
            scalar): the row's key is ``restore_key(seed, counter, group)``, finished here.
        gate_ptr: with GATED, one float64 per row on the device: 0 closes the row's step (no
            segment counts as having a grad: no parameter, moment, step count, teacher or restore changes).
        HAS_CLIP, HAS_ANCHOR, WRITE_SNAPSHOT, HAS_EMA, HAS_RESTORE, GATED: the step's parts.
        BLOCK_SIZE: elements per program.
    """
    pid = tl.program_id(0).to(tl.int64)
    row = _row()
    roff = row * row_numel
    p_ptr += roff
    g_ptr += roff
    m_ptr += roff
    v_ptr += roff
    base_ptr += roff
    snap_ptr += roff
    teacher_ptr += roff
    steps_ptr += row * num_blocks
    out_ptr += row * NUM_STATS
    slot = row * row_slots + part_base + pid
    seg, offs, mask, gmask, seg_numel, flag = _block(blocks_ptr, flags_ptr, pid, BLOCK_SIZE)
    if GATED:  # decided on the device (e.g. EATA: anything selected)
        open_ = tl.load(gate_ptr + row) != 0.0
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
        key = _fmix32(tl.load(prefix_ptr + row).to(tl.uint32, bitcast=True)
                      ^ tl.load(counter_ptr).to(tl.uint32, bitcast=True))
        key = _fmix32(key ^ tl.load(counter_ptr + 1).to(tl.uint32, bitcast=True))
        key = _fmix32(key ^ group_word.to(tl.uint32, bitcast=True))
        hit = (_uniform01(offs, key) < restore_q) & live
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
                       ANCHOR_AT: tl.constexpr, OUT_COUNT: tl.constexpr, CLIP: tl.constexpr, RBLOCK: tl.constexpr):
    """Row r's (program r's) ||g|| and anchor value from the grad pass's partials and, with CLIP,
    its clip coefficient.

    Parameters:
        part_ptr, part_stride, n_slots: the fp64 workspace and one row's slots.
        out_ptr: the caller's float64 buffer, ``OUT_COUNT`` per row; writes the row's [NORM_AT],
            [ANCHOR_AT] and, with CLIP, [CLIP_COEF] (``fused_step``'s layout).
        max_norm: the clipping threshold (with CLIP).
        RBLOCK: slots summed per iteration.
    """
    r = tl.program_id(0).to(tl.int64)
    part_ptr += r * n_slots
    out_ptr += r * OUT_COUNT
    norm = _put_grad_stats(part_ptr, part_stride, n_slots, out_ptr, NORM_AT, ANCHOR_AT, RBLOCK)
    if CLIP:
        tl.store(out_ptr + CLIP_COEF, _clip_coef(norm, max_norm))


@triton.jit
def _step_stats_kernel(part_ptr, part_stride, n_slots, out_ptr, HAS_CLIP: tl.constexpr, RBLOCK: tl.constexpr):
    """Row r's (program r's) step stats (``STAT_KEYS``) from the partials, in a fixed order.

    Parameters:
        part_ptr, part_stride, n_slots: the fp64 workspace and one row's slots.
        out_ptr: the caller's float64 stats; without HAS_CLIP this kernel also writes the grad
            norm, the anchor value and the coefficient 1 (with it, ``_grad_stats_kernel`` did).
        RBLOCK: slots summed per iteration.
    """
    r = tl.program_id(0).to(tl.int64)
    part_ptr += r * n_slots
    out_ptr += r * NUM_STATS
    if not HAS_CLIP:
        _put_grad_stats(part_ptr, part_stride, n_slots, out_ptr, GRAD_NORM, ANCHOR_LOSS, RBLOCK)
        tl.store(out_ptr + CLIP_COEF, 1.0)
    # 8. the norms of the clipped grad, of the update and of the drift; the restored count
    tl.store(out_ptr + GRAD_NORM_CLIPPED, _f32_norm(_row_sum(part_ptr, part_stride, PART_CLIPPED, n_slots, RBLOCK)))
    tl.store(out_ptr + UPDATE_NORM, _f32_norm(_row_sum(part_ptr, part_stride, PART_UPDATE, n_slots, RBLOCK)))
    tl.store(out_ptr + TOTAL_UPDATE_NORM, _f32_norm(_row_sum(part_ptr, part_stride, PART_TOTAL, n_slots, RBLOCK)))
    tl.store(out_ptr + RESTORED, _row_sum(part_ptr, part_stride, PART_RESTORED, n_slots, RBLOCK))


@triton.jit
def _sar_norm_kernel(p_ptr, g_ptr, blocks_ptr, flags_ptr, part_ptr, part_base, row_numel, row_slots,
                     ADAPTIVE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Per block of each row: ||d||^2 over segments with a grad.

    Parameters:
        p_ptr, g_ptr: the flat parameter and grad buffers.
        blocks_ptr, flags_ptr: the block table and the has-grad flags.
        part_ptr, part_base: the fp64 workspace (one workspace row) and this group's first slot.
        row_numel, row_slots: one row's elements and slots.
        ADAPTIVE: d = g*|p| instead of g.  BLOCK_SIZE: elements per program.
    """
    pid = tl.program_id(0).to(tl.int64)
    row = _row()
    p_ptr += row * row_numel
    g_ptr += row * row_numel
    _, offs, _, gmask, _, _ = _block(blocks_ptr, flags_ptr, pid, BLOCK_SIZE)
    d = tl.load(g_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
    if ADAPTIVE:
        d = d * tl.abs(tl.load(p_ptr + offs, mask=gmask, other=0.0).to(tl.float32))
    tl.store(part_ptr + row * row_slots + part_base + pid, _sumsq(d))


@triton.jit
def _sar_scale_kernel(part_ptr, n_slots, out_ptr, scale_ptr, rho, RHO_POSITIVE: tl.constexpr, RBLOCK: tl.constexpr):
    """Per row r (program r): norm = ||d|| (fp32) ; applied = rho > 0 and not norm <= 0 (a NaN norm
    applies: NaN params, like the reference) ; scale = rho / (norm + 1e-12).

    Parameters:
        part_ptr, n_slots: the direction's partial sums, one row's slots.
        out_ptr: the caller's float64 buffer (``SAR_STAT_KEYS`` per row): the norm and applied (1.0 / 0.0).
        scale_ptr: float32 scratch for the scales (one per row), read by ``_sar_apply_kernel``.
        rho: the neighbourhood size.  RHO_POSITIVE: rho > 0.  RBLOCK: slots summed per iteration.
    """
    r = tl.program_id(0).to(tl.int64)
    part_ptr += r * n_slots
    out_ptr += r * NUM_SAR_STATS
    scale_ptr += r
    norm = _f32_norm(_sum_slots(part_ptr, n_slots, RBLOCK))
    tl.store(out_ptr + SAR_DIRECTION_NORM, norm)
    if RHO_POSITIVE:
        tl.store(out_ptr + SAR_APPLIED, tl.where(norm <= 0.0, 0.0, 1.0))
    else:
        tl.store(out_ptr + SAR_APPLIED, 0.0)
    tl.store(scale_ptr, (rho / (norm.to(tl.float64) + _SAR_EPS)).to(tl.float32))


@triton.jit
def _sar_apply_kernel(p_ptr, g_ptr, snap_ptr, blocks_ptr, flags_ptr, out_ptr, scale_ptr, row_numel,
                      ADAPTIVE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """snap <- p (every segment) ; if applied (read on device): p <- p + scale*d (with a grad).

    Parameters:
        p_ptr, g_ptr, snap_ptr: the flat parameter, grad and snapshot buffers.
        blocks_ptr, flags_ptr: the block table and the has-grad flags.
        out_ptr: the float64 buffer ``_sar_scale_kernel`` wrote (its applied flag is read).
        scale_ptr: the float32 scale per row.  row_numel: one row's elements.
        ADAPTIVE: d = g*|p|.  BLOCK_SIZE: elements per program.
    """
    pid = tl.program_id(0).to(tl.int64)
    row = _row()
    p_ptr += row * row_numel
    g_ptr += row * row_numel
    snap_ptr += row * row_numel
    out_ptr += row * NUM_SAR_STATS
    scale_ptr += row
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
