"""SAR on the fused engine against YOLOZU's run_ttt: ascent/descent passes, clipping, guards, rollback, errors."""
from __future__ import annotations

import functools

import pytest
import torch
from conftest import (assert_bfloat16_tracks_reference, assert_raises_like_reference, assert_triton_engine_runs,
                      check_parity, make_batches, make_model, only_under_interpreter, run_under_interpreter,
                      skip_under_interpreter)
from support_parallel import parallel_like_alone
from test_parallel import images, tiny_rtdetr
from yolozu.tta.config import TTTConfig

import yolozu_ttt


def sar(**kw) -> TTTConfig:
    base = dict(enabled=True, method="sar", steps=3, max_batches=2, lr=1e-2)
    base.update(kw)
    return TTTConfig(**base)




def between(lo: float, hi: float) -> float:
    assert lo < hi
    return (lo + hi) / 2


def first_rise(values: list[float]) -> tuple[float, int]:
    """A limit that ``values[k] > limit`` trips first at some k >= 1 (for guards of the form v > limit)."""
    for k in range(1, len(values)):
        if values[k] > max(values[:k]):
            return between(max(values[:k]), values[k]), k
    raise AssertionError(f"no rise in {values}")


def blank_frames():
    """Eval-mode model; frames alternate with a blank one (the highest entropy), so the loss rises mid-run."""
    model, (b,) = make_model().eval(), make_batches(1)
    return model, [b, torch.zeros_like(b)]


@functools.lru_cache(maxsize=None)
def free_run(**cfg):
    """The reference's report without guards (checked against the fast backend once)."""
    model, batches = blank_frames()
    return check_parity(model, batches, sar(**cfg))[0]


@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_sar_filters_match_reference(update_filter, train_mode):
    model = make_model()
    model.train(train_mode)
    _, fast, _ = check_parity(model, make_batches(), sar(update_filter=update_filter))
    assert fast.steps_run == fast.optimizer_steps == 3
    assert fast.forward_calls == fast.backward_calls == 6
    for e in fast.step_metrics:
        assert e["sar_rho_applied"] == e["sar_rho"] and e["loss_second"] != e["loss_first"]


OPTIONS = {
    "adaptive": dict(sar_adaptive=True),
    "adaptive_norm_only": dict(sar_adaptive=True, update_filter="norm_only", sar_rho=0.5, steps=4),
    "rho_0": dict(sar_rho=0.0),
    "rho_negative": dict(sar_rho=-1.0),
    "first_step_scale_0": dict(sar_first_step_scale=0.0),
    "first_step_scale_3": dict(sar_first_step_scale=3.0, sar_rho=0.2),
    "clip": dict(max_grad_norm=0.05),
    "clip_adaptive": dict(max_grad_norm=0.05, sar_adaptive=True),
    "clip_adaptive_norm_only": dict(max_grad_norm=0.01, sar_adaptive=True, update_filter="norm_only", steps=4),
    "include_lora": dict(include=["lora"]),
    "include_exclude": dict(include=["bn", "gn"], exclude=["bias"]),
    "one_batch": dict(steps=5, max_batches=1),
    "no_finite_guard": dict(stop_on_non_finite=False),
}


@pytest.mark.parametrize("kw", list(OPTIONS.values()), ids=list(OPTIONS))
def test_sar_options_match_reference(kw):
    _, fast, _ = check_parity(make_model(), make_batches(3), sar(**kw))
    applied = max(0.0, fast.step_metrics[0]["sar_rho"]) * max(0.0, fast.step_metrics[0]["sar_first_step_scale"])
    for e in fast.step_metrics:
        assert e["sar_rho_applied"] == applied
        if not applied:
            assert e["loss_second"] == e["loss_first"]  # no ascent step: the same point twice


@pytest.mark.parametrize("guard,rollback", [
    ("max_total_update_norm", True), ("max_total_update_norm", False), ("max_update_norm", True),
    ("max_loss_increase", True), ("max_loss_ratio", False),
])
def test_guard_stops_mid_run(guard, rollback):
    model, batches = blank_frames()
    cfg = dict(steps=5, lr=1e-3)
    steps = free_run(**cfg).step_metrics
    if guard == "max_total_update_norm":
        limit, k = first_rise([e["total_update_norm"] for e in steps])
    elif guard == "max_update_norm":  # Adam's first step is its largest: trips at step 0
        limit, k = between(max(e["update_norm"] for e in steps[1:]), steps[0]["update_norm"]), 0
    elif guard == "max_loss_increase":
        limit, k = first_rise([e["loss"] - steps[0]["loss"] for e in steps])
    else:
        limit, k = first_rise([e["loss"] / steps[0]["loss"] for e in steps])
    _, fast, _ = check_parity(model, batches, sar(**cfg, **{guard: limit}, rollback_on_stop=rollback))
    assert fast.stop_reason == f"{guard}_exceeded" and fast.steps_run == k
    assert fast.step_metrics[-1]["rolled_back"] is rollback


@pytest.mark.parametrize("train_mode", [False, True])
def test_rollback_restores_the_state_after_the_last_good_step_bit_exactly(train_mode):
    model, batches = make_model().train(train_mode), make_batches()
    _, free, _ = check_parity(model, batches, sar(steps=4, sar_adaptive=True))
    limit, k = first_rise([e["total_update_norm"] for e in free.step_metrics])
    _, fast, fast_model = check_parity(model, batches, sar(steps=4, sar_adaptive=True, max_total_update_norm=limit))
    assert fast.steps_run == k
    _, _, good = check_parity(model, batches, sar(steps=k, sar_adaptive=True))
    for (name, a), b in zip(good.state_dict().items(), fast_model.state_dict().values()):
        assert torch.equal(a, b), name  # params and BN buffers


@pytest.mark.parametrize("max_grad_norm", [None, 0.1])
def test_nan_batch_stops_with_non_finite_metrics_and_rolls_back_bit_exactly(max_grad_norm):
    """A NaN first-pass gradient: the reference still takes the (NaN) ascent step and reports rho applied."""
    model, batches = make_model(), make_batches(2)
    batches[1] = torch.full_like(batches[1], float("nan"))
    _, fast, fast_model = check_parity(model, batches, sar(steps=3, max_grad_norm=max_grad_norm))
    assert fast.stop_reason == "non_finite_metrics" and fast.steps_run == 1
    assert fast.step_metrics[-1]["sar_rho_applied"] == fast.step_metrics[-1]["sar_rho"]
    _, _, one_step = check_parity(model, batches[:1], sar(steps=1, max_batches=1, max_grad_norm=max_grad_norm))
    for (name, a), b in zip(one_step.state_dict().items(), fast_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_batch_without_the_guard_poisons_like_the_reference():
    batches = make_batches(2)
    batches[1] = torch.full_like(batches[1], float("nan"))
    _, fast, fast_model = check_parity(make_model(), batches, sar(steps=3, stop_on_non_finite=False))
    assert fast.steps_run == 3 and torch.isnan(fast_model.gn.weight).all()


@pytest.mark.parametrize("model,batches,cfg", [
    (make_model(), [{"image": torch.zeros(1, 3, 8, 8)}], sar(max_batches=1)),
    (make_model(), [[torch.zeros(1, 3, 8, 8)]], sar(max_batches=1)),
    (make_model(), make_batches(), sar(include=["no_such_param"])),
    (make_model(), make_batches(), sar(lr=-1.0)),
    (make_model(), make_batches(), sar(update_filter="weird")),
])
def test_bad_input_raises_like_the_reference(model, batches, cfg):
    assert_raises_like_reference(model, batches, cfg)


def test_bfloat16_parameters_run_and_track_the_reference():
    assert_bfloat16_tracks_reference(sar(update_filter="norm_only", lr=1e-3))


def test_build_info_lists_sar():
    assert "sar" in yolozu_ttt.build_info()["accelerated_methods"]


# The interpreter run: each kernel path SAR takes (grad stats, clip, ascent, NaN ascent, update, rollback).
TRITON_SUBSET = (
    "test_sar_options_match_reference[clip_adaptive]",
    "test_sar_options_match_reference[rho_0]",
    "test_nan_batch_stops_with_non_finite_metrics_and_rolls_back_bit_exactly[0.1]",
    "test_triton_backend_is_the_one_running",
)


@skip_under_interpreter
def test_sar_parity_through_the_triton_path():
    """The GPU code path (Triton entropy, grad-stats, perturb and update kernels), in the interpreter on CPU."""
    run_under_interpreter("-x", *[f"{__file__}::{name}" for name in TRITON_SUBSET])


@only_under_interpreter
def test_triton_backend_is_the_one_running():
    assert_triton_engine_runs()


# ---- sample-parallel SAR (TTTSession.run_parallel): K records at once, each as alone -------------
def sar_parallel(model, batches, k, **kw):
    return parallel_like_alone(model, batches, sar(**{"max_grad_norm": 1.0, **kw}), k)


SAR_PARALLEL = {
    "default": dict(),
    # lr 1e-3: a group's replicas and the run alone differ by the kernels' reduction order, which
    # Adam amplifies (a clip coefficient and a small second moment) roughly in proportion to lr: at lr 1e-2
    # that reached 0.94 of the tolerance (k=2, eval mode, ATEN_CPU_CAPABILITY=default; 0.72 with
    # AVX2 or AVX-512, 0.57 with one thread); at 1e-3 at most 0.33 in all four, mixed replicas
    # still 59x over it and a 1% rho error 1.8x (eval) and 4000x (train) over it.
    "adaptive_clip": dict(sar_adaptive=True, sar_rho=0.5, max_grad_norm=0.05, lr=1e-3),
    "no_ascent": dict(sar_rho=0.0),
    "half_step_no_clip": dict(sar_first_step_scale=0.5, max_grad_norm=None),
}


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("kw", list(SAR_PARALLEL.values()), ids=list(SAR_PARALLEL))
@pytest.mark.parametrize("k", [2, 4])
def test_parallel_sar_equals_each_image_alone(k, kw, train_mode):
    """TinyDet (batch-, group- and layer-norm): six records in groups of k (the last one smaller),
    each with its own clip, ascent (its own direction norm) and second pass, as alone."""
    model = make_model().train(train_mode)
    reports, _, _ = sar_parallel(model, images(6), k, update_filter="norm_only", **kw)
    assert all(r.forward_calls == r.backward_calls == 6 and r.optimizer_steps == 3 for r in reports)
    applied = {e["sar_rho_applied"] for r in reports for e in r.step_metrics}
    rho = kw.get("sar_rho", 0.05) * kw.get("sar_first_step_scale", 1.0)
    assert applied == {rho}


@pytest.mark.parametrize("k", [2, 4])
def test_parallel_sar_on_the_shrunk_rtdetr(k):
    """Four records (the last group smaller than k), in eval mode (the model's own, as the
    reference's SAR): in train mode one BN bias element of one image has a true gradient of ~0
    whose Adam step is rounding noise (alone and in a group it differs by 3% of lr)."""
    sar_parallel(tiny_rtdetr(), images(4, size=64), k, update_filter="norm_only", steps=2, lr=1e-4)


@pytest.mark.parametrize("guard", [True, False])
def test_a_nan_image_stops_or_poisons_only_itself(guard):
    """A NaN image in a group of three: its NaN ascent and update stay in its replica; with the
    non-finite guard it stops at its first step (rolled back to the start), without it its
    parameters go NaN while the others adapt on."""
    model, batches = make_model().eval(), images(4)
    batches[2] = torch.full_like(batches[2], float("nan"))
    reports, states, start = sar_parallel(model, batches, 3, update_filter="norm_only", stop_on_non_finite=guard,
                                          rollback_on_stop=True)
    assert [r.stop_reason for r in reports] == [None, None, "non_finite_metrics" if guard else None, None]
    assert reports[2].step_metrics[0]["sar_rho_applied"] == 0.05
    if guard:
        for key, value in start.items():
            assert torch.equal(states[2][key], value), key
    else:
        assert torch.isnan(states[2]["gn.weight"]).all()
    assert all(torch.isfinite(states[i]["gn.weight"]).all() for i in (0, 1, 3))


def test_a_total_update_guard_trips_for_one_image_of_a_group():
    """max_total_update_norm set between the images' last total update norms: only the image above
    it stops (at its last step, rolled back)."""
    model, batches = make_model().train(), images(5)
    free, _, _ = sar_parallel(model, batches, 4, update_filter="norm_only")
    last = [r.step_metrics[-1]["total_update_norm"] for r in free]
    top = max(range(1, 5), key=last.__getitem__)
    limit = between(max(v for i, v in enumerate(last) if i != top), last[top])
    reports, _, _ = sar_parallel(model, batches, 4, update_filter="norm_only", max_total_update_norm=limit,
                                 rollback_on_stop=True)
    assert [r.stop_reason for r in reports] == [
        "max_total_update_norm_exceeded" if i == top else None for i in range(5)]
    assert reports[top].steps_run == 2 and reports[top].step_metrics[-1]["rolled_back"]
