"""yolozu_ttt.capture: the sync probe, the host reads of every method's step, and graph mode's
whole-step capture checked on the CPU (support_capture's ``ReplayedCalls`` stands in for a CUDA
graph; the CUDA checks are in test_cuda.py).

* Host reads: every ``adapt`` step runs under ``HostReads`` (conftest): what the probe flags plus
  each ``tolist``/``numpy`` read, i.e. what would make the host wait for a GPU. The counts equal
  ``HOST_READS_PER_STEP``, the numbers test_cuda.py asserts under CUDA's sync debug mode.
* Whole step: a run in graph mode captures once per input shape and replays; its report and final
  parameters equal eager mode's exactly (the same arithmetic in the same order); a model with a
  host read in its forward falls back to eager with a warning naming the operations.
"""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from conftest import (HOST_READS_PER_SKIPPED_STEP, HOST_READS_PER_STEP, METHOD_CONFIGS, HostReads, ListAdapter,
                      ReplayedCalls, assert_reports_match, make_batches, make_model, method_case, method_config,
                      only_under_interpreter, run_under_interpreter, skip_under_interpreter)
from torch import nn
from yolozu.tta.config import TTTConfig

import yolozu_ttt
from yolozu_ttt import capture
from yolozu_ttt.engine import GraphFallbackWarning

def config(method: str, **kw) -> TTTConfig:
    """The method's small case, seeded (CoTTA's restores and MIM's grids repeat)."""
    return method_config(method, **{"seed": 0, **kw})


model_and_batches = method_case


# ---- the probe ---------------------------------------------------------------------------------

@pytest.mark.parametrize("op,name", [
    (lambda t: t.sum().item(), "_local_scalar_dense"),
    (lambda t: bool(t.max() > 0), "_local_scalar_dense"),
    (lambda t: torch.nonzero(t > 0), "nonzero"),
    (lambda t: t[t > 0], "index(mask)"),
    (lambda t: t.masked_fill(t > 0, 0.0).unique(), "_unique2"),
])
def test_probe_names_each_host_read(op, name):
    t = torch.randn(4, 5)
    with capture.SyncProbe() as probe:
        op(t)
    assert probe.hits[name] >= 1, probe.hits
    assert f"aten.{name}" in probe.describe()


def test_probe_ignores_device_only_work():
    t = torch.randn(4, 5, requires_grad=True)
    with capture.SyncProbe() as probe:
        y = torch.softmax(t, -1)
        loss = (y * y.clamp_min(1e-12).log()).sum(-1).mean() + t.topk(2, -1).values.sum()
        loss.backward()
        t.index_select(0, torch.tensor([0, 2]))
    assert not probe.hits, probe.hits


def test_strict_replays_catch_a_step_whose_launches_follow_host_state():
    """``ReplayedCalls(strict=True)``: a step that bakes a host value into a launch (a Python counter
    as a scalar argument) replays stale in a CUDA graph; the stand-in names the launch that differs.
    The same step with the value in a device tensor replays as captured."""
    graphs, state, x = ReplayedCalls(strict=True), {"n": 0}, torch.ones(3)
    counter = torch.zeros(())

    def host_scalar():
        state["n"] += 1
        return (x * state["n"],)

    def device_value():
        counter.add_(1)
        return (x * counter,)

    graph, (out,) = graphs.capture(device_value)
    for n in range(1, 4):
        graph.replay()
        assert torch.equal(out, x * n)
    graph, _ = graphs.capture(host_scalar)
    graph.replay()  # the capture's own step
    with pytest.raises(AssertionError, match=r"replay 2 ran other launches than its capture: launch 0 is "
                                             r"\('aten.mul.Tensor', .*, 2\)\), captured .*, 1\)\)$"):
        graph.replay()


# ---- host reads per step -----------------------------------------------------------------------

def reads_per_step(method: str, cfg: TTTConfig, model=None, batches=None):
    """The host reads of each ``adapt`` step of a run, and the run's report."""
    cls = importlib.import_module(f"yolozu_ttt.methods.{method}").METHOD
    counts: list[int] = []
    original = cls.adapt

    def counted(self, *args, **kwargs):
        with HostReads() as reads:
            result = original(self, *args, **kwargs)
        counts.append(reads.count)
        return result

    if model is None:
        model, batches = model_and_batches(method)
    cls.adapt = counted
    try:
        report = yolozu_ttt.run_ttt(ListAdapter(model, batches), [], config=cfg)
    finally:
        cls.adapt = original
    assert counts and len(report.step_metrics) == len(counts)
    return counts, report


@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_host_reads_per_step(method, update_filter):
    counts, _ = reads_per_step(method, config(method, update_filter=update_filter))
    assert counts == [HOST_READS_PER_STEP[method]] * len(counts), counts


def test_eata_partial_selection_reads_no_more():
    """Some samples selected: the loss masks the rows on the device (``logits[mask]`` would read the
    mask), and the selection comes back with the step's stats."""
    model, batches = make_model(), make_batches(2, shape=(4, 3, 12, 12))
    with torch.no_grad():
        logits = model(batches[0])["logits"]
        conf = torch.softmax(logits, -1).amax(-1).mean(-1)
    threshold = float(conf.median())
    cfg = config("eata", eata_conf_min=threshold, eata_selected_ratio_min=0.0)
    counts, report = reads_per_step("eata", cfg, model, batches)
    selected = [m["selected_count"] for m in report.step_metrics]
    assert 0 < selected[0] < 4, selected  # a partial selection is what this checks
    assert counts == [HOST_READS_PER_STEP["eata"]] * len(counts), counts


def test_eata_step_selecting_nothing_reads_its_selection_only():
    """Nothing selected (the confidence floor above 1): each step reads its selection and stops there
    (no backward, no update, no second read)."""
    counts, report = reads_per_step("eata", config("eata", eata_conf_min=1.5, eata_max_skip_streak=5, steps=3))
    assert all(e["skipped"] for e in report.step_metrics)
    assert counts == [HOST_READS_PER_SKIPPED_STEP] * 3, counts


def test_tent_teacher_and_aux_terms_read_with_the_step():
    """The aux-consistency total and the teacher view's delta come back in the step's one read; what
    remains is YOLOZU's own ``_aux_consistency_loss`` (reused as it is), which reads each of its
    parts (here one: depth)."""
    cfg = config("tent", aux_depth_weight=0.5)
    counts, report = reads_per_step("tent", cfg)
    assert report.step_metrics[0]["aux_target_current_batch"] == 1.0
    parts = 1
    assert counts == [HOST_READS_PER_STEP["tent"] + parts] * len(counts), counts


# ---- whole-step capture (ReplayedCalls in place of a CUDA graph) --------------------------------

def run(cfg: TTTConfig, batches, graph: bool, model=None):
    model = model if model is not None else make_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = yolozu_ttt.run_ttt(ListAdapter(model, batches), [], config=cfg, graph=graph)
    return report, model, [w for w in caught if issubclass(w.category, GraphFallbackWarning)]


def assert_same_run(a, b) -> None:
    assert_reports_match(a[0], b[0], rtol=0.0, atol=0.0)
    for (name, p), q in zip(a[1].state_dict().items(), b[1].state_dict().values()):
        assert torch.equal(p, q), name


EATA_PARTIAL = {"eata_conf_min": 0.72, "eata_selected_ratio_min": 0.0, "lr": 1e-4}  # 1 of 2 samples, then 2
EATA_SKIPS = {"eata_entropy_max": 0.79, "eata_max_skip_streak": 10, "eata_selected_ratio_min": 0.0,
              "lr": 1e-4}  # 1 of 2, then none (a skip at the capture step), then updates and skips
WHOLE_STEP_CASES = [("tent", {}), ("eata", {}), ("eata", EATA_PARTIAL), ("eata", EATA_SKIPS), ("sar", {}), ("sar", {"sar_rho": 0.0}), ("sar", {"sar_adaptive": True}),
                    ("cotta", {"cotta_restore_interval": 2}), ("cotta", {"cotta_aggregation": "confidence_weighted_mean"}),
                    ("mim", {}), ("mim", {"seed": None})]


@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("method,kw", WHOLE_STEP_CASES, ids=[f"{m}{k}" for m, k in WHOLE_STEP_CASES])
def test_whole_step_replays_equal_eager(replayed, method, kw, update_filter):
    """Steps 2.. are replayed; the run equals eager bit for bit (an unseeded MIM draws its grids from
    torch's global RNG, seeded alike). A launch key names what a graph bakes in: the C++ engine's
    is every argument (CoTTA's restore counter too: a capture per restore step), Triton's leaves
    out what it uploads (test_whole_step_replays_the_triton_launch)."""
    cfg = config(method, update_filter=update_filter, steps=5, max_total_update_norm=10.0, **kw)
    runs = []
    for graph in (True, False):
        torch.manual_seed(3)
        model, batches = model_and_batches(method)
        runs.append(run(cfg, batches, graph=graph, model=model))
    assert not runs[0][2], [str(w.message) for w in runs[0][2]]
    assert_same_run(*runs)
    if kw is EATA_SKIPS:
        skipped = [m["skipped"] for m in runs[0][0].step_metrics]
        assert skipped[1] and False in skipped[2:], skipped  # a skip captured, updates replayed
    (graphs,) = replayed
    assert sum(g.replays for g in graphs.captured) == cfg.steps - capture.WARMUP_STEPS
    if method != "cotta":
        assert len(graphs.captured) == 1  # one input layout, one launch key


def test_whole_step_captures_per_input_shape(replayed):
    batches = [make_batches(1, shape=(2, 3, 12, 12))[0], make_batches(1, seed=2, shape=(1, 3, 12, 12))[0]]
    cfg = config("tent", steps=6)
    graph, eager = run(cfg, batches, graph=True), run(cfg, batches, graph=False)
    assert_same_run(graph, eager)
    assert len(replayed[0].captured) == 2


@pytest.mark.parametrize("method", ["tent", "sar"])
def test_whole_step_rollback_restores_like_eager(replayed, method):
    """A guard stop after replayed steps rolls back the replayed update bit-exactly (SAR: from its
    ascent's backup)."""
    batches = make_batches(2)
    cfg = config(method, steps=6, max_total_update_norm=0.55, lr=5e-3)
    graph, eager = run(cfg, batches, graph=True), run(cfg, batches, graph=False)
    assert eager[0].stop_reason and len(eager[0].step_metrics) > 2  # stops at a replayed step
    assert_same_run(graph, eager)


class ItemInForward(nn.Module):
    """TinyDet with a host read in its forward (a data-dependent Python branch)."""

    def __init__(self):
        super().__init__()
        self.det = make_model()

    def forward(self, x):
        out = self.det(x)
        if out["logits"].abs().max() > 1e6:  # a sync: cannot be captured
            out["logits"] = out["logits"] * 0.5
        return out


def test_host_read_in_the_forward_falls_back_with_the_reason(replayed):
    batches = make_batches(2)
    cfg = config("tent", steps=3)
    torch.manual_seed(0)
    graph = run(cfg, batches, graph=True, model=ItemInForward())
    torch.manual_seed(0)
    eager = run(cfg, batches, graph=False, model=ItemInForward())
    assert len(graph[2]) == 1 and "aten._local_scalar_dense x1" in str(graph[2][0].message)
    assert not replayed[0].captured
    assert_same_run(graph, eager)


@pytest.mark.parametrize("method,kw,why", [
    ("tent", {"detector_response": True}, "decides on the host"),
    ("tent", {"aux_depth_weight": 0.5}, "decides on the host"),
])
def test_steps_with_host_decisions_capture_only_the_update(replayed, method, kw, why):
    model, batches = model_and_batches(method)
    report, _, caught = run(config(method, **kw), batches, graph=True, model=model)
    assert len(caught) == 1 and why in str(caught[0].message)
    assert not replayed  # no StepGraph was made


def test_mixed_precision_captures_only_the_update(replayed):
    model, batches = make_model(), make_batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yolozu_ttt.run_ttt(ListAdapter(model, batches), [], config=config("tent"), amp="bf16", graph=True)
    assert any("mixed precision (bf16)" in str(w.message) for w in caught if w.category is GraphFallbackWarning)
    assert not replayed


def test_graph_mode_on_a_cpu_arena_warns_and_runs_eagerly():
    """No CUDA arena: graph mode says so once and the run equals eager."""
    batches = make_batches(2)
    cfg = config("tent")
    graph, eager = run(cfg, batches, graph=True), run(cfg, batches, graph=False)
    assert len(graph[2]) == 1 and "CUDA graphs need a CUDA arena" in str(graph[2][0].message)
    assert_same_run(graph, eager)


@only_under_interpreter
@pytest.mark.parametrize("update_filter", ["all", "norm_only"])
@pytest.mark.parametrize("method", ["tent", "eata", "sar", "cotta", "mim"])
def test_whole_step_replays_the_triton_launch(replayed, method, update_filter):
    """Under the interpreter the arena runs Triton's engine: the launch prepared before the capture
    (its uploads, its tables) is the one every replay runs."""
    kw = {"cotta": {"cotta_restore_interval": 2, "cotta_restore_prob": 0.3}, "eata": EATA_SKIPS}.get(method, {})
    cfg = config(method, update_filter=update_filter, steps=6, **kw)
    runs = [run(cfg, batches, graph=graph, model=model)
            for graph, (model, batches) in ((True, model_and_batches(method)), (False, model_and_batches(method)))]
    assert not runs[0][2], [str(w.message) for w in runs[0][2]]
    assert_same_run(*runs)
    # one graph per launch key: CoTTA's restore steps and its plain ones (the counter is uploaded)
    assert len(replayed[0].captured) == (2 if method == "cotta" else 1)


@skip_under_interpreter
def test_whole_step_through_the_triton_path():
    """Graph mode on Triton's engine, in the interpreter: the launch cases (every method, both
    filters) and every step variant of ``WHOLE_STEP_CASES`` on norm_only. Left to the C++ engine (this
    process): the variants with ``all``, whose 11 cases took 25 s more here under the interpreter;
    through Triton, the ``all`` layout is the launch cases'."""
    run_under_interpreter(__file__, "-k", "whole_step_replays_the_triton_launch or "
                                          "(whole_step_replays_equal_eager and norm_only)")



def test_builtin_rtdetr_whole_step_is_capturable(replayed):
    """YOLOZU's builtin RT-DETR (the GPU target's model): its forward and backward read nothing from
    the device, so graph mode captures its whole Tent step (at batch 1, the target's case), and the
    replayed run equals the eager one."""
    from yolozu.inference.adapter import RTDETRPoseAdapter

    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    cfg = config("tent", update_filter="norm_only", steps=3, lr=1e-4)
    runs = [run(cfg, [x], graph=graph, model=RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model())
            for graph in (True, False)]
    assert not runs[0][2], [str(w.message) for w in runs[0][2]]
    assert len(replayed[0].captured) == 1 and replayed[0].captured[0].replays == 2
    assert_same_run(*runs)


@pytest.mark.parametrize("method", ["tent", "eata"])
def test_whole_step_in_a_session_equals_eager(replayed, method):
    """``--ttt-reset sample``'s session: one capture for the whole session, replayed by every later
    run from its first step (each run reset to the session's start); the runs equal an eager
    session's, run for run."""
    cfg = config(method, steps=3)
    reports, models = {}, {}
    for graph in (True, False):
        model, batches = model_and_batches(method)
        session = yolozu_ttt.run.prepare_session(ListAdapter(model, batches), cfg, graph=graph)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GraphFallbackWarning)
            reports[graph] = [session.run([]) for _ in range(3)]
        models[graph] = model
    for ours, ref in zip(reports[True], reports[False]):
        assert_reports_match(ours, ref, rtol=0.0, atol=0.0)
    assert_same_run((reports[True][-1], models[True]), (reports[False][-1], models[False]))
    assert len(replayed) == 1 and len(replayed[0].captured) == 1  # one StepGraph, one capture
    assert replayed[0].captured[0].replays == 2 + 3 + 3  # the first run's warm-up step ran eagerly
