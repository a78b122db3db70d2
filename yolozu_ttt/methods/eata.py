"""EATA on the fused engine: entropy over the selected samples, anchored to the pre-adaptation weights.

The anchor term ``lambda * sum_i mean((theta_i - theta_i^0)^2)`` and its gradient are computed
inside the fused update (``engine.step(anchor_lambda=...)``) instead of by autograd over every
parameter; the reported loss is ``adapt_loss + lambda * anchor_loss`` as in the reference.
"""
from __future__ import annotations

from typing import Any

import torch
from ..seam import integration as _ref

from .. import ops
from .loop import Method, StepOutcome

RATIO_STOP = "eata_selected_ratio_below_min"
SELECTION_KEYS = ("step", "selected_count", "batch_count", "selected_ratio", "mean_conf", "mean_entropy",
                  "mean_valid_dets", "rolled_back", "skipped")
NORM_KEYS = ("grad_norm", "grad_norm_clipped", "update_norm", "total_update_norm")
#: the reference's step entries: an update, and a step with nothing selected
ENTRY_LAYOUT = SELECTION_KEYS + ("loss", "adapt_loss", "anchor_loss", "anchor_lambda") + NORM_KEYS
SKIP_LAYOUT = SELECTION_KEYS + ("skip_reason", "skip_streak", "loss", "anchor_loss", "adapt_loss") + NORM_KEYS
SKIP_STOP = "eata_max_skip_streak_exceeded"


def sample_signals(logits: torch.Tensor, conf_min: float):
    """Per-sample ``(conf, entropy, valid)`` in one fused pass; other inputs take the reference."""
    if logits.ndim >= 2 and logits.is_floating_point():
        return ops.entropy_stats(logits, conf_min)
    return _ref._eata_sample_signals(logits, conf_min=conf_min)


def select_samples(config: Any, conf: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The samples passing the confidence, entropy-band and valid-detection thresholds."""
    return ((conf >= float(config.eata_conf_min)) & (entropy >= float(config.eata_entropy_min))
            & (entropy <= float(config.eata_entropy_max)) & (valid >= float(int(config.eata_min_valid_dets))))


def summary(mask: torch.Tensor, conf: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Selected count and the mean conf / entropy / valid detections, as four float64 device scalars."""
    if conf.numel() == 0:
        return torch.zeros(4, dtype=torch.float64, device=conf.device)
    return torch.stack([mask.sum().double(), conf.mean().double(), entropy.mean().double(), valid.mean().double()])


#: a row whose softmax entropy is exactly 0 (its softmax is one-hot: exp(-1e4) is 0 in every
#: supported dtype) and whose gradient is 0: the stand-in for a row not selected
UNSELECTED_LOGIT = -1.0e4


def adapt_loss(logits: torch.Tensor, mask: torch.Tensor, count: torch.Tensor, batch: int) -> torch.Tensor:
    """Mean entropy over the rows of the selected samples, without reading the selection: the rows of
    samples not selected are replaced by rows of entropy 0 and the mean over all rows is rescaled by
    ``batch / count`` (exactly 1 when all are selected; with none selected, the gated update applies
    nothing, whatever the loss). The fused op batches under ``vmap`` (the sample-parallel replicas)."""
    if logits.ndim < 2 or logits.shape[-1] <= 1:
        return ops.entropy_loss(logits) if logits.is_floating_point() else _ref._entropy_loss_from_logits(logits)
    row = torch.full(logits.shape[-1:], UNSELECTED_LOGIT, dtype=logits.dtype, device=logits.device)
    row[0] = 0.0
    rows = torch.where(mask.reshape((-1,) + (1,) * (logits.ndim - 1)), logits, row)
    return ops.entropy_loss(rows) * (float(batch) / count.clamp(min=1).to(torch.float32))


class EATA(Method):
    """Entropy over the confident, non-redundant samples, anchored to the starting weights."""

    preclip_norm_reported = True

    def select(self) -> list[torch.Tensor]:
        self.lam = float(self.config.eata_anchor_lambda)
        self.ratio_min = float(self.config.eata_selected_ratio_min)
        return super().select()

    def begin(self, run: Any, ctxs: list[Any]) -> None:
        super().begin(run, ctxs)
        self.streaks = [0] * len(ctxs)  # each image's run of steps with nothing selected

    def needs_snapshot(self) -> bool:
        return super().needs_snapshot() or (bool(self.config.rollback_on_stop) and self.ratio_min > 0.0)

    def update_options(self) -> dict[str, Any]:
        return {"anchor_lambda": self.lam, "gated": True}  # the anchor term and its gradient, in the update

    def check_batch(self, x: Any) -> None:
        """The reference's batch checks and messages."""
        if not torch.is_tensor(x):
            raise RuntimeError("EATA requires tensor batches from adapter.build_loader()")
        if x.ndim == 0:
            raise RuntimeError("EATA requires batched tensor input")

    def loss(self, net: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's forward and sample selection: (the selected samples' entropy, the selection
        summary, the batch size as a device value read with the step)."""
        if x.ndim == 0:
            raise RuntimeError("EATA requires batched tensor input")
        config = self.config
        logits = _ref._extract_logits(net(x))
        if logits.ndim == 0:
            raise RuntimeError("EATA logits must have batch dimension")
        conf, entropy, valid = sample_signals(logits, float(config.eata_conf_min))
        mask = select_samples(config, conf, entropy, valid)
        batch = int(conf.shape[0]) if conf.ndim >= 1 else 1
        selection = summary(mask, conf, entropy, valid)
        size = torch.full((), float(batch), dtype=torch.float64, device=selection.device)
        return adapt_loss(logits, mask, selection[0], batch), selection, size

    def passes(self, run: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward and selection; the selected samples' entropy and its backward where anything is
        selected (read eagerly: nothing selected runs no backward and no update, as in the
        reference); every selected parameter has a grad (the reference's anchor term reaches them
        all, even at lambda 0); the update gated by the selection on the device: (adapt loss,
        selection summary, batch size[, anchor value])."""
        loss, selection, size = run.backward(self.loss, x, worth=self.selects)
        run.arena.mark_all_grads()
        run.engine.gate(selection[..., 0] > 0)
        anchor = (run.engine.anchor_value(),) if self.lam == 0.0 else ()  # else the update's own
        return (loss, selection, size) + anchor

    @staticmethod
    def selects(columns: list[list[float]]) -> bool:
        """Whether any image selected a sample (its read values: adapt loss, selected count, ...)."""
        return any(column[1] > 0 for column in columns)

    def outcome(self, stats: Any, values: list[float], step: int, i: int) -> StepOutcome:
        """Image i's outcome and skip streak from its values (``passes``'s, or those read before a
        backward that did not run); a step with nothing selected reports the stats of no update."""
        adapt_value, count, mean_conf, mean_entropy, mean_valid, batch = values[:6]
        anchor_loss = values[6] if self.lam == 0.0 and len(values) > 6 else stats.anchor_loss
        count, batch, lam = int(count), int(batch), self.lam
        ratio = float(count) / float(max(1, batch))
        metrics: dict[str, Any] = {"selected_count": count, "batch_count": batch, "selected_ratio": ratio,
                                   "mean_conf": mean_conf, "mean_entropy": mean_entropy, "mean_valid_dets": mean_valid}
        if count <= 0:  # the gate kept the update from applying anything
            self.streaks[i] += 1
            idle = stats._replace(grad_norm=0.0, grad_norm_clipped=0.0, update_norm=0.0, anchor_loss=0.0,
                                  clip_coef=1.0, restored=0.0)
            return self.skip(metrics, self.streaks[i], idle, self.ctxs[i].warnings)
        self.streaks[i] = 0
        metrics.update({"skipped": False, "adapt_loss": float(adapt_value), "anchor_loss": float(anchor_loss),
                        "anchor_lambda": lam})
        return StepOutcome(loss=adapt_value + lam * anchor_loss, stats=stats, metrics=metrics, layout=ENTRY_LAYOUT,
                           method_stop=RATIO_STOP if ratio < self.ratio_min else None)

    def skip(self, metrics: dict[str, Any], streak: int, idle: Any, warnings: list[str]) -> StepOutcome:
        """A step with nothing selected: no backward, no update, no guard (a captured step runs its
        backward, gated: counted as none, as the reference's); a long streak stops."""
        metrics.update({"skipped": True, "skip_reason": "empty_selected_set", "skip_streak": int(streak),
                        "anchor_loss": 0.0, "adapt_loss": 0.0, "grad_norm": None})
        warnings.append("eata_empty_selected_set")
        stop = SKIP_STOP if streak > max(0, int(self.config.eata_max_skip_streak)) else None
        return StepOutcome(loss=None, stats=idle, metrics=metrics, backwards=0, optimizer_steps=0,
                           skipped=True, skip_stop=stop, layout=SKIP_LAYOUT)


METHOD = EATA
