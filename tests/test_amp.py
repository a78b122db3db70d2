"""Mixed-precision adaptation (``run_ttt(..., amp=...)``) and the batch-1 norm-layout fix.

The bf16 trajectories are compared with fp32 within a tolerance derived from the rounding, not
picked: see :func:`trajectory_tolerance`.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ListAdapter, assert_raises_like_reference, make_batches, make_model
from torch import nn
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import run_ttt as reference_run_ttt

import yolozu_ttt
from yolozu_ttt import amp as amp_mod
from yolozu_ttt.run import TTTSession

U_BF16 = 2.0 ** -8  # bf16's unit roundoff (8 significand bits)
ADAM_STEP_BOUND = 1.004  # max |m_hat / sqrt(v_hat)| of torch's Adam (betas 0.9, 0.999) in its first 3 steps


class ReconNet(nn.Module):
    """Conv, BN, conv: a plain-MIM model (it reconstructs its input)."""

    BF16_DEPTH = 3  # layers on the path to the output that round to bf16 under autocast

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return {"recon": self.b(torch.relu(self.bn(self.a(x))))}


TINYDET_BF16_DEPTH = 10  # conv1, bn, conv2, gn, mean, lora.a, lora.b, head, ln, *2 (conftest.TinyDet)


def config(method: str, **kw) -> TTTConfig:
    base = dict(enabled=True, method=method, steps=3, update_filter="norm_only", lr=1e-3, seed=0,
                eata_conf_min=0.0, eata_entropy_max=10.0, cotta_restore_prob=0.0, mim_patch_size=4)
    base.update(kw)
    return TTTConfig(**base)


def run(model, batches, cfg, amp="off"):
    model = copy.deepcopy(model)
    report = yolozu_ttt.run_ttt(ListAdapter(model, batches), [], config=cfg, amp=amp)
    return model, report


def run_engine(model, batches, cfg, amp="off"):
    """``run``, through the session ``run_ttt`` is (one run, closed), and the engine it says ran."""
    model = copy.deepcopy(model)
    with TTTSession(ListAdapter(model, batches), cfg, amp) as session:
        report = session.run([])
    return model, report, session.engine


def loss_of_outputs(method: str, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the method's loss, the model output it is computed from), fp32, at the current parameters."""
    if method == "mim":
        pred = model(x)["recon"]
        return F.mse_loss(pred, x), pred
    views = [x, torch.flip(x, dims=[-1])] if method == "cotta" else [x]
    z = torch.cat([model(v)["logits"] for v in views])
    p = z.softmax(-1)
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean(), z


def forward_sensitivity(method: str, model: nn.Module, batches: list[torch.Tensor]) -> float:
    """max over batches of ||(dL/dz) * z||_2: the standard deviation of the first-order change of the
    loss when every element of the output z it is computed from moves by an independent relative error
    of standard deviation 1."""
    model = copy.deepcopy(model).train()
    worst = 0.0
    for x in batches:
        loss, z = loss_of_outputs(method, model, x)
        (g,) = torch.autograd.grad(loss, z)
        worst = max(worst, float((g * z.detach()).norm()))
    return worst


def trajectory_tolerance(method: str, model: nn.Module, batches, cfg: TTTConfig, fp32_report, depth: int) -> list[float]:
    """Per step k, a bound on |loss_bf16[k] - loss_fp32[k]| from first-order error propagation:

    * forward rounding at fixed parameters: each of the ``depth`` layers on the path rounds its inputs
      and its output to bf16, two relative errors of at most u = 2^-8 each; taken as independent, an
      element of the output z moves by a relative error of standard deviation at most u·sqrt(2·depth),
      and the loss by 3 standard deviations: 3·u·sqrt(2·depth)·||(dL/dz)·z||_2 (dL/dz in fp32 at the
      start; the worst case, all errors aligned, is 10-20x larger here and no test of anything);
    * the trajectories: Adam moves every element by at most ADAM_STEP_BOUND·lr per step whatever the
      gradient, so after k steps the two parameter vectors differ by at most 2·1.004·lr·k per element,
      i.e. 2·1.004·lr·k·sqrt(P) in L2 (P = updated parameters), which moves the loss by at most
      G·that, G the largest fp32 grad norm of the run; SAR's loss is taken at the ascended point, up
      to rho away in each run: 2·rho·G more.
    """
    forward = 3.0 * U_BF16 * math.sqrt(2.0 * depth) * forward_sensitivity(method, model, batches)
    grads = [e["grad_norm"] for e in fp32_report.step_metrics if e.get("grad_norm") is not None]
    g = max(grads)
    drift = 2.0 * ADAM_STEP_BOUND * float(cfg.lr) * math.sqrt(fp32_report.updated_param_count) * g
    sar = 2.0 * float(cfg.sar_rho) * g if method == "sar" else 0.0
    return [forward + k * drift + sar for k in range(fp32_report.steps_run)]


METHOD_CASES = {
    "tent": (lambda: make_model(), TINYDET_BF16_DEPTH),
    "eata": (lambda: make_model(), TINYDET_BF16_DEPTH),
    "sar": (lambda: make_model(), TINYDET_BF16_DEPTH),
    "cotta": (lambda: make_model(), TINYDET_BF16_DEPTH),
    "mim": (lambda: (torch.manual_seed(0), ReconNet())[1], ReconNet.BF16_DEPTH),
}


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_bf16_tracks_fp32_within_the_derived_tolerance(method):
    build, depth = METHOD_CASES[method]
    model, batches = build(), make_batches()
    cfg = config(method)
    fp32_model, fp32 = run(model, batches, cfg)
    bf16_model, bf16, engine = run_engine(model, batches, cfg, amp="bf16")
    assert bf16.steps_run == fp32.steps_run == 3 and bf16.stop_reason is None
    tol = trajectory_tolerance(method, model, batches, cfg, fp32, depth)
    diffs = [abs(a - b) for a, b in zip(bf16.losses, fp32.losses)]
    assert all(d <= t for d, t in zip(diffs, tol)), (diffs, tol)
    assert any(d > 0.0 for d in diffs)  # the passes did run in bf16
    assert all(math.isfinite(v) for v in bf16.losses)
    for e in bf16.step_metrics:
        assert e["amp"] == "bf16" and all(math.isfinite(e[k]) for k in ("grad_norm", "update_norm"))
    for p in bf16_model.parameters():  # master weights: fp32, finite
        assert p.dtype == torch.float32 and bool(torch.isfinite(p).all())
    for b in bf16_model.buffers():
        assert b.dtype in (torch.float32, torch.int64)
    assert "forward" not in vars(bf16_model)  # the model's own forward again
    if method == "cotta":  # the teacher's forwards ran the teacher (its EMA weights), not the student
        assert all(e["consistency_mse"] > 0.0 for e in bf16.step_metrics[1:])
    assert engine["amp"] == "bf16"


def test_amp_off_is_the_default_and_changes_nothing():
    model, batches = make_model(), make_batches()
    a_model, a = run(model, batches, config("tent"))
    b_model, b, engine = run_engine(model, batches, config("tent"), amp="off")
    assert a.losses == b.losses and a.step_metrics == b.step_metrics and "amp" not in a.step_metrics[0]
    for x, y in zip(a_model.state_dict().values(), b_model.state_dict().values()):
        assert torch.equal(x, y)
    assert "amp" not in engine


class DtypeProbe(nn.Module):
    """TinyDet that records the dtype its head computes in and what it returns."""

    def __init__(self):
        super().__init__()
        self.net = make_model()
        self.seen: list[torch.dtype] = []
        self.net.head.register_forward_hook(lambda m, i, o: self.seen.append(o.dtype))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("method", ["tent", "sar", "cotta"])
@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_every_forward_runs_under_autocast_and_losses_see_fp32(method, amp, dtype, monkeypatch):
    from yolozu_ttt import ops

    seen_logits = []
    real = ops.entropy_loss
    monkeypatch.setattr(ops, "entropy_loss", lambda z: (seen_logits.append(z.dtype), real(z))[1])
    probe = DtypeProbe()
    report = yolozu_ttt.run_ttt(ListAdapter(probe, make_batches()), [], config=config(method, steps=2), amp=amp)
    # student (x2 for SAR), CoTTA's two views and its teacher's two: every forward in the low precision
    assert len(probe.seen) == report.forward_calls and set(probe.seen) == {dtype}
    assert seen_logits and set(seen_logits) == {torch.float32}


@pytest.mark.parametrize("guard", [
    dict(max_total_update_norm="between_2_3"),
    dict(max_update_norm=1e-9),
    dict(max_loss_increase=-1.0),
])
@pytest.mark.parametrize("method", ["tent", "eata"])
def test_bf16_makes_the_guard_decisions_of_fp32(method, guard):
    """Guards fp32 trips by far (update norm, loss increase at step 0) or mid-way between two of its
    total update norms (Adam's sign-like steps make those nearly independent of the grads' rounding)."""
    model, batches = make_model(), make_batches()
    guard = dict(guard)
    if guard.get("max_total_update_norm") == "between_2_3":
        _, free = run(model, batches, config(method, steps=4))
        totals = [e["total_update_norm"] for e in free.step_metrics]
        guard["max_total_update_norm"] = (totals[1] + totals[2]) / 2
    cfg = config(method, steps=4, rollback_on_stop=True, **guard)
    fp32_model, fp32 = run(model, batches, cfg)
    bf16_model, bf16 = run(model, batches, cfg, amp="bf16")
    assert fp32.stopped_early and bf16.stop_reason == fp32.stop_reason and bf16.steps_run == fp32.steps_run
    assert [e.get("rolled_back") for e in bf16.step_metrics] == [e.get("rolled_back") for e in fp32.step_metrics]


def test_rollback_under_autocast_restores_the_state_bit_exactly():
    """A NaN batch at step 2 stops the bf16 run; parameters and BN buffers go back exactly to the
    bf16 state after step 1."""
    model, batches = make_model(), make_batches(2)
    batches[1] = torch.full_like(batches[1], float("nan"))
    stopped_model, stopped = run(model, batches, config("tent", rollback_on_stop=True, max_batches=2), amp="bf16")
    assert stopped.stop_reason == "non_finite_metrics" and stopped.steps_run == 1
    one_model, _ = run(model, batches[:1], config("tent", steps=1, max_batches=1), amp="bf16")
    for (name, a), b in zip(one_model.state_dict().items(), stopped_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(p.dtype == torch.float32 for p in stopped_model.parameters())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("cfg", [
    config("tent", steps=0),
    config("tent", update_filter="weird"),
    config("tent", include=["no_such_param"]),
    config("eata", lr=-1.0),
    config("tent", max_batches=0),
    config("bogus"),
])
def test_bad_input_under_autocast_raises_like_the_reference(cfg, amp, monkeypatch):
    real = yolozu_ttt.run_ttt
    monkeypatch.setattr(yolozu_ttt, "run_ttt", lambda adapter, records, *, config: real(adapter, records, config=config,
                                                                                             amp=amp))
    model = make_model()
    assert_raises_like_reference(model, make_batches(), cfg)
    assert "forward" not in vars(model)


def test_an_exception_mid_run_leaves_no_autocast_and_no_hooks():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = make_model(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return self.net(x)

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        yolozu_ttt.run_ttt(ListAdapter(model, make_batches()), [], config=config("tent"), amp="bf16")
    assert not torch.is_autocast_enabled("cpu")
    assert "forward" not in vars(model)
    assert not model.net.bn._forward_hooks and not model.net.bn._forward_pre_hooks


def test_unknown_amp_is_refused():
    with pytest.raises(ValueError, match="amp must be one of off, bf16, fp16"):
        yolozu_ttt.run_ttt(ListAdapter(make_model(), make_batches()), [], config=config("tent"), amp="fp8")


# ---- fp16: the loss scale ------------------------------------------------------------------------
def test_fp16_runs_with_a_loss_scale_and_tracks_fp32():
    model, batches = make_model(), make_batches()
    _, fp32 = run(model, batches, config("tent"))
    fp16_model, fp16 = run(model, batches, config("tent"), amp="fp16")
    assert fp16.steps_run == 3 and fp16.stop_reason is None
    assert [e["loss_scale"] for e in fp16.step_metrics] == [2.0 ** 16] * 3
    assert not any(e["amp_overflow"] for e in fp16.step_metrics)
    # fp16 has 11 significand bits: the bf16 bound scaled by 2^-3 holds a fortiori
    tol = [t / 8 for t in trajectory_tolerance("tent", model, batches, config("tent"), fp32, TINYDET_BF16_DEPTH)]
    assert all(abs(a - b) <= t for a, b, t in zip(fp16.losses, fp32.losses, tol))
    assert all(p.dtype == torch.float32 for p in fp16_model.parameters())


@pytest.mark.parametrize("stop_on_non_finite", [True, False])
def test_fp16_overflow_is_reported_and_never_applied(stop_on_non_finite, monkeypatch):
    """A scale so large the fp16 backward overflows: no step is applied, each reaches the guards as an
    inf grad norm, the scale halves after each."""
    real_init = amp_mod.LossScaler.__init__
    monkeypatch.setattr(amp_mod.LossScaler, "__init__",
                        lambda self, device, **kw: real_init(self, device, init_scale=2.0 ** 100))
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    cfg = config("tent", stop_on_non_finite=stop_on_non_finite, rollback_on_stop=True)
    report = yolozu_ttt.run_ttt(ListAdapter(model, make_batches()), [], config=cfg, amp="fp16")
    entries = report.step_metrics
    assert all(e["amp_overflow"] and e["grad_norm"] == math.inf and e["update_norm"] == 0.0 for e in entries)
    assert [e["loss_scale"] for e in entries] == [2.0 ** (100 - i) for i in range(len(entries))]
    assert any(w.startswith("amp_fp16_overflow:step=0") for w in report.warnings)
    if stop_on_non_finite:
        assert report.stop_reason == "non_finite_metrics" and len(entries) == 1
        assert entries[0]["non_finite_fields"] == ["grad_norm", "grad_norm_clipped"]
    else:
        assert report.stop_reason is None and len(entries) == 3
    after = model.state_dict()
    for name in (n for n, _ in model.named_parameters()):
        assert torch.equal(after[name], before[name]), name  # never applied


def test_fp16_eata_and_sar_overflow_are_not_applied(monkeypatch):
    real_init = amp_mod.LossScaler.__init__
    monkeypatch.setattr(amp_mod.LossScaler, "__init__",
                        lambda self, device, **kw: real_init(self, device, init_scale=2.0 ** 100))
    for method in ("eata", "sar"):
        model = make_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        report = yolozu_ttt.run_ttt(ListAdapter(model, make_batches()), [], amp="fp16",
                                    config=config(method, stop_on_non_finite=False, eata_anchor_lambda=0.5))
        assert all(e["amp_overflow"] for e in report.step_metrics), method
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), (method, n)


# ---- the batch-1 norm layout ---------------------------------------------------------------------
class TokenNet(nn.Module):
    """Conv, BN, SiLU, then the map as tokens (``flatten(2).transpose(1, 2)``, concatenated), as
    DETR-style encoders do: at batch 1 autograd hands the BN a channels-last grad whose strides ATen
    reads as contiguous."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.coarse = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, classes)

    def forward(self, x):
        return {"logits": self.proj(tokens(self.coarse(x), F.silu(self.bn(self.conv(x)), inplace=True)))}


def tokens(*maps: torch.Tensor) -> torch.Tensor:
    """Maps of two scales as one token sequence, as RT-DETR's encoder input is built."""
    return torch.cat([h.flatten(2).transpose(1, 2) for h in maps], 1)


def first_step_grads(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, settled: bool) -> list[torch.Tensor]:
    model = copy.deepcopy(model).to(dtype).train()
    params = [model.bn.weight, model.bn.bias]
    ctx = amp_mod.settled_norm_layouts(model) if settled else contextlib_null()
    with ctx:
        p = model(x.to(dtype))["logits"].softmax(-1)
        loss = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        return [g.double() for g in torch.autograd.grad(loss, params)]


def contextlib_null():
    import contextlib

    return contextlib.nullcontext()


def rel_l2(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(torch.cat([(x - y).flatten() for x, y in zip(a, b)]).norm() / torch.cat([y.flatten() for y in b]).norm())


def fp64_norm_grads(model: TokenNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The fp64 ground truth of the entropy's gradient in ``model.bn``'s weight and bias on the batch
    ``x``: BN decomposed into elementary ops (no layout-dependent kernel)."""
    truth_model = copy.deepcopy(model).double().train()
    xx = x.double()
    h = truth_model.conv(xx)
    mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
    w, b = truth_model.bn.weight, truth_model.bn.bias
    h = (h - mean) / (var + truth_model.bn.eps).sqrt() * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    p = truth_model.proj(tokens(truth_model.coarse(xx), F.silu(h))).softmax(-1)
    return [g.double() for g in torch.autograd.grad(-(p * p.clamp_min(1e-12).log()).sum(-1).mean(), [w, b])]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_1_norm_gradients_match_fp64(batch, layout):
    torch.manual_seed(0)
    model = TokenNet()
    x = torch.randn(batch, 3, 6, 5, generator=torch.Generator().manual_seed(3))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    truth = fp64_norm_grads(model, x)
    fixed = first_step_grads(model, x, torch.float32, settled=True)
    assert rel_l2(fixed, truth) < 1e-5
    if batch == 1 and layout == "contiguous":  # what torch's CPU kernel does without the fix
        assert rel_l2(first_step_grads(model, x, torch.float32, settled=False), truth) > 0.1


def test_run_ttt_batch_1_gradient_is_layout_independent():
    """End to end: the first step's grad norm is the same for a contiguous and a channels-last batch
    of 1 (the reference's differs: its contiguous gradient is the wrong one)."""
    torch.manual_seed(0)
    model = TokenNet()
    x = torch.randn(1, 3, 6, 5, generator=torch.Generator().manual_seed(3))
    cfg = TTTConfig(enabled=True, method="tent", steps=1, update_filter="norm_only", lr=1e-3)
    norms = {}
    for layout, xx in (("contiguous", x), ("channels_last", x.contiguous(memory_format=torch.channels_last))):
        report = yolozu_ttt.run_ttt(ListAdapter(copy.deepcopy(model), [xx]), [], config=cfg)
        norms[layout] = report.step_metrics[0]["grad_norm"]
        ref = reference_run_ttt(ListAdapter(copy.deepcopy(model), [xx]), [], config=cfg)
        norms["reference " + layout] = ref.step_metrics[0]["grad_norm"]
    assert norms["contiguous"] == pytest.approx(norms["channels_last"], rel=1e-5)
    assert norms["channels_last"] == pytest.approx(norms["reference channels_last"], rel=1e-5)
    assert norms["reference contiguous"] != pytest.approx(norms["reference channels_last"], rel=1e-3)
    assert not model.bn._forward_hooks


# ---- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_sample(tmp_path_factory):
    from yolozu.demos.labeled_dataset import generate_labeled_sample
    from yolozu.inference.adapter import RTDETRPoseAdapter

    root = tmp_path_factory.mktemp("amp_cli")
    generate_labeled_sample(run_dir=root / "ds", seed=0)
    torch.save(RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model().state_dict(), root / "ckpt.pt")
    return ["--adapter", "rtdetr_pose", "--config", "builtin:base", "--checkpoint", str(root / "ckpt.pt"),
            "--dataset", str(root / "ds"), "--split", "val", "--max-images", "1", "--image-size", "64",
            "--score-threshold", "0.0", "--max-detections", "3", "--ttt", "--ttt-steps", "2",
            "--ttt-update-filter", "norm_only"]


def test_cli_ttt_amp_with_the_reference_backend_is_refused(cli_sample, tmp_path, capsys):
    from yolozu_ttt import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["export-predictions", *cli_sample, "--ttt-amp", "bf16", "--output", str(tmp_path / "p.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--ttt-amp bf16 needs --ttt-backend fast" in err and "no mixed-precision mode" in err
    assert not (tmp_path / "p.json").exists()


def test_cli_ttt_amp_bf16_runs_and_is_recorded(cli_sample, tmp_path):
    import json

    from yolozu_ttt import cli

    out, log = tmp_path / "p.json", tmp_path / "log.json"
    assert cli.main(["export-predictions", *cli_sample, "--ttt-backend", "fast", "--ttt-amp", "bf16", "--wrap",
                     "--output", str(out), "--ttt-log-out", str(log)]) == 0
    meta = json.loads(out.read_text())["meta"]["ttt"]
    assert meta["amp"] == "bf16" and meta["engine"]["amp"] == "bf16" and meta["engine"]["engine"] == "fast"
    assert json.loads(log.read_text())["ttt"]["amp"] == "bf16"
    entries = meta["report"]["step_metrics"]
    assert len(entries) == 2 and all(e["amp"] == "bf16" for e in entries)
