"""EATA on the fused engine: entropy over the selected samples, anchored to the pre-adaptation weights.

The anchor term ``lambda * sum_i mean((theta_i - theta_i^0)^2)`` and its gradient are computed
inside the fused update (``engine.step(anchor_lambda=...)``) instead of by autograd over every
parameter; the reported loss is ``adapt_loss + lambda * anchor_loss`` as in the reference.
"""
from __future__ import annotations

from typing import Any

import torch
from yolozu.tta import integration as _ref
from yolozu.tta.ttt_mim import select_parameters

from .. import guards, ops
from ..arena import ParamArena
from ..engine import UpdateEngine, engine_module
from ..run import BufferSnapshot, RunContext

RATIO_STOP = "eata_selected_ratio_below_min"
SKIP_STOP = "eata_max_skip_streak_exceeded"


def select_params(ctx: RunContext) -> list[torch.Tensor]:
    """The reference's parameter selection, checks and count (EATA and SAR)."""
    config = ctx.config
    params = select_parameters(ctx.model, update_filter=str(config.update_filter), include=config.include,
                               exclude=config.exclude)
    if not params:
        raise RuntimeError("no parameters selected for TTT")
    torch.optim.Adam(params, lr=float(config.lr))  # the reference's optimizer checks (e.g. lr < 0)
    ctx.updated_param_count = _ref._count_unique_params(params)
    return params


def check_batch(x: Any) -> None:
    """The reference's batch checks and messages."""
    if not torch.is_tensor(x):
        raise RuntimeError("EATA requires tensor batches from adapter.build_loader()")
    if x.ndim == 0:
        raise RuntimeError("EATA requires batched tensor input")


def sample_signals(logits: torch.Tensor, conf_min: float):
    """Per-sample ``(conf, entropy, valid)`` in one fused pass; other inputs take the reference."""
    if logits.ndim >= 2 and logits.is_floating_point():
        return ops.entropy_stats(logits, conf_min)
    return _ref._eata_sample_signals(logits, conf_min=conf_min)


def select_samples(config: Any, conf: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The samples passing the confidence, entropy-band and valid-detection thresholds."""
    return ((conf >= float(config.eata_conf_min)) & (entropy >= float(config.eata_entropy_min))
            & (entropy <= float(config.eata_entropy_max)) & (valid >= float(int(config.eata_min_valid_dets))))


def summary(mask: torch.Tensor, conf: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """Selected count and the mean conf / entropy / valid detections, in one host read."""
    if conf.numel() == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return torch.stack([mask.sum().double(), conf.mean().double(), entropy.mean().double(),
                        valid.mean().double()]).tolist()


def adapt_loss(logits: torch.Tensor, mask: torch.Tensor, count: int, batch: int) -> torch.Tensor:
    """Mean entropy over the rows of the selected samples (``logits.sum() * 0`` when there are none)."""
    rows = logits if count == batch else logits[mask]
    if rows.numel() == 0:
        return logits.sum() * 0.0
    return ops.entropy_loss(rows)


def anchor_value(arena: ParamArena) -> Any:
    """``sum_i mean((theta_i - theta_i^0)^2)`` without changing anything (a float, or a device tensor)."""
    return engine_module(arena).grad_stats([g.engine for g in arena.groups], 0.0, anchor_value=True)[1]


def mark_all_grads(arena: ParamArena) -> None:
    """Every selected parameter has a grad: the reference's anchor term reaches them all, even at lambda 0."""
    for g in arena.groups:
        g.has_grad[:] = b"\x01" * len(g.has_grad)


def skip(ctx: RunContext, entry: dict[str, Any], streak: int, total_update_norm: float) -> bool:
    """Record a step with nothing selected; True when the skip streak ends the run."""
    entry.update({
        "skipped": True, "skip_reason": "empty_selected_set", "skip_streak": int(streak), "loss": None,
        "anchor_loss": 0.0, "adapt_loss": 0.0, "grad_norm": None, "grad_norm_clipped": None,
        "update_norm": 0.0, "total_update_norm": float(total_update_norm),
    })
    ctx.step_metrics.append(entry)
    ctx.warnings.append("eata_empty_selected_set")
    if streak <= max(0, int(ctx.config.eata_max_skip_streak)):
        return False
    ctx.stopped_early, ctx.stop_reason = True, SKIP_STOP
    ctx.warnings.append(SKIP_STOP)
    entry["stop_reason"] = SKIP_STOP
    return True


def run(ctx: RunContext) -> None:
    """EATA steps with YOLOZU's selection, skips, anchor, metrics, guards and rollback."""
    config, model = ctx.config, ctx.model
    params = select_params(ctx)
    lam = float(config.eata_anchor_lambda)
    ratio_min = float(config.eata_selected_ratio_min)
    snapshot = guards.needs_snapshot(config) or (bool(config.rollback_on_stop) and ratio_min > 0.0)
    with ParamArena(model, params) as arena:
        engine = UpdateEngine(arena, lr=config.lr, max_grad_norm=config.max_grad_norm)
        buffers = BufferSnapshot(model) if bool(config.rollback_on_stop) else None
        total_update_norm, streak = 0.0, 0
        for step_idx in range(ctx.steps):
            x = ctx.batches[step_idx % len(ctx.batches)]
            check_batch(x)
            if buffers is not None:
                buffers.save()
            logits = _ref._extract_logits(model(x))
            ctx.forward_calls += 1
            if logits.ndim == 0:
                raise RuntimeError("EATA logits must have batch dimension")
            conf, entropy, valid = sample_signals(logits, float(config.eata_conf_min))
            mask = select_samples(config, conf, entropy, valid)
            batch = int(conf.shape[0]) if conf.ndim >= 1 else 1
            count, mean_conf, mean_entropy, mean_valid = summary(mask, conf, entropy, valid)
            count = int(count)
            ratio = float(count) / float(max(1, batch))
            entry: dict[str, Any] = {
                "step": int(step_idx), "selected_count": count, "batch_count": batch, "selected_ratio": ratio,
                "mean_conf": mean_conf, "mean_entropy": mean_entropy, "mean_valid_dets": mean_valid,
                "rolled_back": False,
            }
            if count <= 0:
                streak += 1
                if skip(ctx, entry, streak, total_update_norm):
                    break
                continue
            streak = 0
            loss = adapt_loss(logits, mask, count, batch)
            arena.zero_grad()
            if loss.requires_grad:  # the reference's anchor term always makes its loss differentiable
                arena.backward(loss)
            ctx.backward_calls += 1
            mark_all_grads(arena)
            anchor = anchor_value(arena) if lam == 0.0 else None
            extra = (loss, anchor) if torch.is_tensor(anchor) else (loss,)
            stats, values = engine.step(anchor_lambda=lam, write_snapshot=snapshot, extra=extra)
            ctx.optimizer_steps += 1
            total_update_norm = stats["total_update_norm"]
            adapt_value = values[0]
            anchor_loss = values[1] if len(values) > 1 else (stats["anchor_loss"] if anchor is None else anchor)
            loss_value = adapt_value + lam * anchor_loss
            entry.update({
                "skipped": False, "loss": float(loss_value), "adapt_loss": float(adapt_value),
                "anchor_loss": float(anchor_loss), "anchor_lambda": lam, "grad_norm": float(stats["grad_norm"]),
                "grad_norm_clipped": float(stats["grad_norm"]) if config.max_grad_norm is not None else None,
                "update_norm": float(stats["update_norm"]), "total_update_norm": float(total_update_norm),
            })
            if ctx.finish_step(entry, float(loss_value), arena=arena, buffers=buffers,
                               method_stop=RATIO_STOP if ratio < ratio_min else None):
                break
