"""The one stop/rollback policy every method shares (YOLOZU's guard order and messages)."""
from __future__ import annotations

import math
from typing import Any

NON_FINITE_KEYS = ("loss", "grad_norm", "grad_norm_clipped", "update_norm", "total_update_norm")


def needs_snapshot(config: Any) -> bool:
    """Whether a stop can roll back, so each step must keep its pre-step parameters."""
    if not bool(config.rollback_on_stop):
        return False
    return bool(config.stop_on_non_finite) or any(
        getattr(config, name) is not None
        for name in ("max_update_norm", "max_total_update_norm", "max_loss_ratio", "max_loss_increase")
    )


def non_finite_fields(config: Any, entry: dict[str, Any], loss: float) -> list[str]:
    """Names of the step's metrics that are NaN or infinite (when the guard is on)."""
    if not bool(config.stop_on_non_finite):
        return []
    values = {"loss": loss, **{k: entry.get(k) for k in NON_FINITE_KEYS[1:]}}
    return [k for k in NON_FINITE_KEYS if values[k] is not None and not math.isfinite(float(values[k]))]


def stop_reason(config: Any, entry: dict[str, Any], loss: float, initial_loss: float | None) -> tuple[str | None, list[str]]:
    """The first guard the step trips, in YOLOZU's order, and the non-finite fields."""
    bad = non_finite_fields(config, entry, loss)
    if bad:
        return "non_finite_metrics", bad
    if config.max_update_norm is not None and entry["update_norm"] > float(config.max_update_norm):
        return "max_update_norm_exceeded", bad
    if config.max_total_update_norm is not None and entry["total_update_norm"] > float(config.max_total_update_norm):
        return "max_total_update_norm_exceeded", bad
    if (config.max_loss_ratio is not None and initial_loss is not None and initial_loss > 0.0
            and loss > initial_loss * float(config.max_loss_ratio)):
        return "max_loss_ratio_exceeded", bad
    if config.max_loss_increase is not None and initial_loss is not None and loss > initial_loss + float(config.max_loss_increase):
        return "max_loss_increase_exceeded", bad
    return None, bad


def mark_stop(entry: dict[str, Any], reason: str, bad: list[str], config: Any, warnings: list[str]) -> None:
    """Record a stop in the step entry and the warnings, as YOLOZU does."""
    entry["rolled_back"] = bool(config.rollback_on_stop)
    entry["stop_reason"] = str(reason)
    entry["non_finite_fields"] = bad or None
    warnings.append(str(reason))
    if bad:
        warnings.append(f"non_finite_fields:{','.join(bad)}")
