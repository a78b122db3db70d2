"""The K = 1 fused update of each method, this build vs another one (A/B), interleaved.

Two builds of the C++ engine cannot load in one process, so each round runs one subprocess per
build (in a rotating order), each timing ``--steps`` fused updates per case and reporting their
median; the table gives the median over rounds of each side and the ratio before / after.

Cases, at the builtin RT-DETR's sizes (``all`` and ``norm_only``), one flat K = 1 group as a run
binds it (snapshot in the grad buffer): tent / mim (clip), eata (clip, anchor, the gate read on
the device), sar (the ascent with its backup, then the step), cotta (clip, teacher EMA, restore).

    python benches/bench_update_ab.py --before /path/to/old/checkout --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("tent", "eata", "sar", "cotta")

CHILD = r"""
import json, statistics, sys, time
import torch
import yolozu_ttt._C as C
from yolozu_ttt.common import SAR_STAT_KEYS, STAT_KEYS
from yolozu_ttt.engine import StepSpec

sizes_by_filter, steps, methods = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
SPECS = dict(tent=dict(max_grad_norm=1.0), eata=dict(max_grad_norm=1.0, anchor_lambda=1.0),
             sar=dict(max_grad_norm=1.0), cotta=dict(max_grad_norm=1.0, ema_momentum=0.999, restore_prob=0.01))
result = {}
for update_filter, sizes in sizes_by_filter.items():
    n = sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    gen = torch.Generator().manual_seed(0)
    for method, options in SPECS.items():
        if method not in methods:
            continue
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * 1e-3
        m, v, base, teacher, backup = torch.zeros(n), torch.zeros(n), p.clone(), p.clone(), torch.empty(n)
        group = C.ArenaGroup(p, g, m, v, base, g, offsets, list(sizes), bytearray(b"\x01" * len(sizes)))
        if method == "cotta":
            group.set_teacher(teacher)
        out = torch.empty(len(STAT_KEYS), dtype=torch.float64)
        sar_out = torch.empty(len(SAR_STAT_KEYS), dtype=torch.float64)
        gate = torch.ones(1, dtype=torch.float64) if method == "eata" else None
        native = StepSpec(lr=1e-4, restore_seed=3, **options).native
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            if method == "sar":
                group.set_snapshot(backup)
                C.sar_perturb([group], sar_out, 0.05, False)
                p.copy_(backup)
                group.set_snapshot(g)
            C.fused_step([group], out, native, i, gate)
            out.tolist()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        result[f"{method}/{update_filter}"] = statistics.median(times)
print(json.dumps(result))
"""


def run(path: str, sizes: dict, steps: int, methods: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sizes), str(steps), methods], env=env, cwd=path,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a checkout of the earlier build (its _C built in place)")
    ap.add_argument("--after", default=str(HERE.parent), help="this checkout (default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=9, help="fused updates per case per subprocess (median)")
    ap.add_argument("--methods", default=",".join(CASES), help="comma-separated, of " + ", ".join(CASES))
    ap.add_argument("--filters", default="all,norm_only", help="update filters, comma-separated")
    opts = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from conftest import rtdetr_param_sizes

    sizes = {f: list(rtdetr_param_sizes(f)) for f in opts.filters.split(",")}
    sides = {"before": opts.before, "after": opts.after}
    got: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    order = list(sides)
    for i in range(opts.rounds):
        for side in order[i % 2:] + order[:i % 2]:
            for case, t in run(sides[side], sizes, opts.steps, opts.methods).items():
                got[side].setdefault(case, []).append(t)
    print("| case (K = 1) | before (median) | after (median) | before / after |")
    print("|---|---:|---:|---:|")
    for case in got["after"]:
        a, b = statistics.median(got["before"][case]), statistics.median(got["after"][case])
        print(f"| {case} | {a * 1e3:.3f} ms | {b * 1e3:.3f} ms | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
