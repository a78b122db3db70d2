"""A stand-in for CUDA graphs on any device: ``ReplayedCalls`` takes the place of
``yolozu_ttt.capture.CudaGraphs`` (conftest's ``replayed`` fixture) and calls the step again on
every replay; ``LaunchLog`` records the launches a step runs, so a strict replay checks it ran
what its capture ran."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LaunchLog(TorchDispatchMode):
    """The aten operations run under it, each with what a CUDA graph bakes into its launch besides
    the tensors' addresses: the arguments' shapes, strides and dtypes and every non-tensor argument
    (``log.launches``). Two calls of a step that log the same launches replay as one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[tuple[str, tuple[Any, ...]]] = []

    @staticmethod
    def _arg(a: Any) -> Any:
        if torch.is_tensor(a):
            return ("tensor", tuple(a.shape), a.stride(), a.dtype)
        if isinstance(a, (list, tuple)):
            return tuple(LaunchLog._arg(t) for t in a)
        if isinstance(a, (torch.UntypedStorage, torch.TypedStorage)):
            return ("storage", a.nbytes())
        return a if isinstance(a, (bool, int, float, str, type(None))) else repr(a)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.launches.append((str(func), tuple(self._arg(a) for a in args) +
                              tuple((k, self._arg(v)) for k, v in sorted(kwargs.items()))))
        return func(*args, **kwargs)


class ReplayedCalls:
    """The observable behaviour of :class:`CudaGraphs` on any device: ``capture`` runs the step
    once (that is the step a capture and its first replay do) and keeps its outputs as the static
    ones; each later ``replay`` calls the step again and copies its outputs into them.

    What it cannot show: a replay here runs the body's Python again, a CUDA graph's runs none. So
    a body keeps nothing per step on the host that a later step reads: what varies with the input
    goes out as a device tensor (EATA's batch size) or is kept per input layout (CoTTA's branch
    metadata, per input rank), and the has-grad flags stay as the capture left them. ``strict``:
    every replay must run the launches the capture ran (:class:`LaunchLog`), else AssertionError
    naming the first that differs: a body whose launches follow host state (a Python branch, a host
    scalar) would replay stale in a CUDA graph."""

    class Graph:
        def __init__(self, fn: Callable[[], tuple[torch.Tensor, ...]], outputs: tuple[torch.Tensor, ...],
                     launches: list[Any] | None = None):
            self.fn, self.outputs, self.fresh, self.launches = fn, outputs, True, launches
            self.replays = 0

        def replay(self) -> None:
            self.replays += 1
            if self.fresh:  # the capture ran this step already
                self.fresh = False
                return
            with LaunchLog() if self.launches is not None else contextlib.nullcontext() as log:
                new = self.fn()
            if log is not None and log.launches != self.launches:
                first = next((i for i, (a, b) in enumerate(zip(log.launches, self.launches)) if a != b),
                             min(len(log.launches), len(self.launches)))
                got = log.launches[first] if first < len(log.launches) else None
                want = self.launches[first] if first < len(self.launches) else None
                raise AssertionError(f"replay {self.replays} ran other launches than its capture: launch {first} "
                                     f"is {got}, captured {want}")
            with torch.no_grad():
                for static, value in zip(self.outputs, new):
                    static.copy_(value)

    def __init__(self, strict: bool = False) -> None:
        self.captured: list[ReplayedCalls.Graph] = []
        self.strict = strict

    side_stream = staticmethod(contextlib.nullcontext)

    def capture(self, fn: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[Any, tuple[torch.Tensor, ...]]:
        with LaunchLog() if self.strict else contextlib.nullcontext() as log:
            outputs = fn()
        outputs = tuple(t.detach() for t in outputs)
        graph = ReplayedCalls.Graph(fn, outputs, log.launches if log is not None else None)
        self.captured.append(graph)
        return graph, outputs
