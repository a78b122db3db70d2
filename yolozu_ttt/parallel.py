"""Sample-parallel adaptation: K records adapted at once, each by its own replica of the model's
adapted state, each getting what it gets alone (``--ttt-reset sample``: batch of its own, its own reset).

``TTTSession.run_parallel(records, k, on_image=None)`` adapts ``records`` in groups of ``k`` (the last
group may be smaller). Image i of a group has its own replica of everything a run changes: the
selected parameters, Adam's moments, the norm running statistics, the per-step snapshots and the
guard state (initial loss, stop, rollback). Its report is the one ``session.run([record])`` gives,
within float tolerance; ``on_image(index, record, report)`` is called with the model holding that
image's adapted parameters and norm buffers (so a caller predicts it as after ``run``). The driver
around the groups (the first record alone, the groups cut from an order, the memory check, each
image handed out) is :mod:`yolozu_ttt.groups`'s, the API's and the export's; this module adapts a
group (``run_group``).

The replicas (the design, and why):

- **Passes**: ``torch.func.vmap`` over ``functional_call(model, {shared parameters, stacked replica
  parameters (K, ...), stacked norm buffers (K, ...)}, image)``, then one ordinary backward of the
  replicas' summed losses into the stacked leaves. vmap's batch-norm rule folds the K replicas
  into channels, so each image is normalised by its own statistics (batch norm at its own batch)
  and its running statistics are its own; replica grads are independent (each loss reaches only
  its own leaves). The CPU batch-1 batch-norm backward error that ``amp.settled_norm_layouts``
  fixes for a single image (README difference 24) does not arise on the folded tensors: the
  per-image grads match the settled single-image ones (tests).
- **Update**: the engine's (:class:`~yolozu_ttt.engine.UpdateEngine` over a
  :class:`~yolozu_ttt.rows.RowArena` of the K replicas' flat (K, N) buffers, the ones the stacked
  leaves view): one fused K-row call per step steps every replica with its own clip, Adam step
  count, gate (EATA's selection), anchor (EATA), ascent (SAR: ``sar_perturb``), teacher EMA and
  restore drawn from its own seed (CoTTA), and its stats come back as (7, K) device values read
  once with the method's. No update math here. A replica whose guard stops it is rolled back
  from its own snapshot row (where the guards roll back) and frozen from then on
  (``UpdateEngine.stop_rows``), while the other replicas go on; its norm buffers are put back
  after every later forward (``Replicas.freeze_buffers``).
- **Lifetime**: the replicas of a K are made at its first group and kept with the session's
  binding (``StepLoop.parallel``); every later group refills the same tensors (``Replicas.reset``,
  ``Replicas.kept`` for a method's stacked state, CoTTA's teachers). One K at a time: a smaller
  last group replaces them.
- **Graph mode** (``graph=True`` on a CUDA model, fp32): the group's whole step (the K replicas'
  passes and the engine's K-row launch, ``ReplicaMethod.step``) is captured once per (K, step
  options, input layouts) and replayed for every later step and group
  (:class:`~yolozu_ttt.capture.ReplicaGraph`): an export captures once per K, not once per image.
  The update's host half (``Replicas.prepare``: the restore counter and seeds uploaded, the
  engine's tables) runs before every step, outside the graph; a stop changes no launch (over K
  rows the engine always takes the rows' gate); what a step draws on the host (MIM's grids) is
  its ``inputs``, copied into the graph before a replay. bf16 groups, and a step whose probe
  sees a host read, run eagerly with a GraphFallbackWarning.

Every method is sample-parallel with the code of its run alone: its ``passes`` (one image's work,
``methods.loop.Method``) run on the group's :class:`Replicas`, which answer the calls of a run's
``methods.loop.Alone`` for K replicas at once (``backward``/``forward`` under vmap, the engine of
K rows between them); :class:`~yolozu_ttt.methods.replica.ReplicaMethod` drives them, ``run_group``
owns the rest. Tent with plain entropy (no aux-consistency, teacher or detector response); EATA
(per replica its selection, its update gated on the device by it, ``UpdateEngine.gate``, its
anchor, its skip streak and ratio stop); SAR (per replica its clip, ``UpdateEngine.clip_grads``,
its ascent by its own direction norm, ``UpdateEngine.sar_perturb`` with the snapshot rows as its
backup, its second pass); MIM, plain and structured (each image's masks drawn before its steps
from its own stream: its run's generator, seeded as alone; the fused patch ops batch under vmap,
the reference's host-branching losses as masked means, ``masking``); CoTTA (per replica a stacked
teacher, bound as the engine's teacher rows: the EMA of its own student and the restore to its
own start drawn from its own seed, in the fused step); fp32 or bf16 (every forward of a group
under autocast, ``amp.autocast_forwards``, as a run's), eager or in graph mode (fp32).
Anything else (those Tent options, fp16, whose loss scale decides on the host per image) runs the
records one by one through ``session.run`` with a :class:`ParallelFallbackWarning` saying why: their
steps decide on the host per image, or their loss or draws are not split per image here yet.
"""
from __future__ import annotations

import contextlib
import functools
import time
import warnings
from typing import Any, Callable

import torch
from torch.func import functional_call, vmap

from . import amp, capture
from .engine import StepSpec, UpdateEngine, read
from .rows import RowArena
from .methods.loop import NORM_BUFFER_SUFFIXES, RunContext, StepOutcome
from .methods.replica import ReplicaMethod
from .seam import integration as _ref


class ParallelFallbackWarning(UserWarning):
    """``run_parallel`` adapted records one by one instead of K at once, saying why."""


def replica_method(session: Any, loop: Any) -> tuple[str | None, ReplicaMethod | None]:
    """(why these runs cannot be adapted K at once or None, the bound method's step over replicas)."""
    if session.amp == "fp16":
        return "amp=fp16: its loss scale decides on the host per image (bf16 is sample-parallel)", None
    if any(p.dtype != torch.float32 for p in loop.arena.params):
        return "parameters other than float32", None
    rmethod = ReplicaMethod(session, loop)
    return rmethod.why_not(), rmethod


class Replicas:
    """K replicas of a bound session's adapted state (see the module docstring).

    Each per-replica state is one flat (K, N) float32 buffer, row i replica i's, N the selected
    parameters' elements in the arena's order (``params``): the values, grads, base (the group's
    start), Adam moments and snapshot rows of ``rows`` (a :class:`~yolozu_ttt.rows.RowArena`, bound
    as it is by ``engine``, an :class:`~yolozu_ttt.engine.UpdateEngine` of K rows: the update is
    the engine's). ``values`` are per-parameter (K, *shape) leaves sharing ``flat``'s storage (what
    ``map`` hands to vmap), their ``.grad`` views of ``grad`` (autograd accumulates into them in
    place). A parameter the loss does not reach keeps a zero grad, zero moments and so its value
    (where a run alone skips it). The norm buffers stay per tensor (``buffers``: (K, *shape) each;
    their dtypes differ)."""

    vmapped = True  #: the passes run under vmap (``methods.loop.Alone``'s protocol)

    def __init__(self, loop: Any, k: int):
        self.loop, self.k = loop, k
        model = loop.model
        name_of = {id(p): n for n, p in model.named_parameters()}
        self.params = list(loop.arena.params)  # the arena's order: a row's offsets are a run's (the restore's draws)
        self.names = [name_of[id(p)] for p in self.params]
        chosen = {id(p) for p in self.params}
        self.shared = {n: p for n, p in model.named_parameters() if id(p) not in chosen}
        self.buffer_names = [n for n, b in model.named_buffers() if b is not None and n.endswith(NORM_BUFFER_SUFFIXES)]
        buffers = dict(model.named_buffers())
        self.model_buffers = [buffers[n] for n in self.buffer_names]
        self.sizes = [p.numel() for p in self.params]
        device = self.params[0].device
        flat, grad, base = (torch.empty((k, sum(self.sizes)), dtype=torch.float32, device=device) for _ in range(3))
        self.rows = RowArena(flat, grad, base, self.sizes)
        self.rows.hold_snapshot()  # rows of their own: each step's pre-step values (a stop's rollback, SAR's backup)
        spec = loop.engine.spec
        self.engine = UpdateEngine(self.rows, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                   max_grad_norm=spec.max_grad_norm, graph=False)
        self.flat, self.grad, self.base = flat, grad, base
        self.values = [v.detach().requires_grad_() for v in self.views(self.flat)]
        for v, g in zip(self.values, self.views(self.grad)):
            v.grad = g
        self.buffers = [torch.empty((k, *b.shape), dtype=b.dtype, device=b.device) for b in self.model_buffers]
        #: the device's copy of which replicas go on (the norm buffers of stopped ones are put back)
        self.active = torch.ones(k, dtype=torch.bool, device=device)
        self._kept: dict[str, torch.Tensor] = {}
        self._specs: dict[tuple[StepSpec, bool], StepSpec] = {}
        self.launch: Any = None
        self.captured = False  #: the group's steps are captured (graph mode): nothing is read in them
        self.reset()

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat (K, N) state's per-parameter (K, *shape) views."""
        out, offset = [], 0
        for p, n in zip(self.params, self.sizes):
            out.append(flat[:, offset:offset + n].view(self.k, *p.shape))
            offset += n
        return out

    def reset(self) -> None:
        """Every replica := the model's current selected parameters and norm buffers (a group's start),
        fresh Adam state (``UpdateEngine.reset_state``), none stopped: the same tensors refilled in
        place, so a captured step reads them every group."""
        with torch.no_grad():
            self.flat.copy_(torch.cat([p.detach().reshape(-1) for p in self.params]).expand_as(self.flat))
            for s, b in zip(self.buffers, self.model_buffers):
                s.copy_(b.unsqueeze(0).expand_as(s))
            self.base.copy_(self.flat)
            self.rows.exp_avg.zero_()
            self.rows.exp_avg_sq.zero_()
            self.active.fill_(True)
        self.engine.reset_state()
        self.running = [True] * self.k  #: the host's record of which replicas go on

    @property
    def stopped(self) -> int:
        """How many replicas a guard stopped."""
        return self.k - sum(self.running)

    def kept(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """A copy of a flat state ``values`` a method keeps beside the replicas under ``name`` (CoTTA's
        teachers): made at the first call, refilled in place at every later one (a group's start),
        so a captured step reads the same tensor every group."""
        with torch.no_grad():
            have = self._kept.get(name)
            if have is None:
                have = self._kept[name] = values.detach().clone()
            else:
                have.copy_(values)
        return have

    def stop(self, i: int, rollback: bool) -> None:
        """Replica ``i`` is frozen from now on (a guard stopped it), rolled back to its pre-step values
        first where ``rollback`` (``UpdateEngine.stop_rows``: its snapshot row)."""
        self.engine.stop_rows([i], rollback=rollback)
        self.active[i] = False
        self.running[i] = False

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        """The active mask shaped to broadcast against the stacked ``t``."""
        return self.active.view((self.k,) + (1,) * (t.ndim - 1))

    # ---- the passes: what a method's ``passes`` call (``methods.loop.Alone``'s calls, K at once) ----
    @property
    def model(self) -> Any:
        return self.loop.model

    @property
    def arena(self) -> RowArena:
        return self.rows

    def backward(self, fn: Callable[..., Any], x: torch.Tensor, *per_image: Any, worth: Callable | None = None,
                 replace: bool = False) -> tuple[torch.Tensor, ...]:
        """``Alone.backward`` for the K replicas on their K images ``x`` (K, B, ...) in one batched
        call (:meth:`map`: ``fn(net, image, *per_image_i)``, ``net`` the model with replica i's state),
        then one backward of their summed losses into the stacked leaves (``grad``, zeroed first:
        every pass replaces, ``replace`` or not). Returns ``fn``'s detached tuple, stacked. ``worth(columns)``, one list
        of values per image, read eagerly (a captured group reads nothing): False, and no backward
        runs (the grads stay zero; the update, gated by the method, runs)."""
        self.grad.zero_()
        got = self.map(fn, x, *per_image)
        got = got if isinstance(got, tuple) else (got,)
        if worth is not None and not self.captured:
            k = self.k
            flat = read(torch.cat([t.detach().reshape(k, -1).double() for t in got], dim=1))
            n = len(flat) // k
            if not worth([flat[i * n:(i + 1) * n] for i in range(k)]):
                return tuple(t.detach() for t in got)
        self._backward(got[0])
        return tuple(t.detach() for t in got)

    def forward(self, fn: Callable[..., Any], x: torch.Tensor, *per_image: Any, module: Any = None) -> Any:
        """``Alone.forward`` for the K replicas: ``fn(net, image, *per_image_i)`` without grad;
        ``module``: what :meth:`map` takes (a method's kept copy: (module, stacked values))."""
        with torch.no_grad():
            if module is None:
                return self.map(fn, x, *per_image)
            return self.map(fn, x, *per_image, module=module[0], values=module[1])

    def teacher(self, module: Any) -> tuple[Any, list[torch.Tensor]]:
        """``Alone.teacher`` for the K replicas: ``module`` (a copy of the model) with stacked rows of
        its selected parameters, kept beside the replicas (:meth:`kept`, each row its replica's
        start) and bound as the engine's teacher rows (the fused EMA and restore)."""
        rows = self.kept("teacher", self.flat)
        self.engine.bind_teacher([rows.view(-1)])
        return module, self.views(rows)

    def _backward(self, loss: torch.Tensor) -> None:
        with warnings.catch_warnings():  # the grads are strided views of ``grad``, as the leaves are of ``flat``
            warnings.filterwarnings("ignore", GRAD_LAYOUT_WARNING)
            loss.sum().backward(inputs=self.values)

    def map(self, fn: Callable[..., Any], x: torch.Tensor, *per_image: Any, module: Any = None,
            values: list[torch.Tensor] | None = None) -> Any:
        """``fn(net, image, *per_image_i)`` for the K images in one ``vmap``: ``net`` is the loop's model
        with replica i's selected parameters and norm buffers, or ``module`` (a copy of the model with
        its own buffers, e.g. CoTTA's teacher) with slice i of ``values`` (stacked like the replicas'
        values, e.g. :meth:`views` of a kept state) as its selected parameters."""
        model = self.loop.model if module is None else module
        values = self.values if values is None else values
        buffers, buffer_names = (self.buffers, self.buffer_names) if module is None else ([], [])
        names, shared = self.names, self.shared

        def one(values, buffers, image, *extra):
            state = {**shared, **dict(zip(names, values)), **dict(zip(buffer_names, buffers))}
            return fn(lambda *args, **kwargs: functional_call(model, state, args, kwargs or None), image, *extra)

        return vmap(one)(values, buffers, x, *per_image)

    # ---- the update: the engine's K-row step ------------------------------------------------
    def prepare(self, spec: StepSpec, step: int, seeds: list[int] | None = None, *, backup: bool = False) -> StepSpec:
        """The host half of this step's update (``UpdateEngine.prepare``: the restore counter ``step``,
        each replica's restore seed ``seeds``), before the step's passes (graph mode captures them
        and :meth:`update`, never this); ``spec`` with every step's pre-step values in the snapshot
        rows, unless ``backup`` (SAR's ascent: its backup is the snapshot). Returns the spec run."""
        key = (spec, backup)
        run = self._specs.get(key)
        if run is None:
            run = self._specs[key] = spec.replace(write_snapshot=not backup)
        self.launch = self.engine.prepare(run, step, seeds)
        return run

    def update(self) -> torch.Tensor:
        """The prepared update of every replica (one fused K-row call: per row its clip, Adam at its
        own step count, its gate, anchor, EMA and restore): its (len(STAT_KEYS), K) float64 stats,
        column i replica i's, unread."""
        self.launch.run()
        return self.engine.unread_stats()

    def snapshot_buffers(self) -> list[torch.Tensor]:
        """Copies of the norm buffers (before a step)."""
        return [b.clone() for b in self.buffers]

    def restore_buffers(self, i: int, saved: list[torch.Tensor]) -> None:
        """Replica ``i``'s norm buffers back to ``saved``'s slice ``i``."""
        with torch.no_grad():
            for t, s in zip(self.buffers, saved):
                t[i].copy_(s[i])

    def freeze_buffers(self, saved: list[torch.Tensor]) -> None:
        """Inactive replicas' norm buffers back to ``saved`` (their forward ran with the others')."""
        with torch.no_grad():
            for b, s in zip(self.buffers, saved):
                b.copy_(torch.where(self.mask(b), b, s))

    def load(self, i: int) -> None:
        """The model's selected parameters and norm buffers := replica ``i``'s."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, [v[i] for v in self.values])
            if self.model_buffers:
                torch._foreach_copy_(self.model_buffers, [b[i] for b in self.buffers])

    def predict(self, x: torch.Tensor) -> Any:
        """The K replicas' eval-mode forwards on their K images ``x`` (K, B, ...) in one batched
        call, without grad: the model's outputs stacked (K, B, ...), image i's what the model gives
        for ``x[i]`` in eval mode holding replica i's parameters and norm buffers. The model's
        training flags are left as they were. Transformer layers take their standard path, as in
        training (their eval-only fused kernel has no vmap rule: vmap would loop it per image)."""
        model = self.loop.model
        flags = [(m, m.training) for m in model.modules()]
        fastpath = torch.backends.mha.get_fastpath_enabled()
        model.eval()
        try:
            torch.backends.mha.set_fastpath_enabled(False)
            with torch.no_grad():
                return self.map(lambda net, image: net(image), x, values=[v.detach() for v in self.values])
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            for m, training in flags:
                m.training = training


#: torch's note that a leaf's grad is a strided view (the replicas' are, by design: views of ``grad``)
GRAD_LAYOUT_WARNING = "grad and param do not obey the gradient layout contract"


class _ReplicaRollback:
    """What ``RunContext.finish_step`` rolls back, for one replica: its parameters (noted here, done
    by the stop: ``Replicas.stop``) and its norm buffers."""

    def __init__(self, replicas: Replicas, i: int, saved: list[torch.Tensor]):
        self.replicas, self.i, self.saved = replicas, i, saved
        self.rolled_back = False

    def restore_snapshot(self) -> None:
        self.rolled_back = True

    def drop_snapshot(self) -> None:
        pass

    def restore(self) -> None:
        self.replicas.restore_buffers(self.i, self.saved)


def run_group(session: Any, records: list[Any], on_image: Callable | None, first_index: int,
              rmethod: ReplicaMethod, on_group: Callable | None = None,
              batches: list[list[Any]] | None = None) -> list[Any]:
    """Adapt ``records`` (a group of at most K) at once on the session's bound loop; see the module.
    ``on_group(first_index, records, reports, replicas)``, if given, is called once the group is
    adapted, before ``on_image`` (e.g. to predict the group through its replicas at once);
    ``batches``: the records' batches where the caller already loaded them (:func:`group_batches`)."""
    loop, config = session.loop, session.config
    model, name = loop.model, rmethod.name
    steps = int(config.steps)
    batches = [batches_of(session, record) for record in records] if batches is None else batches
    ctxs = []
    for got in batches:
        ctxs.append(RunContext(model=model, batches=got, config=config, method=name, steps=steps, generator=None,
                               updated_param_count=loop.updated_param_count, backend="torch"))
        ctxs[-1].seed_generator()  # each image's own stream, seeded as its run alone seeds it
    k = len(records)
    loop.arena.reset_values()
    loop.origin.restore()
    was_training = bool(model.training)
    memory_start = _ref._memory_start(model)
    start = time.time()
    graph = replica_graph(session, loop)
    replicas = replicas_for(loop, k, graph)
    if graph is not None:
        replicas.engine.reserve_steps(steps)  # no table outgrows a captured step mid-group
    rollback = bool(config.rollback_on_stop)
    rmethod.captured = replicas.captured = graph is not None
    rmethod.begin(replicas, records, ctxs)
    precision = contextlib.ExitStack()  # bf16: every forward of the group under autocast, as a run's
    try:
        precision.enter_context(amp.autocast_forwards(model, session.amp))
        for step in range(steps):
            inputs = rmethod.inputs(torch.stack([b[step % len(b)] for b in batches]), step)
            saved = replicas.snapshot_buffers() if (rollback or replicas.stopped) else []
            spec = replicas.prepare(rmethod.update_spec(step), step, rmethod.seeds, backup=rmethod.backup)
            if graph is None:
                table = rmethod.step(replicas, *inputs)
            else:
                table = graph.step((name, k, spec), functools.partial(rmethod.step, replicas), inputs)
            if saved and replicas.stopped:
                replicas.freeze_buffers(saved)
            rows = int(table.shape[0])
            values = read(table.t())  # (K, rows) flattened: image i's column is values[i*rows:(i+1)*rows]
            for i in [i for i, running in enumerate(replicas.running) if running]:
                settle_image(session, rmethod, replicas, ctxs[i], i, step, values[i * rows:(i + 1) * rows], saved)
            if replicas.stopped == k:
                break
    finally:
        precision.close()
        if not was_training:
            model.eval()
    seconds = float(time.time() - start) / k
    reports = [ctx.report(name, b, seconds, memory_start) for ctx, b in zip(ctxs, batches)]
    if on_group is not None:
        on_group(first_index, records, reports, replicas)
    for i, (record, rep) in enumerate(zip(records, reports)):
        replicas.load(i)
        if on_image is not None:
            on_image(first_index + i, record, rep)
    return reports


class Kept:
    """What sample-parallel groups keep with a session's binding (``StepLoop.parallel``, made by
    :meth:`of` and used here only; the binding drops it when it closes): the replicas of the last K
    (``replicas``) and graph mode's replica step (``graph``, decided once: ``graph_decided``)."""

    def __init__(self) -> None:
        self.replicas: Replicas | None = None
        self.graph: capture.ReplicaGraph | None = None
        self.graph_decided = False

    @staticmethod
    def of(loop: Any) -> "Kept":
        """The bound ``loop``'s kept state, made at its first group."""
        if loop.parallel is None:
            loop.parallel = Kept()
        return loop.parallel


def settle_image(session: Any, rmethod: ReplicaMethod, replicas: Replicas, ctx: RunContext, i: int, step: int,
                 column: list[float], saved: list[Any]) -> None:
    """Image i's step from its read ``column``: the loop's counters, entry, guards and rollback
    (``RunContext.settle``) on its own replica; a stop freezes its row."""
    outcome: StepOutcome = rmethod.outcome(i, column, step)
    entry = ctx.counted_entry(step, outcome, session.loop.method.preclip_norm_reported)
    if session.amp != "off":
        entry["amp"] = session.amp
    undo = _ReplicaRollback(replicas, i, saved)
    if ctx.settle(entry, outcome, arena=undo, buffers=undo if bool(session.config.rollback_on_stop) else None):
        replicas.stop(i, rollback=undo.rolled_back)
    elif not outcome.skipped:
        rmethod.after_step(i, outcome)


def replicas_for(loop: Any, k: int, graph: Any) -> Replicas:
    """The bound loop's replicas for a group of ``k``, reset to the group's start: made at the first
    group of ``k`` and kept with the binding (:class:`Kept`), so an export allocates them once and
    a captured step finds them every group (``graph``: :func:`replica_graph`'s). One K at a time:
    another K (a smaller last group) drops the earlier replicas and the graphs captured on them."""
    kept = Kept.of(loop)
    replicas = kept.replicas
    if replicas is not None and replicas.k == k:
        replicas.reset()
    else:
        if graph is not None:
            graph.forget()
        kept.replicas = None  # freed before the next K's are made
        replicas = kept.replicas = Replicas(loop, k)
    return replicas


def replica_graph(session: Any, loop: Any) -> Any:
    """Graph mode's replica step for the bound loop (:class:`~yolozu_ttt.capture.ReplicaGraph`, kept
    with the binding: one capture per (K, step options, input layouts) for every later group), or
    None: graph mode off or not possible (the engine has warned), or mixed precision (a
    ``GraphFallbackWarning`` says so once: the groups run eagerly)."""
    kept = Kept.of(loop)
    if not kept.graph_decided:
        kept.graph_decided = True
        if session.graph and loop.engine.graph_mode:
            if session.amp != "off":
                capture.warn_groups_eager(capture.mixed_precision_reason(session.amp), stacklevel=5)
            else:
                kept.graph = capture.ReplicaGraph(loop.engine)
    return kept.graph


def batches_of(session: Any, record: Any) -> list[Any]:
    """The batches ``run([record])`` adapts on, with its checks and messages."""
    config = session.config
    got = _ref._take_batches(session.adapter.build_loader([record], batch_size=int(config.batch_size)),
                             max_batches=int(config.max_batches))
    if not got:
        raise RuntimeError("TTT requires at least one batch from adapter.build_loader()")
    if not all(torch.is_tensor(x) for x in got):
        raise RuntimeError("yolozu_ttt: run_parallel needs tensor batches")
    return got
