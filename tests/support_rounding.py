"""What fp32 cannot resolve, derived instead of tuned: the worst-case rounding of a convolution's
weight gradient, propagated to the adapted weights by float64 runs.

A conv weight's gradient is a sum over ``n = batch * out_h * out_w`` products ``x * g`` (input and
output gradient). In any order of summation its fp32 rounding is at most ``gamma_n * sum |x * g|``
(``gamma_n = n u / (1 - n u)``, ``u = 2**-24``; Higham, *Accuracy and Stability*, eq. 4.4), and
``sum |x * g|`` is the same convolution's weight gradient of ``|x|`` and ``|g|``. :func:`rounding_reach`
adds that worst case, with either sign, to every raw conv weight gradient of a float64 run and
returns how far each adapted element moves: fp32 rounding of those gradients (the dominant term
where a step amplifies gradient noise, e.g. a clip coefficient jumping while Adam's second moment
is still small) cannot move an element further, to first order, on any CPU and in any reduction
order. A wrong mask or mixed replicas change the gradients themselves and move weights by lr-sized
amounts, orders of magnitude more."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

U32 = 2.0 ** -24  # fp32's unit roundoff


def gamma(n: int) -> float:
    """Higham's ``gamma_n``: the relative error bound of an n-term sum in fp32."""
    return n * U32 / (1.0 - n * U32)


class ConvGradRounding:
    """Hooks adding ``sign * gamma_n * sum |x * g|`` to each ``nn.Conv2d`` weight's raw gradient."""

    def __init__(self, model: nn.Module, sign: float):
        self.sign, self.handles = sign, []
        for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
            pending: list[torch.Tensor] = []
            self.handles.append(conv.register_forward_hook(self._forward(conv, pending)))
            self.handles.append(conv.weight.register_hook(self._weight(pending)))

    def _forward(self, conv: nn.Conv2d, pending: list[torch.Tensor]) -> Callable:
        def hook(module, inputs, out):
            if not (torch.is_grad_enabled() and out.requires_grad):
                return
            x = inputs[0].detach().abs()

            def on_grad(g):
                n = int(g.shape[0] * g.shape[-2] * g.shape[-1])
                terms = torch.nn.grad.conv2d_weight(x, conv.weight.shape, g.detach().abs(), conv.stride,
                                                    conv.padding, conv.dilation, conv.groups)
                pending.append(gamma(n) * terms)

            out.register_hook(on_grad)
        return hook

    def _weight(self, pending: list[torch.Tensor]) -> Callable:
        def hook(grad):
            return grad + self.sign * pending.pop(0) if pending else grad
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def rounding_reach(model: nn.Module, start: dict, run: Callable[[nn.Module], Any]) -> dict[str, torch.Tensor]:
    """Per state tensor, how far the worst-case fp32 rounding of the conv weight gradients moves the
    result of ``run`` (one adaptation, called on a float64 copy of ``model`` at ``start``): the
    largest deviation of the two signed runs from the unperturbed one, per element."""
    states = []
    for sign in (0.0, 1.0, -1.0):
        m = copy.deepcopy(model).double()
        m.load_state_dict(start)
        hooks = ConvGradRounding(m, sign)
        try:
            run(m)
        finally:
            hooks.close()
        states.append({k: v.detach().double() for k, v in m.state_dict().items()})
    plain = states[0]
    return {k: torch.maximum((states[1][k] - v).abs(), (states[2][k] - v).abs()) for k, v in plain.items()}
