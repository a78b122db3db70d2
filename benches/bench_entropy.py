"""Entropy loss forward + backward: YOLOZU's reference vs yolozu_ttt.ops.entropy_loss.

    python -m pytest benches/bench_entropy.py --benchmark-only

One ``benchmark.group`` per shape ("entropy (8,300,1203)"), providers "reference" and
"fast"; the ratio is read from the saved json.  On CUDA ``extra_info["GB/s"]`` is the
achieved bandwidth of the fast path (fwd reads z once, bwd reads z and writes dz).
"""
from __future__ import annotations

import pytest
import torch
from conftest import sync

from yolozu.tta.integration import _entropy_loss_from_logits
from yolozu_ttt import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2, 300, 81), (8, 300, 1203), (64, 32000)]
PROVIDERS = {"reference": _entropy_loss_from_logits, "fast": ops.entropy_loss}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", ["reference", "fast"])
def test_entropy_fwd_bwd(benchmark, provider, shape):
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(shape, generator=gen) * 3.0).to(DEVICE).requires_grad_(True)
    fn = PROVIDERS[provider]

    def step():
        z.grad = None
        fn(z).backward()
        sync(DEVICE)

    benchmark.group = f"entropy ({','.join(map(str, shape))})"
    benchmark.extra_info.update({"provider": provider, "shape": list(shape), "device": DEVICE})
    step()  # warm-up (Triton compile / allocator)
    rounds = 30 if z.numel() < 1_000_000 else 8
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    if DEVICE == "cuda" and benchmark.stats is not None:
        nbytes = 3 * z.numel() * z.element_size()
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.mean / 1e9


@pytest.mark.parametrize("shape", [(2, 300, 81), (8, 300, 1203)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", ["reference", "fast"])
def test_eata_signals(benchmark, provider, shape):
    """EATA's per-sample (conf, entropy, valid) of (B, Q, C) logits."""
    from yolozu.tta.integration import _eata_sample_signals

    z = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3.0).to(DEVICE)
    if provider == "reference":
        def step():
            _eata_sample_signals(z, conf_min=0.1)
            sync(DEVICE)
    else:
        def step():
            ops.entropy_stats(z, 0.1)
            sync(DEVICE)

    benchmark.group = f"eata signals ({','.join(map(str, shape))})"
    benchmark.extra_info.update({"provider": provider, "shape": list(shape), "device": DEVICE})
    step()
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=1)
