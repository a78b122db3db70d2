"""The reference's set-up checks, made without building the optimizer the reference builds for them.

YOLOZU's ``run_ttt`` constructs a ``torch.optim.Adam`` over the selected parameters before its
first step (Tent's ``TentRunner`` does too), and that construction is where a bad learning rate
raises. Constructing any torch optimizer imports ``torch._dynamo`` the first time in a process
(its ``_disable_dynamo`` wrappers): about 1 s on a CPU, a fifth of a short export's whole process.
The fused engine steps no torch optimizer, so it makes the same checks itself and raises what the
reference raises (type and message: the tests compare with the installed YOLOZU and torch); input
these checks do not cover (a parameter that is not a leaf tensor, one listed twice, a learning rate
that is not a float) still goes through ``torch.optim.Adam``, which then decides as it does for the
reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from yolozu.tta.ttt_mim import select_parameters

from ..seam import integration as _ref

#: Tent's adapter-head aux weights (``TentConfig.aux_<name>_weight``)
AUX_WEIGHTS = ("pose", "keypoints", "depth", "seg")


def check_adam(params: list[Any], lr: Any) -> None:
    """What ``torch.optim.Adam(params, lr=lr)`` raises for these, without constructing it where
    the parameters are distinct leaf tensors and ``lr`` a float (the reference's ``float(config.lr)``)."""
    plain = bool(params) and isinstance(lr, float) and len({id(p) for p in params}) == len(params) \
        and all(isinstance(p, torch.Tensor) and p.is_leaf for p in params)
    if not plain:
        torch.optim.Adam(params, lr=lr)
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def checked_selection(model: Any, update_filter: Any, include: Any, exclude: Any, lr: float,
                      nothing: Exception) -> list[torch.Tensor]:
    """YOLOZU's ``select_parameters`` with the checks the reference makes around it: ``nothing``
    raised where nothing is selected (its own type and message per method), then the optimizer's
    (:func:`check_adam`)."""
    params = select_parameters(model, update_filter=update_filter, include=include, exclude=exclude)
    if not params:
        raise nothing
    check_adam(params, lr)
    return list(params)


@dataclass(frozen=True)
class TentSelection:
    """What YOLOZU's ``TentRunner`` decides when it is built: the parameters it adapts and whether
    its loss has the aux-consistency term and an eval-mode teacher forward."""

    params: list[torch.Tensor]
    updated_param_count: int
    has_aux: bool
    has_teacher: bool


def tent_selection(model: Any, tc: Any) -> TentSelection:
    """``TentRunner(model, config=tc)``'s checks (their types and messages) and selection, its
    optimizer's checks made by :func:`check_adam`."""
    if bool(tc.detector_response):
        if not 0.0 <= float(tc.response_conf_min) <= 1.0:
            raise ValueError("response_conf_min must be between 0 and 1")
        if int(tc.response_min_selected) < 1:
            raise ValueError("response_min_selected must be >= 1")
        if 0 < int(tc.response_topk) < int(tc.response_min_selected):
            raise ValueError("response_topk must be 0 or >= response_min_selected")
    params = checked_selection(model, tc.update_filter, tc.include, tc.exclude, float(tc.lr),
                               ValueError("no parameters selected for Tent"))
    has_aux = any(float(getattr(tc, f"aux_{name}_weight")) > 0 for name in AUX_WEIGHTS)
    return TentSelection(params, _ref._count_unique_params(params), has_aux,
                         has_aux or bool(tc.detector_response))
