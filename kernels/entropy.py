"""Fused softmax-entropy over the last axis (Tent / EATA / SAR / CoTTA losses).

One op family: the mean Shannon entropy of ``softmax(logits, -1)`` and, from the same
pass, EATA's per-row confidence.  Semantics follow
``yolozu.tta.integration._entropy_loss_from_logits``::

    p = softmax(z, -1);  H = -(p * log(clamp(p, 1e-12))).sum(-1);  loss = H.mean()

Layout: ``@triton.jit`` kernels first, then the launchers (``entropy_loss_forward``,
``entropy_stats_forward``, ``entropy_forward``, ``entropy_backward``): one launch per call
(two for ``entropy_stats`` of ``(B, ..., C)`` logits), no host sync. The mean over rows is folded
into the forward kernel: each program stores its partial sum and the last program to finish
(an atomic ticket on a per-device, per-stream counter it resets to 0) sums the partials in a
fixed order, so the loss is deterministic and needs no second launch.  ``yolozu_ttt.ops`` owns the semantics around them (one class, the
reference's clamp ``log_eps``, the mean) and wraps them into ``torch.library`` custom ops.

Math (one row, C classes, fp32 accumulation):

    m = max_i z_i,  s = sum_i exp(z_i - m),  t = sum_i exp(z_i - m) * (z_i - m)
    lse = m + log s,  p_i = exp(z_i - lse),  max_i p_i = 1 / s
    H = -sum_i p_i log p_i = log s - t / s
    dH/dz_j = -p_j (log p_j + H)

The forward computes ``(m, s, t)`` online over class blocks (one read of ``z``) and saves
only the per-row ``lse`` and ``H``; the backward recomputes ``p`` from ``z`` and ``lse``.
The reference's ``clamp(p, 1e-12)`` changes the value by less than ``C * 1e-12 * 28``
(terms with p < 1e-12); the backward applies the clamp to ``log p`` exactly, so rows with
``-inf`` logits (p = 0) get an exact zero gradient instead of ``0 * -inf``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..common import INTERPRET, SUPPORTED_DTYPES
from ._shared import _last_program, _sum_partials, _to_storage, ticket_counter
from .constants import RBLOCK

#: Finite stand-in for -inf as the running max, so ``m_old - m_new`` never is ``inf - inf``.
_NEG_BIG = tl.constexpr(-1.0e38)


@triton.jit(do_not_specialize=["n_rows"])  # n_rows.to(): never the constexpr 1 (a one-row input)
def _entropy_fwd_kernel(
    z_ptr,
    lse_ptr,
    h_ptr,
    conf_ptr,
    valid_ptr,
    part_ptr,
    counter_ptr,
    loss_ptr,
    n_rows,
    n_cols,
    z_stride,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    WRITE_CONF: tl.constexpr,
    WRITE_VALID: tl.constexpr,
    WRITE_MEAN: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    """Per-row log-sum-exp, entropy and (optionally) max-probability, one pass over ``z``; with
    WRITE_MEAN also the mean entropy over rows (the loss), by the last program.

    Parameters:
        z_ptr: logits, ``(n_rows, n_cols)`` with row stride ``z_stride`` and unit column stride
            (fp32 / fp16 / bf16; accumulated in fp32).
        lse_ptr: out ``(n_rows,)`` fp32, ``log sum_i exp(z_i)`` (with WRITE_LSE).
        h_ptr: out ``(n_rows,)`` fp32, entropy ``H``.
        conf_ptr: out ``(n_rows,)`` fp32, ``max_i p_i`` (with WRITE_CONF).
        valid_ptr: out ``(n_rows,)`` fp32, filled with 1.0 (with WRITE_VALID: EATA's 2-D signals).
        part_ptr: fp32 scratch, one partial sum of H per program (with WRITE_MEAN).
        counter_ptr: int32 ticket counter, 0 before and after the launch (with WRITE_MEAN).
        loss_ptr: out 0-d in the logits' dtype, ``mean_rows H`` (with WRITE_MEAN).
        n_rows, n_cols, z_stride: sizes and row stride (elements).
        ROWS: rows handled by one program (a 2-D tile ``ROWS x BLOCK_C``).
        BLOCK_C: classes per loop step; the loop covers any class count.
        RBLOCK: partials summed per step by the last program.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < n_rows
    row_ptr = z_ptr + rows[:, None] * z_stride

    # 1. Running statistics relative to the running max m:
    #    s = sum exp(z - m),  t = sum exp(z - m) * (z - m).
    m = tl.full([ROWS], _NEG_BIG, tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        z = tl.load(row_ptr + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        # 2. New max; rescale the old sums: with a = exp(m - m'),
        #    s' = a s + sum e,   t' = a (t + s (m - m')) + sum e d,   d = z - m', e = exp(d).
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        # d is floored at -1e38 so a -inf logit (e = 0) adds 0 * -1e38 = 0, never 0 * -inf.
        d = tl.maximum(z - m_new[:, None], _NEG_BIG)
        e = tl.exp(d)
        t = alpha * (t + s * (m - m_new)) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new

    # 3. lse = m + log s,  H = log s - t / s,  max p = 1 / s.
    s = tl.where(row_ok, s, 1.0)  # padding rows: keep log(0) / 0 / 0 out of the way
    log_s = tl.log(s)
    h = log_s - t / s
    if WRITE_LSE:
        tl.store(lse_ptr + rows, m + log_s, mask=row_ok)
    tl.store(h_ptr + rows, h, mask=row_ok)
    if WRITE_CONF:
        tl.store(conf_ptr + rows, 1.0 / s, mask=row_ok)
    if WRITE_VALID:
        tl.store(valid_ptr + rows, tl.full([ROWS], 1.0, tl.float32), mask=row_ok)
    # 4. the mean over rows: partial per program, the last program sums them in order
    if WRITE_MEAN:
        tl.store(part_ptr + pid, tl.sum(tl.where(row_ok, h, 0.0), axis=0))
        if _last_program(counter_ptr):
            total = _sum_partials(part_ptr, tl.num_programs(0), RBLOCK)
            tl.store(loss_ptr, _to_storage(total / n_rows.to(tl.float32), loss_ptr.dtype.element_ty))
            tl.atomic_xchg(counter_ptr, 0)


@triton.jit(do_not_specialize=["rows_per_sample"])  # .to(): never the constexpr 1
def _sample_stats_kernel(conf_ptr, h_ptr, out_conf_ptr, out_h_ptr, out_valid_ptr, rows_per_sample, conf_min,
                         RBLOCK: tl.constexpr):
    """EATA's per-sample signals of ``(B, R, C)`` logits from the per-row ``conf`` and ``H``: mean
    conf, mean H and the count of rows with ``conf >= conf_min``; one program per sample.

    Parameters:
        conf_ptr, h_ptr: per-row fp32 ``(B * R,)`` from the forward kernel.
        out_conf_ptr, out_h_ptr, out_valid_ptr: out fp32 ``(B,)``.
        rows_per_sample: R.  conf_min: the confidence threshold (fp32).  RBLOCK: rows per step.
    """
    b = tl.program_id(0).to(tl.int64)
    base = b * rows_per_sample
    sc = tl.zeros([RBLOCK], tl.float32)
    sh = tl.zeros([RBLOCK], tl.float32)
    sv = tl.zeros([RBLOCK], tl.float32)
    for i in range(0, rows_per_sample, RBLOCK):
        idx = i + tl.arange(0, RBLOCK)
        ok = idx < rows_per_sample
        c = tl.load(conf_ptr + base + idx, mask=ok, other=0.0)
        sc += c
        sh += tl.load(h_ptr + base + idx, mask=ok, other=0.0)
        sv += tl.where(ok & (c >= conf_min), 1.0, 0.0)
    n = rows_per_sample.to(tl.float32)
    tl.store(out_conf_ptr + b, tl.sum(sc, axis=0) / n)
    tl.store(out_h_ptr + b, tl.sum(sh, axis=0) / n)
    tl.store(out_valid_ptr + b, tl.sum(sv, axis=0))


@triton.jit
def _entropy_bwd_kernel(
    z_ptr,
    dz_ptr,
    lse_ptr,
    h_ptr,
    g_ptr,
    n_rows,
    n_cols,
    z_stride,
    dz_stride,
    rows_per_g,
    inv_n,
    LOG_EPS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Gradient of ``mean_rows(H)``: ``dz = -(g / N) p (max(log p, log 1e-12) + H)``; the rows
    fall into groups of N consecutive rows, each a mean with its own upstream gradient ``g``.

    Parameters:
        z_ptr: logits as in the forward.
        dz_ptr: out, same dtype as ``z``, row stride ``dz_stride``.
        lse_ptr, h_ptr: per-row ``lse`` and ``H`` saved by the forward.
        g_ptr: upstream gradients, one per group (``n_rows / N`` of them; read on device: no host sync).
        n_rows, n_cols, z_stride, dz_stride: sizes and row strides (elements).
        rows_per_g: N, the rows of one group (``n_rows`` for the mean over all rows).
        inv_n: ``1 / N``.
        LOG_EPS: the clamp of ``log p`` (``log(1e-12)``, the reference's).
        ROWS, BLOCK_C: tile as in the forward.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < n_rows
    # 1. Per-row constants: lse, H and the scale -g / N (g: the row's group's).
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    h = tl.load(h_ptr + rows, mask=row_ok, other=0.0)
    coef = -tl.load(g_ptr + rows // rows_per_g, mask=row_ok, other=0.0).to(tl.float32) * inv_n
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        z = tl.load(z_ptr + rows[:, None] * z_stride + cols[None, :], mask=ok, other=float("-inf"))
        # 2. log p = z - lse,  p = exp(log p); the clamp keeps p = 0 lanes at exactly 0.
        log_p = z.to(tl.float32) - lse[:, None]
        p = tl.exp(log_p)
        log_p = tl.maximum(log_p, LOG_EPS)
        # 3. dz = coef * p * (log p + H).
        dz = coef[:, None] * p * (log_p + h[:, None])
        tl.store(dz_ptr + rows[:, None] * dz_stride + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

_RBLOCK = RBLOCK  # partials summed per step by a last program / rows per step of _sample_stats_kernel


@functools.lru_cache(maxsize=256)
def _tile(n_rows: int, n_cols: int) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK_C, num_warps, programs): ~4K-element tiles on GPU, bigger under the interpreter."""
    budget = 16384 if INTERPRET else 4096
    block_c = min(triton.next_power_of_2(max(n_cols, 1)), budget)
    rows = max(1, min(budget // block_c, triton.next_power_of_2(max(n_rows, 1))))
    num_warps = 8 if rows * block_c >= 4096 else 4
    return rows, block_c, num_warps, triton.cdiv(n_rows, rows)


def _as_rows(z: torch.Tensor) -> torch.Tensor:
    """``z`` viewed as ``(N, C)`` with unit column stride (copies only if needed)."""
    z2 = z.reshape(-1, z.shape[-1]) if z.ndim != 2 else z
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    return z2


def _check_dtype(z: torch.Tensor) -> None:
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"entropy: logits must be one of {SUPPORTED_DTYPES}, got {z.dtype}")


def _forward(z2: torch.Tensor, lse, h, conf, valid, part, counter, loss, *, write_lse: bool, write_conf: bool,
             write_valid: bool, write_mean: bool) -> None:
    n_rows, n_cols = z2.shape
    rows, block_c, num_warps, programs = _tile(n_rows, n_cols)
    _entropy_fwd_kernel[(programs,)](
        z2, lse, h, conf, valid, part, counter, loss, n_rows, n_cols, z2.stride(0),
        ROWS=rows, BLOCK_C=block_c, WRITE_LSE=write_lse, WRITE_CONF=write_conf, WRITE_VALID=write_valid,
        WRITE_MEAN=write_mean, RBLOCK=_RBLOCK, num_warps=num_warps,
    )


def entropy_loss_forward(z: torch.Tensor):
    """``(loss, lse, H)`` of ``z (..., C)``, ``C >= 2``, in one launch: loss 0-d in ``z.dtype`` (the
    mean of H over rows), ``lse`` and ``H`` fp32 ``(N,)``."""
    _check_dtype(z)
    z2 = _as_rows(z)
    n_rows, n_cols = z2.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    h = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    loss = torch.empty((), dtype=z.dtype, device=z.device)
    if n_rows == 0:
        return loss.fill_(float("nan")), lse, h  # the mean of nothing, as torch's
    part = torch.empty(_tile(n_rows, n_cols)[3], dtype=torch.float32, device=z.device)
    _forward(z2, lse, h, h, h, part, ticket_counter(z.device), loss, write_lse=True, write_conf=False,
             write_valid=False, write_mean=True)
    return loss, lse, h


def entropy_stats_forward(z: torch.Tensor, conf_min: float):
    """EATA's per-sample ``(conf, H, valid)``, fp32 ``(B,)``, of ``z (B, C)`` (one launch; valid = 1)
    or ``z (B, ..., C)`` (two launches: rows, then per-sample means and the count of rows with
    ``conf >= conf_min``); ``C >= 2``."""
    _check_dtype(z)
    z2 = _as_rows(z)
    n_rows = z2.shape[0]
    batch = int(z.shape[0])
    dev = z.device
    if z.ndim == 2:
        conf, h, valid = (torch.empty(n_rows, dtype=torch.float32, device=dev) for _ in range(3))
        if n_rows:
            _forward(z2, h, h, conf, valid, h, h, h, write_lse=False, write_conf=True, write_valid=True,
                     write_mean=False)
        return conf, h, valid
    conf_rows = torch.empty(n_rows, dtype=torch.float32, device=dev)
    h_rows = torch.empty(n_rows, dtype=torch.float32, device=dev)
    conf, h, valid = (torch.empty(batch, dtype=torch.float32, device=dev) for _ in range(3))
    if batch == 0:
        return conf, h, valid
    if n_rows:
        _forward(z2, h_rows, h_rows, conf_rows, h_rows, h_rows, h_rows, h_rows, write_lse=False, write_conf=True,
                 write_valid=False, write_mean=False)
    _sample_stats_kernel[(batch,)](conf_rows, h_rows, conf, h, valid, n_rows // batch, float(conf_min),
                                   RBLOCK=_RBLOCK, num_warps=4)
    return conf, h, valid


def entropy_forward(z: torch.Tensor, *, want_conf: bool = False):
    """Run the forward kernel on ``z (..., C)``.

    Returns ``(lse, H, conf)``, each fp32 of shape ``(N,)`` with ``N = z.numel() // C``;
    ``conf`` is ``None`` unless ``want_conf``.  Requires ``C >= 1``.
    """
    _check_dtype(z)
    z2 = _as_rows(z)
    n_rows = z2.shape[0]
    lse = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    h = torch.empty_like(lse)
    conf = torch.empty_like(lse) if want_conf else h  # dummy pointer when not written
    if n_rows > 0:
        _forward(z2, lse, h, conf, h, h, h, h, write_lse=True, write_conf=want_conf, write_valid=False,
                 write_mean=False)
    return lse, h, (conf if want_conf else None)


def entropy_backward(grad: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, h: torch.Tensor, *,
                     log_eps: float) -> torch.Tensor:
    """``d mean(H) / dz`` scaled by ``grad`` (any float dtype, read on device), ``log p`` clamped at
    ``log_eps``; returns a tensor shaped and typed like ``z`` (one launch).

    ``grad`` 0-d: the mean over all rows of ``z (..., C)``.  ``grad (B,)`` with ``B = z.shape[0]``:
    ``B`` per-sample means (over the rows of ``z[b]``), ``grad[b]`` the upstream gradient of mean ``b``.
    ``lse`` and ``H``: the per-row values, any shape holding them in row order."""
    z2 = _as_rows(z)
    n_rows, n_cols = z2.shape
    dz = torch.empty((n_rows, n_cols), dtype=z.dtype, device=z.device)
    groups = grad.numel() if grad.ndim else 1
    if n_rows > 0 and n_cols > 0:
        rows_per_g = n_rows // groups
        rows, block_c, num_warps, programs = _tile(n_rows, n_cols)
        _entropy_bwd_kernel[(programs,)](
            z2, dz, lse.reshape(-1).contiguous(), h.reshape(-1).contiguous(), grad.reshape(-1).contiguous(),
            n_rows, n_cols, z2.stride(0), dz.stride(0), rows_per_g, 1.0 / rows_per_g,
            LOG_EPS=log_eps, ROWS=rows, BLOCK_C=block_c, num_warps=num_warps,
        )
    return dz.view(z.shape)
