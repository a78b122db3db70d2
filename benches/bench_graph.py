"""Graph mode on the GPU: the builtin RT-DETR at batch 1, 320x320, eager vs graph (vs Tent's floor).

``fast`` is ``yolozu_ttt.run_ttt`` eagerly; ``graph`` is ``run_ttt(graph=True)``: one eager
warm-up step, one capture, then every step replayed from a CUDA graph (forwards, losses,
backwards and update), so its time includes the warm-up and the capture. ``floor`` (Tent only:
the issue's target, graph mode 1.5x faster than the eager floor) is the eager model work no
engine removes: forward, entropy, backward for the selected parameters, per step.
``extra_info["whole_step"]`` records whether the whole step was captured, or the fallback
warning. Tent runs 40 steps, EATA, SAR and CoTTA 20. CUDA only (skipped elsewhere):

    YOLOZU_TTT_BENCH_DEVICE=cuda python -m pytest benches/bench_graph.py --benchmark-only
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import FixedAdapter, bench_device, tent_floor_run
from yolozu.tta.config import TTTConfig

import yolozu_ttt
from yolozu_ttt.engine import GraphFallbackWarning

STEPS = {"tent": 40, "eata": 20, "sar": 20, "cotta": 20}
BATCH = (1, 3, 320, 320)
DEVICE = bench_device()
#: every sample selected, so each EATA step updates
METHOD_OPTIONS = {"eata": dict(eata_conf_min=0.0, eata_entropy_min=0.0, eata_entropy_max=1e9)}

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda" or not torch.cuda.is_available(),
                                reason="graph mode needs CUDA (YOLOZU_TTT_BENCH_DEVICE=cuda)")


@pytest.fixture(scope="module")
def rtdetr():
    from yolozu.inference.adapter import RTDETRPoseAdapter

    model = RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model().to(DEVICE)
    batch = torch.randn(BATCH, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return model, copy.deepcopy(model.state_dict()), batch


CASES = [("tent", p) for p in ("floor", "fast", "graph")] + [(m, p) for m in ("eata", "sar", "cotta")
                                                              for p in ("fast", "graph")]


@pytest.mark.parametrize("update_filter", ["norm_only", "all"])
@pytest.mark.parametrize("method,provider", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_graph_mode(benchmark, rtdetr, method, provider, update_filter):
    model, state, batch = rtdetr
    steps = STEPS[method]
    config = TTTConfig(enabled=True, method=method, steps=steps, update_filter=update_filter, lr=1e-4,
                       **METHOD_OPTIONS.get(method, {}))
    fallbacks: list[str] = []

    def setup():
        model.load_state_dict(state)
        model.eval()

    def once():
        if provider == "floor":
            tent_floor_run(model, batch, update_filter, steps)
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yolozu_ttt.run_ttt(FixedAdapter(model, batch), [], config=config, graph=provider == "graph")
        fallbacks[:] = [str(w.message) for w in caught if issubclass(w.category, GraphFallbackWarning)]

    benchmark.group = f"graph mode {method}/{update_filter} ({steps} steps, {'x'.join(map(str, BATCH))})"
    benchmark.extra_info.update({"provider": provider, "update_filter": update_filter, "steps": steps,
                                 "device": str(DEVICE)})
    benchmark.pedantic(once, setup=setup, rounds=2, iterations=1, warmup_rounds=1)
    if provider == "graph":
        benchmark.extra_info["whole_step"] = fallbacks[0] if fallbacks else "captured"
