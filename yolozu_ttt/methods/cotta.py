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
from .replica import ReplicaMethod, split
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
        params = super().select()
        self.seed = restore_seed(config) if self.restore_prob > 0.0 else 0
        return params

    def update_options(self) -> dict[str, Any]:
        return {"ema_momentum": self.ema_momentum, "restore_seed": self.seed}

    def start(self) -> None:
        self.teacher, self.teacher_values = build_teacher(self.ctx.model, self.arena, self.engine)
        self.restore_spec = self.spec.replace(restore_prob=self.restore_prob)  # counter: the step's
        self.meta: dict[int, tuple[dict, dict]] = {}  # input rank: (student, teacher) branch metadata

    def reset(self, ctx: Any) -> None:
        """A session's next run: the teacher back to the (reset) student, a fresh restore seed
        where the config has none."""
        super().reset(ctx)
        self.arena.refill_copies(self.teacher_values)
        if self.restore_prob > 0.0 and self.config.seed is None:
            self.seed = restore_seed(self.config)
            self.spec = self.spec.replace(restore_seed=self.seed)
            self.restore_spec = self.spec.replace(restore_prob=self.restore_prob)

    def close(self) -> None:
        self.engine.bind_teacher(None)

    def restores(self, step: int) -> bool:
        return (step + 1) % self.restore_interval == 0 and self.restore_prob > 0.0

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        self.rank = x.ndim  # the branch metadata's key (see ``passes``)
        return (x,)

    def passes(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The student's augmented forward, entropy and backward, then the teacher's forward and the
        consistency: (loss, consistency) as device scalars. The branches' metadata (which depends on
        the input's rank only: hflip needs 4-D) is kept by rank: a step whose passes did not run on the host (``capturable``) finds it."""
        student_logits, aug_meta = forward(self.ctx.model, x, self.aug_set, self.aggregation)
        loss = entropy(student_logits)
        self.arena.backward(loss)
        with torch.no_grad():
            teacher_logits, teacher_meta = forward(self.teacher, x, self.aug_set, self.aggregation)
            consistency = ((student_logits.detach() - teacher_logits) ** 2).mean()
        self.meta[x.ndim] = (aug_meta, teacher_meta)
        return loss, consistency

    def update(self, step: int):
        """The teacher EMA every step; the restore every ``restore_interval`` steps."""
        return self.restore_spec if self.restores(step) else self.spec

    def outcome(self, stats: Any, values: list[float], step: int) -> StepOutcome:
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


class CoTTAReplicas(ReplicaMethod):
    """CoTTA's K-replica step (``yolozu_ttt.parallel``): per replica its student's augmented forwards,
    entropy and backward, its own teacher (a stacked EMA of its own student) and its consistency;
    the EMA and the stochastic restore to its start, drawn from its own restore seed, are the
    engine's K-row step's (the teachers bound as its teacher rows). The augmentations (identity,
    hflip) draw nothing."""

    name = "cotta"

    def begin(self, replicas: Any, records: list[Any], ctxs: list[Any]) -> None:
        """Each replica's teacher at its start; its restore seed as its run alone takes it (``config.seed``,
        else one draw of torch's global RNG per image, in image order)."""
        m = self.method
        self.teachers = replicas.kept("teachers", replicas.flat)
        self.teacher_values = replicas.views(self.teachers)
        replicas.engine.bind_teacher([self.teachers.view(-1)])
        self.seeds = [restore_seed(self.config) if m.restore_prob > 0.0 else 0 for _ in records]

    def inputs(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        self.method.rank = x.ndim - 1  # the branch metadata's key (one image's rank, as ``CoTTA.inputs``)
        return (x,)

    def update_spec(self, step: int) -> Any:
        """The EMA every step; the restore every ``restore_interval`` steps (``CoTTA.update``)."""
        return self.method.update(step)

    def step(self, replicas: Any, x: torch.Tensor) -> torch.Tensor:
        """The student's passes, the teachers' forwards and consistency, then the update (Adam, the
        teachers' EMA and, on a restore step, the restore)."""
        m, meta = self.method, {}

        def student(net, image):
            logits, meta["student"] = forward(net, image, m.aug_set, m.aggregation)
            return entropy(logits), logits

        def teacher(net, image):
            logits, meta["teacher"] = forward(net, image, m.aug_set, m.aggregation)
            return logits

        losses, logits = replicas.backward_passes(student, x)
        with torch.no_grad():
            teacher_logits = replicas.map(teacher, x, module=m.teacher, values=self.teacher_values)
            consistency = ((logits - teacher_logits) ** 2).reshape(replicas.k, -1).mean(dim=1)
        m.meta[x.ndim - 1] = (meta["student"], meta["teacher"])
        return torch.cat([torch.stack([losses.double(), consistency.double()]), replicas.update()])

    def outcome(self, i: int, column: list[float], step: int) -> StepOutcome:
        values, stats = split(column)
        return self.method.outcome(stats, values, step)


METHOD = CoTTA
REPLICA = CoTTAReplicas
