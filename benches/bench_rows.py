"""The update alone over K rows (sample-parallel replicas), interleaved: the C++ engine's K-row step
vs the torch-ops replica update the replicas ran before the engine stepped them (:class:`TorchOps`,
kept here as the baseline), at the builtin RT-DETR's sizes.

torch-ops: ``TorchOps.update(lr, max_grad_norm)`` over (K, N) float32 buffers (clip per replica,
Adam at one step count, the four (K,) norms) and one host read of them.
engine: one ``_C.fused_step`` over one K-row group of the same (K, N) buffers (per-row clip, Adam,
the snapshot into the grad rows, the norms) and one host read of its (K, 7) stats.

Each round runs every provider once in a rotating order; the table gives each side's median and the
ratio torch-ops / engine of the medians (the shared machine's load bursts land on both sides).

``--device cuda``: the same on a GPU, the engine being ``UpdateEngine.step`` over a
``rows.RowArena`` (the Triton engine: one launch set per step whatever K, and its one read), with
``--graph`` also in graph mode (the update captured once, then replayed: provider ``engine-graph``).
``--json PATH`` writes the rows (``benches/gpu_check.sh`` records them).

    python benches/bench_rows.py --repeats 7 norm_only:1,8,64 all:1,8
    python benches/bench_rows.py --device cuda --graph norm_only:8,32,64 all:8,32,64
"""
from __future__ import annotations

import argparse
import json
import statistics
import warnings
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import rtdetr_param_sizes  # noqa: E402

import yolozu_ttt._C as C  # noqa: E402
from yolozu_ttt.common import STAT_KEYS  # noqa: E402
from yolozu_ttt.engine import StepSpec, UpdateEngine, read  # noqa: E402
from yolozu_ttt.kernels.constants import CLIP_EPS  # noqa: E402
from yolozu_ttt.rows import RowArena  # noqa: E402

LR, MAX_GRAD_NORM = 1e-4, 1.0


def states(k: int, n: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Seeded (K, N) replica states: values, grads, base and zero moments."""
    gen = torch.Generator(device=device).manual_seed(k)
    flat = torch.randn(k, n, generator=gen, device=device)
    return dict(flat=flat, grad=torch.randn(k, n, generator=gen, device=device) * 1e-3, base=flat.clone(),
                exp_avg=torch.zeros(k, n, device=device), exp_avg_sq=torch.zeros(k, n, device=device))


class TorchOps:
    """The torch-ops replica update the sample-parallel replicas ran before they were stepped by the
    engine (kept here as this bench's baseline only): per replica the clip, Adam at one step count
    and the four (K,) norms, as a handful of torch ops over flat (K, N) buffers, float64 reductions."""

    def __init__(self, k: int, sizes: tuple[int, ...], device: str):
        for name, t in states(k, sum(sizes), device).items():
            setattr(self, name, t)
        self.steps = 0

    @staticmethod
    def norms(a: torch.Tensor, b: torch.Tensor | None = None, chunk: int = 1 << 22) -> torch.Tensor:
        """Each row's L2 norm of ``a`` (or ``a - b``) in float64, summed in column chunks."""
        width = max(1, chunk // max(1, a.shape[0]))
        total = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
        for j in range(0, a.shape[1], width):
            c = a[:, j:j + width].double()
            if b is not None:
                c = c - b[:, j:j + width].double()
            total += c.square().sum(dim=1)
        return total.sqrt()

    def update(self, lr: float, max_grad_norm: float, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
        with torch.no_grad():
            flat, g, m, s = self.flat, self.grad, self.exp_avg, self.exp_avg_sq
            norm = self.norms(g)
            g.mul_((max_grad_norm / (norm.float() + CLIP_EPS)).clamp(max=1.0)[:, None])
            clipped = self.norms(g)
            before = flat.clone()
            b1, b2 = betas
            self.steps += 1
            bias1, bias2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
            m.mul_(b1).add_(g * (1 - b1))
            s.mul_(b2).add_(g * g * (1 - b2))
            flat.addcdiv_(m, s.sqrt().div_(bias2 ** 0.5).add_(eps), value=-lr / bias1)
            return torch.stack([norm, clipped, self.norms(flat, before), self.norms(flat, self.base)])


def torch_ops(k: int, sizes: tuple[int, ...], device: str = "cpu"):
    """:class:`TorchOps`' update and one host read of its norms."""
    r = TorchOps(k, sizes, device)

    def step():
        read(r.update(LR, MAX_GRAD_NORM))  # the (4, K) norms, one host read

    return step, r


def engine(k: int, sizes: tuple[int, ...]):
    """One K-row ``_C.ArenaGroup`` over the same buffers, its snapshot in the grad rows."""
    s = states(k, sum(sizes))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    flat = {name: t.view(-1) for name, t in s.items()}
    group = C.ArenaGroup(flat["flat"], flat["grad"], flat["exp_avg"], flat["exp_avg_sq"], flat["base"],
                         flat["grad"], offsets, list(sizes), None, rows=k)
    out = torch.empty(k * len(STAT_KEYS), dtype=torch.float64)
    options = StepSpec(lr=LR, max_grad_norm=MAX_GRAD_NORM, write_snapshot=True).native

    def step():
        C.fused_step([group], out, options)
        out.tolist()  # the engine's one host read per step

    return step, (s, group)


def row_engine(k: int, sizes: tuple[int, ...], device: str, graph: bool):
    """``UpdateEngine.step`` over a RowArena of the same buffers (its one read included)."""
    s = states(k, sum(sizes), device)
    arena = RowArena(s["flat"], s["grad"], s["base"], sizes, exp_avg=s["exp_avg"], exp_avg_sq=s["exp_avg_sq"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graph mode off the GPU says so
        eng = UpdateEngine(arena, lr=LR, max_grad_norm=MAX_GRAD_NORM, graph=graph)

    def step():
        eng.step()

    return step, (s, arena, eng)


def interleave(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each provider's step, ``repeats`` rounds after one dropped warm-up round, the order
    rotating every round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for i in range(repeats + 1):
        for name in order[i % len(order):] + order[:i % len(order)]:
            t0 = time.perf_counter()
            runs[name]()
            if i:
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", default=["norm_only:1,8,64", "all:1,8"],
                    help="update_filter:K,K,... (all at K=64 needs ~15 GB per provider)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="cpu (the C++ engine) or cuda (the Triton engine)")
    ap.add_argument("--graph", action="store_true", help="also the engine in graph mode (CUDA)")
    ap.add_argument("--json", help="write the rows here")
    opts = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OpenMP {C.num_threads()} threads, "
          f"{opts.device}")
    rows = []
    for spec in opts.cases:
        update_filter, ks = spec.split(":")
        sizes = rtdetr_param_sizes(update_filter)
        for k in (int(x) for x in ks.split(",")):
            runs, keep = {}, []
            for name, make in (("torch-ops", lambda: torch_ops(k, sizes, opts.device)),
                               ("engine", lambda: engine(k, sizes) if opts.device == "cpu"
                                else row_engine(k, sizes, opts.device, False)),
                               ("engine-graph", lambda: row_engine(k, sizes, opts.device, True))):
                if name == "engine-graph" and not opts.graph:
                    continue
                runs[name], kept = make()
                runs[name]()  # first use: tables, compiles, the graph's first sighting
                keep.append(kept)
            times = interleave(runs, opts.repeats)
            med = {name: statistics.median(t) for name, t in times.items()}
            row = dict(case=update_filter, numel=sum(sizes), k=k, device=opts.device,
                       **{f"{name}_ms": t * 1e3 for name, t in med.items()},
                       **{f"torch-ops/{name}": med["torch-ops"] / t for name, t in med.items() if name != "torch-ops"})
            rows.append(row)
            print(json.dumps(row), flush=True)
            del keep, runs
    print("| case | K | " + " | ".join(f"{n} (median)" for n in med) + " | torch-ops / engine |")
    print("|---|---:|" + "---:|" * (len(med) + 1))
    for row in rows:
        times_ms = " | ".join(f"{v:.3f} ms" for key, v in row.items() if key.endswith("_ms"))
        print(f"| {row['case']} ({row['numel'] / 1e6:.2f}M x K) | {row['k']} | {times_ms} | "
              f"**{row['torch-ops/engine']:.2f}x** |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
