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
from typing import Any, Callable

import torch
from yolozu.tta import integration as _ref

from ..arena import ParamArena
from ..engine import UpdateEngine
from .loop import Method, StepOutcome, entropy

SEED_BITS = 63


def build_teacher(model: torch.nn.Module, arena: ParamArena,
                  engine: UpdateEngine) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """Eval-mode deep copy of ``model`` sharing its unselected parameters; the selected ones are
    non-trainable copies bound to the engine as the teacher the fused EMA updates (one tensor each
    on the C++ engine, views of one flat buffer per group for Triton). Returns the teacher and the
    tensors that hold its selected parameters."""
    buffers, copies = arena.value_copies()
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    memo.update({key: torch.nn.Parameter(value, requires_grad=False) for key, value in copies.items()})
    teacher = copy.deepcopy(model, memo)
    teacher.eval()
    engine.bind_teacher(buffers)
    return teacher, [t for b in buffers for t in (b if isinstance(b, list) else [b])]


def restore_seed(config: Any) -> int:
    """The restore RNG's seed: ``config.seed``, else one draw from torch's global RNG."""
    if config.seed is not None:
        return int(config.seed) & 0xFFFFFFFFFFFFFFFF
    return int(torch.randint(0, 2 ** SEED_BITS - 1, (1,)).item())


def forward(model: Any, x: torch.Tensor, aug_set: tuple, aggregation: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Aggregated logits over the augmented branches (YOLOZU's own function) and their metadata."""
    return _ref._forward_cotta_augs(model, x, augmentations=aug_set, aggregation=aggregation)


class CoTTA(Method):
    """Entropy over augmented views with an EMA teacher and a stochastic restore to the start."""

    batch_error = "CoTTA requires tensor batches from adapter.build_loader()"

    def select(self) -> list[torch.Tensor]:
        config = self.config
        self.aug_set = tuple(config.cotta_augmentations or ("identity", "hflip"))
        self.aggregation = str(config.cotta_aggregation)
        self.restore_interval = max(1, int(config.cotta_restore_interval))
        self.restore_prob = float(config.cotta_restore_prob)
        self.ema_momentum = float(config.cotta_ema_momentum)
        params = super().select()
        self.seed = restore_seed(config) if self.restore_prob > 0.0 else 0
        return params

    def start(self, arena: ParamArena, engine: UpdateEngine) -> None:
        self.teacher, _ = build_teacher(self.ctx.model, arena, engine)
        self.meta: dict[int, tuple[dict, dict]] = {}  # input rank: (student, teacher) branch metadata

    def close(self, arena: ParamArena, engine: UpdateEngine) -> None:
        engine.bind_teacher(None)

    def passes(self, x: torch.Tensor, arena: ParamArena, zero_grad: Callable[[], None]) -> tuple[torch.Tensor, ...]:
        """The student's augmented forward, entropy and backward, then the teacher's forward and the
        consistency: (loss, consistency) as device scalars. The branches' metadata (which depends on
        the input's rank only: hflip needs 4-D) is kept by rank, so a replayed graph finds it."""
        zero_grad()
        student_logits, aug_meta = forward(self.ctx.model, x, self.aug_set, self.aggregation)
        loss = entropy(student_logits)
        arena.backward(loss)
        with torch.no_grad():
            teacher_logits, teacher_meta = forward(self.teacher, x, self.aug_set, self.aggregation)
            consistency = ((student_logits.detach() - teacher_logits) ** 2).mean()
        self.meta[x.ndim] = (aug_meta, teacher_meta)
        return loss, consistency

    def step_body(self, arena: ParamArena, engine: UpdateEngine):
        """The teacher, EMA and restore are device work: the whole step can be captured (a restore
        step and a plain one are two graphs)."""
        return lambda x: self.passes(x, arena, arena.clear_grads)

    def adapt(self, x: Any, step: int, arena: ParamArena, engine: UpdateEngine, write_snapshot: bool) -> StepOutcome:
        restore = (step + 1) % self.restore_interval == 0 and self.restore_prob > 0.0
        update = dict(ema_momentum=self.ema_momentum, restore_prob=self.restore_prob if restore else 0.0,
                      restore_seed=self.seed, restore_counter=step)
        if self.step_graph is not None:
            stats, (loss_value, consistency_value) = self.step_graph.step((x,), write_snapshot=write_snapshot, **update)
        else:
            stats, (loss_value, consistency_value) = engine.step(
                write_snapshot=write_snapshot, extra=self.passes(x, arena, arena.zero_grad), **update)
        # p >= 1 restores every element: the exact count even where a float32 stat would round it
        restored = (arena.numel if self.restore_prob >= 1.0 else int(round(stats.restored))) if restore else 0
        aug_meta, teacher_meta = self.meta[x.ndim]
        forwards = int(aug_meta.get("branches") or 0) + int(teacher_meta.get("branches") or 0)
        return StepOutcome(loss=loss_value, stats=stats, forwards=forwards, metrics={
            "grad_norm_clipped": float(stats.grad_norm) if self.config.max_grad_norm is not None else None,
            "ema_momentum": self.ema_momentum, "restore_prob": self.restore_prob,
            "restore_interval": self.restore_interval, "restored_count": restored,
            "consistency_mse": float(consistency_value), "aug": copy.deepcopy(aug_meta),
        })


METHOD = CoTTA
