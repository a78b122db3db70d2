"""Fused softmax-entropy over the last axis (Tent / EATA / SAR / CoTTA losses).

One op family: the mean Shannon entropy of ``softmax(logits, -1)`` and, from the same
pass, EATA's per-row confidence.  Semantics follow
``yolozu.tta.integration._entropy_loss_from_logits``::

    p = softmax(z, -1);  H = -(p * log(clamp(p, 1e-12))).sum(-1);  loss = H.mean()

Layout: ``@triton.jit`` kernels first, then the launchers (``entropy_forward``,
``entropy_backward``).  ``yolozu_ttt.ops`` owns the semantics around them (one class, the
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

import torch
import triton
import triton.language as tl

from ..common import INTERPRET, SUPPORTED_DTYPES

#: Finite stand-in for -inf as the running max, so ``m_old - m_new`` never is ``inf - inf``.
_NEG_BIG = tl.constexpr(-1.0e38)


@triton.jit
def _entropy_fwd_kernel(
    z_ptr,
    lse_ptr,
    h_ptr,
    conf_ptr,
    n_rows,
    n_cols,
    z_stride,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_CONF: tl.constexpr,
):
    """Per-row log-sum-exp, entropy and (optionally) max-probability, one pass over ``z``.

    Parameters:
        z_ptr: logits, ``(n_rows, n_cols)`` with row stride ``z_stride`` and unit column stride
            (fp32 / fp16 / bf16; accumulated in fp32).
        lse_ptr: out ``(n_rows,)`` fp32, ``log sum_i exp(z_i)``.
        h_ptr: out ``(n_rows,)`` fp32, entropy ``H``.
        conf_ptr: out ``(n_rows,)`` fp32, ``max_i p_i`` (written only when ``WRITE_CONF``).
        n_rows, n_cols, z_stride: sizes and row stride (elements).
        ROWS: rows handled by one program (a 2-D tile ``ROWS x BLOCK_C``).
        BLOCK_C: classes per loop step; the loop covers any class count.
        WRITE_CONF: also store the per-row confidence ``1 / s``.
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
    tl.store(lse_ptr + rows, m + log_s, mask=row_ok)
    tl.store(h_ptr + rows, log_s - t / s, mask=row_ok)
    if WRITE_CONF:
        tl.store(conf_ptr + rows, 1.0 / s, mask=row_ok)


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
    inv_n,
    LOG_EPS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Gradient of ``mean_rows(H)``: ``dz = -(g / N) p (max(log p, log 1e-12) + H)``.

    Parameters:
        z_ptr: logits as in the forward.
        dz_ptr: out, same dtype as ``z``, row stride ``dz_stride``.
        lse_ptr, h_ptr: per-row ``lse`` and ``H`` saved by the forward.
        g_ptr: 0-d upstream gradient of the scalar loss (read on device: no host sync).
        n_rows, n_cols, z_stride, dz_stride: sizes and row strides (elements).
        inv_n: ``1 / N``, N = number of rows the mean runs over.
        LOG_EPS: the clamp of ``log p`` (``log(1e-12)``, the reference's).
        ROWS, BLOCK_C: tile as in the forward.
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < n_rows
    # 1. Per-row constants: lse, H and the scale -g / N.
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    h = tl.load(h_ptr + rows, mask=row_ok, other=0.0)
    coef = -tl.load(g_ptr).to(tl.float32) * inv_n
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        z = tl.load(z_ptr + rows[:, None] * z_stride + cols[None, :], mask=ok, other=float("-inf"))
        # 2. log p = z - lse,  p = exp(log p); the clamp keeps p = 0 lanes at exactly 0.
        log_p = z.to(tl.float32) - lse[:, None]
        p = tl.exp(log_p)
        log_p = tl.maximum(log_p, LOG_EPS)
        # 3. dz = coef * p * (log p + H).
        dz = coef * p * (log_p + h[:, None])
        tl.store(dz_ptr + rows[:, None] * dz_stride + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def _tile(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_C, num_warps): ~4K-element tiles on GPU, bigger under the interpreter."""
    budget = 16384 if INTERPRET else 4096
    block_c = min(triton.next_power_of_2(max(n_cols, 1)), budget)
    rows = max(1, min(budget // block_c, triton.next_power_of_2(max(n_rows, 1))))
    num_warps = 8 if rows * block_c >= 4096 else 4
    return rows, block_c, num_warps


def _as_rows(z: torch.Tensor) -> torch.Tensor:
    """``z`` viewed as ``(N, C)`` with unit column stride (copies only if needed)."""
    z2 = z.reshape(-1, z.shape[-1]) if z.ndim != 2 else z
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    return z2


def entropy_forward(z: torch.Tensor, *, want_conf: bool = False):
    """Run the forward kernel on ``z (..., C)``.

    Returns ``(lse, H, conf)``, each fp32 of shape ``(N,)`` with ``N = z.numel() // C``;
    ``conf`` is ``None`` unless ``want_conf``.  Requires ``C >= 1``.
    """
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"entropy: logits must be one of {SUPPORTED_DTYPES}, got {z.dtype}")
    z2 = _as_rows(z)
    n_rows, n_cols = z2.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    h = torch.empty_like(lse)
    conf = torch.empty_like(lse) if want_conf else h  # dummy pointer when not written
    if n_rows > 0:
        rows, block_c, num_warps = _tile(n_rows, n_cols)
        grid = (triton.cdiv(n_rows, rows),)
        _entropy_fwd_kernel[grid](
            z2, lse, h, conf, n_rows, n_cols, z2.stride(0),
            ROWS=rows, BLOCK_C=block_c, WRITE_CONF=want_conf, num_warps=num_warps,
        )
    return lse, h, (conf if want_conf else None)


def entropy_backward(grad: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, h: torch.Tensor, *,
                     log_eps: float) -> torch.Tensor:
    """``d mean(H) / dz`` scaled by the 0-d ``grad``, ``log p`` clamped at ``log_eps``; returns a
    tensor shaped and typed like ``z``."""
    z2 = _as_rows(z)
    n_rows, n_cols = z2.shape
    dz = torch.empty((n_rows, n_cols), dtype=z.dtype, device=z.device)
    if n_rows > 0 and n_cols > 0:
        g = grad.reshape(()).to(device=z.device, dtype=torch.float32)
        rows, block_c, num_warps = _tile(n_rows, n_cols)
        grid = (triton.cdiv(n_rows, rows),)
        _entropy_bwd_kernel[grid](
            z2, dz, lse, h, g, n_rows, n_cols, z2.stride(0), dz.stride(0), 1.0 / n_rows,
            LOG_EPS=log_eps, ROWS=rows, BLOCK_C=block_c, num_warps=num_warps,
        )
    return dz.view(z.shape)
