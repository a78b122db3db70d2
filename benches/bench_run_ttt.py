"""End-to-end run_ttt on the builtin RT-DETR: reference vs fast, and the floor.

Tent, 3 steps, one batch of 2x3x320x320, update_filter all and norm_only. ``floor`` is the bare
model work the engine cannot remove: the same forwards, entropy and backwards computing the
selected parameters' gradients only, no optimizer and no bookkeeping. CPU unless
``YOLOZU_TTT_BENCH_DEVICE=cuda``.

    python -m pytest benches/bench_run_ttt.py --benchmark-only
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import FixedAdapter, bench_device, tent_floor_run
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import run_ttt as reference_run_ttt

import yolozu_ttt

STEPS = 3
BATCH = (2, 3, 320, 320)
DEVICE = bench_device()


@pytest.fixture(scope="module")
def rtdetr():
    from yolozu.inference.adapter import RTDETRPoseAdapter

    model = RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model().to(DEVICE)
    batch = torch.randn(BATCH, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    state = copy.deepcopy(model.state_dict())
    tent_floor_run(model, batch, "norm_only", STEPS)  # warm the allocator and kernels once for every provider
    model.load_state_dict(state)
    return model, state, batch


@pytest.mark.parametrize("update_filter", ["norm_only", "all"])
@pytest.mark.parametrize("provider", ["reference", "fast", "floor"])
def test_run_ttt_tent(benchmark, rtdetr, provider, update_filter):
    model, state, batch = rtdetr
    config = TTTConfig(enabled=True, method="tent", steps=STEPS, update_filter=update_filter, lr=1e-4)
    run = {"reference": reference_run_ttt, "fast": yolozu_ttt.run_ttt}.get(provider)

    def setup():
        model.load_state_dict(state)
        for p in model.parameters():
            p.grad = None
        model.eval()

    def once():
        if run is None:
            tent_floor_run(model, batch, update_filter, STEPS)
        else:
            run(FixedAdapter(model, batch), [], config=config)

    benchmark.group = f"run_ttt tent/{update_filter} ({STEPS} steps, {'x'.join(map(str, BATCH))})"
    benchmark.extra_info.update({"provider": provider, "update_filter": update_filter, "steps": STEPS,
                                 "device": str(DEVICE)})
    benchmark.pedantic(once, setup=setup, rounds=2, iterations=1, warmup_rounds=1)
