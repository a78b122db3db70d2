"""yolozu-ttt demo: reference vs fast on the builtin RT-DETR, tiny settings."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from yolozu_ttt import cli, demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


TINY = ["--steps", "1", "--images", "1", "--image-size", "64"]  # the table's shape, not its timings
ROWS = ("reference", "fast", "floor", "fast bf16")


def _check_files(run_dir, summary):
    for name in ("loss_per_step.png", "update_norm_per_step.png", "time_per_step.png"):
        path = run_dir / name
        assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, name
        assert str(path) in summary["files"].values()
    assert (run_dir / "dataset" / "sample_manifest.json").is_file()


def _check_agreement(cmp_):
    # same data, same initial weights: the two backends agree within float tolerance
    assert math.isfinite(cmp_["max_abs_loss_diff"]) and cmp_["max_abs_loss_diff"] <= 1e-3
    assert math.isfinite(cmp_["max_abs_param_diff"]) and cmp_["max_abs_param_diff"] <= 1e-3


@pytest.mark.slow
def test_demo_interleaved_table_summary_and_plots(tmp_path, capsys):
    """The default: every row, timed in rotating interleaved rounds, with its spread and a reading."""
    run_dir = tmp_path / "demo"
    assert cli.main(["demo", "--run-dir", str(run_dir), *TINY, "--warmup-steps", "1", "--rounds", "3",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    _check_files(run_dir, summary)
    assert summary["config"]["mode"] == "interleaved" and summary["config"]["rounds"] == 3

    timing = summary["timing"]
    assert timing["mode"] == "interleaved" and timing["order"] == "rotating" and timing["rounds"] == 3
    assert set(timing["rows"]) == set(ROWS)  # (summary.json sorts keys; the table keeps the order)
    table = out.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("row "))
    assert [line.split()[0] for line in table[header + 2:header + 2 + len(ROWS)]] == ["reference", "fast", "floor",
                                                                                       "fast"]
    assert table[header + 5].startswith("fast bf16 ")
    for text in ("s/step", "spread (min-max)", "vs reference", "3 interleaved rounds", "speedup", "fast/floor",
                 "max |delta loss|", "max |delta parameter|", "bf16 max |delta loss|", timing["reading"]):
        assert text in out, text
    for name, row in timing["rows"].items():
        assert len(row["round_s_per_step"]) == 3, name
        assert row["min_s_per_step"] <= row["median_s_per_step"] <= row["max_s_per_step"]
        assert f"{row['min_s_per_step']:.4f}-{row['max_s_per_step']:.4f}" in out
        assert math.isclose(row["speedup_vs_reference"],
                            timing["rows"]["reference"]["median_s_per_step"] / row["median_s_per_step"])
    assert math.isclose(timing["fast_over_floor"],
                        timing["rows"]["fast"]["median_s_per_step"] / timing["rows"]["floor"]["median_s_per_step"])

    # the figures recomputed from the rounds the demo reports
    med = {name: statistics.median(row["round_s_per_step"]) for name, row in timing["rows"].items()}
    for name, row in timing["rows"].items():
        assert row["median_s_per_step"] == med[name], name
        assert (row["min_s_per_step"], row["max_s_per_step"]) == (min(row["round_s_per_step"]),
                                                                   max(row["round_s_per_step"])), name
    cmp_ = summary["comparison"]
    assert math.isclose(cmp_["speedup"], med["reference"] / med["fast"])
    assert math.isclose(cmp_["bf16_speedup"], med["reference"] / med["fast bf16"])
    assert math.isclose(cmp_["fast_over_floor"], med["fast"] / med["floor"])
    assert f"speedup (reference / fast, medians): {med['reference'] / med['fast']:.2f}x" in out
    for name in ("reference", "fast", "fast bf16"):
        assert summary["backends"][name]["seconds_per_step"] == med[name], name
    _check_agreement(cmp_)
    assert 0 < cmp_["bf16_max_abs_loss_diff"] <= 1e-2  # bf16 passes: close, and not the fp32 figures
    assert set(summary["backends"]) == {"reference", "fast", "fast bf16"}  # the floor updates nothing
    for backend, b in summary["backends"].items():
        assert len(b["losses"]) == len(b["update_norms"]) == 1 and b["report"]["steps_run"] == 1, backend
    assert summary["backends"]["fast bf16"]["report"]["step_metrics"][0].get("amp") == "bf16"
    assert summary["engine"]["version"]


@pytest.mark.slow
def test_demo_quick_is_the_single_round_form(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert cli.main(["demo", "--run-dir", str(run_dir), *TINY, "--warmup-steps", "1", "--quick",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    for text in ("reference", "fast", "s/step", "speedup", "max |delta loss|", "max |delta parameter|"):
        assert text in out
    assert "floor" not in out and "bf16" not in out

    summary = json.loads((run_dir / "summary.json").read_text())
    _check_files(run_dir, summary)
    assert "timing" not in summary and summary["config"]["mode"] == "quick"
    assert summary["config"]["method"] == "tent" and summary["config"]["update_filter"] == "norm_only"
    assert summary["config"]["steps"] == 1 and summary["config"]["images"] == 1
    for backend in ("reference", "fast"):
        b = summary["backends"][backend]
        assert len(b["losses"]) == len(b["update_norms"]) == len(b["step_seconds"]) == 1
        assert b["seconds_per_step"] > 0
        assert b["report"]["steps_run"] == 1
    assert summary["comparison"]["speedup"] > 0
    per_step = {name: statistics.fmean(summary["backends"][name]["step_seconds"]) for name in ("reference", "fast")}
    for name, seconds in per_step.items():
        assert math.isclose(summary["backends"][name]["seconds_per_step"], seconds), name
    assert math.isclose(summary["comparison"]["speedup"], per_step["reference"] / per_step["fast"])
    _check_agreement(summary["comparison"])


def _rows(**medians):
    return {k.replace("_", " "): {"median_s_per_step": v} for k, v in medians.items()}


def test_reading_says_where_fast_sits():
    at_floor = demo.reading(_rows(reference=2.0, fast=1.5, floor=1.45, fast_bf16=1.0), "cpu", 5e-4)
    assert at_floor.startswith("fast is 1.33x the reference; it sits at the floor (1.03x the passes alone)")
    assert "goes below the floor (2.00x the reference, losses within 5.0e-04 of fp32's)" in at_floor
    assert "on a GPU" in at_floor
    above = demo.reading(_rows(reference=2.0, fast=1.9, floor=1.0, fast_bf16=1.95), "cuda", None)
    assert "it is 1.90x the floor" in above and "bf16 made nothing cheaper here (1.03x" in above
    assert "on a GPU" not in above
    assert "goes faster (1.18x the reference)" in demo.reading(_rows(reference=2.0, fast=1.9, floor=1.0,
                                                                      fast_bf16=1.7), "cpu", None)
    assert "ran below the floor" not in at_floor
    noisy = demo.reading(_rows(reference=2.0, fast=2.6, floor=2.5, fast_bf16=1.4), "cpu", None)
    assert "but the reference ran below the floor, which does strictly less work" in noisy
    assert "floor" not in demo.reading(_rows(reference=2.0, fast=1.0, fast_bf16=0.9), "cpu", None)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cotta", "eata", "sar", "mim"])
def test_demo_runs_every_method(tmp_path, capsys, method):
    """CoTTA deep-copies the model (hooks included): the demo's step clock must survive that. MIM
    runs the structured branch on the builtin RT-DETR built with enable_mim."""
    run_dir = tmp_path / "demo"
    rc = cli.main(["demo", "--run-dir", str(run_dir), "--method", method, *TINY, "--warmup-steps", "0",
                   "--rounds", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["method"] == method
    if method == "mim":
        assert summary["config"]["model"]["config_path"].endswith("rtdetr_base_mim.json")
    assert set(summary["timing"]["rows"]) == {"reference", "fast", "fast bf16"}  # the floor is Tent's
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
    assert cli.main(["demo", "--run-dir", str(tmp_path / "d"), "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--method", "nope"])
    assert exc.value.code == 2


def test_rounds_rotate_and_reset_the_model(monkeypatch):
    """A warm-up round, then every provider once per round in an order that rotates; the model is
    back at the initial weights, in eval mode, before every run; only timed rounds are kept."""
    import torch
    from yolozu.tta.config import TTTConfig

    model = torch.nn.Linear(2, 2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    class Adapter:
        def build_loader(self, records, *, batch_size=1):
            yield torch.zeros(1, 2)

    monkeypatch.setattr(demo, "_new_adapter", lambda *a: (Adapter(), model))
    calls = []

    def provider_run(provider, m, batch, config):
        def run():
            assert not m.training and all(torch.equal(v, initial[k]) for k, v in m.state_dict().items())
            calls.append((provider, config.steps))
            with torch.no_grad():
                m.weight.add_(1.0)  # a run changes the model; the next one must not see it
            m.train()
        return run

    monkeypatch.setattr(demo, "_provider_run", provider_run)
    config = TTTConfig(enabled=True, method="tent", steps=3)
    first, times = demo._interleaved_rounds(records=[], config=config, device="cpu", image_size=32,
                                            initial_state=initial, config_path="builtin:base", seed=0,
                                            warmup_steps=1, rounds=3, progress=False)
    p = list(demo.PROVIDERS)
    assert calls == [(x, 1) for x in p] + [(x, 3) for x in p[1:] + p[:1]] + [(x, 3) for x in p[2:] + p[:2]] \
        + [(x, 3) for x in p[3:] + p[:3]]
    assert {k: len(v) for k, v in times.items()} == dict.fromkeys(p, 3) and first == {}
