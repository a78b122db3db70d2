"""The Triton update engine: the stateful arena group and its launch API (kernels: ``update_kernels``).

The GPU twin of the C++ engine (``yolozu_ttt._C``), with its interface: ``fused_step``,
``grad_stats`` and ``sar_perturb`` take the groups and a caller's float64 ``out`` buffer on the
groups' device, and write their scalars into it in the layouts of ``yolozu_ttt.common``
(``STAT_KEYS``, ``GRAD_STAT_KEYS``, ``SAR_STAT_KEYS``). One :class:`TritonArenaGroup` binds the
flat buffers of one dtype (float32 / bfloat16 / float16):

    param, grad, base, snap   the arena dtype, ``numel`` elements each (``snap`` optional)
    exp_avg, exp_avg_sq       float32 Adam moments
    offsets, sizes            the parameter tensors packed back to back, in order
    has_grad                  one byte per segment, written on the host by autograd hooks

Every launcher only enqueues work: nothing reads device memory back to the host, so a training
step costs the caller one host read of ``out``. Everything that does not change between steps
lives on the device from the group's construction (the block table) or from the first step that
needs it (the per-segment anchor coefficients ``2*lambda/n`` for one lambda, the Adam
bias-correction table for one (lr, beta1, beta2), indexed by the step count). The host's per-step
work is therefore O(1) in the number of parameter tensors: one non-blocking copy of the has-grad
bytes (the autograd hooks' ``bytearray``, viewed once as a tensor) and the launches.
:func:`prepare_step` splits a step into that host work and a launch that reads only device
memory the group owns (:class:`StepLaunch`), so ``yolozu_ttt.engine`` can capture the launch in
a CUDA graph and replay it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..common import GRAD_STAT_KEYS, INTERPRET, SAR_STAT_KEYS, STAT_KEYS, SUPPORTED_DTYPES
from ._shared import num_warps as _warps
from .constants import counter_words, group_word, restore_key, seed_prefix  # noqa: F401 (restore_key: the API, as _C's)
from .update_kernels import (ANCHOR_LOSS, BIAS_COLS, BLK_COLS, BLK_END, BLK_SEG, BLK_SEG_NUMEL, BLK_START, GRAD_NORM,
                             GS_ANCHOR_LOSS, GS_GRAD_NORM, PART_ROWS, _adam_kernel, _grad_pass_kernel,
                             _grad_stats_kernel, _RBLOCK, _sar_apply_kernel, _sar_norm_kernel, _sar_scale_kernel,
                             _step_stats_kernel)

if TYPE_CHECKING:  # the spec's module imports this one (lazily), never the other way
    from ..engine import StepSpec


# ------------------------------------------------------------------------------------------
# Host side: checks, the arena group and what it builds once, the per-step host work
# ------------------------------------------------------------------------------------------
#: Rows of a fresh bias-correction table (step counts 0 .. rows-1); it doubles when a step needs more.
_BIAS_MIN_ROWS = 256


def _check_tensor(t: Any, what: str, numel: int | None, device: torch.device | None,
                  dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"yolozu_ttt.kernels.update: {what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise ValueError(f"yolozu_ttt.kernels.update: {what} must be contiguous")
    if t.dtype not in dtypes:
        raise TypeError(f"yolozu_ttt.kernels.update: {what} has dtype {t.dtype}, expected one of {dtypes}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"yolozu_ttt.kernels.update: {what} has {t.numel()} elements, param has {numel}")
    if device is not None and t.device != device:
        raise ValueError(f"yolozu_ttt.kernels.update: {what} is on {t.device}, param on {device}")
    return t


def _check_out(out: Any, keys: Sequence[str], device: torch.device, rows: int = 1) -> torch.Tensor:
    """``out`` must be a contiguous 1-D float64 tensor on ``device`` with room for ``keys`` per row."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"yolozu_ttt.kernels.update: out must be a torch.Tensor, got {type(out).__name__}")
    problems = []
    if out.dtype != torch.float64:
        problems.append(f"dtype {out.dtype}, expected torch.float64")
    if out.device != device:
        problems.append(f"device {out.device}, expected the groups' {device}")
    if out.dim() != 1 or out.numel() < len(keys) * rows:
        per_row = "" if rows == 1 else f" per row of {rows}"
        problems.append(f"shape {tuple(out.shape)}, expected 1-D with at least {len(keys) * rows} elements "
                        f"{tuple(keys)}{per_row}")
    elif not out.is_contiguous():
        problems.append("a stride other than 1, expected contiguous")
    if problems:
        raise ValueError("yolozu_ttt.kernels.update: out has " + "; ".join(problems))
    return out


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not INTERPRET:
        raise ValueError("yolozu_ttt.kernels.update: CPU tensors need TRITON_INTERPRET=1 "
                         "(use yolozu_ttt._C for CPU arenas)")


def _upload(rows: np.ndarray, device: torch.device, dtype: np.dtype) -> torch.Tensor:
    """A host array as a device tensor without a host sync (pinned, non-blocking, on CUDA). For the
    tables built once: the caching host allocator keeps the pinned copy until the copy is done."""
    t = torch.from_numpy(np.ascontiguousarray(rows, dtype=dtype).reshape(-1))
    if t.numel() == 0:
        t = torch.zeros(1, dtype=t.dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class TritonArenaGroup:
    """The flat buffers of one dtype arena group, bound for the Triton kernels.

    Parameters:
        param: flat contiguous parameter buffer (float32, bfloat16 or float16), updated in place.
        grad: flat gradient buffer, same dtype and size.
        exp_avg, exp_avg_sq: float32 Adam moments, same size.
        base: base snapshot (same dtype), the anchor of the total-update norm and EATA.
        snap: pre-step snapshot buffer (same dtype) or None (then ``write_snapshot`` and SAR fail).
            It may be ``grad`` itself: the step loads each grad before it stores the snapshot
            over it (not for ``sar_perturb``, whose backup must outlive the next backward).
        offsets, sizes: the segment table; segments must tile the arena in order.
        has_grad: a byte buffer (e.g. ``bytearray``) with one entry per segment, read at every
            step (nonzero = the segment has a grad), or None = every segment has one. A writable
            buffer is viewed once as a tensor and copied to the device at each step (one
            non-blocking copy); a read-only one (``bytes``) is copied once.
        rows: K rows (replicas): every per-element buffer holds K rows of the segments (K x their
            elements, row-major); the has-grad flags are shared; each row has its own step counts,
            restore key and stats (K = 1: one run).
        block_size: elements per program (power of two); blocks never straddle segments.

    The group keeps references to every tensor. Adam step counts are kept on the device, per
    block, and advance only for segments with a grad (like torch.optim.Adam's per-param state).
    """

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, base: torch.Tensor, snap: torch.Tensor | None,
                 offsets: Sequence[int], sizes: Sequence[int], has_grad: Any = None, *,
                 rows: int = 1, block_size: int = 2048):
        self.param = _check_tensor(param, "param", None, None, SUPPORTED_DTYPES)
        n, dev, dt = param.numel(), param.device, param.dtype
        self.grad = _check_tensor(grad, "grad", n, dev, (dt,))
        self.exp_avg = _check_tensor(exp_avg, "exp_avg", n, dev, (torch.float32,))
        self.exp_avg_sq = _check_tensor(exp_avg_sq, "exp_avg_sq", n, dev, (torch.float32,))
        self.base = _check_tensor(base, "base", n, dev, (dt,))
        self.snap = None if snap is None else _check_tensor(snap, "snap", n, dev, (dt,))
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError("yolozu_ttt.kernels.update: block_size must be a power of two >= 16")
        if int(rows) < 1:
            raise ValueError("yolozu_ttt.kernels.update: rows must be >= 1")
        self.rows = int(rows)
        self.block_size = int(block_size)
        self.offsets = [int(o) for o in offsets]
        self.sizes = [int(s) for s in sizes]
        if len(self.offsets) != len(self.sizes):
            raise ValueError("yolozu_ttt.kernels.update: offsets and sizes differ in length")
        columns: tuple[list[int], ...] = ([], [], [], [])  # segment, start, end, segment numel
        first_block = []
        expect = 0
        for s, (off, size) in enumerate(zip(self.offsets, self.sizes)):
            if off != expect or size < 0:
                raise ValueError("yolozu_ttt.kernels.update: segments must tile the arena in order")
            expect += size
            first_block.append(len(columns[0]))
            for b in range(0, max(size, 1), self.block_size):  # a zero-size segment: one empty block
                for column, value in zip(columns, (s, off + b, off + min(size, b + self.block_size), size)):
                    column.append(value)
        if expect * self.rows != n:
            times = "" if self.rows == 1 else f" x {self.rows} rows"
            raise ValueError(f"yolozu_ttt.kernels.update: segments cover {expect} elements{times}, arena has {n}")
        self.row_numel = expect
        n_seg = len(self.sizes)
        flags_src = None
        if has_grad is not None:
            view = memoryview(has_grad)
            if view.itemsize != 1 or view.nbytes != n_seg:
                raise ValueError("yolozu_ttt.kernels.update: has_grad must be a byte buffer with one entry per segment")
            if n_seg and not view.readonly:
                flags_src = torch.frombuffer(has_grad, dtype=torch.uint8)  # a view: the hooks' writes show
        self.has_grad = has_grad
        self.num_blocks = len(columns[0])
        self._grid = (self.num_blocks, self.rows)
        self._warps = _warps(self.block_size)
        # --- built once: the block table, the first block of each segment, 2/n per segment
        blocks = np.zeros((max(self.num_blocks, 1), BLK_COLS), dtype=np.int64)
        for col, column in zip((BLK_SEG, BLK_START, BLK_END, BLK_SEG_NUMEL), columns):
            blocks[:len(column), col] = column
        self._blocks = _upload(blocks, dev, np.int64)
        self._first_block = np.asarray(first_block, dtype=np.int64)
        sizes_f = np.asarray(self.sizes, dtype=np.float64)
        self._anchor_scale = np.divide(2.0, sizes_f, out=np.zeros_like(sizes_f), where=sizes_f > 0)
        # --- device state: has-grad flags (refreshed per step), Adam step count per block,
        # the restore key; tables built on first use (anchor coefficients, bias corrections)
        if flags_src is None and has_grad is not None:
            flags = np.frombuffer(bytes(memoryview(has_grad)), dtype=np.uint8)
        else:
            flags = np.ones(n_seg, dtype=np.uint8)
        self._flags = _upload(flags, dev, np.uint8)
        self._flags_src = flags_src
        self._steps = torch.zeros(self.rows * max(self.num_blocks, 1), dtype=torch.int32, device=dev)
        self._adam_steps = 0  # fused steps since the last reset: a bound on every step count

        self._anchor_lambda: float | None = None
        self._anchor: torch.Tensor | None = None
        self._bias_key: tuple[float, float, float] | None = None
        self._bias: torch.Tensor | None = None
        self._bias_rows = 0
        self._reserved_steps = 0  # the table covers at least this many steps (reserve_steps)
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self.teacher: torch.Tensor | None = None

    def set_snapshot(self, snap: torch.Tensor | None) -> None:
        """Bind (or with None, unbind) the pre-step snapshot buffer: same size, dtype and device as param."""
        self.snap = None if snap is None else _check_tensor(snap, "snap", self.param.numel(), self.param.device,
                                                               (self.param.dtype,))

    def set_teacher(self, teacher: torch.Tensor | None) -> None:
        """Bind (or with None, unbind) the CoTTA teacher buffer: same size, dtype and device as param."""
        if teacher is not None:
            _check_tensor(teacher, "teacher", self.param.numel(), self.param.device, (self.param.dtype,))
        self.teacher = teacher

    @property
    def steps(self) -> list[int]:
        """Adam step count per (row, segment), row-major (as ``_C.ArenaGroup.steps``); reads the device."""
        if not self.sizes:
            return []
        counts = self._steps.cpu().numpy().reshape(self.rows, -1)
        return [int(c) for c in counts[:, self._first_block].reshape(-1)]

    @property
    def device(self) -> torch.device:
        return self.param.device

    def reset_state(self) -> None:
        """Zero the Adam moments and step counts."""
        self._steps.zero_()
        self._adam_steps = 0
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()

    # ---- per step: O(1) host work in the number of segments ---------------------------------
    def _upload_flags(self) -> None:
        """The has-grad bytes to the device: one copy, non-blocking (a pageable source is staged by
        CUDA before the call returns, so the hooks may write the buffer again right away). Not while
        a CUDA graph is being captured: a graph cannot hold a copy from pageable memory, and a
        captured step's flags are the ones ``prepare_step`` uploaded before the capture."""
        if self._flags_src is not None and not (self._flags.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._flags.copy_(self._flags_src, non_blocking=True)

    def _anchor_coefs(self, anchor_lambda: float) -> torch.Tensor:
        """``2*lambda/n`` per segment (float32 on the device), rebuilt only when lambda changes."""
        if anchor_lambda != self._anchor_lambda or self._anchor is None:
            self._anchor = _upload(anchor_lambda * self._anchor_scale, self.device, np.float32)
            self._anchor_lambda = anchor_lambda
        return self._anchor

    def reserve_steps(self, steps: int) -> None:
        """Size the bias-correction table for ``steps`` steps from the next one on, so it is not
        reallocated mid-run (a CUDA graph of the step bakes its pointer in)."""
        self._reserved_steps = max(self._reserved_steps, int(steps))

    def _bias_table(self, lr: float, beta1: float, beta2: float) -> torch.Tensor:
        """The bias corrections for step counts 0 .. rows-1 (``BIAS_*`` columns; row 0 = (0, 1)),
        for the step about to run (step counts up to ``_adam_steps + 1``); rebuilt when (lr, betas)
        change, doubled when the steps outgrow it. The powers come from libm's ``pow`` (as the
        C++ engine's ``std::pow``), in float64, rounded to float32 once."""
        key = (lr, beta1, beta2)
        need = max(self._adam_steps, self._reserved_steps) + 1
        if key != self._bias_key or need >= self._bias_rows:
            rows = max(_BIAS_MIN_ROWS, 2 * self._bias_rows if key == self._bias_key else 0)
            while rows <= need:
                rows *= 2
            table = np.zeros((rows, BIAS_COLS), dtype=np.float64)
            table[0, 1] = 1.0
            for t in range(1, rows):
                table[t, 0] = -(lr / (1.0 - math.pow(beta1, float(t))))
                table[t, 1] = math.sqrt(1.0 - math.pow(beta2, float(t)))
            self._bias = _upload(table, self.device, np.float32)
            self._bias_key, self._bias_rows = key, rows
        return self._bias  # type: ignore[return-value]


class _Plan:
    """What one tuple of groups keeps between calls: the fp64 partial-sum workspace (``PART_ROWS`` x
    K rows of ``n_slots`` slots; every slot in use is written before it is read), each group's
    first slot in a row, SAR's scale per row."""

    def __init__(self, gs: list[TritonArenaGroup], device: torch.device):
        self.groups = gs
        self.rows = gs[0].rows
        self.bases, total = [], 0
        for g in gs:
            self.bases.append(total)
            total += g.num_blocks
        self.n_slots = total
        self.part = torch.empty((PART_ROWS, max(total * self.rows, 1)), dtype=torch.float64, device=device)
        self.stride = self.part.stride(0)
        self.sar_scale = torch.empty(self.rows, dtype=torch.float32, device=device)
        self.items = list(zip(gs, self.bases))
        # the restore keys' parts on the device: each row's seed prefix (uploaded when the seeds
        # change), the step counter's words (uploaded per restore step), each group's word (fixed)
        self.seed_prefix = torch.zeros(self.rows, dtype=torch.int32, device=device)
        self.seeds: tuple[int, ...] | None = None
        self.counter = torch.zeros(2, dtype=torch.int32, device=device)
        self.group_words = [_as_i32(group_word(i)) for i in range(len(gs))]

    def upload_keys(self, seeds: tuple[int, ...], counter: int) -> None:
        """The restore keys' per-step parts: the rows' seed prefixes when ``seeds`` changed, the counter's words."""
        if seeds != self.seeds:
            prefixes = [_as_i32(seed_prefix(s)) for s in seeds]
            self.seed_prefix.copy_(torch.tensor(prefixes, dtype=torch.int32), non_blocking=True)
            self.seeds = seeds
        words = [_as_i32(w) for w in counter_words(counter)]
        self.counter.copy_(torch.tensor(words, dtype=torch.int32), non_blocking=True)


def _prepare(groups: Sequence[TritonArenaGroup], out: Any, keys: Sequence[str]) -> tuple[list[TritonArenaGroup], _Plan]:
    """Checks, then the plan of ``groups`` (built on first use, kept by the first group)."""
    gs = list(groups)
    if not gs:
        raise ValueError("yolozu_ttt.kernels.update: groups must not be empty")
    for g in gs:
        if not isinstance(g, TritonArenaGroup):
            raise TypeError(f"yolozu_ttt.kernels.update: expected TritonArenaGroup, got {type(g).__name__}")
    device = gs[0].device
    key = tuple(map(id, gs))
    plan = gs[0]._plans.get(key)
    if plan is None:
        if any(g.device != device for g in gs):
            raise ValueError("yolozu_ttt.kernels.update: all groups must be on one device")
        if any(g.rows != gs[0].rows for g in gs):
            raise ValueError("yolozu_ttt.kernels.update: groups must hold the same number of rows")
        _check_device(device)
        plan = _Plan(gs, device)
        if len(gs[0]._plans) >= 8:
            gs[0]._plans.clear()
        gs[0]._plans[key] = plan
    if not (type(out) is torch.Tensor and out.dtype == torch.float64 and out.device == device and out.dim() == 1
            and out.numel() >= len(keys) * plan.rows and out.is_contiguous()):
        _check_out(out, keys, device, plan.rows)
    return gs, plan


def _as_i32(key: int) -> int:
    """A uint32 as the int32 with the same bits (a kernel argument Triton types as i32)."""
    return key - (1 << 32) if key >= 1 << 31 else key


def _grad_pass(plan: _Plan, has_anchor: bool, anchor_value: bool, anchor_lambda: float) -> None:
    """1-2. every group's grad-pass partials (rows ``PART_GRAD`` and ``PART_ANCHOR``) into the workspace."""
    part, stride = plan.part, plan.stride
    for g, base in plan.items:
        if g.num_blocks:
            anchor = g._anchor_coefs(anchor_lambda) if has_anchor else g._flags
            _grad_pass_kernel[g._grid](
                g.param, g.grad, g.base, g._blocks, g._flags, anchor, part, stride, base, g.row_numel, plan.n_slots,
                HAS_ANCHOR=has_anchor, ANCHOR_VALUE=anchor_value, BLOCK_SIZE=g.block_size, num_warps=g._warps)


# ------------------------------------------------------------------------------------------
# Launchers (the engine interface, as yolozu_ttt._C's)
# ------------------------------------------------------------------------------------------
class StepLaunch:
    """One fused step after its host work (checks, the has-grad and restore-key uploads, the tables).

    ``run()`` enqueues the step's kernels; they read and write only device memory that outlives
    the call (the groups' buffers and tables, the plan's workspace, ``out``), so a CUDA graph of
    ``run()`` replays the same step for as long as :meth:`key` is unchanged (``key`` names every
    scalar and pointer the launches bake in: the spec, the gate's and the tables' pointers; the
    per-step inputs are uploaded before ``run``).
    """

    __slots__ = ("plan", "out", "spec", "gate")

    def __init__(self, plan: _Plan, out: torch.Tensor, spec: "StepSpec", gate: torch.Tensor | None):
        self.plan, self.out, self.spec, self.gate = plan, out, spec, gate

    def key(self) -> tuple:
        """What a replay of ``run`` depends on besides the uploaded per-step inputs."""
        ptrs = []
        for g, _ in self.plan.items:
            ptrs.extend(t.data_ptr() if t is not None else 0 for t in (g.snap, g.teacher, g._anchor, g._bias))
        gate = None if self.gate is None else self.gate.data_ptr()
        return (tuple(map(id, self.plan.groups)), self.out.data_ptr(), self.spec, gate, tuple(ptrs))

    def run(self) -> None:
        """Enqueue the step's kernels (no host work beyond the launches)."""
        plan, out, spec, gate = self.plan, self.out, self.spec, self.gate
        part, stride, n_slots = plan.part, plan.stride, plan.n_slots
        clip = spec.max_grad_norm is not None
        has_anchor = spec.anchor_lambda != 0.0
        has_restore = spec.restore_prob > 0.0
        has_ema, write_snapshot = spec.ema_momentum is not None, spec.write_snapshot
        # 1-3. with clipping: grad-norm pass, then the coefficient on device
        if clip:
            _grad_pass(plan, has_anchor, has_anchor, spec.anchor_lambda)
            _grad_stats_kernel[(plan.rows,)](part, stride, n_slots, out, spec.max_grad_norm, NORM_AT=GRAD_NORM,
                                             ANCHOR_AT=ANCHOR_LOSS, OUT_COUNT=len(STAT_KEYS), CLIP=True,
                                             RBLOCK=_RBLOCK)
        # 1-8. Adam pass (reads the coefficient from out), snapshot, EMA, restore, partial sums
        beta1, beta2 = spec.betas
        ema_m = min(max(spec.ema_momentum, 0.0), 1.0) if has_ema else 0.0  # type: ignore[type-var]
        for (g, base), word in zip(plan.items, plan.group_words):
            if g.num_blocks:
                _adam_kernel[g._grid](
                    g.param, g.grad, g.exp_avg, g.exp_avg_sq, g.base,
                    g.snap if write_snapshot else g.param, g.teacher if has_ema else g.param,
                    g._blocks, g._flags, g._anchor if has_anchor else g._flags, g._bias, g._steps, out, part,
                    stride, base, g.row_numel, n_slots, g.num_blocks, 1.0 - beta1, beta2, 1.0 - beta2, spec.eps, ema_m, 1.0 - ema_m, spec.restore_prob,
                    plan.seed_prefix, plan.counter, word, out if gate is None else gate, HAS_CLIP=clip, HAS_ANCHOR=has_anchor,
                    WRITE_SNAPSHOT=write_snapshot, HAS_EMA=has_ema, HAS_RESTORE=has_restore, GATED=gate is not None,
                    BLOCK_SIZE=g.block_size, num_warps=g._warps)
        _step_stats_kernel[(plan.rows,)](part, stride, n_slots, out, HAS_CLIP=clip, RBLOCK=_RBLOCK)


def prepare_step(groups: Sequence[TritonArenaGroup], out: torch.Tensor, spec: "StepSpec", restore_counter: int = 0,
                 gate: torch.Tensor | None = None, seeds: Sequence[int] | None = None) -> StepLaunch:
    """The host half of :func:`fused_step` (same parameters): checks the buffers, uploads the
    has-grad flags (and the restore keys), builds what is missing of the tables, and returns the
    launch. Nothing changes unless the launch runs, except the device flags and keys."""
    gs, plan = _prepare(groups, out, STAT_KEYS)
    has_ema, has_restore = spec.ema_momentum is not None, spec.restore_prob > 0.0
    for g in gs:
        if spec.write_snapshot and g.snap is None:
            raise ValueError("yolozu_ttt.kernels.update: write_snapshot needs a snapshot buffer")
        if has_ema and g.teacher is None:
            raise ValueError("yolozu_ttt.kernels.update: ema_momentum needs a teacher buffer (set_teacher)")
    rows = plan.rows
    if gate is not None and not (type(gate) is torch.Tensor and gate.dtype == torch.float64
                                 and gate.device == out.device and gate.numel() == rows and gate.is_contiguous()):
        raise ValueError(f"yolozu_ttt.kernels.update: gate must be a float64 tensor of one element per row ({rows}) "
                         "on the groups' device")
    if seeds is not None and len(seeds) != rows:
        raise ValueError(f"yolozu_ttt.kernels.update: seeds must have one seed per row ({rows}), got {len(seeds)}")
    lr, (beta1, beta2), anchor_lambda = spec.lr, spec.betas, spec.anchor_lambda
    for g in gs:
        g._upload_flags()
        g._bias_table(lr, beta1, beta2)
        if anchor_lambda != 0.0:
            g._anchor_coefs(anchor_lambda)
        g._adam_steps += 1
    if has_restore:
        plan.upload_keys((spec.restore_seed,) * rows if seeds is None else tuple(seeds), restore_counter)
    return StepLaunch(plan, out, spec, gate)


def fused_step(groups: Sequence[TritonArenaGroup], out: torch.Tensor, spec: "StepSpec", restore_counter: int = 0,
               gate: torch.Tensor | None = None, seeds: Sequence[int] | None = None) -> None:
    """One fused step over all groups; the Triton twin of ``yolozu_ttt._C.fused_step``.

    Parameters:
        groups: the arena groups (one per dtype), all on one device, holding the same K rows; a
            row's groups share its grad norm and clip coefficient (each row its own).
        out: contiguous 1-D float64 tensor on the groups' device, at least ``K * len(STAT_KEYS)``
            long; row r's out[7r:7r+7] receives, in the order of ``yolozu_ttt.common.STAT_KEYS``: grad_norm,
            grad_norm_clipped, update_norm, total_update_norm (norms of the final params; NaN
            where the sum of squares holds a NaN, inf where an fp32 sum overflows), anchor_loss,
            clip_coef, restored (elements restored).
        spec: the step's options, a ``yolozu_ttt.engine.StepSpec`` (validated when it was built;
            taken as it is here):

            - lr, betas, eps: torch.optim.Adam hyper-parameters (no weight decay, no amsgrad).
            - max_grad_norm: clip like torch.nn.utils.clip_grad_norm_ (None: no clipping).
            - anchor_lambda: EATA anchor weight; adds 2*lambda*(p-base)/n to each segment's grad.
            - write_snapshot: write snap <- p (pre-step values, bit-exact) in the same pass.
            - ema_momentum: CoTTA teacher EMA t <- t*m + (1-m)*p on the updated params, m clamped
              to [0, 1], every element (needs ``set_teacher``); None: no EMA.
            - restore_prob: CoTTA stochastic restore after the EMA: element j of group i goes back
              to ``base`` where ``(fmix32(j ^ restore_key(seed, restore_counter, i)) >> 8)
              * 2^-24 < restore_prob`` (the same draws as ``_C``; j counts within the row, seed is
              the row's); 0: none, >= 1: every element.
            - restore_seed: the key of the counter-based restore RNG, with ``restore_counter``.
        restore_counter: this step's restore counter.
        gate: None, or a float64 tensor on the device of one element per row, read by the kernels:
            0 makes the row apply nothing (as if no segment had a grad; the stats are still
            written, the update norm 0).
        seeds: each row's restore seed (K ints; None: ``spec.restore_seed`` for every row).

    Nothing is read back to the host; the non-finite check is ``~torch.isfinite(out)``. The host
    work is O(1) in the number of segments (:func:`prepare_step`), then :meth:`StepLaunch.run`.
    """
    prepare_step(groups, out, spec, restore_counter, gate, seeds).run()


def grad_stats(groups: Sequence[TritonArenaGroup], out: torch.Tensor, anchor_lambda: float = 0.0,
               anchor_value: bool = False) -> None:
    """The grad norm and the anchor value without changing anything; the twin of ``_C.grad_stats``.

    Parameters:
        groups: the arena groups, all on one device.
        out: contiguous 1-D float64 tensor on the groups' device with at least two elements;
            out[0:2] receives (grad_norm, anchor_loss), ``yolozu_ttt.common.GRAD_STAT_KEYS``.
        anchor_lambda: EATA anchor weight; the grad norm includes the anchor gradient.
        anchor_value: compute the anchor value even at ``anchor_lambda == 0`` (else it is 0 there).
    """
    gs, plan = _prepare(groups, out, GRAD_STAT_KEYS)
    anchor_lambda = float(anchor_lambda)
    for g in gs:
        g._upload_flags()
    _grad_pass(plan, anchor_lambda != 0.0, anchor_lambda != 0.0 or bool(anchor_value), anchor_lambda)
    _grad_stats_kernel[(plan.rows,)](plan.part, plan.stride, plan.n_slots, out, 0.0, NORM_AT=GS_GRAD_NORM,
                                     ANCHOR_AT=GS_ANCHOR_LOSS, OUT_COUNT=len(GRAD_STAT_KEYS), CLIP=False,
                                     RBLOCK=_RBLOCK)


def sar_perturb(groups: Sequence[TritonArenaGroup], out: torch.Tensor, rho: float, adaptive: bool) -> None:
    """SAR ascent step with the snapshot as backup; the Triton twin of ``_C.sar_perturb``.

    Parameters:
        groups: the arena groups (each needs a ``snap`` buffer apart from its grad buffer), all on
            one device.
        out: contiguous 1-D float64 tensor on the groups' device with at least two elements;
            out[0:2] receives (direction norm, applied 1.0 / 0.0), ``yolozu_ttt.common.SAR_STAT_KEYS``.
        rho: neighbourhood size (already scaled by the caller, e.g. rho * first_step_scale).
        adaptive: ASAM direction d = g*|p| instead of g.

    1. norm = ||d|| over segments with a grad (d = g, or g*|p| if adaptive);
    2. if rho > 0: snap <- p for every segment (the backup always holds the pre-ascent values);
       then, unless norm is zero (decided on device; a NaN norm applies, making the parameters
       with a grad NaN, as the reference's NaN scale does), p <- p + rho/(norm + 1e-12) * d for
       segments with a grad.
    """
    gs, plan = _prepare(groups, out, SAR_STAT_KEYS)
    if any(g.snap is None for g in gs):
        raise ValueError("yolozu_ttt.kernels.update: sar_perturb needs a snapshot buffer")
    if any(g.snap.data_ptr() == g.grad.data_ptr() for g in gs):
        raise ValueError("yolozu_ttt.kernels.update: sar_perturb needs a snapshot buffer apart from the grad buffer")
    adaptive = bool(adaptive)
    for g in gs:
        g._upload_flags()
    part, scale = plan.part, plan.sar_scale
    for g, base in plan.items:
        if g.num_blocks:
            _sar_norm_kernel[g._grid](g.param, g.grad, g._blocks, g._flags, part, base, g.row_numel, plan.n_slots,
                                      ADAPTIVE=adaptive, BLOCK_SIZE=g.block_size, num_warps=g._warps)
    _sar_scale_kernel[(plan.rows,)](part, plan.n_slots, out, scale, float(rho), RHO_POSITIVE=float(rho) > 0.0, RBLOCK=_RBLOCK)
    if float(rho) > 0.0:
        for g, _ in plan.items:
            if g.num_blocks:
                _sar_apply_kernel[g._grid](g.param, g.grad, g.snap, g._blocks, g._flags, out, scale, g.row_numel,
                                           ADAPTIVE=adaptive, BLOCK_SIZE=g.block_size, num_warps=g._warps)
