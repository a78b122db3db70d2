"""Every method's sample-parallel form (``yolozu_ttt.parallel`` runs it): the method's own step
driven over a group's K replicas, and how its read column splits into its values and the update's
stats. In its own module so that ``parallel`` imports it and the method files need neither."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..common import STAT_KEYS, StepStats
from ..engine import StepSpec
from .loop import RunContext, StepOutcome

if TYPE_CHECKING:
    from ..parallel import Replicas


class ReplicaMethod:
    """A method's step over a group's K replicas (``yolozu_ttt.parallel.run_group`` drives it): the
    method's own ``passes`` on the group's ``Replicas`` (the same calls as a run's ``Alone``, K
    images at once under vmap), then the engine's K-row update, as one (rows, K) table read once;
    image i's outcome from its column. ``run_group`` owns the rest (contexts, snapshots, guards
    per replica, graph mode, loading replica i for ``on_image``).

    - ``why_not()``: why these runs cannot be adapted K at once (the method's ``why_not_parallel``);
    - ``begin(replicas, records, ctxs)``: the method's per-image state (``Method.begin``) and what
      each image's steps draw on the host (``Method.inputs``), drawn now image by image as its run
      alone draws them;
    - ``inputs(x, step)``: step ``step``'s stacked inputs (``x``: the stacked images (K, B, ...)),
      a graph's static inputs, whose layouts key its captures;
    - ``update_spec(step)``: the step's :class:`~yolozu_ttt.engine.StepSpec` (the method's), with
      ``seeds`` (each replica's restore seed, the method's ``restore_seeds``) and ``backup`` (the
      method's ``snapshot_backup``: SAR's ascent keeps its backup in the snapshot rows);
    - ``step(replicas, *inputs)``: device work only (graph mode replays it): the passes and
      ``replicas.update()``, a (rows, K) float64 tensor, column i image i's values, the update's
      stats last (:func:`split`);
    - ``outcome(i, column, step)`` and ``after_step(i, outcome)``: the method's, for image i.
    """

    #: set by ``run_group``: the group's steps are captured (graph mode), so nothing is read in them
    captured = False

    def __init__(self, session: Any, loop: Any):
        self.session, self.loop, self.config, self.method = session, loop, session.config, loop.method
        self.name = str(session.config.method or "tent").lower()
        self.seeds: list[int] | None = None  #: each replica's restore seed (CoTTA's), or None
        self.backup = False  #: the step's snapshot rows hold the method's backup (SAR's ascent)
        self.drawn: list[list[tuple[Any, ...]]] | None = None

    def why_not(self) -> str | None:
        return self.method.why_not_parallel()

    def begin(self, replicas: Replicas, records: list[Any], ctxs: list[RunContext]) -> None:
        """Per-group state before the first step."""
        m = self.method
        m.begin(replicas, ctxs)
        self.seeds, self.backup = m.restore_seeds, m.snapshot_backup
        self.drawn = [[m.inputs(c.batches[s % len(c.batches)], i)[1:] for s in range(c.steps)]
                      for i, c in enumerate(ctxs)]

    def inputs(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        if not self.drawn or not self.drawn[0][step]:
            return (x,)
        return (x, *(torch.stack(parts) for parts in zip(*(d[step] for d in self.drawn))))

    def update_spec(self, step: int) -> StepSpec:
        """Step ``step``'s update options: the method's, as its run alone takes them; with ``seeds``,
        its own restore seed unused (each row's is its image's): 0, so the spec, a graph's key, is
        every group's."""
        spec = self.method.update(step)
        return spec if self.seeds is None else spec.replace(restore_seed=0)

    def step(self, replicas: Replicas, *inputs: torch.Tensor) -> torch.Tensor:
        k = replicas.k
        values = self.method.passes(replicas, *inputs)
        stats = replicas.update()
        return torch.cat([*(v.reshape(k, -1).t().double() for v in values), stats])

    def outcome(self, i: int, column: list[float], step: int) -> StepOutcome:
        values, stats = split(column)
        return self.method.outcome(stats, values, step, i)

    def after_step(self, i: int, outcome: StepOutcome) -> None:
        """After image i's kept step (the loop's ``method.after_step``)."""
        self.method.after_step(outcome, i)


def split(column: list[float]) -> tuple[list[float], StepStats]:
    """A read column of ``ReplicaMethod.step``'s table: (the method's values, the update's stats)."""
    n = len(STAT_KEYS)
    return column[:-n], StepStats(*column[-n:])
