"""End-to-end run_ttt per method on the builtin RT-DETR: reference vs fast vs floor.

mim (structured branch: the builtin RT-DETR built with enable_mim=True), cotta, eata and sar,
update_filter norm_only and all, 2 steps on one 1x3x256x256 batch. ``floor`` runs the same
forwards/backwards each method needs, computing only the selected parameters' gradients, and
nothing else: the part no engine can remove. ``extra_info`` holds the peak memory growth of one more,
untimed run of reference and fast (``conftest.peak_memory_growth``: the allocator's own accounting,
CUDA max allocated on a GPU). ``YOLOZU_TTT_BENCH_DEVICE=cuda`` runs on the GPU
(without a seed there: the reference's seeded draws raise on CUDA).

    python -m pytest benches/bench_methods.py --benchmark-only
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import FixedAdapter, bench_device, peak_memory_growth, sync
from yolozu.tta import ttt_mim
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import _entropy_loss_from_logits, _forward_cotta_augs
from yolozu.tta.integration import run_ttt as reference_run_ttt

import yolozu_ttt

STEPS = 2
BATCH = (1, 3, 256, 256)
METHODS = ["eata", "sar", "cotta", "mim"]
DEVICE = bench_device()
# The reference draws seeded masks/restores with a CPU generator, which raises on CUDA: no seed there.
SEED = 0 if DEVICE.type == "cpu" else None


def build_models():
    """({enable_mim: (model, state)}, batch): the builtin RT-DETR without and with MIM, one batch."""
    from rtdetr_pose.config import load_config
    from rtdetr_pose.factory import build_model

    cfg = load_config("builtin:base")
    out = {}
    for mim in (False, True):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(cfg.model, enable_mim=mim))
        model.to(DEVICE).eval()
        out[mim] = (model, copy.deepcopy(model.state_dict()))
    return out, torch.randn(BATCH, generator=torch.Generator().manual_seed(0)).to(DEVICE)


@pytest.fixture(scope="module")
def models():
    return build_models()


def floor_run(method, model, x, update_filter):
    """The forwards/backwards ``method`` needs, gradients of the selected parameters only."""
    selected = ttt_mim.select_parameters(model, update_filter=update_filter)
    teacher = copy.deepcopy(model).eval() if method == "cotta" else None
    try:
        for _ in range(STEPS):
            for p in selected:
                p.grad = None
            if method == "mim":
                mask = ttt_mim.generate_block_mask(x.shape[-2], x.shape[-1], patch_size=16, mask_prob=0.6,
                                                   device=x.device)
                out = model(x, geom_input=ttt_mim._default_geom_input(x), feature_mask=mask, return_mim=True)
                mim = out["mim"]
                loss = ttt_mim.reconstruction_loss(mim["recon_feat"], mim["teacher_feat"]) + 0.1 * mim["entropy"]
                loss.backward(inputs=selected)
                continue
            for _ in range(2 if method == "sar" else 1):
                if method == "cotta":
                    logits, _ = _forward_cotta_augs(model, x, augmentations=("identity", "hflip"),
                                                    aggregation="confidence_weighted_mean")
                else:
                    logits = model(x)["logits"]
                _entropy_loss_from_logits(logits).backward(inputs=selected)
            if teacher is not None:
                with torch.no_grad():
                    _forward_cotta_augs(teacher, x, augmentations=("identity", "hflip"),
                                        aggregation="confidence_weighted_mean")
        sync(x.device)
    finally:
        for p in model.parameters():
            p.grad = None


@pytest.mark.parametrize("update_filter", ["norm_only", "all"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("provider", ["reference", "fast", "floor"])
def test_run_ttt_method(benchmark, models, provider, method, update_filter):
    by_mim, x = models
    model, state = by_mim[method == "mim"]
    config = TTTConfig(enabled=True, method=method, steps=STEPS, update_filter=update_filter, lr=1e-4, seed=SEED,
                       cotta_restore_prob=0.01, eata_entropy_max=10.0, eata_conf_min=0.0)
    run = {"reference": reference_run_ttt, "fast": yolozu_ttt.run_ttt}.get(provider)

    def setup():
        model.load_state_dict(state)
        model.eval()

    def adapt(m):
        if run is None:
            floor_run(method, m, x, update_filter)
        else:
            run(FixedAdapter(m, x), [], config=config)

    benchmark.group = f"run_ttt {method}/{update_filter} ({STEPS} steps, {'x'.join(map(str, BATCH))})"
    benchmark.extra_info.update({"provider": provider, "method": method, "update_filter": update_filter,
                                 "device": str(DEVICE)})
    benchmark.pedantic(lambda: adapt(model), setup=setup, rounds=2, iterations=1, warmup_rounds=1)
    if run is not None:  # one more, untimed run for the memory figure
        setup()
        key, mib = peak_memory_growth(adapt, model, DEVICE)
        benchmark.extra_info[key] = mib
