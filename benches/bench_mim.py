"""TTT-MIM step: mask draw + apply + masked reconstruction loss + backward at 2x3x640x640 and,
a small one where per-call host work dominates, 1x3x320x320.

    python -m pytest benches/bench_mim.py --benchmark-only

reference: ``generate_block_mask`` + ``apply_mask`` + ``reconstruction_loss`` + backward.
fast: the same generator call for the (gh, gw) grid + ``ops.apply_patch_mask`` +
``ops.masked_reconstruction_loss`` + backward (the full-resolution mask is never built).
The image is both the masked input and the target, so gradients flow through both
arguments.  On CUDA ``extra_info["GB/s"]`` is the fast path's achieved bandwidth.
"""
from __future__ import annotations

import pytest
import torch
from conftest import sync

from yolozu.tta.ttt_mim import apply_mask, generate_block_mask, reconstruction_loss
from yolozu_ttt import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(2, 3, 640, 640), (1, 3, 320, 320)]
PATCH = 16
PROB = 0.6


def _reference_step(x, gen):
    SHAPE = x.shape
    mask = generate_block_mask(SHAPE[-2], SHAPE[-1], patch_size=PATCH, mask_prob=PROB, generator=gen, device=x.device)
    loss = reconstruction_loss(apply_mask(x, mask), x, mask=mask)
    loss.backward()


def _fast_step(x, gen):
    SHAPE = x.shape
    gh, gw = -(-SHAPE[-2] // PATCH), -(-SHAPE[-1] // PATCH)
    grid = torch.rand((gh, gw), generator=gen, device=x.device) < PROB
    loss = ops.masked_reconstruction_loss(ops.apply_patch_mask(x, grid, patch_size=PATCH), x, grid, patch_size=PATCH)
    loss.backward()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", ["reference", "fast"])
def test_mim_step(benchmark, provider, shape):
    SHAPE = shape
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_(True)
    fn = _reference_step if provider == "reference" else _fast_step

    def step():
        x.grad = None
        fn(x, gen)
        sync(DEVICE)

    benchmark.group = f"mim mask+apply+loss+grad ({','.join(map(str, SHAPE))}, patch {PATCH})"
    benchmark.extra_info.update({"provider": provider, "shape": list(SHAPE), "patch": PATCH, "device": DEVICE})
    step()
    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=1)
    if DEVICE == "cuda" and benchmark.stats is not None:
        # apply fwd: r+w; loss fwd: ~r x2 (masked part); loss bwd: r x2 + w; apply bwd: r+w; neg: r+w.
        nbytes = 10 * x.numel() * x.element_size()
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.mean / 1e9
