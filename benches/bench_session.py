"""Sample mode in Python: per-image ``run_ttt`` vs one ``TTTSession`` vs ``run_parallel`` K at once.

Builtin RT-DETR, Tent/norm_only, 1 step, ``IMAGES`` records of one 1x3xSxS image each (S = 160 by
default, ``YOLOZU_TTT_BENCH_SIZE``), each adapted alone from the same start, as YOLOZU's sample loop
does (no prediction: adaptation only). CPU unless ``YOLOZU_TTT_BENCH_DEVICE=cuda``.

providers:
    per_image   ``run_ttt`` per record, the model restored in place before each (today's loop
                without a session)
    session     one ``TTTSession``, ``session.run([record])`` per record (bound once)
    parallel_k4 one ``TTTSession``, ``session.run_parallel(records, 4)`` (the first record alone,
                then groups of 4)

    python -m pytest benches/bench_session.py --benchmark-only
    python benches/bench_session.py --repeats 3      # interleaved, rotating order, medians
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import pytest
import torch
from conftest import bench_device
from yolozu.tta.config import TTTConfig

import yolozu_ttt
from yolozu_ttt.floor import RecordAdapter
from yolozu_ttt.run import TTTSession

IMAGES = 5
SIZE = int(os.environ.get("YOLOZU_TTT_BENCH_SIZE", "160"))
DEVICE = bench_device()
PROVIDERS = ("per_image", "session", "parallel_k4")


def setup_case():
    from yolozu.inference.adapter import RTDETRPoseAdapter

    model = RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model().to(DEVICE).eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, SIZE, SIZE, generator=g).to(DEVICE) for _ in range(IMAGES)]
    config = TTTConfig(enabled=True, method="tent", steps=1, update_filter="norm_only", lr=1e-4, reset="sample")
    return model, images, config


def runner(provider: str, model, images, config):
    """A callable adapting every record once with ``provider`` on its own copy of ``model`` (a
    session is built once, outside), and what to call when done."""
    model = copy.deepcopy(model)
    records = [{"i": i} for i in range(len(images))]
    adapter = RecordAdapter(model, images)
    state = copy.deepcopy(model.state_dict())
    if provider == "per_image":
        def once():
            for record in records:
                model.load_state_dict(state)
                yolozu_ttt.run_ttt(adapter, [record], config=config)
        return once, lambda: model.load_state_dict(state)
    session = TTTSession(adapter, config)
    if provider == "session":
        def once():
            for record in records:
                session.run([record])
    else:
        def once():
            session.run_parallel(records, 4)
    return once, session.close


@pytest.fixture(scope="module")
def case():
    return setup_case()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sample_mode_tent(benchmark, case, provider):
    once, done = runner(provider, *case)
    once()  # bind and warm
    benchmark.group = f"sample mode tent/norm_only ({IMAGES} images, 1x3x{SIZE}x{SIZE}, 1 step)"
    benchmark.extra_info.update({"provider": provider, "images": IMAGES, "size": SIZE, "device": str(DEVICE)})
    benchmark.pedantic(once, rounds=3, iterations=1)
    done()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, images, config = setup_case()
    runs = {p: runner(p, model, images, config) for p in PROVIDERS}
    for once, _ in runs.values():
        once()  # bind and warm
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for r in range(args.repeats):
        order = PROVIDERS[r % len(PROVIDERS):] + PROVIDERS[:r % len(PROVIDERS)]
        for p in order:
            start = time.perf_counter()
            runs[p][0]()
            times[p].append(time.perf_counter() - start)
    base = statistics.median(times["per_image"])
    for p in PROVIDERS:
        med = statistics.median(times[p])
        print(f"{p:12s} median {med:.3f} s ({med / IMAGES * 1000:.0f} ms/image)  per_image/{p} {base / med:.2f}x")
    for _, done in runs.values():
        done()


if __name__ == "__main__":
    main()
