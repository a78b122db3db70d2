"""Dataset-scale export, end to end: ``export-predictions --ttt --ttt-reset sample`` (Tent, norm_only,
1 step per image) on the builtin RT-DETR at 320x320 over 8 images of YOLOZU's demo dataset.

Providers (same CPU cores):

* ``1 process x N threads``: one process (``--resume``, so it writes part files like the workers do),
  torch using every core;
* ``N workers x 1 thread``: ``torchrun --standalone --nproc-per-node N`` (gloo), one thread each.

Each run prints the export's own summary line; ``images/s`` is finished images over the work window
(first image started on any rank to last image finished on any rank: start-up and the merge
excluded); ``wall`` is the whole command. ``YOLOZU_TTT_BENCH_DEVICE=cuda`` runs the workers on
``--device cuda:0`` (sharing one GPU).

Sample-parallel (``--sample-parallel``, issue 19): one process (``--resume``, for the work window)
per provider: ``reference``, ``fast K=1`` (one session, an image at a time), ``fast K=2/4/8``
(``--ttt-parallel K``), ``fast bf16 K=8`` (``--ttt-amp bf16``), over ``--images`` images at each
``--size`` and ``--threads``; per-image runs without a session are bench_parallel's ``per_image``.

    python -m pytest benches/bench_export.py --benchmark-only
    python benches/bench_export.py --repeats 3     # interleaved, the order rotating every round
    python benches/bench_export.py --sample-parallel --repeats 3 --size 320 160 --threads 2 1
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from yolozu_ttt.timing import rotation

IMAGES = 8
SIZE = 320
RATE = re.compile(r"yolozu-ttt export: (\d+) images, (\d+) worker\(s\)[^:]*: (\d+) computed.*?; ([\d.]+) images/s")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare(root: Path, images: int = IMAGES, size: int = SIZE, backend: str = "fast") -> list[str]:
    """Dataset (the demo sample's 4 val + 4 train images, repeated up to ``images``), a checkpoint of
    builtin:base (init_seed=0), and the export flags."""
    import torch
    from yolozu.demos.labeled_dataset import generate_labeled_sample
    from yolozu.inference.adapter import RTDETRPoseAdapter

    if not (root / "ckpt.pt").exists():
        generate_labeled_sample(run_dir=root / "demo", seed=0)
        folder = root / "ds" / "images" / "val"
        folder.mkdir(parents=True)
        sources = [p for split in ("val", "train") for p in sorted((root / "demo" / "images" / split).glob("*.png"))]
        for i in range(max(images, len(sources))):
            shutil.copy(sources[i % len(sources)], folder / f"{i:03d}_{sources[i % len(sources)].name}")
    torch.save(RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model().state_dict(), root / "ckpt.pt")
    device = "cuda:0" if os.environ.get("YOLOZU_TTT_BENCH_DEVICE", "cpu").startswith("cuda") else "cpu"
    return ["--adapter", "rtdetr_pose", "--config", "builtin:base", "--checkpoint", str(root / "ckpt.pt"),
            "--dataset", str(root / "ds"), "--split", "val", "--max-images", str(images),
            "--image-size", str(size), "--device", device, "--score-threshold", "0.0", "--max-detections", "20", "--wrap",
            "--ttt", "--ttt-reset", "sample", "--ttt-method", "tent", "--ttt-update-filter", "norm_only",
            "--ttt-steps", "1", "--ttt-backend", backend]


def providers(workers: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    single = [sys.executable, "-m", "yolozu_ttt", "export-predictions"]
    multi = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers),
             "-m", "yolozu_ttt", "export-predictions"]
    return {f"1 process x {cores()} threads": (single + ["--resume"], {"OMP_NUM_THREADS": str(cores())}),
            f"{workers} workers x {max(1, cores() // workers)} thread(s)": (multi, {})}


def sample_parallel_providers(threads: int) -> dict[str, tuple[list[str], dict[str, str], list[str]]]:
    """Issue 19's providers: (command, environment, flags replacing ``--ttt-backend fast``)."""
    single = [sys.executable, "-m", "yolozu_ttt", "export-predictions", "--resume"]
    env = {"OMP_NUM_THREADS": str(threads)}
    runs = {"reference": (single, env, ["--ttt-backend", "reference"]),
            "fast K=1": (single, env, ["--ttt-backend", "fast"])}
    for k in (2, 4, 8):
        runs[f"fast K={k}"] = (single, env, ["--ttt-backend", "fast", "--ttt-parallel", str(k)])
    runs["fast bf16 K=8"] = (single, env, ["--ttt-backend", "fast", "--ttt-amp", "bf16", "--ttt-parallel", "8"])
    return runs


def sample_parallel(opts) -> None:
    """Every provider at every (size, threads), interleaved (rotating order), medians."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in opts.size:
            base = prepare(root, opts.images, size)[:-2]  # without "--ttt-backend fast"
            for threads in opts.threads:
                runs = sample_parallel_providers(threads)
                order, rates = list(runs), {k: [] for k in runs}
                for i in range(opts.repeats):
                    for name in rotation(order, i):
                        cmd, env, flags = runs[name]
                        rate, _ = run_once(cmd, env, base + flags, root / "out.json", images=opts.images)
                        rates[name].append(rate)
                print(f"== {opts.images} images {size}x{size}, 1 process x {threads} thread(s), "
                      f"{opts.repeats} interleaved rounds (images/s over the work window; medians)")
                ref = statistics.median(rates["reference"])
                for name in order:
                    med = statistics.median(rates[name])
                    print(f"{name:<16} {med:6.3f} images/s ({min(rates[name]):.3f}-{max(rates[name]):.3f})  "
                          f"{med / ref:5.2f}x reference", flush=True)


def run_once(cmd: list[str], env_extra: dict[str, str], args: list[str], out: Path,
             images: int = IMAGES) -> tuple[float, float]:
    """(images/s over the work window, wall seconds)."""
    shutil.rmtree(Path(str(out) + ".parts"), ignore_errors=True)
    Path(str(out) + ".lock").unlink(missing_ok=True)  # a run killed by hand leaves its lock: not this one's
    env = dict(os.environ, TQDM_DISABLE="1", **env_extra)
    start = time.perf_counter()
    res = subprocess.run([*cmd, *args, "--output", str(out)], env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed:\n{res.stderr[-3000:]}")
    match = RATE.search(res.stderr)
    if match is None or int(match.group(3)) != images:
        raise RuntimeError(f"no summary line:\n{res.stderr[-3000:]}")
    return float(match.group(4)), wall


# --------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------
WORKERS = 2
PROVIDERS = providers(WORKERS)
_RATES: dict[str, float] = {}


@pytest.fixture(scope="module")
def export_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_export")
    return root, prepare(root)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_export_sample_images_per_s(benchmark, export_args, provider):
    root, args = export_args
    cmd, env = PROVIDERS[provider]
    rates: list[float] = []

    def once():
        rate, _ = run_once(cmd, env, args, root / "out.json")
        rates.append(rate)

    benchmark.group = f"export tent/norm_only sample, {IMAGES} images {SIZE}x{SIZE}, end to end"
    benchmark.pedantic(once, rounds=2, iterations=1, warmup_rounds=0)
    _RATES[provider] = statistics.median(rates)
    benchmark.extra_info.update({"provider": provider, "images_per_s": round(_RATES[provider], 3),
                                 "images_per_s_runs": [round(r, 3) for r in rates]})
    if len(_RATES) == len(PROVIDERS):
        base, sharded = (_RATES[p] for p in PROVIDERS)
        benchmark.extra_info["sharded_over_single"] = round(sharded / base, 3)


# --------------------------------------------------------------------------------------
# interleaved
# --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--sample-parallel", action="store_true", help="issue 19's providers (see the module)")
    parser.add_argument("--images", type=int, default=IMAGES + 1)
    parser.add_argument("--size", type=int, nargs="+", default=[SIZE])
    parser.add_argument("--threads", type=int, nargs="+", default=[cores()])
    opts = parser.parse_args()
    if opts.sample_parallel:
        return sample_parallel(opts)
    runs = providers(opts.workers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args = prepare(root)
        rates: dict[str, list[float]] = {k: [] for k in runs}
        walls: dict[str, list[float]] = {k: [] for k in runs}
        order = list(runs)
        for i in range(opts.repeats):
            for name in rotation(order, i):
                rate, wall = run_once(*runs[name], args, root / "out.json")
                rates[name].append(rate)
                walls[name].append(wall)
                print(f"  round {i}: {name:<28} {rate:6.3f} images/s  wall {wall:6.2f} s", flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        for name in runs:
            print(f"{name:<28} median {med[name]:6.3f} images/s  wall {statistics.median(walls[name]):6.2f} s "
                  f"({opts.repeats} interleaved repeats)")
        first, second = (med[k] for k in runs)
        print(f"sharded / single images/s: {second / first:.3f}")


if __name__ == "__main__":
    main()
