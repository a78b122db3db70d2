"""The floor: the model's own passes alone, the cost no update engine can remove.

``tent_floor_run`` is Tent's adaptation with the update engine taken away: per step one forward,
the entropy loss and a backward for the selected parameters only (no optimizer, no snapshot, no
guards, no report), then the device is waited for. A backend timed next to it shows how much of
its time is engine work: fast/floor near 1 means the passes are the cost on that device, and only
cheaper passes (``--ttt-amp bf16``) go lower. ``yolozu-ttt demo`` and ``benches/`` measure it
with this one function; ``FixedAdapter`` is YOLOZU's adapter contract over one fixed batch, so
every provider timed against the floor sees the same preloaded tensor (no image loading);
``RecordAdapter`` is the same contract with one preloaded batch per record (sample-mode sessions
in tests and benches).
"""
from __future__ import annotations

from typing import Any


class FixedAdapter:
    """YOLOZU's adapter contract over one fixed batch."""

    def __init__(self, model: Any, batch: Any):
        self.model, self.batch = model, batch

    def get_model(self) -> Any:
        return self.model

    def build_loader(self, records: Any, *, batch_size: int = 1):
        yield self.batch


class RecordAdapter:
    """YOLOZU's adapter contract where record ``{"i": n}`` is batch ``n`` of ``batches`` (one
    record, one batch: how a sample-mode session sees its images)."""

    def __init__(self, model: Any, batches: Any):
        self.model, self.batches = model, batches

    def get_model(self) -> Any:
        return self.model

    def build_loader(self, records: Any, *, batch_size: int = 1):
        for record in records:
            yield self.batches[record["i"]]


def tent_floor_run(model: Any, batch: Any, update_filter: str, steps: int) -> None:
    """Tent's floor: per step forward, entropy and backward for the selected parameters only (no
    optimizer, no bookkeeping), the model work no engine removes; then the device is waited for.
    The model is left in eval mode with no grads."""
    import torch
    from yolozu.tta.ttt_mim import select_parameters

    from .seam import integration as _ref

    selected = select_parameters(model, update_filter=update_filter)
    try:
        model.train()
        for _ in range(int(steps)):
            for p in selected:
                p.grad = None
            _ref._entropy_loss_from_logits(model(batch)["logits"]).backward(inputs=selected)
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
    finally:
        for p in model.parameters():
            p.grad = None
        model.eval()
