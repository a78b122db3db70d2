"""``run_ttt``: YOLOZU's contract on the fused engine.

Validation order, messages, report fields, warnings, stop reasons and counters follow
``yolozu.tta.integration.run_ttt``; methods not accelerated here run that reference unchanged.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import time
import warnings
from typing import Any, Callable

from yolozu.tta.config import SUPPORTED_TTT_METHODS, TTTConfig
from yolozu.tta.integration import TTTReport

from .seam import integration as _ref  # first: checks YOLOZU before the methods use it
from . import _native
from .amp import check_amp
from .common import CUDA_GRAPH, SUPPORTED_DTYPES
from .methods.loop import Method, RunContext, StepLoop
from .engine import backend_for

# Captured at import: the fallback must reach YOLOZU's own implementation even where a caller has
# pointed ``yolozu.tta.integration.run_ttt`` at this backend.
reference_run_ttt = _ref.run_ttt


class ReferenceFallbackWarning(UserWarning):
    """``yolozu_ttt.run_ttt`` ran YOLOZU's reference instead of the fused engine: issued once per
    session and reason (a ``run_ttt`` call is a session of its own); across sessions Python's
    warning filters decide (the default shows it once per calling line). Filter it with
    ``warnings.filterwarnings("ignore", category=...)``."""


@functools.lru_cache(maxsize=None)
def _accelerated() -> dict[str, type[Method]]:
    """Method name -> its ``Method`` class, for every YOLOZU method with a module in ``yolozu_ttt.methods``."""
    methods = {}
    for name in SUPPORTED_TTT_METHODS:
        if importlib.util.find_spec(f"{__package__}.methods.{name}") is not None:
            methods[name] = importlib.import_module(f"{__package__}.methods.{name}").METHOD
    return methods


def accelerated_methods() -> list[str]:
    """The methods that run on the fused engine (the rest run YOLOZU's reference)."""
    return list(_accelerated())


def engine_problem(model: Any) -> str | None:
    """Why the fused engine cannot hold ``model``'s trainable parameters, or None when it can."""
    try:
        params = [p for p in model.parameters() if p.requires_grad]
    except Exception as exc:
        return f"the model's parameters cannot be listed ({type(exc).__name__})"
    for p in params:
        if p.dtype not in SUPPORTED_DTYPES:
            return f"parameters of dtype {str(p.dtype).replace('torch.', '')} (the engine holds float32, bfloat16, float16)"
        if p.device.type not in ("cpu", "cuda"):
            return f"parameters on device {p.device.type!r} (the engine runs on cpu and cuda)"
        if p.device.type == "cpu" and _native._C is None and backend_for(p) == "cpp":
            return f"the compiled extension yolozu_ttt._C did not load ({_native.LOAD_ERROR})"
    return None


def run_ttt(adapter: Any, records: list[dict[str, Any]], *, config: TTTConfig, amp: str = "off",
            graph: bool | None = None) -> TTTReport:
    """Adapt ``adapter.get_model()`` on batches from ``records``; see ``yolozu.tta.integration.run_ttt``.

    ``amp`` (ours, next to YOLOZU's config): the precision of the adaptation's forwards, ``"off"``
    (fp32, the default), ``"bf16"`` or ``"fp16"`` (``torch.autocast`` for the model's device, fp32
    master weights, optimizer state and losses; fp16 with a dynamic loss scale). Steps record it in
    their entries (``"amp"``, and for fp16 ``"loss_scale"`` and ``"amp_overflow"``).

    ``graph`` (ours): graph mode on a CUDA model: the whole step (forward, loss, backward, update)
    captured in a CUDA graph and replayed where the method and model allow it, else the fused
    update alone; a :class:`~yolozu_ttt.engine.GraphFallbackWarning` says what was not captured
    and why. None (the default): ``YOLOZU_TTT_CUDA_GRAPH=1`` in the environment at import.

    Disabled configs run YOLOZU's reference unchanged. Methods not accelerated here and models the
    engine cannot hold (float64, devices other than CPU/CUDA, a CPU model without the compiled
    extension) run it too (in fp32), with a :class:`ReferenceFallbackWarning` saying why.

    One run of a :class:`TTTSession` closed at its end; a caller that wants to know which engine ran
    holds the session instead (``with TTTSession(adapter, config) as s: s.run(records)``, then
    :attr:`TTTSession.engine`).
    """
    with TTTSession(adapter, config, amp, graph) as session:
        return session._run(records, stacklevel=4)


class TTTSession:
    """``run_ttt`` over and over on one adapter and config (``--ttt-reset sample``), bound once.

    The first :meth:`run` selects the parameters and builds the arena, the engine, the method and
    (graph mode) its captured step; every later run reuses them and starts from what the session
    holds: the selected parameters and the norm buffers as they were at the first run, fresh Adam
    state, the method's run state afresh (see ``yolozu_ttt.methods.loop.StepLoop``). Each run's
    report is the one ``run_ttt`` gives for the same records from those values.

    Between runs the selected parameters stay bound to the session's flat buffers: their values are
    the model's (the last run's adapted values, changed in place by anyone, e.g. YOLOZU's reset),
    their ``.grad`` is None, ``requires_grad`` and the training flags are as ``run_ttt`` leaves
    them, on every exit path of a run (an exception or KeyboardInterrupt leaves the values where
    the reference would, and the next run still resets). A new model, or a selected parameter
    whose ``.data`` was rebound, rebinds the session from the model's values then.
    :meth:`close` (or ``with``) unbinds: the parameters get their original storages back with
    their current values.
    """

    def __init__(self, adapter: Any, config: TTTConfig, amp: str = "off", graph: bool | None = None):
        self.adapter, self.config, self.amp = adapter, config, check_amp(amp)
        self.graph = CUDA_GRAPH if graph is None else bool(graph)
        self.loop: StepLoop | None = None
        #: the engine this session's last run ran: ``{"engine": "fast", "backend": "cpp" | "triton"}`` (plus
        #: ``"amp"`` where the passes ran in mixed precision) or ``{"engine": "reference", "reason": ...}``;
        #: None before any run. No other run (another session's, a ``run_ttt`` call) changes it.
        self.engine: dict[str, Any] | None = None
        self._warned: set[str] = set()  # the fallback reasons this session has warned of

    def run(self, records: list[dict[str, Any]]) -> TTTReport:
        """One adaptation on ``records`` from the session's starting values (see the class)."""
        return self._run(records, stacklevel=4)

    def run_parallel(self, records: list[dict[str, Any]], k: int,
                     on_image: Callable[[int, dict[str, Any], TTTReport], Any] | None = None) -> list[TTTReport]:
        """Each record adapted alone from the session's start, ``k`` records at once, each by its
        own replica (parameters, Adam state, norm statistics, snapshots, guards): the reports
        ``run([record])`` gives, in order, within float tolerance. ``on_image(index, record,
        report)`` is called for each with the model holding that record's adapted state. What
        cannot run K at once runs one by one with a warning; see ``yolozu_ttt.groups`` (the driver) and
        ``yolozu_ttt.parallel`` (a group at once)."""
        from .groups import run_parallel

        return run_parallel(self, records, k, on_image)

    def close(self) -> None:
        """Unbind the model (idempotent); a later :meth:`run` binds again."""
        loop, self.loop = self.loop, None
        if loop is not None:
            loop.close()

    def __enter__(self) -> "TTTSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _reference(self, records: list[dict[str, Any]], reason: str | None, stacklevel: int) -> TTTReport:
        """YOLOZU's reference; with a ``reason`` (the engine could have run but cannot) a
        :class:`ReferenceFallbackWarning` says so, once per session and reason. The reference runs
        in fp32: a requested ``amp`` is named in the reason."""
        if reason is not None and self.amp != "off":
            reason = f"{reason}; amp={self.amp} not applied (the reference runs in fp32)"
        self.engine = {"engine": "reference", "reason": reason}
        if reason is not None and reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"yolozu_ttt: running YOLOZU's reference run_ttt at reference speed: {reason}",
                          ReferenceFallbackWarning, stacklevel=stacklevel)
        return reference_run_ttt(self.adapter, records, config=self.config)

    def _run(self, records: list[dict[str, Any]], stacklevel: int) -> TTTReport:
        adapter, config, amp = self.adapter, self.config, self.amp
        method = str(config.method or "tent").lower()
        methods = _accelerated()
        if not config.enabled:
            return self._reference(records, None, stacklevel)
        if method not in methods:  # YOLOZU's own error for a method it does not know either
            known = method in SUPPORTED_TTT_METHODS
            return self._reference(records, f"method {method!r} has no fused implementation" if known else None,
                                   stacklevel)
        if hasattr(adapter, "get_model") and hasattr(adapter, "build_loader"):
            candidate = adapter.get_model()
            bound = self.loop is not None and self.loop.fits(candidate)
            problem = engine_problem(candidate) if candidate is not None and not bound else None
            if problem is not None:
                self.close()
                return self._reference(records, problem, stacklevel)

        if not hasattr(adapter, "get_model") or not hasattr(adapter, "build_loader"):
            raise RuntimeError("TTT requires an adapter with get_model() and build_loader()")
        model = adapter.get_model()
        if model is None:
            raise RuntimeError("TTT requires a non-null model from adapter.get_model()")
        loader = adapter.build_loader(records, batch_size=int(config.batch_size))
        batches = _ref._take_batches(loader, max_batches=int(config.max_batches))
        if not batches:
            raise RuntimeError("TTT requires at least one batch from adapter.build_loader()")
        steps = int(config.steps)
        if steps <= 0:
            raise ValueError("steps must be > 0")

        ctx = RunContext(model=model, batches=batches, config=config, method=method, steps=steps, generator=None,
                         amp=amp, graph=self.graph)
        ctx.seed_generator()

        if self.loop is not None and not self.loop.fits(model):
            self.close()
        if self.loop is None:
            self.loop = StepLoop(methods[method](ctx))
        was_training = bool(getattr(model, "training", False))
        memory_start = _ref._memory_start(model)
        start = time.time()
        try:
            self.loop.run(ctx)
        finally:
            self.engine = {"engine": "fast", "backend": ctx.backend, **({"amp": amp} if amp != "off" else {})}
            if self.loop.arena is None:  # the first run's binding failed: nothing is bound
                self.loop = None
            if not was_training:
                try:
                    model.eval()
                except Exception:  # pragma: no cover
                    ctx.warnings.append("failed_to_restore_eval")
        seconds = float(time.time() - start)
        return ctx.report(method, batches, seconds, memory_start)


def prepare_session(adapter: Any, config: TTTConfig, amp: str = "off", graph: bool | None = None) -> TTTSession:
    """A session for repeated adaptation of the same model (``--ttt-reset sample``); see :class:`TTTSession`."""
    return TTTSession(adapter, config, amp, graph)
