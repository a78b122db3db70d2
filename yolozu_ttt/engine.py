"""UpdateEngine: the fused update over a ParamArena, the backend seam and the one graph cache.

One signature over two implementations, like ``torch.optim.adam``'s single/foreach/fused: CPU
groups run the C++ engine (``yolozu_ttt._C``); CUDA groups, and CPU groups under
``TRITON_INTERPRET=1``, run ``yolozu_ttt.kernels.update``. This module is the only place that
chooses a backend (:func:`backend_for`), builds, binds and releases its group objects
(:class:`BackendGroups`, owned by the engine; the arena holds only buffers) and calls it. Both
write their scalars into a float64 buffer on the arena's device in the layouts of
``yolozu_ttt.common``; the engine reads it back once per step (with the caller's extra scalars)
and returns a :class:`StepStats`.

A step's options are one frozen :class:`StepSpec`, built once per run (a method's variants, e.g.
CoTTA's restore step, once each), validated once here (the backends keep only memory-safety
checks), handed to the backend as one object (the Triton engine takes the spec itself, the C++
engine its ``_C.StepOptions``, built once per spec: :attr:`StepSpec.native`) and used in the
key of the run's CUDA graphs (:class:`GraphCache`: the update alone here, the whole step in
``yolozu_ttt.capture``).

One adaptation step, as data::

    batch -> model forward (autograd, as in the reference)
          -> loss op (yolozu_ttt.ops: fused entropy / masked reconstruction)
          -> backward for the selected parameters only: grads accumulate into the arena's flat buffer
          -> ONE fused update call over the arena (its options: the run's StepSpec), in these steps
             (the same numbers in csrc/update.cpp and kernels/update_kernels.py):
               1 anchor gradient (EATA) -> 2 grad norm -> 3 clip coefficient -> 4 Adam
               -> 5 pre-step snapshot -> 6 teacher EMA (CoTTA) -> 7 stochastic restore (CoTTA)
               -> 8 update / total-update norms
               (a gated step, EATA's, applies nothing of 1-7 when its device-side gate is closed)
          -> ONE host read of a StepStats (the same float64 layout from both backends,
             yolozu_ttt.common.STAT_KEYS) with the step's losses -> the guards (keep, or stop + rollback)

Dispatch is by device: CUDA tensors take the Triton kernels, CPU tensors the C++ engine; with
``TRITON_INTERPRET=1`` set before import, CPU tensors take the Triton kernels in the interpreter, so
the GPU code path runs (and is tested in CI) anywhere (Triton 3.6's interpreter with NumPy 2 cannot
loop to a runtime bound: those tests skip there, saying so). The C++ engine is built without
``-ffast-math`` (IEEE order) but with ``-fno-math-errno`` (lets the Adam loop vectorise), and sums
every reduction in fixed-size chunks in a fixed order: bit-identical results whatever the thread
count.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .common import (CUDA_GRAPH, GRAD_STAT_KEYS, SAR_STAT_KEYS, STAT_KEYS, RowStats, StepStats, check_step_options,
                     use_triton)
from .kernels.constants import CLIP_EPS

if TYPE_CHECKING:  # the arena imports this module (backend choice), never the other way at run time
    from .arena import ParamArena

GRAD_NORM, ANCHOR_VALUE = (GRAD_STAT_KEYS.index(k) for k in ("grad_norm", "anchor_loss"))
#: the run's CUDA graphs kept at most (the update alone, or whole steps by input layout)
MAX_GRAPHS = 8


# ---- the backend seam ------------------------------------------------------------------------
def backend_for(tensor: torch.Tensor) -> str:
    """The update backend of a parameter group on ``tensor``'s device: "triton" or "cpp"."""
    return "triton" if use_triton(tensor) else "cpp"


def backend_module(backend: str) -> Any:
    """The module with the fused functions of a backend: ``yolozu_ttt._C`` ("cpp") or Triton's."""
    if backend == "cpp":
        from . import _native

        return _native.require_native()
    from .kernels import update

    return update


def arena_rows(arena: Any) -> int | None:
    """The K rows of an arena of rows (``yolozu_ttt.rows.RowArena``), None for a ``ParamArena``
    (one run: K = 1 with a single run's stats)."""
    return getattr(arena, "rows", None)


def build_group(binding: Any, rows: int = 1) -> Any:
    """The backend's group object (``_C.ArenaGroup`` or ``kernels.update.TritonArenaGroup``) over one
    arena group's buffers (``arena.GroupBinding``), with its snapshot as bound now, ``rows`` rows."""
    buffers = binding.buffers
    base = buffers.base if buffers.backend == "triton" else binding.base
    impl = backend_module(buffers.backend)
    cls = impl.TritonArenaGroup if buffers.backend == "triton" else impl.ArenaGroup
    return cls(buffers.flat, buffers.grad, buffers.exp_avg, buffers.exp_avg_sq, base, binding.snap,
               buffers.offsets, buffers.sizes, buffers.has_grad, rows=rows)


class BackendGroups:
    """The backend's group objects of one arena, owned by the :class:`UpdateEngine` that made them.

    Built once over the arena's buffers (an arena of rows: K rows per group) and reused for every
    step and every later run of the engine; the arena holds only buffers and tells its one listener
    (this object, held weakly) when a group's snapshot buffer changes and when it closes.
    :meth:`close` (on the arena's close, or the engine's) drops the run's tensors from the objects
    (snapshot, teacher, the C++ engine's base: the originals, which must not be kept alive) and
    the objects themselves.
    """

    def __init__(self, arena: "ParamArena"):
        self.backend = arena.backend
        rows = arena_rows(arena) or 1
        self.objects: list[Any] = [build_group(binding, rows) for binding in arena.groups]
        self._flats = [binding.buffers.flat for binding in arena.groups]  # the C++ base after close
        self._arena = weakref.ref(arena)
        arena.listen(self)

    @property
    def live(self) -> list[Any]:
        """The group objects, to run a step over (an error once closed)."""
        if self._flats is None:
            raise RuntimeError("yolozu_ttt: the update engine is closed (its arena was closed)")
        return self.objects

    def snapshot_changed(self, index: int, snap: Any) -> None:
        """The arena bound ``snap`` (or None) as group ``index``'s snapshot buffer."""
        self.objects[index].set_snapshot(snap)

    def set_teacher(self, buffers: Sequence[Any] | None) -> None:
        """CoTTA's teacher buffers, one per group, or None."""
        for i, g in enumerate(self.objects):
            g.set_teacher(None if buffers is None else buffers[i])

    def arena_closed(self) -> None:
        self.close()

    def close(self) -> None:
        """Drop the run's tensors from the objects and the objects, and stop listening to the
        arena (another engine may bind it then); idempotent."""
        if self._flats is None:
            return
        arena = self._arena()
        if arena is not None:  # its listener is this (a second engine is refused while this one is open)
            arena.listen(None)
        for g, flat in zip(self.objects, self._flats):
            g.set_snapshot(None)
            g.set_teacher(None)
            if self.backend == "cpp":
                g.set_base(flat)
        self.objects, self._flats = [], None


# ---- one step's options ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The options of one fused step (hashable: part of a graph's key); the fields are documented
    at ``kernels.update.fused_step``, which takes the spec itself.

    ``gated``: the step reads the gate :meth:`UpdateEngine.gate` set on the device. The restore
    counter is the step's own (``UpdateEngine.step(counter=...)``), uploaded per step.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None
    anchor_lambda: float = 0.0
    write_snapshot: bool = True
    ema_momentum: float | None = None
    restore_prob: float = 0.0
    restore_seed: int = 0
    gated: bool = False

    def __post_init__(self) -> None:
        """The one validation of a step's options (the backends keep only memory-safety checks)."""
        norm = None if self.max_grad_norm is None else float(self.max_grad_norm)
        ema = None if self.ema_momentum is None else float(self.ema_momentum)
        values = dict(lr=float(self.lr), betas=(float(self.betas[0]), float(self.betas[1])), eps=float(self.eps),
                      max_grad_norm=norm, anchor_lambda=float(self.anchor_lambda),
                      write_snapshot=bool(self.write_snapshot), ema_momentum=ema,
                      restore_prob=float(self.restore_prob), restore_seed=int(self.restore_seed) & 0xFFFFFFFFFFFFFFFF,
                      gated=bool(self.gated))
        check_step_options(values["lr"], *values["betas"], values["restore_prob"])
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def replace(self, **options: Any) -> "StepSpec":
        """This spec with ``options`` changed (validated again)."""
        return dataclasses.replace(self, **options) if options else self

    @functools.cached_property
    def native(self) -> Any:
        """This spec as the C++ engine's ``_C.StepOptions`` (what ``_C.fused_step`` takes), built
        on first use and kept on the spec, so once per run."""
        return backend_module("cpp").StepOptions(self)


# ---- the host read ---------------------------------------------------------------------------
_PINNED = threading.local()  # per thread: {device: pinned float64 host buffer} for ``read``


def _pinned(device: torch.device, n: int) -> torch.Tensor:
    """This thread's pinned float64 host buffer for ``device``, at least ``n`` long (reused: every
    ``read`` has finished with it before it returns)."""
    bufs = getattr(_PINNED, "bufs", None)
    if bufs is None:
        bufs = _PINNED.bufs = {}
    buf = bufs.get(device)
    if buf is None or buf.numel() < n:
        buf = bufs[device] = torch.empty(max(n, 64), dtype=torch.float64, pin_memory=True)
    return buf[:n]


def read(*values: Any) -> list[float]:
    """Scalars (device tensors of any shape, or Python numbers) as floats, in one host read.

    Python numbers stay on the host; the tensors are gathered in float64 on the first one's device
    and, on CUDA, copied into pinned host memory with one non-blocking copy and one stream sync.
    """
    tensors = [v.detach().reshape(-1) for v in values if torch.is_tensor(v)]
    if not tensors:
        return [float(v) for v in values]
    device = tensors[0].device
    parts = [t.to(device=device, dtype=torch.float64) for t in tensors]
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    if device.type == "cuda":
        host = _pinned(device, flat.numel())
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()  # the step's one sync
        got = host.tolist()
    else:
        got = flat.tolist()
    if len(tensors) == len(values):
        return got
    out, i = [], 0
    for v in values:
        if torch.is_tensor(v):
            n = v.numel()
            out.extend(got[i:i + n])
            i += n
        else:
            out.append(float(v))
    return out


# ---- graphs ----------------------------------------------------------------------------------
class GraphFallbackWarning(UserWarning):
    """Graph mode (``run_ttt(graph=True)``, ``YOLOZU_TTT_CUDA_GRAPH=1``) runs a step, or part of
    it, eagerly, saying why."""


class GraphCache(dict):
    """The run's CUDA graphs by key (the step's spec and launch key, and for a whole step its input
    layouts); a key's value is what its user keeps (None: seen once, not captured yet). Full at
    ``MAX_GRAPHS``: emptied before the next one goes in."""

    def add(self, key: Any, value: Any) -> Any:
        if key not in self and len(self) >= MAX_GRAPHS:
            self.clear()
        self[key] = value
        return value


class _EagerLaunch:
    """A prepared update of a backend without a host/launch split (the C++ engine): ``run()`` runs
    ``fn(groups, out, options, counter, gate, seeds)`` as prepared, so ``key()`` is all of its
    per-step arguments (a replay of ``run`` is the same step only for the same ones)."""

    __slots__ = ("run", "args")

    def __init__(self, fn: Any, groups: list[Any], out: torch.Tensor, options: Any, counter: int, gate: Any,
                 seeds: Any):
        self.run = functools.partial(fn, groups, out, options, counter, gate, seeds)
        self.args = (options, counter, gate, seeds)

    def key(self) -> tuple:
        return self.args


class UpdateEngine:
    """Adam (torch defaults) with clipping, snapshot and update norms, fused over the arena.

    Over an arena of K rows (``yolozu_ttt.rows.RowArena``: K replicas), one step steps every row,
    each with its own grad norm, clip coefficient, Adam step counts, gate, anchor, ascent, EMA and
    restore seed: the same backends' calls (K = 1 is one run's step), the stats a
    :class:`~yolozu_ttt.common.RowStats` read once; :meth:`stop_rows` freezes rows.
    """

    def __init__(self, arena: "ParamArena", *, lr: float, max_grad_norm: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, scaler: Any = None,
                 graph: bool = CUDA_GRAPH):
        self.arena = arena
        #: the run's step options; a method's own are ``spec.replace(...)`` of it
        self.spec = StepSpec(lr=lr, betas=betas, eps=eps, max_grad_norm=max_grad_norm)
        self.backend = arena.backend
        self._impl = backend_module(self.backend)
        #: the backend's group objects, this engine's own (the arena tells them of its buffers' changes)
        self.groups = BackendGroups(arena)
        #: K rows (replicas) of an arena of rows, else None (one run, whose stats are a StepStats)
        self.rows = arena_rows(arena)
        k = self.rows or 1
        self._stats = torch.empty(k * len(STAT_KEYS), dtype=torch.float64, device=arena.device)
        self._grad_stats = torch.empty(k * len(GRAD_STAT_KEYS), dtype=torch.float64, device=arena.device)
        self._sar_stats = torch.empty(k * len(SAR_STAT_KEYS), dtype=torch.float64, device=arena.device)
        self._gate = torch.ones(k, dtype=torch.float64, device=arena.device)  # see ``gate``
        self._active = torch.ones(k, dtype=torch.float64, device=arena.device)  # see ``stop_rows``
        self.stopped: set[int] = set()  #: the rows ``stop_rows`` froze
        self._seeds: tuple[tuple, tuple[int, ...]] = ((), ())  # the last seeds given and their uint64s
        self.total_update_norm: Any = 0.0 if self.rows is None else (0.0,) * k  # of the last applied step
        #: graph mode: asked for and possible (a CUDA arena on the Triton engine)
        self.graph_mode = bool(graph) and self._graph_possible()
        #: the run's one graph cache (None: no graphs); ``update_graphs``: the update alone is captured
        self.graphs: GraphCache | None = GraphCache() if self.graph_mode else None
        self.update_graphs = self.graph_mode
        self.scaler = scaler  # fp16's amp.LossScaler (the grads arrive unscaled, with its overflow flag)

    def reserve_steps(self, steps: int) -> None:
        """Size what grows with the step count (the Triton engine's bias-correction table) for a run
        of ``steps`` steps up front: a captured step's pointers then hold for the whole run."""
        if self.backend == "triton":
            for g in self.groups.live:
                g.reserve_steps(steps)

    def reset_state(self) -> None:
        """A fresh run on the same groups (a session's next run): Adam moments and step counts
        reset, no update applied yet, the gate open."""
        for g in self.groups.live:
            g.reset_state()
        self.total_update_norm = 0.0 if self.rows is None else (0.0,) * self.rows
        self._gate.fill_(1.0)
        self._active.fill_(1.0)
        self.stopped.clear()

    def gate(self, open_: torch.Tensor) -> None:
        """Decide on the device whether the next gated step (``StepSpec.gated``) applies: where
        ``open_`` (a boolean scalar on the arena's device; K of them over K rows) is false it
        changes nothing (no parameter, moment or step count), as if no parameter had a grad. No
        host read. A stopped row stays closed."""
        torch.mul(open_.reshape(-1), self._active, out=self._gate)  # the same launch whether or not a row stopped

    def stop_rows(self, rows: Sequence[int], *, rollback: bool = True) -> None:
        """Rows ``rows`` (of an arena of rows) stop: each is rolled back from its own snapshot row
        (the pre-step values of the last step; not where ``rollback`` is False) and frozen from now
        on (every later step applies nothing to it, as a closed gate), while the others go on.
        Until :meth:`reset_state`."""
        rows = [int(r) for r in rows]
        if self.rows is None or any(not 0 <= r < self.rows for r in rows):
            raise ValueError(f"yolozu_ttt: stop_rows needs rows of an arena of rows, got {rows}")
        if not rows:
            return
        if rollback:
            self.arena.restore_rows(rows)
        self._active[rows] = 0.0
        self._gate.mul_(self._active)
        self.stopped.update(rows)

    def step(self, spec: StepSpec | None = None, *, counter: int = 0, extra: Sequence[Any] = (),
             seeds: Sequence[int] | None = None, **options: Any) -> tuple[Any, list[float]]:
        """Apply one update of ``spec`` (the run's :attr:`spec` with ``options`` by default) at
        restore counter ``counter``; return its stats (a StepStats, or over K rows a RowStats) and
        the values of ``extra`` (one host read): :meth:`prepare`, the launch, :meth:`collect`.
        ``seeds``: each row's restore seed (K ints; None: ``spec.restore_seed`` for every row).

        With a loss scaler (fp16), the overflow flag is read first (so a step reads twice): an
        overflowed step applies nothing and returns an inf grad norm for the guards.
        """
        spec = (spec or self.spec).replace(**options)
        if self.scaler is not None:
            overflow = read(self.scaler.found_inf)[0] != 0.0
            self.scaler.update(overflow)
            if overflow:
                return self._overflowed(spec, extra)
        launch = self.prepare(spec, counter, seeds)
        if self.update_graphs:
            self._graph_run(launch)
        else:
            launch.run()
        return self.collect(extra)

    def prepare(self, spec: StepSpec, counter: int = 0, seeds: Sequence[int] | None = None) -> Any:
        """The host half of one update: the snapshot bookkeeping and the backend's checks and
        uploads. Returns the launch: ``run()`` enqueues the kernels (nothing is applied before),
        ``key()`` names what a CUDA graph of ``run()`` bakes in (the C++ engine's: every argument).

        ``spec.write_snapshot``: the step writes the pre-step values into the arena's snapshot (held
        in the grad buffer unless one is already held, e.g. SAR's backup, which is used as it is).
        """
        if spec.write_snapshot:
            self.arena.hold_snapshot(in_grad=True)
        # over K rows the launch always takes the rows' gate: a stop never changes it (graph mode)
        gate = self._gate if spec.gated else (self._active if self.stopped or self.rows is not None else None)
        counter = int(counter) if spec.restore_prob > 0.0 else 0  # only the restore draws from it
        seeds = self._row_seeds(seeds) if seeds is not None and spec.restore_prob > 0.0 else None
        if self.backend == "triton":
            return self._impl.prepare_step(self.groups.live, self._stats, spec, counter, gate, seeds)
        return _EagerLaunch(self._impl.fused_step, self.groups.live, self._stats, spec.native, counter, gate, seeds)

    def _row_seeds(self, seeds: Sequence[int]) -> tuple[int, ...]:
        """``seeds`` checked (one per row) as uint64s, converted again only when they change (a run
        passes the same ones every step)."""
        given = tuple(seeds)
        if given != self._seeds[0]:
            row_seeds = tuple(int(s) & 0xFFFFFFFFFFFFFFFF for s in given)
            if len(row_seeds) != (self.rows or 1):
                raise ValueError(f"yolozu_ttt: seeds must have one seed per row ({self.rows or 1}), got {len(row_seeds)}")
            self._seeds = (given, row_seeds)
        return self._seeds[1]

    def collect(self, extra: Sequence[Any] = ()) -> tuple[Any, list[float]]:
        """The launched update's stats (a StepStats; over K rows a RowStats) and the values of
        ``extra``, in the step's one host read."""
        values = read(self._stats, *extra)
        n = self._stats.numel()
        stats = StepStats(*values[:n]) if self.rows is None else RowStats.from_values(values[:n], self.rows)
        self.total_update_norm = stats.total_update_norm
        return stats, values[n:]

    def unread_stats(self) -> torch.Tensor:
        """The last launched update's stats on the device, unread: (len(STAT_KEYS), K) float64,
        column r row r's (K = 1 for a run's arena), for a caller that reads them with its own
        values in one read (a captured sample-parallel step)."""
        return self._stats.view(self.rows or 1, len(STAT_KEYS)).t()

    def _overflowed(self, spec: StepSpec, extra: Sequence[Any]) -> tuple[StepStats, list[float]]:
        """The stats of a step whose scaled grads overflowed: nothing applied (parameters, moments and
        step count unchanged), grad norm inf; the snapshot, when asked, holds the unchanged values."""
        if spec.write_snapshot:
            self.arena.hold_snapshot(in_grad=True)
            self.arena.save_snapshot()
        anchor = self.anchor_value() if spec.anchor_lambda != 0.0 else 0.0
        values = read(anchor, *extra)
        inf = float("inf")
        stats = StepStats(grad_norm=inf, grad_norm_clipped=inf, update_norm=0.0,
                          total_update_norm=self.total_update_norm, anchor_loss=values[0],
                          clip_coef=float("nan"), restored=0.0)
        return stats, values[1:]

    # ---- graph mode: the fused update captured once, then replayed -----------------------------
    def _graph_possible(self) -> bool:
        """Whether CUDA graphs can run here (else a warning says why, and the update runs eagerly)."""
        if self.backend != "triton" or self.arena.device.type != "cuda":
            why = f"the arena runs on {self.arena.device.type} ({self.backend} engine); CUDA graphs need a CUDA arena"
            warnings.warn(f"yolozu_ttt: graph mode ignored: {why}; the fused update runs eagerly",
                          GraphFallbackWarning, stacklevel=4)
            return False
        return True

    def _graph_run(self, launch: Any) -> None:
        """A prepared launch through a CUDA graph: captured the second time the same launch key
        (scalars and pointers) comes up (the first runs eagerly, compiling the kernels) and
        replayed from then on. A capture that fails turns the update's graphs off for this engine,
        with a warning saying why."""
        graphs = self.graphs
        key = ("update", launch.key())
        graph = graphs.get(key)
        if graph is None:
            if key not in graphs:  # first sighting: eager (compiles); capture next time
                graphs.add(key, None)
                launch.run()
                return
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    launch.run()
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
                self.update_graphs = False
                warnings.warn(f"yolozu_ttt: the fused update could not be captured in a CUDA graph "
                              f"({type(exc).__name__}: {exc}); running eagerly", GraphFallbackWarning, stacklevel=4)
                launch.run()
                return
            graphs.add(key, graph)
        graph.replay()

    def idle_stats(self) -> Any:
        """The stats of a step that applies nothing (zero norms, the running total update norm)."""
        if self.rows is not None:
            k = self.rows
            return RowStats(grad_norm=(0.0,) * k, grad_norm_clipped=(0.0,) * k, update_norm=(0.0,) * k,
                            total_update_norm=tuple(self.total_update_norm), anchor_loss=(0.0,) * k,
                            clip_coef=(1.0,) * k, restored=(0.0,) * k)
        return StepStats(grad_norm=0.0, grad_norm_clipped=0.0, update_norm=0.0,
                         total_update_norm=self.total_update_norm, anchor_loss=0.0, clip_coef=1.0, restored=0.0)

    def _grad_stat(self, index: int) -> torch.Tensor:
        """Slot ``index`` of the grad stats: a device scalar, or over K rows a (K,) tensor."""
        if self.rows is None:
            return self._grad_stats[index]
        return self._grad_stats.view(self.rows, len(GRAD_STAT_KEYS))[:, index]

    def anchor_value(self) -> torch.Tensor:
        """``sum_i mean((theta_i - theta_i^0)^2)`` as a device scalar (over K rows: (K,), each row's),
        without changing anything."""
        self._impl.grad_stats(self.groups.live, self._grad_stats, 0.0, anchor_value=True)
        return self._grad_stat(ANCHOR_VALUE)

    def clip_grads(self, max_grad_norm: float | None) -> torch.Tensor:
        """The pre-clip grad norm (a device scalar; over K rows (K,), each row's); with
        ``max_grad_norm``, the grads are clipped in place like ``torch.nn.utils.clip_grad_norm_``
        (its fp32 coefficient expression), each row by its own coefficient."""
        self._impl.grad_stats(self.groups.live, self._grad_stats, 0.0)
        norm = self._grad_stat(GRAD_NORM)
        if max_grad_norm is not None:
            coef = (float(max_grad_norm) / (norm.float() + CLIP_EPS)).clamp(max=1.0)
            self.arena.scale_grads(coef)  # always, like clip_grad_norm_ (no host read of the coefficient)
        return norm

    def sar_perturb(self, rho: float, adaptive: bool) -> torch.Tensor:
        """SAR's ascent step from the current grads, with the arena's held snapshot as its backup
        (written whenever ``rho > 0``): returns the device scalars (direction norm, applied 1/0)
        unread, for the step's one read; over K rows a (K, 2) tensor, each row ascending by its
        own direction norm."""
        self._impl.sar_perturb(self.groups.live, self._sar_stats, float(rho), bool(adaptive))
        if self.rows is None:
            return self._sar_stats
        return self._sar_stats.view(self.rows, len(SAR_STAT_KEYS))

    def bind_teacher(self, buffers: Sequence[Any] | None) -> None:
        """Bind CoTTA's teacher buffers (``ParamArena.value_copies``), one per group, or unbind (None)."""
        self.groups.set_teacher(buffers)

    def close(self) -> None:
        """Release the backend's group objects (the arena's close does it too); idempotent. The
        engine runs no step after."""
        self.groups.close()
