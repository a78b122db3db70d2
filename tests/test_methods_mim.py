"""TTT-MIM (yolozu_ttt.methods.mim) against YOLOZU's run_ttt: plain and structured paths."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import (ListAdapter, assert_models_match, assert_raises_like_reference, assert_reports_match,
                      make_batches, run_under_interpreter, skip_under_interpreter)
from torch import nn
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import run_ttt as reference_run_ttt

import yolozu_ttt
from yolozu_ttt.methods import mim

SHAPE = (2, 3, 37, 50)  # neither side a multiple of the 16-pixel patch


class ReconNet(nn.Module):
    """Conv-BN encoder and conv decoder returning an input-shaped reconstruction in several forms."""

    def __init__(self, kind: str = "recon", out_channels: int = 3):
        super().__init__()
        self.kind = kind
        self.enc = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # no bias before a norm (pure-noise grad)
        self.bn = nn.BatchNorm2d(8)
        self.dec = nn.Conv2d(8, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor):
        out = self.dec(torch.relu(self.bn(self.enc(x))))
        if self.kind == "bare":
            return out
        if self.kind == "tuple":
            return (out, out.mean())
        return {self.kind: out, "aux": out.detach()}


class PlainConv(nn.Module):
    """No normalisation, so it also takes unbatched ``(C, H, W)`` input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return {"recon": self.b(torch.tanh(self.a(x)))}


class FakeStructured(nn.Module):
    """A model with ``enable_mim`` whose MIM outputs can be left out or malformed."""

    enable_mim = True

    def __init__(self, mode: str = "full"):
        super().__init__()
        self.mode = mode
        self.proj = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x, geom_input=None, feature_mask=None, return_mim=False):
        feat = self.proj(x)
        if self.mode == "tensor":
            return feat
        out = {"logits": self.head(feat.mean(dim=(2, 3)))}
        if self.mode == "no_mim":
            return out
        teacher = geom_input.mean(dim=1, keepdim=True).expand_as(feat).detach()
        out["mim"] = {"recon_feat": feat, "teacher_feat": None if self.mode == "no_teacher" else teacher}
        if self.mode == "full":
            out["mim"]["mask"] = feature_mask
            out["mim"]["entropy"] = torch.softmax(out["logits"], -1).max(-1).values.mean()
        return out


def cfg(**kw) -> TTTConfig:
    base = dict(enabled=True, method="mim", steps=3, max_batches=2, lr=1e-2, mim_patch_size=16, seed=7)
    base.update(kw)
    return TTTConfig(**base)


def make_model(cls=ReconNet, *args, train: bool = False, **kw) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args, **kw).train(train)


def run_pair(model, batches, config, rng_seed: int = 123):
    """Both backends on copies, torch's global RNG re-seeded identically before each (unseeded masks)."""
    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(rng_seed)
    ref = reference_run_ttt(ListAdapter(ref_model, batches), [], config=config)
    torch.manual_seed(rng_seed)
    fast = yolozu_ttt.run_ttt(ListAdapter(fast_model, batches), [], config=config)
    return ref_model, ref, fast_model, fast


def assert_same_masks(ref, fast):
    """Same masks: the per-step and mean mask ratios are bit-identical."""
    assert [e["mask_ratio"] for e in fast.step_metrics] == [e["mask_ratio"] for e in ref.step_metrics]
    assert fast.mask_ratio == ref.mask_ratio


def check(model, batches, config, **tol):
    ref_model, ref, fast_model, fast = run_pair(model, batches, config)
    assert_same_masks(ref, fast)
    assert_reports_match(ref, fast, **tol)
    assert_models_match(ref_model, fast_model, **tol)
    return ref, fast


# ---- plain path ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [7, None])
@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("kind", ["recon", "bare"])
def test_plain_matches_reference(kind, update_filter, seed):
    ref, fast = check(make_model(ReconNet, kind), make_batches(2, shape=SHAPE),
                      cfg(update_filter=update_filter, seed=seed))
    assert fast.steps_run == 3 and fast.method == "mim" and 0.0 < fast.mask_ratio < 1.0
    assert "mim" in yolozu_ttt.build_info()["accelerated_methods"]


@pytest.mark.parametrize("model,shape,kw", [
    (make_model(ReconNet, "logits"), SHAPE, {}),
    (make_model(ReconNet, "tuple"), SHAPE, {}),
    (make_model(ReconNet, "recon", train=True), SHAPE, {}),  # BN in train mode: buffers too
    (make_model(ReconNet, "recon", out_channels=1), SHAPE, {}),  # broadcast recon: the reference's loss
    (make_model(ReconNet, "recon"), (1, 3, 5, 7), {}),  # one patch, cropped
    (make_model(ReconNet, "recon"), (2, 3, 64, 48), dict(mim_patch_size=8, mim_mask_value=0.5)),
    (make_model(PlainConv), (3, 37, 50), {}),  # unbatched CHW
    (make_model(ReconNet, "recon"), SHAPE, dict(max_grad_norm=0.01)),
    (make_model(ReconNet, "recon"), SHAPE, dict(max_grad_norm=1e6)),
    (make_model(ReconNet, "recon"), SHAPE, dict(include=["bn", "dec"], exclude=["bias"])),
    (make_model(ReconNet, "recon"), SHAPE, dict(steps=5, max_batches=1, mim_mask_prob=0.3)),
])
def test_plain_options_match_reference(model, shape, kw):
    check(model, make_batches(2, shape=shape), cfg(**kw))


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_empty_and_full_masks(prob):
    model = make_model(ReconNet, "recon")
    ref, fast = check(model, make_batches(2, shape=SHAPE), cfg(mim_mask_prob=prob))
    assert fast.mask_ratio == prob
    if prob == 0.0:  # loss 0 and zero gradients: Adam steps but moves nothing
        assert fast.losses == [0.0] * 3
        assert all(e["grad_norm"] == 0.0 and e["total_update_norm"] == 0.0 for e in fast.step_metrics)


def test_channels_last_and_non_contiguous_batches():
    batches = make_batches(2, shape=SHAPE)
    batches = [batches[0].contiguous(memory_format=torch.channels_last),
               batches[1].transpose(-1, -2).contiguous().transpose(-1, -2)]
    assert not batches[1].is_contiguous()
    check(make_model(ReconNet, "recon").to(memory_format=torch.channels_last), batches, cfg())


def test_bfloat16_runs_and_tracks_the_reference():
    """fp32 accumulation of the masked loss and fp32 Adam moments vs the reference's bf16 arithmetic."""
    model = make_model(ReconNet, "recon").to(torch.bfloat16)
    batches = [b.to(torch.bfloat16) for b in make_batches(2, shape=SHAPE)]
    ref_model, ref, fast_model, fast = run_pair(model, batches, cfg(update_filter="norm_only", lr=1e-3))
    assert_same_masks(ref, fast)
    assert fast.steps_run == ref.steps_run == 3
    assert fast.losses[0] == pytest.approx(ref.losses[0], rel=1e-2)
    for a, b in zip(ref_model.parameters(), fast_model.parameters()):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


# ---- guards and rollback -------------------------------------------------------------------------

def free_run(model, batches, config):
    return run_pair(model, batches, config)[1]


@pytest.mark.parametrize("train", [False, True])
def test_total_update_guard_stops_mid_run_and_rolls_back(train):
    model, batches = make_model(ReconNet, "recon", train=train), make_batches(2, shape=SHAPE)
    totals = [e["total_update_norm"] for e in free_run(model, batches, cfg(steps=4)).step_metrics]
    limit = (totals[1] + totals[2]) / 2
    ref, fast = check(model, batches, cfg(steps=4, max_total_update_norm=limit))
    assert fast.stop_reason == "max_total_update_norm_exceeded" and fast.steps_run == 2
    assert fast.step_metrics[-1]["rolled_back"] is True
    assert fast.mask_ratio == sum(e["mask_ratio"] for e in fast.step_metrics[:2]) / 2  # completed steps only
    _, _, after2, _ = run_pair(model, batches, cfg(steps=2))
    fast_model = run_pair(model, batches, cfg(steps=4, max_total_update_norm=limit))[2]
    for (name, a), b in zip(after2.state_dict().items(), fast_model.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BN buffers rolled back bit-exactly


@pytest.mark.parametrize("guard", ["max_loss_ratio", "max_loss_increase", "max_update_norm"])
@pytest.mark.parametrize("rollback", [True, False])
def test_loss_and_update_guards_stop_mid_run(guard, rollback):
    """Each threshold lies between two consecutive values of a free run, so the run stops early."""
    model, batches = make_model(ReconNet, "recon"), make_batches(2, shape=SHAPE)
    free = free_run(model, batches, cfg(steps=4))
    loss, upd = free.losses, [e["update_norm"] for e in free.step_metrics]
    value = {
        "max_loss_ratio": (loss[1] + loss[2]) / 2 / loss[0],
        "max_loss_increase": (loss[1] + loss[2]) / 2 - loss[0],
        "max_update_norm": (upd[0] + upd[1]) / 2,
    }[guard]
    ref, fast = check(model, batches, cfg(steps=4, rollback_on_stop=rollback, **{guard: value}))
    assert fast.stopped_early and fast.stop_reason == f"{guard}_exceeded"
    assert fast.step_metrics[-1]["rolled_back"] is rollback


def test_nan_batch_stops_with_non_finite_metrics_and_rolls_back():
    model, batches = make_model(ReconNet, "recon", train=True), make_batches(2, shape=SHAPE)
    batches[1] = torch.full_like(batches[1], float("nan"))
    ref_model, ref, fast_model, fast = run_pair(model, batches, cfg())
    assert fast.stop_reason == "non_finite_metrics" and fast.steps_run == 1
    assert_same_masks(ref, fast)
    assert_reports_match(ref, fast)
    assert_models_match(ref_model, fast_model)
    one_step = run_pair(model, batches[:1], cfg(steps=1, max_batches=1))[2]
    for (name, a), b in zip(one_step.state_dict().items(), fast_model.state_dict().values()):
        assert torch.equal(a, b), name


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,batches,config", [
    (make_model(ReconNet), make_batches(1, shape=SHAPE), cfg(include=["no_such_param"])),
    (make_model(ReconNet), make_batches(1, shape=SHAPE), cfg(update_filter="weird")),
    (make_model(ReconNet), make_batches(1, shape=SHAPE), cfg(update_filter="adapter_only")),
    (make_model(ReconNet), make_batches(1, shape=SHAPE), cfg(lr=-1.0)),
    (make_model(ReconNet), make_batches(1, shape=SHAPE), cfg(mim_patch_size=0)),
    (make_model(ReconNet), [{"image": torch.zeros(1, 3, 8, 8)}], cfg()),
    (make_model(ReconNet), [torch.zeros(3, 8)], cfg()),
    (make_model(ReconNet), [torch.zeros(1, 1, 3, 8, 8)], cfg()),
    (make_model(FakeStructured, "tensor"), make_batches(1, shape=(1, 3, 8, 8)), cfg()),
    (make_model(FakeStructured, "no_mim"), make_batches(1, shape=(1, 3, 8, 8)), cfg()),
    (make_model(FakeStructured, "no_teacher"), make_batches(1, shape=(1, 3, 8, 8)), cfg()),
])
def test_bad_input_raises_like_the_reference(model, batches, config):
    assert_raises_like_reference(model, batches, config)


# ---- structured path -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["full", "partial"])
def test_structured_contract_on_a_small_model(mode):
    """With and without the model's mask (ratio from our grid) and entropy term (entropy_loss None)."""
    ref, fast = check(make_model(FakeStructured, mode), make_batches(2, shape=(2, 3, 20, 24)),
                      cfg(mim_patch_size=4, mim_mask_prob=0.5))
    assert (fast.step_metrics[0]["entropy_loss"] is None) == (mode == "partial")
    assert fast.step_metrics[0]["mim_loss"] is not None


def tiny_rtdetr() -> nn.Module:
    """The builtin RT-DETR pose model, tiny, with its structured MIM branch enabled."""
    from rtdetr_pose.config import ModelConfig
    from rtdetr_pose.factory import build_model

    torch.manual_seed(0)
    mc = ModelConfig(num_classes=3, enable_mim=True, hidden_dim=32, num_queries=8, stem_channels=8,
                     backbone_channels=[16, 24, 32], stage_blocks=[1, 1, 1], num_decoder_layers=1, nhead=2,
                     encoder_dim_feedforward=64, decoder_dim_feedforward=64)
    return build_model(mc).eval()


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    # Attention key biases have a mathematically zero gradient (softmax ignores them): pure
    # float noise that Adam amplifies, so no two implementations agree on them; leave them out.
    dict(exclude=["in_proj_bias"]),
    dict(update_filter="norm_only", max_grad_norm=0.05, seed=None),
])
def test_structured_builtin_rtdetr_matches_reference(kw):
    model = tiny_rtdetr()
    assert mim._mim.supports_structured_mim(model)
    # batch 2: at batch 1 the reference's batch-norm gradients are wrong (torch's CPU backward on an
    # ambiguous channels-last grad; README "Differences from the reference") and ours are not
    batches = make_batches(1, shape=(2, 3, 64, 64))
    ref, fast = check(model, batches, cfg(steps=2, lr=1e-3, max_batches=1, **kw))
    assert fast.steps_run == 2 and all(e["entropy_loss"] is not None for e in fast.step_metrics)
    assert not fast.warnings


# ---- sample-parallel (yolozu_ttt.parallel): K images at once, each as it runs alone ----------------

class NormRecon(nn.Module):
    """A reconstruction net with batch-, group- and layer-norm and a LoRA-named 1x1 branch."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.lora = nn.Conv2d(8, 8, 1, bias=False)
        self.ln = nn.LayerNorm(8)
        self.dec = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.bn(self.enc(x)))
        h = torch.relu(self.gn(self.mid(h)))
        h = self.ln((h + self.lora(h)).movedim(-3, -1)).movedim(-1, -3)
        return {"recon": self.dec(h)}


def parallel_cfg(**kw) -> TTTConfig:
    return cfg(**{"max_batches": 1, "mim_patch_size": 4, "update_filter": "norm_only", "max_grad_norm": 1.0, **kw})


def one_by_one(model, batches, config, seed):
    """Each record through one session run after another from torch's global RNG at ``seed``."""
    from test_session import RecordAdapter
    from yolozu_ttt.run import TTTSession

    torch.manual_seed(seed)
    with TTTSession(RecordAdapter(model, batches), config) as session:
        return [session.run([{"i": i}]) for i in range(len(batches))]


def fp32_reach_check(model, start, batches, config, i, rtol=1e-4, atol=1e-6):
    """For record ``i`` adapted alone: the float64 truth (YOLOZU's reference in float64, the same
    masks) and a check that a state lies within fp32's reach of it: per element
    ``atol + rtol * |truth| + reach``, ``reach`` the worst-case fp32 rounding of the conv weight
    gradients propagated by float64 runs (``support_rounding``: derived, not tuned to a CPU). The
    check raises AssertionError naming the tensor and its largest error / bound ratio; it is first
    applied to the fp32 runs alone (ours, YOLOZU's): the bound must cover the rounding it claims to."""
    from support_rounding import rounding_reach
    from test_session import RecordAdapter

    def run(m):
        reference_run_ttt(RecordAdapter(m, [b.to(next(m.parameters()).dtype) for b in batches]), [{"i": i}],
                          config=config)

    truth = {k: v.double() for k, v in _adapted(model, start, torch.float64, run).items()}
    reach = rounding_reach(model, start, run)

    def check(state, what):
        for name, t in truth.items():
            if not t.is_floating_point():
                assert torch.equal(state[name].double(), t), (what, name)
                continue
            ratio = ((state[name].double() - t).abs() / (atol + rtol * t.abs() + reach[name])).max().item()
            assert ratio <= 1.0, (what, i, name, ratio)

    alone = copy.deepcopy(model)
    alone.load_state_dict(start)
    yolozu_ttt.run_ttt(RecordAdapter(alone, batches), [{"i": i}], config=config)
    check(alone.state_dict(), "ours alone")
    check(_adapted(model, start, torch.float32, run), "YOLOZU alone")
    return check


def _adapted(model, start, dtype, run) -> dict:
    m = copy.deepcopy(model).to(dtype)
    m.load_state_dict(start)
    run(m)
    return m.state_dict()


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("update_filter,lr", [("norm_only", 1e-2), ("lora_only", 1e-2), ("lora_norm_only", 1e-2),
                                              ("all", 1e-3)])
def test_parallel_k_images_at_once_equal_each_alone(k, update_filter, lr):
    """Six records in groups of k (the last smaller): each image's losses, mask ratios, step metrics
    and adapted state as its own seeded run alone, with no fallback; a seeded run draws the same
    masks for every image (each from its own stream, seeded alike). ``all`` (every conv weight a
    replica too) at lr 1e-3, where the steps are well conditioned (the largest difference is 1% of
    the tolerance); at lr 1e-2 see the next test."""
    from test_parallel import assert_like_alone, images, parallel
    from yolozu_ttt.parallel import ParallelFallbackWarning

    model, batches = make_model(NormRecon), images(6, size=20)
    start = copy.deepcopy(model.state_dict())
    config = parallel_cfg(update_filter=update_filter, seed=3, lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParallelFallbackWarning)
        reports, states = parallel(model, batches, config, k)
    assert_like_alone(model, start, batches, config, reports, states)
    ratios = [[e["mask_ratio"] for e in r.step_metrics] for r in reports]
    assert ratios == [ratios[0]] * 6 and len(set(ratios[0])) > 1
    assert all(r.mask_ratio == reports[0].mask_ratio for r in reports)


@pytest.mark.parametrize("k", [2, 4])
def test_parallel_ill_conditioned_all_within_fp32_reach_of_the_fp64_truth(k):
    """``all`` at lr 1e-2 (|w| ~ 0.05 weights move 20% a step) is ill conditioned: image 3's grad norm
    falls from 35 to 1.7 at step 3, so its clip coefficient jumps 0.028 -> 0.58 while Adam's
    sqrt(v_hat) is still that of the clipped steps (~1e-3), and a unit of step-3 gradient moves conv
    weight elements by 90-240 lr. The ~1e-6 rounding of those gradients (reduction order: the CPU's
    kernels, vmap's folding) then ends as 2-12e-6 in the weights, over a 1e-4 relative tolerance for
    every fp32 run, ours and YOLOZU's alone included, differently on each CPU. So each image's report
    is compared with its run alone, and its state with the float64 truth within fp32's derived reach
    (``fp32_reach_check``; here rounding uses < 10% of it, a wrong mask or mixed replicas > 50x)."""
    from test_parallel import images, parallel
    from test_session import RecordAdapter

    model, batches = make_model(NormRecon), images(6, size=20)
    start = copy.deepcopy(model.state_dict())
    config = parallel_cfg(update_filter="all", seed=3)
    reports, states = parallel(model, batches, config, k)
    alone = copy.deepcopy(model)
    for i, (got, state) in enumerate(zip(reports, states)):
        alone.load_state_dict(start)
        assert_reports_match(yolozu_ttt.run_ttt(RecordAdapter(alone, batches), [{"i": i}], config=config), got)
        fp32_reach_check(model, start, batches, config, i)(state, "parallel")


def test_fp32_reach_rejects_a_wrong_mask_and_mixed_replicas():
    """The check of the previous test fails for real errors: image 3 adapted with another mask seed,
    and image 3 checked against image 2's adapted state."""
    from test_parallel import images
    from test_session import RecordAdapter

    model, batches = make_model(NormRecon), images(4, size=20)
    start = copy.deepcopy(model.state_dict())
    config = parallel_cfg(update_filter="all", seed=3)
    check = fp32_reach_check(model, start, batches, config, 3)
    wrong = copy.deepcopy(model)
    yolozu_ttt.run_ttt(RecordAdapter(wrong, batches), [{"i": 3}], config=parallel_cfg(update_filter="all", seed=4))
    with pytest.raises(AssertionError):
        check(wrong.state_dict(), "wrong mask")
    other = copy.deepcopy(model)
    yolozu_ttt.run_ttt(RecordAdapter(other, batches), [{"i": 2}], config=config)
    with pytest.raises(AssertionError):
        check(other.state_dict(), "mixed replicas")


def test_parallel_unseeded_masks_follow_the_global_stream_as_runs_one_after_another():
    """Without a seed each image's masks come from torch's global RNG in image order: the reports and
    states of session runs one after another from the same global seed."""
    from test_parallel import images
    from test_session import RecordAdapter
    from yolozu_ttt.run import TTTSession

    model, batches = make_model(NormRecon), images(5, size=20)
    config = parallel_cfg(seed=None)
    want = one_by_one(copy.deepcopy(model), batches, config, seed=11)
    torch.manual_seed(11)
    with TTTSession(RecordAdapter(model, batches), config) as session:
        got = session.run_parallel([{"i": i} for i in range(5)], 2)
    for w, g in zip(want, got):
        assert [e["mask_ratio"] for e in g.step_metrics] == [e["mask_ratio"] for e in w.step_metrics]
        assert_reports_match(w, g)
    assert len({tuple(e["mask_ratio"] for e in r.step_metrics) for r in got}) > 1  # drawn anew per image


def test_parallel_one_image_tripping_a_guard_stops_and_rolls_back_only_itself():
    """A NaN image in a group of three: it stops at its first step (no mask ratio kept) and is rolled
    back to the start (parameters and norm statistics) while the others adapt on, each as alone."""
    from test_parallel import assert_like_alone, images, parallel

    model, batches = make_model(NormRecon), images(4, size=20)
    batches[2] = batches[2].clone().fill_(float("nan"))
    start = copy.deepcopy(model.state_dict())
    config = parallel_cfg(seed=5, stop_on_non_finite=True, rollback_on_stop=True, update_filter="lora_norm_only")
    reports, states = parallel(model, batches, config, 3)
    assert [r.stop_reason for r in reports] == [None, None, "non_finite_metrics", None]
    assert reports[2].mask_ratio is None and reports[3].steps_run == 3
    assert_like_alone(model, start, batches, config, reports, states)
    for key, value in start.items():
        assert torch.equal(states[2][key], value), key


@pytest.mark.slow
def test_parallel_structured_shrunk_rtdetr_at_batch_one():
    """The builtin RT-DETR (shrunk, its structured MIM branch on) at batch 1: each image's feature loss,
    entropy term, mask ratio and adapted state as alone (the settled batch-1 norm gradients)."""
    from test_parallel import assert_like_alone, images, parallel
    from yolozu_ttt.parallel import ParallelFallbackWarning

    model, batches = tiny_rtdetr(), images(3, size=64)
    start = copy.deepcopy(model.state_dict())
    config = parallel_cfg(seed=1, steps=2, lr=1e-3, mim_patch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParallelFallbackWarning)
        warnings.filterwarnings("ignore", message=".*performance drop")  # vmap's fallback for CPU attention
        reports, states = parallel(model, batches, config, 2)
    assert all(e["entropy_loss"] is not None and e["mim_loss"] is not None for r in reports for e in r.step_metrics)
    assert_like_alone(model, start, batches, config, reports, states)


# ---- devices and the Triton path -----------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_cuda_run_draws_the_cpu_reference_masks():
    """Deliberate difference: the reference cannot draw a seeded mask on CUDA; we draw it on the CPU."""
    model, batches = make_model(ReconNet, "recon"), make_batches(2, shape=SHAPE)
    _, ref, _, _ = run_pair(model, batches, cfg())
    fast = yolozu_ttt.run_ttt(ListAdapter(copy.deepcopy(model).cuda(), [b.cuda() for b in batches]), [],
                              config=cfg())
    assert_same_masks(ref, fast)
    assert fast.memory["backend"] == "torch_cuda"
    assert_reports_match(ref, fast, rtol=1e-3, atol=1e-5, same_device=False)


@skip_under_interpreter
def test_mim_parity_through_the_triton_path():
    """The GPU code path (Triton patch-mask, reconstruction and update kernels) in the interpreter on CPU."""
    run_under_interpreter(__file__, "-k",
                          "plain_matches_reference or total_update_guard or nan_batch or empty_and_full or small_model "
           "or channels_last or bfloat16")
