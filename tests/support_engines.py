"""Update-engine helpers: calling a backend by name (a step through its spec), the documented restore draws, torch's reference norms."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch


def engine_stats(fn: Any, groups: list, *args: Any, keys: tuple[str, ...], device: Any = "cpu",
                 **kwargs: Any) -> dict[str, float]:
    """Call an update engine's ``fn(groups, out, *args, **kwargs)`` (``fused_step``, ``grad_stats`` or
    ``sar_perturb`` of ``yolozu_ttt._C`` or ``yolozu_ttt.kernels.update``) with a fresh float64 ``out``
    of NaNs on ``device`` (a slot the call does not write stays NaN) and return what it wrote by
    name; ``keys`` is the call's layout in ``yolozu_ttt.common``."""
    out = torch.full((len(keys),), float("nan"), dtype=torch.float64, device=device)
    fn(groups, out, *args, **kwargs)
    return dict(zip(keys, out.tolist()))


def step_stats(fn: Any, groups: list, lr: float, *, device: Any = "cpu", restore_counter: int = 0, gate: Any = None,
               **options: Any) -> dict[str, float]:
    """One ``fn(groups, out, options, restore_counter, gate)`` (the ``fused_step`` of ``yolozu_ttt._C``
    or ``yolozu_ttt.kernels.update``) with its options built as a run builds them: one
    ``StepSpec(lr=lr, **options)`` (the one validation), passed as the backend takes it (the C++
    engine its ``native`` options, anything else the spec); the stats by name, as ``engine_stats``."""
    import yolozu_ttt._C as C
    from yolozu_ttt.common import STAT_KEYS
    from yolozu_ttt.engine import StepSpec

    spec = StepSpec(lr=lr, **options)
    return engine_stats(fn, groups, spec.native if fn is C.fused_step else spec, restore_counter, gate,
                        keys=STAT_KEYS, device=device)

def expected_restore_mask(n: int, prob: float, seed: int, counter: int, group: int = 0) -> torch.Tensor:
    """CoTTA's documented restore draws, ported to numpy: element j of arena group ``group`` goes back
    to its base where ``(fmix32(j ^ restore_key(seed, counter, group)) >> 8) * 2^-24 < prob``."""
    import numpy as np

    import yolozu_ttt._C as C

    key = np.uint32(C.restore_key(seed, counter, group))
    with np.errstate(over="ignore"):
        h = np.arange(n, dtype=np.uint64).astype(np.uint32) ^ key
        for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
            h = (h ^ (h >> np.uint32(shift))) * np.uint32(mul)
        h = h ^ (h >> np.uint32(16))
    return torch.from_numpy((h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24) < np.float32(prob))

def torch_reference_norms(values: list[torch.Tensor], grads: list[torch.Tensor], lr: float,
                          steps: int) -> tuple[list[tuple[float, float]], list[torch.Tensor]]:
    """The reference's steps: torch.optim.Adam on copies of ``values`` (the same ``grads`` every step),
    then YOLOZU's fp32 norms of p_new - p_old and p_new - base; per step (update_norm,
    total_update_norm), and the final parameters."""
    from yolozu.tta import integration as ref

    params = [v.clone().requires_grad_(True) for v in values]
    base = ref._snapshot_params(params)
    opt = torch.optim.Adam(params, lr=lr)
    norms = []
    for _ in range(steps):
        pre = ref._snapshot_params(params)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        norms.append((ref._global_l2_update_norm(pre), ref._global_l2_update_norm(base)))
    return norms, [p.detach() for p in params]

def same_float(a: float, b: float) -> bool:
    """NaN is NaN, inf is the same inf, finite values within 1e-5."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b if math.isinf(a) or math.isinf(b) else a == pytest.approx(b, rel=1e-5)

def non_finite_update_inputs(first: str, sizes: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Seeded (values, grads) of one segment per size for the non-finite update-norm tests: with
    ``first == "nan"`` two grads are 0, so at ``lr = inf`` the update holds inf * 0 (a NaN); else
    every element moves by a non-zero step."""
    g = torch.Generator().manual_seed(17)
    values = [torch.randn(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g) for n in sizes]
    if first == "nan":
        grads[0][2] = 0.0
        grads[-1][100] = 0.0
    return values, grads
