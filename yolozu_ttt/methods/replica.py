"""The protocol of a method's sample-parallel form (``yolozu_ttt.parallel`` runs it): what makes a
method sample-parallel, and how its step's read column splits into its values and the update's
stats. In its own module so that the method files and ``parallel`` both import it and neither
imports the other."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..common import STAT_KEYS, StepStats
from ..engine import StepSpec, read
from .loop import RunContext, StepOutcome

if TYPE_CHECKING:
    from ..parallel import Replicas


class ReplicaMethod:
    """What makes a method sample-parallel: its K-replica step and its per-image outcome.

    ``run_group`` owns what every method shares (contexts, snapshots, guards per replica, the one
    read per step, graph mode, loading replica i for ``on_image``); a method's replica class supplies:

    - ``why_not(session, loop)``: why these runs cannot be adapted K at once (None: they can);
    - ``begin(replicas, records, ctxs)``: per-group state (e.g. per-image generators; stacked state
      the step reads lives in ``replicas.kept``, the same tensors every group);
    - ``inputs(x, step)``: what step ``step`` takes, drawn on the host before it (the stacked images
      ``x`` (K, B, ...); MIM's grids): a graph's static inputs, whose layouts key its captures;
    - ``update_spec(step)``: the step's :class:`~yolozu_ttt.engine.StepSpec` (the method's, as its
      run alone steps; CoTTA's restore steps their own), with ``seeds`` (each replica's restore
      seed, or None) and ``backup`` (SAR's ascent keeps its backup in the snapshot rows);
    - ``step(replicas, *inputs)``: the passes and ``replicas.update()`` (the engine's K-row step),
      device work only: nothing read, and no host state that a later step reads or that changes
      its launches (graph mode replays it): a (rows, K) float64 tensor, column i image i's values,
      the update's stats last (:func:`split`);
    - ``outcome(i, column, step)``: image i's :class:`StepOutcome` from its read column (per-image
      method state, e.g. EATA's skip streak, is the replica class's, indexed by i);
    - ``after_step(i, outcome)``: after image i's kept step;
    - ``trains``: the passes put the model in training mode (Tent's); else they run in the mode it
      was given, as the loop runs MIM, CoTTA, EATA and SAR.
    """

    name = ""
    trains = False
    #: set by ``run_group``: the group's steps are captured (graph mode), so nothing is read in them
    captured = False
    #: each replica's restore seed (CoTTA's), or None
    seeds: list[int] | None = None
    #: the step's snapshot rows hold the method's backup (SAR's ascent), not the update's pre-step values
    backup = False

    def __init__(self, session: Any, loop: Any):
        self.session, self.loop, self.config, self.method = session, loop, session.config, loop.method

    def read_before_backward(self, *values: Any) -> list[float] | None:
        """The loop's ``Method.read_before_backward`` for the group: eagerly one read of ``values``,
        where a decision on them saves the group's backward; a captured group reads nothing (None)."""
        return None if self.captured else read(*values)

    def why_not(self) -> str | None:
        return None

    def begin(self, replicas: Replicas, records: list[Any], ctxs: list[RunContext]) -> None:
        """Per-group state before the first step."""

    def inputs(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        return (x,)

    def update_spec(self, step: int) -> StepSpec:
        """Step ``step``'s update options: the method's, as its run alone takes them."""
        return self.method.spec

    def step(self, replicas: Replicas, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def outcome(self, i: int, column: list[float], step: int) -> StepOutcome:
        raise NotImplementedError

    def after_step(self, i: int, outcome: StepOutcome) -> None:
        """After image i's kept step (the loop's ``method.after_step``)."""


def split(column: list[float]) -> tuple[list[float], StepStats]:
    """A read column of ``ReplicaMethod.step``'s table: (the method's values, the update's stats)."""
    n = len(STAT_KEYS)
    return column[:-n], StepStats(*column[-n:])
