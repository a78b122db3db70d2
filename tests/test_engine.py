"""yolozu_ttt.engine as a unit: the step spec, the backend seam, the graph cache and UpdateEngine's
step against torch.optim.Adam and against the backend called directly."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_model, skip_under_interpreter

from yolozu_ttt import engine as E
from yolozu_ttt.arena import ParamArena
from yolozu_ttt.common import STAT_KEYS, use_triton


def norm_params(model):
    return [model.bn.weight, model.bn.bias, model.gn.weight, model.gn.bias]


def loss_of(model, seed=0):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return model(x)["logits"].square().mean()


# ---- StepSpec ----------------------------------------------------------------------------------
def test_spec_is_frozen_hashable_and_normalised():
    a = E.StepSpec(lr=1, betas=[0.9, 0.999], max_grad_norm=2, anchor_lambda=0, restore_seed=-1)
    assert a.lr == 1.0 and type(a.lr) is float and a.betas == (0.9, 0.999) and a.max_grad_norm == 2.0
    assert a.restore_seed == 2 ** 64 - 1  # uint64, as the backends take it
    b = E.StepSpec(lr=1.0, max_grad_norm=2.0, restore_seed=2 ** 64 - 1)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.lr = 2.0  # type: ignore[misc]
    assert a.replace() is a
    c = a.replace(gated=True)
    assert c != a and c.gated and not a.gated


@pytest.mark.parametrize("kw,match", [
    ({"lr": -1.0}, "lr must be >= 0"),
    ({"lr": float("nan")}, "lr must be >= 0"),
    ({"lr": 1e-3, "betas": (1.0, 0.999)}, r"betas must lie in \[0, 1\)"),
    ({"lr": 1e-3, "betas": (0.9, -0.1)}, r"betas must lie in \[0, 1\)"),
    ({"lr": 1e-3, "restore_prob": -0.5}, "restore_prob must be >= 0"),
])
def test_spec_validates_once_with_the_backends_messages(kw, match):
    with pytest.raises(ValueError, match=match):
        E.StepSpec(**kw)
    spec = E.StepSpec(lr=1e-3)
    with pytest.raises(ValueError, match=match):
        spec.replace(**kw)


def test_spec_native_is_the_cpp_options_read_once_from_the_spec():
    import yolozu_ttt._C as C

    spec = E.StepSpec(lr=1e-2, betas=(0.8, 0.99), eps=1e-7, max_grad_norm=0.5, anchor_lambda=0.25,
                      write_snapshot=False, ema_momentum=0.9, restore_prob=0.125, restore_seed=-1)
    native = spec.native
    assert type(native) is C.StepOptions and spec.native is native  # built once, kept on the spec
    backend_fields = [f.name for f in dataclasses.fields(E.StepSpec) if f.name != "gated"]
    assert {k: getattr(native, k) for k in backend_fields} == {k: getattr(spec, k) for k in backend_fields}
    with pytest.raises(AttributeError):
        native.lr = 1.0  # read-only, like the spec
    model = make_model()
    with ParamArena(model, norm_params(model)) as arena:
        owned = E.BackendGroups(arena)
        groups = owned.objects
        arena.backward(loss_of(model))
        out = torch.full((len(STAT_KEYS),), float("nan"), dtype=torch.float64)
        with pytest.raises(TypeError):
            C.fused_step(groups, out, spec)  # the engine takes its options object, not the spec
        assert all(s == 0 for g in groups for s in g.steps)
        C.fused_step(groups, out, spec.replace(ema_momentum=None, restore_prob=0.0).native)
        assert torch.isfinite(out).all() and all(s == 1 for g in groups for s in g.steps)


# ---- the backend seam ----------------------------------------------------------------------------
def test_backend_choice_is_the_dispatch_rule():
    cpu = torch.empty(0)
    assert E.backend_for(cpu) == ("triton" if use_triton(cpu) else "cpp")
    assert E.backend_module("cpp").__name__ == "yolozu_ttt._C"


def test_the_engine_builds_its_backend_groups_once_and_reset_state_starts_a_fresh_run():
    model = make_model()
    with ParamArena(model, norm_params(model)) as arena:
        engine = E.UpdateEngine(arena, lr=1e-2)
        (first,) = engine.groups.objects
        assert all(not hasattr(g, "engine") and not hasattr(g.buffers, "engine") for g in arena.groups)  # buffers only
        arena.backward(loss_of(model))
        engine.step(write_snapshot=False)
        assert max(first.steps) == 1 and engine.total_update_norm > 0.0
        engine.reset_state()  # a session's next run: Adam state and the running total reset
        assert max(first.steps) == 0 and engine.total_update_norm == 0.0
        assert engine.groups.objects == [first]  # the same object over every run of the engine


def test_one_engine_binds_an_arena_and_releases_its_objects_when_the_arena_closes():
    """The engine owns its backend objects: a second engine over a bound arena is refused (the
    arena tells one engine of its snapshot buffers), and the arena's close makes the engine drop
    the run's tensors and its objects: an engine that outlives its arena keeps no buffer alive and
    runs no step."""
    import gc
    import weakref

    model = make_model()
    arena = ParamArena(model, norm_params(model))
    engine = E.UpdateEngine(arena, lr=1e-2)
    with pytest.raises(RuntimeError, match="already bound by another update engine"):
        E.UpdateEngine(arena, lr=1e-2)
    arena.keep_own_snapshot()
    arena.hold_snapshot()  # a buffer of its own, bound after the engine was built: pushed to its object
    arena.backward(loss_of(model))
    before = torch.cat([p.detach().reshape(-1) for p in norm_params(model)])
    engine.step(write_snapshot=True)
    (group,) = arena.groups
    own = group.snap
    assert torch.equal(torch.cat(own) if isinstance(own, list) else own, before)
    held = [weakref.ref(t) for t in (own if isinstance(own, list) else [own])]
    (first,) = engine.groups.objects  # held here too: its tensors are dropped, not just the object
    del own, group
    arena.close()
    gc.collect()
    assert engine.groups.objects == [] and all(r() is None for r in held)
    with pytest.raises(RuntimeError, match="the update engine is closed"):
        engine.step(write_snapshot=False)
    engine.close()  # idempotent
    with ParamArena(model, norm_params(model)) as again:  # an engine closed by its owner lets the arena go
        first_engine = E.UpdateEngine(again, lr=1e-2)
        first_engine.close()
        E.UpdateEngine(again, lr=1e-2)


# ---- the graph cache ---------------------------------------------------------------------------
def test_graph_cache_holds_at_most_max_graphs():
    cache = E.GraphCache()
    for i in range(E.MAX_GRAPHS):
        cache.add(i, f"graph {i}")
    cache.add(0, "again")  # a key already there replaces its value only
    assert len(cache) == E.MAX_GRAPHS and cache[0] == "again"
    cache.add("new", "graph")
    assert list(cache) == ["new"]


# ---- UpdateEngine.step ------------------------------------------------------------------------
def fixed_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


@skip_under_interpreter
def test_step_is_torch_adam_and_reads_extras_with_its_stats():
    model = make_model()
    reference = [p.detach().clone().requires_grad_(True) for p in norm_params(model)]
    opt = torch.optim.Adam(reference, lr=1e-2)
    with ParamArena(model, norm_params(model)) as arena:
        engine = E.UpdateEngine(arena, lr=1e-2)
        spec = engine.spec.replace(write_snapshot=False)
        for i in range(3):
            grads = fixed_grads(reference, i)
            for p, g in zip(reference, grads):
                p.grad = g.clone()
            opt.step()
            arena.zero_grad()
            for p, g in zip(norm_params(model), grads):
                p.grad.copy_(g)
            arena.mark_all_grads()
            stats, values = engine.step(spec, extra=(torch.tensor([0.5, 1.5]), 2.5))
            assert values == [0.5, 1.5, 2.5] and isinstance(stats, E.StepStats)
            assert stats.grad_norm == pytest.approx(float(torch.cat(grads).norm()), rel=1e-6)
            assert stats.update_norm > 0.0 and engine.total_update_norm == stats.total_update_norm
        for p, q in zip(norm_params(model), reference):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@skip_under_interpreter
def test_the_counter_reaches_the_backend_only_for_a_restore():
    model = make_model()
    with ParamArena(model, norm_params(model)) as arena:
        engine = E.UpdateEngine(arena, lr=1e-2)
        plain = engine.spec.replace(write_snapshot=False)
        assert engine.prepare(plain, 3).key() == engine.prepare(plain, 4).key()
        restore = plain.replace(restore_prob=0.5, restore_seed=1)
        assert engine.prepare(restore, 3).key() != engine.prepare(restore, 4).key()


def test_idle_stats_keep_the_running_total():
    model = make_model()
    with ParamArena(model, norm_params(model)) as arena:
        engine = E.UpdateEngine(arena, lr=1e-2)
        arena.backward(loss_of(model))
        stats, _ = engine.step(write_snapshot=False)
        idle = engine.idle_stats()
        assert idle.update_norm == 0.0 and idle.total_update_norm == stats.total_update_norm > 0.0


def test_read_gathers_tensors_and_numbers_in_order():
    assert E.read(torch.tensor([1.0, 2.0]), 3, torch.tensor(4.0, dtype=torch.float16)) == [1.0, 2.0, 3.0, 4.0]
    assert E.read(1, 2.5) == [1.0, 2.5]
