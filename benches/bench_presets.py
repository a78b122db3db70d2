"""YOLOZU's TTT presets end to end: ``export-predictions --ttt --ttt-preset P --ttt-reset sample``,
the reference backend vs the fast one, whole process, interleaved.

Per preset and backend: the whole command's wall time (process start, model load, adaptation,
predictions, the write), seconds per image (wall / images) and the process's peak RSS; the two
backends alternate, the order rotating every round, and each side's median is reported with the
ratio of medians (reference / fast: > 1 is fast faster). The predictions of the two are compared
(the same records and detection counts; scores and boxes within ``--atol``; the meta block, which
holds timings, aside), and once more against the reference run with ``--torch-channels-last``
(untimed): at batch 1 torch's CPU batch-norm backward misreads RT-DETR's encoder grads, which fast
settles (README difference 24), as the reference does under channels-last.

The model is YOLOZU's builtin RT-DETR (``builtin:base``, init_seed 0) at ``--size`` over ``--images``
images of YOLOZU's demo dataset, on the CPU (``YOLOZU_TTT_BENCH_DEVICE=cuda`` for a GPU). The LoRA
presets (``update_filter`` adapter_only, lora_only, lora_norm_only) run with ``--lora-r 4`` and a
checkpoint that holds the LoRA weights (``lora_B`` drawn small instead of zero, so their gradients are
not identically zero); ``mim_safe`` runs on ``base.json`` with ``"enable_mim": true`` (the builtin
model has no MIM head: YOLOZU's MIM fails there in both backends).

    python benches/bench_presets.py --repeats 3                  # every preset
    python benches/bench_presets.py --repeats 3 eata_safe safe   # some
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_export import cores, prepare

#: YOLOZU's TTT presets of the detector (the task presets pose/keypoints/depth/seg need their heads)
PRESETS = ("safe", "adapter_only", "mim_safe", "cotta_safe", "eata_safe", "sar_safe", "detector_response_safe")
LORA_FILTERS = ("adapter_only", "lora_only", "lora_norm_only")
BACKENDS = ("reference", "fast")


def preset_filter(name: str) -> str:
    from yolozu.tta.presets import PRESETS as YOLOZU_PRESETS

    return str(YOLOZU_PRESETS[name].update_filter)


def lora_checkpoint(root: Path, mim: bool) -> tuple[Path, Path]:
    """(config, checkpoint) of the builtin RT-DETR with LoRA r=4 (``mim``: built with its MIM head),
    the LoRA ``B`` weights drawn small and seeded."""
    import torch
    from rtdetr_pose.config import load_config
    from yolozu.inference.adapter import RTDETRPoseAdapter

    name = "mim" if mim else "lora"
    config, ckpt = root / f"{name}.json", root / f"{name}.pt"
    if ckpt.exists():
        return config, ckpt
    import importlib.resources

    data = json.loads(importlib.resources.files("rtdetr_pose").joinpath("configs/base.json").read_text())
    data.setdefault("model", {})["enable_mim"] = bool(mim)
    config.write_text(json.dumps(data))
    load_config(str(config))  # fails here, not in the runs, if the config is not YOLOZU's
    model = RTDETRPoseAdapter(config_path=str(config), init_seed=0, lora_r=4).get_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if "lora_B" in key or "lora_b" in key:
                value.copy_(torch.randn(value.shape, generator=g) * 1e-2)
    torch.save(model.state_dict(), ckpt)
    return config, ckpt


def preset_args(root: Path, base: list[str], preset: str) -> list[str]:
    """The export flags of ``preset`` (``base``: prepare's flags without the method and backend)."""
    args = list(base) + ["--ttt-preset", preset]
    if preset_filter(preset) in LORA_FILTERS or preset == "mim_safe":
        config, ckpt = lora_checkpoint(root, mim=preset == "mim_safe")
        args = replace_flag(replace_flag(args, "--config", str(config)), "--checkpoint", str(ckpt)) + ["--lora-r", "4"]
    return args


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return args[:i + 1] + [value] + args[i + 2:]


def base_flags(root: Path, images: int, size: int) -> list[str]:
    """prepare's flags, less the Tent method, filter, steps and backend (the preset sets those)."""
    args = prepare(root, images, size)
    drop = {"--ttt-method", "--ttt-update-filter", "--ttt-steps", "--ttt-backend"}
    out, i = [], 0
    while i < len(args):
        if args[i] in drop:
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def run_once(args: list[str], backend: str, out: Path, threads: int) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one whole export process."""
    Path(str(out) + ".lock").unlink(missing_ok=True)
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "yolozu_ttt", "export-predictions", *args, "--ttt-backend", backend,
           "--output", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0


def largest_difference(a, b, path: str = "") -> float:
    """The largest absolute difference between two prediction files' numbers (the same structure
    and strings required; the meta block aside)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        return max([largest_difference(a[k], b[k], f"{path}/{k}") for k in a if k != "meta"], default=0.0)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: {len(a)} vs {len(b)} items"
        return max([largest_difference(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))], default=0.0)
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        assert isinstance(b, (int, float)), path
        return abs(float(a) - float(b))
    assert a == b, f"{path}: {a!r} vs {b!r}"
    return 0.0


def bench(opts) -> None:
    threads = opts.threads or cores()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = base_flags(root, opts.images, opts.size)
        print(f"== YOLOZU presets, export-predictions --ttt-reset sample, builtin RT-DETR {opts.size}x{opts.size}, "
              f"{opts.images} images, 1 process x {threads} thread(s), {opts.repeats} interleaved rounds (medians)")
        print(f"{'preset':<24} {'reference s':>11} {'fast s':>8} {'ref s/img':>9} {'fast s/img':>10} "
              f"{'ref MiB':>8} {'fast MiB':>9} {'speedup':>8} {'max |diff|':>10} {'vs ref CL':>10}")
        for preset in opts.presets:
            args = preset_args(root, base, preset)
            walls = {b: [] for b in BACKENDS}
            rss = {b: [] for b in BACKENDS}
            outs = {b: root / f"{preset}_{b}.json" for b in BACKENDS}
            for i in range(opts.repeats):
                for backend in BACKENDS[i % 2:] + BACKENDS[:i % 2]:
                    wall, peak = run_once(args, backend, outs[backend], threads)
                    walls[backend].append(wall)
                    rss[backend].append(peak)
            settled = root / f"{preset}_reference_cl.json"  # README difference 24: batch-1 norm grads settled
            run_once(args + ["--torch-channels-last"], "reference", settled, threads)
            got = json.loads(outs["fast"].read_text())
            diff = largest_difference(json.loads(outs["reference"].read_text()), got)
            diff_cl = largest_difference(json.loads(settled.read_text()), got)
            ref, fast = (statistics.median(walls[b]) for b in BACKENDS)
            print(f"{preset:<24} {ref:11.2f} {fast:8.2f} {ref / opts.images:9.3f} {fast / opts.images:10.3f} "
                  f"{max(rss['reference']):8.0f} {max(rss['fast']):9.0f} {ref / fast:7.2f}x {diff:10.2e} "
                  f"{diff_cl:10.2e}{'' if min(diff, diff_cl) <= opts.atol else '  (over --atol)'}", flush=True)
            shutil.rmtree(Path(str(outs["fast"]) + ".parts"), ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="*", metavar="PRESET", help=f"some of {', '.join(PRESETS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=0, help="OMP threads (default: every core)")
    parser.add_argument("--atol", type=float, default=1e-4, help="predictions' largest difference to flag")
    opts = parser.parse_args()
    unknown = sorted(set(opts.presets) - set(PRESETS))
    if unknown:
        parser.error(f"unknown presets {unknown}; choose from {', '.join(PRESETS)}")
    opts.presets = opts.presets or list(PRESETS)
    bench(opts)


if __name__ == "__main__":
    main()
