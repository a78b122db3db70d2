"""Host time of one fused update step on the Triton engine, the kernel launches stubbed out.

On a GPU the fused update is host-bound at TTT's sizes (BENCHMARKS.md: ~360 µs of host work
around ~180 µs of kernels), so its host side is tracked here without a GPU: the Triton engine's
groups are built over CPU tensors, every ``@triton.jit`` kernel of ``yolozu_ttt.kernels.update``
has its ``run`` replaced by a no-op (``kernel[grid](...)`` calls ``kernel.run``), and what is
timed is everything else a step does on the host: argument checks, the has-grad upload, the
tables, the workspace, the launch arguments.

providers:
    fast    ``kernels.update.fused_step`` (the launcher alone)
    engine  ``UpdateEngine.step`` with two extra scalars (Tent's loss and entropy): the launcher,
            the snapshot binding and the one stats read

Groups: "host fused step <filter> (<n> tensors)" at the builtin RT-DETR's layouts ('all', 197
tensors; 'norm_only', 96 tensors). Target: <= 50 µs per fused step (issue 12). "host K-row step
<filter> K=64 <method>": one step of a 64-row group (sample-parallel replicas; tent: clip and
snapshot; cotta: also the teacher EMA and the restore keyed per row), the same target.

    python -m pytest benches/bench_host.py --benchmark-only
"""
from __future__ import annotations

import types

import pytest
import torch
from conftest import rtdetr_param_sizes

from yolozu_ttt.common import STAT_KEYS
from yolozu_ttt.engine import StepSpec, UpdateEngine
from yolozu_ttt.kernels import update as U
from yolozu_ttt.kernels import update_kernels

TARGET_US = 50.0


def jitted_kernels():
    """The update's jitted kernels (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1)."""
    return [v for k, v in vars(update_kernels).items()
            if k.startswith("_") and k.endswith("_kernel") and hasattr(v, "run")]


@pytest.fixture
def stubbed(monkeypatch):
    """Launches are no-ops (counted); CPU tensors pass the device check."""
    launches = []
    for kernel in jitted_kernels():
        monkeypatch.setattr(kernel, "run", lambda *a, _name=kernel.__name__, **k: launches.append(_name))
    monkeypatch.setattr(U, "_check_device", lambda device: None)
    return launches


class HostArena:
    """What UpdateEngine asks of an arena, over one Triton group of CPU tensors."""

    backend = "triton"
    device = torch.device("cpu")

    def __init__(self, sizes, rows=None):
        n = sum(sizes) * (rows or 1)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        if rows is None:
            self.flat = torch.randn(n)
            self.grad = torch.randn(n) * 1e-3
            moments, base = (torch.zeros(n), torch.zeros(n)), self.flat.clone()
        else:  # K rows of 'all' are 15 GB: never touched (the launches are stubbed), so never faulted in
            self.flat, self.grad, base = torch.empty(n), torch.empty(n), torch.empty(n)
            moments = (torch.empty(n), torch.empty(n))
        self.has_grad = bytearray(b"\x01" * len(sizes))
        self.group = U.TritonArenaGroup(self.flat, self.grad, *moments, base, None, offsets, list(sizes),
                                        self.has_grad, rows=rows or 1)
        if rows is not None:  # an arena of rows, as UpdateEngine tells them apart
            self.rows = rows

        self.moments, self.base = moments, base

    @property
    def groups(self):
        """The one binding the engine builds its own group object over (``engine.build_group``)."""
        buffers = types.SimpleNamespace(backend="triton", flat=self.flat, grad=self.grad, exp_avg=self.moments[0],
                                        exp_avg_sq=self.moments[1], base=self.base, offsets=self.group.offsets,
                                        sizes=self.group.sizes, has_grad=self.has_grad)
        return [types.SimpleNamespace(buffers=buffers, base=None, snap=self.group.snap)]

    def listen(self, listener):
        """The snapshot never changes here: no one to tell."""

    def hold_snapshot(self, *, in_grad=False):
        if self.group.snap is None:
            self.group.set_snapshot(self.grad)


@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("provider", ["fast", "engine"])
def test_host_fused_step(benchmark, stubbed, provider, update_filter):
    sizes = rtdetr_param_sizes(update_filter)
    arena = HostArena(sizes)
    arena.hold_snapshot()
    if provider == "fast":
        out = torch.empty(len(STAT_KEYS), dtype=torch.float64)
        groups = [arena.group]
        spec = StepSpec(lr=1e-4, max_grad_norm=1.0, write_snapshot=True)  # once per run, as a run builds it

        def step():
            U.fused_step(groups, out, spec)
    else:
        engine = UpdateEngine(arena, lr=1e-4, max_grad_norm=1.0)
        engine._stats.zero_()
        extra = (torch.tensor(0.5), torch.tensor(0.25))

        def step():
            engine.step(write_snapshot=True, extra=extra)

    step()  # the tables built on first use
    stubbed.clear()
    step()
    launches = len(stubbed)
    benchmark.group = f"host fused step {update_filter} ({len(sizes)} tensors)"
    benchmark.extra_info.update({"provider": provider, "tensors": len(sizes), "numel": sum(sizes),
                                 "launches_per_step": launches, "target_us": TARGET_US})
    benchmark.pedantic(step, rounds=2000, iterations=1, warmup_rounds=50)
    if benchmark.stats is not None:
        benchmark.extra_info["min_us"] = benchmark.stats.stats.min * 1e6
        benchmark.extra_info["median_us"] = benchmark.stats.stats.median * 1e6


K_ROWS = 64


@pytest.mark.parametrize("method", ["tent", "cotta"])
@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("provider", ["fast", "engine"])
def test_host_k_row_step(benchmark, stubbed, provider, update_filter, method):
    """One step of a K = 64 row group: the same host work as K = 1 (the launches' grids carry K),
    plus, for CoTTA, each row's restore key."""
    sizes = rtdetr_param_sizes(update_filter)
    arena = HostArena(sizes, rows=K_ROWS)
    arena.hold_snapshot()
    options = dict(max_grad_norm=1.0, write_snapshot=True)
    teacher = torch.empty_like(arena.flat) if method == "cotta" else None
    if method == "cotta":
        arena.group.set_teacher(teacher)
        options.update(ema_momentum=0.999, restore_prob=0.01)
    seeds = list(range(K_ROWS))
    counter = iter(range(10**9))
    if provider == "fast":
        out = torch.empty(K_ROWS * len(STAT_KEYS), dtype=torch.float64)
        spec = StepSpec(lr=1e-4, **options)

        def step():
            U.fused_step([arena.group], out, spec, next(counter), None, seeds)
    else:
        engine = UpdateEngine(arena, lr=1e-4, max_grad_norm=1.0)
        engine._stats.zero_()
        engine.bind_teacher(None if teacher is None else [teacher])
        spec = engine.spec.replace(**options)

        def step():
            engine.step(spec, counter=next(counter), seeds=seeds)

    step()
    stubbed.clear()
    step()
    benchmark.group = f"host K-row step {update_filter} K={K_ROWS} {method}"
    benchmark.extra_info.update({"provider": provider, "rows": K_ROWS, "launches_per_step": len(stubbed),
                                 "target_us": TARGET_US})
    benchmark.pedantic(step, rounds=1000, iterations=1, warmup_rounds=50)
    if benchmark.stats is not None:
        benchmark.extra_info["median_us"] = benchmark.stats.stats.median * 1e6
