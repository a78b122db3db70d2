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
from ..common import STAT_KEYS
from .replica import ReplicaMethod, split
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
        self.streak, self.learns = 0, True
        return super().select()

    def reset(self, ctx: Any) -> None:
        super().reset(ctx)
        self.streak = 0

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

    def passes(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward and selection; where anything is selected (eagerly read: nothing selected runs no
        backward, as in the reference), the selected samples' entropy, its backward and the update's
        gate: (selection summary, batch size, adapt loss[, anchor value])."""
        config, arena = self.config, self.arena
        logits = _ref._extract_logits(self.ctx.model(x))
        if logits.ndim == 0:
            raise RuntimeError("EATA logits must have batch dimension")
        conf, entropy, valid = sample_signals(logits, float(config.eata_conf_min))
        mask = select_samples(config, conf, entropy, valid)
        batch = int(conf.shape[0]) if conf.ndim >= 1 else 1
        selection = summary(mask, conf, entropy, valid)
        early = self.read_before_backward(selection)
        self.learns = early is None or early[0] > 0
        if not self.learns:  # the step's values, on the host (the loss and anchor are unread)
            return (*early, float(batch), 0.0) + ((0.0,) if self.lam == 0.0 else ())
        loss = adapt_loss(logits, mask, selection[0], batch)
        if loss.requires_grad:  # the reference's anchor term always makes its loss differentiable
            arena.backward(loss)
        arena.mark_all_grads()  # the reference's anchor term reaches every selected parameter, even at lambda 0
        self.engine.gate(selection[0] > 0)
        anchor = (self.engine.anchor_value(),) if self.lam == 0.0 else ()
        # the batch size as a device constant, read with the step (one per input layout)
        return (selection, torch.full((1,), float(batch), dtype=torch.float64, device=selection.device), loss) + anchor

    def update(self, step: int):
        return self.spec if self.learns else None

    def outcome(self, stats: Any, values: list[float], step: int) -> StepOutcome:
        anchor = values[6] if self.lam == 0.0 else stats.anchor_loss
        outcome, self.streak = self.decide(stats, values[:6], anchor, self.streak, self.engine.idle_stats(),
                                           self.ctx.warnings)
        return outcome

    def decide(self, stats: Any, values: list[float], anchor_loss: float, streak: int, idle: Any,
               warnings: list[str]) -> tuple[StepOutcome, int]:
        """One image's step outcome and skip streak from its read values (selection summary, batch
        size, adapt loss) and anchor value; ``idle``: its stats were nothing applied."""
        count, mean_conf, mean_entropy, mean_valid, batch, adapt_value = values
        count, batch, lam = int(count), int(batch), self.lam
        ratio = float(count) / float(max(1, batch))
        metrics: dict[str, Any] = {"selected_count": count, "batch_count": batch, "selected_ratio": ratio,
                                   "mean_conf": mean_conf, "mean_entropy": mean_entropy, "mean_valid_dets": mean_valid}
        if count <= 0:  # the gate kept the update from applying anything
            return self.skip(metrics, streak + 1, idle, warnings), streak + 1
        metrics.update({"skipped": False, "adapt_loss": float(adapt_value), "anchor_loss": float(anchor_loss),
                        "anchor_lambda": lam})
        return StepOutcome(loss=adapt_value + lam * anchor_loss, stats=stats, metrics=metrics, layout=ENTRY_LAYOUT,
                           method_stop=RATIO_STOP if ratio < self.ratio_min else None), 0

    def skip(self, metrics: dict[str, Any], streak: int, idle: Any, warnings: list[str]) -> StepOutcome:
        """A step with nothing selected: no backward, no update, no guard (a captured step runs its
        backward, gated: counted as none, as the reference's); a long streak stops."""
        metrics.update({"skipped": True, "skip_reason": "empty_selected_set", "skip_streak": int(streak),
                        "anchor_loss": 0.0, "adapt_loss": 0.0, "grad_norm": None})
        warnings.append("eata_empty_selected_set")
        stop = SKIP_STOP if streak > max(0, int(self.config.eata_max_skip_streak)) else None
        return StepOutcome(loss=None, stats=idle, metrics=metrics, backwards=0, optimizer_steps=0,
                           skipped=True, skip_stop=stop, layout=SKIP_LAYOUT)


class EATAReplicas(ReplicaMethod):
    """EATA's K-replica step (``yolozu_ttt.parallel``): per image its own selection, gate (nothing
    selected: no update for that replica), anchor to its own start and skip streak."""

    name = "eata"

    def begin(self, replicas: Any, records: list[Any], ctxs: list[Any]) -> None:
        self.ctxs, self.streaks = ctxs, [0] * len(records)

    def step(self, replicas: Any, x: torch.Tensor) -> torch.Tensor:
        """Per replica: forward, selection, the selected samples' entropy and its backward (one
        batched call; none where no image selected anything, read eagerly: a partly selected group
        runs the whole group's backward); every selected parameter gets a grad (the anchor's reach);
        the anchor value before the update; then the update gated per replica by its selection.
        Rows: adapt loss, selection summary (4), batch, anchor value, the four norms."""
        config, sizes = self.config, []
        if x.ndim == 1:
            raise RuntimeError("EATA requires batched tensor input")

        def loss(output):
            logits = _ref._extract_logits(output)
            if logits.ndim == 0:
                raise RuntimeError("EATA logits must have batch dimension")
            conf, entropy, valid = sample_signals(logits, float(config.eata_conf_min))
            mask = select_samples(config, conf, entropy, valid)
            sizes.append(int(conf.shape[0]))
            selection = summary(mask, conf, entropy, valid)
            return adapt_loss(logits, mask, selection[0], sizes[0]), selection

        # nothing selected in any image: no backward (one read); every selected parameter has a grad (the anchor's reach)
        losses, selection = replicas.backward(loss, x, worth=self.any_selected)
        engine = replicas.engine
        anchor = engine.anchor_value() if self.method.lam == 0.0 else None  # else the update's own
        engine.gate(selection[:, 0] > 0)
        stats = replicas.update()
        anchor = stats[STAT_KEYS.index("anchor_loss")] if anchor is None else anchor
        batch = torch.full_like(anchor, float(sizes[0]))
        return torch.cat([losses.double().unsqueeze(0), selection.double().t(), batch.unsqueeze(0),
                          anchor.unsqueeze(0), stats])

    def any_selected(self, got: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Whether any image of the group selected a sample (read eagerly; a captured group: True)."""
        count = self.read_before_backward(got[1][:, 0].sum())
        return count is None or count[0] > 0

    def outcome(self, i: int, column: list[float], step: int) -> StepOutcome:
        (loss, count, conf, entropy, valid, batch, anchor), stats = split(column)
        idle = stats._replace(grad_norm=0.0, grad_norm_clipped=0.0, update_norm=0.0, anchor_loss=0.0, clip_coef=1.0,
                              restored=0.0)
        outcome, self.streaks[i] = self.method.decide(stats, [count, conf, entropy, valid, batch, loss], anchor,
                                                      self.streaks[i], idle, self.ctxs[i].warnings)
        return outcome


METHOD = EATA
REPLICA = EATAReplicas
