"""yolozu_ttt.run_ttt against YOLOZU's run_ttt: dispatch, fallbacks, errors, reliability, sessions
(Tent's options and guards: test_methods_tent.py)."""
from __future__ import annotations

import copy
import math
import dataclasses
import os
import warnings

import pytest
import torch
from conftest import (ListAdapter, assert_bfloat16_tracks_reference, assert_models_match,
                      assert_reports_match, make_batches, make_model, run_both, run_under_interpreter,
                      skip_under_interpreter)
from conftest import UNDER_INTERPRETER
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import run_ttt as reference_run_ttt

import yolozu_ttt
from yolozu_ttt.run import TTTSession


def tent(**kw) -> TTTConfig:
    base = dict(enabled=True, method="tent", steps=3, max_batches=2, lr=1e-2)
    base.update(kw)
    return TTTConfig(**base)


def test_disabled_returns_the_identical_report_and_leaves_the_model_alone():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    cfg = TTTConfig(enabled=False, method="eata", steps=7)
    fast = yolozu_ttt.run_ttt(ListAdapter(model, make_batches()), [], config=cfg)
    ref = reference_run_ttt(ListAdapter(model, make_batches()), [], config=cfg)
    assert fast == ref
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class NoModel:
    def get_model(self):
        return None

    def build_loader(self, records, *, batch_size=1):
        yield torch.zeros(1)


class Empty(ListAdapter):
    def build_loader(self, records, *, batch_size=1):
        return iter(())


@pytest.mark.parametrize("adapter,cfg", [
    (object(), tent()),
    (NoModel(), tent()),
    (Empty(make_model(), []), tent()),
    (ListAdapter(make_model(), make_batches()), tent(method="bogus")),
    (ListAdapter(make_model(), make_batches()), tent(steps=0)),
    (ListAdapter(make_model(), make_batches()), tent(max_batches=0)),
    (ListAdapter(make_model(), make_batches()), tent(update_filter="weird")),
    (ListAdapter(make_model(), make_batches()), tent(include=["no_such_param"])),
    (ListAdapter(make_model(), make_batches()), tent(detector_response=True, response_conf_min=2.0)),
    (ListAdapter(make_model(), make_batches()), tent(detector_response=True, response_min_selected=0)),
    (ListAdapter(make_model(), make_batches()), tent(detector_response=True, response_topk=1, response_min_selected=2)),
    (ListAdapter(make_model(), make_batches()), tent(lr=-1.0)),
    (ListAdapter(make_model(), make_batches()), tent(lr=float("nan"))),
])
def test_bad_input_raises_like_the_reference(adapter, cfg):
    with pytest.raises(Exception) as ref_exc:
        reference_run_ttt(copy.deepcopy(adapter), [], config=cfg)
    with pytest.raises(type(ref_exc.value)) as fast_exc:
        yolozu_ttt.run_ttt(copy.deepcopy(adapter), [], config=cfg)
    assert str(fast_exc.value) == str(ref_exc.value)


class Boom(Exception):
    pass


class FailingModel(torch.nn.Module):
    """TinyDet that raises ``exc`` on the forward call number ``fail_at`` (0-based)."""

    def __init__(self, exc: type[BaseException], fail_at: int):
        super().__init__()
        self.inner = make_model()
        self.exc, self.fail_at, self.calls = exc, fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls - 1 == self.fail_at:
            raise self.exc("failure inside the model")
        return self.inner(x)


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("train_mode", [False, True])
def test_exception_mid_run_leaves_the_model_as_the_reference_does(exc, train_mode):
    ref_model, fast_model = FailingModel(exc, 2), FailingModel(exc, 2)
    fast_model.load_state_dict(ref_model.state_dict())
    ref_model.inner.head.weight.requires_grad_(False)
    fast_model.inner.head.weight.requires_grad_(False)
    ref_model.train(train_mode), fast_model.train(train_mode)
    params_before = list(fast_model.parameters())
    with pytest.raises(exc):
        reference_run_ttt(ListAdapter(ref_model, make_batches()), [], config=tent(steps=4))
    with pytest.raises(exc):
        yolozu_ttt.run_ttt(ListAdapter(fast_model, make_batches()), [], config=tent(steps=4))
    assert list(fast_model.parameters()) == params_before  # same Parameter objects
    ref_model.calls = fast_model.calls
    assert_models_match(ref_model, fast_model)
    for p in fast_model.parameters():
        assert p.grad is None or p.grad.data_ptr() != 0
        assert p.is_contiguous()


def test_model_after_run_is_plain_again(tmp_path):
    """Same Parameter objects and storage objects, tied weights still tied, frozen ones untouched."""
    model = make_model()
    model.tied = torch.nn.Linear(16, 16)
    model.lora.base.weight = model.tied.weight  # a tied parameter
    model.head.weight.requires_grad_(False)
    frozen_before = model.head.weight.detach().clone()
    ids = [id(p) for p in model.parameters()]
    storages = [p.untyped_storage()._cdata for p in model.parameters()]
    torch.save(model.state_dict(), tmp_path / "before.pt")
    yolozu_ttt.run_ttt(ListAdapter(model, make_batches()), [], config=tent())
    assert [id(p) for p in model.parameters()] == ids
    assert [p.untyped_storage()._cdata for p in model.parameters()] == storages
    assert model.lora.base.weight is model.tied.weight
    assert torch.equal(model.head.weight, frozen_before) and not model.head.weight.requires_grad
    torch.save(model.state_dict(), tmp_path / "after.pt")
    assert os.path.getsize(tmp_path / "after.pt") <= os.path.getsize(tmp_path / "before.pt")


def test_non_contiguous_parameters():
    model = make_model()
    w = model.head.weight.detach().t().contiguous().t()  # same values, transposed strides
    model.head.weight = torch.nn.Parameter(w)
    assert not model.head.weight.is_contiguous()
    ref_model, ref, fast_model, fast = run_both(model, make_batches(), tent())
    assert_reports_match(ref, fast)
    assert_models_match(ref_model, fast_model)
    assert fast_model.head.weight.stride() == w.stride()


def test_bfloat16_parameters_run_and_track_the_reference():
    assert_bfloat16_tracks_reference(tent(update_filter="norm_only", lr=1e-3))


def test_repeated_runs_are_deterministic():
    cfg = tent(steps=3, max_grad_norm=0.1)
    _, _, m1, r1 = run_both(make_model(), make_batches(), cfg)
    _, _, m2, r2 = run_both(make_model(), make_batches(), cfg)
    assert dataclasses.replace(r1, seconds=0.0, memory=None) == dataclasses.replace(r2, seconds=0.0, memory=None)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_300_consecutive_calls_do_not_grow_memory():
    model, batches = make_model(width=64), make_batches(1)
    adapter = ListAdapter(model, batches)
    cfg = tent(steps=1, max_batches=1, lr=1e-4)
    for _ in range(30):
        yolozu_ttt.run_ttt(adapter, [], config=cfg)
    before = _rss_bytes()
    for _ in range(300):
        yolozu_ttt.run_ttt(adapter, [], config=cfg)
    grown = _rss_bytes() - before
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 300 runs"
    assert all(p.grad is None for p in model.parameters())


def test_build_info_lists_tent_and_the_engine():
    info = yolozu_ttt.build_info()
    assert info["cpp_extension"] is True and info["cpp_extension_error"] is None
    assert "tent" in info["accelerated_methods"]
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert isinstance(info["openmp"], bool) and isinstance(info["cuda"], bool)


def test_float64_models_run_the_reference_unchanged():
    model = make_model().double()
    batches = [b.double() for b in make_batches()]
    ref_model, ref, fast_model, fast = run_both(model, batches, tent())
    assert_reports_match(ref, fast, rtol=0, atol=0)
    assert_models_match(ref_model, fast_model, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["tent", "eata", "sar", "cotta"])
@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
def test_non_finite_norms_are_the_references(method, update_filter):
    """NaN stays NaN: with lr=inf the update holds inf*0 (NaN) or overflows (inf); each step's
    update and total-update norms are non-finite exactly as the reference's are."""
    cfg = TTTConfig(enabled=True, method=method, steps=2, lr=float("inf"), update_filter=update_filter,
                    stop_on_non_finite=False, rollback_on_stop=False)
    _, ref, _, fast = run_both(make_model(), make_batches(), cfg)
    got = [(m["update_norm"], m["total_update_norm"]) for m in fast.step_metrics]
    want = [(m["update_norm"], m["total_update_norm"]) for m in ref.step_metrics]
    assert any(not math.isfinite(v) for pair in want for v in pair)  # the case the check is about
    assert [[repr(v) for v in pair] for pair in got] == [[repr(v) for v in pair] for pair in want]


def _fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, yolozu_ttt.run.ReferenceFallbackWarning)]


def _fallback_case(case: str, monkeypatch) -> tuple[torch.nn.Module, list[torch.Tensor], str]:
    """(model, batches, the reason the engine cannot run them) for one way the engine cannot run."""
    from yolozu_ttt import _native

    model, batches = make_model(), make_batches()
    if case == "float64":
        return model.double(), [b.double() for b in batches], "dtype float64"
    if case == "no_extension":  # a plain `pip install .` run from the checkout's root
        monkeypatch.setattr(_native, "_C", None)
        monkeypatch.setattr(_native, "LOAD_ERROR", "ImportError: no _C here")
        return model, batches, "yolozu_ttt._C did not load (ImportError: no _C here)"
    methods = {k: v for k, v in yolozu_ttt.run._accelerated().items() if k != "tent"}
    monkeypatch.setattr(yolozu_ttt.run, "_accelerated", lambda: methods)
    return model, batches, "method 'tent' has no fused implementation"


@pytest.mark.parametrize("case", ["float64", "no_extension", "no_method_module"])
def test_a_fallback_to_the_reference_warns_once_per_reason_and_is_recorded(case, monkeypatch):
    """No silent fallback: the reference runs (same report as YOLOZU's), a ReferenceFallbackWarning
    says why once per session and reason, and the session's engine names the engine that ran."""
    model, batches, reason = _fallback_case(case, monkeypatch)
    config = tent()
    fast_model = copy.deepcopy(model)
    with TTTSession(ListAdapter(fast_model, batches), config) as session:
        for call in range(2):
            fast_model.load_state_dict(model.state_dict())
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")  # what repeats or not in a session is ours to decide, not the filter's
                ref_model = copy.deepcopy(model)
                ref = reference_run_ttt(ListAdapter(ref_model, batches), [], config=config)
                fast = session.run([])
            messages = _fallback_warnings(record)
            if call == 0:
                assert len(messages) == 1 and reason in messages[0] and "reference" in messages[0], messages
            else:
                assert messages == []  # once per session and reason
            ran = session.engine
            assert ran["engine"] == "reference" and reason in ran["reason"], ran
            assert_reports_match(ref, fast, rtol=0, atol=0)
            assert_models_match(ref_model, fast_model, rtol=0, atol=0)


def test_a_bare_run_ttt_leaves_repeats_to_the_warning_filters(monkeypatch):
    """Each ``run_ttt`` is a session of its own and keeps no module state: Python's default filter
    shows a fallback once per calling line, "always" shows every call's (and the reports equal YOLOZU's)."""
    model, batches, reason = _fallback_case("float64", monkeypatch)
    for action, shown in (("default", 1), ("always", 3)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter(action)
            for _ in range(3):
                ref_model, ref, fast_model, fast = run_both(copy.deepcopy(model), batches, tent())
                assert_reports_match(ref, fast, rtol=0, atol=0)
        messages = _fallback_warnings(record)
        assert len(messages) == shown and all(reason in m for m in messages), (action, messages)


def test_the_engine_runs_without_a_fallback_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", yolozu_ttt.run.ReferenceFallbackWarning)
        yolozu_ttt.run_ttt(ListAdapter(make_model(), make_batches()), [], config=tent())
        with TTTSession(ListAdapter(make_model(), make_batches()), tent()) as session:
            session.run([])
        assert session.engine == {"engine": "fast", "backend": "triton" if UNDER_INTERPRETER else "cpp"}
        with TTTSession(ListAdapter(make_model(), make_batches()), tent(enabled=False)) as session:
            session.run([])
        assert session.engine == {"engine": "reference", "reason": None}  # disabled: nothing to adapt


def test_engine_backend_follows_the_dispatch_rule():
    from yolozu_ttt.arena import ParamArena
    from yolozu_ttt.common import use_triton

    model = make_model()
    with ParamArena(model, [model.bn.weight, model.bn.bias]) as arena:
        (group,) = arena.groups
        assert group.backend == ("triton" if use_triton(group.flat) else "cpp")


@skip_under_interpreter
def test_run_through_the_triton_path():
    """The GPU code path (Triton entropy + update kernels) end to end, in the interpreter on CPU
    (Tent's own: test_methods_tent.py)."""
    run_under_interpreter(__file__, "-k", "non_finite_norms or engine_backend")


def test_fallback_reaches_yolozu_even_when_its_run_ttt_points_here(monkeypatch):
    """Callers may swap yolozu.tta.integration.run_ttt for ours; the fallback must not recurse."""
    import yolozu.tta.integration as integration

    monkeypatch.setattr(integration, "run_ttt", yolozu_ttt.run_ttt)
    cfg = TTTConfig(enabled=False, method="tent")
    assert yolozu_ttt.run_ttt(ListAdapter(make_model(), make_batches()), [], config=cfg).enabled is False
    model = make_model().double()
    report = yolozu_ttt.run_ttt(ListAdapter(model, [b.double() for b in make_batches()]), [], config=tent())
    assert report.steps_run == 3


@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
def test_session_reuses_buffers_and_matches_fresh_runs(update_filter):
    """prepare_session: each run starts from the current values with fresh Adam state, no new arena."""
    from yolozu_ttt.arena import ParamArena
    from yolozu_ttt.run import prepare_session

    cfg = tent(update_filter=update_filter, max_grad_norm=0.5)
    fresh_model, session_model = make_model(), make_model()
    start = copy.deepcopy(session_model.state_dict())
    session = prepare_session(ListAdapter(session_model, make_batches()), cfg)
    flats = []
    original_pack = ParamArena._pack

    def spy(self, ps):
        original_pack(self, ps)
        if self.model is session_model:
            flats.append(self.groups[-1].flat.data_ptr())

    ParamArena._pack = spy
    try:
        for _ in range(3):
            session_model.load_state_dict(start)  # YOLOZU's sample reset restores in place
            got = session.run([])
            fresh_model.load_state_dict(start)
            want = yolozu_ttt.run_ttt(ListAdapter(fresh_model, make_batches()), [], config=cfg)
            assert dataclasses.replace(got, seconds=0.0, memory=None) == dataclasses.replace(want, seconds=0.0, memory=None)
            for a, b in zip(fresh_model.state_dict().values(), session_model.state_dict().values()):
                assert torch.equal(a, b)
    finally:
        ParamArena._pack = original_pack
    assert len(set(flats)) == 1  # one flat buffer, reused
    assert all(p.grad is None for p in session_model.parameters())


# ---- CUDA: the Triton engine on a GPU model (skipped without CUDA) -------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or UNDER_INTERPRETER,
                                reason="needs CUDA")

CUDA_CONFIGS = {
    "tent": dict(method="tent"),
    "tent_guards": dict(method="tent", max_grad_norm=0.05, max_total_update_norm=1e6),
    "eata": dict(method="eata"),
    "sar": dict(method="sar"),
    "cotta": dict(method="cotta", cotta_restore_prob=0.0),
}


@needs_cuda
@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("name", sorted(CUDA_CONFIGS))
def test_cuda_runs_match_the_reference_on_cuda(name, update_filter, deterministic_cudnn):
    model = make_model().cuda()
    batches = [b.cuda() for b in make_batches()]
    cfg = tent(update_filter=update_filter, **CUDA_CONFIGS[name])
    ref_model, ref, fast_model, fast = run_both(model, batches, cfg)
    assert fast.steps_run == ref.steps_run and fast.updated_param_count > 0
    assert all(p.is_cuda for p in fast_model.parameters())
    assert_reports_match(ref, fast)
    assert_models_match(ref_model, fast_model)


@needs_cuda
def test_cuda_nan_batch_rolls_back_bit_exactly(deterministic_cudnn):
    model = make_model().cuda()
    batches = [b.cuda() for b in make_batches()]
    batches[1] = torch.full_like(batches[1], float("nan"))
    ref_model, ref, fast_model, fast = run_both(model, batches, tent(steps=3))
    assert fast.stop_reason == ref.stop_reason and fast.stopped_early
    for a, b in zip(ref_model.state_dict().values(), fast_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, equal_nan=True)


@needs_cuda
def test_cuda_seeded_cotta_restore_runs_and_repeats_the_cpu_draws():
    """Deliberate difference: the reference's seeded restore raises on CUDA; ours draws on the device
    with the counter-based RNG, the same elements as on the CPU (the same hash)."""
    cfg = tent(method="cotta", cotta_restore_prob=0.2, seed=3, update_filter="all")
    model, batches = make_model(), make_batches()
    runs = []
    for device in ("cuda", "cuda", "cpu"):
        m = copy.deepcopy(model).to(device)
        report = yolozu_ttt.run_ttt(ListAdapter(m, [b.to(device) for b in batches]), [], config=cfg)
        runs.append((m, report))
    (a, ra), (b, rb), (c, rc) = runs
    assert dataclasses.replace(ra, seconds=0.0, memory=None) == dataclasses.replace(rb, seconds=0.0, memory=None)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert ra.steps_run == rc.steps_run == 3
    assert [m["restored_count"] for m in ra.step_metrics] == [m["restored_count"] for m in rc.step_metrics]
    assert sum(m["restored_count"] for m in ra.step_metrics) > 0
    assert_reports_match(rc, ra, rtol=1e-3, atol=1e-5, same_device=False)
