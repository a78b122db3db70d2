"""ParamArena: the selected parameters packed into flat storage, one group per (device, dtype).

Each Parameter keeps its identity; only its ``.data`` is rebound to a view of the group's flat
buffer, and its ``.grad`` to a view of the flat grad buffer, so autograd accumulates in place and
the update engine sees one contiguous array per group. ``backward`` differentiates with respect to
the selected parameters only, so no weight gradient of any other parameter is computed (freezing
them instead would change the forward: matmul stops folding batch dimensions into one mm when a
weight does not require grad, which costs more than the backward saves).

What a group holds is split by lifetime:

- :class:`GroupBuffers`: the flat values, grads, Adam moments and the has-grad flags.
- :class:`GroupBinding` binds one run: the parameters, their original storages and the grad hooks.
  While the values live in the arena, the originals hold the run's starting values: the C++
  engine reads them as its base snapshot (one pointer per segment, no copy); for the Triton
  engine, originals nobody else shares are emptied and a flat base copy is made instead.
  ``with arena:`` (or ``close()``) copies the values back into the originals (grown back where
  emptied) and rebinds them, on every exit path. A session keeps one arena bound over many runs
  (``yolozu_ttt.methods.loop.StepLoop``): ``reset_values`` puts the starting values back.
- :class:`Snapshot`: the pre-step values for a rollback, in the grad buffer or a buffer of its own.

Methods use the arena's operations (``backward``, the snapshot, ``scale_grads`` ...), never its
fields; the loop clears the grads (``new_grads`` / ``clear_grads``). The arena holds buffers only:
the backend's group objects over them are the update engine's (``yolozu_ttt.engine.BackendGroups``,
built, bound and released there); the arena tells that one listener (:meth:`ParamArena.listen`)
when a group's snapshot buffer changes and when it closes.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import torch
from torch._utils import _unflatten_dense_tensors

from .common import SUPPORTED_DTYPES
from .engine import backend_for


@dataclass
class GroupBuffers:
    """The buffers of one (device, dtype) group that may serve several runs of one layout."""

    backend: str  # "cpp" or "triton"
    offsets: list[int]
    sizes: list[int]
    flat: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor | list[torch.Tensor]  # flat (Triton) or one per segment (C++)
    exp_avg_sq: torch.Tensor | list[torch.Tensor]
    base: torch.Tensor | None  # Triton's flat base copy; the C++ base is the run's originals
    has_grad: bytearray  # one flag per segment, set by autograd hooks, read by the engine

    @classmethod
    def allocate(cls, flat: torch.Tensor, sizes: list[int], backend: str) -> "GroupBuffers":
        """Grads and Adam moments for ``flat``: float32 moments, flat and zeroed for Triton; for the
        C++ engine one uninitialised tensor per segment (it zeroes a segment's moments at its first
        step): small allocations come from memory the C library recycles, where one flat 39 MB
        buffer would be a fresh mapping every run, ~15 ms of page faults at first touch here."""
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        grad = torch.zeros_like(flat)
        if backend == "triton":
            moments = [torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device) for _ in range(2)]
            base = flat.clone()
        else:
            moments = [[torch.empty(n, dtype=torch.float32, device=flat.device) for n in sizes] for _ in range(2)]
            base = None
        return cls(backend=backend, offsets=offsets, sizes=sizes, flat=flat, grad=grad, exp_avg=moments[0],
                   exp_avg_sq=moments[1], base=base, has_grad=bytearray(len(sizes)))


@dataclass
class GroupBinding:
    """One run's parameters bound to one group's buffers."""

    buffers: GroupBuffers
    params: list[torch.nn.Parameter]
    originals: list[torch.Tensor]
    base: list[torch.Tensor] | None = None  # C++: the originals, contiguous (the engine's base)
    hooks: list[Any] = field(default_factory=list)
    released: list[tuple[torch.UntypedStorage, int]] = field(default_factory=list)  # (storage, nbytes)
    snap: Any = None  # the pre-step snapshot buffer the engine reads (see Snapshot)
    index: int = 0  # this group's place in its arena's ``groups``
    watch: "Watch | None" = None  # the arena's, told of a new snapshot buffer

    # read-only views of the buffers, for inspection
    flat = property(lambda self: self.buffers.flat)
    grad = property(lambda self: self.buffers.grad)
    offsets = property(lambda self: self.buffers.offsets)
    sizes = property(lambda self: self.buffers.sizes)
    backend = property(lambda self: self.buffers.backend)
    has_grad = property(lambda self: self.buffers.has_grad)
    exp_avg = property(lambda self: self.buffers.exp_avg)

    def segments(self) -> list[torch.Tensor]:
        """The flat values as one view per parameter."""
        return list(self.buffers.flat.split(self.buffers.sizes))

    def set_snap(self, snap: Any) -> None:
        self.snap = snap
        listener = None if self.watch is None else self.watch.listener
        if listener is not None:
            listener.snapshot_changed(self.index, snap)


class ArenaListener(Protocol):
    """Who binds an arena's buffers elsewhere (the update engine's ``BackendGroups``)."""

    def snapshot_changed(self, index: int, snap: Any) -> None: ...

    def arena_closed(self) -> None: ...


class Watch:
    """An arena's one listener, held weakly (the arena never keeps its engine alive): one engine
    binds an arena's buffers; another while it lives is an error."""

    def __init__(self) -> None:
        self._ref: Any = None

    @property
    def listener(self) -> ArenaListener | None:
        return None if self._ref is None else self._ref()

    def listen(self, listener: ArenaListener | None) -> None:
        current = self.listener
        if listener is not None and current is not None and current is not listener:
            raise RuntimeError("yolozu_ttt: this arena's buffers are already bound by another update engine "
                               "(one engine per arena)")
        self._ref = None if listener is None else weakref.ref(listener)

    def closed(self) -> None:
        """Tell the listener the buffers go away, and forget it."""
        listener, self._ref = self.listener, None
        if listener is not None:
            listener.arena_closed()


class Snapshot:
    """The pre-step parameter values a rollback restores, bit-exactly.

    It exists only from the step that writes it to that step's stop decision, so the forward and
    backward passes (the run's memory peak) never hold it. Two places:

    - ``in_grad``: the group's grad buffer itself (the fused step reads each grad before writing the
      snapshot over it): nothing to allocate and fault in per step; ends at the next ``zero_grad``.
    - a buffer of its own (the default), for a snapshot that must outlive the next backward (SAR's
      ascent backup): one tensor per segment on the C++ engine (memory the C library recycles),
      one flat buffer for Triton. With ``keep`` it stays for the whole run (SAR's passes hold it
      anyway), so no step pays to allocate it again.
    """

    def __init__(self, groups: list[GroupBinding]):
        self.groups = groups
        self.keep = False

    def hold(self, *, in_grad: bool = False) -> None:
        """Bind a snapshot buffer to every group that has none."""
        for g in self.groups:
            if g.snap is None:
                if in_grad:
                    g.set_snap(g.buffers.grad)
                elif g.backend == "cpp":
                    g.set_snap([torch.empty(n, dtype=g.flat.dtype) for n in g.sizes])
                else:
                    g.set_snap(torch.empty_like(g.flat))

    def drop(self, *, only_in_grad: bool = False) -> None:
        """Unbind the snapshot: one in a grad buffer always, one of its own unless ``keep`` (or
        ``only_in_grad``)."""
        for g in self.groups:
            in_grad = g.snap is g.buffers.grad
            if g.snap is not None and (in_grad or not (self.keep or only_in_grad)):
                g.set_snap(None)

    def save(self) -> None:
        """Copy the parameters into the held buffers."""
        self._copy(to_params=False)

    def restore(self) -> None:
        """Copy the held values back into the parameters."""
        self._copy(to_params=True)

    def _copy(self, *, to_params: bool) -> None:
        with torch.no_grad():
            for g in self.groups:
                if g.snap is None:
                    raise RuntimeError("yolozu_ttt: rollback needs a snapshot: no step wrote one")
                values = g.segments() if isinstance(g.snap, list) else [g.flat]
                saved = g.snap if isinstance(g.snap, list) else [g.snap]
                dst, src = (values, saved) if to_params else (saved, values)
                torch._foreach_copy_(dst, src)


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
        self.groups: list[GroupBinding] = []
        self.snapshot = Snapshot(self.groups)
        self.watch = Watch()
        self._closed = False
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
        if ps[0].dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
            raise TypeError(f"yolozu_ttt: unsupported parameter dtype {ps[0].dtype} ({names})")
        sizes = [int(p.numel()) for p in ps]
        backend = backend_for(ps[0])
        with torch.no_grad():
            # the values first: on CUDA the originals are emptied before the other buffers exist,
            # so the peak during construction holds each selected parameter once
            flat = torch.cat([p.detach().reshape(-1) for p in ps])
            binding = GroupBinding(buffers=None, params=ps, originals=[p.data for p in ps],  # type: ignore[arg-type]
                                   index=len(self.groups), watch=self.watch)
            self.groups.append(binding)  # registered before rebinding so close() can undo it
            for p, view in zip(ps, _unflatten_dense_tensors(flat, ps)):
                p.data = view
            if backend == "cpp":
                # The originals themselves are the C++ engine's base snapshot (one pointer per
                # segment): no copy of them now and nothing to grow back in close().
                binding.base = [o.contiguous() for o in binding.originals]
            else:
                binding.released = _release_unshared(binding.originals)
            buffers = binding.buffers = GroupBuffers.allocate(flat, sizes, backend)
            for p, view in zip(ps, _unflatten_dense_tensors(buffers.grad, ps)):
                p.grad = view
        for i, p in enumerate(ps):
            binding.hooks.append(p.register_post_accumulate_grad_hook(_flag_setter(buffers.has_grad, i)))

    def listen(self, listener: ArenaListener | None) -> None:
        """``listener`` (the update engine's backend objects; held weakly) is told when a group's
        snapshot buffer changes and when the arena closes; None: no one. One at a time."""
        self.watch.listen(listener)

    # ---- per step -------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Zero the flat grad buffers and the has-grad flags (never set_to_none); a snapshot kept in
        a grad buffer ends here: ``new_grads`` then ``clear_grads``."""
        self.new_grads()
        self.clear_grads()

    def new_grads(self) -> None:
        """The host half of ``zero_grad``: a snapshot kept in a grad buffer ends, the has-grad flags
        clear (the next backward's hooks set them); the buffers are left to ``clear_grads``."""
        self.snapshot.drop(only_in_grad=True)
        for g in self.groups:
            g.has_grad[:] = bytes(len(g.has_grad))

    def clear_grads(self) -> None:
        """Zero the flat grad buffers, device work only (no flags, no snapshot: what a captured step
        may do between its passes)."""
        for g in self.groups:
            g.grad.zero_()

    def backward(self, loss: torch.Tensor, *, replace: bool = False) -> None:
        """Backward into the flat grad buffers, computing only what the selected parameters need;
        ``replace``: the grads become ``loss``'s instead of adding to those there (a second pass
        of one step, e.g. SAR's: device work only, the has-grad flags kept)."""
        if replace:
            self.clear_grads()
        self.accumulate(loss)

    def accumulate(self, loss: torch.Tensor) -> None:
        """``loss``'s grads added into the flat grad buffers (a subclass's precision goes here)."""
        loss.backward(inputs=self.params)

    def mark_all_grads(self) -> None:
        """Treat every selected parameter as having a grad (e.g. a loss term that reaches them all)."""
        for g in self.groups:
            g.has_grad[:] = b"\x01" * len(g.has_grad)

    def scale_grads(self, coef: torch.Tensor) -> None:
        """Multiply every grad by the scalar tensor ``coef`` (on any device)."""
        with torch.no_grad():
            for g in self.groups:
                g.grad.mul_(coef.to(g.grad.device))

    def hold_snapshot(self, *, in_grad: bool = False) -> None:
        """See :meth:`Snapshot.hold`."""
        self.snapshot.hold(in_grad=in_grad)

    def keep_own_snapshot(self) -> None:
        """From now on, a snapshot buffer of its own stays bound for the rest of the run (for a
        method whose passes hold one anyway, e.g. SAR's backup); one in the grad buffer still ends
        with its step."""
        self.snapshot.keep = True

    def save_snapshot(self) -> None:
        """Copy the parameters into the held snapshot buffers."""
        self.snapshot.save()

    def restore_snapshot(self) -> None:
        """Roll the parameters back to the pre-step snapshot, bit-exactly."""
        self.snapshot.restore()

    def drop_snapshot(self) -> None:
        """End the step's snapshot (one of its own stays while ``snapshot.keep``)."""
        self.snapshot.drop()

    def value_copies(self) -> tuple[list[Any], dict[int, torch.Tensor]]:
        """Copies of the current values: per group the buffer a backend binds (one tensor per
        segment for C++, one flat tensor for Triton), and each parameter's copy by ``id``."""
        bound, by_param = [], {}
        with torch.no_grad():
            for g in self.groups:
                if g.backend == "cpp":
                    views = buffer = [p.detach().clone() for p in g.params]
                else:
                    buffer = g.flat.clone()
                    views = _unflatten_dense_tensors(buffer, g.params)
                bound.append(buffer)
                by_param.update({id(p): v for p, v in zip(g.params, views)})
        return bound, by_param

    def refill_copies(self, copies: list[torch.Tensor]) -> None:
        """Copy the current values into the tensors of :meth:`value_copies` (its buffers in order:
        one per parameter of a C++ group, one flat per Triton group)."""
        src = [t for g in self.groups for t in ([p.detach() for p in g.params] if g.backend == "cpp" else [g.flat])]
        if len(src) != len(copies):
            raise ValueError(f"yolozu_ttt: {len(copies)} copies for an arena of {len(src)} buffers")
        with torch.no_grad():
            torch._foreach_copy_(list(copies), src)

    def reset_values(self) -> None:
        """The parameters back to the values they had when the arena was built (a session's next
        run): from the originals the C++ engine reads as its base, or Triton's base copy."""
        self.snapshot.drop(only_in_grad=True)
        with torch.no_grad():
            for g in self.groups:
                if g.base is not None:
                    torch._foreach_copy_(g.segments(), [b.reshape(-1) for b in g.base])
                else:
                    g.flat.copy_(g.buffers.base)

    def bound(self) -> bool:
        """Whether every selected parameter's ``.data`` is still its view of the flat buffer (nobody
        rebound it since the arena was built)."""
        if self._closed:
            return False
        for g in self.groups:
            ptr, size = g.flat.data_ptr(), g.flat.element_size()
            for p, offset in zip(g.params, g.offsets):
                if p.data.data_ptr() != ptr + offset * size or p.dtype != g.flat.dtype:
                    return False
        return True

    @property
    def backend(self) -> str:
        """The one backend all groups run on ("cpp" or "triton")."""
        backends = {g.backend for g in self.groups}
        if len(backends) != 1:
            raise RuntimeError(f"yolozu_ttt: parameters span several engines {sorted(backends)}")
        return backends.pop()

    @property
    def device(self) -> torch.device:
        return self.groups[0].flat.device

    @property
    def numel(self) -> int:
        return sum(int(g.flat.numel()) for g in self.groups)

    # ---- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        """Copy values back into the original storages and unbind the views; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.watch.closed()  # the engine's objects drop the run's tensors (the originals) first
        with torch.no_grad():
            for g in self.groups:
                for h in g.hooks:
                    h.remove()
                for p in g.params:
                    p.grad = None
                # drop the work buffers before the originals grow back
                g.buffers = g.snap = g.base = None  # type: ignore[assignment]
                for storage, nbytes in g.released:
                    storage.resize_(nbytes)
                moved = [(p, orig) for p, orig in zip(g.params, g.originals) if p.data.data_ptr() != orig.data_ptr()]
                if moved:
                    torch._foreach_copy_([orig for _, orig in moved], [p.data for p, _ in moved])
                for p, orig in moved:
                    p.data = orig
        self.groups.clear()

    def __enter__(self) -> "ParamArena":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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


def _flag_setter(flags: bytearray, index: int):
    """A post-accumulate-grad hook that marks segment ``index`` as having a grad."""

    def hook(_param: torch.Tensor) -> None:
        flags[index] = 1

    return hook
