"""K-row engine helpers: random state of K rows bound as one K-row group and as K single groups
(row i's copy), so a K-row call can be checked against K separate K = 1 calls, field by field."""
from __future__ import annotations

from typing import Any, Sequence

import pytest
import torch

from yolozu_ttt.common import GRAD_STAT_KEYS, SAR_STAT_KEYS, STAT_KEYS
from yolozu_ttt.engine import StepSpec


def make_group(impl: Any, flat, grad, m, v, base, snap, offsets, sizes, has_grad, rows: int) -> Any:
    """A backend's group object (``yolozu_ttt._C.ArenaGroup`` or the Triton twin) over the buffers."""
    cls = getattr(impl, "ArenaGroup", None) or impl.TritonArenaGroup
    return cls(flat, grad, m, v, base, snap, offsets, sizes, has_grad, rows=rows)


class Single:
    """Row ``r`` of a :class:`Rows` as a K = 1 group of its own (copies of the row)."""

    def __init__(self, impl: Any, rows: "Rows", r: int):
        self.flat, self.grad, self.m, self.v, self.base, self.snap, self.teacher = (
            t[r].clone() for t in (rows.flat, rows.grad, rows.m, rows.v, rows.base, rows.snap, rows.teacher))
        self.has_grad = rows.has_grad  # shared flags, as the rows share them
        self.group = make_group(impl, self.flat, self.grad, self.m, self.v, self.base, self.snap, rows.offsets,
                                rows.sizes, self.has_grad, 1)
        self.group.set_teacher(self.teacher)


class Rows:
    """K rows of seeded random state for one dtype: values, a base apart from them, moments, snapshot
    and teacher rows, bound as one K-row group (``group``) and as K singles (``singles``).

    ``per_segment``: the base and moments bound as one (K, size) tensor per segment (the C++
    engine's layout for a run's originals), the rest flat."""

    def __init__(self, impl: Any, k: int, sizes: Sequence[int], dtype: torch.dtype, seed: int, *,
                 per_segment: bool = False, has_grad: bytes | None = None):
        gen = torch.Generator().manual_seed(seed)
        n = sum(sizes)
        self.k, self.sizes, self.dtype, self.gen = k, list(sizes), dtype, gen
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.flat = torch.randn(k, n, generator=gen).to(dtype)
        self.base = (self.flat.float() + 0.05 * torch.randn(k, n, generator=gen)).to(dtype)
        self.grad = torch.zeros_like(self.flat)
        self.m, self.v = torch.zeros(k, n), torch.zeros(k, n)
        self.snap = torch.zeros_like(self.flat)
        self.teacher = torch.randn(k, n, generator=gen).to(dtype)
        self.has_grad = bytearray(b"\x01" * len(sizes) if has_grad is None else has_grad)
        self.singles = [Single(impl, self, r) for r in range(k)]
        if per_segment:
            self.seg_base, self.seg_m, self.seg_v = ([t[:, o:o + s].contiguous() for o, s in zip(self.offsets, sizes)]
                                                     for t in (self.base, self.m, self.v))
            base, m, v = self.seg_base, self.seg_m, self.seg_v
        else:
            self.seg_base = None
            base, m, v = self.base.view(-1), self.m.view(-1), self.v.view(-1)
        self.group = make_group(impl, self.flat.view(-1), self.grad.view(-1), m, v, base, self.snap.view(-1),
                                self.offsets, self.sizes, self.has_grad, k)
        self.group.set_teacher(self.teacher.view(-1))

    def new_grads(self, scale: float = 1.0) -> None:
        """Fresh random grads, row r's scaled by (r + 1)^2 (so rows clip differently), in both bindings."""
        grads = torch.randn(self.flat.shape, generator=self.gen) * scale
        grads *= (torch.arange(1, self.k + 1, dtype=torch.float32) ** 2)[:, None]
        self.grad.copy_(grads.to(self.dtype))
        for r, single in enumerate(self.singles):
            single.grad.copy_(self.grad[r])

    def state(self, r: int) -> dict[str, torch.Tensor]:
        """Row r's per-element state."""
        m, v = self.m, self.v
        if self.seg_base is not None:
            m, v = (torch.cat([t.view(self.k, -1) for t in seg], dim=1) for seg in (self.seg_m, self.seg_v))
        return dict(flat=self.flat[r], m=m[r], v=v[r], snap=self.snap[r], teacher=self.teacher[r])

    def assert_rows_match(self) -> None:
        """Every row's state and step counts equal its single's, bit for bit."""
        n_seg = len(self.sizes)
        steps = list(self.group.steps)
        for r, single in enumerate(self.singles):
            mine = self.state(r)
            for name, want in dict(flat=single.flat, m=single.m, v=single.v, snap=single.snap,
                                   teacher=single.teacher).items():
                assert torch.equal(mine[name], want), (r, name)
            assert steps[r * n_seg:(r + 1) * n_seg] == list(single.group.steps), r


def out_rows(keys: Sequence[str], k: int, device: Any = "cpu") -> torch.Tensor:
    """A fresh (K x len(keys)) float64 ``out`` of NaNs (a slot a call does not write stays NaN)."""
    return torch.full((k * len(keys),), float("nan"), dtype=torch.float64, device=device)


def fused_rows(impl: Any, arenas: Sequence[Rows], spec: StepSpec, *, counter: int = 0, gate: Any = None,
               seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One K-row ``fused_step`` over ``arenas``' groups and, for each row r, one K = 1 step over its
    singles (its gate, its seed as the spec's restore_seed): the (K, 7) stats and the K singles'."""
    k = arenas[0].k
    options = spec.native if hasattr(impl, "ArenaGroup") else spec
    out = out_rows(STAT_KEYS, k)
    impl.fused_step([a.group for a in arenas], out, options, counter, gate, seeds)
    singles = []
    for r in range(k):
        one = spec if seeds is None else spec.replace(restore_seed=seeds[r])
        single_out = out_rows(STAT_KEYS, 1)
        impl.fused_step([a.singles[r].group for a in arenas], single_out,
                        one.native if hasattr(impl, "ArenaGroup") else one, counter,
                        None if gate is None else gate[r:r + 1].clone())
        singles.append(single_out)
    return out.view(k, len(STAT_KEYS)), singles


def steps_as_singles(impl: Any, arenas: Sequence[Rows], spec: StepSpec, gates: Sequence[Sequence[float]], *,
                     gated: bool, seeds: Sequence[int], grad_scale: float) -> torch.Tensor:
    """``len(gates)`` steps of the K-row groups and of each row's singles, fresh grads each step
    (``gated``: step i with ``gates[i]``, each row's gate): every stats field and state tensor equal
    at every step. Returns the last step's (K, 7) stats."""
    for step, row_gates in enumerate(gates):
        for a in arenas:
            a.new_grads(scale=grad_scale)
        gate = torch.tensor(row_gates, dtype=torch.float64) if gated else None
        rows_out, singles = fused_rows(impl, arenas, spec, counter=step, gate=gate, seeds=seeds)
        assert_stats_match(rows_out, singles)
        for a in arenas:
            a.assert_rows_match()
    return rows_out


def call_rows(impl: Any, fn: str, arenas: Sequence[Rows], *args: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``grad_stats`` or ``sar_perturb`` over the K-row groups and over each row's singles."""
    keys = GRAD_STAT_KEYS if fn == "grad_stats" else SAR_STAT_KEYS
    k = arenas[0].k
    out = out_rows(keys, k)
    getattr(impl, fn)([a.group for a in arenas], out, *args)
    singles = []
    for r in range(k):
        single_out = out_rows(keys, 1)
        getattr(impl, fn)([a.singles[r].group for a in arenas], single_out, *args)
        singles.append(single_out)
    return out.view(k, len(keys)), singles


def assert_stats_match(rows_out: torch.Tensor, singles: list[torch.Tensor]) -> None:
    """Row r's stats equal its single's, every field bit for bit (NaN where it is NaN)."""
    for r, want in enumerate(singles):
        assert torch.equal(rows_out[r].nan_to_num(nan=-7.0), want.nan_to_num(nan=-7.0)), (r, rows_out[r], want)


def assert_bad_rows_refused(impl: Any, spec: Any, out_message: str, gate_message: str) -> None:
    """A backend's row checks, each a ``ValueError`` with a clear message (``out_message`` and
    ``gate_message``: the backend's own wording), and nothing changed by a refused call: an ``out``
    too short for the rows, a gate or seeds not one per row, groups of different row counts, a
    segment table that does not cover the arena's rows. ``spec``: the step's options as the
    backend's ``fused_step`` takes them."""
    rows = Rows(impl, 2, [5, 3], torch.float32, 0)
    other = Rows(impl, 3, [5, 3], torch.float32, 0)
    out = torch.zeros(2 * len(STAT_KEYS), dtype=torch.float64)
    with pytest.raises(ValueError, match=out_message):
        impl.fused_step([rows.group], torch.zeros(7, dtype=torch.float64), spec)
    with pytest.raises(ValueError, match=gate_message):
        impl.fused_step([rows.group], out, spec, 0, torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"seeds must have one seed per row \(2\), got 3"):
        impl.fused_step([rows.group], out, spec, 0, None, [1, 2, 3])
    with pytest.raises(ValueError, match="the same number of rows"):
        impl.fused_step([rows.group, other.group], out, spec)
    with pytest.raises(ValueError, match="segments cover 8 elements x 3 rows, arena has 16"):
        make_group(impl, rows.flat.view(-1), rows.grad.view(-1), rows.m.view(-1), rows.v.view(-1),
                   rows.base.view(-1), None, rows.offsets, rows.sizes, None, 3)
    assert rows.group.steps == [0, 0, 0, 0]  # nothing changed

