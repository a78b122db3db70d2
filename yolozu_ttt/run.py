"""``run_ttt``: YOLOZU's contract on the fused engine.

Validation order, messages, report fields, warnings, stop reasons and counters follow
``yolozu.tta.integration.run_ttt``; methods not accelerated here run that reference unchanged.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from yolozu.tta import integration as _ref
from yolozu.tta.config import SUPPORTED_TTT_METHODS, TTTConfig
from yolozu.tta.integration import TTTReport
from yolozu.tta.method_profiles import get_ttt_method_profile

from . import _native, guards
from .ops import use_triton
from .arena import ParamArena, reuse_buffers

# Captured at import: the fallback must reach YOLOZU's own implementation even where a caller has
# pointed ``yolozu.tta.integration.run_ttt`` at this backend.
reference_run_ttt = _ref.run_ttt

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
    """What a method's loop reads and writes; the report is built from it."""

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


@functools.lru_cache(maxsize=None)
def _accelerated() -> dict[str, Callable[[RunContext], None]]:
    """Method name -> ``run(ctx)`` for every YOLOZU method with a module in ``yolozu_ttt.methods``."""
    runners = {}
    for name in SUPPORTED_TTT_METHODS:
        if importlib.util.find_spec(f"{__package__}.methods.{name}") is not None:
            runners[name] = importlib.import_module(f"{__package__}.methods.{name}").run
    return runners


def accelerated_methods() -> list[str]:
    """The methods that run on the fused engine (the rest run YOLOZU's reference)."""
    return list(_accelerated())


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def engine_supports(model: Any) -> bool:
    """Whether every trainable parameter has a dtype and device the fused engine handles."""
    try:
        params = [p for p in model.parameters() if p.requires_grad]
    except Exception:
        return False
    for p in params:
        if p.dtype not in SUPPORTED_DTYPES:
            return False
        if p.device.type == "cuda":
            continue
        if p.device.type != "cpu" or (_native._C is None and not use_triton(p)):
            return False
    return True


def run_ttt(adapter: Any, records: list[dict[str, Any]], *, config: TTTConfig) -> TTTReport:
    """Adapt ``adapter.get_model()`` on batches from ``records``; see ``yolozu.tta.integration.run_ttt``.

    Disabled configs, methods not accelerated here and models the engine cannot hold (float64,
    devices other than CPU/CUDA) run YOLOZU's reference unchanged.
    """
    method = str(config.method or "tent").lower()
    runners = _accelerated()
    if not config.enabled or method not in runners:
        return reference_run_ttt(adapter, records, config=config)
    if hasattr(adapter, "get_model") and hasattr(adapter, "build_loader"):
        candidate = adapter.get_model()
        if candidate is not None and not engine_supports(candidate):
            return reference_run_ttt(adapter, records, config=config)

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

    ctx = RunContext(model=model, batches=batches, config=config, method=method, steps=steps, generator=None)
    if config.seed is not None:
        try:
            ctx.generator = torch.Generator(device="cpu")
            ctx.generator.manual_seed(int(config.seed))
        except Exception:  # pragma: no cover
            ctx.warnings.append("failed_to_seed_generator")
            ctx.generator = None

    was_training = bool(getattr(model, "training", False))
    memory_start = _ref._memory_start(model)
    start = time.time()
    try:
        runners[method](ctx)
    finally:
        if not was_training:
            try:
                model.eval()
            except Exception:  # pragma: no cover
                ctx.warnings.append("failed_to_restore_eval")
    seconds = float(time.time() - start)

    mask_ratio = float(sum(ctx.mask_ratios) / float(len(ctx.mask_ratios))) if ctx.mask_ratios else None
    return TTTReport(
        enabled=True,
        method=method,
        reset=str(config.reset),
        steps_requested=steps,
        steps_run=len(ctx.losses),
        batches_used=len(batches),
        seconds=seconds,
        losses=ctx.losses,
        mask_ratio=mask_ratio,
        updated_param_count=ctx.updated_param_count,
        warnings=ctx.warnings,
        stopped_early=bool(ctx.stopped_early),
        stop_reason=ctx.stop_reason,
        step_metrics=ctx.step_metrics,
        method_profile=get_ttt_method_profile(method, detector_response=bool(config.detector_response)),
        forward_calls=int(ctx.forward_calls),
        backward_calls=int(ctx.backward_calls),
        optimizer_steps=int(ctx.optimizer_steps),
        update_ratio=float(ctx.optimizer_steps) / float(max(1, steps)),
        abstained_steps=int(ctx.abstained_steps),
        abstention_ratio=float(ctx.abstained_steps) / float(max(1, len(ctx.step_metrics))),
        memory=_ref._memory_finish(memory_start),
    )


class TTTSession:
    """``run_ttt`` over and over on one adapter and config, reusing the arena's buffers and engine."""

    def __init__(self, adapter: Any, config: TTTConfig):
        self.adapter, self.config = adapter, config
        self.cache: dict = {}

    def run(self, records: list[dict[str, Any]]) -> TTTReport:
        """One ``run_ttt`` from the model's current values with fresh optimizer state."""
        with reuse_buffers(self.cache):
            return run_ttt(self.adapter, records, config=self.config)


def prepare_session(adapter: Any, config: TTTConfig) -> TTTSession:
    """A session for repeated adaptation of the same model (``--ttt-reset sample``)."""
    return TTTSession(adapter, config)
