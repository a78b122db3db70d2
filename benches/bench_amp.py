"""Mixed-precision adaptation, interleaved: fp32 floor, bf16 floor, fast fp32, fast bf16 (and fp16).

Builtin RT-DETR (init_seed=0), one (2, 3, 320, 320) batch, ``STEPS`` steps, lr 1e-4, per case
'method/update_filter'. ``floor``: the same forwards and backwards with only the selected
parameters' gradients (entropy of the logits, as in bench_run_ttt.py), nothing else; ``floor bf16``
the same under ``torch.autocast``. Providers alternate in an order that rotates every round (the
first round warms up and is dropped); medians and the ratios to the fp32 floor are printed.

    python benches/bench_amp.py --repeats 5 tent/norm_only eata/norm_only
    python benches/bench_amp.py --fp16 tent/norm_only           # adds fast fp16 (slow on CPUs)
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from yolozu.tta.config import TTTConfig
from yolozu.tta.ttt_mim import select_parameters

import yolozu_ttt
from conftest import FixedAdapter
from interleaved import interleave, print_rounds
from yolozu_ttt import amp as amp_mod
from yolozu_ttt import timing

STEPS = 3
BATCH = (2, 3, 320, 320)


def floor_run(model, x, update_filter: str, amp: str) -> None:
    """Forward (under autocast for bf16) + fp32 entropy + backward per step, selected grads only."""
    selected = select_parameters(model, update_filter=update_filter)
    model.train()
    ctx = (lambda: torch.autocast(x.device.type, dtype=amp_mod.AMP_DTYPES[amp])) if amp != "off" else contextlib.nullcontext
    try:
        for _ in range(STEPS):
            with ctx():
                logits = model(x)["logits"]
            p = logits.float().softmax(-1)
            (-(p * p.clamp_min(1e-12).log()).sum(-1).mean()).backward(inputs=selected)
    finally:
        for p in model.parameters():
            p.grad = None
        model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fp16", action="store_true", help="also time fast fp16")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    from yolozu.inference.adapter import RTDETRPoseAdapter

    model = RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model().eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(BATCH, generator=torch.Generator().manual_seed(0))
    for name in args.cases:
        method, update_filter = name.split("/")
        config = TTTConfig(enabled=True, method=method, steps=STEPS, update_filter=update_filter, lr=1e-4, seed=0,
                           eata_entropy_max=10.0, eata_conf_min=0.0)
        runs = {
            "floor fp32": lambda m: floor_run(m, x, update_filter, "off"),
            "floor bf16": lambda m: floor_run(m, x, update_filter, "bf16"),
            "fast fp32": lambda m: yolozu_ttt.run_ttt(FixedAdapter(m, x), [], config=config),
            "fast bf16": lambda m: yolozu_ttt.run_ttt(FixedAdapter(m, x), [], config=config, amp="bf16"),
        }
        if args.fp16:
            runs["fast fp16"] = lambda m: yolozu_ttt.run_ttt(FixedAdapter(m, x), [], config=config, amp="fp16")
        times = interleave(runs, model, state, args.repeats)
        spread = timing.spreads(times)
        med = {k: v.median for k, v in spread.items()}
        base = med["floor fp32"]
        cells = "  ".join(f"{k} {v * 1e3:7.0f} ms ({base / v:.2f}x)" for k, v in med.items())
        low = {k: v.low for k, v in spread.items()}  # load only ever adds time
        cells += "\n" + " " * 17 + "fastest: " + "  ".join(
            f"{k} {v * 1e3:7.0f} ms ({low['floor fp32'] / v:.2f}x)" for k, v in low.items())
        print(f"{name:<16} {cells}  [speed-up vs fp32 floor; {args.repeats} interleaved repeats, {STEPS} steps, "
              f"batch {'x'.join(map(str, BATCH))}]", flush=True)
        if args.verbose:
            print_rounds(times)


if __name__ == "__main__":
    main()
