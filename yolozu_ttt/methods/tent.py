"""Tent on the fused engine: entropy minimisation of the selected parameters."""
from __future__ import annotations

from typing import Any

import torch
from yolozu.response_selection import detector_response_loss
from yolozu.tta import tent as _tent

from ..arena import ParamArena
from ..engine import UpdateEngine, read
from .loop import Method, StepOutcome, entropy

# Step-entry metrics copied from the step's metrics when present (YOLOZU's report contract).
ENTRY_METRICS = (
    "loss_entropy", "loss_aux_consistency", "aux_target_current_batch", "aux_student_view_mean_abs_delta",
    "loss_response_class", "loss_response_bbox", "loss_response_foreground_entropy",
    "response_selected_queries", "response_selected_ratio", "response_selected_confidence_mean",
    "response_min_selected", "response_abstained", "update_abstained", "buffers_restored_on_abstention",
)


def tent_config(config: Any) -> _tent.TentConfig:
    """YOLOZU's TentConfig for a TTTConfig."""
    return _tent.TentConfig(
        lr=float(config.lr), include=config.include, exclude=config.exclude,
        update_filter=str(config.update_filter), max_grad_norm=config.max_grad_norm,
        aux_pose_weight=float(config.aux_pose_weight), aux_keypoints_weight=float(config.aux_keypoints_weight),
        aux_depth_weight=float(config.aux_depth_weight), aux_seg_weight=float(config.aux_seg_weight),
        detector_response=bool(config.detector_response), response_conf_min=float(config.response_conf_min),
        response_topk=int(config.response_topk), response_min_selected=int(config.response_min_selected),
        response_class_weight=float(config.response_class_weight),
        response_bbox_weight=float(config.response_bbox_weight),
        response_entropy_weight=float(config.response_entropy_weight),
    )


def forward_losses(model: Any, batch: Any, tc: _tent.TentConfig, has_aux: bool, has_teacher: bool):
    """Teacher (eval, no grad) and student forwards and the Tent loss terms, like TentRunner."""
    teacher_outputs = None
    student_batch = batch
    view_delta: Any = 0.0  # a device scalar with a teacher (read with the step's stats)
    if has_teacher:
        model.eval()
        with torch.no_grad():
            teacher_outputs = _tent._extract_outputs(model(batch))
        student_batch = _tent._deterministic_weak_photometric_view(batch)
        if isinstance(batch, torch.Tensor) and isinstance(student_batch, torch.Tensor):
            view_delta = (student_batch.detach() - batch.detach()).abs().mean()
    model.train()
    output = model(student_batch)
    outputs = _tent._extract_outputs(output)
    entropy_loss = entropy(_tent._extract_logits(output), fallback=_tent._entropy)
    loss = entropy_loss
    response_metrics: dict[str, float] = {}
    if bool(tc.detector_response):
        loss, response_metrics = detector_response_loss(
            outputs, teacher_outputs, confidence_min=float(tc.response_conf_min), topk=int(tc.response_topk),
            min_selected=int(tc.response_min_selected), class_weight=float(tc.response_class_weight),
            bbox_weight=float(tc.response_bbox_weight), entropy_weight=float(tc.response_entropy_weight),
        )
    aux_loss, aux_metrics = None, {}
    if has_aux:
        aux_loss, aux_metrics = _tent._aux_consistency_loss(
            outputs, teacher_outputs, pose_weight=float(tc.aux_pose_weight),
            keypoints_weight=float(tc.aux_keypoints_weight), depth_weight=float(tc.aux_depth_weight),
            seg_weight=float(tc.aux_seg_weight),
        )
        if aux_loss is not None:
            loss = loss + aux_loss
    return loss, entropy_loss, aux_loss, aux_metrics, response_metrics, view_delta


class Tent(Method):
    """Entropy minimisation (plus YOLOZU's aux-consistency and detector-response terms)."""

    def select(self) -> list[torch.Tensor]:
        self.tc = tent_config(self.config)
        runner = _tent.TentRunner(self.ctx.model, config=self.tc)  # validates and selects like the reference
        self.ctx.updated_param_count = int(runner.updated_param_count)
        self.has_aux, self.has_teacher = runner._has_aux, runner._has_teacher
        return list(runner.params)

    def needs_buffers(self) -> bool:
        return bool(self.config.rollback_on_stop) or bool(self.config.detector_response)

    def step_body(self, arena: ParamArena, engine: UpdateEngine):
        """Plain entropy (no teacher, aux or detector-response term) decides nothing on the host."""
        if self.has_aux or self.has_teacher or bool(self.tc.detector_response):
            return None

        def entropy_step(x: Any) -> tuple[torch.Tensor]:
            loss = forward_losses(self.ctx.model, x, self.tc, False, False)[0]
            arena.clear_grads()
            arena.backward(loss)
            return (loss,)

        return entropy_step

    def adapt(self, x: Any, step: int, arena: ParamArena, engine: UpdateEngine, write_snapshot: bool) -> StepOutcome:
        if self.step_graph is not None:  # graph mode: forward, loss, backward and update replayed whole
            stats, (loss_value,) = self.step_graph.step((x,), write_snapshot=write_snapshot)
            return self.outcome(stats, loss_value, loss_value, abstained=False)
        loss, entropy_loss, aux_loss, aux_metrics, response_metrics, view_delta = forward_losses(
            self.ctx.model, x, self.tc, self.has_aux, self.has_teacher)
        abstained = bool(response_metrics.get("response_abstained", 0.0)) and aux_loss is None
        arena.zero_grad()
        scalars = (loss, entropy_loss, aux_loss if aux_loss is not None else 0.0, view_delta)  # one read
        if abstained:
            stats, values = engine.idle_stats(), read(*scalars)
        else:
            arena.backward(loss)
            stats, values = engine.step(write_snapshot=write_snapshot, extra=scalars)
        return self.outcome(stats, *values[:2], abstained, *values[2:], {**aux_metrics, **response_metrics})

    def outcome(self, stats: Any, loss_value: float, entropy_value: float, abstained: bool, aux_value: float = 0.0,
                view_delta: float = 0.0, more: dict[str, Any] | None = None) -> StepOutcome:
        """The step's outcome with YOLOZU's entry metrics (those of ``ENTRY_METRICS`` present)."""
        metrics: dict[str, Any] = {
            "loss_entropy": entropy_value, "loss_aux_consistency": aux_value,
            "aux_target_current_batch": 1.0 if self.has_aux else 0.0, "aux_student_view_mean_abs_delta": view_delta,
            "update_abstained": 1.0 if abstained else 0.0, **(more or {}),
        }
        if abstained:
            metrics["buffers_restored_on_abstention"] = 1.0
        return StepOutcome(
            loss=loss_value, stats=stats, metrics={k: float(metrics[k]) for k in ENTRY_METRICS if k in metrics},
            forwards=2 if self.has_teacher else 1, backwards=0 if abstained else 1,
            optimizer_steps=0 if abstained else 1, abstained=abstained)


METHOD = Tent
