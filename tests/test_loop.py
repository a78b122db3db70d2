"""yolozu_ttt.methods.loop as a unit: the step protocol the loop owns (grads cleared one way, the
update spec, the one read, graph or eager), the base entry and YOLOZU's report quirk, checked with
a toy method on TinyDet against torch itself."""
from __future__ import annotations

import importlib
import inspect
import re

import pytest
import torch
from conftest import make_batches, make_model
from yolozu.tta.config import TTTConfig

from yolozu_ttt.engine import UpdateEngine
from yolozu_ttt.methods import loop

METHODS = ("tent", "eata", "sar", "cotta", "mim")


class Toy(loop.Method):
    """Squared logits; records what the loop hands it."""

    def __init__(self, ctx, apply=lambda step: True):
        super().__init__(ctx)
        self.apply, self.grads_at_start, self.values = apply, [], []

    def passes(self, run, x):
        self.grads_at_start.append(float(sum(g.grad.abs().sum() for g in run.arena.groups)))
        (loss,) = run.backward(lambda net, image: net(image)["logits"].square().mean(), x)
        return loss, torch.tensor([7.0, 8.0])

    def update(self, step):
        return self.spec if self.apply(step) else None

    def outcome(self, stats, values, step, i):
        self.values.append(values)
        return loop.StepOutcome(loss=values[0], stats=stats, metrics={"seven": values[1]})


def context(model, steps=3, **kw):
    cfg = TTTConfig(**{"enabled": True, "method": "tent", "steps": steps, "lr": 1e-2, "update_filter": "norm_only",
                       **kw})
    return loop.RunContext(model=model, batches=make_batches(2), config=cfg, method="toy", steps=steps,
                           generator=None)


def test_every_step_starts_from_cleared_grads_and_reads_its_values_once(monkeypatch):
    steps = []
    original = UpdateEngine.step

    def spy(self, spec=None, *, counter=0, extra=(), **options):
        steps.append((spec, counter, len(extra)))
        return original(self, spec, counter=counter, extra=extra, **options)

    monkeypatch.setattr(UpdateEngine, "step", spy)
    ctx = context(make_model(), steps=3)
    method = Toy(ctx)
    loop.run_steps(ctx, method)
    assert method.grads_at_start == [0.0, 0.0, 0.0]  # the previous backward (and snapshot) never leak
    assert [v[1:] for v in method.values] == [[7.0, 8.0]] * 3  # the passes' values, after the loss
    assert [c for _, c, _ in steps] == [0, 1, 2] and all(n == 2 for _, _, n in steps)
    assert all(s is method.spec for s, _, _ in steps)  # one spec, built once per run
    assert [e["step"] for e in ctx.step_metrics] == [0, 1, 2] and ctx.optimizer_steps == 3


def test_a_step_without_an_update_changes_nothing_and_still_reads():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    ctx = context(model, steps=2)
    method = Toy(ctx, apply=lambda step: False)
    loop.run_steps(ctx, method)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(e["update_norm"] == 0.0 and e["grad_norm"] == 0.0 for e in ctx.step_metrics)
    assert [len(v) for v in method.values] == [3, 3]


@pytest.mark.parametrize("max_grad_norm", [None, 1e-4])
def test_the_preclip_report_quirk_is_a_flag(max_grad_norm):
    for quirk in (False, True):
        ctx = context(make_model(), steps=1, max_grad_norm=max_grad_norm)
        method = Toy(ctx)
        method.preclip_norm_reported = quirk
        loop.run_steps(ctx, method)
        (entry,) = ctx.step_metrics
        if not quirk:
            assert entry["grad_norm_clipped"] <= entry["grad_norm"]
            if max_grad_norm is not None:  # the clip is active: the clipped norm is the clip
                assert entry["grad_norm_clipped"] == pytest.approx(max_grad_norm, rel=1e-3)
        elif max_grad_norm is None:
            assert entry["grad_norm_clipped"] is None
        else:
            assert entry["grad_norm_clipped"] == entry["grad_norm"] > max_grad_norm


def test_the_base_entry_follows_a_layout_and_lets_metrics_override():
    stats = loop.StepStats(1.0, 0.5, 0.1, 0.2, 0.0, 0.5, 0.0)
    out = loop.StepOutcome(loss=2.0, stats=stats, metrics={"extra": 3, "grad_norm": None})
    assert list(loop.base_entry(4, out, False, None)) == list(loop.BASE_KEYS) + ["extra"]
    assert loop.base_entry(4, out, False, None)["grad_norm"] is None
    out.layout = ("extra", "step", "loss")
    assert loop.base_entry(4, out, True, 1.0) == {"extra": 3, "step": 4, "loss": 2.0}


@pytest.mark.parametrize("name", METHODS)
def test_method_files_hold_only_their_method(name):
    """No graph/eager branching, no grad clearing, no backend in a method file: the loop owns them."""
    source = inspect.getsource(importlib.import_module(f"yolozu_ttt.methods.{name}"))
    code = "\n".join(line.split("#")[0] for line in source.splitlines())
    for word in ("step_graph", "graph", "zero_grad", "clear_grads", "new_grads", "_C", "kernels", "triton"):
        assert not re.search(rf"\b{word}\b", code), (name, word)
