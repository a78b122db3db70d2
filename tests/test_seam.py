"""The one seam to YOLOZU (yolozu_ttt.seam): every private name listed, checked at import, one message."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from yolozu_ttt import seam

PACKAGE = Path(seam.__file__).parent
# how the package names YOLOZU's modules when it reaches into them
ALIASES = {"_ref": "yolozu.tta.integration", "_tent": "yolozu.tta.tent", "_mim": "yolozu.tta.ttt_mim",
           "integration": "yolozu.tta.integration", "tent": "yolozu.tta.tent", "ttt_mim": "yolozu.tta.ttt_mim"}


def _private_uses() -> set[tuple[str, str]]:
    uses = set()
    for path in PACKAGE.rglob("*.py"):
        for alias, name in re.findall(r"\b(_ref|_tent|_mim)\.(_\w+)", path.read_text(encoding="utf-8")):
            uses.add((ALIASES[alias], name))
    return uses


def test_every_private_yolozu_name_the_package_uses_is_in_the_seam():
    uses = _private_uses()
    assert ("yolozu.tta.integration", "_take_batches") in uses  # the scan finds them
    listed = {(module, name) for module, names in seam.PRIVATE.items() for name in names}
    assert uses <= listed, sorted(uses - listed)
    assert seam.missing_names() == []


def test_supported_versions_match_pyproject():
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"yolozu{seam.SUPPORTED_YOLOZU}"' in pyproject


def _import_without(module: str, name: str, what: str = "from yolozu_ttt import run_ttt") -> subprocess.CompletedProcess:
    code = f"import importlib; m = importlib.import_module({module!r}); delattr(m, {name!r}); {what}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,name", [("yolozu.tta.integration", "_take_batches"),
                                         ("yolozu.tta.tent", "_extract_outputs"),
                                         ("yolozu.inference.export_predictions_cli", "build_manifest")])
def test_a_yolozu_lacking_one_name_fails_with_the_one_message(module, name):
    res = _import_without(module, name)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    import yolozu

    import yolozu_ttt

    assert last == (f"yolozu_ttt.seam.UnsupportedYolozu: yolozu-ttt {yolozu_ttt.__version__} supports yolozu "
                    f"{seam.SUPPORTED_YOLOZU}; the installed yolozu {yolozu.__version__} lacks {module}.{name}: "
                    f"install a supported yolozu (pip install 'yolozu{seam.SUPPORTED_YOLOZU}')")
    assert "AttributeError" not in res.stderr


def test_the_command_line_says_it_in_one_line():
    """`yolozu-ttt` on a YOLOZU lacking a name: exit 2 and the one message, no traceback."""
    res = _import_without("yolozu.tta.integration", "_take_batches",
                          "import sys; from yolozu_ttt.cli import main; sys.exit(main(['doctor']))")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("yolozu-ttt: error: yolozu-ttt ")
    assert "lacks yolozu.tta.integration._take_batches" in lines[0] and seam.SUPPORTED_YOLOZU in lines[0]


def test_export_does_not_import_the_cli():
    res = subprocess.run([sys.executable, "-c", "import sys, yolozu_ttt.export; print('yolozu_ttt.cli' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_rebound_restores_on_failure():
    from yolozu_ttt.seam import export_cli

    real = export_cli.build_manifest
    with pytest.raises(RuntimeError):
        with seam.rebound(export_cli, build_manifest=None):
            assert export_cli.build_manifest is None
            raise RuntimeError
    assert export_cli.build_manifest is real


# ---- a batched prediction into YOLOZU's decoding (seam.AnsweredForward) ---------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shrunk RT-DETR and its 16 images (as tests/test_export.py's)."""
    import support_export

    return support_export.tiny_export_data(tmp_path_factory.mktemp("seam"))


def _adapter(tiny, **kw):
    from yolozu.inference.adapter import RTDETRPoseAdapter

    return RTDETRPoseAdapter(config_path=str(tiny["config"]), checkpoint_path=str(tiny["checkpoint"]),
                             image_size=(64, 64), score_threshold=0.0, max_detections=3, **kw)


def _records(tiny, n: int) -> list[dict]:
    return [{"image": str(p)} for p in sorted((tiny["dataset"] / "images" / "val").glob("*.png"))[:n]]


def _model_calls(model) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_an_answered_predict_is_yolozus_decoding_of_the_answer(tiny):
    """YOLOZU's own predict with its model call answered: the model does not run, the predictions are
    exactly what predict gives when the model returns that output (the model's own, on the record's
    input), and another image's output is decoded as that image's; the slot holds the model again
    after the call and the model itself is untouched."""
    import torch

    adapter = _adapter(tiny)
    model = adapter.get_model().eval()
    a, b = _records(tiny, 2)
    xa, xb = (next(iter(adapter.build_loader([r]))) for r in (a, b))
    want_a, want_b = adapter.predict([a]), adapter.predict([b])
    with torch.no_grad():
        out_a, out_b = model(xa), model(xb)
    calls = _model_calls(model)
    assert seam.answerable(adapter)
    answer = seam.AnsweredForward(adapter, xa, out_a)
    assert answer.pending and answer.answered is None
    assert adapter.predict([a]) == want_a
    assert answer.answered is True and not answer.pending and calls == []
    assert adapter.get_model() is model and "forward" not in vars(model)
    seam.AnsweredForward(adapter, xa, out_b)  # decodes what it is handed: image b's output
    got = adapter.predict([a])
    assert calls == [] and [e["detections"] for e in got] == [e["detections"] for e in want_b]
    assert got != want_a


def test_an_answer_runs_the_model_for_any_other_call(tiny):
    """Another input, the model in training mode, or keywords: the model runs (answered False) and
    the slot holds it again; an answer not called is taken back by close(); predict under autocast or
    torch.compile, an adapter not built, or one without the slot is not answerable."""
    import torch

    adapter = _adapter(tiny)
    model = adapter.get_model().eval()
    a, b = _records(tiny, 2)
    xa, xb = (next(iter(adapter.build_loader([r]))) for r in (a, b))
    want_b = adapter.predict([b])
    with torch.no_grad():
        out_a = model(xa)
    calls = _model_calls(model)
    answer = seam.AnsweredForward(adapter, xa, out_a)
    assert adapter.predict([b]) == want_b and answer.answered is False and calls == [1]
    assert adapter.get_model() is model
    answer = seam.AnsweredForward(adapter, xa, out_a)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        assert adapter.get_model()(xa) is not out_a and answer.answered is False and len(calls) == 2
    finally:
        model.eval()
        model.load_state_dict(state)  # the training forward moved the norm statistics
    answer = seam.AnsweredForward(adapter, xa, out_a)
    answer.close()
    answer.close()
    assert adapter.get_model() is model and adapter.predict([b]) == want_b
    assert not seam.answerable(_adapter(tiny, amp="bf16")) and not seam.answerable(_adapter(tiny, compile_model=True))
    assert not seam.answerable(_adapter(tiny))  # not built: its predict builds the model first
    from yolozu.adapter import DummyAdapter

    assert not seam.answerable(DummyAdapter())


def test_a_group_predicted_at_once_decodes_as_yolozus_predict_on_each_adapted_state(tiny):
    """The export's path: a GroupDriver adapts four records (the first alone, then a group of three)
    and hands each out with its replica loaded and its row of the group's batched eval forward;
    YOLOZU's predict answered with that row gives YOLOZU's own predict of the same adapted state
    (the CLI's tolerance for a batched forward against a single one), without running the model."""
    from yolozu.tta.config import TTTConfig

    from support_parity import max_prediction_diff
    from yolozu_ttt.groups import GroupDriver
    from yolozu_ttt.run import TTTSession

    adapter = _adapter(tiny)
    model = adapter.get_model().eval()
    records = _records(tiny, 4)
    config = TTTConfig(enabled=True, method="tent", reset="sample", steps=1, update_filter="norm_only", lr=0.01)
    calls = _model_calls(model)
    answered = []
    with TTTSession(adapter, config) as session:
        driver = GroupDriver(session, 3, predict=seam.answerable(adapter), singles_alone=True)
        driver.plan(records)
        for i, record in enumerate(records):
            handout = driver.take(i)
            want = adapter.predict([record])  # YOLOZU's own, the model holding image i's adapted state
            assert (handout.output is None) == (i == 0)
            if handout.output is None:
                continue
            answer = seam.AnsweredForward(adapter, handout.x, handout.output)
            before = len(calls)
            got = adapter.predict([record])
            answered.append(answer.answered and len(calls) == before)
            assert max_prediction_diff(want, got) <= 1e-4, i
    assert answered == [True, True, True]
