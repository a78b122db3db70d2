"""Sample-parallel adaptation: K records adapted at once, each by its own replica of the model's
adapted state, each getting what it gets alone (``--ttt-reset sample``: batch of its own, its own reset).

``TTTSession.run_parallel(records, k, on_image=None)`` adapts ``records`` in groups of ``k`` (the last
group may be smaller). Image i of a group has its own replica of everything a run changes: the
selected parameters, Adam's moments, the norm running statistics, the per-step snapshots and the
guard state (initial loss, stop, rollback). Its report is the one ``session.run([record])`` gives,
within float tolerance; ``on_image(index, record, report)`` is called with the model holding that
image's adapted parameters and norm buffers (so a caller predicts it as after ``run``).

The replicas (the design, and why):

- **Passes**: ``torch.func.vmap`` over ``functional_call(model, {shared parameters, stacked replica
  parameters (K, ...), stacked norm buffers (K, ...)}, image)``, then one ordinary backward of the
  replicas' summed losses into the stacked leaves. vmap's batch-norm rule folds the K replicas
  into channels, so each image is normalised by its own statistics (batch norm at its own batch)
  and its running statistics are its own; replica grads are independent (each loss reaches only
  its own leaves). The CPU batch-1 batch-norm backward error that ``amp.settled_norm_layouts``
  fixes for a single image (README difference 24) does not arise on the folded tensors: the
  per-image grads match the settled single-image ones (tests).
- **Update**: Adam, the clip, and the four norms as torch ops over the stacked (K, ...) tensors,
  reduced per replica along dim 0, read once per step for all K. Not the fused engine: its groups
  share one ``StepStats`` (one norm over all segments, one clip coefficient, one gate), so K
  replicas as K more segments would need per-replica stat slots and gates in both backends; the
  stacked torch update is the simplest design that is per-replica by construction, and on the
  CPU the passes dominate. A replica whose guard stops it is rolled back on its own (its slice of
  the snapshot) and frozen from then on: its parameters, moments and norm buffers are gated by a
  device-side mask (``torch.where``) while the other replicas go on.

A method is sample-parallel when its module (``yolozu_ttt.methods.<name>``) defines ``REPLICA``, a
:class:`ReplicaMethod`: its K-replica step (``Replicas.backward`` for the batched passes,
``Replicas.update`` for the per-replica update) and its per-image outcome; ``run_group`` owns the rest.
Supported: Tent with plain entropy (no aux-consistency, teacher or detector response); MIM, plain and
structured (each image's masks drawn before its steps from its own stream: its run's generator,
seeded as alone; the losses in vmap-able torch ops, ``masking``); CoTTA (per replica a stacked
teacher, the EMA of its own student, and the restore to its own start drawn from its own seed, in
the fused step's order through ``update(after_adam=...)``); fp32, eager. A replica method runs the
model in the mode it was given unless it ``trains`` (Tent), as the loop does.
Anything else (another method, those Tent options, ``amp``, graph mode) runs the records one by one
through ``session.run`` with a :class:`ParallelFallbackWarning` saying why: their steps decide on
the host per image, or their loss or draws are not split per image here yet.
"""
from __future__ import annotations

import importlib
import time
import warnings
from typing import Any, Callable

import torch
from torch.func import functional_call, vmap

from . import guards
from .common import StepStats
from .engine import read
from .kernels.constants import CLIP_EPS, FMIX32_M1, FMIX32_M2, MASK32, UNIFORM_BITS, restore_key
from .methods.loop import NORM_BUFFER_SUFFIXES, RunContext, StepOutcome, base_entry
from .seam import integration as _ref


class ParallelFallbackWarning(UserWarning):
    """``run_parallel`` adapted records one by one instead of K at once, saying why."""


def check_k(k: Any) -> int:
    """``k`` as a positive int, else a clear error."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"yolozu_ttt: run_parallel: k must be an int >= 1 (got {k!r})")
    if k < 1:
        raise ValueError(f"yolozu_ttt: run_parallel: k must be >= 1 (got {k})")
    return k


def replica_method(session: Any, loop: Any) -> tuple[str | None, ReplicaMethod | None]:
    """(why these runs cannot be adapted K at once or None, the method's replica step)."""
    method = str(session.config.method or "tent").lower()
    cls = getattr(importlib.import_module(f"{__package__}.methods.{method}"), "REPLICA", None)
    if cls is None:
        return f"method {method!r} is not sample-parallel yet", None
    if session.amp != "off":
        return f"amp={session.amp}: mixed precision is not sample-parallel yet", None
    if session.graph:
        return "graph mode is not sample-parallel yet", None
    if any(p.dtype != torch.float32 for p in loop.arena.params):
        return "parameters other than float32", None
    rmethod = cls(session, loop)
    return rmethod.why_not(), rmethod


class Replicas:
    """K replicas of a bound session's adapted state (see the module docstring)."""

    def __init__(self, loop: Any, k: int):
        self.loop, self.k = loop, k
        model = loop.model
        chosen = {id(p): i for i, p in enumerate(loop.arena.params)}
        named = list(model.named_parameters())
        self.names = [n for n, p in named if id(p) in chosen]
        self.params = [p for n, p in named if id(p) in chosen]
        self.shared = {n: p for n, p in named if id(p) not in chosen}
        self.buffer_names = [n for n, b in model.named_buffers() if b is not None and n.endswith(NORM_BUFFER_SUFFIXES)]
        buffers = dict(model.named_buffers())
        self.model_buffers = [buffers[n] for n in self.buffer_names]
        with torch.no_grad():
            self.values = [p.detach().unsqueeze(0).repeat(k, *([1] * p.ndim)).requires_grad_() for p in self.params]
            self.buffers = [b.detach().unsqueeze(0).repeat(k, *([1] * b.ndim)) for b in self.model_buffers]
            self.base = [v.detach().clone() for v in self.values]
            self.exp_avg = [torch.zeros_like(v) for v in self.values]
            self.exp_avg_sq = [torch.zeros_like(v) for v in self.values]
        self.steps = [0] * len(self.values)
        self.active = torch.ones(k, dtype=torch.bool, device=self.values[0].device)

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        """The active mask shaped to broadcast against the stacked ``t``."""
        return self.active.view((self.k,) + (1,) * (t.ndim - 1))

    def backward(self, loss: Callable[..., Any], x: torch.Tensor, *per_image: Any) -> Any:
        """The K replicas' forwards on their K images ``x`` (K, B, ...) in one batched call, and one
        backward of their summed losses into the stacked leaves (their ``.grad``).

        ``loss(output, *per_image_i)`` is one image's loss from its model output: a scalar, or a
        tuple whose first item is the loss and whose others are returned too; ``per_image`` are
        stacked (K, ...) inputs sliced per image (e.g. masks). Returns the detached (K,) losses, or
        the tuple of detached stacked results."""
        return self.backward_passes(lambda net, image, *extra: loss(net(image), *extra), x, *per_image)

    def backward_passes(self, passes: Callable[..., Any], x: torch.Tensor, *per_image: Any) -> Any:
        """:meth:`backward` for a method whose passes call the model themselves (several views, keyword
        inputs): ``passes(net, image, *per_image_i)`` returns one image's loss (or a tuple led by it),
        ``net(*args, **kwargs)`` being the model with replica i's state."""
        for v in self.values:
            v.grad = None
        got = self.map(passes, x, *per_image)
        first = got[0] if isinstance(got, tuple) else got
        first.sum().backward(inputs=self.values)
        return tuple(t.detach() for t in got) if isinstance(got, tuple) else got.detach()

    def map(self, fn: Callable[..., Any], x: torch.Tensor, *per_image: Any, module: Any = None,
            values: list[torch.Tensor] | None = None) -> Any:
        """``fn(net, image, *per_image_i)`` for the K images in one ``vmap``: ``net`` is the loop's model
        with replica i's selected parameters and norm buffers, or ``module`` (a copy of the model with
        its own buffers, e.g. CoTTA's teacher) with slice i of ``values`` (stacked like the replicas'
        values) as its selected parameters."""
        model = self.loop.model if module is None else module
        values = self.values if values is None else values
        buffers, buffer_names = (self.buffers, self.buffer_names) if module is None else ([], [])
        names, shared = self.names, self.shared

        def one(values, buffers, image, *extra):
            state = {**shared, **dict(zip(names, values)), **dict(zip(buffer_names, buffers))}
            return fn(lambda *args, **kwargs: functional_call(model, state, args, kwargs or None), image, *extra)

        return vmap(one)(values, buffers, x, *per_image)

    def update(self, lr: float, max_grad_norm: float | None, betas=(0.9, 0.999), eps: float = 1e-8,
               after_adam: Callable[[], Any] | None = None) -> torch.Tensor:
        """Clip and Adam per replica (active ones only), then ``after_adam()`` (CoTTA's teacher EMA and
        restore: the fused step's order); returns the (4, K) norms of the final values: grad, clipped
        grad, update, total update (float64, unread)."""
        with torch.no_grad():
            live = [i for i, v in enumerate(self.values) if v.grad is not None]
            grads = [self.values[i].grad for i in live]
            norm = per_replica_norm(grads, self.k)
            clipped = norm
            if max_grad_norm is not None:
                coef = (float(max_grad_norm) / (norm.float() + CLIP_EPS)).clamp(max=1.0)
                for g in grads:
                    g.mul_(coef.view((self.k,) + (1,) * (g.ndim - 1)))
                clipped = per_replica_norm(grads, self.k)
            before = [v.detach().clone() for v in self.values]
            b1, b2 = betas
            for i, g in zip(live, grads):
                v, m, s = self.values[i], self.exp_avg[i], self.exp_avg_sq[i]
                self.steps[i] += 1
                step = self.steps[i]
                on = self.mask(v)
                m.copy_(torch.where(on, m * b1 + g * (1 - b1), m))
                s.copy_(torch.where(on, s * b2 + g * g * (1 - b2), s))
                bias1, bias2 = 1 - b1 ** step, 1 - b2 ** step
                denom = (s.sqrt() / (bias2 ** 0.5)).add_(eps)
                v.copy_(torch.where(on, v.addcdiv(m, denom, value=-lr / bias1), v))
            if after_adam is not None:
                after_adam()
            update = per_replica_norm([v - b for v, b in zip(self.values, before)], self.k)
            total = per_replica_norm([v - b for v, b in zip(self.values, self.base)], self.k)
            return torch.stack([norm, clipped, update, total])

    def restore_to_base(self, prob: float, seeds: list[int], counter: int) -> torch.Tensor:
        """CoTTA's stochastic restore per active replica: element j of a parameter back to replica i's
        start where the fused step's draw for (``seeds[i]``, ``counter``, its arena group, its offset
        there + j) is below ``prob`` (:func:`restore_hits`). Returns the (K,) float64 restored counts."""
        arena = self.loop.arena
        where = {id(p): (i, offset) for i, g in enumerate(arena.groups) for p, offset in zip(g.params, g.offsets)}
        device = self.active.device
        keys = {i: torch.tensor([restore_key(seed, counter, i) for seed in seeds], dtype=torch.int64, device=device)
                for i in range(len(arena.groups))}
        counts = torch.zeros(self.k, dtype=torch.float64, device=device)
        with torch.no_grad():
            for p, v, base in zip(self.params, self.values, self.base):
                group, offset = where[id(p)]
                hit = restore_hits(offset, v[0].numel(), keys[group], prob) & self.active[:, None]
                v.copy_(torch.where(hit.view_as(v), base, v))
                counts += hit.sum(dim=1)
        return counts

    def snapshot(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the parameters and norm buffers (before a step)."""
        return [v.detach().clone() for v in self.values], [b.clone() for b in self.buffers]

    def restore(self, i: int, saved: list[torch.Tensor], *, buffers: bool) -> None:
        """Replica ``i``'s parameters (or norm buffers) back to ``saved``'s slice ``i``."""
        targets = self.buffers if buffers else self.values
        with torch.no_grad():
            for t, s in zip(targets, saved):
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


def per_replica_norm(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
    """The L2 norm of each replica's slice over all ``tensors`` (K,) in float64."""
    total = torch.zeros(k, dtype=torch.float64, device=tensors[0].device if tensors else None)
    for t in tensors:
        total += t.detach().reshape(k, -1).double().pow(2).sum(dim=1)
    return total.sqrt()


def _mul32(h: torch.Tensor, m: int) -> torch.Tensor:
    """``h * m mod 2^32`` for int64 ``h`` in [0, 2^32), without int64 overflow (16-bit halves)."""
    return (((((h >> 16) * m) & 0xFFFF) << 16) + (h & 0xFFFF) * m) & MASK32


def restore_hits(offset: int, n: int, keys: torch.Tensor, prob: float) -> torch.Tensor:
    """The fused restore's draws in torch ops: (K, n) where element ``offset + j`` of its arena group
    goes back to its base, ``(fmix32((offset + j) ^ key_i) >> 8) * 2^-24 < prob`` for the (K,) int64
    ``keys`` (``restore_key(seed_i, counter, group)``), bit-identical to both engines' draws."""
    h = (torch.arange(offset, offset + n, dtype=torch.int64, device=keys.device)[None, :] ^ keys[:, None]) & MASK32
    for shift, mul in ((16, FMIX32_M1), (13, FMIX32_M2)):
        h = _mul32(h ^ (h >> shift), mul)
    h = h ^ (h >> 16)
    return (h >> (32 - UNIFORM_BITS)).to(torch.float32) * (2.0 ** -UNIFORM_BITS) < prob


class _ReplicaRollback:
    """What ``RunContext.finish_step`` rolls back, for one replica: its parameters and buffers."""

    def __init__(self, replicas: Replicas, i: int, saved: tuple[list[torch.Tensor], list[torch.Tensor]]):
        self.replicas, self.i, self.saved = replicas, i, saved

    def restore_snapshot(self) -> None:
        self.replicas.restore(self.i, self.saved[0], buffers=False)

    def drop_snapshot(self) -> None:
        pass

    def restore(self) -> None:
        self.replicas.restore(self.i, self.saved[1], buffers=True)


class ReplicaMethod:
    """What makes a method sample-parallel: its K-replica step and its per-image outcome.

    ``run_group`` owns what every method shares (contexts, snapshots, guards per replica, the one
    read per step, loading replica i for ``on_image``); a method's replica class supplies:

    - ``why_not(session, loop)``: why these runs cannot be adapted K at once (None: they can);
    - ``begin(replicas, records, ctxs)``: per-group state (e.g. per-image generators);
    - ``step(replicas, x, step)``: the passes and the update for the K images ``x`` (K, B, ...),
      nothing read: a (rows, K) float64 tensor, column i image i's values;
    - ``outcome(i, column, step)``: image i's :class:`StepOutcome` from its read column (per-image
      method state, e.g. EATA's skip streak, is the replica class's, indexed by i);
    - ``after_step(i, outcome)``: after image i's kept step.
    """

    name = ""
    #: the passes put the model in training mode (Tent's, as its ``passes``); else it runs in the mode
    #: it was given, as the loop runs MIM, CoTTA, EATA and SAR
    trains = False

    def __init__(self, session: Any, loop: Any):
        self.session, self.loop, self.config, self.method = session, loop, session.config, loop.method

    def why_not(self) -> str | None:
        return None

    def begin(self, replicas: Replicas, records: list[Any], ctxs: list[RunContext]) -> None:
        """Per-group state before the first step."""

    def step(self, replicas: Replicas, x: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def outcome(self, i: int, column: list[float], step: int) -> StepOutcome:
        raise NotImplementedError

    def after_step(self, i: int, outcome: StepOutcome) -> None:
        """After image i's kept step (the loop's ``method.after_step``)."""


def norm_stats(column: list[float]) -> StepStats:
    """The four norms of ``Replicas.update``'s rows, as the fused engine's stats."""
    grad, clipped, update, total = column[:4]
    return StepStats(grad_norm=grad, grad_norm_clipped=clipped, update_norm=update, total_update_norm=total,
                     anchor_loss=0.0, clip_coef=1.0, restored=0.0)


def run_group(session: Any, records: list[Any], on_image: Callable | None, first_index: int,
              rmethod: ReplicaMethod) -> list[Any]:
    """Adapt ``records`` (a group of at most K) at once on the session's bound loop; see the module."""
    from .run import report as make_report, seed_generator

    loop, config = session.loop, session.config
    model, method, name = loop.model, loop.method, rmethod.name
    steps = int(config.steps)
    ctxs, batches = [], []
    for record in records:
        got = batches_of(session, record)
        batches.append(got)
        ctxs.append(RunContext(model=model, batches=got, config=config, method=name, steps=steps, generator=None,
                               updated_param_count=loop.updated_param_count, backend="torch"))
        seed_generator(ctxs[-1])  # each image's own stream, seeded as its run alone seeds it
    k = len(records)
    loop.arena.reset_values()
    loop.origin.restore()
    was_training = bool(model.training)
    memory_start = _ref._memory_start(model)
    start = time.time()
    replicas = Replicas(loop, k)
    keep = guards.needs_snapshot(config)
    rollback = bool(config.rollback_on_stop)
    rmethod.begin(replicas, records, ctxs)
    try:
        if rmethod.trains:
            model.train()
        for step in range(steps):
            x = torch.stack([b[step % len(b)] for b in batches])
            saved = replicas.snapshot() if (keep or rollback or not bool(replicas.active.all())) else ([], [])
            table = rmethod.step(replicas, x, step)
            if saved[1]:
                replicas.freeze_buffers(saved[1])
            rows = int(table.shape[0])
            values = read(table.t())  # (K, rows) flattened: image i's column is values[i*rows:(i+1)*rows]
            active = replicas.active.tolist()
            for i, ctx in enumerate(ctxs):
                if not active[i]:
                    continue
                outcome: StepOutcome = rmethod.outcome(i, values[i * rows:(i + 1) * rows], step)
                ctx.forward_calls += outcome.forwards
                ctx.backward_calls += outcome.backwards
                ctx.optimizer_steps += outcome.optimizer_steps
                ctx.abstained_steps += int(outcome.abstained)
                entry = base_entry(step, outcome, method.preclip_norm_reported, config.max_grad_norm)
                if outcome.skipped:
                    stop = ctx.skip_step(entry, outcome.skip_stop)
                else:
                    undo = _ReplicaRollback(replicas, i, saved)
                    stop = ctx.finish_step(entry, float(outcome.loss), arena=undo, buffers=undo if rollback else None,
                                           params_changed=not outcome.abstained, method_stop=outcome.method_stop)
                    if not stop:
                        rmethod.after_step(i, outcome)
                if stop:
                    replicas.active[i] = False
            if not bool(replicas.active.any()):
                break
    finally:
        if not was_training:
            model.eval()
    seconds = float(time.time() - start) / k
    reports = [make_report(ctx, name, b, seconds, memory_start) for ctx, b in zip(ctxs, batches)]
    for i, (record, rep) in enumerate(zip(records, reports)):
        replicas.load(i)
        if on_image is not None:
            on_image(first_index + i, record, rep)
    return reports


def run_parallel(session: Any, records: list[Any], k: int, on_image: Callable | None = None) -> list[Any]:
    """See ``TTTSession.run_parallel``."""
    k = check_k(k)
    records = list(records)
    if not records:
        return []
    reports: list[Any] = []

    def one_by_one(todo: list[Any], first: int) -> None:
        for j, record in enumerate(todo):
            rep = session.run([record])
            reports.append(rep)
            if on_image is not None:
                on_image(first + j, record, rep)

    # the first record runs alone: it binds the session with run_ttt's checks and messages
    one_by_one(records[:1], 0)
    loop = session.loop
    why = "the fused engine does not run here (see the ReferenceFallbackWarning)" if loop is None else None
    if why is None and k > 1:
        why, rmethod = replica_method(session, loop)
    if why is not None and k > 1:
        warnings.warn(f"yolozu_ttt: run_parallel adapts these records one by one: {why}",
                      ParallelFallbackWarning, stacklevel=3)
    if why is not None or k == 1:
        one_by_one(records[1:], 1)
        return reports
    for first in range(1, len(records), k):
        group = records[first:first + k]
        shapes = {tuple(tuple(b.shape) for b in batches_of(session, r)) for r in group}
        if len(shapes) > 1:
            warnings.warn("yolozu_ttt: run_parallel adapts a group one by one: its records' batches differ in "
                          f"shape ({sorted(shapes)})", ParallelFallbackWarning, stacklevel=3)
            one_by_one(group, first)
            continue
        reports.extend(run_group(session, group, on_image, first, rmethod))
    return reports


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
