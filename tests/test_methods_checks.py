"""yolozu_ttt.methods.checks: the reference's set-up checks without a torch optimizer, against
torch.optim.Adam and YOLOZU's TentRunner; and a fast run that never imports torch._dynamo."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import make_model
from yolozu.tta.tent import TentConfig, TentRunner

from yolozu_ttt.methods.checks import check_adam, tent_selection


def outcome(fn):
    """(exception type, message) of ``fn()``, or None where it returns."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except Exception as exc:  # noqa: BLE001 - the point is which one
        return type(exc), str(exc)
    return None


LRS = [1e-3, 0.0, -0.0, -1.0, -1e-30, math.inf, -math.inf, math.nan, torch.tensor(-1.0), torch.tensor(1e-3), 1, -2]


@pytest.mark.parametrize("lr", LRS, ids=repr)
@pytest.mark.parametrize("params", ["leaves", "empty", "duplicate", "non_leaf", "not_a_tensor"])
def test_check_adam_raises_what_adam_raises(params, lr):
    w = torch.nn.Parameter(torch.ones(3))
    got = {"leaves": [w, torch.nn.Parameter(torch.zeros(2))], "empty": [], "duplicate": [w, w],
           "non_leaf": [w * 2], "not_a_tensor": [w, 1.0]}[params]
    assert outcome(lambda: check_adam(got, lr)) == outcome(lambda: torch.optim.Adam(got, lr=lr))


CONFIGS = {
    "default": {},
    "all": {"update_filter": "all", "lr": 1e-2},
    "aux": {"aux_pose_weight": 0.5},
    "aux_zero": {"aux_depth_weight": 0.0},
    "response": {"detector_response": True},
    "response_bad_conf": {"detector_response": True, "response_conf_min": 1.5},
    "response_bad_min": {"detector_response": True, "response_min_selected": 0},
    "response_bad_topk": {"detector_response": True, "response_topk": 1, "response_min_selected": 3},
    "bad_conf_off": {"response_conf_min": 1.5},
    "negative_lr": {"lr": -1.0},
    "nan_lr": {"lr": math.nan},
    "nothing": {"include": ["no_such_param"]},
    "bad_filter": {"update_filter": "weird"},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tent_selection_is_tent_runners(name):
    """The same parameters (the same tensors, in order), count and loss terms, or the same error."""
    model, tc = make_model(), TentConfig(**CONFIGS[name])
    ref, got = {}, {}
    ref_error = outcome(lambda: ref.setdefault("runner", TentRunner(model, config=tc)))
    got_error = outcome(lambda: got.setdefault("chosen", tent_selection(model, tc)))
    assert got_error == ref_error
    if ref_error is None:
        runner, chosen = ref["runner"], got["chosen"]
        assert [id(p) for p in chosen.params] == [id(p) for p in runner.params]
        assert chosen.updated_param_count == runner.updated_param_count
        assert (chosen.has_aux, chosen.has_teacher) == (runner._has_aux, runner._has_teacher)


PROBE = textwrap.dedent("""
    import sys
    from conftest import ListAdapter, make_batches, make_model
    from yolozu.tta.config import TTTConfig
    import yolozu_ttt
    from yolozu.tta.integration import run_ttt as reference
    backend = yolozu_ttt.run_ttt if sys.argv[1] == "fast" else reference
    from test_methods_mim import SHAPE, ReconNet, make_model as mim_model
    for method in ("tent", "eata", "sar", "cotta", "mim"):
        model, batches = (mim_model(ReconNet), make_batches(1, shape=SHAPE)) if method == "mim" else \
            (make_model(), make_batches())
        report = backend(ListAdapter(model, batches), [], config=TTTConfig(
            enabled=True, method=method, steps=1, max_batches=1, lr=1e-3, update_filter="all"))
        assert report.steps_run == 1, (method, report)
    if sys.argv[1] == "fast":  # and K at once: the loss ops' batching rules under vmap
        from support_models import method_case, method_config
        from yolozu_ttt.floor import RecordAdapter
        from yolozu_ttt.parallel import ParallelFallbackWarning
        from yolozu_ttt.run import TTTSession
        import warnings
        warnings.simplefilter("error", ParallelFallbackWarning)
        for method in ("tent", "eata", "sar", "cotta", "mim"):
            model, batches = method_case(method)
            cfg = method_config(method, update_filter="norm_only", steps=1, max_batches=1)
            with TTTSession(RecordAdapter(model, [b[:1] for b in batches]), cfg) as session:
                reports = session.run_parallel([{"i": i} for i in range(len(batches))], 2)
            assert len(reports) == len(batches) and reports[-1].steps_run == 1, (method, reports)
    print("torch._dynamo" in sys.modules)
""")


@pytest.mark.parametrize("backend,imports", [("fast", False), ("reference", True)])
def test_a_fast_run_never_imports_dynamo(backend, imports):
    """Every method's fast run in a fresh process, alone and K at once (the loss ops under vmap:
    ``ops._CustomOp``), leaves ``torch._dynamo`` unimported (~1 s of a short export's start-up);
    the reference's, which builds a torch.optim.Adam, imports it."""
    tests = str(__import__("pathlib").Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", PROBE, backend], capture_output=True, text=True, cwd=tests,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(imports)
