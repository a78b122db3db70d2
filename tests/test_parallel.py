"""yolozu_ttt.parallel (``TTTSession.run_parallel``): K records adapted at once, each by its own
replica, against each record adapted alone by a fresh ``run_ttt`` (batch 1, its own reset)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_models_match, assert_reports_match, make_model, method_case, method_config
from support_twins import plain_entropy as entropy
from test_session import RecordAdapter
from yolozu.tta.ttt_mim import select_parameters

import yolozu_ttt
from yolozu_ttt.engine import GraphFallbackWarning, UpdateEngine
from yolozu_ttt.parallel import ParallelFallbackWarning
from yolozu_ttt.run import TTTSession


def images(n: int, size: int = 12, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, size, size, generator=g) for _ in range(n)]


def tiny_rtdetr() -> torch.nn.Module:
    """YOLOZU's builtin RT-DETR pose model, shrunk (as tests/test_export.py's)."""
    from rtdetr_pose.config import ModelConfig
    from rtdetr_pose.factory import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(num_classes=3, hidden_dim=32, num_queries=8, stem_channels=8,
                                   backbone_channels=[8, 16, 32], stage_blocks=[1, 1, 1], num_encoder_layers=1,
                                   num_decoder_layers=1, nhead=2, encoder_dim_feedforward=32,
                                   decoder_dim_feedforward=32)).eval()


def parallel(model, batches, cfg, k, **session):
    """run_parallel over every batch's record: the reports and each record's adapted state (seen
    by ``on_image`` in the training mode run_ttt leaves); a plain run afterwards still starts from
    the session's start. ``session``: TTTSession's options (amp, graph)."""
    states = {}
    training = model.training

    def on_image(index, record, report):
        assert record == {"i": index} and model.training == training
        states[index] = copy.deepcopy(model.state_dict())

    with TTTSession(RecordAdapter(model, batches), cfg, **session) as session:
        reports = session.run_parallel([{"i": i} for i in range(len(batches))], k, on_image)
        assert_reports_match(reports[0], session.run([{"i": 0}]), rtol=0.0, atol=0.0)
    return reports, [states[i] for i in range(len(batches))]


def assert_like_alone(model, start, batches, cfg, reports, states, **tol):
    """Each record's report and adapted state equal a fresh run_ttt of that record alone."""
    alone, other = copy.deepcopy(model), copy.deepcopy(model)
    for i, (got, state) in enumerate(zip(reports, states)):
        alone.load_state_dict(start)
        want = yolozu_ttt.run_ttt(RecordAdapter(alone, batches), [{"i": i}], config=cfg)
        assert_reports_match(want, got, **tol)
        other.load_state_dict(state)
        assert_models_match(alone, other, **tol)


@pytest.mark.parametrize("k", [2, 4])
def test_k_at_once_equals_each_alone_on_batch_layer_and_group_norms(k):
    """TinyDet (batch-, group- and layer-norm), tent/norm_only: six records in groups of k (the
    last group smaller), each as alone, with no fallback."""
    model, batches = make_model().eval(), images(6)
    start = copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParallelFallbackWarning)
        reports, states = parallel(model, batches, cfg, k)
    assert_like_alone(model, start, batches, cfg, reports, states)


@pytest.mark.parametrize("method", ["tent", "cotta"])
def test_each_group_step_is_one_engine_call_over_k_rows(monkeypatch, method):
    """The replicas' update is the engine's: every step of a group of K is one fused call of an
    UpdateEngine over K rows at the step's restore counter (CoTTA: its restore steps with each
    image's own seed), and the results are each image's alone."""
    calls = []
    prepare = UpdateEngine.prepare

    def spy(self, spec, counter=0, seeds=None):
        calls.append((self.rows, counter, spec.restore_prob > 0.0, None if seeds is None else len(seeds)))
        return prepare(self, spec, counter, seeds)

    monkeypatch.setattr(UpdateEngine, "prepare", spy)
    model, batches = make_model().eval(), images(4)
    start = copy.deepcopy(model.state_dict())
    extra = {"cotta_restore_interval": 2, "cotta_restore_prob": 0.3, "seed": 1} if method == "cotta" else {}
    cfg = method_config(method, update_filter="norm_only", steps=3, **extra)
    reports, states = parallel(model, batches, cfg, 3)
    restores = [method == "cotta" and (s + 1) % 2 == 0 for s in range(3)]
    seeds = 3 if method == "cotta" else None
    assert [c for c in calls if c[0] is not None] == [(3, s, r, seeds) for s, r in zip(range(3), restores)]
    assert_like_alone(model, start, batches, cfg, reports, states)


def test_one_image_tripping_a_guard_stops_and_rolls_back_only_itself():
    """A non-finite image in a group of three: its replica stops at its first step and is rolled
    back (parameters and norm statistics), frozen while the others adapt on, each as alone."""
    model, batches = make_model().eval(), images(4)
    batches[2] = batches[2].clone().fill_(float("nan"))
    start = copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only", stop_on_non_finite=True, rollback_on_stop=True)
    reports, states = parallel(model, batches, cfg, 3)
    assert [r.stop_reason for r in reports] == [None, None, "non_finite_metrics", None]
    assert_like_alone(model, start, batches, cfg, reports, states)
    for key, value in start.items():
        assert torch.equal(states[2][key], value), key  # rolled back to the start, untouched since


def test_a_total_update_guard_trips_for_some_images_of_a_group():
    """max_total_update_norm trips at the last step for two images of a group of four (their
    per-replica total update norms cross it, the others' stay below): each stops on its own."""
    model, batches = make_model().eval(), images(5)
    start = copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only", max_total_update_norm=0.2271)
    reports, states = parallel(model, batches, cfg, 4)
    assert [r.stop_reason for r in reports[1:]] == [None, None, "max_total_update_norm_exceeded",
                                                    "max_total_update_norm_exceeded"]
    assert_like_alone(model, start, batches, cfg, reports, states)


def test_shrunk_rtdetr_at_batch_one_keeps_the_norm_gradient_fix():
    """The builtin RT-DETR (shrunk) at batch 1: the per-image grads through vmap's folded batch
    norm equal the settled single-image ones (README difference 24), where the reference's
    unsettled batch-1 gradient is several percent off."""
    from yolozu.tta.integration import run_ttt as reference_run_ttt

    model, batches = tiny_rtdetr(), images(3, size=64)
    start = copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only", steps=2, lr=1e-4)
    reports, states = parallel(model, batches, cfg, 2)
    assert_like_alone(model, start, batches, cfg, reports, states)
    ref_model = copy.deepcopy(model)
    ref_model.load_state_dict(start)
    ref = reference_run_ttt(RecordAdapter(ref_model, batches), [{"i": 1}], config=cfg)
    ours = reports[1].step_metrics[0]["grad_norm"]
    assert abs(ref.step_metrics[0]["grad_norm"] - ours) > 0.01 * ours  # the case has the batch-1 error
    for i in (1, 2):  # the grouped images' first grads against a channels-last truth (read as laid out)
        truth = copy.deepcopy(model).train()
        truth.load_state_dict(start)
        params = select_parameters(truth, update_filter="norm_only")
        logits = truth(batches[i].contiguous(memory_format=torch.channels_last))["logits"]
        grads = torch.autograd.grad(entropy(logits), params)
        norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        assert reports[i].step_metrics[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_batch_1_gradients_per_image_match_fp64():
    """test_amp's TokenNet (a BN whose batch-1 gradient through ``flatten(2).transpose(1, 2)`` torch's
    CPU kernel gets wrong, README difference 24), three images at batch 1 in one group: each replica's
    first gradient equals that image's fp64 truth (BN in elementary ops), where the unsettled
    single-image kernel is over 10% off."""
    from test_amp import TokenNet, first_step_grads, fp64_norm_grads, rel_l2

    from yolozu_ttt.parallel import replica_method, run_group

    torch.manual_seed(0)
    model = TokenNet().eval()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(1, 3, 6, 5, generator=g) for _ in range(4)]
    cfg = method_config("tent", update_filter="norm_only", steps=1, max_grad_norm=None)
    start = copy.deepcopy(model)
    grads = {}

    def on_group(first, records, reports, replicas):
        assert replicas.names == ["bn.weight", "bn.bias"]
        grads.update({i: [v.grad[i].double() for v in replicas.values] for i in range(len(records))})

    with TTTSession(RecordAdapter(model, batches), cfg) as session:
        session.run([{"i": 0}])  # binds
        _, rmethod = replica_method(session, session.loop)
        run_group(session, [{"i": i} for i in (1, 2, 3)], None, 1, rmethod, on_group)
    for i in (1, 2, 3):
        truth = fp64_norm_grads(start, batches[i])
        assert rel_l2(grads[i - 1], truth) < 1e-5, i  # image i is the group's (i - 1)th
        assert rel_l2(first_step_grads(start, batches[i], torch.float32, settled=False), truth) > 0.1


@pytest.mark.parametrize("k, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_k_is_refused_before_any_work(k, error):
    model, batches = make_model().eval(), images(2)
    start = copy.deepcopy(model.state_dict())
    calls = []
    with TTTSession(RecordAdapter(model, batches), method_config("tent")) as session:
        with pytest.raises(error, match="k must be"):
            session.run_parallel([{"i": 0}, {"i": 1}], k, lambda *a: calls.append(a))
        assert session.loop is None
    assert not calls
    for key, value in start.items():
        assert torch.equal(model.state_dict()[key], value)


def test_what_cannot_run_k_at_once_runs_one_by_one_and_says_why():
    """Tent's aux-consistency term (a teacher forward and host metrics per image, not split per image
    yet): a warning naming it, then each record as alone."""
    model, batches = make_model().eval(), images(3)
    start = copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only", aux_depth_weight=0.5)
    with pytest.warns(ParallelFallbackWarning, match="tent's aux-consistency, teacher and detector-response"):
        reports, states = parallel(model, batches, cfg, 2)
    assert_like_alone(model, start, batches, cfg, reports, states, rtol=0.0, atol=0.0)


def test_a_group_whose_batches_differ_in_shape_runs_one_by_one_and_says_why():
    """Five records, K = 2: the group [3, 4] holds images of two sizes, so it runs one by one with a
    warning naming the shapes; the group before it runs at once; each record as alone."""
    model, batches = make_model().eval(), images(4) + images(1, size=16)
    start = copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only")
    with pytest.warns(ParallelFallbackWarning, match=r"adapts a group one by one: its records' batches differ in "
                                                     r"shape \(\[\(\(1, 3, 12, 12\),\), \(\(1, 3, 16, 16\),\)\]\)") as record:
        reports, states = parallel(model, batches, cfg, 2)
    assert len([w for w in record if issubclass(w.category, ParallelFallbackWarning)]) == 1
    assert_like_alone(model, start, batches, cfg, reports, states)


def test_bf16_groups_track_fp32_alone_within_the_derived_tolerance():
    """amp=bf16, tent/norm_only: every image of a group of three runs its forwards in bf16 (entries
    say so) and its losses stay within the derived bf16 tolerance of its fp32 run alone; its
    parameters are fp32 master weights."""
    from test_amp import TINYDET_BF16_DEPTH, trajectory_tolerance

    model, batches = make_model().eval(), images(4)
    start = copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParallelFallbackWarning)
        with TTTSession(RecordAdapter(model, batches), cfg, amp="bf16") as session:
            reports = session.run_parallel([{"i": i} for i in range(4)], 3)
    assert "forward" not in vars(model)
    alone = copy.deepcopy(model)
    for i, got in enumerate(reports):
        alone.load_state_dict(start)
        fp32 = yolozu_ttt.run_ttt(RecordAdapter(alone, batches), [{"i": i}], config=cfg)
        alone.load_state_dict(start)
        tol = trajectory_tolerance("tent", alone, [batches[i]], cfg, fp32, TINYDET_BF16_DEPTH)
        diffs = [abs(a - b) for a, b in zip(got.losses, fp32.losses)]
        assert len(diffs) == fp32.steps_run and all(d <= t for d, t in zip(diffs, tol)), (i, diffs, tol)
        assert max(diffs) > 1e-4 * max(fp32.losses)  # beyond fp32's tolerance: the passes ran in bf16
        assert all(e["amp"] == "bf16" for e in got.step_metrics)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---- update filters (every method, K at once) ---------------------------------------------
@pytest.mark.parametrize("update_filter", ["norm_only", "adapter_only", "lora_only", "lora_norm_only", "all"])
@pytest.mark.parametrize("method", ["tent", "eata", "sar"])
def test_every_update_filter_runs_k_at_once_as_alone(method, update_filter):
    """TinyDet (its LoRA block is what adapter_only / lora_only select; ``all``: every parameter a
    replica, nothing shared), groups of two, each record as alone."""
    model, batches = make_model().train(), images(4)
    start = copy.deepcopy(model.state_dict())
    cfg = method_config(method, update_filter=update_filter)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParallelFallbackWarning)
        reports, states = parallel(model, batches, cfg, 2)
    selected = select_parameters(model, update_filter=update_filter)
    assert reports[1].updated_param_count == sum(p.numel() for p in selected) > 0
    assert_like_alone(model, start, batches, cfg, reports, states)


@pytest.mark.parametrize("method", ["tent", "eata", "sar"])
def test_a_filter_selecting_nothing_is_refused_like_the_reference(method):
    """The shrunk RT-DETR has no adapter or LoRA module: the reference's error, no image reported."""
    from yolozu.tta.integration import run_ttt as reference_run_ttt

    model, batches = tiny_rtdetr(), images(2, size=64)
    cfg = method_config(method, update_filter="lora_only")
    with pytest.raises(Exception) as want:
        reference_run_ttt(RecordAdapter(copy.deepcopy(model), batches), [{"i": 0}], config=cfg)
    calls = []
    with TTTSession(RecordAdapter(model, batches), cfg) as session:
        with pytest.raises(type(want.value), match=f"^{want.value}$"):
            session.run_parallel([{"i": 0}, {"i": 1}], 2, lambda *a: calls.append(a))
    assert not calls


# ---- graph mode (ReplayedCalls, strict, stands in for CUDA graphs: conftest's ``replayed``) --------
GRAPH_CASES = {"tent": {}, "eata": {"eata_conf_min": 0.72, "eata_selected_ratio_min": 0.0}, "sar": {},
               "mim": {"seed": 3}, "cotta": {"cotta_restore_interval": 2, "cotta_restore_prob": 0.3, "seed": 1}}


@pytest.mark.parametrize("method", list(GRAPH_CASES))
def test_graph_mode_captures_once_per_k_and_inputs_and_replays_every_group(replayed, method):
    """Eight records in groups of two (the first alone, the last group of one), three steps: each as
    alone; the replica step is captured once per (K, input layouts: CoTTA's restore steps take their
    keys) whatever the number of groups, every key's first step eager (the warm-up), every later
    step a replay that runs the launches its capture ran (strict)."""
    model, batches = method_case(method)[0].eval(), images(8, size=32 if method == "mim" else 12)
    start = copy.deepcopy(model.state_dict())
    cfg = method_config(method, update_filter="norm_only", steps=3, **GRAPH_CASES[method])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParallelFallbackWarning)
        warnings.simplefilter("error", GraphFallbackWarning)
        reports, states = parallel(model, batches, cfg, 2, graph=True)
    graphs = replayed[-1]  # the replica step's (the first, the first image's StepGraph)
    keys = 2 * (2 if method == "cotta" else 1)  # K in {2, 1} x (CoTTA) restore steps and the others
    assert len(replayed) == 2 and len(graphs.captured) <= keys
    assert sum(g.replays for g in graphs.captured) == 4 * cfg.steps - keys  # 4 groups' steps, warm-ups eager
    assert_like_alone(model, start, batches, cfg, reports, states)


def test_graph_mode_one_image_tripping_a_guard_stops_only_itself(replayed):
    """A NaN image in the second group of three (its steps replayed): it stops and is rolled back on
    its own; the others adapt on, each as alone."""
    model, batches = make_model().eval(), images(7)
    batches[5] = batches[5].clone().fill_(float("nan"))
    start = copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only", stop_on_non_finite=True, rollback_on_stop=True)
    reports, states = parallel(model, batches, cfg, 3, graph=True)
    assert [r.stop_reason for r in reports] == [None] * 5 + ["non_finite_metrics", None]
    assert replayed[-1].captured[0].replays == 2 * cfg.steps - 1
    assert_like_alone(model, start, batches, cfg, reports, states)
    for key, value in start.items():
        assert torch.equal(states[5][key], value), key


def test_graph_mode_session_keeps_its_captures_across_calls(replayed):
    """A session's second run_parallel replays the first's captures (none new), with the same results."""
    model, batches = make_model().eval(), images(5)
    records = [{"i": i} for i in range(5)]
    with TTTSession(RecordAdapter(model, batches), method_config("eata", update_filter="norm_only"),
                    graph=True) as session:
        first = session.run_parallel(records, 2)
        captured = [len(g.captured) for g in replayed]
        second = session.run_parallel(records, 2)
    assert [len(g.captured) for g in replayed] == captured and captured[-1] == 1
    for a, b in zip(first, second):
        assert_reports_match(a, b, rtol=0.0, atol=0.0)


class ReadsAGain(torch.nn.Module):
    """TinyDet whose forward reads a scalar buffer on the host (a sync: not capturable)."""

    def __init__(self):
        super().__init__()
        self.det = make_model()
        self.register_buffer("gain", torch.tensor(0.5))

    def forward(self, x):
        out = self.det(x)
        return {**out, "logits": out["logits"] * float(self.gain)}


def test_graph_mode_step_that_reads_the_device_runs_eagerly_and_says_why(replayed):
    """The warm-up's probe sees the host read: a GraphFallbackWarning naming it, nothing captured for
    the groups, every image as alone."""
    model, batches = ReadsAGain().eval(), images(4)
    start = copy.deepcopy(model.state_dict())
    cfg = method_config("tent", update_filter="norm_only")
    with pytest.warns(GraphFallbackWarning, match=r"sample-parallel step: the step's passes wait for the device "
                                                  r"\(aten._local_scalar_dense x1\); the groups run eagerly"):
        reports, states = parallel(model, batches, cfg, 3, graph=True)
    assert not any(g.captured for g in replayed)  # the first image's StepGraph fell back too
    assert_like_alone(model, start, batches, cfg, reports, states)


def test_graph_mode_with_bf16_runs_the_groups_eagerly_and_says_so(replayed):
    """Mixed precision cannot be captured: a GraphFallbackWarning, the groups still K at once, as an
    eager bf16 session's."""
    model, batches = make_model().eval(), images(3)
    cfg = method_config("tent", update_filter="norm_only")
    runs = []
    for graph in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs.append(parallel(copy.deepcopy(model), batches, cfg, 2, amp="bf16", graph=graph)[0])
        said = [str(w.message) for w in caught if issubclass(w.category, (GraphFallbackWarning, ParallelFallbackWarning))]
        assert any("sample-parallel step: mixed precision (bf16)" in m for m in said) == graph, said
        assert not any(issubclass(w.category, ParallelFallbackWarning) for w in caught)
    assert not replayed
    for a, b in zip(*runs):
        assert_reports_match(a, b, rtol=0.0, atol=0.0)



def test_a_plain_group_warns_nothing_in_a_fresh_process():
    """The replicas' grads are strided views of one flat buffer (as the leaves are of another): torch's
    once-per-process note on that layout is not the user's business. A fresh process (torch warns
    it once) adapting a group with every warning an error runs clean."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, yolozu_ttt\n"
        "from conftest import make_model, method_config\n"
        "from test_parallel import images, RecordAdapter\n"
        "from yolozu_ttt.run import TTTSession\n"
        "batches = images(3)\n"
        "with TTTSession(RecordAdapter(make_model().eval(), batches), method_config('sar')) as s:\n"
        "    s.run_parallel([{'i': i} for i in range(3)], 2)\n"
        "print('clean')\n")
    tests = Path(__file__).parent
    proc = subprocess.run([sys.executable, "-c", script], cwd=tests, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "clean", proc.stderr[-3000:]
