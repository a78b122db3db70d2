"""yolozu-ttt CLI: export-predictions (YOLOZU's CLI + --ttt-backend) and doctor."""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import max_prediction_diff

import yolozu_ttt
from yolozu_ttt import cli

EXPORT = "yolozu.inference.export_predictions_cli"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict[str, Path]:
    """Synthetic labeled dataset + a fixed checkpoint of the builtin RT-DETR (init_seed=0)."""
    torch = pytest.importorskip("torch")
    from yolozu.demos.labeled_dataset import generate_labeled_sample
    from yolozu.inference.adapter import RTDETRPoseAdapter

    root = tmp_path_factory.mktemp("cli")
    generate_labeled_sample(run_dir=root / "ds", seed=0)
    model = RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model()
    torch.save(model.state_dict(), root / "ckpt.pt")
    return {"root": root, "dataset": root / "ds", "checkpoint": root / "ckpt.pt"}


def _rtdetr_args(sample: dict[str, Path]) -> list[str]:
    # smallest configuration that runs quickly: 2 images at 64x64, 3 detections each
    return [
        "--adapter", "rtdetr_pose", "--config", "builtin:base", "--checkpoint", str(sample["checkpoint"]),
        "--dataset", str(sample["dataset"]), "--split", "val", "--max-images", "2", "--image-size", "64",
        "--score-threshold", "0.0", "--max-detections", "3",
    ]


def _yolozu_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """YOLOZU's own export CLI, as YOLOZU's orchestrator runs it."""
    return subprocess.run([sys.executable, "-m", EXPORT, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def _export_module():
    import importlib

    return importlib.import_module(EXPORT)


def _assert_export_module_untouched():
    import yolozu.tta.cli_options as cli_options
    import yolozu.tta.integration as integration

    mod = _export_module()
    assert mod.run_ttt is integration.run_ttt
    assert mod.build_ttt_settings_from_args is cli_options.build_ttt_settings_from_args
    assert mod._parse_args.__module__ == EXPORT
    assert mod.argparse is argparse


# ---------------------------------------------------------------------------------------
# help / parser
# ---------------------------------------------------------------------------------------
def test_help_lists_backend_and_every_yolozu_flag(capsys):
    from yolozu.tta.cli_options import add_ttt_arguments

    with pytest.raises(SystemExit) as exc:
        cli.main(["export-predictions", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--ttt-backend {reference,fast}" in out

    ttt_only = argparse.ArgumentParser()
    add_ttt_arguments(ttt_only, include_enable_flag=True)
    yolozu_flags = {s for a in ttt_only._actions for s in a.option_strings if s.startswith("--")}
    assert {"--ttt", "--ttt-reset", "--ttt-method", "--ttt-log-out", "--ttt-update-filter"} <= yolozu_flags
    for flag in sorted(yolozu_flags):
        assert flag in out, flag
    # the whole of YOLOZU's export parser is there, not just its TTT flags
    ours = cli.build_export_parser()
    ours_flags = {s for a in ours._actions for s in a.option_strings}
    for flag in ("--adapter", "--dataset", "--wrap", "--tta", "--torch-compile", "--lora-r", "--checkpoint"):
        assert flag in ours_flags and flag in out
    assert yolozu_flags <= ours_flags
    _assert_export_module_untouched()


def test_console_entry_points(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "yolozu_ttt", "export-predictions", "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "--ttt-backend" in res.stdout and "--ttt-reset" in res.stdout
    res = subprocess.run([sys.executable, "-m", "yolozu_ttt", "--help"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0
    for command in ("export-predictions", "export", "demo", "doctor"):
        assert command in res.stdout
    assert cli.main(["no-such-command"]) == 2


def test_parsing_matches_yolozu(sample):
    """Our parser is YOLOZU's parser + --ttt-backend: same namespace, same abbreviations."""
    import yolozu.tta.cli_options  # noqa: F401

    mod = _export_module()
    argv = [*_rtdetr_args(sample), "--ttt", "--ttt-reset", "sample", "--ttt-ba", "2", "--ttt-ste", "3", "--wrap"]
    captured = {}
    real_parse_args = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        captured["ns"] = real_parse_args(self, args, namespace)
        raise SystemExit(0)

    argparse_module = mod.argparse
    try:
        argparse.ArgumentParser.parse_args = grab  # YOLOZU's own parsing of the same argv
        with pytest.raises(SystemExit):
            mod._parse_args(argv)
    finally:
        argparse.ArgumentParser.parse_args = real_parse_args
    assert argparse_module is argparse
    theirs = vars(captured["ns"])
    ours = vars(cli.build_export_parser().parse_args([*argv, "--ttt-backend", "fast"]))
    assert ours.pop("ttt_backend") == "fast"
    assert ours == theirs
    assert ours["ttt_batch_size"] == 2 and ours["ttt_steps"] == 3
    assert cli.build_export_parser().parse_args(["--ttt-backe", "fast"]).ttt_backend == "fast"


def test_backend_choices_are_validated(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["export-predictions", "--ttt-backend", "turbo"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    _assert_export_module_untouched()


# ---------------------------------------------------------------------------------------
# zero impact
# ---------------------------------------------------------------------------------------
def test_zero_impact_without_ttt_byte_identical(sample, tmp_path, one_thread, capsys):
    """Without --ttt the published file is YOLOZU's bytes (written to a temporary file and renamed
    into place), and the line printed names it as YOLOZU's does."""
    args = _rtdetr_args(sample)
    theirs = tmp_path / "yolozu.json"
    res = _yolozu_cli([*args, "--output", str(theirs)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{theirs}\n"
    for backend in ("reference", "fast"):  # without --ttt the backend flag has no effect
        ours = tmp_path / f"ours_{backend}.json"
        ours.write_text("an earlier export")
        capsys.readouterr()
        assert cli.main(["export-predictions", *args, "--ttt-backend", backend, "--output", str(ours)]) == 0
        assert ours.read_bytes() == theirs.read_bytes(), backend
        assert capsys.readouterr().out == f"{ours}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours_fast.json", "ours_reference.json", "yolozu.json"]
    _assert_export_module_untouched()


@pytest.mark.slow
def test_ttt_reference_identical_and_fast_within_tolerance(sample, tmp_path, monkeypatch, fast_backend_calls,
                                                                 one_thread):
    """--ttt --ttt-reset sample: reference == YOLOZU byte for byte; fast close to it, recorded as fast.

    With --torch-channels-last: at batch 1 torch's CPU batch-norm backward is wrong for the
    contiguous layout YOLOZU hands the model by default (README, "Differences from the reference"),
    which the fast backend corrects and the reference does not; channels_last takes the kernel's
    correct path in both, so the two compute the same gradients."""
    args = [*_rtdetr_args(sample), "--ttt", "--ttt-reset", "sample", "--ttt-steps", "2",
            "--ttt-update-filter", "norm_only", "--ttt-seed", "0", "--torch-channels-last"]

    theirs, theirs_log = tmp_path / "yolozu.json", tmp_path / "yolozu_log.json"
    res = _yolozu_cli([*args, "--output", str(theirs), "--ttt-log-out", str(theirs_log)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr

    ref, ref_log = tmp_path / "ref.json", tmp_path / "ref_log.json"
    assert cli.main(["export-predictions", *args, "--output", str(ref), "--ttt-log-out", str(ref_log)]) == 0
    assert ref.read_bytes() == theirs.read_bytes()
    ref_ttt, theirs_ttt = json.loads(ref_log.read_text())["ttt"], json.loads(theirs_log.read_text())["ttt"]
    assert "backend" not in ref_ttt and "engine" not in ref_ttt
    assert set(ref_ttt) == set(theirs_ttt)

    # fast: every per-record call YOLOZU makes goes through the fast backend
    fast, fast_log = tmp_path / "fast.json", tmp_path / "fast_log.json"
    assert cli.main(["export-predictions", *args, "--ttt-backend", "fast", "--wrap",
                     "--output", str(fast), "--ttt-log-out", str(fast_log)]) == 0
    _assert_export_module_untouched()
    assert [len(records) for records in fast_backend_calls] == [1, 1]  # sample reset: one call per record

    payload = json.loads(fast.read_text())
    meta_ttt = payload["meta"]["ttt"]
    assert meta_ttt["backend"] == "fast"
    engine = meta_ttt["engine"]
    for key in ("version", "cpp_extension", "openmp", "threads", "accelerated_methods"):
        assert key in engine
    assert engine["method"] == "tent"
    assert engine["engine"] == "fast" and engine["backend"] == "cpp"  # what actually ran
    log_ttt = json.loads(fast_log.read_text())["ttt"]
    assert log_ttt["backend"] == "fast" and log_ttt["engine"] == engine

    ref_preds = json.loads(ref.read_text())
    assert max_prediction_diff(ref_preds, payload["predictions"]) <= 1e-4
    fast_report, ref_report = meta_ttt["report"], ref_ttt["report"]
    assert fast_report["mode"] == ref_report["mode"] == "sample"
    assert fast_report["samples_total"] == ref_report["samples_total"] == 2
    for s_fast, s_ref in zip(fast_report["per_sample"], ref_report["per_sample"]):
        lf, lr = s_fast["report"]["losses"], s_ref["report"]["losses"]
        assert len(lf) == len(lr) == 2
        for a, b in zip(lf, lr):
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)


# ---------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------
def test_dummy_adapter_ttt_fails_like_yolozu(sample, tmp_path, monkeypatch):
    base = ["--adapter", "dummy", "--dataset", str(sample["dataset"]), "--split", "val", "--ttt"]
    mod = _export_module()
    with pytest.raises(SystemExit) as theirs:
        mod.main([*base, "--output", str(tmp_path / "theirs.json")])
    message = str(theirs.value.code)
    assert message.startswith("TTT failed: ")

    for backend in ("reference", "fast"):
        out = tmp_path / f"{backend}.json"
        with pytest.raises(SystemExit) as ours:
            cli.main(["export-predictions", *base, "--ttt-backend", backend, "--output", str(out)])
        assert str(ours.value.code) == message, backend
        assert not out.exists()
        _assert_export_module_untouched()

    # the exit status of the console script is YOLOZU's (1, message on stderr)
    res = subprocess.run(
        [sys.executable, "-m", "yolozu_ttt", "export-predictions", *base, "--ttt-backend", "fast",
         "--output", str(tmp_path / "sub.json")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 1
    assert message in res.stderr


def test_fast_failure_inside_run_ttt_uses_yolozu_handler(sample, tmp_path, monkeypatch):
    def boom(adapter, records, *, config, **_):
        raise RuntimeError("simulated engine failure")

    monkeypatch.setattr(yolozu_ttt, "run_ttt", boom)
    monkeypatch.setattr(yolozu_ttt.run.TTTSession, "run",  # a prepared session's runs
                        lambda self, records: boom(self.adapter, records, config=self.config))
    with pytest.raises(SystemExit) as exc:
        cli.main(["export-predictions", *_rtdetr_args(sample), "--ttt", "--ttt-backend", "fast",
                  "--ttt-update-filter", "norm_only", "--output", str(tmp_path / "x.json")])
    assert str(exc.value.code).startswith("TTT failed: simulated engine failure")
    assert "update_filter=norm_only" in str(exc.value.code)  # YOLOZU's own diagnostic suffix
    _assert_export_module_untouched()


# ---------------------------------------------------------------------------------------
# FastBackend reuse across records (--ttt-reset sample)
# ---------------------------------------------------------------------------------------
class _FakeAdapter:
    def __init__(self):
        self.model = object()

    def get_model(self):
        return self.model


def test_fast_backend_reuses_prepared_session(monkeypatch):
    import types

    built, ran = [], []

    class Session:
        def run(self, records):
            ran.append(records)
            return "report"

    def prepare_session(adapter, config):
        built.append((adapter, config))
        return Session()

    from yolozu_ttt import run as run_module
    monkeypatch.setattr(run_module, "prepare_session", prepare_session, raising=False)
    backend = cli.FastBackend()
    adapter, config = _FakeAdapter(), types.SimpleNamespace(enabled=True, method="tent")
    for i in range(3):
        assert backend(adapter, [{"image": str(i)}], config=config) == "report"
    assert len(built) == 1 and len(ran) == 3 and backend.calls == 3
    first = backend.engine("tent")
    assert first == backend.engine("tent") and first["method"] == "tent"


def test_fast_backend_without_session_calls_run_ttt(monkeypatch):
    seen = []
    from yolozu_ttt import run as run_module
    monkeypatch.delattr(run_module, "prepare_session", raising=False)
    monkeypatch.setattr(yolozu_ttt, "run_ttt", lambda a, r, *, config: seen.append(r) or "rep")
    backend = cli.FastBackend()
    for i in range(2):
        assert backend(_FakeAdapter(), [i], config=object()) == "rep"
    assert seen == [[0], [1]]


# ---------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------
def test_doctor_ok(capsys):
    from yolozu_ttt import _native

    if _native._C is None:
        pytest.skip(f"compiled extension not built here: {_native.LOAD_ERROR}")
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "compiled extension : loaded" in out
    assert "OpenMP" in out and "Triton" in out and "CUDA" in out and "accelerated methods" in out
    assert cli.main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpp_extension"] is True and info["cpp_extension_error"] is None


def test_doctor_reports_threads_yolozu_range_and_gpu_engine(monkeypatch, capsys):
    import importlib.util

    import torch
    import yolozu

    from yolozu_ttt import _native, common, seam

    cli.main(["doctor", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["engine_threads"] == (_native._C.num_threads() if _native._C is not None else 1)
    assert info["yolozu"] == yolozu.__version__ and info["yolozu_supported"] == seam.SUPPORTED_YOLOZU == ">=4.12,<5"
    assert info["yolozu_in_range"] is True
    assert info["gpu_update_engine"] == ("triton" if importlib.util.find_spec("triton") else None)

    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    monkeypatch.setattr(common, "HAVE_TRITON", False)
    for version, verdict in (("5.0.0", "NOT supported"), ("4.11.2", "NOT supported"), ("4.13.1", "supported")):
        monkeypatch.setattr(yolozu, "__version__", version)
        cli.main(["doctor"])
        out = capsys.readouterr().out
        assert f"yolozu             : {version} ({verdict}; this release supports yolozu>=4.12,<5)" in out
        assert "threads in use     : torch 7 (model passes)" in out
        assert "a GPU run uses     : no Triton kernels" in out
    cli.main(["doctor", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["yolozu_in_range"] is True and info["gpu_update_engine"] is None and info["torch_threads"] == 7


def test_doctor_fails_when_extension_missing(monkeypatch, capsys):
    from yolozu_ttt import _native

    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "LOAD_ERROR", "ImportError: simulated missing _C")
    assert cli.main(["doctor"]) == 1
    captured = capsys.readouterr()
    assert "FAILED to load" in captured.out
    assert "simulated missing _C" in captured.out and "simulated missing _C" in captured.err
    assert cli.main(["doctor", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["cpp_extension"] is False


def test_engine_record_names_the_reference_when_the_engine_cannot_run(sample, tmp_path, monkeypatch):
    """--ttt-backend fast on an install without the compiled extension: the reference runs, a
    ReferenceFallbackWarning says why, and the meta and log record engine=reference with the reason."""
    from yolozu_ttt import _native, run

    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "LOAD_ERROR", "ImportError: no _C in the source tree")
    out, log = tmp_path / "fast.json", tmp_path / "fast_log.json"
    args = [*_rtdetr_args(sample), "--ttt", "--ttt-steps", "1", "--ttt-update-filter", "norm_only"]
    with pytest.warns(run.ReferenceFallbackWarning, match="yolozu_ttt._C did not load"):
        assert cli.main(["export-predictions", *args, "--ttt-backend", "fast", "--wrap", "--output", str(out),
                         "--ttt-log-out", str(log)]) == 0
    for ttt in (json.loads(out.read_text())["meta"]["ttt"], json.loads(log.read_text())["ttt"]):
        assert ttt["backend"] == "fast"
        assert ttt["engine"]["engine"] == "reference" and "no _C in the source tree" in ttt["engine"]["reason"]


# ---------------------------------------------------------------------------------------
# --ttt-parallel K
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A shrunk RT-DETR and 16 distinct 64x64-exportable images (as tests/test_export.py's)."""
    import support_export

    return support_export.tiny_export_data(tmp_path_factory.mktemp("parallel"))


def _tiny_args(tiny, n: int, **kw) -> list[str]:
    import support_export

    return support_export.export_args(tiny, reset="sample", n=n, **kw)


def _nothing_written(out: Path) -> None:
    assert not out.exists() and not Path(str(out) + ".lock").exists() and not Path(str(out) + ".parts").exists()
    assert not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("extra, message", [
    (["--ttt-parallel", "0"], "--ttt-parallel must be >= 1 (got 0)"),
    (["--ttt-parallel", "-3"], "--ttt-parallel must be >= 1 (got -3)"),
    (["--ttt-parallel", "1.5"], "argument --ttt-parallel: invalid int value: '1.5'"),
    (["--ttt-parallel", "two"], "argument --ttt-parallel: invalid int value: 'two'"),
    (["--ttt-parallel", "2", "--ttt-reset", "stream"], "--ttt-parallel 2 needs --ttt-reset sample: stream mode"),
    (["--ttt-parallel", "2", "--ttt-backend", "reference"], "--ttt-parallel 2 needs --ttt-backend fast"),
    (["--ttt-parallel", "4", "--ttt-backend", "reference", "--resume"], "--ttt-parallel 4 needs --ttt-backend fast"),
])
def test_parallel_usage_errors_write_nothing(tiny, tmp_path, capsys, monkeypatch, extra, message):
    """Bad K, K > 1 in stream mode or on the reference backend: a usage error (exit 2), before any
    work: no output, no lock, no part files."""
    calls = []
    monkeypatch.setattr(cli.FastBackend, "__call__", lambda *a, **k: calls.append(1))
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exc:
        cli.main(["export-predictions", *_tiny_args(tiny, 2), *extra, "--output", str(out),
                  "--ttt-log-out", str(tmp_path / "log.json")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert calls == []
    _nothing_written(out)
    assert not (tmp_path / "log.json").exists()


def _export(tiny, tmp_path: Path, name: str, n: int, extra: list[str]) -> tuple[dict, dict]:
    out, log = tmp_path / f"{name}.json", tmp_path / f"{name}_log.json"
    assert cli.main(["export-predictions", *_tiny_args(tiny, n), *extra, "--output", str(out),
                     "--ttt-log-out", str(log)]) == 0
    return json.loads(out.read_text()), json.loads(log.read_text())


def _assert_sample_reports_close(a: dict, b: dict) -> None:
    """Two sample-mode reports, image by image: the same steps, stops and counters, losses and step
    metrics within the CLI's tolerance."""
    assert a["samples_total"] == b["samples_total"] and len(a["per_sample"]) == len(b["per_sample"])
    for sa, sb in zip(a["per_sample"], b["per_sample"]):
        ra, rb = sa["report"], sb["report"]
        assert (sa["index"], sa["image"]) == (sb["index"], sb["image"])
        for key in ("steps_run", "stopped_early", "stop_reason", "forward_calls", "backward_calls", "optimizer_steps",
                    "abstained_steps", "updated_param_count", "warnings"):
            assert ra[key] == rb[key], key
        for x, y in zip([*ra["losses"]], [*rb["losses"]]):
            assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5)
        assert len(ra["step_metrics"]) == len(rb["step_metrics"])
        for ma, mb in zip(ra["step_metrics"], rb["step_metrics"]):
            assert set(ma) == set(mb)
            for key, value in ma.items():
                if isinstance(value, float):
                    assert math.isclose(value, mb[key], rel_tol=1e-4, abs_tol=1e-5), key
                else:
                    assert value == mb[key], key


@pytest.mark.parametrize("k", [2, 3])
def test_parallel_k_equals_one_image_at_a_time(tiny, tmp_path, monkeypatch, k):
    """--ttt-parallel K over 6 images (the first alone, then groups of K, the last one smaller):
    the predictions and every --ttt-log-out entry are K = 1's within the CLI's tolerances; the
    grouped images are predicted from the replicas' one batched forward (YOLOZU's predict is
    answered with its row), and the K that ran is recorded next to the engine."""
    from yolozu_ttt.parallel import ParallelFallbackWarning

    n = 6
    one, one_log = _export(tiny, tmp_path, "k1", n, [])
    none, _ = _export(tiny, tmp_path, "none", n, ["--ttt-parallel", "1"])
    assert max_prediction_diff(one["predictions"], none["predictions"]) == 0.0  # K = 1 is today's path

    from yolozu_ttt.seam import AnsweredForward

    answered, real_answer = [], AnsweredForward.__call__

    def spy(self, *args, **kwargs):
        got = real_answer(self, *args, **kwargs)
        answered.append(self.answered and got is self.output)
        return got

    monkeypatch.setattr(AnsweredForward, "__call__", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParallelFallbackWarning)
        got, got_log = _export(tiny, tmp_path, f"k{k}", n, ["--ttt-parallel", str(k)])
    grouped = n - 1 - (1 if (n - 1) % k == 1 else 0)  # a last group of one runs alone
    assert answered == [True] * grouped
    assert max_prediction_diff(one["predictions"], got["predictions"]) <= 1e-4
    _assert_sample_reports_close(one_log["ttt"]["report"], got_log["ttt"]["report"])
    _assert_sample_reports_close(one["meta"]["ttt"]["report"], got["meta"]["ttt"]["report"])
    for ttt in (got["meta"]["ttt"], got_log["ttt"]):
        assert ttt["parallel"] == k and ttt["engine"]["parallel"] == k and ttt["engine"]["engine"] == "fast"
    assert "parallel" not in one["meta"]["ttt"] and "parallel" not in one["meta"]["ttt"]["engine"]


def test_parallel_k_that_does_not_fit_is_refused_naming_the_largest_that_does(tiny, tmp_path, monkeypatch):
    """The memory estimate (K replicas of the selected parameters and norm buffers, plus K images'
    activations measured on the first image) against a monkeypatched available memory: a K that
    does not fit is refused before any prediction is written, naming the largest K that fits,
    which then runs."""
    import re

    import torch
    from yolozu.inference.adapter import RTDETRPoseAdapter
    from yolozu.tta.ttt_mim import select_parameters

    from yolozu_ttt import groups

    available = [1]
    monkeypatch.setattr(groups, "available_memory", lambda device: (available[0], "available RAM (test)"))
    out = tmp_path / "out.json"

    def refused(k: int) -> str:
        with pytest.raises(SystemExit) as exc:
            cli.main(["export-predictions", *_tiny_args(tiny, 4), "--ttt-parallel", str(k), "--output", str(out)])
        _nothing_written(out)
        return str(exc.value.code)

    message = refused(2)
    found = re.search(r"^yolozu-ttt export-predictions: --ttt-parallel 2 does not fit: 2 x \(([\d.e+-]+) MiB replica "
                      r"\+ ([\d.e+-]+) MiB activations\) = [\d.e+-]+ MiB, 9.537e-07 MiB available RAM \(test\) "
                      r"\(90% usable\); the largest K that fits is 1$", message)
    assert found, message
    model = RTDETRPoseAdapter(config_path=str(tiny["config"]), checkpoint_path=str(tiny["checkpoint"])).get_model()
    params = select_parameters(model, update_filter="norm_only")
    norms = [b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    replica, activations = float(found[1]) * 2 ** 20, float(found[2]) * 2 ** 20
    assert replica == pytest.approx(7 * nbytes(params) + 2 * nbytes(norms), rel=1e-3)
    image = torch.zeros(1, 3, 64, 64)
    assert activations > nbytes([image])  # at least one feature map of the input's size is saved

    available[0] = int(2.5 * (replica + activations) / groups.MEMORY_HEADROOM)
    assert refused(3).endswith("the largest K that fits is 2")
    assert cli.main(["export-predictions", *_tiny_args(tiny, 4), "--ttt-parallel", "2", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["ttt"]["engine"]["parallel"] == 2


def test_a_refused_k_keeps_the_last_exports_files(tiny, tmp_path, monkeypatch):
    """YOLOZU's main deletes the output and the TTT log before any work (here: the temporary paths
    it is given); when the memory check then refuses --ttt-parallel K, the last export's files are
    as they were (a refusal of ours costs the user nothing), with nothing of ours left beside them."""
    from yolozu_ttt import groups

    monkeypatch.setattr(groups, "available_memory", lambda device: (1, "available RAM (test)"))
    out, log = tmp_path / "out.json", tmp_path / "ttt_log.json"
    out.write_text('{"last": "export"}')
    log.write_text('{"last": "log"}')
    argv = ["export-predictions", *_tiny_args(tiny, 4), "--ttt-parallel", "2", "--output", str(out),
            "--ttt-log-out", str(log)]
    with pytest.raises(SystemExit, match="--ttt-parallel 2 does not fit"):
        cli.main(argv)
    assert out.read_text() == '{"last": "export"}' and log.read_text() == '{"last": "log"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "ttt_log.json"]


def test_parallel_what_cannot_run_k_at_once_runs_one_by_one_and_says_why(tiny, tmp_path):
    """--ttt-amp fp16 is not sample-parallel (its loss scale decides on the host per image): a ParallelFallbackWarning naming it, then each image
    exactly as K = 1 runs it, and the engine record says K = 1 ran and why."""
    from yolozu_ttt.parallel import ParallelFallbackWarning

    one, one_log = _export(tiny, tmp_path, "k1", 4, ["--ttt-amp", "fp16"])
    with pytest.warns(ParallelFallbackWarning, match="--ttt-parallel 2 adapts the images one by one: amp=fp16"):
        got, got_log = _export(tiny, tmp_path, "k2", 4, ["--ttt-amp", "fp16", "--ttt-parallel", "2"])
    assert max_prediction_diff(one["predictions"], got["predictions"]) == 0.0
    assert [s["report"]["losses"] for s in got_log["ttt"]["report"]["per_sample"]] == \
        [s["report"]["losses"] for s in one_log["ttt"]["report"]["per_sample"]]
    engine = got["meta"]["ttt"]["engine"]
    assert got["meta"]["ttt"]["parallel"] == 2 and engine["parallel"] == 1
    assert engine["parallel_reason"].startswith("amp=fp16") and engine["amp"] == "fp16"
