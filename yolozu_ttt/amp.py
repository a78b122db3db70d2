"""Mixed precision for the adaptation passes, and the norm-layout guard.

``run_ttt(..., amp="bf16" | "fp16")`` runs every forward of the adaptation (student, teacher,
SAR's second pass, MIM) under ``torch.autocast`` for the model's device; parameters, Adam moments,
norms, guards and rollback stay fp32 (master weights) and the losses are computed from the model's
outputs cast back to fp32. fp16 adds a dynamic loss scale (``LossScaler``, GradScaler's policy):
the loss is multiplied by the scale before backward and the grads are unscaled, with an overflow
flag, in the arena's flat buffers right after it; an overflowed step is not applied and reaches the
guards as a non-finite grad norm.

``settled_norm_layouts(model)``: on the CPU, ``native_batch_norm_backward`` reads a grad (or an
input) whose memory is channels-last but whose strides ATen reads as contiguous (batch 1, the batch
stride below C*H*W: what autograd hands back through ``x.flatten(2).transpose(1, 2)``) as if it were
NCHW, and returns wrong gradients. For the duration of a run, every batch/instance norm of the
model gets a copy in the layout ATen reads where (and only where) a tensor is ambiguous that way.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch
from torch import nn

from .arena import ParamArena

AMP_MODES = ("off", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_amp(amp: Any) -> str:
    """``amp`` as one of ``AMP_MODES`` (None is ``"off"``), else ValueError."""
    mode = "off" if amp is None else str(amp).lower()
    if mode not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)} (got {amp!r})")
    return mode


def model_device_type(model: Any) -> str:
    """The device type the model's parameters live on (``cpu`` when it has none)."""
    for p in model.parameters():
        return p.device.type
    return "cpu"


def to_float32(value: Any) -> Any:
    """``value`` with every bf16/fp16 tensor in it (dicts, lists, tuples) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in LOW_PRECISION else value
    if isinstance(value, dict):
        return type(value)((k, to_float32(v)) for k, v in value.items()) if type(value) is not dict else {
            k: to_float32(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(to_float32(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


@contextlib.contextmanager
def autocast_forwards(model: nn.Module, amp: str) -> Iterator[None]:
    """Every call of ``model`` (and of deep copies made meanwhile, e.g. CoTTA's teacher) runs under
    ``torch.autocast(<its device>, <amp dtype>)`` and returns its outputs in fp32. ``"off"``: nothing."""
    if amp == "off":
        yield
        return
    dtype, device_type = AMP_DTYPES[amp], model_device_type(model)
    own = model.__dict__.get("forward")  # an instance-level forward the model already had
    inner = own.__func__ if isinstance(own, types.MethodType) and own.__self__ is model else None
    if own is not None and inner is None:
        raise ValueError("amp: the model's instance-level forward is not a method of the model")

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        call = inner if inner is not None else type(self).forward
        with torch.autocast(device_type, dtype=dtype):
            out = call(self, *args, **kwargs)
        return to_float32(out)

    # a bound method: deepcopy rebinds it to the copy, so a teacher copied during the run is covered
    model.forward = types.MethodType(forward, model)
    try:
        yield
    finally:
        if own is not None:
            model.forward = own
        else:
            del model.forward


class LossScaler:
    """fp16's dynamic loss scale (``torch.amp.GradScaler``'s policy: start at 2**16, halve on an
    overflow, double after ``growth_interval`` clean steps), unscaling the arena's flat grads."""

    def __init__(self, device: torch.device, *, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.init_scale = float(init_scale)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.reset()

    def reset(self) -> None:
        """The state of a new scaler (a session's next run)."""
        self.scale = self.init_scale
        self.clean_steps = 0
        self.step_overflowed = False  # the last step's grads overflowed (it was not applied)

    def begin_step(self) -> float:
        """A step starts: no overflow yet. Returns the scale its backwards use."""
        self.found_inf.zero_()
        self.step_overflowed = False
        return self.scale

    def backward(self, loss: torch.Tensor, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """``(loss * scale).backward`` into ``grads`` (the arena's flat buffers), then unscale them and
        raise the overflow flag if any is non-finite (on the device, no host read)."""
        (loss * self.scale).backward(inputs=params)
        inv = torch.full((), 1.0 / self.scale, dtype=torch.float32, device=self.found_inf.device)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for device, tensors in by_device.items():
            found = self.found_inf if device == self.found_inf.device else torch.zeros_like(self.found_inf, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, inv.to(device))
            if found is not self.found_inf:
                self.found_inf.add_(found.to(self.found_inf.device))

    def update(self, overflow: bool) -> None:
        """The scale for the next step, after a step that did (not) overflow."""
        self.step_overflowed = bool(overflow)
        if overflow:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0


class ScaledArena(ParamArena):
    """A :class:`ParamArena` whose backward goes through a :class:`LossScaler` (fp16)."""

    def __init__(self, model: nn.Module, params: Any, *, scaler: LossScaler):
        self.scaler = scaler
        super().__init__(model, params)

    def accumulate(self, loss: torch.Tensor) -> None:
        """Scaled backward into the flat grad buffers, then unscaled there (with the overflow flag)."""
        self.scaler.backward(loss, self.params, [g.grad for g in self.groups])


# ---- the norm-layout guard ----------------------------------------------------------------------
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def reads_channels_last(t: torch.Tensor) -> bool:
    """Whether ATen reads the strides of 4-D ``t`` as channels-last (``suggest_memory_format``'s rule,
    which a batch of 1 can defeat: it falls back to contiguous when the batch stride is smaller than
    the rest of the tensor)."""
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    floor = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < floor:
            return False
        if d == 0 and floor == strides[1]:
            return False
        floor = strides[d] * max(int(sizes[d]), 1)
    return True


def settle(t: torch.Tensor) -> torch.Tensor | None:
    """A contiguous copy of 4-D ``t`` if its memory is channels-last but ATen reads it as contiguous,
    else None (``t`` is read as laid out)."""
    if (t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
            and not reads_channels_last(t)):
        return t.contiguous()
    return None


def settle_strict(t: torch.Tensor) -> torch.Tensor | None:
    """A contiguous copy of a non-contiguous 4-D ``t`` of batch 1, else None: instance norm's CPU
    backward at batch 1 is wrong for any channels-last grad, ambiguous or not."""
    if t.dim() == 4 and t.shape[0] == 1 and not t.is_contiguous():
        return t.contiguous()
    return None


def _settle_input(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor):
        fixed = settle(args[0])
        if fixed is not None:
            return (fixed,) + tuple(args[1:])
    return None


def _settle_grad(module: nn.Module, args: tuple, out: Any) -> None:
    # registered before any in-place op on ``out`` (e.g. SiLU(inplace=True)), the hook sees the grad
    # with respect to the norm's own output: its backward's grad_output
    if isinstance(out, torch.Tensor) and out.requires_grad and out.dim() == 4:
        out.register_hook(settle_strict if isinstance(module, nn.modules.instancenorm._InstanceNorm) else settle)


@contextlib.contextmanager
def settled_norm_layouts(model: Any) -> Iterator[None]:
    """For the duration: every batch/instance norm of ``model`` gets its input and its output's grad
    in the layout ATen reads (a copy only where a tensor is ambiguous), so its backward is right.

    CPU models only: the wrong backward is the CPU kernel's; elsewhere the hooks would only add host
    work to every forward (the GPU path is host-bound at batch 1)."""
    handles = []
    if isinstance(model, nn.Module) and model_device_type(model) != "cpu":
        yield
        return
    try:
        modules = list(model.modules()) if isinstance(model, nn.Module) else []
    except Exception:  # pragma: no cover
        modules = []
    try:
        for m in modules:
            if isinstance(m, NORM_TYPES):
                handles.append(m.register_forward_pre_hook(_settle_input))
                handles.append(m.register_forward_hook(_settle_grad))
        yield
    finally:
        for h in handles:
            h.remove()
