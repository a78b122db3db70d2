"""Dataset-scale export: torchrun shards, part files, --resume, failures (yolozu_ttt.export).

Workers run under ``python -m torch.distributed.run --standalone --nproc-per-node 2`` (gloo, one
thread each) on a shrunk RT-DETR at 64x64 over a few images of YOLOZU's demo dataset (each image
also mirrored, so no two records are alike). The single-process runs happen in this process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import max_prediction_diff

import yolozu_ttt
from yolozu_ttt import cli, export

TINY_MODEL = {"num_classes": 3, "hidden_dim": 32, "num_queries": 8, "stem_channels": 8,
              "backbone_channels": [8, 16, 32], "stage_blocks": [1, 1, 1], "num_encoder_layers": 1,
              "num_decoder_layers": 1, "nhead": 2, "encoder_dim_feedforward": 32, "decoder_dim_feedforward": 32}
N_SAMPLE = 8    # images in the sample-mode runs (4 per rank)
N_STREAM = 8    # images in the stream-mode runs
TOL = 1e-4      # 1 thread per worker vs 2 threads in one process: float reduction order only


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """16 distinct images (YOLOZU's demo sample and its mirror images), a shrunk RT-DETR config
    and a checkpoint of it."""
    import importlib.resources

    import torch
    from PIL import Image, ImageOps
    from yolozu.demos.labeled_dataset import generate_labeled_sample
    from yolozu.inference.adapter import RTDETRPoseAdapter

    root = tmp_path_factory.mktemp("export")
    generate_labeled_sample(run_dir=root / "demo", seed=0)
    images = root / "ds" / "images" / "val"
    images.mkdir(parents=True)
    i = 0
    for split in ("val", "train"):
        for path in sorted((root / "demo" / "images" / split).glob("*.png")):
            with Image.open(path) as src:
                img = src.convert("RGB")
            for variant in (img, ImageOps.mirror(img)):
                variant.save(images / f"img_{i:03d}.png")
                i += 1
    base = json.loads(importlib.resources.files("rtdetr_pose").joinpath("configs/base.json").read_text(encoding="utf-8"))
    base["model"].update(TINY_MODEL)
    config = root / "tiny.json"
    config.write_text(json.dumps(base), encoding="utf-8")
    model = RTDETRPoseAdapter(config_path=str(config), init_seed=0).get_model()
    torch.save(model.state_dict(), root / "tiny.pt")
    return {"root": root, "dataset": root / "ds", "config": config, "checkpoint": root / "tiny.pt"}


def _args(data, *, reset: str | None, n: int, backend: str = "fast", dataset: Path | None = None) -> list[str]:
    args = ["--adapter", "rtdetr_pose", "--config", str(data["config"]), "--checkpoint", str(data["checkpoint"]),
            "--dataset", str(dataset or data["dataset"]), "--split", "val", "--max-images", str(n),
            "--image-size", "64", "--score-threshold", "0.0", "--max-detections", "3", "--wrap"]
    if reset is not None:
        # lr 0.01: the steps stay under the default guards (max update norm 1.0), so TTT changes the output
        args += ["--ttt", "--ttt-reset", reset, "--ttt-steps", "1" if reset == "sample" else "2",
                 "--ttt-update-filter", "norm_only", "--ttt-seed", "0", "--ttt-lr", "0.01", "--ttt-backend", backend]
        if reset == "stream":
            args += ["--ttt-batch-size", "2", "--ttt-max-batches", "2", "--infer-batch-size", "2"]
    return args


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _torchrun_cmd(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "yolozu_ttt", "export-predictions", *args]


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(args, nproc), cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=600)


def _single(args: list[str]) -> None:
    assert cli.main(["export-predictions", *args]) == 0


def _assert_losses_close(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, b)


def _assert_reports_close(a: dict, b: dict) -> None:
    """YOLOZU's report shape, same counts, losses within tolerance (sample: per image, in order)."""
    assert set(a) == set(b)
    if a.get("mode") == "sample":
        for key in ("samples_total", "samples_kept", "samples_truncated"):
            assert a[key] == b[key], key
        assert [(s["index"], s["image"]) for s in a["per_sample"]] == [(s["index"], s["image"]) for s in b["per_sample"]]
        for sa, sb in zip(a["per_sample"], b["per_sample"]):
            assert sa["report"]["steps_run"] == sb["report"]["steps_run"]
            _assert_losses_close(sa["report"]["losses"], sb["report"]["losses"])
    else:
        for key in ("steps_run", "batches_used", "optimizer_steps", "stop_reason"):
            assert a[key] == b[key], key
        _assert_losses_close(a["losses"], b["losses"])


def _entries(parts: Path) -> dict[int, dict]:
    return export.read_parts(parts)[1]


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> dict[str, dict]:
    """One process, no torchrun, no --resume: the definition the sharded runs must reproduce."""
    out = tmp_path_factory.mktemp("single")
    results = {}
    for name, reset, n, backend in (("none", None, N_SAMPLE, "fast"),
                                     ("sample-fast", "sample", N_SAMPLE, "fast"),
                                     ("sample-reference", "sample", N_SAMPLE, "reference"),
                                     ("stream-fast", "stream", N_STREAM, "fast"),
                                     ("stream-reference", "stream", N_STREAM, "reference")):
        path = out / f"{name}.json"
        _single([*_args(data, reset=reset, n=n, backend=backend), "--output", str(path)])
        results[name] = json.loads(path.read_text())
    return results


# ---------------------------------------------------------------------------------------
# pure pieces
# ---------------------------------------------------------------------------------------
def test_shard_bounds_are_contiguous_and_batch_aligned():
    for n in range(0, 23):
        for world in (1, 2, 3, 5):
            for unit in (1, 2, 4):
                bounds = [export.shard_bounds(n, world, r, unit) for r in range(world)]
                assert bounds[0][0] == 0 and bounds[-1][1] == n
                assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
                assert all(start % unit == 0 or start == n for start, _ in bounds)
                batches = [-(-(stop - start) // unit) for start, stop in bounds]  # inference batches per rank
                assert max(batches) - min(batches) <= 1
    assert export.shard_bounds(8, 2, 0) == (0, 4) and export.shard_bounds(8, 2, 1) == (4, 8)


def test_torchrun_environment_is_read():
    assert export.DistEnv.from_environ({}) is None
    env = export.DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.torchrun) == (3, 4, 1, 2, True)
    with pytest.raises(SystemExit, match="invalid torchrun environment"):
        export.DistEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2"})


# ---------------------------------------------------------------------------------------
# 2 workers == 1 process
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["sample-fast", "sample-reference", "stream-fast", "stream-reference"])
def test_two_workers_equal_one_process(data, single, tmp_path, case):
    reset, backend = case.split("-")
    n = N_SAMPLE if reset == "sample" else N_STREAM
    out, log = tmp_path / "out.json", tmp_path / "log.json"
    res = _torchrun([*_args(data, reset=reset, n=n, backend=backend), "--output", str(out), "--ttt-log-out", str(log)],
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    merged, one = json.loads(out.read_text()), single[case]

    # same records, same order, same detections within float tolerance
    assert max_prediction_diff(one["predictions"], merged["predictions"]) <= TOL
    # ... and TTT visibly changed them (so a rank predicting with unadapted weights would fail above)
    assert max_prediction_diff(single["none"]["predictions"][:n], merged["predictions"]) > 100 * TOL
    assert merged["meta"]["images"] == one["meta"]["images"] == n
    assert merged["meta"]["task_coverage"] == one["meta"]["task_coverage"]

    ttt, ttt_one = merged["meta"]["ttt"], one["meta"]["ttt"]
    assert ttt["world_size"] == 2 and ttt["distributed_backend"] == "gloo"
    assert "world_size" not in ttt_one  # one process without --resume: unchanged
    assert ttt.get("backend") == ttt_one.get("backend") == ("fast" if backend == "fast" else None)
    assert set(ttt) - {"world_size", "distributed_backend"} == set(ttt_one)
    _assert_reports_close(ttt_one["report"], ttt["report"])
    logged = json.loads(log.read_text())
    assert logged["output"] == str(out)
    assert logged["ttt"]["world_size"] == 2 and logged["ttt"]["report"] == ttt["report"]

    # the part files are gone after the merge; one progress bar over all ranks; what was computed
    assert not Path(str(out) + ".parts").exists()
    assert f"{n}/{n}" in res.stderr and "export (2 workers)" in res.stderr
    assert f"{n} images, 2 worker(s), gloo: {n} computed, 0 from part files" in res.stderr
    if reset == "stream":
        assert "stream adaptation ran" in res.stderr


# ---------------------------------------------------------------------------------------
# kill a worker, resume
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def killed(data, tmp_path_factory) -> dict:
    """A 2-worker sample-mode run whose rank 1 is SIGKILLed after its second image."""
    root = tmp_path_factory.mktemp("killed")
    out = root / "out.json"
    parts = Path(str(out) + ".parts")
    proc = subprocess.Popen(_torchrun_cmd([*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out)]),
                            cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            for path in parts.glob("part-*-r00001.jsonl"):
                lines = path.read_bytes().split(b"\n")
                if len(lines) >= 4:  # header + 2 finished images
                    victim = json.loads(lines[0])["pid"]
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
                break
            time.sleep(0.02)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert victim is not None, "the run ended before a worker could be killed"
    assert proc.returncode != 0
    done = _entries(parts)
    assert 2 <= len(done) < N_SAMPLE, len(done)
    assert not out.exists()  # no output that looks complete
    return {"root": root, "parts": parts, "done": sorted(done), "stderr": stderr}


def _copy_parts(killed: dict, out: Path) -> Path:
    parts = Path(str(out) + ".parts")
    shutil.copytree(killed["parts"], parts)
    return parts


def test_killed_run_resumes_in_one_process(data, single, killed, tmp_path, fast_backend_calls):
    """Different worker count (1): only the images missing from the part files are adapted."""
    out = tmp_path / "out.json"
    _copy_parts(killed, out)
    _single([*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out), "--resume"])
    adapted = [r["image"] for records in fast_backend_calls for r in records]
    merged, one = json.loads(out.read_text()), single["sample-fast"]
    images = [e["image"] for e in one["predictions"]]
    assert sorted(adapted) == sorted(images[i] for i in range(N_SAMPLE) if i not in killed["done"])
    assert len(adapted) + len(killed["done"]) == N_SAMPLE  # no image adapted twice
    assert max_prediction_diff(one["predictions"], merged["predictions"]) <= TOL
    _assert_reports_close(one["meta"]["ttt"]["report"], merged["meta"]["ttt"]["report"])
    assert merged["meta"]["ttt"]["world_size"] == 1 and merged["meta"]["ttt"]["distributed_backend"] is None
    assert not Path(str(out) + ".parts").exists()


def test_killed_run_resumes_with_two_workers(data, single, killed, tmp_path):
    out = tmp_path / "out.json"
    _copy_parts(killed, out)
    res = _torchrun([*_args(data, reset="sample", n=N_SAMPLE), "--output", str(out), "--resume"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    d = len(killed["done"])
    assert f"{N_SAMPLE - d} computed, {d} from part files" in res.stderr
    merged = json.loads(out.read_text())
    assert max_prediction_diff(single["sample-fast"]["predictions"], merged["predictions"]) <= TOL
    _assert_reports_close(single["sample-fast"]["meta"]["ttt"]["report"], merged["meta"]["ttt"]["report"])


def test_resume_refuses_changed_flags_before_any_work(data, killed, tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    parts = _copy_parts(killed, out)
    before = sorted(p.name for p in parts.iterdir())
    calls = []
    monkeypatch.setattr(cli.FastBackend, "__call__", lambda *a, **k: calls.append(1))
    args = _args(data, reset="sample", n=N_SAMPLE)
    changed = [*args[: args.index("--ttt-steps") + 1], "3", *args[args.index("--ttt-steps") + 2:]]
    with pytest.raises(SystemExit) as exc:
        cli.main(["export-predictions", *changed, "--output", str(out), "--resume"])
    message = str(exc.value.code)
    assert message.startswith(f"--resume: the part files in {parts} were made with different export flags")
    assert "--ttt-steps 1 -> 3" in message
    # under torchrun (here: what `--nproc-per-node 1` sets) existing part files are never ignored
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=r"holds part files of an earlier run \(\d+ images done\): pass --resume"):
        cli.main(["export-predictions", *args, "--output", str(out)])
    assert calls == [] and sorted(p.name for p in parts.iterdir()) == before and not out.exists()


@pytest.mark.parametrize("reset", ["sample", "stream"])
def test_failed_merge_keeps_part_files_and_resume_adapts_nothing(data, single, tmp_path, monkeypatch, reset,
                                                                fast_backend_calls):
    """The final file is written to a temporary file and renamed into place; if the merge fails the
    part files (and the stream state) stay, and --resume then finishes without adapting again."""
    n = N_SAMPLE if reset == "sample" else N_STREAM
    out = tmp_path / "out.json"
    args = [*_args(data, reset=reset, n=n), "--output", str(out), "--resume"]
    adapted = fast_backend_calls
    real_replace = export.os.replace

    def disk_full(src, dst):
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _single(args)
    assert not out.exists() and not list(tmp_path.glob(".out.json.tmp-*"))  # no partial output left behind
    assert sorted(_entries(Path(str(out) + ".parts"))) == list(range(n))
    assert [len(records) for records in adapted] == ([1] * n if reset == "sample" else [n])

    renamed = []
    monkeypatch.setattr(export.os, "replace", lambda src, dst: renamed.append(Path(dst)) or real_replace(src, dst))
    adapted.clear()
    _single(args)
    assert adapted == [] and out in renamed
    merged, one = json.loads(out.read_text()), single[f"{reset}-fast"]
    assert max_prediction_diff(one["predictions"], merged["predictions"]) <= TOL
    _assert_reports_close(one["meta"]["ttt"]["report"], merged["meta"]["ttt"]["report"])
    assert not Path(str(out) + ".parts").exists()


# ---------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------
def _dataset_copy(data, root: Path, n: int) -> Path:
    images = root / "ds" / "images" / "val"
    images.mkdir(parents=True)
    for path in sorted((data["dataset"] / "images" / "val").glob("*.png"))[:n]:
        shutil.copy(path, images / path.name)
    return root / "ds"


def test_unreadable_image_fails_with_rank_and_path_and_keeps_finished_work(data, tmp_path):
    ds = _dataset_copy(data, tmp_path, 8)
    bad = ds / "images" / "val" / "img_005.png"  # rank 1's second image
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    out = tmp_path / "out.json"
    args = [*_args(data, reset="sample", n=8, dataset=ds), "--output", str(out)]
    res = _torchrun(args, cwd=tmp_path)
    assert res.returncode != 0
    assert re.search(rf"TTT failed: .*\(rank 1 of 2, image {re.escape(str(bad))}\)", res.stderr), res.stderr[-4000:]
    assert not out.exists()
    done = _entries(Path(str(out) + ".parts"))
    assert 4 in done and 5 not in done  # rank 1's first image was kept, the bad one never written

    # fix the image, resume in one process: only the missing images are computed
    bad.write_bytes(good)
    _single([*args, "--resume"])
    merged = json.loads(out.read_text())
    assert [e["image"] for e in merged["predictions"]] == sorted(str(p) for p in (ds / "images" / "val").glob("*.png"))
    assert merged["meta"]["ttt"]["report"]["samples_total"] == 8


def test_missing_image_refused_before_any_work(data, tmp_path, monkeypatch):
    ds = _dataset_copy(data, tmp_path, 6)
    missing = ds / "images" / "val" / "img_004.png"
    missing.unlink()
    missing.symlink_to(tmp_path / "nowhere.png")  # listed by the dataset, not a file
    out = tmp_path / "out.json"
    built = []
    monkeypatch.setattr(cli.FastBackend, "__call__", lambda *a, **k: built.append(1))
    with pytest.raises(SystemExit) as exc:
        cli.main(["export-predictions", *_args(data, reset="sample", n=6, dataset=ds), "--output", str(out), "--resume"])
    assert str(exc.value.code) == f"image not found: {missing} (rank 0 of 1, record 4)"
    assert built == [] and not out.exists()
    assert not Path(str(out) + ".parts").exists()  # made by the check, removed with nothing in it


def test_unwritable_output_folder_refused(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the output folder should be (also refused as root)
    out = blocker / "sub" / "out.json"
    with pytest.raises(SystemExit, match=rf"output folder is not writable: {re.escape(str(out.parent))}"):
        cli.main(["export-predictions", *_args(data, reset="sample", n=2), "--output", str(out), "--resume"])


def test_dist_timeout_must_be_positive(data, tmp_path):
    with pytest.raises(SystemExit, match="--dist-timeout must be > 0"):
        cli.main(["export-predictions", *_args(data, reset=None, n=2), "--output", str(tmp_path / "o.json"),
                  "--resume", "--dist-timeout", "0"])
