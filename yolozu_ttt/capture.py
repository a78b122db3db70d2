"""Graph mode's whole step: forward, loss, backward and the fused update in one CUDA graph.

A step that decides nothing on the host before its update (every method's: Tent's forward,
entropy and backward; EATA's, whose selection gates the update on the device; SAR's two passes
and ascent; CoTTA's student and teacher passes; MIM's masked pass; the guards read the stats
afterwards) is the same launches every time, so after one eager warm-up step it is captured once
per input layout and replayed; the host then does per step only the snapshot bookkeeping, the
update's O(1) uploads, the input copies, ``replay()`` and the step's one read. Before anything is captured, the warm-up step's forward and backward run under a
:class:`SyncProbe`, which names every operation that would make the host wait for the device
(``.item()``, ``nonzero``, boolean indexing, device-to-host copies ...); a model with any of them
cannot be captured and keeps running eagerly (with only the fused update in a graph), with a
:class:`~yolozu_ttt.engine.GraphFallbackWarning` saying which operations and how often. A capture
that fails for another reason falls back the same way.

``StepGraph(body, arena, engine, graphs=CudaGraphs())``: ``body(*inputs) -> values`` is the
step's device work before the update (the loop's ``Method.body``: the grad buffers cleared, then
the method's forwards, losses and backwards into the arena); ``values`` are the tensors read with
the step's stats. The captured graphs live in the engine's one cache (``UpdateEngine.graphs``),
keyed by the step's inputs' layouts, its :class:`~yolozu_ttt.engine.StepSpec` and its launch. ``inputs`` are the step's batch and whatever else it draws on the host before
(MIM's patch grid): each is copied into the graph's static input before a replay.
``graphs`` is what captures and replays (:class:`CudaGraphs`): an object with ``capture(fn) ->
(graph, outputs)``, ``side_stream()`` and graphs with ``replay()``; the tests put a stand-in with
the same calls in its place, so the bookkeeping around the graph is checked on the CPU.

:class:`ReplicaGraph` is the same for sample-parallel groups (``yolozu_ttt.parallel``): a group's
whole K-replica step captured once per (K, input layouts) and replayed for every later group.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .arena import ParamArena
from .common import StepStats
from .engine import GraphFallbackWarning, StepSpec, UpdateEngine

#: aten operations that make the host wait for the device (on CUDA) whatever their arguments
SYNC_OPS = frozenset({
    "_local_scalar_dense",  # .item(), float(t), int(t), bool(t), Python control flow on a tensor
    "nonzero", "argwhere", "masked_select", "is_nonzero", "equal",  # data-dependent sizes or answers
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount", "histogram",
})
#: indexing with a boolean mask goes through ``nonzero``
MASK_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
#: copies whose direction decides: device to host (a sync), and blocking host to device (a sync;
#: a non-blocking one is not, e.g. the update's has-grad upload, which a capture leaves out)
COPY_OPS = frozenset({"_to_copy", "copy_"})
#: eager steps before the first capture (compile the kernels, warm the allocator and libraries)
WARMUP_STEPS = 1


def _is_mask(t: Any) -> bool:
    return torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8)


def _syncing_copy(func_name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether a copy makes the host wait: device to host, or host to device without ``non_blocking``."""
    src = args[1] if func_name == "copy_" and len(args) > 1 else (args[0] if args else None)
    if not torch.is_tensor(src):
        return False
    if func_name == "copy_":
        dst_device = args[0].device
        non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
    else:
        dst_device = kwargs.get("device") or src.device
        non_blocking = bool(kwargs.get("non_blocking", False))
    dst_device = torch.device(dst_device)
    if src.device.type == "cpu" and dst_device.type != "cpu":
        return not non_blocking
    return src.device.type != "cpu" and dst_device.type == "cpu"


class SyncProbe(TorchDispatchMode):
    """Records the operations under it that would stop a CUDA graph capture (see ``SYNC_OPS``).

    ``with SyncProbe() as probe: ...`` then ``probe.hits`` (a Counter of aten names; boolean
    indexing as ``"index(mask)"``, host/device copies as ``"<op>(host<->device)"``) and
    ``probe.describe()``. On the CPU the copies are no-ops and are not seen; the rest is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hits: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.hits[name] += 1
        elif name in MASK_INDEX_OPS and len(args) > 1 and any(_is_mask(t) for t in (args[1] or ())):
            self.hits[f"{name}(mask)"] += 1
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and torch.is_tensor(args[0]) \
                and (len(args) < 2 or torch.is_tensor(args[1])):
            self.hits[name] += 1
        elif name in COPY_OPS and _syncing_copy(name, args, kwargs):
            self.hits[f"{name}(host<->device)"] += 1
        return func(*args, **kwargs)

    def describe(self) -> str:
        """The hits as ``"aten.nonzero x2, aten._local_scalar_dense x1"`` (most frequent first)."""
        return ", ".join(f"aten.{name} x{count}" for name, count in self.hits.most_common())


class CudaGraphs:
    """Captures into ``torch.cuda.CUDAGraph`` on one side stream, all graphs in one memory pool."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.pool = torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """Eager work on the capture stream (the warm-up; autograd's streams then match)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)

    def capture(self, fn: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[Any, tuple[torch.Tensor, ...]]:
        """Capture ``fn`` (nothing runs yet); returns the graph and ``fn``'s static outputs. The blocks
        the allocator caches from the eager warm-up go back to the device first, so the graph's pool
        can take them (else a capture needs room for a second step's activations)."""
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            outputs = fn()
        return graph, outputs


def layouts(inputs: Sequence[torch.Tensor]) -> tuple:
    """What a graph bakes in of its inputs (a part of its key): each one's shape, strides, dtype, device."""
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs)


def static_copies(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A graph's static inputs: copies of ``inputs`` laid out alike, copied into before each replay."""
    return tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t) for t in inputs)


def replay(entry: tuple, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``entry`` = (graph, its static inputs, its static outputs): ``inputs`` copied in, one replay;
    returns the static outputs."""
    graph, statics, outputs = entry
    for static, t in zip(statics, inputs):
        static.copy_(t)
    graph.replay()
    return outputs


def mixed_precision_reason(amp: str) -> str:
    """Why a step under mixed precision ``amp`` is not captured whole."""
    return f"mixed precision ({amp}): autocast's weight-cast cache cannot live in a graph"


class StepGraph:
    """One method's whole step (``body``'s passes, then the fused update) captured per input layout
    and update spec, and replayed; see the module docstring."""

    def __init__(self, body: Callable[..., tuple[torch.Tensor, ...]], arena: ParamArena, engine: UpdateEngine,
                 graphs: Any = None):
        self.body, self.arena, self.engine = body, arena, engine
        self.graphs = graphs if graphs is not None else CudaGraphs(arena.device)
        self.warmed = 0
        self.off: str | None = None  # why the step runs eagerly from now on
        self.replays = 0

    def step(self, inputs: Sequence[Any], spec: StepSpec, *, counter: int = 0) -> tuple[StepStats, list[float]]:
        """One step of ``body(*inputs)`` and the update ``spec`` at restore counter ``counter``: the
        engine's stats and the values of ``body``'s outputs, in one host read."""
        if self.off is not None or not all(torch.is_tensor(t) for t in inputs):
            return self._eager(inputs, spec, counter)
        if self.warmed < WARMUP_STEPS:
            self.warmed += 1
            with self.graphs.side_stream():
                return self._eager(inputs, spec, counter, probe=True)
        # the has-grad flags stay as the warm-up's backward set them (a replay runs no hooks)
        launch = self.engine.prepare(spec, counter)
        key = ("step", layouts(inputs), spec, launch.key())
        entry = self.engine.graphs.get(key)
        if entry is None:
            entry = self._capture(key, inputs, launch)
            if entry is None:  # a capture that failed ran nothing: this step eagerly, launch prepared
                outputs = self.body(*inputs)
                launch.run()
                return self.engine.collect(outputs)
        outputs = replay(entry, inputs)
        self.replays += 1
        return self.engine.collect(outputs)

    # ---- the pieces --------------------------------------------------------------------------
    def _eager(self, inputs: Sequence[Any], spec: StepSpec, counter: int,
               probe: bool = False) -> tuple[StepStats, list[float]]:
        """The step as the loop runs it without graphs (under the probe: the warm-up)."""
        self.arena.new_grads()  # the body clears the buffers
        with SyncProbe() if probe else contextlib.nullcontext() as seen:
            outputs = self.body(*inputs)
        if probe and seen.hits:
            self._fall_back(f"the step's passes wait for the device ({seen.describe()})")
        return self.engine.step(spec, counter=counter, extra=outputs)

    def _capture(self, key: tuple, inputs: Sequence[torch.Tensor], launch: Any) -> tuple | None:
        """Capture the step for ``key``'s inputs (the step itself runs at the first replay)."""
        statics = static_copies(inputs)

        def whole_step() -> tuple[torch.Tensor, ...]:
            outputs = self.body(*statics)
            launch.run()
            return outputs

        try:
            graph, outputs = self.graphs.capture(whole_step)
        except Exception as exc:  # noqa: BLE001 - any capture failure: eager from here on
            self._fall_back(f"capturing the step failed ({type(exc).__name__}: {exc})")
            return None
        return self.engine.graphs.add(key, (graph, statics, tuple(outputs)))

    def _fall_back(self, why: str) -> None:
        self.off = why
        warnings.warn(f"yolozu_ttt: graph mode cannot capture the whole step: {why}; the step runs eagerly "
                      f"with only the fused update in a CUDA graph", GraphFallbackWarning, stacklevel=4)


#: the first item of a sample-parallel step's key in the engine's graph cache
REPLICA_GRAPH_KEY = "replicas"


class ReplicaGraph:
    """Graph mode for sample-parallel groups (``yolozu_ttt.parallel``): a group's whole replica step
    (the K replicas' passes and the engine's K-row update, ``ReplicaMethod.step``) captured once per
    key and replayed for every later step and group of that key, so an export captures once per
    (K, the step's options: CoTTA's restore steps have their own, the inputs' layouts) instead of
    once per image.

    ``step(key, body, inputs)``: ``body(*inputs)`` returns the step's (rows, K) table. A key's first
    step runs eagerly under the :class:`SyncProbe` (the warm-up: a step that would wait for the
    device is never captured, and the groups run eagerly from then on with a
    :class:`~yolozu_ttt.engine.GraphFallbackWarning` naming the operations); its second is captured
    and every later one replayed: the inputs copied into the graph's static ones, ``replay()``, the
    static table returned (read by the caller before the next replay). The graphs live in the
    engine's one cache (``UpdateEngine.graphs``) under ``REPLICA_GRAPH_KEY``; they read the
    replicas' own tensors, which ``Replicas.reset`` refills in place every group."""

    def __init__(self, engine: UpdateEngine, graphs: Any = None):
        self.cache = engine.graphs
        self.graphs = graphs if graphs is not None else CudaGraphs(engine.arena.device)
        self.off: str | None = None  # why the groups run eagerly from now on

    def step(self, key: Any, body: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.off is not None:
            return body(*inputs)
        key = (REPLICA_GRAPH_KEY, key, layouts(inputs))
        if key not in self.cache:  # the key's warm-up
            self.cache.add(key, None)
            with self.graphs.side_stream(), SyncProbe() as seen:
                table = body(*inputs)
            if seen.hits:
                self._fall_back(f"the step's passes wait for the device ({seen.describe()})")
            return table
        entry = self.cache[key]
        if entry is None:
            statics = static_copies(inputs)
            try:
                graph, outputs = self.graphs.capture(lambda: (body(*statics),))
            except Exception as exc:  # noqa: BLE001 - any capture failure: eager from here on
                self._fall_back(f"capturing the step failed ({type(exc).__name__}: {exc})")
                return body(*inputs)
            entry = self.cache.add(key, (graph, statics, outputs))
        return replay(entry, inputs)[0]

    def forget(self) -> None:
        """Drop every captured replica step (their replicas are being replaced: another K)."""
        for key in [key for key in self.cache if key[0] == REPLICA_GRAPH_KEY]:
            del self.cache[key]

    def _fall_back(self, why: str) -> None:
        self.off = why
        warn_groups_eager(why, stacklevel=6)


def warn_groups_eager(why: str, stacklevel: int) -> None:
    """The GraphFallbackWarning of sample-parallel groups that run eagerly, saying ``why``."""
    warnings.warn(f"yolozu_ttt: graph mode cannot capture the sample-parallel step: {why}; the groups run "
                  f"eagerly", GraphFallbackWarning, stacklevel=stacklevel)


def whole_step(body: Callable[..., tuple[torch.Tensor, ...]] | None, method: str, amp: str,
               arena: ParamArena, engine: UpdateEngine, graphs: Any = None) -> StepGraph | None:
    """Graph mode's capture of a run's whole step, or None: graph mode off (or impossible: the
    engine has warned), or a step that cannot be captured whole (a warning says why; its update
    alone still is)."""
    if not engine.graph_mode:
        return None
    why = None
    if body is None:
        why = f"{method}'s step decides on the host between its passes (or has a teacher or aux term)"
    elif amp != "off":
        why = mixed_precision_reason(amp)
    if why is not None:
        warnings.warn(f"yolozu_ttt: graph mode cannot capture the whole step: {why}; only the fused update is "
                      f"captured", GraphFallbackWarning, stacklevel=3)
        return None
    return StepGraph(body, arena, engine, graphs)
