"""The one sample-parallel driver: ``TTTSession.run_parallel`` and the export's ``--ttt-parallel K``.

:mod:`yolozu_ttt.parallel` adapts a group at once (its replicas, ``run_group``); a
:class:`GroupDriver` owns what happens around that, the same for the Python API and the export:

1. **The first record alone** (:meth:`GroupDriver.take` of the first position): it binds the session
   with ``run_ttt``'s checks and messages; where the caller asks for a memory check (the export) its
   activations are measured (:class:`ActivationMeter`) and K replicas plus K images' activations
   checked against the available memory (:func:`memory_refusal`: a K that does not fit raises
   :class:`DoesNotFit`, naming the largest K that does). Then either the method's replica step
   (K at once) or the reason the records go one by one (a ``ParallelFallbackWarning`` says it).
2. **Groups of K cut from a planned order** (:meth:`GroupDriver.plan`: the records in the order they
   are asked for; the API's list, the export's shard): the group starting at the position asked for.
3. **A group adapted** (``parallel.run_group``), or one by one where its records' batches differ in
   shape (a ``ParallelFallbackWarning``); a group of one runs alone where the driver is told to
   (``singles_alone``: the export, whose batched prediction of one image saves nothing).
4. **Each image handed out** (:class:`Handout`) when it is asked for, with its replica loaded into
   the model: its report and, where the driver predicts (``predict``), its input and its row of the
   group's one batched eval forward (``Replicas.predict``), for the caller to hand to YOLOZU's
   decoding (:class:`yolozu_ttt.seam.AnsweredForward`).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable

import torch

from .methods.loop import NORM_BUFFER_SUFFIXES
from .parallel import ParallelFallbackWarning, batches_of, replica_method, run_group

#: why the records go one by one where the first run fell back to YOLOZU's reference
ENGINE_OFF = "the fused engine does not run here (see the ReferenceFallbackWarning)"


def check_k(k: Any) -> int:
    """``k`` as a positive int, else a clear error."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"yolozu_ttt: run_parallel: k must be an int >= 1 (got {k!r})")
    if k < 1:
        raise ValueError(f"yolozu_ttt: run_parallel: k must be >= 1 (got {k})")
    return k


class DoesNotFit(RuntimeError):
    """K replicas and K images' activations do not fit the available memory (the message names the
    largest K that does); raised after the first record, before any group."""


@dataclasses.dataclass
class Handout:
    """One image as handed out: its ``report`` (the model holds its adapted state), and where its
    group was predicted at once, its input ``x`` (its first batch) and ``output`` (its row of the
    group's batched eval forward: what the model gives for ``x`` now); None otherwise."""

    report: Any
    x: Any = None
    output: Any = None


class GroupDriver:
    """A session's records adapted K at once, each handed out when asked for (see the module).

    ``subject`` and ``items`` name the caller in the fallback warnings (``"run_parallel"``, ``"these
    records"``; the export: ``"--ttt-parallel K"``, ``"the images"``); ``stacklevel``: the frames
    above :meth:`take` to the caller the warnings point at."""

    def __init__(self, session: Any, k: int, *, subject: str = "run_parallel", items: str = "these records",
                 check_memory: bool = False, singles_alone: bool = False, predict: bool = False,
                 stacklevel: int = 1):
        self.session, self.k = session, check_k(k)
        self.subject, self.items, self.stacklevel = subject, items, stacklevel
        self.check_memory, self.singles_alone, self.predict = check_memory, singles_alone, predict
        self.records: list[Any] = []
        self.started = False  # the first record ran (alone)
        self.rmethod: Any = None  # the method's replica step, once K at once is decided
        self.why: str | None = None  # why the records go one by one (K > 1), once decided
        self._pending: dict[int, Callable[[], Handout]] = {}

    def plan(self, records: list[Any]) -> None:
        """The records in the order they will be asked for: the groups are cut from it."""
        self.records = list(records)
        self._pending = {}

    def take(self, position: int) -> Handout:
        """The planned record at ``position``: the first alone, then the group starting there adapted
        (unless an earlier group holds it); the model holds its adapted state when this returns."""
        pending = self._pending.pop(position, None)
        if pending is not None:
            return pending()
        record = self.records[position]
        if not self.started or self.rmethod is None:
            return self.alone(record)
        group = self.records[position:position + self.k]
        if len(group) == 1 and self.singles_alone:
            return Handout(self.session.run([record]))
        self._pending = self._adapt(group, position)
        return self._pending.pop(position)()

    def alone(self, record: Any) -> Handout:
        """``record`` adapted alone (``session.run``); the first record decides what follows."""
        if not self.started:
            return Handout(self._first(record))
        return Handout(self.session.run([record]))

    @property
    def ran(self) -> dict[str, Any]:
        """The K that ran: ``{"parallel": K}``, or ``{"parallel": 1, "parallel_reason": why}``."""
        return {"parallel": 1, "parallel_reason": self.why} if self.why else {"parallel": self.k}

    def _first(self, record: Any) -> Any:
        session = self.session
        if self.check_memory:
            model = session.adapter.get_model()
            device = next(iter(model.parameters())).device
            with ActivationMeter(device, model) as meter:
                report = session.run([record])
        else:
            report = session.run([record])
        self.started = True
        if self.k == 1:
            return report
        loop = session.loop
        why, rmethod = (ENGINE_OFF, None) if loop is None else replica_method(session, loop)
        if why is not None:
            self.why = why
            warnings.warn(f"yolozu_ttt: {self.subject} adapts {self.items} one by one: {why}",
                          ParallelFallbackWarning, stacklevel=self.stacklevel + 3)
            return report
        refusal = memory_refusal(self.k, loop, meter.bytes, device) if self.check_memory else None
        if refusal is not None:
            raise DoesNotFit(refusal)
        self.rmethod = rmethod
        return report

    def _adapt(self, group: list[Any], position: int) -> dict[int, Callable[[], Handout]]:
        """The group at ``position`` adapted; each image's handout by its position."""
        session = self.session
        batches, shapes = group_batches(session, group)
        if len(shapes) > 1:
            warnings.warn(f"yolozu_ttt: {self.subject} adapts a group one by one: its records' batches differ in "
                          f"shape ({sorted(shapes)})", ParallelFallbackWarning, stacklevel=self.stacklevel + 2)
            return {position + j: functools.partial(self.alone, record) for j, record in enumerate(group)}
        handouts: dict[int, Callable[[], Handout]] = {}

        def on_group(first: int, records: list[Any], reports: list[Any], replicas: Any) -> None:
            inputs = [got[0] for got in batches]
            outputs = replicas.predict(torch.stack(inputs)) if self.predict else None
            for j, report in enumerate(reports):
                row = None if outputs is None else image_row(outputs, j)
                x = None if outputs is None else inputs[j]
                handouts[first + j] = functools.partial(_hand_out, replicas, j, Handout(report, x, row))

        run_group(session, group, None, position, self.rmethod, on_group, batches)
        return handouts


def _hand_out(replicas: Any, i: int, handout: Handout) -> Handout:
    replicas.load(i)
    return handout


def image_row(outputs: Any, i: int) -> Any:
    """Image i's slice of the replicas' stacked outputs (a tensor, or a dict/tuple/list of them)."""
    if isinstance(outputs, dict):
        return {key: image_row(value, i) for key, value in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(image_row(value, i) for value in outputs)
    return outputs[i]


def run_parallel(session: Any, records: list[Any], k: int, on_image: Callable | None = None) -> list[Any]:
    """See ``TTTSession.run_parallel``: a :class:`GroupDriver` over ``records``, in order."""
    driver = GroupDriver(session, k, stacklevel=3)
    records = list(records)
    driver.plan(records)
    reports = []
    for i, record in enumerate(records):
        reports.append(driver.take(i).report)
        if on_image is not None:
            on_image(i, record, reports[-1])
    return reports


def group_batches(session: Any, records: list[Any]) -> tuple[list[list[Any]], set[tuple[Any, ...]]]:
    """Each record's batches (``parallel.batches_of``, loaded once) and the set of their shapes: more
    than one shape and the group cannot be adapted at once."""
    batches = [batches_of(session, r) for r in records]
    return batches, {tuple(tuple(b.shape) for b in got) for got in batches}


# --------------------------------------------------------------------------------------
# what K replicas cost (the export's memory check)
# --------------------------------------------------------------------------------------
MEMORY_HEADROOM = 0.9  # the share of the available memory K replicas may be planned to take


def replica_bytes(loop: Any) -> int:
    """The bytes one replica of a bound loop takes (``parallel.Replicas``), planned for every method:
    the selected parameters 7 times (value, grad, two Adam moments, the reset base, the snapshot row,
    and a method's kept row: CoTTA's teacher) and the norm buffers twice (value, snapshot)."""
    params = sum(p.numel() * p.element_size() for p in loop.arena.params)
    buffers = sum(b.numel() * b.element_size() for n, b in loop.model.named_buffers()
                  if b is not None and n.endswith(NORM_BUFFER_SUFFIXES))
    return 7 * params + 2 * buffers


class ActivationMeter:
    """One image's activation bytes, measured around its alone run (``with ActivationMeter(device)
    as meter: session.run([record])``, then ``meter.bytes``): on CUDA the allocator's peak above
    where it started; elsewhere the bytes autograd saves for the backward in the first forward
    (``saved_tensors_hooks``, counted until the first backward reads them back; each storage once,
    the model's parameters not at all)."""

    def __init__(self, device: Any, model: Any = None):
        self.device = torch.device(device)
        self.bytes = 0
        self._skip = {p.data_ptr() for p in model.parameters()} if model is not None else set()
        self._seen: set[int] = set()
        self._counting = True
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._counting and torch.is_tensor(t):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._seen and ptr not in self._skip:
                self._seen.add(ptr)
                self.bytes += storage.nbytes()
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        self._counting = False  # the first backward: the first forward's activations are all saved
        return t

    def __enter__(self) -> "ActivationMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        else:
            self._hooks.__exit__(*exc)


def available_memory(device: Any) -> tuple[int | None, str]:
    """(bytes available to new replicas on ``device`` or None where unknown, what was read): CUDA's
    free device memory (``torch.cuda.mem_get_info``), else ``MemAvailable`` of ``/proc/meminfo``."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), f"free memory on {device}"
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM (MemAvailable)"
    except (OSError, ValueError, IndexError):
        pass
    return None, "available RAM (unknown: no /proc/meminfo)"


def largest_k(per_image: int, available: int) -> int:
    """The largest K whose replicas and activations fit ``MEMORY_HEADROOM`` of ``available`` bytes
    (at least 1: K = 1 adapts each image alone, with no replicas)."""
    return max(1, int(available * MEMORY_HEADROOM) // max(1, int(per_image)))


def memory_refusal(k: int, loop: Any, activation_bytes: int, device: Any) -> str | None:
    """Why ``k`` replicas of the bound ``loop`` and ``k`` images' activations do not fit the memory
    available on ``device`` (naming the largest K that does), or None when they do (or where the
    available memory cannot be read)."""
    available, what = available_memory(device)
    per_image = replica_bytes(loop) + int(activation_bytes)
    if k <= 1 or available is None or k <= largest_k(per_image, available):
        return None
    return (f"--ttt-parallel {k} does not fit: {k} x ({_mib(replica_bytes(loop))} replica + "
            f"{_mib(activation_bytes)} activations) = {_mib(k * per_image)}, {_mib(available)} {what} "
            f"({MEMORY_HEADROOM:.0%} usable); the largest K that fits is {largest_k(per_image, available)}")


def _mib(n: int) -> str:
    return f"{n / 1024.0 ** 2:.4g} MiB"
