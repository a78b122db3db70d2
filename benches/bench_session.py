"""Sample mode's host time per image outside the model's passes (issue 19's <= 3% target).

The session calls of ``bench_parallel`` (``session``: ``run([record])`` per image; ``k8``:
``run_parallel(records, 8)``) with the model's passes stubbed out, as bench_host stubs the kernel
launches: a stand-in model holds the builtin RT-DETR's norm layers (the same 96 selected tensors,
so the same selection, arena, engine and update) and its forward returns fixed logits tied to
every selected parameter by one cheap op, so what is timed is everything a session does per image
besides the model's forward and backward (binding checks, the reset, batches, the update, the
read, guards, the report; ``k8``: the replicas too), less the stand-in's own forward and backward
(``tent_floor_run`` on it). ``extra_info["host_over_passes"]`` is that time over the real passes
of one image (``tent_floor_run`` on the builtin RT-DETR, measured in the same test).

    python -m pytest benches/bench_session.py --benchmark-only
"""
from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
from bench_parallel import SIZE, runner, setup_case
from conftest import tent_floor_run

HOST_TARGET = 0.03
NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)


class PassesStub(torch.nn.Module):
    """The builtin RT-DETR's norm layers without the network: its forward is one cheap op that
    ties fixed logits to every norm parameter (what the session's host side sees, minus the passes)."""

    def __init__(self, model: torch.nn.Module, logits: torch.Tensor):
        super().__init__()
        self.norms = torch.nn.ModuleList(copy.deepcopy(m) for m in model.modules() if isinstance(m, NORMS))
        self.register_buffer("logits", logits.detach().clone())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tie = torch.cat([p.reshape(-1) for p in self.parameters()]).sum() * 0.0
        return {"logits": self.logits * (1.0 + x.mean() * 0.0) + tie}


@pytest.fixture(scope="module")
def case():
    return setup_case(images=5)


@pytest.mark.parametrize("provider", ["session", "k8"])
def test_session_host_time(benchmark, case, provider):
    model, images, config = case
    model = copy.deepcopy(model)
    passes = []
    for image in images:
        with torch.no_grad():
            logits = model(image)["logits"]
        start = time.perf_counter()
        tent_floor_run(model, image, "norm_only", 1)
        passes.append(time.perf_counter() - start)
    stub = PassesStub(model, logits)
    stub_passes = []  # the stub's own forward and backward, taken off the session's time
    for image in images * 4:
        start = time.perf_counter()
        tent_floor_run(stub, image, "norm_only", 1)
        stub_passes.append(time.perf_counter() - start)
    once, done = runner(provider, stub, images * 2, config)
    once()  # bind and warm
    benchmark.group = f"sample mode host time outside the passes (tent/norm_only, {2 * len(images)} images)"
    benchmark.pedantic(once, rounds=5, iterations=1)
    done()
    if benchmark.stats is not None:
        per_image = benchmark.stats.stats.median / (2 * len(images)) - statistics.median(stub_passes)
        floor = statistics.median(passes)
        benchmark.extra_info.update({"provider": provider, "host_ms_per_image": round(per_image * 1e3, 3),
                                     "passes_ms_per_image": round(floor * 1e3, 2), "size": SIZE,
                                     "host_over_passes": round(per_image / floor, 4), "target": HOST_TARGET})

