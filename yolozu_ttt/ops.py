"""Fused, autograd-aware loss ops of yolozu_ttt (entropy, EATA signals, TTT-MIM masking).

Public functions (same semantics as YOLOZU 4.12's reference helpers, see the README):

* :func:`entropy_loss` - ``yolozu.tta.integration._entropy_loss_from_logits``
* :func:`entropy_stats` - ``yolozu.tta.integration._eata_sample_signals``
* :func:`apply_patch_mask` - ``yolozu.tta.ttt_mim.apply_mask`` given the patch grid
* :func:`masked_reconstruction_loss` - ``yolozu.tta.ttt_mim.reconstruction_loss(mask=...)``
* :func:`expand_patch_mask` - the full-resolution mask ``generate_block_mask`` would return

Layers: Triton kernels (``yolozu_ttt.kernels.entropy`` / ``.mim``) or a torch implementation
-> custom ops (``yolozu_ttt::*``, defined as ``torch.library.custom_op`` would, see
:class:`_CustomOp`) with ``register_fake``,
``register_autograd`` (so ``torch.compile(fullgraph=True)`` traces through and
``torch.library.opcheck`` passes) and ``register_vmap`` -> the small public functions below.

Batching (``torch.func.vmap``, torch >= 2.5; forward, and autograd through vmap's result): every
public function equals a loop of it over the batch. ``entropy_loss``, ``entropy_stats`` and
``apply_patch_mask`` work per row or per element: their rules call the op once on the flattened
batch (``entropy_loss`` through ``yolozu_ttt::entropy_loss_samples``, the per-sample means, whose
backward takes one upstream gradient per sample); ``masked_reconstruction_loss`` divides by each
sample's own masked count: its rule loops the op over the batch. The backward ops batch too.
``torch.func.grad`` is not supported (torch's custom-op autograd is not a functorch-ready Function).

Dispatch (``common.use_triton``): CUDA tensors run the Triton kernels; CPU tensors run the torch
implementation, unless ``TRITON_INTERPRET=1`` was set before import, in which case they run
the Triton kernels in Triton's interpreter (so the GPU code path can be tested anywhere).

Eager calls (plain tensors, not under ``torch.compile`` or ``vmap``) skip the ``torch.library``
layers on every device: they run the custom op's implementation under a plain ``autograd.Function`` (or
none where nothing needs a gradient), which costs ~70 µs less per call; traced calls go through
the custom ops. On the Triton path each op is one launch per call (``entropy_stats`` of
``(B, ..., C)`` logits two), the reductions' final sums and means folded into the kernels, and
no op reads device memory back to the host.
"""

import math

import torch
from torch import Tensor

from .common import use_triton


#: The ``yolozu_ttt`` operator namespace (every op of this module is defined in it).
_LIB = torch.library.Library("yolozu_ttt", "DEF")


class _CustomOp:
    """One ``yolozu_ttt::`` operator, as ``torch.library.custom_op`` would make it (the schema inferred
    from the function's annotations, the function its implementation on every device, and the
    same ``register_fake`` / ``register_autograd`` / ``register_vmap``), but defined through
    ``torch.library.Library``: ``custom_op`` wraps every implementation in torch's
    ``_disable_dynamo``, whose first call imports ``torch._dynamo`` (~1 s and ~100 MiB of a process
    that never compiles; the batching rules call the ops on every K-at-once group)."""

    def __init__(self, name: str, fn):
        self.qualname, self.fn = f"yolozu_ttt::{name}", fn
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")

    def register_fake(self, fn):
        torch.library.register_fake(self.qualname, fn, lib=_LIB)
        return fn

    def register_autograd(self, backward, *, setup_context=None) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_LIB)

    def register_vmap(self, rule) -> None:
        torch.library.register_vmap(self.qualname, rule, lib=_LIB)


def _custom_op(name: str):
    """``@_custom_op("name")``: the function as the implementation of ``yolozu_ttt::name`` (:class:`_CustomOp`)."""
    return lambda fn: _CustomOp(name, fn)

__all__ = [
    "apply_patch_mask",
    "entropy_loss",
    "entropy_stats",
    "expand_patch_mask",
    "masked_reconstruction_loss",
]

#: log(1e-12): the reference clamps p at 1e-12 inside the log (both paths' backward).
_LOG_EPS = math.log(1e-12)
_FLT_MAX = float(torch.finfo(torch.float32).max)

def _kernels_entropy():
    from .kernels import entropy

    return entropy


def _kernels_mim():
    from .kernels import mim

    return mim


# =======================================================================================
# Entropy: torch implementation (CPU and other non-Triton devices)
# =======================================================================================

def _rows_fp32(z: Tensor) -> Tensor:
    return z.reshape(-1, z.shape[-1]).to(torch.float32)


def _torch_entropy_rows(z: Tensor):
    """Per-row ``(lse, H, conf)`` in fp32 for ``z (..., C)``, ``C >= 2``.

    1. m = max z,  d = max(z - m, -FLT_MAX)  (a -inf logit gives a finite d and e = 0)
    2. e = exp(d),  s = sum e,  t = sum e d
    3. lse = m + log s,  H = log s - t / s,  conf = 1 / s
    """
    z2 = _rows_fp32(z)
    m = z2.amax(dim=-1, keepdim=True)
    d = torch.sub(z2, m).clamp_min_(-_FLT_MAX)
    e = d.exp()
    s = e.sum(dim=-1)
    t = e.mul_(d).sum(dim=-1)
    log_s = s.log()
    lse = m.squeeze(-1) + log_s
    h = log_s - t / s
    return lse, h, s.reciprocal()


def _torch_entropy_backward(grad: Tensor, z: Tensor, lse: Tensor, h: Tensor) -> Tensor:
    """``dz = -(g / N) p (max(log p, log 1e-12) + H)`` with ``log p = z - lse``: one mean over all
    rows (``grad`` 0-d) or one per sample ``z[b]`` (``grad (B,)``, N the rows of a sample)."""
    z2 = _rows_fp32(z)
    n_rows = z2.shape[0]
    if grad.ndim == 0:
        coef = grad.to(torch.float32) * (-1.0 / max(n_rows, 1))
    else:  # per sample: each row's group's coefficient, the same fp32 product as one sample's
        per = n_rows // max(grad.numel(), 1)
        coef = (grad.to(torch.float32) * (-1.0 / max(per, 1))).repeat_interleave(per).unsqueeze(-1)
    log_p = torch.sub(z2, lse.reshape(-1, 1))
    p = log_p.exp()
    dz = log_p.clamp_min_(_LOG_EPS).add_(h.reshape(-1, 1)).mul_(p).mul_(coef)
    return dz.to(z.dtype).reshape(z.shape)


# =======================================================================================
# Entropy: custom ops
# =======================================================================================

def _n_rows(logits: Tensor):
    c = logits.shape[-1]
    return 0 if c <= 1 else logits.numel() // c


def _entropy_rows(logits: Tensor, want_conf: bool = False):
    """Per-row ``(lse, H, conf)`` in fp32 for ``C >= 2``: the Triton kernels or the torch path
    (``conf`` may be None unless ``want_conf``)."""
    if use_triton(logits):
        return _kernels_entropy().entropy_forward(logits, want_conf=want_conf)
    return _torch_entropy_rows(logits)


def _entropy_loss_fwd_impl(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, lse, H)``: loss 0-d in ``logits.dtype``; ``lse``, ``H`` fp32 ``(N,)`` (N = 0 if C <= 1)."""
    if logits.ndim == 0:
        raise ValueError("entropy_loss: logits must have at least one dimension (classes last)")
    if logits.shape[-1] <= 1:  # one class: H = 0 (the reference's value), zero gradient
        empty = logits.new_empty((0,), dtype=torch.float32)
        return logits.new_zeros(()), empty, empty.clone()
    if use_triton(logits):  # one launch: the rows and their mean
        return _kernels_entropy().entropy_loss_forward(logits)
    lse, h, _ = _torch_entropy_rows(logits)
    return h.mean().to(logits.dtype), lse, h


@_custom_op("entropy_loss_fwd")
def _entropy_loss_fwd(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, lse, H)``: loss 0-d in ``logits.dtype``; ``lse``, ``H`` fp32 ``(N,)`` (N = 0 if C <= 1)."""
    return _entropy_loss_fwd_impl(logits)


@_entropy_loss_fwd.register_fake
def _(logits: Tensor):
    n = _n_rows(logits)
    return (
        logits.new_empty(()),
        logits.new_empty((n,), dtype=torch.float32),
        logits.new_empty((n,), dtype=torch.float32),
    )


def _entropy_loss_bwd_impl(grad: Tensor, logits: Tensor, lse: Tensor, h: Tensor) -> Tensor:
    """Gradient of the mean entropy w.r.t. ``logits`` (zeros when C <= 1): of the mean over all rows
    (``grad`` 0-d) or of the per-sample means (``grad (B,)``, ``B = logits.shape[0]``)."""
    if grad.ndim not in (0, 1) or (grad.ndim == 1 and (logits.ndim < 2 or grad.shape[0] != logits.shape[0])):
        raise ValueError(f"entropy_loss_bwd: grad must be 0-d or (B,) for logits (B, ..., C), got "
                         f"{tuple(grad.shape)} for {tuple(logits.shape)}")
    if logits.shape[-1] <= 1:
        return torch.zeros_like(logits)
    if use_triton(logits):
        return _kernels_entropy().entropy_backward(grad, logits, lse, h, log_eps=_LOG_EPS)
    return _torch_entropy_backward(grad, logits, lse, h)


@_custom_op("entropy_loss_bwd")
def _entropy_loss_bwd(grad: Tensor, logits: Tensor, lse: Tensor, h: Tensor) -> Tensor:
    """Gradient of the mean entropy w.r.t. ``logits`` (zeros when C <= 1); ``grad (B,)``: of the
    per-sample means of ``entropy_loss_samples``."""
    return _entropy_loss_bwd_impl(grad, logits, lse, h)


@_entropy_loss_bwd.register_fake
def _(grad: Tensor, logits: Tensor, lse: Tensor, h: Tensor):
    return torch.empty_like(logits)


def _entropy_setup_context(ctx, inputs, output):
    (logits,) = inputs
    _, lse, h = output
    ctx.save_for_backward(logits, lse, h)
    ctx.mark_non_differentiable(lse, h)


def _entropy_backward(ctx, grad_loss, *_):
    """The loss's backward (the grads of ``lse`` and ``H``, when passed, are not used)."""
    logits, lse, h = ctx.saved_tensors
    # traced (torch.compile, or AOT tracing on functional / fake tensors): record the backward op
    if torch.compiler.is_compiling() or type(logits) is not Tensor:
        return torch.ops.yolozu_ttt.entropy_loss_bwd(grad_loss, logits, lse, h)
    return _entropy_loss_bwd_impl(grad_loss, logits, lse, h)


_entropy_loss_fwd.register_autograd(_entropy_backward, setup_context=_entropy_setup_context)


class _EagerEntropyLoss(torch.autograd.Function):
    """The custom op for eager calls, without the ``torch.library`` layers (~70 us per call): its
    implementation, setup_context and backward, returning the loss only (an old-style Function
    with one output: the cheapest autograd node torch has)."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:
        output = _entropy_loss_fwd_impl(logits)
        _entropy_setup_context(ctx, (logits,), output)  # lse and H are no outputs here: marking them is a no-op
        return output[0]

    backward = staticmethod(_entropy_backward)


def _entropy_samples_impl(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``(loss, lse, H)`` of ``logits (B, ..., C)``: ``loss[b]`` the mean entropy of the rows
    of ``logits[b]`` (``(B,)`` in ``logits.dtype``), ``lse`` and ``H`` fp32 ``(B, N)`` (N = 0 if C <= 1)."""
    if logits.ndim < 2:
        raise ValueError("entropy_loss: logits must have at least one dimension (classes last)")
    batch, n = int(logits.shape[0]), (math.prod(logits.shape[1:-1]) if logits.shape[-1] > 1 else 0)
    if logits.shape[-1] <= 1:
        empty = logits.new_empty((batch, 0), dtype=torch.float32)
        return logits.new_zeros((batch,)), empty, empty.clone()
    lse, h, _ = _entropy_rows(logits)  # the rows as one sample's: per-row values independent of the batch
    h = h.view(batch, n)
    return h.mean(dim=1).to(logits.dtype), lse.view(batch, n), h


@_custom_op("entropy_loss_samples")
def _entropy_loss_samples(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample ``entropy_loss_fwd`` (its batching rule): ``logits (B, ..., C)`` -> ``(loss (B,),
    lse (B, N), H (B, N))``."""
    return _entropy_samples_impl(logits)


@_entropy_loss_samples.register_fake
def _(logits: Tensor):
    if logits.ndim < 2:
        raise ValueError("entropy_loss: logits must have at least one dimension (classes last)")
    batch = int(logits.shape[0])
    n = math.prod(logits.shape[1:-1]) if logits.shape[-1] > 1 else 0
    return (
        logits.new_empty((batch,)),
        logits.new_empty((batch, n), dtype=torch.float32),
        logits.new_empty((batch, n), dtype=torch.float32),
    )


_entropy_loss_samples.register_autograd(_entropy_backward, setup_context=_entropy_setup_context)


def _stats_batch(logits: Tensor):
    return int(logits.shape[0]) if logits.ndim >= 1 else 1


def _entropy_stats_impl(logits: Tensor, conf_min: float) -> tuple[Tensor, Tensor, Tensor]:
    """EATA per-sample ``(conf, entropy, valid)``, fp32 ``(B,)`` (not differentiable)."""
    batch = _stats_batch(logits)
    if logits.shape[-1] <= 1:
        zeros = logits.new_zeros((batch,), dtype=torch.float32)
        return zeros, zeros.clone(), zeros.clone()
    if logits.ndim < 2:
        raise ValueError("entropy_stats: logits must be (B, C) or (B, ..., C)")
    if use_triton(logits):  # one launch for (B, C), two for (B, ..., C)
        return _kernels_entropy().entropy_stats_forward(logits, float(conf_min))
    _, h, conf = _entropy_rows(logits, want_conf=True)
    if logits.ndim == 2:
        return conf, h, torch.ones_like(conf)
    conf2 = conf.view(batch, -1)
    valid = (conf2 >= float(conf_min)).to(torch.float32).sum(dim=1)
    return conf2.mean(dim=1), h.view(batch, -1).mean(dim=1), valid


@_custom_op("entropy_stats")
def _entropy_stats(logits: Tensor, conf_min: float) -> tuple[Tensor, Tensor, Tensor]:
    """EATA per-sample ``(conf, entropy, valid)``, fp32 ``(B,)`` (not differentiable)."""
    return _entropy_stats_impl(logits, conf_min)


@_entropy_stats.register_fake
def _(logits: Tensor, conf_min: float):
    batch = _stats_batch(logits)
    return tuple(logits.new_empty((batch,), dtype=torch.float32) for _ in range(3))


# =======================================================================================
# Patch masking / masked reconstruction: the checked grid (a *layout*, which the Triton
# launchers take too), the exact mask count, the loss epilogue, the torch implementation
# =======================================================================================

def normalize_patch_mask(patch_mask: torch.Tensor, x_shape, patch_size: int):
    """Check ``patch_mask`` against ``x_shape`` like YOLOZU's ``_expand_mask`` (at grid level).

    ``x_shape`` is ``(B, C, H, W)`` or ``(C, H, W)``.  Accepted grids: ``(gh, gw)``;
    ``(B or 1, gh, gw)`` for 4-D and ``(C or 1, gh, gw)`` for 3-D input; ``(B or 1, C or 1,
    gh, gw)`` for 4-D input; ``gh = ceil(H / patch_size)``, ``gw = ceil(W / patch_size)``.

    Returns ``(grid4, stride_b, stride_c, (B, C, H, W))``: ``grid4`` is a contiguous
    ``(Bm, Cm, gh, gw)`` bool tensor; the strides are 0 along broadcast dimensions.
    """
    if int(patch_size) <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    ps = int(patch_size)
    if len(x_shape) == 4:
        B, C, H, W = (int(v) for v in x_shape)
        if patch_mask.ndim == 2:
            grid4 = patch_mask[None, None]
        elif patch_mask.ndim == 3:
            grid4 = patch_mask[:, None]
        elif patch_mask.ndim == 4:
            grid4 = patch_mask
        else:
            raise ValueError("patch_mask must be 2D, 3D, or 4D for 4D input")
    elif len(x_shape) == 3:
        C, H, W = (int(v) for v in x_shape)
        B = 1
        if patch_mask.ndim == 2:
            grid4 = patch_mask[None, None]
        elif patch_mask.ndim == 3:
            grid4 = patch_mask[None]
        else:
            raise ValueError("patch_mask must be 2D or 3D for 3D input")
    else:
        raise ValueError(f"input must be 3D or 4D, got shape {tuple(x_shape)}")
    gh, gw = -(-H // ps), -(-W // ps)
    if tuple(grid4.shape[-2:]) != (gh, gw):
        raise ValueError(
            f"patch_mask grid {tuple(grid4.shape[-2:])} does not match ceil(H/patch_size), "
            f"ceil(W/patch_size) = {(gh, gw)} for H, W = {(H, W)}, patch_size = {ps}"
        )
    bm, cm = int(grid4.shape[0]), int(grid4.shape[1])
    if bm not in (1, B) or cm not in (1, C):
        raise ValueError(f"patch_mask of shape {tuple(patch_mask.shape)} does not broadcast to input {tuple(x_shape)}")
    grid4 = grid4.to(dtype=torch.bool).contiguous()
    stride_b = 0 if (bm == 1 and B > 1) else cm * gh * gw
    stride_c = 0 if (cm == 1 and C > 1) else gh * gw
    return grid4, stride_b, stride_c, (B, C, H, W)


def expand_patch_mask(patch_mask: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """Full-resolution bool mask of a patch grid: ``(..., gh, gw) -> (..., height, width)``.

    Equals ``generate_block_mask``'s result for the grid it drew:
    ``grid.repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)[..., :height, :width]``.
    """
    ps = int(patch_size)
    if ps <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    g = patch_mask.to(torch.bool)
    gh, gw = int(g.shape[-2]), int(g.shape[-1])
    if gh * ps < height or gw * ps < width:
        raise ValueError(f"patch grid {(gh, gw)} x patch_size {ps} does not cover {(height, width)}")
    lead = g.shape[:-2]
    full = g[..., :, None, :, None].expand(*lead, gh, ps, gw, ps).reshape(*lead, gh * ps, gw * ps)
    return full[..., :height, :width]


def _full_mask(layout, x: Tensor, patch_size: int) -> Tensor:
    """Full-res mask of a checked grid, broadcastable to ``x`` (``(Bm, Cm, H, W)``, or ``(Cm, H, W)``
    for 3-D ``x``)."""
    grid4, _, _, (_, _, h, w) = layout
    full = expand_patch_mask(grid4.to(x.device), h, w, patch_size)
    return full[0] if x.ndim == 3 else full


def _count(layout, patch_size: int) -> Tensor:
    """Exact number of masked elements of a checked grid over its input (0-d int64, on the grid's device)."""
    grid4, _, _, (B, C, H, W) = layout
    ps = int(patch_size)
    gh, gw = int(grid4.shape[-2]), int(grid4.shape[-1])
    dev = grid4.device
    # Rows/cols each cell covers after the crop: min(ps, H - i * ps).
    rh = (H - torch.arange(gh, device=dev, dtype=torch.int64) * ps).clamp(max=ps)
    cw = (W - torch.arange(gw, device=dev, dtype=torch.int64) * ps).clamp(max=ps)
    per = (grid4.to(torch.int64) * (rh[:, None] * cw[None, :])).sum()
    return per * ((B // int(grid4.shape[0])) * (C // int(grid4.shape[1])))


def mask_count(patch_mask: torch.Tensor, x_shape, patch_size: int) -> torch.Tensor:
    """Exact number of masked elements of the expanded mask over ``x_shape`` (0-d int64, on device)."""
    return _count(normalize_patch_mask(patch_mask, x_shape, patch_size), patch_size)


def _per_masked(value: Tensor, count: Tensor) -> Tensor:
    """``value / count``, or 0 for an empty mask (zero loss, zero gradient, like the reference)."""
    return torch.where(count > 0, value / count.clamp(min=1).to(value.dtype), torch.zeros_like(value))


def _masked_diff(pred: Tensor, target: Tensor, layout, patch_size: int) -> Tensor:
    """``pred - target`` on masked elements (fp32 for fp16/bf16 inputs), 0 elsewhere."""
    if pred.dtype in (torch.float16, torch.bfloat16):
        d = pred.to(torch.float32) - target.to(torch.float32)
    else:
        d = pred - target.to(pred.dtype)
    return torch.where(_full_mask(layout, pred, patch_size), d, 0.0)


# =======================================================================================
# Patch masking / masked reconstruction: custom ops
# =======================================================================================

def _apply_patch_mask_impl(x: Tensor, patch_mask: Tensor, patch_size: int, mask_value: float) -> Tensor:
    """``x`` with every pixel of a masked patch set to ``mask_value``."""
    layout = normalize_patch_mask(patch_mask, x.shape, patch_size)
    if use_triton(x):
        return _kernels_mim().apply_patch_mask_forward(x, layout, patch_size, mask_value)
    return torch.where(_full_mask(layout, x, patch_size), torch.tensor(mask_value, dtype=x.dtype, device=x.device), x)


@_custom_op("apply_patch_mask")
def _apply_patch_mask(x: Tensor, patch_mask: Tensor, patch_size: int, mask_value: float) -> Tensor:
    """``x`` with every pixel of a masked patch set to ``mask_value``."""
    return _apply_patch_mask_impl(x, patch_mask, patch_size, mask_value)


@_apply_patch_mask.register_fake
def _(x: Tensor, patch_mask: Tensor, patch_size: int, mask_value: float):
    normalize_patch_mask(patch_mask, x.shape, patch_size)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _apply_setup_context(ctx, inputs, output):
    _, patch_mask, patch_size, _ = inputs
    ctx.save_for_backward(patch_mask)
    ctx.patch_size = patch_size


def _apply_backward(ctx, grad):
    (patch_mask,) = ctx.saved_tensors
    # Gradient flows through unmasked pixels only: the same op with value 0.
    return torch.ops.yolozu_ttt.apply_patch_mask(grad, patch_mask, ctx.patch_size, 0.0), None, None, None


_apply_patch_mask.register_autograd(_apply_backward, setup_context=_apply_setup_context)


def _masked_recon_impl(pred: Tensor, target: Tensor, patch_mask: Tensor, patch_size: int) -> tuple[Tensor, Tensor]:
    """``(loss, count)``: the mean of ``(pred - target)^2`` over masked elements (0-d, ``pred.dtype``;
    0 if none) and the masked elements (0-d int64, on ``pred``'s device)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    layout = normalize_patch_mask(patch_mask, pred.shape, patch_size)
    if use_triton(pred):  # one launch: the sum, the count and their quotient
        return _kernels_mim().masked_sse_loss(pred, target, layout, patch_size)
    d = _masked_diff(pred, target, layout, patch_size).reshape(-1)
    count = _count(layout, patch_size).to(pred.device)
    return _per_masked(torch.dot(d, d), count).to(pred.dtype), count


@_custom_op("masked_reconstruction_loss")
def _masked_recon(pred: Tensor, target: Tensor, patch_mask: Tensor, patch_size: int) -> Tensor:
    """Mean of ``(pred - target)^2`` over masked elements (0-d, ``pred.dtype``; 0 if none)."""
    return _masked_recon_impl(pred, target, patch_mask, patch_size)[0]


@_masked_recon.register_fake
def _(pred: Tensor, target: Tensor, patch_mask: Tensor, patch_size: int):
    normalize_patch_mask(patch_mask, pred.shape, patch_size)
    return pred.new_empty(())


def _masked_recon_bwd_impl(grad: Tensor, pred: Tensor, target: Tensor, patch_mask: Tensor, patch_size: int,
                           count: Tensor | None = None) -> Tensor:
    """``d loss / d pred = where(mask, 2 g (pred - target) / n_mask, 0)`` (``d/d target`` is minus it);
    ``count``: the forward's masked count (else counted from the grid)."""
    layout = normalize_patch_mask(patch_mask, pred.shape, patch_size)
    if count is None:
        count = _count(layout, patch_size).to(pred.device)
    if use_triton(pred):  # one launch: the scale 2 g / n_mask is computed on device
        return _kernels_mim().masked_sse_backward(pred, target, layout, patch_size, grad, count)
    g = grad.reshape(()).to(device=pred.device, dtype=torch.float32)
    scale = _per_masked(2.0 * g, count)  # 0-d fp32
    d = _masked_diff(pred, target, layout, patch_size)
    return d.mul_(scale.to(d.dtype)).to(pred.dtype).contiguous()


@_custom_op("masked_reconstruction_loss_bwd")
def _masked_recon_bwd(grad: Tensor, pred: Tensor, target: Tensor, patch_mask: Tensor, patch_size: int) -> Tensor:
    """``d loss / d pred = where(mask, 2 g (pred - target) / n_mask, 0)`` (``d/d target`` is minus it)."""
    return _masked_recon_bwd_impl(grad, pred, target, patch_mask, patch_size)


@_masked_recon_bwd.register_fake
def _(grad: Tensor, pred: Tensor, target: Tensor, patch_mask: Tensor, patch_size: int):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _recon_setup_context(ctx, inputs, output):
    pred, target, patch_mask, patch_size = inputs
    ctx.save_for_backward(pred, target, patch_mask)
    ctx.patch_size = patch_size


def _recon_backward(ctx, grad):
    pred, target, patch_mask = ctx.saved_tensors
    dpred = torch.ops.yolozu_ttt.masked_reconstruction_loss_bwd(grad, pred, target, patch_mask, ctx.patch_size)
    dtarget = dpred.neg().to(target.dtype) if ctx.needs_input_grad[1] else None
    return (dpred if ctx.needs_input_grad[0] else None), dtarget, None, None


_masked_recon.register_autograd(_recon_backward, setup_context=_recon_setup_context)


# =======================================================================================
# Batching rules (torch.func.vmap): one call on the flattened batch where the op works per row or
# per element, a loop of the op over the batch where it reduces over a sample
# =======================================================================================

def _batched(arg, in_dim, size: int) -> Tensor:
    """``arg`` with its batch dimension first (an unbatched tensor expanded to ``size``)."""
    return arg.movedim(in_dim, 0) if in_dim is not None else arg.expand(size, *arg.shape)


def _loop(op, info, in_dims, *args) -> Tensor | tuple[Tensor, ...]:
    """``op`` on each sample of the batch, its outputs stacked (batch size 0: the op's fake on
    sample-shaped meta tensors, so its shape checks still run)."""
    moved = [a.movedim(d, 0) if d is not None else a for a, d in zip(args, in_dims)]
    if info.batch_size == 0:
        device = next(m.device for m, d in zip(moved, in_dims) if d is not None)
        sample = [torch.empty(m.shape[1:] if d is not None else m.shape, dtype=m.dtype, device="meta")
                  if isinstance(m, Tensor) else m for m, d in zip(moved, in_dims)]
        shaped = op(*sample)
        outs = shaped if isinstance(shaped, tuple) else (shaped,)
        empty = tuple(torch.empty((0, *o.shape), dtype=o.dtype, device=device) for o in outs)
        return empty if isinstance(shaped, tuple) else empty[0]
    results = [op(*(m[i] if d is not None else m for m, d in zip(moved, in_dims))) for i in range(info.batch_size)]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*results))
    return torch.stack(results)


def _entropy_loss_fwd_vmap(info, in_dims, logits):
    """Flattened: the rows of every sample in one call, the per-sample means (``entropy_loss_samples``)."""
    return torch.ops.yolozu_ttt.entropy_loss_samples(_batched(logits, in_dims[0], info.batch_size)), (0, 0, 0)


def _entropy_loss_samples_vmap(info, in_dims, logits):
    """Flattened: the two batch dimensions as one."""
    z = _batched(logits, in_dims[0], info.batch_size)
    if z.ndim < 3:
        raise ValueError("entropy_loss: logits must have at least one dimension (classes last)")
    loss, lse, h = torch.ops.yolozu_ttt.entropy_loss_samples(z.flatten(0, 1))
    lead = z.shape[:2]
    return (loss.view(lead), lse.view(*lead, -1), h.view(*lead, -1)), (0, 0, 0)


def _entropy_loss_bwd_vmap(info, in_dims, grad, logits, lse, h):
    """Flattened: one call with per-sample upstream gradients (the samples' means each have their own)."""
    size = info.batch_size
    g, z = _batched(grad, in_dims[0], size), _batched(logits, in_dims[1], size)
    lse, h = _batched(lse, in_dims[2], size), _batched(h, in_dims[3], size)
    shape = z.shape
    if g.ndim == 2:  # per-sample means already (the samples rule's backward): both batches as one
        z, g = z.flatten(0, 1), g.flatten()
    return torch.ops.yolozu_ttt.entropy_loss_bwd(g, z, lse.reshape(-1), h.reshape(-1)).view(shape), 0


def _entropy_stats_vmap(info, in_dims, logits, conf_min):
    """Flattened where each sample has rows of its own (``(B, ..., C)`` logits): the samples of every
    batch element in one call; 1-D logits (an error, or the one-class zeros) loop."""
    z = _batched(logits, in_dims[0], info.batch_size)
    if z.ndim < 3:
        return _loop(torch.ops.yolozu_ttt.entropy_stats, info, in_dims, logits, conf_min), (0, 0, 0)
    lead = z.shape[:2]
    out = torch.ops.yolozu_ttt.entropy_stats(z.flatten(0, 1), conf_min)
    return tuple(o.view(lead) for o in out), (0, 0, 0)


def _grid5(grid: Tensor, x_ndim: int) -> Tensor:
    """A batch of patch grids ``(V, *grid)`` as ``(V, Bm, Cm, gh, gw)`` (``normalize_patch_mask``'s
    reading of each grid for ``x_ndim``-D input)."""
    if grid.ndim == 3:
        return grid[:, None, None]
    if grid.ndim == 4:
        return grid[:, :, None] if x_ndim == 4 else grid[:, None]
    return grid


def _apply_patch_mask_vmap(info, in_dims, x, patch_mask, patch_size, mask_value):
    """Flattened (elementwise): the batch of inputs as one ``(V * B, C, H, W)`` input, the grids
    expanded along with it."""
    size = info.batch_size
    xb = _batched(x, in_dims[0], size)
    xs = xb.shape[1:]
    if in_dims[1] is None:  # one grid for every sample: (1, Bm, Cm, gh, gw)
        grid = normalize_patch_mask(patch_mask, xs, patch_size)[0].unsqueeze(0)
    else:  # the op's own checks on one sample's shapes (same errors)
        grid = patch_mask.movedim(in_dims[1], 0)
        normalize_patch_mask(torch.empty(grid.shape[1:], dtype=torch.bool, device="meta"), xs, patch_size)
        grid = _grid5(grid, len(xs))
    if len(xs) == 3:  # (C, H, W) samples (Bm = 1): the batch is the input's batch dimension
        flat_x, flat_grid = xb, grid.flatten(0, 1)
    elif grid.shape[0] == 1 and grid.shape[1] == 1:  # broadcast over every sample: as it is
        flat_x, flat_grid = xb.flatten(0, 1), grid[0]
    else:  # one grid per (batch element, sample)
        flat_x, flat_grid = xb.flatten(0, 1), grid.expand(size, xs[0], *grid.shape[2:]).flatten(0, 1)
    out = torch.ops.yolozu_ttt.apply_patch_mask(flat_x, flat_grid, patch_size, mask_value)
    return out.view(size, *xs), 0


def _masked_recon_vmap(info, in_dims, pred, target, patch_mask, patch_size):
    """Loop: each sample's sum over its own masked count."""
    return _loop(torch.ops.yolozu_ttt.masked_reconstruction_loss, info, in_dims, pred, target, patch_mask,
                 patch_size), 0


def _masked_recon_bwd_vmap(info, in_dims, grad, pred, target, patch_mask, patch_size):
    """Loop, as the forward's."""
    return _loop(torch.ops.yolozu_ttt.masked_reconstruction_loss_bwd, info, in_dims, grad, pred, target,
                 patch_mask, patch_size), 0


#: Whether this torch has batching rules for custom ops (``torch.library.register_vmap``, torch 2.5).
HAVE_VMAP_RULES = hasattr(torch.library, "register_vmap")

if HAVE_VMAP_RULES:
    for _op, _rule in (
        (_entropy_loss_fwd, _entropy_loss_fwd_vmap),
        (_entropy_loss_samples, _entropy_loss_samples_vmap),
        (_entropy_loss_bwd, _entropy_loss_bwd_vmap),
        (_entropy_stats, _entropy_stats_vmap),
        (_apply_patch_mask, _apply_patch_mask_vmap),
        (_masked_recon, _masked_recon_vmap),
        (_masked_recon_bwd, _masked_recon_bwd_vmap),
    ):
        _op.register_vmap(_rule)


# =======================================================================================
# Eager paths: the custom ops' implementations without the torch.library layers
# =======================================================================================

def _transformed() -> bool:
    """Whether a call runs under ``torch.compile`` or a ``torch.func`` transform (``vmap``): the custom
    ops, whose batching rules the transforms use."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _eager(*tensors: Tensor) -> bool:
    """Whether a call runs eagerly on plain tensors (not traced, not transformed, no tensor subclass /
    fake tensor)."""
    return not _transformed() and all(type(t) is Tensor for t in tensors)


class _EagerApplyPatchMask(torch.autograd.Function):
    """``yolozu_ttt::apply_patch_mask`` with its autograd, without the ``torch.library`` layers."""

    @staticmethod
    def forward(ctx, x: Tensor, patch_mask: Tensor, patch_size: int, mask_value: float) -> Tensor:
        ctx.save_for_backward(patch_mask)
        ctx.patch_size = patch_size
        return _apply_patch_mask_impl(x, patch_mask, patch_size, mask_value)

    @staticmethod
    def backward(ctx, grad):
        (patch_mask,) = ctx.saved_tensors
        # the same op with value 0 (through the public function: differentiable again under create_graph)
        return apply_patch_mask(grad, patch_mask, patch_size=ctx.patch_size, mask_value=0.0), None, None, None


class _EagerMaskedRecon(torch.autograd.Function):
    """``yolozu_ttt::masked_reconstruction_loss`` with its autograd, without the ``torch.library``
    layers; the backward reuses the forward's masked count (no recount from the grid)."""

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, patch_mask: Tensor, patch_size: int) -> Tensor:
        loss, count = _masked_recon_impl(pred, target, patch_mask, patch_size)
        ctx.save_for_backward(pred, target, patch_mask, count)
        ctx.patch_size = patch_size
        return loss

    @staticmethod
    def backward(ctx, grad):
        pred, target, patch_mask, count = ctx.saved_tensors
        dpred = _masked_recon_bwd_impl(grad, pred, target, patch_mask, ctx.patch_size, count)
        dtarget = dpred.neg().to(target.dtype) if ctx.needs_input_grad[1] else None
        return (dpred if ctx.needs_input_grad[0] else None), dtarget, None, None


# =======================================================================================
# Public API
# =======================================================================================

def entropy_loss(logits: Tensor) -> Tensor:
    """Mean softmax entropy over the last axis: ``logits (..., C) -> 0-d`` (dtype of ``logits``).

    ``H = -(p * log(clamp(p, 1e-12))).sum(-1)``, ``p = softmax(logits, -1)``, averaged over
    every leading element.  ``C <= 1`` gives 0 with a zero gradient.  fp32 accumulation for
    fp16/bf16 input.  Differentiable w.r.t. ``logits``.

    Eager calls run the custom op's implementation and autograd (``_EagerEntropyLoss``)
    without the ``torch.library`` layers (~70 µs per call); under ``torch.compile`` the custom
    op ``yolozu_ttt::entropy_loss_fwd`` is traced; under ``torch.func.vmap`` it runs with its
    batching rule (``(V, ..., C) -> (V,)``, each the mean over its sample's rows).
    """
    if _transformed():
        return torch.ops.yolozu_ttt.entropy_loss_fwd(logits)[0]
    return _EagerEntropyLoss.apply(logits)


def entropy_stats(logits: Tensor, conf_min: float) -> tuple[Tensor, Tensor, Tensor]:
    """EATA per-sample signals ``(conf, entropy, valid)``, each fp32 of shape ``(B,)``.

    ``logits (B, C)``: per-row max-probability, entropy and ``valid = 1``.
    ``logits (B, ..., C)``: per-sample means over ``...`` of the max-probability and entropy,
    and ``valid`` = number of rows with max-probability ``>= conf_min``.
    ``C <= 1``: all zeros.  Not differentiable (computed on ``logits.detach()``).
    Under ``torch.func.vmap`` over V such inputs: each ``(V, B)``, one call on the flattened batch.
    """
    if _eager(logits):
        return _entropy_stats_impl(logits.detach(), float(conf_min))
    return torch.ops.yolozu_ttt.entropy_stats(logits.detach(), float(conf_min))


def apply_patch_mask(x: Tensor, patch_mask: Tensor, *, patch_size: int, mask_value: float = 0.0) -> Tensor:
    """Fill every pixel of a masked patch with ``mask_value``.

    ``x``: ``(B, C, H, W)`` or ``(C, H, W)``.  ``patch_mask``: bool/uint8 grid ``(gh, gw)``,
    ``(B|1, gh, gw)`` (4-D ``x``) / ``(C|1, gh, gw)`` (3-D ``x``), or ``(B|1, C|1, gh, gw)``
    with ``gh = ceil(H / patch_size)``, ``gw = ceil(W / patch_size)``.  Returns a tensor shaped
    and typed like ``x``; the gradient flows through unmasked elements only.  Under
    ``torch.func.vmap`` (``x``, ``patch_mask`` or both batched): ``(V, *x.shape)``, one call.
    """
    if _eager(x, patch_mask):
        if x.requires_grad and torch.is_grad_enabled():
            return _EagerApplyPatchMask.apply(x, patch_mask, int(patch_size), float(mask_value))
        return _apply_patch_mask_impl(x, patch_mask, int(patch_size), float(mask_value))
    return torch.ops.yolozu_ttt.apply_patch_mask(x, patch_mask, int(patch_size), float(mask_value))


def masked_reconstruction_loss(pred: Tensor, target: Tensor, patch_mask: Tensor, *, patch_size: int) -> Tensor:
    """Mean of ``(pred - target)^2`` over the masked elements of every channel -> 0-d (``pred.dtype``).

    ``pred``, ``target``: same shape, ``(B, C, H, W)`` or ``(C, H, W)``; ``patch_mask`` as in
    :func:`apply_patch_mask`.  fp32 accumulation; an empty mask gives 0 with a zero gradient.
    Differentiable w.r.t. ``pred`` and ``target``.  Under ``torch.func.vmap``: ``(V,)``, the op
    looped over the V samples (each divides by its own masked count).
    """
    if _eager(pred, target, patch_mask):
        if (pred.requires_grad or target.requires_grad) and torch.is_grad_enabled():
            return _EagerMaskedRecon.apply(pred, target, patch_mask, int(patch_size))
        return _masked_recon_impl(pred, target, patch_mask, int(patch_size))[0]
    return torch.ops.yolozu_ttt.masked_reconstruction_loss(pred, target, patch_mask, int(patch_size))
