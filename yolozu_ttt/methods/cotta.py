"""CoTTA on the fused engine: entropy over augmented views, an EMA teacher and stochastic restore.

The teacher shares the student's unselected (never updated) parameters instead of copying them, and its
copies of the selected ones are views of one flat buffer per arena group, bound to the update
engine: Adam, the teacher EMA and the restore run in one fused pass. The teacher forward only
reads the teacher, so it runs before that pass; the results are the reference's order's.

The restore draws come from a counter-based RNG keyed by (seed, step, group), not from
``torch.rand``: the same probability and determinism for a seed, other elements than the
reference's. Without ``config.seed`` one seed per run is drawn from torch's global RNG.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch._utils import _unflatten_dense_tensors
from yolozu.tta import integration as _ref

from .. import guards
from ..arena import ParamArena
from ..engine import UpdateEngine
from ..run import BufferSnapshot, RunContext
from .eata import select_params
from .sar import entropy

SEED_BITS = 63


def build_teacher(model: torch.nn.Module, arena: ParamArena) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """Eval-mode deep copy of ``model`` sharing its unselected parameters; the selected ones are
    non-trainable copies bound as their arena group's teacher: one tensor each for the C++ engine
    (small allocations the C library recycles), views of one flat buffer per group for Triton.
    Returns the teacher and the tensors that hold its selected parameters."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    held, bound = [], []
    with torch.no_grad():
        for g in arena.groups:
            if g.backend == "cpp":
                pieces = [p.detach().clone() for p in g.params]
                views, buffer = pieces, pieces
                held += pieces
            else:
                buffer = g.flat.clone()
                views = _unflatten_dense_tensors(buffer, g.params)
                held.append(buffer)
            bound.append(buffer)
            for p, view in zip(g.params, views):
                memo[id(p)] = torch.nn.Parameter(view, requires_grad=False)
    teacher = copy.deepcopy(model, memo)
    teacher.eval()
    for g, buffer in zip(arena.groups, bound):
        g.engine.set_teacher(buffer)
    return teacher, held


def restore_seed(config: Any) -> int:
    """The restore RNG's seed: ``config.seed``, else one draw from torch's global RNG."""
    if config.seed is not None:
        return int(config.seed) & 0xFFFFFFFFFFFFFFFF
    return int(torch.randint(0, 2 ** SEED_BITS - 1, (1,)).item())


def forward(model: Any, x: torch.Tensor, aug_set: tuple, aggregation: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Aggregated logits over the augmented branches (YOLOZU's own function) and their metadata."""
    return _ref._forward_cotta_augs(model, x, augmentations=aug_set, aggregation=aggregation)


def run(ctx: RunContext) -> None:
    """CoTTA steps with YOLOZU's metrics, guards and rollback."""
    config, model = ctx.config, ctx.model
    params = select_params(ctx)
    aug_set = tuple(config.cotta_augmentations or ("identity", "hflip"))
    aggregation = str(config.cotta_aggregation)
    restore_interval = max(1, int(config.cotta_restore_interval))
    restore_prob = float(config.cotta_restore_prob)
    ema_momentum = float(config.cotta_ema_momentum)
    seed = restore_seed(config) if restore_prob > 0.0 else 0
    snapshot = guards.needs_snapshot(config)
    with ParamArena(model, params) as arena:
        engine = UpdateEngine(arena, lr=config.lr, max_grad_norm=config.max_grad_norm)
        buffers = BufferSnapshot(model) if bool(config.rollback_on_stop) else None
        teacher, _ = build_teacher(model, arena)
        try:
            for step_idx in range(ctx.steps):
                x = ctx.batches[step_idx % len(ctx.batches)]
                if not torch.is_tensor(x):
                    raise RuntimeError("CoTTA requires tensor batches from adapter.build_loader()")
                if buffers is not None:
                    buffers.save()
                arena.zero_grad()
                student_logits, aug_meta = forward(model, x, aug_set, aggregation)
                ctx.forward_calls += int(aug_meta.get("branches") or 0)
                loss = entropy(student_logits)
                arena.backward(loss)
                ctx.backward_calls += 1
                with torch.no_grad():
                    teacher_logits, teacher_meta = forward(teacher, x, aug_set, aggregation)
                    ctx.forward_calls += int(teacher_meta.get("branches") or 0)
                    consistency = ((student_logits.detach() - teacher_logits) ** 2).mean()
                restore = (step_idx + 1) % restore_interval == 0 and restore_prob > 0.0
                stats, (loss_value, consistency_value) = engine.step(
                    write_snapshot=snapshot, extra=(loss, consistency), ema_momentum=ema_momentum,
                    restore_prob=restore_prob if restore else 0.0, restore_seed=seed, restore_counter=step_idx)
                ctx.optimizer_steps += 1
                # p >= 1 restores every element: the exact count even where a float32 stat would round it
                restored = (arena.numel if restore_prob >= 1.0 else int(round(stats["restored"]))) if restore else 0
                entry: dict[str, Any] = {
                    "step": int(step_idx),
                    "loss": float(loss_value),
                    "grad_norm": float(stats["grad_norm"]),
                    "grad_norm_clipped": float(stats["grad_norm"]) if config.max_grad_norm is not None else None,
                    "update_norm": float(stats["update_norm"]),
                    "total_update_norm": float(stats["total_update_norm"]),
                    "rolled_back": False,
                    "ema_momentum": ema_momentum,
                    "restore_prob": restore_prob,
                    "restore_interval": restore_interval,
                    "restored_count": restored,
                    "consistency_mse": float(consistency_value),
                    "aug": aug_meta,
                }
                if ctx.finish_step(entry, float(loss_value), arena=arena, buffers=buffers):
                    break
        finally:
            for g in arena.groups:
                if g.engine is not None:
                    g.engine.set_teacher(None)
