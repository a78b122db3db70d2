"""CoTTA on the fused engine against YOLOZU's run_ttt, and its own restore RNG and teacher."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import (ListAdapter, expected_restore_mask, assert_models_match, assert_reports_match, make_batches, make_model, run_both,
                      only_under_interpreter, run_under_interpreter, skip_under_interpreter)
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import run_ttt as reference_run_ttt
from yolozu.tta.ttt_mim import select_parameters

import yolozu_ttt
from yolozu_ttt.arena import ParamArena
from yolozu_ttt.engine import UpdateEngine
from yolozu_ttt.methods import cotta as cotta_method


def cotta(**kw) -> TTTConfig:
    """A CoTTA config with the restore off (the reference's draws cannot be matched) unless given."""
    base = dict(enabled=True, method="cotta", steps=4, lr=1e-2, max_batches=3, cotta_restore_prob=0.0,
                cotta_ema_momentum=0.9)
    base.update(kw)
    return TTTConfig(**base)


@pytest.fixture
def teachers(monkeypatch) -> list:
    """Records (teacher, flats, backends) for every teacher the fused method builds (the fast path ran)."""
    built = []
    original = cotta_method.build_teacher

    def spy(model, arena, engine):
        out = original(model, arena, engine)
        built.append((*out, [g.backend for g in arena.groups]))
        return out

    monkeypatch.setattr(cotta_method, "build_teacher", spy)
    return built


def test_cotta_runs_on_the_fused_engine():
    assert "cotta" in yolozu_ttt.run.accelerated_methods()


PARITY = {
    "all_cwm_hflip": dict(update_filter="all", cotta_aggregation="confidence_weighted_mean",
                          cotta_augmentations=("identity", "hflip")),
    "norm_mean_hflip_clip": dict(update_filter="norm_only", cotta_aggregation="mean",
                                 cotta_augmentations=("identity", "hflip"), max_grad_norm=0.05),
    "all_mean_identity_clip": dict(update_filter="all", cotta_aggregation="mean", cotta_augmentations=("identity",),
                                   max_grad_norm=0.05),
    "norm_cwm_identity": dict(update_filter="norm_only", cotta_aggregation="confidence_weighted_mean",
                              cotta_augmentations=("identity",)),
    "defaults_interval_2": dict(cotta_ema_momentum=0.999, cotta_restore_interval=2),
    "eval_mode_model": dict(update_filter="all", cotta_ema_momentum=0.5),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_parity_with_restore_off(case, teachers):
    """Reports (every step entry, in order) and final models match the reference."""
    model = make_model()
    if case == "eval_mode_model":
        model.eval()
    ref_model, ref, fast_model, fast = run_both(model, make_batches(3), cotta(**PARITY[case]))
    assert len(teachers) == 1
    assert_reports_match(ref, fast)
    assert_models_match(ref_model, fast_model)
    assert all(m["restored_count"] == 0 for m in fast.step_metrics)
    assert fast.forward_calls == 2 * sum(m["aug"]["branches"] for m in fast.step_metrics)


# ---- guards (thresholds from a free reference run) --------------------------------------------
GUARD_CFG = dict(lr=0.1, steps=4)  # a step size at which the loss overshoots: every guard can trip mid-run
GUARD_VALUES = {
    "max_update_norm": lambda m, loss0: m["update_norm"],
    "max_total_update_norm": lambda m, loss0: m["total_update_norm"],
    "max_loss_ratio": lambda m, loss0: m["loss"] / loss0,
    "max_loss_increase": lambda m, loss0: m["loss"] - loss0,
}


@pytest.fixture(scope="module")
def free_run():
    return reference_run_ttt(ListAdapter(make_model(), make_batches(3)), [], config=cotta(**GUARD_CFG))


def split(values: list[float]) -> tuple[float, int]:
    """A threshold first exceeded at step k: the first step above every earlier one, else step 0."""
    for k in range(1, len(values)):
        prev = max(values[:k])
        if values[k] > prev + 1e-3 * abs(prev) + 1e-6:
            return (prev + values[k]) / 2.0, k
    rest = max(values[1:])
    assert values[0] > rest * (1 + 1e-3), values
    return (values[0] + rest) / 2.0, 0


@pytest.mark.parametrize("rollback", [True, False])
@pytest.mark.parametrize("guard", list(GUARD_VALUES))
def test_guards_stop_like_the_reference(guard, rollback, free_run, teachers):
    loss0 = free_run.step_metrics[0]["loss"]
    threshold, stop_step = split([GUARD_VALUES[guard](m, loss0) for m in free_run.step_metrics])
    cfg = cotta(**GUARD_CFG, **{guard: threshold}, rollback_on_stop=rollback)
    ref_model, ref, fast_model, fast = run_both(make_model(), make_batches(3), cfg)
    assert ref.stop_reason == f"{guard}_exceeded" and ref.steps_run == stop_step
    assert_reports_match(ref, fast)
    assert_models_match(ref_model, fast_model, rtol=1e-3, atol=1e-5)  # lr 0.1 amplifies float rounding
    assert fast.step_metrics[-1]["rolled_back"] is rollback


@pytest.mark.parametrize("rollback", [True, False])
def test_nan_batch_stops_with_non_finite_metrics(rollback, teachers):
    batches = make_batches(3)
    batches[1] = torch.full_like(batches[1], float("nan"))
    cfg = cotta(rollback_on_stop=rollback, max_grad_norm=1.0)
    ref_model, ref, fast_model, fast = run_both(make_model(), batches, cfg)
    assert fast.stop_reason == "non_finite_metrics" and fast.steps_run == 1
    assert_reports_match(ref, fast)
    assert_models_match(ref_model, fast_model)


# ---- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["not_tensor", "no_params", "no_valid_aug"])
def test_errors_match_the_reference(kind):
    batches, kw = make_batches(2), {}
    if kind == "not_tensor":
        batches[1] = {"image": batches[1]}  # the first step runs, the second raises
        message = "CoTTA requires tensor batches"
    elif kind == "no_params":
        kw = dict(update_filter="lora_only", include=["nothing_matches"])
        message = "no parameters selected for TTT"
    else:
        kw = dict(cotta_augmentations=("bogus",))
        message = "no valid CoTTA augmentations"
    models = []
    for fn in (reference_run_ttt, yolozu_ttt.run_ttt):
        model = make_model()
        with pytest.raises(RuntimeError, match=message):
            fn(ListAdapter(model, batches), [], config=cotta(**kw))
        models.append(model)
    assert_models_match(*models)


# ---- stochastic restore (our RNG) ------------------------------------------------------------------
def fast_run(cfg: TTTConfig, model=None, batches=None):
    model = make_model() if model is None else model
    report = yolozu_ttt.run_ttt(ListAdapter(model, batches or make_batches(3)), [], config=cfg)
    return model, report


def selected(model, update_filter="all") -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in select_parameters(model, update_filter=update_filter)])


def test_restore_is_deterministic_for_a_seed():
    cfg = cotta(cotta_restore_prob=0.2, seed=5)
    (m1, r1), (m2, r2) = fast_run(cfg), fast_run(cfg)
    assert r1.step_metrics == r2.step_metrics and r1.losses == r2.losses
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    m3, r3 = fast_run(cotta(cotta_restore_prob=0.2, seed=6))
    assert [m["restored_count"] for m in r3.step_metrics] != [m["restored_count"] for m in r1.step_metrics]
    assert not torch.equal(selected(m1), selected(m3))


def test_restore_without_seed_follows_torch_manual_seed():
    cfg = cotta(cotta_restore_prob=0.2)
    torch.manual_seed(123)
    m1, r1 = fast_run(cfg)
    torch.manual_seed(123)
    m2, r2 = fast_run(cfg)
    assert r1.step_metrics == r2.step_metrics
    assert torch.equal(selected(m1), selected(m2))


@pytest.mark.parametrize("prob", [0.05, 0.3])
def test_restored_fraction_and_values(prob):
    """One step: restored elements hold their initial values exactly, the rest the unrestored step's;
    the restored count matches the draws and lies within 5 sigma of the probability."""
    init = make_model()
    (free_model, _), (model, report) = (fast_run(cotta(steps=1), copy.deepcopy(init)),
                                        fast_run(cotta(steps=1, cotta_restore_prob=prob, seed=9), copy.deepcopy(init)))
    p0, p_free, p_final = selected(init), selected(free_model), selected(model)
    mask = expected_restore_mask(p0.numel(), prob, 9, 0)
    n = report.updated_param_count
    assert n == p0.numel() and report.step_metrics[0]["restored_count"] == int(mask.sum())
    assert torch.equal(p_final[mask], p0[mask]) and torch.equal(p_final[~mask], p_free[~mask])
    assert abs(int(mask.sum()) / n - prob) < 5 * (prob * (1 - prob) / n) ** 0.5


def test_restore_interval_and_full_restore():
    _, report = fast_run(cotta(cotta_restore_prob=0.5, cotta_restore_interval=2, seed=1))
    assert [m["restored_count"] > 0 for m in report.step_metrics] == [False, True, False, True]
    init = make_model()
    model, report = fast_run(cotta(cotta_restore_prob=1.0, update_filter="norm_only"), copy.deepcopy(init))
    assert all(m["restored_count"] == report.updated_param_count for m in report.step_metrics)
    assert all(m["total_update_norm"] == 0.0 for m in report.step_metrics)
    assert torch.equal(selected(model, "norm_only"), selected(init, "norm_only"))


# ---- the teacher -------------------------------------------------------------------------------------
@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
def test_teacher_shares_unselected_params_and_owns_only_the_selected(update_filter):
    model = make_model()
    params = select_parameters(model, update_filter=update_filter)
    with ParamArena(model, params) as arena:
        engine = UpdateEngine(arena, lr=1e-3)
        teacher, flats = cotta_method.build_teacher(model, arena, engine)
        student = dict(model.named_parameters())
        chosen = {id(p) for p in params}
        owned = 0
        for name, t in teacher.named_parameters():
            s = student[name]
            if id(s) in chosen:
                assert t is not s and not t.requires_grad and torch.equal(t, s)
                assert any(f.data_ptr() <= t.data_ptr() < f.data_ptr() + f.numel() * f.element_size() for f in flats)
                owned += t.numel()
            else:
                assert t is s  # shared, not copied
        assert owned == arena.numel == sum(f.numel() for f in flats)
        for (name, tb), sb in zip(teacher.named_buffers(), model.buffers()):
            assert tb.data_ptr() != sb.data_ptr() and torch.equal(tb, sb), name
        assert not teacher.training and model.training
        engine.bind_teacher(None)
    assert all(p.requires_grad for p in model.parameters())


def test_session_runs_match_fresh_runs():
    """prepare_session keeps one teacher; each run resets it with the student to the session's start."""
    from yolozu_ttt.run import prepare_session

    cfg = cotta(update_filter="norm_only", cotta_restore_prob=0.1, seed=2)
    fresh, reused = make_model(), make_model()
    start = copy.deepcopy(fresh.state_dict())
    session = prepare_session(ListAdapter(reused, make_batches(3)), cfg)
    for _ in range(2):
        fresh.load_state_dict(start)
        expected = yolozu_ttt.run_ttt(ListAdapter(fresh, make_batches(3)), [], config=cfg)
        got = session.run([])
        assert got.step_metrics == expected.step_metrics
        assert_models_match(fresh, reused, rtol=0, atol=0)


# ---- sample-parallel (yolozu_ttt.parallel): K images at once, each as it runs alone ----------------
def parallel_cotta(**kw) -> TTTConfig:
    """One batch per record, a teacher that moves (momentum 0.5) and a seeded restore every step."""
    return cotta(**{"steps": 3, "max_batches": 1, "max_grad_norm": 1.0, "cotta_ema_momentum": 0.5,
                    "cotta_restore_prob": 0.3, "seed": 4, **kw})


PARALLEL = {
    "norm_cwm_hflip": dict(update_filter="norm_only"),
    "lora_mean_hflip": dict(update_filter="lora_only", cotta_aggregation="mean"),
    "adapter_identity_interval_2": dict(update_filter="adapter_only", cotta_augmentations=("identity",),
                                        cotta_restore_interval=2),
    "lora_norm_full_restore": dict(update_filter="lora_norm_only", cotta_restore_prob=1.0),
    "all_restore_off": dict(update_filter="all", cotta_restore_prob=0.0),
}


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("case", list(PARALLEL))
def test_parallel_k_images_at_once_equal_each_alone(case, k):
    """Six records in groups of k (the last smaller), each with its own teacher, consistency and restore:
    losses, step metrics (restored counts, consistency, branches), counters and adapted state as its
    run alone, with no fallback."""
    from test_parallel import assert_like_alone, images, parallel
    from yolozu_ttt.parallel import ParallelFallbackWarning

    model, batches = make_model().eval(), images(6)
    start = copy.deepcopy(model.state_dict())
    cfg = parallel_cotta(**PARALLEL[case])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParallelFallbackWarning)
        reports, states = parallel(model, batches, cfg, k)
    assert_like_alone(model, start, batches, cfg, reports, states)
    restored = [m["restored_count"] for r in reports for m in r.step_metrics]
    assert (sum(restored) > 0) == (cfg.cotta_restore_prob > 0.0)


def test_parallel_unseeded_restores_draw_a_seed_per_image_in_order():
    """Without a seed each image's restore seed is one draw of torch's global RNG, in image order: the
    reports and states of session runs one after another from the same global seed."""
    from test_parallel import images
    from test_session import RecordAdapter
    from yolozu_ttt.run import TTTSession

    model, batches = make_model(), images(5)
    cfg = parallel_cotta(seed=None, update_filter="norm_only")
    runs = []
    for k in (1, 2):
        runs.append([copy.deepcopy(model), None])
        torch.manual_seed(21)
        with TTTSession(RecordAdapter(runs[-1][0], batches), cfg) as session:
            states = []
            runs[-1][1] = session.run_parallel([{"i": i} for i in range(5)], k,
                                               lambda *a: states.append(copy.deepcopy(runs[-1][0].state_dict())))
            runs[-1].append(states)
    (_, want, want_states), (_, got, got_states) = runs
    for w, g, ws, gs in zip(want, got, want_states, got_states):
        assert [m["restored_count"] for m in g.step_metrics] == [m["restored_count"] for m in w.step_metrics]
        assert_reports_match(w, g)
        for key in ws:
            torch.testing.assert_close(gs[key], ws[key], rtol=1e-4, atol=1e-6, msg=key)
    assert len({tuple(m["restored_count"] for m in r.step_metrics) for r in got}) > 1  # a seed per image


@pytest.mark.parametrize("guard", ["non_finite", "non_finite_kept", "max_total_update_norm"])
def test_parallel_one_image_tripping_a_guard_stops_and_rolls_back_only_itself(guard):
    """Images of a group of three trip a guard on their own (a NaN image, rolled back or not; or the total
    update cap at the last step, crossed by every image's but image 2's): each stops (and is rolled
    back) on its own, its update, teacher EMA and restore stop with it, while the others adapt on,
    each as alone."""
    from test_parallel import assert_like_alone, images, parallel

    model, batches = make_model().eval(), images(4)
    kw = dict(stop_on_non_finite=True, rollback_on_stop=True, update_filter="lora_norm_only")
    if guard.startswith("non_finite"):
        batches[2] = batches[2].clone().fill_(float("nan"))
        kw.update(rollback_on_stop=guard == "non_finite")  # kept: its NaN state must stay as it is
    else:
        kw.update(max_total_update_norm=0.32)  # the free runs' last totals: 0.339, 0.330, 0.314, 0.339
    start = copy.deepcopy(model.state_dict())
    cfg = parallel_cotta(**kw)
    reports, states = parallel(model, batches, cfg, 3)
    if guard.startswith("non_finite"):
        assert [r.stop_reason for r in reports] == [None, None, "non_finite_metrics", None]
    else:
        assert [r.steps_run for r in reports] == [2, 2, 3, 2] and reports[2].stop_reason is None
    assert_like_alone(model, start, batches, cfg, reports, states)
    if guard == "non_finite":
        for key, value in start.items():
            assert torch.equal(states[2][key], value), key


def test_parallel_shrunk_rtdetr_at_batch_one():
    """YOLOZU's builtin RT-DETR (shrunk) at batch 1, both augmented views, restore on: each image as alone."""
    from test_parallel import assert_like_alone, images, parallel, tiny_rtdetr
    from yolozu_ttt.parallel import ParallelFallbackWarning

    model, batches = tiny_rtdetr(), images(3, size=64)
    start = copy.deepcopy(model.state_dict())
    cfg = parallel_cotta(update_filter="norm_only", steps=2, lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParallelFallbackWarning)
        reports, states = parallel(model, batches, cfg, 2)
    assert all(m["aug"]["branches"] == 2 and m["restored_count"] > 0 for r in reports for m in r.step_metrics)
    assert_like_alone(model, start, batches, cfg, reports, states)


@skip_under_interpreter
def test_parity_through_the_triton_path():
    """The GPU code path (Triton entropy + update kernels with EMA and restore), in the interpreter on CPU."""
    run_under_interpreter(__file__, "-k",
                          "parity_with_restore_off and (all_cwm_hflip or norm_mean_hflip_clip) or nan_batch or "
           "restored_fraction or deterministic_for_a_seed or triton_backend")


@only_under_interpreter
def test_triton_backend_is_the_one_running(teachers):
    _, report = fast_run(cotta(steps=1, cotta_restore_prob=0.1, seed=3))
    (_, _, backends), = teachers
    assert backends == ["triton"] and report.step_metrics[0]["restored_count"] > 0
