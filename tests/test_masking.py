"""yolozu_ttt.masking: TTT-MIM's patch grid against the reference's full-resolution mask."""
from __future__ import annotations

import torch
from yolozu.tta.ttt_mim import generate_block_mask

from yolozu_ttt import masking


def test_grid_expands_to_the_reference_mask_and_ratio():
    for h, w, ps in [(37, 50, 16), (5, 7, 16), (64, 64, 16), (33, 1, 4), (17, 31, 5)]:
        grid = masking.draw_grid(torch.zeros(1, 3, h, w), ps, 0.5, torch.Generator().manual_seed(h))
        full = generate_block_mask(h, w, patch_size=ps, mask_prob=0.5, generator=torch.Generator().manual_seed(h))
        assert torch.equal(masking.full_mask(grid, torch.zeros(h, w), ps), full)
        assert float(masking.mask_ratio(grid, h, w, ps)) == float(full.float().mean().item())
