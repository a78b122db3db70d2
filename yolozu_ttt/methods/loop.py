"""The one step loop every method runs in: it owns the step protocol and what methods share.

``run_steps(ctx, method)`` owns what every method does the same way: the parameter arena and the
update engine, batch choice, the norm-buffer snapshot, the counters (forward/backward/optimizer
steps, abstentions), the base step entry (``step``, ``loss``, the four norms, ``rolled_back``),
the snapshot decision and the guards (``finish_step``: keep, or stop and roll back).

Each method is written once, as one image's step: ``passes(run, *inputs)`` calls its losses
through ``run`` (``run.backward(loss, x, ...)``: ``loss(net, x, ...)`` and its backward;
``run.forward``) and hooks the engine between them (``run.engine``: EATA's gate and anchor, SAR's
clip and ascent). A run's ``run`` is an :class:`Alone` (the model itself, K = 1, no vmap); a
sample-parallel group's is its ``yolozu_ttt.parallel.Replicas`` (the same calls for K replicas at
once, under vmap; ``methods.replica.ReplicaMethod`` drives the method's step there).

One step (:meth:`Method.adapt`, the loop's, never overridden):

1. ``inputs = method.inputs(x, 0)``: what the step draws on the host (the batch; MIM's patch grid);
2. the grads are cleared (the host half ``arena.new_grads`` outside any graph, the buffers by the
   step's body), then ``values = method.passes(run, *inputs)``: device work only (forwards,
   losses, backwards into the arena), the tensors read with the step; where ``run.backward``'s
   ``worth`` read the values first and ran no backward (EATA's empty selection), no update;
3. ``spec = method.update(step)``: the fused update's :class:`~yolozu_ttt.engine.StepSpec` (built
   once per binding in ``bind``; None: this step applies nothing, Tent's abstention);
4. ``engine.step(spec, extra=values)``: the update and the step's one host read; in graph mode
   steps 2-4 are one captured graph where the method's step decides nothing on the host
   (``capturable``), replayed by ``yolozu_ttt.capture.StepGraph``;
5. ``method.outcome(stats, values, step, 0)``: the method's metrics and stop, from that read.

A method (a :class:`Method` subclass) supplies only what makes it that method: its parameter
selection, ``passes``, its update options, its per-image state (``begin``) and ``outcome``, and
flags for YOLOZU's report quirks (``preclip_norm_reported``). It never mentions graphs, grad
clearing, a backend or K.

A run, as data::

    run_ttt / TTTSession.run -> StepLoop(Method).run(ctx)
        bound at the first run, kept by a session: selection, arena, engine, spec, step graph
        later runs: parameters, norm buffers, Adam state, method state reset to the first run's start
        per run: batches, counters, base entry, guards; method.begin(Alone, [ctx])
        spec = engine.spec.replace(**method.update_options())      one frozen StepSpec per binding
        per step (Method.adapt):
          inputs = method.inputs(batch, 0)                         the batch (MIM: + its patch grid)
          eager:       new grads; [clear grads, method.passes(run, *inputs)]; engine.step(method.update(step))
          graph mode:  capture.StepGraph: copy inputs in, replay [clear grads, passes, launch]
                       (where method.capturable; graphs keyed by inputs, spec and launch)
          stats, values = the one read  ->  method.outcome(stats, values, step, 0) -> StepOutcome

Tent's ``passes`` are forward, entropy, backward; EATA adds sample selection (a gate on the update)
and the anchor (``update_options``); SAR the ascent pass; CoTTA the teacher, EMA and restore (two
specs); MIM the patch grid (``inputs``) and the reconstruction.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from ..seam import integration as _ref
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import TTTReport
from yolozu.tta.method_profiles import get_ttt_method_profile

from .. import amp, capture, guards, ops
from ..arena import ParamArena
from ..common import StepStats
from ..engine import StepSpec, UpdateEngine, read
from .checks import checked_selection

NORM_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


class BufferSnapshot:
    """Normalisation running statistics, saved before each step and restored on rollback."""

    def __init__(self, model: Any):
        try:
            named = list(model.named_buffers())
        except Exception:
            named = []
        self.buffers = [b for n, b in named if b is not None and str(n).endswith(NORM_BUFFER_SUFFIXES)]
        self.saved = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        """Copy the live buffers into the snapshot (one fused foreach copy)."""
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        """Copy the snapshot back into the live buffers."""
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)


@dataclass
class RunContext:
    """What the loop reads and writes; the report is built from it."""

    model: Any
    batches: list[Any]
    config: TTTConfig
    method: str
    steps: int
    generator: torch.Generator | None
    warnings: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    mask_ratios: list[float] = field(default_factory=list)
    step_metrics: list[dict[str, Any]] = field(default_factory=list)
    updated_param_count: int | None = None
    stopped_early: bool = False
    stop_reason: str | None = None
    forward_calls: int = 0
    backward_calls: int = 0
    optimizer_steps: int = 0
    abstained_steps: int = 0
    initial_loss: float | None = None
    backend: str | None = None  # the update engine's ("cpp" or "triton")
    amp: str = "off"  # the adaptation passes' precision: "off" (fp32), "bf16" or "fp16" (amp.AMP_MODES)
    graph: bool = False  # graph mode: CUDA graphs of the whole step where it can be captured, else of the update

    def finish_step(self, entry: dict[str, Any], loss: float, *, arena: ParamArena, buffers: BufferSnapshot | None,
                    params_changed: bool = True, method_stop: str | None = None) -> bool:
        """Apply the shared guard policy to a finished step; True when the run must stop.

        ``method_stop`` is a stop the method itself decided (e.g. EATA's selected ratio); the
        guards take precedence over it, as in the reference.
        """
        if self.initial_loss is None:
            self.initial_loss = loss
        reason, bad = guards.stop_reason(self.config, entry, loss, self.initial_loss)
        reason = reason or method_stop
        if reason is None:
            self.losses.append(float(loss))
            self.step_metrics.append(entry)
            arena.drop_snapshot()
            return False
        self.stopped_early = True
        self.stop_reason = reason
        guards.mark_stop(entry, reason, bad, self.config, self.warnings)
        if bool(self.config.rollback_on_stop):
            if params_changed:
                arena.restore_snapshot()
            if buffers is not None:
                buffers.restore()
        arena.drop_snapshot()
        self.step_metrics.append(entry)
        return True

    def seed_generator(self) -> None:
        """The run's own random stream (MIM's masks), as the reference seeds it: a CPU generator
        seeded with ``config.seed``, else None (torch's global RNG)."""
        if self.config.seed is not None:
            try:
                self.generator = torch.Generator(device="cpu")
                self.generator.manual_seed(int(self.config.seed))
            except Exception:  # pragma: no cover
                self.warnings.append("failed_to_seed_generator")
                self.generator = None

    def report(self, method: str, batches: list[Any], seconds: float, memory_start: Any) -> TTTReport:
        """YOLOZU's report of the finished run."""
        config, steps = self.config, self.steps
        mask_ratio = float(sum(self.mask_ratios) / float(len(self.mask_ratios))) if self.mask_ratios else None
        return TTTReport(
            enabled=True, method=method, reset=str(config.reset), steps_requested=steps,
            steps_run=len(self.losses), batches_used=len(batches), seconds=seconds, losses=self.losses,
            mask_ratio=mask_ratio, updated_param_count=self.updated_param_count, warnings=self.warnings,
            stopped_early=bool(self.stopped_early), stop_reason=self.stop_reason, step_metrics=self.step_metrics,
            method_profile=get_ttt_method_profile(method, detector_response=bool(config.detector_response)),
            forward_calls=int(self.forward_calls), backward_calls=int(self.backward_calls),
            optimizer_steps=int(self.optimizer_steps), update_ratio=float(self.optimizer_steps) / float(max(1, steps)),
            abstained_steps=int(self.abstained_steps),
            abstention_ratio=float(self.abstained_steps) / float(max(1, len(self.step_metrics))),
            memory=_ref._memory_finish(memory_start))

    def counted_entry(self, step: int, outcome: "StepOutcome", preclip_norm_reported: bool) -> dict[str, Any]:
        """The step's passes added to the counters; its entry (the base keys and the method's)."""
        self.forward_calls += outcome.forwards
        self.backward_calls += outcome.backwards
        self.optimizer_steps += outcome.optimizer_steps
        self.abstained_steps += int(outcome.abstained)
        return base_entry(step, outcome, preclip_norm_reported, self.config.max_grad_norm)

    def settle(self, entry: dict[str, Any], outcome: "StepOutcome", *, arena: Any, buffers: Any) -> bool:
        """A counted step recorded as skipped, or kept or stopped by the guards (an abstention's norm
        buffers restored first); True when the run must stop (the loop's and every replica's)."""
        if outcome.skipped:
            return self.skip_step(entry, outcome.skip_stop)
        if outcome.abstained and buffers is not None:
            buffers.restore()
        return self.finish_step(entry, float(outcome.loss), arena=arena, buffers=buffers,
                                params_changed=not outcome.abstained, method_stop=outcome.method_stop)

    def skip_step(self, entry: dict[str, Any], stop: str | None) -> bool:
        """Record a step that ran no update and no guard (EATA's empty selection); True to stop."""
        self.step_metrics.append(entry)
        if stop is None:
            return False
        self.stopped_early, self.stop_reason = True, stop
        self.warnings.append(stop)
        entry["stop_reason"] = stop
        return True


@dataclass
class StepOutcome:
    """What a method's ``outcome`` hands back to the loop for one step."""

    loss: float | None  # the loss the guards and the report see
    stats: StepStats  # the engine's (or ``engine.idle_stats()`` when nothing was applied)
    metrics: dict[str, Any] = field(default_factory=dict)  # the method's entry fields (override the base ones)
    forwards: int = 1
    backwards: int = 1
    optimizer_steps: int = 1
    abstained: bool = False  # no update and the norm buffers restored (Tent's detector response)
    method_stop: str | None = None  # a stop the method decided (the guards come first)
    skipped: bool = False  # no update and no guard: the entry is recorded as it is
    skip_stop: str | None = None  # with ``skipped``: the run ends with this reason
    layout: tuple[str, ...] | None = None  # the reference's key order of this method's entry (None:
    # the base keys, then the method's)


class Alone:
    """A run's passes on the model itself (K = 1, no vmap): what a method's ``passes`` call. A
    group's K replicas (``yolozu_ttt.parallel.Replicas``) answer the same calls for K images at
    once, so a method's passes are written once, as one image's work:

    - ``backward(fn, x, *inputs, worth=None, replace=False)``: ``fn(net, x, *inputs)`` (``net``: the
      model; a tuple led by the loss, or the loss) and the loss's backward into the arena's grads
      (``replace``: instead of adding to an earlier pass's); returns ``fn``'s tuple. ``worth``:
      eagerly, ``fn``'s values are read first (the step's read before its backward) and
      ``worth([values])`` (one list per image) decides whether the backward can change anything;
      where not, none runs (nor does one for a loss that reaches no parameter), ``early`` holds the
      values read and the loop applies no update (EATA's empty selection). A captured step reads
      nothing: the backward runs and the method's update is gated on the device instead;
    - ``forward(fn, x, *inputs, module=None)``: ``fn(net, x, *inputs)`` without grad (``module``: a
      copy of the model as ``teacher(copy)`` gives it, CoTTA's);
    - ``model``, ``arena``, ``engine`` (its grad hooks: clip, gate, anchor, ascent), ``k`` (1).
    """

    k = 1
    #: the passes run under vmap (a group's), where a loss must be one vmap can batch
    vmapped = False

    def __init__(self, model: Any, arena: Any, engine: UpdateEngine):
        self.model, self.arena, self.engine = model, arena, engine
        self.captured = False  #: graph mode captures the step: nothing is read in it
        self.early: list[list[float]] | None = None  #: the values read before a backward that did not run

    def backward(self, fn: Any, x: Any, *inputs: Any, worth: Any = None, replace: bool = False) -> tuple[Any, ...]:
        got = fn(self.model, x, *inputs)
        got = got if isinstance(got, tuple) else (got,)
        if worth is not None:
            early = None if self.captured else read(*got)
            if early is not None and not worth([early]):
                self.early = [early]
                return got
            if not got[0].requires_grad:
                return got
        self.arena.backward(got[0], replace=replace)
        return got

    def forward(self, fn: Any, x: Any, *inputs: Any, module: Any = None) -> Any:
        with torch.no_grad():
            return fn(self.model if module is None else module, x, *inputs)

    def teacher(self, module: Any) -> Any:
        """A method's copy of the model whose selected parameters are the engine's teacher (CoTTA's,
        bound by its ``start``), as ``forward``'s ``module``: here the copy itself."""
        return module


class Method:
    """One TTT method's differences from the loop's defaults (Tent's shape); see the module docstring."""

    #: the batch check of the reference's loop for this method (None: no check)
    batch_error: str | None = None
    #: the step decides nothing on the host before its update: graph mode can capture it whole
    capturable: bool = True
    #: YOLOZU's report quirk (EATA, SAR, CoTTA): the entry's ``grad_norm_clipped`` is the pre-clip
    #: ``grad_norm`` when a clip is configured, else None
    preclip_norm_reported: bool = False
    #: set by the loop: graph mode's capture of the whole step (None: eager)
    step_graph: "capture.StepGraph | None" = None
    #: each image's restore seed in a group (CoTTA's), or None
    restore_seeds: list[int] | None = None
    #: the step's snapshot holds the method's own backup (SAR's ascent), not the update's pre-step values
    snapshot_backup = False

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.config = ctx.config

    # ---- setup -------------------------------------------------------------------------------
    def select(self) -> list[torch.Tensor]:
        """The parameters to adapt, with the reference's checks; sets ``ctx.updated_param_count``."""
        return select_params(self.ctx)

    def max_grad_norm(self) -> float | None:
        """The clip of the fused update."""
        return self.config.max_grad_norm

    def needs_snapshot(self) -> bool:
        """Whether each step keeps its pre-step parameters (a stop can roll back)."""
        return guards.needs_snapshot(self.config)

    def needs_buffers(self) -> bool:
        """Whether the norm buffers are saved before each step (for a rollback)."""
        return bool(self.config.rollback_on_stop)

    def update_options(self) -> dict[str, Any]:
        """The method's fields of the run's :class:`StepSpec` (e.g. EATA's anchor)."""
        return {}

    def start(self) -> None:
        """Method state bound to the run's arena and engine (e.g. CoTTA's teacher)."""

    def reset(self, ctx: RunContext) -> None:
        """A later run on the same bindings (a session's): its context, and the method's bound state
        afresh (e.g. CoTTA's teacher; per-image state is ``begin``'s). The parameters, buffers and
        Adam state are reset by the loop before."""
        self.ctx = ctx

    def close(self) -> None:
        """Release what ``start`` bound (on every exit path)."""

    def why_not_parallel(self) -> str | None:
        """Why this run's steps cannot run K images at once (``yolozu_ttt.parallel``: they decide on
        the host per image), or None."""
        return None

    def begin(self, run: Any, ctxs: list[RunContext]) -> None:
        """Per-image state before the first step of a run (``ctxs``: its one context, ``run`` an
        :class:`Alone`) or of a group (K contexts, ``run`` the group's ``parallel.Replicas``): e.g.
        EATA's skip streaks, indexed by image as ``outcome``'s ``i``."""
        self.ctxs = ctxs

    # ---- one step ----------------------------------------------------------------------------
    def check_batch(self, x: Any) -> None:
        """The reference's batch check."""
        if self.batch_error is not None and not torch.is_tensor(x):
            raise RuntimeError(self.batch_error)

    def inputs(self, x: Any, i: int) -> tuple[Any, ...]:
        """What image ``i``'s step takes, drawn on the host before its passes (a graph's static
        inputs; MIM's patch grid): its batch first. A group draws every image's for every step
        before its first step, image by image, and stacks them."""
        return (x,)

    def passes(self, run: Any, *inputs: Any) -> tuple[Any, ...]:
        """One step's device work before its update, as one image's: forwards and losses through
        ``run.backward`` / ``run.forward`` (an :class:`Alone`, or K replicas at once), the grads'
        hooks on ``run.engine`` / ``run.arena``; returns the values read with the step, each per
        image (stacked over K replicas), in ``outcome``'s order."""
        raise NotImplementedError

    def update(self, step: int) -> StepSpec | None:
        """The step's fused update (None: it applies nothing)."""
        return self.spec

    def outcome(self, stats: StepStats, values: list[float], step: int, i: int) -> StepOutcome:
        """Image ``i``'s step outcome from its stats and its read values of ``passes`` (those read
        before a backward that did not run, where ``run.backward``'s ``worth`` said so)."""
        raise NotImplementedError

    def after_step(self, outcome: StepOutcome, i: int) -> None:
        """Bookkeeping after image ``i``'s step that kept its update (e.g. MIM's mask ratios)."""

    # ---- the loop's protocol (not overridden) -------------------------------------------------
    def bind(self, arena: ParamArena, engine: UpdateEngine, write_snapshot: bool) -> None:
        """The run's arena and engine, and its update spec, built once (``update_options`` may
        override ``write_snapshot``, e.g. SAR's backup is the step's snapshot)."""
        self.arena, self.engine = arena, engine
        self.run = Alone(self.ctx.model, arena, engine)
        self.spec = engine.spec.replace(**{"write_snapshot": write_snapshot, **self.update_options()})

    def body(self, *inputs: Any) -> tuple[Any, ...]:
        """The step's device work before the update: the grad buffers cleared, then the passes."""
        self.arena.clear_grads()
        return self.passes(self.run, *inputs)

    def adapt(self, x: Any, step: int) -> StepOutcome:
        """One step: inputs, cleared grads, passes, update, one read, outcome (graph or eager)."""
        inputs = self.inputs(x, 0)
        if self.step_graph is not None:
            stats, values = self.step_graph.step(inputs, self.update(step), counter=step)
        else:
            self.arena.new_grads()
            extra = self.body(*inputs)
            early, self.run.early = self.run.early, None
            spec = None if early is not None else self.update(step)
            if spec is None:
                stats, values = self.engine.idle_stats(), (early[0] if early is not None else read(*extra))
            else:
                stats, values = self.engine.step(spec, counter=step, extra=extra)
        return self.outcome(stats, values, step, 0)


BASE_KEYS = ("step", "loss", "grad_norm", "grad_norm_clipped", "update_norm", "total_update_norm", "rolled_back")


def base_entry(step: int, outcome: StepOutcome, preclip_norm_reported: bool, max_grad_norm: Any) -> dict[str, Any]:
    """The step entry every method reports with the method's own fields, in the reference's order."""
    s = outcome.stats
    loss = None if outcome.loss is None else float(outcome.loss)
    entry: dict[str, Any] = dict(zip(BASE_KEYS, (
        int(step), loss, float(s.grad_norm), float(s.grad_norm_clipped), float(s.update_norm),
        float(s.total_update_norm), False)))
    entry.update(outcome.metrics)
    if preclip_norm_reported:
        entry["grad_norm_clipped"] = entry["grad_norm"] if max_grad_norm is not None else None
    if outcome.layout is None:
        return entry
    return {key: entry[key] for key in outcome.layout}


class StepLoop:
    """A method bound to its selection, arena, engine and (graph mode) step graph: built at the first
    :meth:`run` and kept for every later one (a session's runs, ``yolozu_ttt.run.TTTSession``).

    A later run first resets what the earlier ones changed, from what the loop holds: the
    parameters from the arena's base (the values at the first run: the originals the C++ engine
    reads, Triton's base copy), the norm buffers from their copy taken then, Adam's moments and
    step counts, the loss scale, and the method's own run state (:meth:`Method.reset`). Between
    runs the selected parameters stay bound to the arena's flat buffers (their values are the
    model's, changed in place by anyone; ``.grad`` is None); :meth:`close` unbinds them.
    """

    def __init__(self, method: Method):
        self.method = method
        self.arena: ParamArena | None = None
        self.model: Any = None
        #: what sample-parallel groups keep with the binding (``yolozu_ttt.parallel.Kept``: made and
        #: used there only), None until a group runs; dropped with the binding
        self.parallel: Any = None

    def fits(self, model: Any) -> bool:
        """Whether a later run on ``model`` can reuse these bindings (same model, its selected
        parameters still bound to the arena)."""
        return self.arena is not None and model is self.model and self.arena.bound()

    def run(self, ctx: RunContext) -> None:
        """Run ``ctx.steps`` steps of the method with YOLOZU's counters, metrics, guards and rollback.

        The one place of the run's precision: with ``ctx.amp`` on, every call of the model (and of
        the copies a method makes of it, CoTTA's teacher) runs under ``torch.autocast`` and hands
        back fp32 outputs; fp16 backwards go through the arena's loss scale and an overflowed step
        reaches the guards unapplied. Every run settles the batch/instance norms' ambiguous layouts
        (``amp``)."""
        with amp.settled_norm_layouts(ctx.model), amp.autocast_forwards(ctx.model, ctx.amp):
            if self.arena is None:
                self._bind(ctx)
            else:
                self._reset(ctx)
            ctx.updated_param_count, ctx.backend = self.updated_param_count, self.engine.backend
            self.method.begin(self.method.run, [ctx])
            try:
                for p, grad in self.grads:
                    p.grad = grad
                self._steps(ctx)
            finally:
                for p, _ in self.grads:
                    p.grad = None

    def close(self) -> None:
        """Release the method's bindings and unbind the arena (values back in the original
        storages); idempotent."""
        if self.arena is None:
            return
        arena, self.arena = self.arena, None
        self.parallel = None
        try:
            self.method.close()
        finally:
            arena.close()

    # ---- the pieces --------------------------------------------------------------------------
    def _bind(self, ctx: RunContext) -> None:
        method = self.method
        method.ctx = ctx
        params = method.select()
        self.updated_param_count = ctx.updated_param_count
        self.scaler = amp.LossScaler(params[0].device) if ctx.amp == "fp16" else None
        arena_type = functools.partial(amp.ScaledArena, scaler=self.scaler) if self.scaler is not None else ParamArena
        arena = arena_type(ctx.model, params)
        try:
            self.engine = engine = UpdateEngine(arena, lr=ctx.config.lr, max_grad_norm=method.max_grad_norm(),
                                                scaler=self.scaler, graph=ctx.graph)
            if engine.graph_mode:
                engine.reserve_steps(ctx.steps)  # no table outgrows a captured graph mid-run
            method.bind(arena, engine, method.needs_snapshot())
            method.step_graph = capture.whole_step(method.body if method.capturable else None, ctx.method, ctx.amp,
                                                   arena, engine)
            method.run.captured = method.step_graph is not None
            self.buffers = BufferSnapshot(ctx.model) if method.needs_buffers() else None
            self.origin = BufferSnapshot(ctx.model)  # the norm buffers every later run starts from
            self.grads = [(p, p.grad) for g in arena.groups for p in g.params]
            try:
                method.start()
            except BaseException:
                method.close()
                raise
        except BaseException:
            arena.close()
            raise
        self.arena, self.model = arena, ctx.model

    def _reset(self, ctx: RunContext) -> None:
        """A later run: what the earlier ones changed back to the first run's start."""
        self.arena.reset_values()
        self.origin.restore()
        self.engine.reset_state()
        if self.scaler is not None:
            self.scaler.reset()
        self.method.reset(ctx)

    def _steps(self, ctx: RunContext) -> None:
        method, arena, buffers, scaler = self.method, self.arena, self.buffers, self.scaler
        for step in range(ctx.steps):
            x = ctx.batches[step % len(ctx.batches)]
            method.check_batch(x)
            if buffers is not None:
                buffers.save()
            loss_scale = scaler.begin_step() if scaler is not None else None
            outcome = method.adapt(x, step)
            entry = ctx.counted_entry(step, outcome, method.preclip_norm_reported)
            if ctx.amp != "off":
                entry.update(amp_fields(ctx, step, scaler, loss_scale))
            if ctx.settle(entry, outcome, arena=arena, buffers=buffers):
                break
            if not outcome.skipped:
                method.after_step(outcome, 0)


def run_steps(ctx: RunContext, method: Method) -> None:
    """One run of ``method`` on fresh bindings (see :class:`StepLoop`), unbound on every exit path."""
    loop = StepLoop(method)
    try:
        loop.run(ctx)
    finally:
        loop.close()


def amp_fields(ctx: RunContext, step: int, scaler: amp.LossScaler | None, loss_scale: float | None) -> dict[str, Any]:
    """The precision of a step's passes in its entry; fp16: the loss scale it ran with and whether its
    grads overflowed (then nothing was applied: the grad norm is inf, the guards see it, and the
    warnings say so)."""
    fields: dict[str, Any] = {"amp": ctx.amp}
    if scaler is not None:
        overflow = scaler.step_overflowed
        fields.update({"loss_scale": float(loss_scale), "amp_overflow": overflow})
        if overflow:
            ctx.warnings.append(f"amp_fp16_overflow:step={step},loss_scale={loss_scale:g}")
    return fields


# ---- what several methods share ------------------------------------------------------------
def select_params(ctx: RunContext) -> list[torch.Tensor]:
    """The reference's parameter selection, checks and count (EATA, SAR, CoTTA, MIM)."""
    config = ctx.config
    params = checked_selection(ctx.model, str(config.update_filter), config.include, config.exclude, float(config.lr),
                               RuntimeError("no parameters selected for TTT"))
    ctx.updated_param_count = _ref._count_unique_params(params)
    return params


def entropy(logits: Any, fallback=_ref._entropy_loss_from_logits) -> torch.Tensor:
    """Mean softmax entropy (the fused op); other inputs take the reference's ``fallback`` (and its
    errors)."""
    if isinstance(logits, torch.Tensor) and logits.ndim >= 1 and logits.is_floating_point():
        return ops.entropy_loss(logits)
    return fallback(logits)
