"""yolozu_ttt.guards as a unit: YOLOZU's guard order, messages and snapshot rule, against the
reference's own loop (``yolozu.tta.integration.run_ttt``) where it decides the same question."""
from __future__ import annotations

import math

import pytest
from yolozu.tta.config import TTTConfig

from yolozu_ttt import guards


def config(**kw) -> TTTConfig:
    return TTTConfig(**{"enabled": True, "method": "tent", **kw})


def entry(**kw) -> dict:
    return {"grad_norm": 1.0, "grad_norm_clipped": 1.0, "update_norm": 0.1, "total_update_norm": 0.2, **kw}


@pytest.mark.parametrize("kw,expected", [
    ({}, True),  # the defaults: rollback on, the non-finite guard on
    ({"rollback_on_stop": False, "stop_on_non_finite": True}, False),
    ({"rollback_on_stop": True, "stop_on_non_finite": True}, True),
    ({"rollback_on_stop": True, "stop_on_non_finite": False}, False),
    ({"rollback_on_stop": True, "stop_on_non_finite": False, "max_update_norm": 1.0}, True),
    ({"rollback_on_stop": True, "stop_on_non_finite": False, "max_loss_increase": 0.5}, True),
])
def test_a_snapshot_is_kept_only_when_a_stop_can_roll_back(kw, expected):
    assert guards.needs_snapshot(config(**kw)) is expected


def test_non_finite_fields_in_the_references_order_only_with_the_guard_on():
    bad = entry(update_norm=math.nan, grad_norm=math.inf)
    assert guards.non_finite_fields(config(stop_on_non_finite=True), bad, math.nan) == ["loss", "grad_norm",
                                                                                       "update_norm"]
    assert guards.non_finite_fields(config(stop_on_non_finite=False), bad, math.nan) == []
    assert guards.non_finite_fields(config(stop_on_non_finite=True), entry(grad_norm_clipped=None), 1.0) == []


def test_the_first_guard_tripped_wins_in_the_references_order():
    cfg = config(stop_on_non_finite=True, max_update_norm=0.05, max_total_update_norm=0.1, max_loss_ratio=1.5,
                 max_loss_increase=0.1)
    assert guards.stop_reason(cfg, entry(update_norm=math.nan), 1.0, 1.0) == ("non_finite_metrics", ["update_norm"])
    assert guards.stop_reason(cfg, entry(), 9.0, 1.0)[0] == "max_update_norm_exceeded"
    assert guards.stop_reason(cfg, entry(update_norm=0.01), 9.0, 1.0)[0] == "max_total_update_norm_exceeded"
    assert guards.stop_reason(cfg, entry(update_norm=0.01, total_update_norm=0.01), 9.0, 1.0)[0] == \
        "max_loss_ratio_exceeded"
    assert guards.stop_reason(cfg, entry(update_norm=0.01, total_update_norm=0.01), 1.2, 1.0)[0] == \
        "max_loss_increase_exceeded"
    assert guards.stop_reason(cfg, entry(update_norm=0.01, total_update_norm=0.01), 1.05, 1.0) == (None, [])
    # the loss-ratio guard needs a positive initial loss
    assert guards.stop_reason(config(max_loss_ratio=1.5), entry(), 9.0, 0.0) == (None, [])


def test_a_stop_is_marked_in_the_entry_and_the_warnings():
    warnings: list[str] = []
    e = entry()
    guards.mark_stop(e, "non_finite_metrics", ["loss"], config(rollback_on_stop=True), warnings)
    assert e["rolled_back"] is True and e["stop_reason"] == "non_finite_metrics" and e["non_finite_fields"] == ["loss"]
    assert warnings == ["non_finite_metrics", "non_finite_fields:loss"]
    e, warnings = entry(), []
    guards.mark_stop(e, "max_update_norm_exceeded", [], config(rollback_on_stop=False), warnings)
    assert e["rolled_back"] is False and e["non_finite_fields"] is None and warnings == ["max_update_norm_exceeded"]
