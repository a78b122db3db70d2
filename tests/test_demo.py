"""yolozu-ttt demo: reference vs fast on the builtin RT-DETR, tiny settings."""
from __future__ import annotations

import json
import math

import pytest

from yolozu_ttt import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_writes_summary_plots_and_table(tmp_path, capsys):
    pytest.importorskip("yolozu_ttt.run")
    run_dir = tmp_path / "demo"
    rc = cli.main([
        "demo", "--run-dir", str(run_dir), "--steps", "1", "--images", "1", "--image-size", "64",
        "--warmup-steps", "1",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    for text in ("reference", "fast", "s/step", "speedup", "max |delta loss|", "max |delta parameter|"):
        assert text in out

    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("loss_per_step.png", "update_norm_per_step.png", "time_per_step.png"):
        path = run_dir / name
        assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, name
        assert str(path) in summary["files"].values()
    assert (run_dir / "dataset" / "sample_manifest.json").is_file()

    assert summary["config"]["method"] == "tent" and summary["config"]["update_filter"] == "norm_only"
    assert summary["config"]["steps"] == 1 and summary["config"]["images"] == 1
    for backend in ("reference", "fast"):
        b = summary["backends"][backend]
        assert len(b["losses"]) == len(b["update_norms"]) == len(b["step_seconds"]) == 1
        assert b["seconds_per_step"] > 0
        assert b["report"]["steps_run"] == 1
    cmp_ = summary["comparison"]
    assert cmp_["speedup"] > 0
    # same data, same initial weights: the two backends agree within float tolerance
    assert math.isfinite(cmp_["max_abs_loss_diff"]) and cmp_["max_abs_loss_diff"] <= 1e-3
    assert math.isfinite(cmp_["max_abs_param_diff"]) and cmp_["max_abs_param_diff"] <= 1e-3
    assert summary["engine"]["version"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cotta", "eata", "sar", "mim"])
def test_demo_runs_every_method(tmp_path, capsys, method):
    """CoTTA deep-copies the model (hooks included): the demo's step clock must survive that. MIM
    runs the structured branch on the builtin RT-DETR built with enable_mim."""
    run_dir = tmp_path / "demo"
    rc = cli.main(["demo", "--run-dir", str(run_dir), "--method", method, "--steps", "1", "--images", "1",
                   "--image-size", "64", "--warmup-steps", "0"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["method"] == method
    if method == "mim":
        assert summary["config"]["model"]["config_path"].endswith("rtdetr_base_mim.json")
    ref, fast = (summary["backends"][b]["report"] for b in ("reference", "fast"))
    for key in ("steps_run", "stop_reason", "warnings", "optimizer_steps"):
        assert fast[key] == ref[key], key  # EATA may select nothing at this size: then neither steps
    assert ref["steps_run"] == (0 if method == "eata" and ref["warnings"] else 1)
    assert summary["comparison"]["max_abs_param_diff"] <= 1e-3


def test_demo_rejects_foreign_dataset_dir(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    (run_dir / "dataset").mkdir(parents=True)
    assert cli.main(["demo", "--run-dir", str(run_dir), "--no-progress"]) == 2
    assert "not a yolozu demo dataset" in capsys.readouterr().err


def test_demo_validates_arguments(tmp_path, capsys):
    assert cli.main(["demo", "--run-dir", str(tmp_path / "d"), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--method", "nope"])
    assert exc.value.code == 2
