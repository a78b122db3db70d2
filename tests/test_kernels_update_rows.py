"""The Triton engine (kernels/update.py) over K rows against K separate K = 1 steps of itself, per
stats field and state tensor: the C++ engine's K-row checks (test_engine_rows.py) on the GPU code
path. ``test_under_the_interpreter`` re-runs this file with ``TRITON_INTERPRET=1`` on CPU tensors
(kept small: the interpreter is slow); on a GPU the same tests run on CUDA tensors."""
from __future__ import annotations

import pytest
import torch
from conftest import UNDER_INTERPRETER, run_under_interpreter, skip_under_interpreter
from support_rows import Rows, assert_bad_rows_refused, assert_stats_match, call_rows, steps_as_singles

from yolozu_ttt.common import STAT_KEYS
from yolozu_ttt.engine import StepSpec, UpdateEngine
from yolozu_ttt.kernels import update as U
from yolozu_ttt.rows import RowArena

needs_triton_path = pytest.mark.skipif(not UNDER_INTERPRETER,
                                       reason="needs the interpreter subprocess (test_under_the_interpreter)")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy noise in the interpreter

CASES = {
    "plain": {},
    "clip_anchor": dict(max_grad_norm=0.5, anchor_lambda=0.3),
    "no_snapshot": dict(write_snapshot=False),
    "cotta": dict(max_grad_norm=0.5, ema_momentum=0.9, restore_prob=0.3),
}
SEEDS = [11, 2**40 + 3, 0]
GATES = [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]


@skip_under_interpreter
def test_under_the_interpreter():
    """Every test of this file on CPU tensors, the Triton kernels in the interpreter."""
    run_under_interpreter(__file__)


def two_dtype_rows(k: int = 3) -> list[Rows]:
    """Two groups of K rows (float32: a two-block segment and one without a grad; bfloat16)."""
    return [Rows(U, k, [7, 1, 2100, 33], torch.float32, 1, has_grad=b"\x01\x01\x01\x00"),
            Rows(U, k, [5, 40], torch.bfloat16, 2)]


@needs_triton_path
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_k_rows_step_as_k_single_steps(case, gated):
    """One launch set over K rows of two groups = K separate K = 1 launches: every stats field of
    every row and every state tensor bit for bit (own norms, clip coefficients, step counts, gates,
    anchor, EMA and restore draws from each row's seed)."""
    arenas = two_dtype_rows()
    rows_out = steps_as_singles(U, arenas, StepSpec(lr=1e-2, **CASES[case]), GATES, gated=gated, seeds=SEEDS,
                                grad_scale=1e-2)
    if "max_grad_norm" in CASES[case]:
        assert len(set(rows_out[:, STAT_KEYS.index("clip_coef")].tolist())) > 1


@needs_triton_path
def test_grad_stats_per_row():
    arenas = two_dtype_rows()
    for a in arenas:
        a.new_grads()
    rows_out, singles = call_rows(U, "grad_stats", arenas, 0.3, True)
    assert_stats_match(rows_out, singles)
    assert len(set(rows_out[:, 0].tolist())) == 3


@needs_triton_path
@pytest.mark.parametrize("adaptive", [False, True])
def test_sar_ascent_per_row_by_its_own_direction_norm(adaptive):
    arenas = two_dtype_rows()
    for a in arenas:
        a.new_grads()
        a.grad[1].zero_()
        a.singles[1].grad.zero_()
    rows_out, singles = call_rows(U, "sar_perturb", arenas, 0.05, adaptive)
    assert_stats_match(rows_out, singles)
    assert rows_out[:, 1].tolist() == [1.0, 0.0, 1.0]
    for a in arenas:
        a.assert_rows_match()


@needs_triton_path
def test_bad_row_arguments_have_clear_errors():
    assert_bad_rows_refused(U, StepSpec(lr=1e-2), "expected 1-D with at least 14 elements",
                            r"gate must be a float64 tensor of one element per row \(2\)")


@needs_triton_path
def test_engine_over_row_arena_on_the_triton_engine():
    """UpdateEngine over a RowArena binds the Triton engine here: each step's RowStats row r is row
    r's single step (its seed), and a stopped row is rolled back and frozen while the other goes on."""
    rows = Rows(U, 2, [7, 40], torch.float32, 8)
    arena = RowArena(rows.flat, rows.grad, rows.base, rows.sizes, exp_avg=rows.m, exp_avg_sq=rows.v)
    engine = UpdateEngine(arena, lr=1e-2, max_grad_norm=0.5)
    assert engine.backend == "triton"
    spec = engine.spec.replace(restore_prob=0.2)
    for step in range(3):
        rows.new_grads(scale=1e-1)
        stats, _ = engine.step(spec, counter=step, seeds=[3, 4])
        for r, single in enumerate(rows.singles):
            if r in engine.stopped:
                assert stats.update_norm[r] == 0.0 and torch.equal(rows.flat[r], frozen)
                continue
            out = torch.empty(len(STAT_KEYS), dtype=torch.float64)
            U.fused_step([single.group], out, spec.replace(restore_seed=(3, 4)[r]), step)
            assert list(stats.row(r)) == out.tolist(), (step, r)
            assert torch.equal(rows.flat[r], single.flat)
        if step == 1:
            engine.stop_rows([0])
            frozen = rows.singles[0].snap.clone()
            assert torch.equal(rows.flat[0], frozen)
        arena.zero_grad()
