"""EATA on the fused engine against YOLOZU's run_ttt: selection, skips, anchor, guards, rollback, errors."""
from __future__ import annotations

import copy
import functools

import pytest
import test_parallel
import torch
from conftest import (assert_bfloat16_tracks_reference, assert_raises_like_reference, assert_triton_engine_runs,
                      check_parity, make_batches, make_model, only_under_interpreter, run_under_interpreter,
                      skip_under_interpreter)
from support_parallel import FramesAdapter, parallel_like_alone
from test_parallel import images, tiny_rtdetr
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import _eata_sample_signals

import yolozu_ttt


def eata(**kw) -> TTTConfig:
    base = dict(enabled=True, method="eata", steps=3, max_batches=2, lr=1e-2)
    base.update(kw)
    return TTTConfig(**base)




def signals(model, batch, conf_min: float = 0.2):
    """The reference's per-sample (conf, entropy, valid) of ``batch`` on a copy of ``model``."""
    with torch.no_grad():
        logits = copy.deepcopy(model)(batch)["logits"]
    return [t.tolist() for t in _eata_sample_signals(logits, conf_min=conf_min)]


def between(lo: float, hi: float) -> float:
    assert lo < hi
    return (lo + hi) / 2


def first_rise(values: list[float]) -> tuple[float, int]:
    """A limit that ``values[k] > limit`` trips first at some k >= 1 (for guards of the form v > limit)."""
    for k in range(1, len(values)):
        if values[k] > max(values[:k]):
            return between(max(values[:k]), values[k]), k
    raise AssertionError(f"no rise in {values}")


def eval_model():
    """Eval mode: per-sample outputs do not depend on the rest of the batch."""
    return make_model().eval()


def blank_frames():
    """Eval-mode model; frames alternate with a blank one (the highest entropy), so the loss rises mid-run."""
    model, (b,) = eval_model(), make_batches(1)
    return model, [b, torch.zeros_like(b)]


@functools.lru_cache(maxsize=None)
def free_run(**cfg):
    """The reference's report without guards (checked against the fast backend once)."""
    model, batches = blank_frames()
    return check_parity(model, batches, eata(**cfg))[0]


@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_eata_filters_match_reference(update_filter, train_mode):
    model = make_model()
    model.train(train_mode)
    ref, fast, _ = check_parity(model, make_batches(), eata(update_filter=update_filter))
    assert fast.steps_run == fast.optimizer_steps == 3 and not fast.stopped_early
    assert all(e["skipped"] is False and e["selected_count"] == e["batch_count"] for e in fast.step_metrics)


OPTIONS = {
    "lambda_0": dict(eata_anchor_lambda=0.0),
    "lambda_0_norm_only": dict(eata_anchor_lambda=0.0, update_filter="norm_only", steps=4),
    "lambda_50": dict(eata_anchor_lambda=50.0, steps=4),
    "lambda_negative": dict(eata_anchor_lambda=-2.0),
    "clip": dict(max_grad_norm=0.05),
    "clip_anchor_norm_only": dict(update_filter="norm_only", max_grad_norm=0.01, eata_anchor_lambda=10.0, steps=4),
    "include_lora": dict(include=["lora"]),
    "include_exclude": dict(include=["bn", "gn"], exclude=["bias"]),
    "one_batch": dict(steps=5, max_batches=1),
    "no_finite_guard": dict(stop_on_non_finite=False),
}


@pytest.mark.parametrize("kw", list(OPTIONS.values()), ids=list(OPTIONS))
def test_eata_options_match_reference(kw):
    check_parity(make_model(), make_batches(3), eata(**kw))


class BranchyDet(torch.nn.Module):
    """TinyDet plus a branch that reaches the logits only for batches of four."""

    def __init__(self):
        super().__init__()
        self.det = make_model()
        self.branch = torch.nn.Linear(3, 7)

    def forward(self, x):
        out = self.det(x)
        if x.shape[0] == 4:
            out["logits"] = out["logits"] + self.branch(x.mean(dim=(2, 3)))[:, None, :]
        return out


@pytest.mark.parametrize("anchor_lambda", [0.0, 1.0])
def test_anchor_term_gives_every_selected_parameter_a_grad(anchor_lambda):
    """Steps on two-sample batches leave the branch out of the entropy, yet Adam still steps it."""
    batches = make_batches(1, shape=(4, 3, 12, 12)) + make_batches(1, seed=2)
    model = BranchyDet()
    _, fast, fast_model = check_parity(model, batches, eata(steps=2, eata_anchor_lambda=anchor_lambda))
    _, _, one_step = check_parity(model, batches, eata(steps=1, eata_anchor_lambda=anchor_lambda))
    assert not torch.equal(fast_model.branch.weight, one_step.branch.weight)  # momentum moved it on step 2


@pytest.mark.parametrize("guard,rollback", [
    ("max_total_update_norm", True), ("max_total_update_norm", False), ("max_update_norm", True),
    ("max_loss_increase", True), ("max_loss_ratio", False),
])
def test_guard_stops_mid_run(guard, rollback):
    model, batches = blank_frames()
    cfg = dict(steps=5, lr=1e-3, eata_anchor_lambda=5.0)
    steps = free_run(**cfg).step_metrics
    if guard == "max_total_update_norm":
        limit, k = first_rise([e["total_update_norm"] for e in steps])
    elif guard == "max_update_norm":  # Adam's first step is its largest: trips at step 0
        limit, k = between(max(e["update_norm"] for e in steps[1:]), steps[0]["update_norm"]), 0
    elif guard == "max_loss_increase":
        limit, k = first_rise([e["loss"] - steps[0]["loss"] for e in steps])
    else:
        ratio, k = first_rise([e["loss"] / steps[0]["loss"] for e in steps])
        limit = ratio
    ref, fast, _ = check_parity(model, batches, eata(**cfg, **{guard: limit}, rollback_on_stop=rollback))
    assert fast.stop_reason == f"{guard}_exceeded" and fast.steps_run == k
    assert fast.step_metrics[-1]["rolled_back"] is rollback


def test_rollback_restores_the_state_after_the_last_good_step_bit_exactly():
    model, batches = make_model(), make_batches()
    _, free, _ = check_parity(model, batches, eata(steps=4))
    limit, k = first_rise([e["total_update_norm"] for e in free.step_metrics])
    _, fast, fast_model = check_parity(model, batches, eata(steps=4, max_total_update_norm=limit))
    _, _, good = check_parity(model, batches, eata(steps=k))
    for (name, a), b in zip(good.state_dict().items(), fast_model.state_dict().values()):
        assert torch.equal(a, b), name  # params and BN buffers


def test_non_finite_update_stops_and_rolls_back():
    model = make_model()
    _, fast, fast_model = check_parity(model, make_batches(), eata(lr=1e30))
    assert fast.stop_reason == "non_finite_metrics" and fast.steps_run == 0
    assert any(w.startswith("non_finite_fields:") for w in fast.warnings)
    for (name, a), b in zip(model.state_dict().items(), fast_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_batch_is_skipped_like_the_reference():
    batches = make_batches(2)
    batches[1] = torch.full_like(batches[1], float("nan"))
    _, fast, _ = check_parity(eval_model(), batches, eata(steps=4))
    assert [e["skipped"] for e in fast.step_metrics] == [False, True, False, True]


@pytest.mark.parametrize("max_skip_streak", [0, 2])
@pytest.mark.parametrize("kw", [dict(eata_conf_min=1.5), dict(eata_min_valid_dets=7)])
def test_nothing_selected_skips_until_the_streak_limit(max_skip_streak, kw):
    model = make_model()
    assert kw.get("eata_min_valid_dets", 0) > model.queries or kw.get("eata_conf_min", 0) > 1.0
    _, fast, fast_model = check_parity(model, make_batches(), eata(steps=5, eata_max_skip_streak=max_skip_streak, **kw))
    assert fast.stop_reason == "eata_max_skip_streak_exceeded" and fast.steps_run == 0
    assert len(fast.step_metrics) == max_skip_streak + 1
    assert fast.warnings.count("eata_empty_selected_set") == max_skip_streak + 1
    assert fast.optimizer_steps == fast.backward_calls == 0
    for a, b in zip(model.parameters(), fast_model.parameters()):
        assert torch.equal(a, b)


def skips_every_other_step():
    """(model, batches, config): eval mode; batch 1 repeats batch 0's highest-entropy sample, which
    the entropy band excludes, so steps 1 and 3 select nothing."""
    model, (b0,) = eval_model(), make_batches(1, shape=(4, 3, 12, 12))
    entropies = signals(model, b0)[1]
    order = sorted(range(4), key=entropies.__getitem__)
    b1 = b0[order[-1]:order[-1] + 1].repeat(2, 1, 1, 1)
    cfg = eata(steps=4, lr=1e-3, update_filter="norm_only",
               eata_entropy_max=between(entropies[order[-2]], entropies[order[-1]]))
    return model, [b0, b1], cfg


def test_skips_between_updates_report_the_current_drift():
    _, fast, _ = check_parity(*skips_every_other_step())
    steps = fast.step_metrics
    assert [e["skipped"] for e in steps] == [False, True, False, True]
    assert [e["selected_count"] for e in steps] == [3, 0, 3, 0]
    assert steps[1]["total_update_norm"] == steps[0]["total_update_norm"] > 0.0
    assert steps[1]["skip_streak"] == 1 and steps[3]["skip_streak"] == 1


@pytest.fixture
def backwards(monkeypatch):
    """Counts the backward passes: every ``torch.autograd.backward`` (``Tensor.backward``'s too)."""
    calls = []
    original = torch.autograd.backward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", counted)
    return calls


def test_a_step_selecting_nothing_runs_no_backward(backwards):
    """As the reference: steps 1 and 3 select nothing and run no backward (counted on the passes
    themselves, the reference's too); the steps that select run one each."""
    from support_parity import run_both

    _, _, _, fast = run_both(*skips_every_other_step())
    assert [e["skipped"] for e in fast.step_metrics] == [False, True, False, True]
    assert len(backwards) == 2 * 2  # two updates each, the reference's and ours


def test_a_group_selecting_nothing_runs_no_backward(backwards):
    """A sample-parallel group in which no image selects anything runs no backward (one read of
    its selection decides); a group in which one image selects runs the group's backward."""
    model, batches = eval_model(), images(4)
    entropy = [signals(model, b)[1][0] for b in batches]
    top = sorted(range(4), key=entropy.__getitem__)
    batches = [batches[top[-1]], batches[top[-1]], batches[top[0]], batches[top[-1]]]
    cfg = eata(update_filter="norm_only", steps=2, eata_max_skip_streak=5,
               eata_entropy_max=between(entropy[top[-2]], entropy[top[-1]]))
    from yolozu_ttt.run import TTTSession

    with TTTSession(test_parallel.RecordAdapter(model, batches), cfg) as session:
        reports = session.run_parallel([{"i": i} for i in range(4)], 2)
    assert [r.optimizer_steps for r in reports] == [0, 0, 2, 0]
    assert len(backwards) == 2  # group 1 none, group 2 (image 2 selects) one a step


@pytest.mark.parametrize("signal", ["entropy_max", "entropy_min", "conf_min"])
def test_threshold_selecting_a_subset_of_samples(signal):
    model, batches = eval_model(), make_batches(2, shape=(4, 3, 12, 12))
    conf, entropy, _ = signals(model, batches[0])
    values = sorted(entropy if signal.startswith("entropy") else conf)
    kw = {f"eata_{signal}": between(values[1], values[2])}
    _, fast, _ = check_parity(model, batches, eata(lr=1e-3, **kw))
    assert 0 < fast.step_metrics[0]["selected_count"] < fast.step_metrics[0]["batch_count"]


def test_min_valid_dets_selecting_a_subset_of_samples():
    """conf_min inside the query confidences: samples differ in how many queries pass it."""
    model, batches = eval_model(), make_batches(2, shape=(4, 3, 12, 12))
    with torch.no_grad():
        conf = torch.softmax(model(batches[0])["logits"], dim=-1).amax(dim=-1)  # (B, Q)
    conf_min = float(conf.flatten().median())
    valid = (conf >= conf_min).sum(dim=1).tolist()
    lo, hi = sorted(valid)[0], sorted(valid)[-1]
    assert lo < hi
    cfg = eata(lr=1e-3, eata_conf_min=conf_min, eata_min_valid_dets=hi, eata_entropy_max=10.0)
    _, fast, _ = check_parity(model, batches, cfg)
    first = fast.step_metrics[0]
    assert 0 < first["selected_count"] < first["batch_count"]


@pytest.mark.parametrize("rollback", [True, False])
def test_selected_ratio_below_min_stops_after_the_update(rollback):
    model, batches = eval_model(), make_batches(2, shape=(4, 3, 12, 12))
    entropy = sorted(signals(model, batches[0])[1])
    cfg = eata(eata_entropy_max=between(entropy[2], entropy[3]), eata_selected_ratio_min=1.0,
               rollback_on_stop=rollback)
    _, fast, fast_model = check_parity(model, batches, cfg)
    assert fast.stop_reason == "eata_selected_ratio_below_min" and fast.steps_run == 0
    assert fast.optimizer_steps == 1 and fast.step_metrics[0]["rolled_back"] is rollback
    assert fast.step_metrics[0]["non_finite_fields"] is None
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fast_model.parameters()))
    assert same is rollback


def test_a_guard_tripping_with_a_low_ratio_names_the_guard():
    model, batches = eval_model(), make_batches(2, shape=(4, 3, 12, 12))
    entropy = sorted(signals(model, batches[0])[1])
    cfg = dict(eata_entropy_max=between(entropy[2], entropy[3]), eata_selected_ratio_min=1.0)
    _, free, _ = check_parity(model, batches, eata(**cfg))
    limit = free.step_metrics[0]["update_norm"] / 2
    _, fast, _ = check_parity(model, batches, eata(**cfg, max_update_norm=limit))
    assert fast.stop_reason == "max_update_norm_exceeded"


class ScalarModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return {"logits": (self.w * x.flatten()[:3]).sum()}


@pytest.mark.parametrize("model,batches,cfg", [
    (make_model(), [{"image": torch.zeros(1, 3, 8, 8)}], eata(max_batches=1)),
    (make_model(), [torch.tensor(1.0)], eata(max_batches=1)),
    (ScalarModel(), [torch.ones(2, 3)], eata(max_batches=1)),
    (make_model(), make_batches(), eata(include=["no_such_param"])),
    (make_model(), make_batches(), eata(lr=-1.0)),
    (make_model(), make_batches(), eata(update_filter="weird")),
])
def test_bad_input_raises_like_the_reference(model, batches, cfg):
    assert_raises_like_reference(model, batches, cfg)


def test_bfloat16_parameters_run_and_track_the_reference():
    assert_bfloat16_tracks_reference(eata(update_filter="norm_only", lr=1e-3))


def test_build_info_lists_eata():
    assert "eata" in yolozu_ttt.build_info()["accelerated_methods"]


# The interpreter run: each kernel path EATA takes (signals, anchor value, anchored update, skip, stops).
TRITON_SUBSET = (
    "test_eata_options_match_reference[lambda_0]",
    "test_skips_between_updates_report_the_current_drift",
    "test_selected_ratio_below_min_stops_after_the_update[True]",
    "test_non_finite_update_stops_and_rolls_back",
    "test_anchor_term_gives_every_selected_parameter_a_grad[1.0]",
    "test_triton_backend_is_the_one_running",
)


@skip_under_interpreter
def test_eata_parity_through_the_triton_path():
    """The GPU code path (Triton entropy + update kernels) end to end, in the interpreter on CPU."""
    run_under_interpreter("-x", *[f"{__file__}::{name}" for name in TRITON_SUBSET])


@only_under_interpreter
def test_triton_backend_is_the_one_running():
    assert_triton_engine_runs()


# ---- sample-parallel EATA (TTTSession.run_parallel): K records at once, each as alone -------------


def eata_parallel(model, batches, k, **kw):
    return parallel_like_alone(model, batches, eata(**{"lr": 1e-2, "max_grad_norm": 1.0, **kw}), k)


@pytest.fixture
def frames(monkeypatch):
    """test_parallel's helpers with records of several frames."""
    monkeypatch.setattr(test_parallel, "RecordAdapter", FramesAdapter)


EATA_PARALLEL = {
    "default": dict(),
    "anchor_clip": dict(eata_anchor_lambda=50.0, max_grad_norm=0.05, steps=4),
    "lambda_0": dict(eata_anchor_lambda=0.0),
}


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("kw", list(EATA_PARALLEL.values()), ids=list(EATA_PARALLEL))
@pytest.mark.parametrize("k", [2, 4])
def test_parallel_eata_equals_each_image_alone(k, kw, train_mode):
    """TinyDet (batch-, group- and layer-norm): six records in groups of k (the last one smaller),
    each with its own anchor (value and gradient), clip and Adam, as alone."""
    model = make_model().train(train_mode)
    reports, _, _ = eata_parallel(model, images(6), k, update_filter="norm_only", **kw)
    assert all(r.optimizer_steps == r.steps_run == kw.get("steps", 3) for r in reports)


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("k", [2, 4])
def test_parallel_eata_on_the_shrunk_rtdetr(k, train_mode):
    """Four records (the last group smaller than k); train mode: batch norm at batch 1 per image
    (the settled-layout gradient fix per replica). At 96 px: at 64 px the last stage normalises 2x2
    maps at batch 1, whose fp32 grads differ by ~1e-4 relative between any two float orders (an
    image's grad norm alone and in a group of three lie on either side of the fp32 truth)."""
    model = tiny_rtdetr().train(train_mode)
    eata_parallel(model, images(4, size=96), k, update_filter="norm_only", steps=2, lr=1e-4)


def test_an_image_selecting_nothing_is_gated_alone_until_its_streak_stops():
    """Image 4's entropy lies above the band: its replica applies nothing (gated on the device: its
    parameters, moments and step count stay) and stops on its skip streak, while image 3, in its
    group, adapts every step."""
    model, batches = eval_model(), images(6)
    entropy = [signals(model, b)[1][0] for b in batches]
    assert max(entropy) == entropy[4]
    limit = between(sorted(entropy)[-2], entropy[4])
    reports, states, start = eata_parallel(model, batches, 2, update_filter="norm_only", steps=4,
                                           eata_entropy_max=limit, eata_max_skip_streak=2)
    assert [r.stop_reason for r in reports] == [None] * 4 + ["eata_max_skip_streak_exceeded", None]
    assert [e["skip_streak"] for e in reports[4].step_metrics] == [1, 2, 3]
    assert reports[3].optimizer_steps == 4 and reports[4].optimizer_steps == 0
    for key, value in start.items():
        assert torch.equal(states[4][key], value), key


def test_skips_and_resumes_count_adam_steps_per_image(frames):
    """Records of two frames: where the second is blank (above the entropy band) the replica skips
    every other step and resumes, so replicas of one group are at different Adam steps (bias
    corrections per replica); each as alone."""
    model, real = eval_model(), images(5)
    blank = torch.zeros_like(real[0])
    batches = [[x, blank if i % 2 else x] for i, x in enumerate(real)]
    limit = between(max(signals(model, x)[1][0] for x in real), signals(model, blank)[1][0])
    reports, _, _ = eata_parallel(model, batches, 2, update_filter="norm_only", steps=4, lr=1e-3,
                                  eata_entropy_max=limit)
    skipped = [[e["skipped"] for e in r.step_metrics] for r in reports]
    assert skipped[1][:3] == skipped[3][:3] == [False, True, False]  # a skip, then an update again
    assert not any(skipped[0] + skipped[2] + skipped[4])


def test_a_low_selected_ratio_stops_and_rolls_back_only_its_image():
    """Records of two samples; record 2 pairs a sample above the entropy band with one in it: its
    ratio 0.5 stops it after its first update (rolled back), the others adapt on."""
    model, single = eval_model(), images(6)
    entropy = [signals(model, b)[1][0] for b in single]
    batches = [torch.cat([single[0], single[i]]) for i in (1, 4, 2, 3)]
    batches[2], batches[1] = batches[1], batches[2]
    reports, states, start = eata_parallel(model, batches, 3, update_filter="norm_only", rollback_on_stop=True,
                                           eata_entropy_max=between(sorted(entropy)[-2], entropy[4]),
                                           eata_selected_ratio_min=0.75)
    assert [r.stop_reason for r in reports] == [None, None, "eata_selected_ratio_below_min", None]
    assert reports[2].step_metrics[0]["selected_ratio"] == 0.5 and reports[2].step_metrics[0]["rolled_back"]
    for key, value in start.items():
        assert torch.equal(states[2][key], value), key


def test_a_guard_and_a_nan_image_stop_only_their_images():
    """A NaN image (nothing selected: skipped until its streak stops) and an image whose total update
    crosses max_total_update_norm at its last step (stopped, rolled back) in groups of four."""
    model, batches = eval_model(), images(6)
    batches[2] = torch.full_like(batches[2], float("nan"))
    cfg = dict(update_filter="norm_only", steps=4, eata_anchor_lambda=5.0, eata_max_skip_streak=1)
    free, _, _ = eata_parallel(model, batches, 4, **cfg)
    last = [r.step_metrics[-1]["total_update_norm"] for r in free]
    top = max(range(6), key=lambda i: last[i] if i != 2 else -1.0)
    limit = between(max(v for i, v in enumerate(last) if i not in (2, top)), last[top])
    reports, _, _ = eata_parallel(model, batches, 4, **cfg, max_total_update_norm=limit, rollback_on_stop=True)
    stops = [r.stop_reason for r in reports]
    assert stops[2] == "eata_max_skip_streak_exceeded" and stops[top] == "max_total_update_norm_exceeded"
    assert stops.count(None) == 4
