"""Plain-torch twins of the loss ops (what the sample-parallel methods ran under ``vmap`` before the
ops had batching rules): the oracles the ops under vmap are checked against, and the per-image
entropy whose gradients the sample-parallel tests compare."""
from __future__ import annotations

import torch

from yolozu_ttt import ops
from yolozu_ttt.seam import integration as _ref


def plain_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean softmax entropy over all rows (the fused op's value) in plain torch ops."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def plain_signals(logits: torch.Tensor, conf_min: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EATA's per-sample ``(conf, entropy, valid)`` of one image's logits in plain torch ops (the row
    math of ``ops.entropy_stats``' torch path); other inputs take the reference."""
    if logits.ndim < 2 or not logits.is_floating_point() or logits.shape[-1] <= 1:
        return _ref._eata_sample_signals(logits, conf_min=conf_min)
    batch = int(logits.shape[0])
    _, h, conf = ops._torch_entropy_rows(logits.detach())
    conf, h = conf.view(batch, -1), h.view(batch, -1)
    valid = (conf >= float(conf_min)).to(torch.float32).sum(dim=1) if logits.ndim > 2 else torch.ones_like(conf[:, 0])
    return conf.mean(dim=1), h.mean(dim=1), valid


def plain_mask_ratio(grid: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """``masking.mask_ratio`` (the same exact count, the same fp32 division), from the expanded grid."""
    count = ops.expand_patch_mask(grid, height, width, patch_size).sum()
    return count.to(torch.float32) / float(height * width)
