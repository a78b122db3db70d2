"""Test models and data: TinyDet (every kind of normalisation), a list adapter, each method's small case."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A linear layer with a low-rank adapter (selected by lora_only / adapter_only)."""

    def __init__(self, dim: int, rank: int = 2):
        super().__init__()
        self.base = nn.Linear(dim, dim)
        self.lora_a = nn.Linear(dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))

class TinyDet(nn.Module):
    """Conv+BN, conv+GN, a LoRA block and a LayerNorm'd query head: a detector in miniature.

    Convolutions feeding a norm carry no bias (a bias a norm cancels has a pure-noise gradient
    that Adam amplifies, which no float implementation can match).
    """

    def __init__(self, queries: int = 6, classes: int = 7, width: int = 16):
        super().__init__()
        self.queries, self.classes = queries, classes
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, width, 3, padding=1, stride=2, bias=False)
        self.gn = nn.GroupNorm(4, width)
        self.lora = LoRALinear(width)
        self.head = nn.Linear(width, queries * classes)
        self.ln = nn.LayerNorm(classes)
        self.box = nn.Linear(width, queries * 4)
        self.depth_head = nn.Linear(width, queries)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.gn(self.conv2(h))).mean(dim=(2, 3))
        h = h + torch.tanh(self.lora(h))
        b = h.shape[0]
        logits = self.ln(self.head(h).view(b, self.queries, self.classes)) * 2.0
        return {
            "logits": logits,
            "bbox": torch.sigmoid(self.box(h)).view(b, self.queries, 4),
            "depth": self.depth_head(h).view(b, self.queries, 1),
        }

class ListAdapter:
    """YOLOZU's adapter contract over a fixed list of batches."""

    def __init__(self, model: Any, batches: list[Any]):
        self.model = model
        self.batches = batches

    def get_model(self) -> Any:
        return self.model

    def build_loader(self, records, *, batch_size: int = 1):
        yield from self.batches

def make_model(seed: int = 0, **kwargs: Any) -> TinyDet:
    torch.manual_seed(seed)
    return TinyDet(**kwargs)

def make_batches(n: int = 2, seed: int = 1, shape=(2, 3, 12, 12)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]

#: one small case per method (TinyDet; MIM: test_methods_mim's ReconNet), for the checks every method takes
METHOD_CONFIGS = {
    "tent": dict(method="tent"),
    "eata": dict(method="eata", eata_conf_min=0.0, eata_entropy_min=0.0, eata_entropy_max=100.0),
    "sar": dict(method="sar"),
    "cotta": dict(method="cotta", cotta_restore_prob=0.01),
    "mim": dict(method="mim"),
}

def method_config(method: str, **kw: Any) -> Any:
    """``METHOD_CONFIGS[method]`` as a TTTConfig: 3 steps over 2 batches, lr 1e-2, clip 1.0, then ``kw``."""
    from yolozu.tta.config import TTTConfig

    base = dict(enabled=True, steps=3, max_batches=2, lr=1e-2, max_grad_norm=1.0, **METHOD_CONFIGS[method])
    base.update(kw)
    return TTTConfig(**base)

def method_case(method: str, device: Any = "cpu") -> tuple[nn.Module, list[torch.Tensor]]:
    """The model and batches of ``method``'s small case, on ``device``."""
    if method == "mim":
        from test_methods_mim import ReconNet

        torch.manual_seed(0)
        model, batches = ReconNet("recon"), make_batches(2, shape=(2, 3, 32, 32))
    else:
        model, batches = make_model(), make_batches()
    return model.to(device), [b.to(device) for b in batches]
