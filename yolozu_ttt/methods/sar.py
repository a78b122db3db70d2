"""SAR on the fused engine: sharpness-aware entropy minimisation in two forward/backward passes.

First pass: grads into the arena, grad norm and clip on the flat buffers, then one fused ascent
step that writes the pre-step snapshot as its backup. Second pass at the perturbed point, restore
from the snapshot, and Adam on the second grads (unclipped, like the reference).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from yolozu.tta import integration as _ref

from .. import guards, ops
from ..arena import ParamArena
from ..engine import UpdateEngine, engine_module
from ..run import BufferSnapshot, RunContext
from .eata import select_params


def entropy(logits: Any) -> torch.Tensor:
    """Mean softmax entropy (fused op); other inputs take the reference (and its errors)."""
    if isinstance(logits, torch.Tensor) and logits.ndim >= 1 and logits.is_floating_point():
        return ops.entropy_loss(logits)
    return _ref._entropy_loss_from_logits(logits)


def pass_loss(model: Any, x: torch.Tensor, arena: ParamArena) -> torch.Tensor:
    """Forward, entropy and backward into the arena's (zeroed) grad buffers."""
    arena.zero_grad()
    loss = entropy(_ref._extract_logits(model(x)))
    arena.backward(loss)
    return loss


def grad_norm_and_clip(arena: ParamArena, max_grad_norm: float | None) -> Any:
    """Pre-clip grad norm (float or device scalar); clips the flat grads like ``clip_grad_norm_``."""
    norm = engine_module(arena).grad_stats([g.engine for g in arena.groups], 0.0)[0]
    if max_grad_norm is None:
        return norm
    total = norm if torch.is_tensor(norm) else torch.tensor(norm, dtype=torch.float32)
    coef = (float(max_grad_norm) / (total + 1e-6)).clamp(max=1.0)  # torch's fp32 expression
    if torch.is_tensor(norm) or float(coef) != 1.0:
        with torch.no_grad():
            for g in arena.groups:
                g.grad.mul_(coef.to(g.grad.device))
    return norm


def poison(arena: ParamArena) -> None:
    """The reference's ascent with a NaN direction norm: back up, then every param with a grad is NaN."""
    arena.hold_snapshot()
    arena.save_snapshot()
    with torch.no_grad():
        for g in arena.groups:
            for flag, offset, size in zip(g.has_grad, g.offsets, g.sizes):
                if flag:
                    g.flat[offset:offset + size].fill_(float("nan"))


def perturb(arena: ParamArena, rho: float, adaptive: bool, grad_norm: Any) -> tuple[float, bool]:
    """Ascent step (snapshot = backup) from the clipped first grads; returns (pre-clip grad norm, applied)."""
    if rho <= 0.0:
        return float(grad_norm), False
    arena.hold_snapshot()  # the ascent's backup, kept through the second pass
    out = engine_module(arena).sar_perturb([g.engine for g in arena.groups], rho, bool(adaptive))
    if torch.is_tensor(out):
        grad_norm, direction_norm, applied = torch.cat([torch.as_tensor(grad_norm, device=out.device).reshape(1),
                                                        out.reshape(-1)]).tolist()
    else:
        direction_norm, applied = out
    applied = bool(applied)
    if not applied and math.isnan(direction_norm):
        poison(arena)
        applied = True
    return float(grad_norm), applied


def run(ctx: RunContext) -> None:
    """SAR steps with YOLOZU's metrics, guards and rollback."""
    config, model = ctx.config, ctx.model
    params = select_params(ctx)
    rho, adaptive = float(config.sar_rho), bool(config.sar_adaptive)
    first_step_scale = float(config.sar_first_step_scale)
    rho_value = max(0.0, rho) * max(0.0, first_step_scale)
    snapshot = guards.needs_snapshot(config)
    with ParamArena(model, params) as arena:
        arena.keep_snapshot = rho_value > 0.0  # the backup lives through every second pass anyway
        engine = UpdateEngine(arena, lr=config.lr)  # the reference does not clip the second grads
        buffers = BufferSnapshot(model) if bool(config.rollback_on_stop) else None
        for step_idx in range(ctx.steps):
            x = ctx.batches[step_idx % len(ctx.batches)]
            if not torch.is_tensor(x):
                raise RuntimeError("SAR requires tensor batches from adapter.build_loader()")
            if buffers is not None:
                buffers.save()
            loss_first = pass_loss(model, x, arena)
            ctx.forward_calls += 1
            ctx.backward_calls += 1
            grad_norm, applied = perturb(arena, rho_value, adaptive, grad_norm_and_clip(arena, config.max_grad_norm))
            loss_second = pass_loss(model, x, arena)
            ctx.forward_calls += 1
            ctx.backward_calls += 1
            if applied:
                arena.restore_snapshot()
            stats, (first, second) = engine.step(write_snapshot=snapshot and not applied,
                                                 extra=(loss_first, loss_second))
            ctx.optimizer_steps += 1
            entry: dict[str, Any] = {
                "step": int(step_idx), "loss": float(second), "loss_first": float(first),
                "loss_second": float(second), "grad_norm": grad_norm,
                "grad_norm_clipped": grad_norm if config.max_grad_norm is not None else None,
                "update_norm": float(stats["update_norm"]), "total_update_norm": float(stats["total_update_norm"]),
                "rolled_back": False, "sar_rho": rho, "sar_rho_applied": rho_value if applied else 0.0,
                "sar_adaptive": adaptive, "sar_first_step_scale": first_step_scale,
            }
            if ctx.finish_step(entry, float(second), arena=arena, buffers=buffers):
                break
