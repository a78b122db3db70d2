"""GPU-only checks of issue 12 (skipped without CUDA): host syncs per step, the ops' fast paths
against eager PyTorch, and graph mode against eager mode.

* Syncs: every method's ``adapt`` runs under ``torch.cuda.set_sync_debug_mode("warn")`` and the
  synchronizing calls are counted per step: one, the engine's read of the stats with the method's
  scalars (README difference 12), for every method; eager EATA reads its selection first (two: a
  read that saves the backward where nothing is selected); a replayed step, one.
* Ops: the Triton paths (eager bypass and custom op) against YOLOZU's eager references, values
  and gradients, at the benched sizes.
* Graph mode (``run_ttt(graph=True)``): the run's report and final parameters equal eager mode's
  and graphs were replayed; every method's whole step is captured (a replayed step syncs once); a
  forward that reads the device is not captured (a warning names the operation). ``YOLOZU_TTT_CUDA_GRAPH=1`` (read at import, hence a
  subprocess) turns it on; on a CPU arena (this test runs without a GPU too) it warns and runs
  eagerly.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import (HOST_READS_PER_CAPTURED_STEP, HOST_READS_PER_STEP, UNDER_INTERPRETER, ListAdapter, make_batches, make_model, method_case,
                      method_config)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or UNDER_INTERPRETER, reason="needs CUDA")

#: expected synchronizing calls per step (see the module docstring; the CPU twin is test_capture.py)
SYNCS_PER_STEP = HOST_READS_PER_STEP
config = method_config


#: the device of the end-to-end cases (a CPU dry run of this file's scripts sets it to cpu)
DEVICE = os.environ.get("YOLOZU_TTT_TEST_DEVICE", "cuda")


def model_for(name: str):
    return method_case(name, DEVICE)


def _is_sync(w: warnings.WarningMessage) -> bool:
    return "synchroniz" in str(w.message)


def count_syncs(monkeypatch, owner: type, attr: str) -> list[int]:
    """Patch ``owner.attr`` to count, per call, the synchronizing calls CUDA's sync debug mode
    reports (nothing of the previous call pending); returns the list the counts go into."""
    per_call: list[int] = []
    original = getattr(owner, attr)

    def counted(self, *args, **kwargs):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                per_call.append(sum(map(_is_sync, caught)))

    monkeypatch.setattr(owner, attr, counted)
    return per_call


@needs_cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("name", sorted(SYNCS_PER_STEP))
def test_syncs_per_step(name, update_filter, graph, monkeypatch):
    """Every step waits for the device once; in graph mode, every replayed one (after the warm-up
    and the capture)."""
    import importlib

    per_step = count_syncs(monkeypatch, importlib.import_module(f"yolozu_ttt.methods.{name}").METHOD, "adapt")
    model, batches = model_for(name)
    cfg = config(name, update_filter=update_filter, steps=6)
    yolozu_ttt_run(model, batches, cfg, graph)  # first run: compiles, tables
    per_step.clear()
    report = yolozu_ttt_run(model, batches, cfg, graph)
    steady = per_step[2:] if graph else per_step
    assert report.steps_run == len(per_step) == 6
    want = HOST_READS_PER_CAPTURED_STEP if graph else SYNCS_PER_STEP[name]
    assert steady == [want] * len(steady), f"{name}/{update_filter}: syncs per step {per_step}"


@needs_cuda
@pytest.mark.parametrize("name", sorted(SYNCS_PER_STEP))
def test_engine_step_is_one_sync(name, monkeypatch):
    """The fused step itself (UpdateEngine.step: launches, the stats read) syncs exactly once."""
    from yolozu_ttt import engine as E

    import yolozu_ttt

    counts = count_syncs(monkeypatch, E.UpdateEngine, "step")
    model, batches = model_for(name)
    for _ in range(2):
        counts.clear()
        yolozu_ttt.run_ttt(ListAdapter(model, batches), [], config=config(name, update_filter="all"))
    assert counts and all(c == 1 for c in counts), counts


# ---- ops: the Triton paths against YOLOZU's eager references ----------------------------------

ENTROPY_SHAPES = [(2, 300, 81), (8, 300, 1203), (64, 32000)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ENTROPY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_entropy_fast_paths_agree_with_eager(shape, dtype):
    from yolozu.tta.integration import _eata_sample_signals, _entropy_loss_from_logits

    from yolozu_ttt import ops

    z = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3).cuda().to(dtype)
    ref_z = z.detach().float().requires_grad_(True)
    ref = _entropy_loss_from_logits(ref_z)
    ref.backward()
    for call in (ops.entropy_loss, lambda t: torch.ops.yolozu_ttt.entropy_loss_fwd(t)[0]):
        ours_z = z.detach().clone().requires_grad_(True)
        loss = call(ours_z)
        loss.backward()
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(loss.float(), ref.detach(), **tol)
        torch.testing.assert_close(ours_z.grad.float(), ref_z.grad, rtol=tol["rtol"] * 10, atol=1e-6)
    if dtype == torch.float32 and len(shape) == 3:
        want = _eata_sample_signals(z, conf_min=0.1)
        got = ops.entropy_stats(z, 0.1)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("shape", [(2, 3, 640, 640), (1, 3, 320, 320)], ids=["2x3x640x640", "1x3x320x320"])
def test_mim_fast_paths_agree_with_eager(shape):
    from yolozu.tta.ttt_mim import apply_mask, reconstruction_loss

    from yolozu_ttt import ops

    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).cuda()
    target = torch.randn(shape, generator=g).cuda()
    grid = (torch.rand((shape[-2] + 15) // 16, (shape[-1] + 15) // 16, generator=g) < 0.6).cuda()
    mask = ops.expand_patch_mask(grid, shape[-2], shape[-1], 16)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = reconstruction_loss(apply_mask(a, mask, mask_value=0.5) * 1.5, target, mask=mask)
    ref.backward()
    ours = ops.masked_reconstruction_loss(ops.apply_patch_mask(b, grid, patch_size=16, mask_value=0.5) * 1.5, target,
                                          grid, patch_size=16)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-8)


# ---- graph mode ---------------------------------------------------------------------------------

GRAPH_CASES = [(name, f) for name in ("tent", "eata", "sar", "cotta", "mim") for f in ("all", "norm_only")]


def graph_run(name: str, update_filter: str, graph: bool, monkeypatch, steps: int = 6, **kw):
    """One run of a case, eager or in graph mode: report, final state, CUDA graph replays, graph warnings."""
    from yolozu_ttt.engine import GraphFallbackWarning

    replays = count_replays(monkeypatch)
    model, batches = model_for(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = yolozu_ttt_run(model, batches, config(name, update_filter=update_filter, steps=steps, **kw), graph)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, GraphFallbackWarning)]
    return report.to_dict(), cpu_state(model), len(replays), fallbacks


def count_replays(monkeypatch) -> list[int]:
    """Every CUDA graph replay from now on appends to the returned list."""
    replays: list[int] = []
    original = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), original(self))[1])
    return replays


def cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def yolozu_ttt_run(model, batches, cfg, graph):
    import yolozu_ttt

    return yolozu_ttt.run_ttt(ListAdapter(model, batches), [], config=cfg, graph=graph)


@needs_cuda
@pytest.mark.parametrize("name,update_filter", GRAPH_CASES, ids=["/".join(c) for c in GRAPH_CASES])
def test_graph_mode_equals_eager(name, update_filter, monkeypatch, deterministic_cudnn):
    ref, ref_state, ref_replays, _ = graph_run(name, update_filter, False, monkeypatch)
    ours, state, replays, fallbacks = graph_run(name, update_filter, True, monkeypatch)
    assert not fallbacks, fallbacks  # every method's whole step is captured
    assert replays >= 1 and ref_replays == 0
    assert_same_outcome(ref, ref_state, ours, state)


@needs_cuda
def test_update_only_capture_where_the_step_reads_the_device(monkeypatch, deterministic_cudnn):
    """Tent with its aux term (YOLOZU's helper reads each part): only the update is captured, with a
    warning saying so, and the run equals eager."""
    ref, ref_state, _, _ = graph_run("tent", "all", False, monkeypatch, aux_depth_weight=0.5)
    ours, state, replays, fallbacks = graph_run("tent", "all", True, monkeypatch, aux_depth_weight=0.5)
    assert len(fallbacks) == 1 and "only the fused update is captured" in fallbacks[0], fallbacks
    assert replays >= 1
    assert_same_outcome(ref, ref_state, ours, state)


def assert_same_outcome(ref, ref_state, ours, state) -> None:
    assert ref["losses"] == pytest.approx(ours["losses"], rel=1e-5, abs=1e-7)
    assert ref["stop_reason"] == ours["stop_reason"] and ref["steps_run"] == ours["steps_run"]
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


class _HostReadForward(torch.nn.Module):
    """A model whose forward reads from the device (``.item()`` or a device-to-host copy)."""

    def __init__(self, how: str):
        super().__init__()
        self.det, self.how = make_model(), how

    def forward(self, x):
        out = self.det(x)
        if self.how == "item":
            out["logits"] = out["logits"] * (1.0 if out["logits"].abs().max().item() < 1e6 else 0.5)
        else:
            out["logits"] = out["logits"] + out["logits"].detach().cpu().mean().to(x.device) * 0.0
        return out


@needs_cuda
@pytest.mark.parametrize("how,op", [("item", "_local_scalar_dense"), ("copy", "host<->device")])
def test_a_forward_that_reads_the_device_is_not_captured(how, op, monkeypatch):
    from yolozu_ttt.engine import GraphFallbackWarning

    outcomes = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = _HostReadForward(how).to(DEVICE)
        batches = [b.to(DEVICE) for b in make_batches()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = yolozu_ttt_run(model, batches, config("tent", steps=4), graph)
        outcomes.append((report, [str(w.message) for w in caught if issubclass(w.category, GraphFallbackWarning)]))
    (ref, _), (ours, fallbacks) = outcomes
    assert len(fallbacks) == 1 and op in fallbacks[0], fallbacks
    assert ref.losses == pytest.approx(ours.losses, rel=1e-5, abs=1e-7)


@pytest.mark.skipif(UNDER_INTERPRETER, reason="the C++ engine's CPU arena is the case")
def test_graph_mode_off_cuda_warns_and_runs_eagerly():
    """A CPU arena with graph mode on (runs without a GPU too): eager, with a GraphFallbackWarning saying why."""
    script = (
        "import warnings, sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from conftest import ListAdapter, make_model, make_batches\n"
        "from test_cuda import config\n"
        "import yolozu_ttt\n"
        "from yolozu_ttt.engine import GraphFallbackWarning\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    yolozu_ttt.run_ttt(ListAdapter(make_model(), make_batches()), [], config=config('tent'))\n"
        "msgs = [str(w.message) for w in caught if issubclass(w.category, GraphFallbackWarning)]\n"
        "assert msgs and 'CUDA arena' in msgs[0], msgs\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ, YOLOZU_TTT_CUDA_GRAPH="1"))


@needs_cuda
@pytest.mark.parametrize("name", ["tent", "eata", "sar", "mim", "cotta"])
def test_sample_parallel_graph_mode_equals_eager_groups(name, monkeypatch, deterministic_cudnn):
    """run_parallel in graph mode (groups of two, the last of one) against eager groups: every
    image's report and adapted state, CUDA graphs replayed for the groups, nothing fell back."""
    import copy

    from yolozu_ttt.engine import GraphFallbackWarning
    from yolozu_ttt.floor import RecordAdapter
    from yolozu_ttt.run import TTTSession

    replays = count_replays(monkeypatch)
    model, _ = model_for(name)
    size = 32 if name == "mim" else 12
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(1, 3, size, size, generator=g).to(DEVICE) for _ in range(6)]
    cfg = config(name, update_filter="norm_only", steps=3, **({"seed": 1} if name in ("mim", "cotta") else {}))
    runs = {}
    for graph in (False, True):
        states = []
        replays.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with TTTSession(RecordAdapter(copy.deepcopy(model).eval(), batches), cfg, graph=graph) as session:
                reports = session.run_parallel([{"i": i} for i in range(6)], 2, lambda *a: states.append(
                    cpu_state(session.adapter.get_model())))
        runs[graph] = [(r.to_dict(), s) for r, s in zip(reports, states)]
        fallbacks = [str(w.message) for w in caught if issubclass(w.category, GraphFallbackWarning)]
        assert not fallbacks, fallbacks
    assert len(replays) >= 3 * 3  # the groups' replays, beside the first image's
    for (ref, ref_state), (ours, state) in zip(runs[False], runs[True]):
        assert_same_outcome(ref, ref_state, ours, state)
