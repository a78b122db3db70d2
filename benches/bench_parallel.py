"""Sample-mode adapt-and-predict, images/s: the reference, per-image runs, one session, K at once.

The work of a ``--ttt-reset sample`` export in one process without its image loading and output:
``IMAGES`` records of one 1x3xSxS image each (builtin RT-DETR, Tent/norm_only, 1 step, lr 1e-4),
each adapted alone from the same start and then predicted (one eval forward of the adapted model).
CPU unless ``YOLOZU_TTT_BENCH_DEVICE=cuda``; S = ``YOLOZU_TTT_BENCH_SIZE`` (160 here by default).

providers (``group``: the case; ``provider``: how its images are adapted):
    reference   YOLOZU's ``run_ttt`` per image, the model restored in place before each
    per_image   ``yolozu_ttt.run_ttt`` per image, restored the same way (no session)
    session     one ``TTTSession``, ``run([record])`` per image (K = 1, the export's default)
    k<K>        one ``TTTSession``, ``run_parallel(records, K)``
    bf16_k<K>   the same with ``amp="bf16"``

Every adapted image is predicted where ``on_image`` (or the loop) sees its adapted state.

    python -m pytest benches/bench_parallel.py --benchmark-only
    python benches/bench_parallel.py --repeats 3 --size 320 --threads 1 2    # interleaved, medians
    python benches/bench_parallel.py --k 1 8 32 64 --graph --json out.json   # a GPU: peak memory per K
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import pytest
import torch
from conftest import bench_device, sync
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import run_ttt as reference_run_ttt

import yolozu_ttt
from yolozu_ttt.floor import RecordAdapter
from yolozu_ttt.run import TTTSession
from yolozu_ttt.timing import rotation

IMAGES = 9  # one alone (it binds the session), then groups
SIZE = int(os.environ.get("YOLOZU_TTT_BENCH_SIZE", "160"))
DEVICE = bench_device()
PROVIDERS = ("reference", "per_image", "session", "k2", "k4", "k8", "bf16_k8")


def setup_case(size: int = SIZE, images: int = IMAGES, device: torch.device = DEVICE):
    from yolozu.inference.adapter import RTDETRPoseAdapter

    model = RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model().to(device).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(1, 3, size, size, generator=g).to(device) for _ in range(images)]
    config = TTTConfig(enabled=True, method="tent", steps=1, update_filter="norm_only", lr=1e-4, reset="sample")
    return model, batches, config


def runner(provider: str, model, batches, config, graph: bool = False):
    """(adapt-and-predict every record once, close): on its own copy of ``model``; a session is
    built once, outside the timed call."""
    model = copy.deepcopy(model)
    records = [{"i": i} for i in range(len(batches))]
    adapter = RecordAdapter(model, batches)
    state = copy.deepcopy(model.state_dict())
    predictions = []

    def predict(index, record, report):
        model.eval()
        with torch.no_grad():
            predictions.append(model(batches[index])["logits"])

    if provider in ("reference", "per_image"):
        run = reference_run_ttt if provider == "reference" else yolozu_ttt.run_ttt

        def once():
            predictions.clear()
            for i, record in enumerate(records):
                model.load_state_dict(state)
                predict(i, record, run(adapter, [record], config=config))
            sync(DEVICE)
        return once, lambda: model.load_state_dict(state)
    amp = "bf16" if provider.startswith("bf16") else "off"
    k = 1 if provider == "session" else int(provider.rsplit("k", 1)[1])
    session = TTTSession(adapter, config, amp=amp, graph=graph)

    def once():
        predictions.clear()
        if k == 1:
            for i, record in enumerate(records):
                predict(i, record, session.run([record]))
        else:
            session.run_parallel(records, k, predict)
        sync(DEVICE)
    return once, session.close


@pytest.fixture(scope="module")
def case():
    return setup_case()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sample_mode_adapt_and_predict(benchmark, case, provider):
    once, done = runner(provider, *case)
    once()  # bind and warm
    benchmark.group = f"sample mode tent/norm_only adapt+predict ({IMAGES} images, 1x3x{SIZE}x{SIZE}, 1 step)"
    benchmark.extra_info.update({"provider": provider, "images": IMAGES, "size": SIZE, "device": str(DEVICE)})
    benchmark.pedantic(once, rounds=1, iterations=1)
    done()
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(IMAGES / benchmark.stats.stats.median, 3)


def peak_mib(once) -> float | None:
    """The allocator's peak while ``once`` runs (CUDA; None elsewhere)."""
    if DEVICE.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    once()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, nargs="+", default=[SIZE])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="the K of the k<K> providers")
    parser.add_argument("--bf16-k", type=int, default=8)
    parser.add_argument("--images", type=int, default=None, help="default: the largest K + 1")
    parser.add_argument("--graph", action="store_true", help="also each K with graph=True (CUDA)")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    names = ([] if args.no_reference else ["reference"]) + ["per_image", "session"]
    names += [f"k{k}" for k in args.k if k > 1] + ([f"bf16_k{args.bf16_k}"] if args.bf16_k else [])
    images = args.images or max([*args.k, args.bf16_k, 1]) + 1
    rows = []
    for size in args.size:
        for threads in args.threads:
            torch.set_num_threads(threads)
            model, batches, config = setup_case(size, images)
            runs = {n: runner(n, model, batches, config) for n in names}
            if args.graph:
                runs.update({f"graph_{n}": runner(n, model, batches, config, graph=True)
                             for n in names if n not in ("reference", "per_image")})
            order = list(runs)
            peaks = {}
            for n, (once, _) in runs.items():
                once()  # bind and warm
                peaks[n] = peak_mib(once)
            times: dict[str, list[float]] = {n: [] for n in runs}
            for r in range(args.repeats):
                for n in rotation(order, r):
                    start = time.perf_counter()
                    runs[n][0]()
                    times[n].append(time.perf_counter() - start)
            base = images / statistics.median(times[order[0]])
            print(f"== {images} images 1x3x{size}x{size}, {threads} thread(s), {DEVICE}, {args.repeats} interleaved rounds")
            for n in order:
                rate = images / statistics.median(times[n])
                spread = f"{images / max(times[n]):.2f}-{images / min(times[n]):.2f}"
                peak = "" if peaks[n] is None else f"  peak {peaks[n]:.0f} MiB"
                print(f"{n:<14} {rate:7.2f} images/s ({spread})  {rate / base:5.2f}x {order[0]}{peak}", flush=True)
                rows.append({"provider": n, "size": size, "threads": threads, "images": images,
                             "images_per_s": rate, "over_first": rate / base, "first": order[0],
                             "peak_mib": peaks[n], "runs_s": times[n]})
            for _, done in runs.values():
                done()
    if args.json:
        json.dump({"device": str(DEVICE), "rows": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
