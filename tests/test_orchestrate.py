"""yolozu-ttt export: YOLOZU's `yolozu export` (its orchestrator) plus --ttt-backend / --ttt-amp."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import max_prediction_diff

from yolozu_ttt import cli, orchestrate, seam

#: what differs between two runs of `yolozu export` itself: when it ran, and with --ttt the
#: report's measured seconds and peak RSS
RUN_TO_RUN = ("timestamp", "seconds", "start_peak_rss_bytes", "end_peak_rss_bytes")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict[str, Path]:
    """Synthetic labeled dataset + a fixed checkpoint of the builtin RT-DETR (init_seed=0)."""
    import torch
    from yolozu.demos.labeled_dataset import generate_labeled_sample
    from yolozu.inference.adapter import RTDETRPoseAdapter

    root = tmp_path_factory.mktemp("orchestrate")
    generate_labeled_sample(run_dir=root / "ds", seed=0)
    model = RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model()
    torch.save(model.state_dict(), root / "ckpt.pt")
    return {"dataset": root / "ds", "checkpoint": root / "ckpt.pt"}


def _torch_args(sample: dict[str, Path]) -> list[str]:
    # 2 images at 64x64, 3 detections each: the smallest export that runs the real detector
    return [
        "--backend", "torch", "--config", "builtin:base", "--checkpoint", str(sample["checkpoint"]),
        "--dataset", str(sample["dataset"]), "--split", "val", "--max-images", "2", "--image-size", "64",
        "--score-threshold", "0.0", "--max-detections", "3",
    ]


TTT = ["--ttt", "--ttt-reset", "sample", "--ttt-steps", "2", "--ttt-update-filter", "norm_only", "--ttt-seed", "0",
       "--torch-channels-last"]  # channels_last: see test_cli's fast-within-tolerance test


def _yolozu_export(args: list[str], cwd: Path) -> dict:
    res = subprocess.run([sys.executable, "-m", "yolozu", "export", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(Path(res.stdout.strip().splitlines()[-1]).read_text())


def _without(value, keys=RUN_TO_RUN):
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def _differences(a, b, path="") -> list[str]:
    """The leaf paths where two JSON values differ (readable failures)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_parser_is_yolozu_export_plus_our_flags(monkeypatch, tmp_path):
    """The same argv gives the namespace `yolozu export` hands its export body, our flags removed."""
    import yolozu.cli_entry as entry

    seen = {}
    monkeypatch.setattr(entry, "_cmd_export", lambda a: seen.setdefault("theirs", vars(a).copy()) and 0)
    monkeypatch.setattr(seam.cli_commands, "_cmd_export", lambda a: seen.setdefault("ours", vars(a).copy()) and 0)
    argv = ["--backend", "torch", "--dataset", str(tmp_path), "--ttt", "--ttt-ste", "3", "--image-size", "64"]
    entry.main(["export", *argv])
    cli.main(["export", *argv, "--ttt-backend", "reference"])
    theirs = seen["theirs"]
    assert theirs.pop("command") == "export"
    assert seen["ours"] == theirs and theirs["ttt_steps"] == 3


def test_amp_needs_the_fast_backend(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--ttt", "--ttt-amp", "bf16"])
    assert exc.value.code == 2
    assert "--ttt-amp bf16 needs --ttt-backend fast" in capsys.readouterr().err


def test_fast_needs_a_backend_that_runs_run_ttt(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--backend", "onnxrt", "--ttt", "--ttt-backend", "fast"])
    assert exc.value.code == 2
    assert "--ttt-backend fast needs --backend torch or dummy" in capsys.readouterr().err


def test_fast_command_replaces_only_yolozus_exporter():
    cmd = [sys.executable, "-m", orchestrate.EXPORTER_MODULE, "--adapter", "rtdetr_pose", "--ttt"]
    assert orchestrate.fast_command(cmd, "bf16") == [
        sys.executable, "-m", "yolozu_ttt", "export-predictions", "--adapter", "rtdetr_pose", "--ttt",
        "--ttt-backend", "fast", "--ttt-amp", "bf16"]
    assert orchestrate.fast_command(cmd, "off")[-2:] == ["--ttt-backend", "fast"]
    other = [sys.executable, "tools/export_predictions_onnxrt.py", "--model", "m.onnx"]
    assert orchestrate.fast_command(other, "off") == other


@pytest.mark.slow
def test_zero_impact_without_ttt(sample, tmp_path, monkeypatch, capsys, one_thread):
    args = _torch_args(sample)
    theirs = _yolozu_export([*args, "--output", str(tmp_path / "yolozu.json")], tmp_path)
    monkeypatch.chdir(tmp_path)  # the run meta records the working directory's git state
    for backend in ("reference", "fast"):  # without --ttt the backend flag has no effect
        out = tmp_path / f"ours_{backend}.json"
        assert cli.main(["export", *args, "--ttt-backend", backend, "--output", str(out)]) == 0
        assert capsys.readouterr().out.strip() == str(out)  # YOLOZU's export prints the output path
        assert _differences(_without(json.loads(out.read_text()), ("timestamp",)), _without(theirs, ("timestamp",))) == []


@pytest.mark.slow
def test_ttt_reference_identical_and_fast_within_tolerance(sample, tmp_path, monkeypatch, one_thread):
    args = [*_torch_args(sample), *TTT]
    theirs = _yolozu_export([*args, "--output", str(tmp_path / "yolozu.json")], tmp_path)
    monkeypatch.chdir(tmp_path)

    ref_path = tmp_path / "ref.json"
    assert cli.main(["export", *args, "--ttt-backend", "reference", "--output", str(ref_path)]) == 0
    ref = json.loads(ref_path.read_text())
    assert _differences(_without(ref), _without(theirs)) == []
    assert "backend" not in ref["meta"]["ttt"] and "engine" not in ref["meta"]["ttt"]

    fast_path = tmp_path / "fast.json"
    assert cli.main(["export", *args, "--ttt-backend", "fast", "--output", str(fast_path)]) == 0
    fast = json.loads(fast_path.read_text())
    ttt = fast["meta"]["ttt"]
    assert ttt["backend"] == "fast" and "amp" not in ttt  # recorded by our export-predictions subprocess
    assert ttt["engine"]["engine"] == "fast" and ttt["engine"]["backend"] == "cpp" and ttt["engine"]["method"] == "tent"
    assert fast["meta"]["run"]["config_hash"] == ref["meta"]["run"]["config_hash"]  # the orchestrator's meta kept
    assert max_prediction_diff(ref["predictions"], fast["predictions"]) <= 1e-4
    for s_fast, s_ref in zip(ttt["report"]["per_sample"], ref["meta"]["ttt"]["report"]["per_sample"]):
        lf, lr = s_fast["report"]["losses"], s_ref["report"]["losses"]
        assert len(lf) == len(lr) == 2
        for a, b in zip(lf, lr):
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)

    # YOLOZU's fingerprint has no backend: an existing artefact is reused only by its own backend
    with pytest.raises(SystemExit, match="made by the fast backend"):
        cli.main(["export", *args, "--ttt-backend", "reference", "--output", str(fast_path)])
    with pytest.raises(SystemExit, match="made by the reference backend"):
        cli.main(["export", *args, "--ttt-backend", "fast", "--output", str(ref_path)])
    before = fast_path.read_bytes()
    assert cli.main(["export", *args, "--ttt-backend", "fast", "--output", str(fast_path)]) == 0
    assert fast_path.read_bytes() == before  # its own backend: YOLOZU's reuse, untouched


def test_fast_command_passes_the_parallel_k_on():
    cmd = [sys.executable, "-m", orchestrate.EXPORTER_MODULE, "--ttt"]
    assert orchestrate.fast_command(cmd, "off", 4)[-4:] == ["--ttt-backend", "fast", "--ttt-parallel", "4"]
    assert orchestrate.fast_command(cmd, "bf16", 2)[-4:] == ["--ttt-amp", "bf16", "--ttt-parallel", "2"]
    assert "--ttt-parallel" not in orchestrate.fast_command(cmd, "off", 1)


@pytest.mark.parametrize("extra, message", [
    (["--ttt-parallel", "0", "--ttt-backend", "fast"], "--ttt-parallel must be >= 1 (got 0)"),
    (["--ttt-parallel", "2"], "--ttt-parallel 2 needs --ttt-backend fast"),
    (["--ttt-parallel", "2", "--ttt-backend", "fast"], "--ttt-parallel 2 needs --ttt-reset sample"),
])
def test_parallel_usage_errors_before_anything_runs(capsys, monkeypatch, extra, message):
    ran = []
    monkeypatch.setattr(seam.cli_commands, "_cmd_export", lambda a: ran.append(a) or 0)
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", "--backend", "torch", "--ttt", *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err and ran == []


def test_the_export_subprocess_gets_the_parallel_k(sample, tmp_path, monkeypatch):
    """``yolozu-ttt export --ttt --ttt-backend fast --ttt-parallel 3``: YOLOZU's export runs our
    export-predictions with ``--ttt-parallel 3`` (the command is caught, not run)."""
    commands = []

    def caught(cmd):
        commands.append(list(cmd))
        raise SystemExit("caught")

    monkeypatch.setattr(seam.cli_commands, "_subprocess_or_die", caught)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="caught"):
        cli.main(["export", *_torch_args(sample), *TTT, "--ttt-backend", "fast", "--ttt-parallel", "3",
                  "--output", str(tmp_path / "out.json")])
    exporter = [c for c in commands if list(c[1:4]) == list(orchestrate.OUR_COMMAND)]
    assert len(exporter) == 1 and exporter[0][-4:] == ["--ttt-backend", "fast", "--ttt-parallel", "3"]
