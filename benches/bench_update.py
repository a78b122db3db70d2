"""The fused update vs the reference's per-step engine work, at the builtin RT-DETR's sizes.

reference: what YOLOZU's run_ttt does around each Tent step — pre-step snapshot (clones), grad
norm, clip_grad_norm_, the clipped grad norm, torch.optim.Adam, update norm and total-update norm.
fast: one fused_step over the flat arena (the same quantities, one pass + clip pass) into a float64
stats buffer, and the engine's one host read of it: ``yolozu_ttt._C`` on the CPU, on CUDA
(``device=cuda``, when a GPU is present) its Triton twin ``yolozu_ttt.kernels.update``.
On CUDA ``extra_info["GB/s"]`` is the fast path's achieved bandwidth over the bytes it must move
(clip pass: g; Adam pass: read p, g, m, v, base, write p, m, v, snapshot).

    python -m pytest benches/bench_update.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch
from conftest import rtdetr_param_sizes, sync
from yolozu.tta import integration as ref
from yolozu.tta.tent import _global_grad_norm

import yolozu_ttt._C as C
from yolozu_ttt.common import STAT_KEYS
from yolozu_ttt.engine import StepSpec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

MAX_GRAD_NORM = 1.0


def reference_engine(sizes, device):
    """Separate parameter tensors with grads, an Adam optimizer and a base snapshot."""
    params = [torch.randn(n, device=device).requires_grad_(True) for n in sizes]
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
        sync(device)

    return step, (params, opt, base)


def fast_engine(sizes, device):
    """One flat arena group over the same sizes, on the device's engine."""
    n = sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    bufs = dict(param=torch.randn(n, device=device), grad=torch.randn(n, device=device) * 1e-3,
                exp_avg=torch.zeros(n, device=device), exp_avg_sq=torch.zeros(n, device=device))
    bufs["base"] = bufs["param"].clone()
    bufs["snap"] = torch.empty_like(bufs["param"])
    if device == "cpu":
        engine, group_cls = C, C.ArenaGroup
    else:
        from yolozu_ttt.kernels import update

        engine, group_cls = update, update.TritonArenaGroup
    group = group_cls(offsets=offsets, sizes=list(sizes), **bufs)
    out = torch.empty(len(STAT_KEYS), dtype=torch.float64, device=device)
    spec = StepSpec(lr=1e-4, max_grad_norm=MAX_GRAD_NORM, write_snapshot=True)  # once per run
    options = spec.native if device == "cpu" else spec  # what each engine's fused_step takes

    def step():
        engine.fused_step([group], out, options)
        out.tolist()  # the engine's one host read per step

    return step, (bufs, group, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("provider", ["reference", "fast"])
def test_update(benchmark, provider, update_filter, device):
    sizes = rtdetr_param_sizes(update_filter)
    step, keep = (reference_engine if provider == "reference" else fast_engine)(sizes, device)
    where = "" if device == "cpu" else f", {device}"
    benchmark.group = f"update {update_filter} ({sum(sizes) / 1e6:.2f}M params, {len(sizes)} tensors{where})"
    benchmark.extra_info.update({"provider": provider, "numel": sum(sizes), "tensors": len(sizes), "device": device})
    rounds = 10 if sum(sizes) > 1_000_000 and device == "cpu" else 200
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=2)
    if device == "cuda" and provider == "fast" and benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = 10 * 4 * sum(sizes) / benchmark.stats.stats.mean / 1e9
    del keep
