"""EATA on the fused engine: entropy over the selected samples, anchored to the pre-adaptation weights.

The anchor term ``lambda * sum_i mean((theta_i - theta_i^0)^2)`` and its gradient are computed
inside the fused update (``engine.step(anchor_lambda=...)``) instead of by autograd over every
parameter; the reported loss is ``adapt_loss + lambda * anchor_loss`` as in the reference.
"""
from __future__ import annotations

from typing import Any

import torch
from yolozu.tta import integration as _ref

from .. import ops
from ..arena import ParamArena
from ..engine import UpdateEngine
from .loop import Method, StepOutcome

RATIO_STOP = "eata_selected_ratio_below_min"
SELECTION_KEYS = ("step", "selected_count", "batch_count", "selected_ratio", "mean_conf", "mean_entropy",
                  "mean_valid_dets", "rolled_back", "skipped")
NORM_KEYS = ("grad_norm", "grad_norm_clipped", "update_norm", "total_update_norm")
#: the reference's step entries: an update, and a step with nothing selected
ENTRY_LAYOUT = SELECTION_KEYS + ("loss", "adapt_loss", "anchor_loss", "anchor_lambda") + NORM_KEYS
SKIP_LAYOUT = SELECTION_KEYS + ("skip_reason", "skip_streak", "loss", "anchor_loss", "adapt_loss") + NORM_KEYS
SKIP_STOP = "eata_max_skip_streak_exceeded"


def check_batch(x: Any) -> None:
    """The reference's batch checks and messages."""
    if not torch.is_tensor(x):
        raise RuntimeError("EATA requires tensor batches from adapter.build_loader()")
    if x.ndim == 0:
        raise RuntimeError("EATA requires batched tensor input")


def sample_signals(logits: torch.Tensor, conf_min: float):
    """Per-sample ``(conf, entropy, valid)`` in one fused pass; other inputs take the reference."""
    if logits.ndim >= 2 and logits.is_floating_point():
        return ops.entropy_stats(logits, conf_min)
    return _ref._eata_sample_signals(logits, conf_min=conf_min)


def select_samples(config: Any, conf: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The samples passing the confidence, entropy-band and valid-detection thresholds."""
    return ((conf >= float(config.eata_conf_min)) & (entropy >= float(config.eata_entropy_min))
            & (entropy <= float(config.eata_entropy_max)) & (valid >= float(int(config.eata_min_valid_dets))))


def summary(mask: torch.Tensor, conf: torch.Tensor, entropy: torch.Tensor,
            valid: torch.Tensor) -> tuple[list[float], list[int]]:
    """Selected count, the mean conf / entropy / valid detections and the selected samples' indices,
    in one host read."""
    if conf.numel() == 0:
        return [0.0, 0.0, 0.0, 0.0], []
    got = torch.cat([torch.stack([mask.sum().double(), conf.mean().double(), entropy.mean().double(),
                                  valid.mean().double()]), mask.reshape(-1).double()]).tolist()
    return got[:4], [i for i, m in enumerate(got[4:]) if m]


def adapt_loss(logits: torch.Tensor, selected: list[int], batch: int) -> torch.Tensor:
    """Mean entropy over the rows of the ``selected`` samples (``logits.sum() * 0`` when there are none);
    a partial selection is gathered by indices known on the host (``logits[mask]`` would read the
    mask from the device again)."""
    rows = logits if len(selected) == batch else logits.index_select(0, host_index(selected, logits.device))
    if rows.numel() == 0:
        return logits.sum() * 0.0
    return ops.entropy_loss(rows)


def host_index(indices: list[int], device: torch.device) -> torch.Tensor:
    """``indices`` as an int64 tensor on ``device`` (on CUDA through pinned memory, no host sync)."""
    index = torch.tensor(indices, dtype=torch.int64)
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


class EATA(Method):
    """Entropy over the confident, non-redundant samples, anchored to the starting weights."""

    def select(self) -> list[torch.Tensor]:
        self.lam = float(self.config.eata_anchor_lambda)
        self.ratio_min = float(self.config.eata_selected_ratio_min)
        self.streak = 0
        return super().select()

    def needs_snapshot(self) -> bool:
        return super().needs_snapshot() or (bool(self.config.rollback_on_stop) and self.ratio_min > 0.0)

    def check_batch(self, x: Any) -> None:
        check_batch(x)

    def adapt(self, x: Any, step: int, arena: ParamArena, engine: UpdateEngine, write_snapshot: bool) -> StepOutcome:
        config, lam = self.config, self.lam
        logits = _ref._extract_logits(self.ctx.model(x))
        if logits.ndim == 0:
            raise RuntimeError("EATA logits must have batch dimension")
        conf, entropy, valid = sample_signals(logits, float(config.eata_conf_min))
        mask = select_samples(config, conf, entropy, valid)
        batch = int(conf.shape[0]) if conf.ndim >= 1 else 1
        (count, mean_conf, mean_entropy, mean_valid), selected = summary(mask, conf, entropy, valid)
        count = int(count)
        ratio = float(count) / float(max(1, batch))
        metrics: dict[str, Any] = {
            "selected_count": count, "batch_count": batch, "selected_ratio": ratio,
            "mean_conf": mean_conf, "mean_entropy": mean_entropy, "mean_valid_dets": mean_valid,
        }
        if count <= 0:
            return self.skip(engine, metrics)
        self.streak = 0
        loss = adapt_loss(logits, selected, batch)
        arena.zero_grad()
        if loss.requires_grad:  # the reference's anchor term always makes its loss differentiable
            arena.backward(loss)
        arena.mark_all_grads()  # the reference's anchor term reaches every selected parameter, even at lambda 0
        anchor = engine.anchor_value() if lam == 0.0 else None
        extra = (loss,) if anchor is None else (loss, anchor)
        stats, values = engine.step(anchor_lambda=lam, write_snapshot=write_snapshot, extra=extra)
        adapt_value = values[0]
        anchor_loss = values[1] if anchor is not None else stats.anchor_loss
        loss_value = adapt_value + lam * anchor_loss
        metrics.update({
            "skipped": False, "adapt_loss": float(adapt_value), "anchor_loss": float(anchor_loss),
            "anchor_lambda": lam,
            "grad_norm_clipped": float(stats.grad_norm) if config.max_grad_norm is not None else None,
        })
        return StepOutcome(loss=loss_value, stats=stats, metrics=metrics, layout=ENTRY_LAYOUT,
                           method_stop=RATIO_STOP if ratio < self.ratio_min else None)

    def skip(self, engine: UpdateEngine, metrics: dict[str, Any]) -> StepOutcome:
        """A step with nothing selected: no backward, no update, no guard; a long streak stops."""
        self.streak += 1
        metrics.update({
            "skipped": True, "skip_reason": "empty_selected_set", "skip_streak": int(self.streak),
            "anchor_loss": 0.0, "adapt_loss": 0.0, "grad_norm": None, "grad_norm_clipped": None,
        })
        self.ctx.warnings.append("eata_empty_selected_set")
        stop = SKIP_STOP if self.streak > max(0, int(self.config.eata_max_skip_streak)) else None
        return StepOutcome(loss=None, stats=engine.idle_stats(), metrics=metrics, backwards=0, optimizer_steps=0,
                           skipped=True, skip_stop=stop, layout=SKIP_LAYOUT)


METHOD = EATA
