"""yolozu_ttt.run.TTTSession: one binding for every run (``--ttt-reset sample``), each run reset to the
session's start, against fresh ``run_ttt`` runs per record and, for failed runs, YOLOZU's reference."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import (UNDER_INTERPRETER, assert_models_match, assert_reports_match, method_case, method_config,
                      run_under_interpreter, skip_under_interpreter)

import yolozu_ttt
from yolozu_ttt.floor import RecordAdapter
from yolozu_ttt.arena import ParamArena
from yolozu_ttt.run import TTTSession, prepare_session

METHODS = ("tent", "mim", "cotta", "eata", "sar")


def case(method: str, n: int = 3):
    """``method``'s small model (in eval mode, as an export holds it) and ``n`` batches."""
    model, batches = method_case(method)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(batches[0].shape, generator=g) for _ in range(n)]
    return model.eval(), batches


@pytest.fixture
def arenas(monkeypatch) -> list:
    """The models every ParamArena is built for."""
    built = []
    original = ParamArena.__init__

    def spy(self, model, params):
        built.append(model)
        original(self, model, params)

    monkeypatch.setattr(ParamArena, "__init__", spy)
    return built


def fresh_run(model, start, batches, records, cfg):
    model.load_state_dict(start)
    return yolozu_ttt.run_ttt(RecordAdapter(model, batches), records, config=cfg)


def same_flags(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
    assert [m.training for m in a.modules()] == [m.training for m in b.modules()]


@pytest.mark.parametrize("update_filter", ["norm_only", "all"])
@pytest.mark.parametrize("method", METHODS)
def test_session_runs_equal_fresh_runs(arenas, method, update_filter):
    """Every run of one session (never reset by the caller) equals a fresh run_ttt from the start,
    bit for bit, from one arena."""
    model, batches = case(method)
    fresh, start = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    cfg = method_config(method, update_filter=update_filter, seed=3)
    with prepare_session(RecordAdapter(model, batches), cfg) as session:
        for i in (0, 1, 2, 1):
            got = session.run([{"i": i}])
            want = fresh_run(fresh, start, batches, [{"i": i}], cfg)
            assert_reports_match(want, got, rtol=0.0, atol=0.0)
            assert_models_match(fresh, model, rtol=0.0, atol=0.0)
            same_flags(fresh, model)
            assert all(p.grad is None for p in model.parameters())
    assert [m for m in arenas if m is model] == [model]  # one arena for the whole session


def test_a_stopped_and_rolled_back_run_leaves_the_next_one_clean(arenas):
    """A non-finite image stops and rolls back its own run; the runs before and after it equal fresh
    runs (the session's reset covers what a rollback restores and what it does not)."""
    model, batches = case("tent")
    batches[1] = batches[1].clone().fill_(float("nan"))
    fresh, start = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only", stop_on_non_finite=True, rollback_on_stop=True)
    session = TTTSession(RecordAdapter(model, batches), cfg)
    reports = []
    for i in (0, 1, 2):
        reports.append(session.run([{"i": i}]))
        want = fresh_run(fresh, start, batches, [{"i": i}], cfg)
        assert_reports_match(want, reports[-1], rtol=0.0, atol=0.0)
        assert_models_match(fresh, model, rtol=0.0, atol=0.0)
    session.close()
    assert [r.stop_reason for r in reports] == [None, "non_finite_metrics", None]
    assert [m for m in arenas if m is model] == [model]  # the session's one arena


class Interrupt:
    """A forward pre-hook raising ``error`` at the model's ``n``-th forward."""

    def __init__(self, n: int, error: BaseException):
        self.n, self.calls, self.error = n, 0, error

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.n:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["exception", "interrupt"])
@pytest.mark.parametrize("method", ["tent", "sar"])
def test_a_run_that_raises_leaves_the_model_as_the_reference_and_the_next_run_clean(method, error):
    """An exception or KeyboardInterrupt at the second step's forward: parameters, buffers,
    requires_grad and training flags end as the reference leaves them; the session's next run
    still starts from the session's start and equals a fresh run."""
    from yolozu.tta.integration import run_ttt as reference_run_ttt

    model, batches = case(method)
    reference, fresh, start = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model.state_dict())
    cfg = method_config(method, update_filter="norm_only")
    forwards_per_step = 2 if method == "sar" else 1
    session = TTTSession(RecordAdapter(model, batches), cfg)
    session.run([{"i": 2}])  # a bound session: the failing run is not its first
    model.load_state_dict(start)
    for net in (model, reference):
        handle = net.register_forward_pre_hook(Interrupt(forwards_per_step + 1, error))
        with pytest.raises(type(error)):
            runner = session.run if net is model else (
                lambda records: reference_run_ttt(RecordAdapter(reference, batches), records, config=cfg))
            runner([{"i": 0}])
        handle.remove()
    assert_models_match(reference, model)
    same_flags(reference, model)
    got = session.run([{"i": 1}])
    want = fresh_run(fresh, start, batches, [{"i": 1}], cfg)
    assert_reports_match(want, got, rtol=0.0, atol=0.0)
    assert_models_match(fresh, model, rtol=0.0, atol=0.0)
    session.close()


def test_close_unbinds_and_a_later_run_binds_again(arenas):
    """close(): every parameter back on a storage of its own with its current values, no grad; a run after it binds from the model's values then."""
    model, batches = case("tent")
    cfg = method_config("tent", update_filter="all")
    session = prepare_session(RecordAdapter(model, batches), cfg)
    session.run([{"i": 0}])
    flat = session.loop.arena.groups[0].flat
    adapted = copy.deepcopy(model.state_dict())
    session.close()
    session.close()  # idempotent
    for p in model.parameters():
        assert not (flat.data_ptr() <= p.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size())
        assert p.grad is None
    for a, b in zip(adapted.values(), model.state_dict().values()):
        assert torch.equal(a, b)
    fresh = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    got = session.run([{"i": 1}])
    want = fresh_run(fresh, start, batches, [{"i": 1}], cfg)
    assert_reports_match(want, got, rtol=0.0, atol=0.0)
    session.close()
    assert [m for m in arenas if m is model] == [model, model]


def test_a_rebound_parameter_rebinds_the_session():
    """A selected parameter whose ``.data`` was replaced between runs: the session notices and
    binds again from the model's values (it never writes into storage nobody reads)."""
    model, batches = case("tent")
    cfg = method_config("tent", update_filter="norm_only")
    session = prepare_session(RecordAdapter(model, batches), cfg)
    session.run([{"i": 0}])
    new = torch.full_like(model.bn.weight, 0.5)
    model.bn.weight.data = new
    fresh = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    got = session.run([{"i": 1}])
    want = fresh_run(fresh, start, batches, [{"i": 1}], cfg)
    assert_reports_match(want, got, rtol=0.0, atol=0.0)
    assert_models_match(fresh, model, rtol=0.0, atol=0.0)
    session.close()


def test_eata_skip_streak_starts_afresh_each_run():
    """EATA's empty-selection streak is the run's own: a session's run never inherits the earlier
    runs' streak (which would stop it early)."""
    model, batches = case("eata")
    fresh, start = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    cfg = method_config("eata", update_filter="norm_only", eata_conf_min=1.1, eata_max_skip_streak=4)
    with TTTSession(RecordAdapter(model, batches), cfg) as session:
        for i in (0, 1):
            got = session.run([{"i": i}])
            want = fresh_run(fresh, start, batches, [{"i": i}], cfg)
            assert_reports_match(want, got, rtol=0.0, atol=0.0)
            assert got.stop_reason is None and got.step_metrics[-1]["skip_streak"] == 3


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_session_runs_equal_fresh_runs(amp):
    """The loss scale is the run's own too: an fp16 overflow (a non-finite image) halves it for that
    run only; every run equals a fresh run_ttt in the same precision."""
    model, batches = case("tent")
    batches[0] = batches[0].clone().fill_(float("nan"))
    fresh, start = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only")
    with TTTSession(RecordAdapter(model, batches), cfg, amp=amp) as session:
        for i in (0, 1, 2):
            got = session.run([{"i": i}])
            fresh.load_state_dict(start)
            want = yolozu_ttt.run_ttt(RecordAdapter(fresh, batches), [{"i": i}], config=cfg, amp=amp)
            assert_reports_match(want, got, rtol=0.0, atol=0.0)
            assert_models_match(fresh, model, rtol=0.0, atol=0.0)


@skip_under_interpreter
def test_session_through_the_triton_path():
    """The GPU code path's reset (Triton's base copy, its Adam state, CoTTA's flat teacher), in the
    interpreter on CPU."""
    run_under_interpreter(__file__, "-k", "equal_fresh_runs and norm_only and (tent or cotta) or stopped")


def test_the_engine_that_ran_belongs_to_the_session():
    """``session.engine`` is what that session's last run ran: another session's run in the same
    thread (here one that falls back to the reference: a disabled config) does not change it, and no
    module-level channel says what ran (the session is the only record)."""
    model, batches = case("tent")
    fast_session = prepare_session(RecordAdapter(model, batches), method_config("tent", update_filter="norm_only"))
    other = prepare_session(RecordAdapter(copy.deepcopy(model), batches),
                            method_config("tent", update_filter="norm_only", enabled=False))
    with fast_session, other:
        assert fast_session.engine is None and other.engine is None  # before any run
        fast_session.run([{"i": 0}])
        ran = {"engine": "fast", "backend": "triton" if UNDER_INTERPRETER else "cpp"}
        assert fast_session.engine == ran
        other.run([{"i": 0}])
        assert other.engine == {"engine": "reference", "reason": None}
        assert fast_session.engine == ran
    assert not hasattr(yolozu_ttt.run, "last_engine") and not hasattr(yolozu_ttt.run, "_LAST")
