"""Parity checks against YOLOZU's reference: run both, compare reports, models, errors and predictions."""
from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn
from support_models import ListAdapter, make_batches, make_model


def run_both(model: nn.Module, batches: list[Any], config: Any):
    """Run the reference and the fast backend on identical copies; return both models and reports."""
    from yolozu.tta.integration import run_ttt as reference_run_ttt

    import yolozu_ttt

    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    ref = reference_run_ttt(ListAdapter(ref_model, batches), [], config=config)
    fast = yolozu_ttt.run_ttt(ListAdapter(fast_model, batches), [], config=config)
    return ref_model, ref, fast_model, fast

EXACT_FIELDS = (
    "enabled", "method", "reset", "steps_requested", "steps_run", "batches_used", "updated_param_count",
    "warnings", "stopped_early", "stop_reason", "method_profile", "forward_calls", "backward_calls",
    "optimizer_steps", "update_ratio", "abstained_steps", "abstention_ratio",
)

def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    return a == b

def assert_reports_match(ref: Any, fast: Any, *, rtol: float = 1e-4, atol: float = 1e-6,
                         same_device: bool = True) -> None:
    """Same report contract: exact fields equal, floats within tolerance, same step-entry keys
    (and the same memory-report keys, unless the two runs were on different devices)."""
    for name in EXACT_FIELDS:
        assert getattr(fast, name) == getattr(ref, name), name
    assert _close(ref.losses, fast.losses, rtol, atol), (ref.losses, fast.losses)
    assert _close(ref.mask_ratio, fast.mask_ratio, rtol, atol)
    assert len(ref.step_metrics) == len(fast.step_metrics)
    for r, f in zip(ref.step_metrics, fast.step_metrics):
        assert list(r.keys()) == list(f.keys()), (list(r.keys()), list(f.keys()))
        for key in r:
            assert _close(r[key], f[key], rtol, atol), (key, r[key], f[key])
    if same_device:
        assert (ref.memory or {}).keys() == (fast.memory or {}).keys()
    assert ref.to_dict().keys() == fast.to_dict().keys()

def assert_models_match(ref_model: nn.Module, fast_model: nn.Module, *, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Parameters and buffers equal within tolerance (NaN where the reference has NaN)."""
    ref_state, fast_state = ref_model.state_dict(), fast_model.state_dict()
    assert ref_state.keys() == fast_state.keys()
    for name, value in ref_state.items():
        other = fast_state[name]
        assert other.dtype == value.dtype and other.shape == value.shape, name
        torch.testing.assert_close(other, value, rtol=rtol, atol=atol, equal_nan=True, msg=name)
    assert [p.requires_grad for p in ref_model.parameters()] == [p.requires_grad for p in fast_model.parameters()]
    assert ref_model.training == fast_model.training

def check_parity(model: nn.Module, batches: list[Any], config: Any):
    """Run both backends; the reports and the models must match. Returns (ref report, fast report, fast model)."""
    ref_model, ref, fast_model, fast = run_both(model, batches, config)
    assert_reports_match(ref, fast)
    assert_models_match(ref_model, fast_model)
    return ref, fast, fast_model

def assert_raises_like_reference(model: nn.Module, batches: list[Any], config: Any) -> None:
    """Bad input: YOLOZU's exception type and message; the model keeps its flags and gets no grads."""
    from yolozu.tta.integration import run_ttt as reference_run_ttt

    import yolozu_ttt

    with pytest.raises(Exception) as ref_exc:
        reference_run_ttt(ListAdapter(copy.deepcopy(model), batches), [], config=config)
    fast_model = copy.deepcopy(model)
    flags = [p.requires_grad for p in fast_model.parameters()]
    with pytest.raises(type(ref_exc.value)) as fast_exc:
        yolozu_ttt.run_ttt(ListAdapter(fast_model, batches), [], config=config)
    assert str(fast_exc.value) == str(ref_exc.value)
    assert [p.requires_grad for p in fast_model.parameters()] == flags
    assert all(p.grad is None for p in fast_model.parameters())

def assert_bfloat16_tracks_reference(config: Any) -> None:
    """bf16 parameters: same steps, first loss within 1%, final weights within a few bf16 ulps
    (our Adam keeps fp32 moments where the reference keeps bf16 ones)."""
    model = make_model().to(torch.bfloat16)
    batches = [b.to(torch.bfloat16) for b in make_batches()]
    ref_model, ref, fast_model, fast = run_both(model, batches, config)
    assert fast.steps_run == ref.steps_run == 3
    assert fast.losses[0] == pytest.approx(ref.losses[0], rel=1e-2)
    for a, b in zip(ref_model.parameters(), fast_model.parameters()):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)

def max_prediction_diff(a: list[dict], b: list[dict]) -> float:
    """Largest |score| / |box| difference of two exports' predictions; the image lists, detection
    counts and classes must agree exactly."""
    assert [e["image"] for e in a] == [e["image"] for e in b]
    worst = 0.0
    for ea, eb in zip(a, b):
        assert len(ea["detections"]) == len(eb["detections"])
        for da, db in zip(ea["detections"], eb["detections"]):
            assert da["class_id"] == db["class_id"]
            worst = max(worst, abs(float(da["score"]) - float(db["score"])),
                        *(abs(float(da["bbox"][k]) - float(db["bbox"][k])) for k in ("cx", "cy", "w", "h")))
    return worst
