"""The C++ engine over K rows (replicas) against K separate K = 1 steps, per stats field and state tensor."""
from __future__ import annotations

import pytest
import torch
from support_rows import (Rows, Single, assert_bad_rows_refused, assert_stats_match, call_rows, fused_rows,
                          steps_as_singles)

import yolozu_ttt._C as C
from yolozu_ttt.common import STAT_KEYS, RowStats
from yolozu_ttt.engine import StepSpec, UpdateEngine
from yolozu_ttt.rows import RowArena

#: every option of the fused step (the gate and the stop are their own parameters / tests)
CASES = {
    "plain": {},
    "clip": dict(max_grad_norm=0.5),
    "anchor": dict(anchor_lambda=0.3),
    "clip_anchor": dict(max_grad_norm=0.5, anchor_lambda=0.3),
    "no_snapshot": dict(write_snapshot=False),
    "ema": dict(ema_momentum=0.9),
    "restore": dict(restore_prob=0.3),
    "cotta": dict(max_grad_norm=0.5, ema_momentum=0.9, restore_prob=0.3),
}
SEEDS = [11, 2**40 + 3, 0]  # one per row: row r's restore draws must be those of seed r alone
#: per step, each row's gate (None: ungated): a row closed at its first step, one at a later step
GATES = [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def two_dtype_rows(k: int = 3, **kwargs) -> list[Rows]:
    """Two groups of K rows (float32 with a segment past one work item and one without a grad; bfloat16)."""
    return [Rows(C, k, [7, 1, 16500, 33], torch.float32, 1, has_grad=b"\x01\x01\x01\x00", **kwargs),
            Rows(C, k, [5, 300], torch.bfloat16, 2, **kwargs)]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_k_rows_step_as_k_single_steps(case, gated):
    """One fused call over K rows of two groups = K separate K = 1 calls: every stats field of every
    row and every state tensor bit for bit (each row's own norms, clip coefficient, step counts,
    gate, anchor, EMA and restore draws from its own seed)."""
    arenas = two_dtype_rows()
    rows_out = steps_as_singles(C, arenas, StepSpec(lr=1e-2, **CASES[case]), GATES, gated=gated, seeds=SEEDS,
                                grad_scale=1e-3)
    if "max_grad_norm" in CASES[case]:  # the rows clipped apart: their coefficients differ
        assert len(set(rows_out[:, STAT_KEYS.index("clip_coef")].tolist())) > 1
    if "restore_prob" in CASES[case]:  # every open row restored some elements, a closed one none
        restored = rows_out[:, STAT_KEYS.index("restored")].tolist()
        assert [n > 0 for n in restored] == ([g != 0.0 for g in GATES[-1]] if gated else [True] * 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_k_rows_with_the_base_and_moments_per_segment(dtype):
    """The C++ engine's per-segment layout ((K, size) per segment) steps the rows as flat ones do."""
    arenas = [Rows(C, 2, [3, 16400, 9], dtype, 5, per_segment=True)]
    spec = StepSpec(lr=1e-2, max_grad_norm=0.5, anchor_lambda=0.2, ema_momentum=0.5, restore_prob=0.1)
    for step in range(2):
        arenas[0].new_grads(scale=1e-3)
        rows_out, singles = fused_rows(C, arenas, spec, counter=step, seeds=[4, 9])
        assert_stats_match(rows_out, singles)
        arenas[0].assert_rows_match()


def test_seeds_default_to_the_spec_seed_for_every_row():
    arenas = [Rows(C, 2, [50, 7], torch.float32, 3)]
    arenas[0].new_grads()
    spec = StepSpec(lr=1e-2, restore_prob=0.4, restore_seed=77)
    rows_out, singles = fused_rows(C, arenas, spec, counter=5)
    assert_stats_match(rows_out, singles)
    arenas[0].assert_rows_match()


@pytest.mark.parametrize("anchor_lambda,anchor_value", [(0.0, False), (0.0, True), (0.3, False)])
def test_grad_stats_per_row(anchor_lambda, anchor_value):
    arenas = two_dtype_rows()
    for a in arenas:
        a.new_grads()
    rows_out, singles = call_rows(C, "grad_stats", arenas, anchor_lambda, anchor_value)
    assert_stats_match(rows_out, singles)
    assert len(set(rows_out[:, 0].tolist())) == 3  # each row's own norm


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_sar_ascent_per_row_by_its_own_direction_norm(adaptive, rho):
    """Each row ascends by rho / its own direction norm; a row whose grads are zero is not applied
    (the others are); the backup rows hold every row's pre-ascent values."""
    arenas = two_dtype_rows()
    for a in arenas:
        a.new_grads()
        a.grad[1].zero_()
        a.singles[1].grad.zero_()
    rows_out, singles = call_rows(C, "sar_perturb", arenas, rho, adaptive)
    assert_stats_match(rows_out, singles)
    assert rows_out[:, 1].tolist() == ([1.0, 0.0, 1.0] if rho > 0 else [0.0, 0.0, 0.0])
    for a in arenas:
        a.assert_rows_match()


def test_bad_row_arguments_have_clear_errors():
    assert_bad_rows_refused(C, StepSpec(lr=1e-2).native, "out has 7 elements, fused_step writes 14",
                            r"gate must have one element per row \(2\), got 1")


# ---- through the engine: RowArena + UpdateEngine -------------------------------------------------
def engine_rows(k: int = 3, sizes=(7, 16500, 33), seed: int = 8) -> tuple[RowArena, UpdateEngine, list[Single], Rows]:
    """An UpdateEngine over a RowArena of seeded rows, and the rows' K = 1 singles (C++)."""
    rows = Rows(C, k, list(sizes), torch.float32, seed)
    arena = RowArena(rows.flat, rows.grad, rows.base, list(sizes), exp_avg=rows.m, exp_avg_sq=rows.v)
    return arena, UpdateEngine(arena, lr=1e-2, max_grad_norm=0.5), rows.singles, rows


def single_step(single: Single, spec: StepSpec, gate: float | None = None) -> list[float]:
    out = torch.empty(len(STAT_KEYS), dtype=torch.float64)
    gate_t = None if gate is None else torch.tensor([gate], dtype=torch.float64)
    C.fused_step([single.group], out, spec.native, 0, gate_t)
    return out.tolist()


def test_engine_rows_step_gate_stop_and_rollback():
    """UpdateEngine over K rows: one RowStats per step (row r = its single's StepStats); ``gate``
    per row; ``stop_rows`` rolls one row back from its own snapshot row and freezes it while the
    others go on as their singles do."""
    arena, engine, singles, rows = engine_rows()
    spec = engine.spec.replace(anchor_lambda=0.1)
    for step in range(4):
        rows.new_grads(scale=1e-3)
        if step == 1:  # a gated step: row 2 closed
            engine.gate(torch.tensor([True, True, False]))
            stats, _ = engine.step(spec.replace(gated=True))
            want = [single_step(s, spec, g) for s, g in zip(singles, (1.0, 1.0, 0.0))]
        else:
            stats, _ = engine.step(spec)
            want = [single_step(s, spec) if r not in engine.stopped else None for r, s in enumerate(singles)]
        assert isinstance(stats, RowStats) and stats.k == 3
        for r, w in enumerate(want):
            if w is not None:
                assert list(stats.row(r)) == w, (step, r)
            else:  # a frozen row: nothing applied, its values those it was rolled back to
                assert stats.update_norm[r] == 0.0 and stats.grad_norm[r] == 0.0
                assert torch.equal(rows.flat[r], frozen)
        if step == 2:  # the guard stops row 1: back to its pre-step values, then frozen
            engine.stop_rows([1])
            frozen = singles[1].snap.clone()  # its single's pre-step values
            assert torch.equal(rows.flat[1], frozen)
            assert not torch.equal(rows.flat[0], rows.snap[0])  # the others keep their step
        for r, s in enumerate(singles):
            if r not in engine.stopped:
                assert torch.equal(rows.flat[r], s.flat) and torch.equal(rows.m[r], s.m), (step, r)
        arena.zero_grad()
    assert engine.stopped == {1}
    engine.reset_state()
    assert not engine.stopped and engine._active.tolist() == [1.0, 1.0, 1.0]


def test_stop_rows_without_rollback_freezes_rows_as_they_are():
    """A stop where the guards do not roll back: the row keeps its last step's values and applies
    nothing from then on; the others step on as their singles."""
    arena, engine, singles, rows = engine_rows()
    rows.new_grads(scale=1e-3)
    engine.step()
    stepped = rows.flat[0].clone()
    assert not torch.equal(stepped, arena.snap[0])  # the step changed it: a rollback would show
    engine.stop_rows([0], rollback=False)
    assert torch.equal(rows.flat[0], stepped) and engine.stopped == {0}
    for s in singles[1:]:
        single_step(s, engine.spec)
    arena.zero_grad()
    rows.new_grads(scale=1e-3)
    for s in singles[1:]:
        single_step(s, engine.spec)
    stats, _ = engine.step()
    assert torch.equal(rows.flat[0], stepped) and stats.update_norm[0] == 0.0
    for r in (1, 2):
        assert torch.equal(rows.flat[r], singles[r].flat), r


def test_a_k_row_launch_is_the_same_before_and_after_a_stop():
    """Over K rows every launch takes the rows' gate, so a stop changes no launch (graph mode's
    captured K-row step stays valid) and ``gate`` runs the same device op either way."""
    arena, engine, _, rows = engine_rows()
    rows.new_grads(scale=1e-3)
    before = engine.prepare(engine.spec).key()
    gated = engine.spec.replace(gated=True)
    engine.gate(torch.tensor([True, True, True]))
    gate_before = engine._gate.clone()
    engine.step()
    engine.stop_rows([1])
    assert engine.prepare(engine.spec).key() == before
    engine.gate(torch.tensor([True, True, True]))
    assert gate_before.tolist() == [1.0, 1.0, 1.0] and engine._gate.tolist() == [1.0, 0.0, 1.0]
    assert engine.prepare(gated).key()[2] is engine._gate


def test_engine_rows_clip_grads_anchor_value_and_sar_per_row():
    arena, engine, singles, rows = engine_rows(k=2, sizes=(40, 9))
    rows.new_grads()
    anchors = engine.anchor_value().tolist()
    norms = engine.clip_grads(0.5).tolist()
    out = torch.empty(2, dtype=torch.float64)
    for r, s in enumerate(singles):
        C.grad_stats([s.group], out, 0.0, True)
        assert out.tolist() == [norms[r], anchors[r]]
        coef = min(0.5 / (torch.tensor(norms[r], dtype=torch.float32) + 1e-6).item(), 1.0)
        torch.testing.assert_close(rows.grad[r], s.grad * coef, rtol=1e-6, atol=0.0)
    arena.hold_snapshot()  # a backup of its own (SAR's)
    before = rows.flat.clone()
    sar = engine.sar_perturb(0.05, False)
    assert sar.shape == (2, 2) and sar[:, 1].tolist() == [1.0, 1.0]
    assert torch.equal(arena.snap, before)
    for r in range(2):  # each row by its own direction norm
        scale = 0.05 / (sar[r, 0].item() + 1e-12)
        torch.testing.assert_close(rows.flat[r], before[r] + scale * rows.grad[r], rtol=1e-6, atol=1e-7)


def test_row_arena_bad_inputs_and_stop_without_snapshot():
    flat = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="sizes"):
        RowArena(flat, torch.zeros(2, 5), torch.zeros(2, 5), [2, 2])
    with pytest.raises(ValueError, match=r"grad must be a contiguous \(2, 5\)"):
        RowArena(flat, torch.zeros(2, 4), torch.zeros(2, 5), [5])
    engine = UpdateEngine(RowArena(flat, torch.zeros(2, 5), torch.zeros(2, 5), [5]), lr=1e-2)
    with pytest.raises(RuntimeError, match="no step wrote one"):
        engine.stop_rows([0])
    with pytest.raises(ValueError, match="stop_rows needs rows"):
        engine.stop_rows([2])
    with pytest.raises(ValueError, match="one seed per row"):
        engine.step(restore_prob=0.1, seeds=[1])
