"""Tent on the fused engine: entropy minimisation of the selected parameters.

Like ``forward_and_adapt`` in the original Tent: forward, entropy, backward, one fused update
(the loop's). YOLOZU's options on top: an eval-mode teacher forward and a weak photometric student
view for its aux-consistency and detector-response terms, and the detector response's
abstention (no backward, no update, norm buffers restored). Those decide on the host: only plain
entropy is ``capturable``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from yolozu.response_selection import detector_response_loss
from ..seam import tent as _tent

from .checks import tent_selection
from .loop import Method, StepOutcome, entropy

# Step-entry metrics copied from the step's metrics when present (YOLOZU's report contract).
ENTRY_METRICS = (
    "loss_entropy", "loss_aux_consistency", "aux_target_current_batch", "aux_student_view_mean_abs_delta",
    "loss_response_class", "loss_response_bbox", "loss_response_foreground_entropy",
    "response_selected_queries", "response_selected_ratio", "response_selected_confidence_mean",
    "response_min_selected", "response_abstained", "update_abstained", "buffers_restored_on_abstention",
)
AUX_WEIGHTS = ("pose", "keypoints", "depth", "seg")
RESPONSE_OPTIONS = ("topk", "min_selected", "class_weight", "bbox_weight", "entropy_weight")


def tent_config(config: Any) -> _tent.TentConfig:
    """YOLOZU's TentConfig for a TTTConfig, each field converted to its default's type as the reference does."""
    return _tent.TentConfig(**{
        f.name: getattr(config, f.name) if f.default is None else type(f.default)(getattr(config, f.name))
        for f in dataclasses.fields(_tent.TentConfig)})


class Tent(Method):
    """Entropy minimisation (plus YOLOZU's aux-consistency and detector-response terms)."""

    def select(self) -> list[torch.Tensor]:
        self.tc = tent_config(self.config)
        chosen = tent_selection(self.ctx.model, self.tc)  # validates and selects as TentRunner does
        self.ctx.updated_param_count = chosen.updated_param_count
        self.has_aux, self.has_teacher, self.abstained = chosen.has_aux, chosen.has_teacher, False
        self.host_metrics: dict[str, Any] = {}
        self.capturable = not (self.has_aux or self.has_teacher or self.tc.detector_response)
        return chosen.params

    def why_not_parallel(self) -> str | None:
        if not self.capturable:
            return "tent's aux-consistency, teacher and detector-response terms decide on the host per image"
        return None

    def needs_buffers(self) -> bool:
        return bool(self.config.rollback_on_stop) or self.tc.detector_response

    @staticmethod
    def loss(net: Any, x: Any) -> torch.Tensor:
        """One image's Tent loss: the entropy of its logits."""
        return entropy(_tent._extract_logits(net(x)), fallback=_tent._entropy)

    def passes(self, run: Any, x: Any) -> tuple[Any, ...]:
        """In training mode: forward, entropy and its backward: (loss,); with YOLOZU's options, the
        run's :meth:`host_passes`."""
        run.model.train()
        if self.capturable:
            return run.backward(self.loss, x)
        return self.host_passes(run, x)

    def host_passes(self, run: Any, x: Any) -> tuple[Any, ...]:
        """Teacher (eval, no grad) and student forwards, the Tent loss and its backward: (loss,
        entropy, aux, view delta); the detector response's host metrics decide the abstention."""
        model, tc, teacher, view = run.model, self.tc, None, x
        if self.has_teacher:
            model.eval()
            with torch.no_grad():
                teacher = _tent._extract_outputs(model(x))
            view = _tent._deterministic_weak_photometric_view(x)
            model.train()
        output = model(view)
        outputs = _tent._extract_outputs(output)
        loss = entropy_loss = entropy(_tent._extract_logits(output), fallback=_tent._entropy)
        response: dict[str, Any] = {}
        if tc.detector_response:
            loss, response = detector_response_loss(outputs, teacher, confidence_min=tc.response_conf_min, **{
                name: getattr(tc, f"response_{name}") for name in RESPONSE_OPTIONS})
        aux, self.host_metrics = None, {}
        if self.has_aux:
            aux, self.host_metrics = _tent._aux_consistency_loss(outputs, teacher, **{
                f"{name}_weight": getattr(tc, f"aux_{name}_weight") for name in AUX_WEIGHTS})
            loss = loss if aux is None else loss + aux
        self.host_metrics = {**self.host_metrics, **response}
        self.abstained = bool(response.get("response_abstained", 0.0)) and aux is None
        if not self.abstained:
            run.arena.backward(loss)
        delta = (view.detach() - x.detach()).abs().mean() if torch.is_tensor(view) and view is not x else 0.0
        return loss, entropy_loss, 0.0 if aux is None else aux, delta

    def update(self, step: int):
        return None if self.abstained else self.spec

    def outcome(self, stats: Any, values: list[float], step: int, i: int) -> StepOutcome:
        """The step's outcome with YOLOZU's entry metrics (those of ``ENTRY_METRICS`` present)."""
        loss, entropy_value, aux, delta = values if len(values) == 4 else (values[0], values[0], 0.0, 0.0)
        metrics = {"loss_entropy": entropy_value, "loss_aux_consistency": aux,
                   "aux_target_current_batch": float(self.has_aux), "aux_student_view_mean_abs_delta": delta,
                   "update_abstained": float(self.abstained), **self.host_metrics}
        if self.abstained:
            metrics["buffers_restored_on_abstention"] = 1.0
        return StepOutcome(loss=loss, stats=stats, metrics={k: float(metrics[k]) for k in ENTRY_METRICS if k in metrics},
                           forwards=2 if self.has_teacher else 1, backwards=int(not self.abstained),
                           optimizer_steps=int(not self.abstained), abstained=self.abstained)


METHOD = Tent
