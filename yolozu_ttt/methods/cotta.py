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
from ..seam import integration as _ref

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
    preclip_norm_reported = True

    def select(self) -> list[torch.Tensor]:
        config = self.config
        self.aug_set = tuple(config.cotta_augmentations or ("identity", "hflip"))
        self.aggregation = str(config.cotta_aggregation)
        self.restore_interval = max(1, int(config.cotta_restore_interval))
        self.restore_prob = float(config.cotta_restore_prob)
        self.ema_momentum = float(config.cotta_ema_momentum)
        return super().select()

    def update_options(self) -> dict[str, Any]:
        return {"ema_momentum": self.ema_momentum}

    def start(self) -> None:
        self.teacher, self.teacher_values = build_teacher(self.ctx.model, self.arena, self.engine)
        self.meta: dict[int, tuple[dict, dict]] = {}  # input rank: (student, teacher) branch metadata

    def reset(self, ctx: Any) -> None:
        """A session's next run: the teacher back to the (reset) student."""
        super().reset(ctx)
        self.arena.refill_copies(self.teacher_values)

    def begin(self, run: Any, ctxs: list[Any]) -> None:
        """Each image's teacher (``run.teacher``: a run's is the copy ``start`` bound; a group's,
        stacked rows kept beside its replicas, each its own student's start) and restore seed, as
        its run alone takes it (``config.seed``, else one draw of torch's global RNG, image by
        image); the run's spec carries its one seed (a group's rows take theirs, ``restore_seeds``)."""
        super().begin(run, ctxs)
        self.net = run.teacher(self.teacher)
        self.restore_seeds = [restore_seed(self.config) if self.restore_prob > 0.0 else 0 for _ in ctxs]
        self.spec = self.spec.replace(restore_seed=self.restore_seeds[0])
        self.restore_spec = self.spec.replace(restore_prob=self.restore_prob)  # counter: the step's

    def close(self) -> None:
        self.engine.bind_teacher(None)

    def restores(self, step: int) -> bool:
        return (step + 1) % self.restore_interval == 0 and self.restore_prob > 0.0

    def inputs(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor]:
        self.rank = x.ndim  # the branch metadata's key (see ``passes``)
        return (x,)

    def student(self, net: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's aggregated logits over the augmented views and their entropy."""
        logits, self.student_meta = forward(net, x, self.aug_set, self.aggregation)
        return entropy(logits), logits

    def consistency(self, net: Any, x: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
        """One image's teacher forward and its mean squared difference from the student's logits."""
        logits, teacher_meta = forward(net, x, self.aug_set, self.aggregation)
        self.meta[x.ndim] = (self.student_meta, teacher_meta)
        return ((student_logits - logits) ** 2).mean()

    def passes(self, run: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The student's augmented forward, entropy and backward, then the teacher's forward and the
        consistency: (loss, consistency). The branches' metadata (which depends on the input's
        rank only: hflip needs 4-D) is kept by rank: a step whose passes did not run on the host
        (``capturable``) finds it."""
        loss, logits = run.backward(self.student, x)
        return loss, run.forward(self.consistency, x, logits.detach(), module=self.net)

    def update(self, step: int):
        """The teacher EMA every step; the restore every ``restore_interval`` steps."""
        return self.restore_spec if self.restores(step) else self.spec

    def outcome(self, stats: Any, values: list[float], step: int, i: int) -> StepOutcome:
        loss_value, consistency_value = values
        # p >= 1 restores every element: the exact count even where a float32 stat would round it
        restored = 0
        if self.restores(step):
            restored = self.arena.numel if self.restore_prob >= 1.0 else int(round(stats.restored))
        aug_meta, teacher_meta = self.meta[self.rank]
        forwards = int(aug_meta.get("branches") or 0) + int(teacher_meta.get("branches") or 0)
        return StepOutcome(loss=loss_value, stats=stats, forwards=forwards, metrics={
            "ema_momentum": self.ema_momentum, "restore_prob": self.restore_prob,
            "restore_interval": self.restore_interval, "restored_count": restored,
            "consistency_mse": float(consistency_value), "aug": copy.deepcopy(aug_meta),
        })


METHOD = CoTTA
