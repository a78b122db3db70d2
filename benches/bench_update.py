"""The fused update vs the reference's per-step engine work, at the builtin RT-DETR's sizes.

reference: what YOLOZU's run_ttt does around each Tent step — pre-step snapshot (clones), grad
norm, clip_grad_norm_, the clipped grad norm, torch.optim.Adam, update norm and total-update norm.
fast: one yolozu_ttt._C.fused_step over the flat arena (the same quantities, one pass + clip pass).

    python -m pytest benches/bench_update.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch
from conftest import rtdetr_param_sizes
from yolozu.tta import integration as ref
from yolozu.tta.tent import _global_grad_norm

import yolozu_ttt._C as C

MAX_GRAD_NORM = 1.0


def reference_engine(sizes):
    """Separate parameter tensors with grads, an Adam optimizer and a base snapshot."""
    params = [torch.randn(n).requires_grad_(True) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.Adam(params, lr=1e-4)
    base = ref._snapshot_params(params)

    def step():
        pre = ref._snapshot_params(params)
        _global_grad_norm(params)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        _global_grad_norm(params)
        opt.step()
        ref._global_l2_update_norm(pre)
        ref._global_l2_update_norm(base)

    return step, (params, opt, base)


def fast_engine(sizes):
    """One flat arena group over the same sizes."""
    n = sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    bufs = dict(param=torch.randn(n), grad=torch.randn(n) * 1e-3, exp_avg=torch.zeros(n),
                exp_avg_sq=torch.zeros(n))
    bufs["base"] = bufs["param"].clone()
    bufs["snap"] = torch.empty(n)
    group = C.ArenaGroup(offsets=offsets, sizes=list(sizes), **bufs)

    def step():
        C.fused_step([group], lr=1e-4, max_grad_norm=MAX_GRAD_NORM, write_snapshot=True)

    return step, (bufs, group)


@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("provider", ["reference", "fast"])
def test_update(benchmark, provider, update_filter):
    sizes = rtdetr_param_sizes(update_filter)
    step, keep = (reference_engine if provider == "reference" else fast_engine)(sizes)
    benchmark.group = f"update {update_filter} ({sum(sizes) / 1e6:.2f}M params, {len(sizes)} tensors)"
    benchmark.extra_info.update({"provider": provider, "numel": sum(sizes), "tensors": len(sizes)})
    rounds = 10 if sum(sizes) > 1_000_000 else 200
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=2)
    del keep
