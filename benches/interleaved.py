"""End-to-end reference vs fast, interleaved: one run of each in turn, repeated, in one process.

pytest-benchmark times all rounds of one provider before the next, so a burst of load on a shared
machine lands on one side of the ratio. This script alternates reference, fast and floor runs
(builtin RT-DETR, the cases of bench_run_ttt.py / bench_methods.py) through ``yolozu_ttt.timing``
(the demo's runner: the order rotates every round), and prints each side's median and the ratio of
medians (``--verbose``: every run).

    python benches/interleaved.py --repeats 5 tent/all eata/all sar/all cotta/all mim/all
    python benches/interleaved.py --repeats 4 eata-defaults/norm_only   # YOLOZU's default selection

``--before MODULE`` adds a fourth provider, ``before``: another build of this package importable
as MODULE (e.g. an earlier commit's wheel unpacked as ``yolozu_ttt_old``, its pybind11 class
made ``py::module_local()`` and its ``torch.library`` namespace renamed), for an A/B of a change
in the same run.
"""
from __future__ import annotations

import argparse
import copy
import importlib

import torch
from yolozu.tta.config import TTTConfig
from yolozu.tta.integration import run_ttt as reference_run_ttt

import bench_methods
import bench_run_ttt
import yolozu_ttt
from conftest import FixedAdapter, tent_floor_run
from yolozu_ttt import timing


#: ``eata-defaults/F``: EATA at YOLOZU's default selection (conf >= 0.2, entropy in [0.05, 3.0], one
#: valid detection), where the builtin RT-DETR selects nothing and every step is skipped: 2 images at
#: 320 px in one batch, 4 steps (the other eata cases select every sample)
EATA_DEFAULTS = dict(shape=(2, 3, 320, 320), steps=4)


def case(name: str):
    """(model, batch, config, floor) for 'method/update_filter'."""
    method, update_filter = name.split("/")
    if method == "eata-defaults":
        model = bench_methods.build_models()[0][False][0]
        batch = torch.randn(EATA_DEFAULTS["shape"], generator=torch.Generator().manual_seed(0))
        config = TTTConfig(enabled=True, method="eata", steps=EATA_DEFAULTS["steps"], update_filter=update_filter,
                           lr=1e-4, seed=0)
        return model, batch, config, lambda m: bench_methods.floor_run("eata", m, batch, update_filter)
    if method == "tent":
        from yolozu.inference.adapter import RTDETRPoseAdapter

        model = RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model()
        batch = torch.randn(bench_run_ttt.BATCH, generator=torch.Generator().manual_seed(0))
        config = TTTConfig(enabled=True, method="tent", steps=bench_run_ttt.STEPS, update_filter=update_filter,
                           lr=1e-4)
        return model, batch, config, lambda m: tent_floor_run(m, batch, update_filter, bench_run_ttt.STEPS)
    by_mim, x = bench_methods.build_models()
    model, _ = by_mim[method == "mim"]
    config = TTTConfig(enabled=True, method=method, steps=bench_methods.STEPS, update_filter=update_filter,
                       lr=1e-4, seed=0, cotta_restore_prob=0.01, eata_entropy_max=10.0, eata_conf_min=0.0)
    return model, x, config, lambda m: bench_methods.floor_run(method, m, x, update_filter)


def interleave(runs: dict, model, state: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each ``runs[provider](model)``, ``repeats`` rounds after one dropped warm-up round,
    the model reset to ``state`` (eval mode) before each run, in ``yolozu_ttt.timing``'s rotating
    order (the demo's runner)."""
    def prepare(provider: str, _round: int):
        model.load_state_dict(state)
        model.eval()
        return lambda: runs[provider](model)

    return timing.interleave(prepare, list(runs), repeats)


def print_rounds(times: dict[str, list[float]]) -> None:
    """Every round's time of every provider, in ms (``--verbose``)."""
    width = max(len(k) for k in times)
    for k, v in times.items():
        print(f"    {k:<{width}} " + " ".join(f"{x * 1e3:7.0f}" for x in v), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--verbose", action="store_true", help="print every run's time")
    parser.add_argument("--before", metavar="MODULE", help="an earlier build of yolozu_ttt to time as 'before'")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.cases:
        model, batch, config, floor = case(name)
        state = copy.deepcopy(model.state_dict())
        runs = {"reference": lambda m: reference_run_ttt(FixedAdapter(m, batch), [], config=config),
                "fast": lambda m: yolozu_ttt.run_ttt(FixedAdapter(m, batch), [], config=config),
                "floor": floor}
        if args.before:
            before = importlib.import_module(args.before)
            runs["before"] = lambda m: before.run_ttt(FixedAdapter(m, batch), [], config=config)
        times = interleave(runs, model, state, args.repeats)
        med = {k: s.median for k, s in timing.spreads(times).items()}
        print(f"{name:<16} median reference {med['reference'] * 1e3:8.1f} ms  fast {med['fast'] * 1e3:8.1f} ms  "
              f"floor {med['floor'] * 1e3:8.1f} ms  speed-up {med['reference'] / med['fast']:.2f}x  "
              f"fast/floor {med['fast'] / med['floor']:.2f}x  ({args.repeats} interleaved repeats)", flush=True)
        if args.before:
            print(f"{'':<16} before {med['before'] * 1e3:8.1f} ms  before/floor {med['before'] / med['floor']:.2f}x  "
                  f"fast/before {med['fast'] / med['before']:.2f}x", flush=True)
        if args.verbose:
            print_rounds(times)


if __name__ == "__main__":
    main()
