"""ParamArena: the selected parameters packed into flat storage, one group per (device, dtype).

Each Parameter keeps its identity; only its ``.data`` is rebound to a view of the group's flat
buffer, and its ``.grad`` to a view of the flat grad buffer, so autograd accumulates in place and
the update engine sees one contiguous array per group. ``backward`` differentiates with respect to
the selected parameters only, so no weight gradient of any other parameter is computed (freezing
them instead would change the forward: matmul stops folding batch dimensions into one mm when a
weight does not require grad, which costs more than the backward saves). While the values live in
the arena, the original storages hold the run's starting values: the C++ engine reads them as its
base snapshot (one pointer per segment, so no copy is made); for the Triton engine, originals
nobody else shares are emptied and a flat base copy is made instead. ``with arena:`` (or
``close()``) copies the values back into the originals (grown back where emptied) and rebinds
them, on every exit path.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch._utils import _unflatten_dense_tensors

from . import _native
from .ops import use_triton


_BUFFER_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("yolozu_ttt_buffer_cache", default=None)


@dataclass
class ArenaGroup:
    """The flat buffers of one (device, dtype) group and the tensors packed into them."""

    params: list[torch.nn.Parameter]
    originals: list[torch.Tensor]
    offsets: list[int]
    sizes: list[int]
    flat: torch.Tensor
    grad: torch.Tensor | None  # None only while being built and after close
    exp_avg: torch.Tensor | list[torch.Tensor] | None  # flat (Triton) or one per segment (C++)
    exp_avg_sq: torch.Tensor | list[torch.Tensor] | None
    base: torch.Tensor | list[torch.Tensor] | None  # flat (Triton) or the originals, one per segment (C++)
    snap: torch.Tensor | list[torch.Tensor] | None  # the grad buffer, flat, or one per segment (C++)
    has_grad: bytearray
    backend: str = "cpp"
    engine: Any = None  # _C.ArenaGroup or kernels.update.TritonArenaGroup
    hooks: list[Any] = field(default_factory=list)
    released: list[tuple[torch.UntypedStorage, int]] = field(default_factory=list)  # (storage, nbytes)


def _unique(params: Iterable[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Parameters in order, each once (tied parameters are one object)."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class ParamArena:
    """Flat storage for the selected parameters of ``model``; see the module docstring."""

    def __init__(self, model: torch.nn.Module, params: Iterable[torch.Tensor]):
        self.model = model
        self.params = _unique(params)
        self.groups: list[ArenaGroup] = []
        self._closed = False
        # Hold a snapshot buffer of its own for the whole run: for methods whose passes hold it
        # anyway (SAR's backup lives through its second pass, the peak), so no step pays to
        # allocate it again. A snapshot in the grad buffer still ends with its step.
        self.keep_snapshot = False
        try:
            by_key: dict[tuple[str, torch.dtype], list[torch.nn.Parameter]] = {}
            for p in self.params:
                by_key.setdefault((str(p.device), p.dtype), []).append(p)
            for ps in by_key.values():
                self._pack(ps)
        except BaseException:
            self.close()
            raise

    # ---- construction ---------------------------------------------------------------------
    def _pack(self, ps: list[torch.nn.Parameter]) -> None:
        """Copy ``ps`` into one flat buffer and rebind each ``.data``/``.grad`` to views of it."""
        if ps[0].dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"yolozu_ttt: unsupported parameter dtype {ps[0].dtype} (float32, bfloat16, float16)")
        sizes = [int(p.numel()) for p in ps]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        key = (str(ps[0].device), ps[0].dtype, tuple(sizes))
        cache = _BUFFER_CACHE.get()
        reused = cache.get(key) if cache is not None else None
        backend = "triton" if use_triton(ps[0]) else "cpp"
        with torch.no_grad():
            if reused is None:
                # the values first: on CUDA the originals are emptied before the other buffers
                # exist, so the peak during construction holds each selected parameter once
                flat = torch.cat([p.detach().reshape(-1) for p in ps])
                group = ArenaGroup(
                    params=ps, originals=[p.data for p in ps], offsets=offsets, sizes=sizes, flat=flat,
                    grad=None, exp_avg=None, exp_avg_sq=None, base=None, snap=None,
                    has_grad=bytearray(len(ps)), backend=backend,
                )
            else:  # same layout as an earlier run in this session: refill its buffers
                group = dataclasses.replace(reused, params=ps, originals=[p.data for p in ps], hooks=[], released=[])
                torch.cat([p.detach().reshape(-1) for p in ps], out=group.flat)
            self.groups.append(group)  # registered before rebinding so close() can undo it
            for p, view in zip(ps, _unflatten_dense_tensors(group.flat, ps)):
                p.data = view
            if backend == "cpp":
                # The originals themselves are the C++ engine's base snapshot (one pointer per
                # segment): no copy of them now and nothing to grow back in close().
                group.base = [o.contiguous() for o in group.originals]
            else:
                group.released = _release_unshared(group.originals)
            if reused is None:
                flat = group.flat
                group.grad = torch.zeros_like(flat)
                group.exp_avg, group.exp_avg_sq = _moments(flat, sizes, backend)
                if backend == "triton":
                    group.base = flat.clone()
            else:
                group.grad.zero_()
                if backend == "triton":
                    group.base.copy_(group.flat)
                else:
                    group.engine.set_base(group.base)
                group.engine.reset_state()  # Adam moments and step counts
            for p, view in zip(ps, _unflatten_dense_tensors(group.grad, ps)):
                p.grad = view
        flags = group.has_grad
        for i, p in enumerate(ps):
            group.hooks.append(p.register_post_accumulate_grad_hook(_flag_setter(flags, i)))
        if reused is not None:
            return
        engine_cls = (_triton_group() if group.backend == "triton" else _native.require_native().ArenaGroup)
        group.engine = engine_cls(group.flat, group.grad, group.exp_avg, group.exp_avg_sq, group.base, None,
                                  offsets, sizes, flags)
        if cache is not None:
            cache[key] = dataclasses.replace(group, params=[], originals=[], hooks=[], released=[],
                                             base=group.base if backend == "triton" else None)

    # ---- per step -------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the flat grad buffers and the has-grad flags (never set_to_none); a snapshot kept in
        a grad buffer ends here."""
        for g in self.groups:
            if g.snap is g.grad:
                g.engine.set_snapshot(None)
                g.snap = None
            g.grad.zero_()
            g.has_grad[:] = bytes(len(g.has_grad))

    def backward(self, loss: torch.Tensor) -> None:
        """Backward into the flat grad buffers, computing only what the selected parameters need."""
        loss.backward(inputs=self.params)

    def any_grad(self) -> bool:
        """Whether backward reached any selected parameter."""
        return any(any(g.has_grad) for g in self.groups)

    def hold_snapshot(self, *, in_grad: bool = False) -> None:
        """Give each group a pre-step snapshot buffer (bound to its engine) until ``drop_snapshot``.

        The snapshot lives only from the step that writes it to the step's stop decision, so
        the forward and backward passes (the run's memory peak) never hold it. With ``in_grad``
        it is the group's grad buffer itself (the fused step reads each grad before writing the
        snapshot over it): no buffer to allocate and fault in per step. A snapshot that must
        outlive the next backward (SAR's ascent backup) needs its own buffer (the default): for
        the C++ engine one tensor per segment, from memory the C library recycles.
        """
        for g in self.groups:
            if g.snap is None:
                if in_grad:
                    g.snap = g.grad
                elif g.backend == "cpp":
                    g.snap = [torch.empty(n, dtype=g.flat.dtype) for n in g.sizes]
                else:
                    g.snap = torch.empty_like(g.flat)
                g.engine.set_snapshot(g.snap)

    def save_snapshot(self) -> None:
        """Copy the parameters into the held snapshot buffers."""
        self._copy_snapshot(to_params=False)

    def drop_snapshot(self) -> None:
        """Unbind the snapshot buffers (freeing any of their own), unless ``keep_snapshot`` is set."""
        for g in self.groups:
            if g.snap is not None and (g.snap is g.grad or not self.keep_snapshot):
                g.engine.set_snapshot(None)
                g.snap = None

    def restore_snapshot(self) -> None:
        """Roll the parameters back to the pre-step snapshot, bit-exactly."""
        self._copy_snapshot(to_params=True)

    def _copy_snapshot(self, *, to_params: bool) -> None:
        with torch.no_grad():
            for g in self.groups:
                if g.snap is None:
                    raise RuntimeError("yolozu_ttt: rollback needs a snapshot: no step wrote one")
                if isinstance(g.snap, list):
                    segments = list(g.flat.split(g.sizes))
                    dst, src = (segments, g.snap) if to_params else (g.snap, segments)
                    torch._foreach_copy_(dst, src)
                elif to_params:
                    g.flat.copy_(g.snap)
                else:
                    g.snap.copy_(g.flat)

    @property
    def numel(self) -> int:
        return sum(int(g.flat.numel()) for g in self.groups)

    # ---- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        """Copy values back into the original storages and unbind the views; idempotent."""
        if self._closed:
            return
        self._closed = True
        with torch.no_grad():
            for g in self.groups:
                for h in g.hooks:
                    h.remove()
                for p in g.params:
                    p.grad = None
                # drop the work buffers before the originals grow back (a session's cache keeps its own)
                if g.engine is not None:
                    g.engine.set_snapshot(None)
                    if g.backend == "cpp":  # a cached engine must not keep the originals alive
                        g.engine.set_base(g.flat)
                g.engine = g.grad = g.exp_avg = g.exp_avg_sq = g.base = g.snap = None
                for storage, nbytes in g.released:
                    storage.resize_(nbytes)
                moved = [(p, orig) for p, orig in zip(g.params, g.originals) if p.data.data_ptr() != orig.data_ptr()]
                if moved:
                    torch._foreach_copy_([orig for _, orig in moved], [p.data for p, _ in moved])
                for p, orig in moved:
                    p.data = orig
        self.groups = []

    def __enter__(self) -> "ParamArena":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _moments(flat: torch.Tensor, sizes: list[int], backend: str) -> tuple[Any, Any]:
    """Adam's float32 moments: flat and zeroed for Triton; for the C++ engine one uninitialised
    tensor per segment (it zeroes a segment's moments at its first step). Small allocations come
    from memory the C library recycles; one flat 39 MB buffer would be a fresh mapping every run,
    ~15 ms of page faults at first touch here."""
    if backend == "triton":
        return (torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device),
                torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device))
    return tuple([torch.empty(n, dtype=torch.float32, device=flat.device) for n in sizes] for _ in range(2))


def _release_unshared(originals: list[torch.Tensor]) -> list[tuple[torch.UntypedStorage, int]]:
    """Free the original storages nothing else uses while the values live in the arena.

    The storage objects stay (emptied); ``close`` grows them back and copies the values in, so
    peak memory during a run holds each selected parameter once, not twice. A storage that any
    other tensor shares (a view, a tied alias, a caller's reference) is left alone.
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    released, seen = [], set()
    for orig in originals:
        storage = orig.untyped_storage()
        key = storage.data_ptr()
        # one reference from ``orig``, one from the ``storage`` object just made for it
        if use_count is None or key in seen or use_count(storage._cdata) != 2 or storage.nbytes() == 0:
            continue
        seen.add(key)
        released.append((storage, storage.nbytes()))
        storage.resize_(0)
    return released


def _triton_group():
    """The Triton engine's group class (imported only when a group needs it)."""
    from .kernels import update as triton_update

    return triton_update.TritonArenaGroup


@contextlib.contextmanager
def reuse_buffers(cache: dict) -> Iterator[None]:
    """Within the block, an arena with the layout of an earlier one in ``cache`` reuses its flat
    buffers and engine (refilled from the parameters, fresh Adam state) instead of allocating.

    For callers that adapt the same model over and over, e.g. ``--ttt-reset sample``.
    """
    token = _BUFFER_CACHE.set(cache)
    try:
        yield
    finally:
        _BUFFER_CACHE.reset(token)


def _flag_setter(flags: bytearray, index: int):
    """A post-accumulate-grad hook that marks segment ``index`` as having a grad."""

    def hook(_param: torch.Tensor) -> None:
        flags[index] = 1

    return hook
