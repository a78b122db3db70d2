"""ParamArena: views, in-place grads, frozen parameters, restoration on every exit path."""
from __future__ import annotations

import pytest
import torch
from conftest import make_model, only_under_interpreter, run_under_interpreter, skip_under_interpreter

from yolozu_ttt.arena import ParamArena
from yolozu_ttt.engine import UpdateEngine


def norm_params(model):
    return [model.bn.weight, model.bn.bias, model.gn.weight, model.gn.bias, model.ln.weight, model.ln.bias]


def test_parameters_become_views_of_one_flat_buffer_and_grads_accumulate_in_place():
    model = make_model()
    params = norm_params(model)
    values = [p.detach().clone() for p in params]
    with ParamArena(model, params) as arena:
        (group,) = arena.groups
        assert group.flat.numel() == sum(p.numel() for p in params)
        for p, o, v in zip(params, group.offsets, values):
            assert p.data_ptr() == group.flat[o:].data_ptr()
            assert torch.equal(p, v)
            assert p.grad.data_ptr() == group.grad[o:].data_ptr()
        out = model(torch.randn(2, 3, 8, 8))["logits"].sum()
        arena.backward(out)
        assert group.grad.abs().sum() > 0
        assert bytes(group.has_grad) == b"\x01" * len(params)
        for p, o in zip(params, group.offsets):
            assert p.grad.data_ptr() == group.grad[o:].data_ptr()  # accumulated in place
        # backward differentiates for the selected parameters only: no weight grads for the rest,
        # which stay trainable (the forward is unchanged)
        assert model.conv1.weight.grad is None and model.conv1.weight.requires_grad
        arena.zero_grad()
        assert group.grad.abs().sum() == 0 and not any(group.has_grad)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in params)


def test_values_written_to_the_arena_land_in_the_original_storages():
    """The same storage objects as before the run hold the new values."""
    model = make_model()
    params = norm_params(model)
    storages = [p.untyped_storage()._cdata for p in params]
    with ParamArena(model, params) as arena:
        arena.groups[0].flat.add_(1.0)
        expected = [p.detach().clone() for p in params]
    assert [p.untyped_storage()._cdata for p in params] == storages
    for p, e in zip(params, expected):
        assert torch.equal(p, e)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_flags_and_storages_restored_on_exception(exc):
    model = make_model()
    model.head.bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    storages = [p.untyped_storage()._cdata for p in model.parameters()]
    with pytest.raises(exc):
        with ParamArena(model, norm_params(model)):
            raise exc("interrupted")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [p.untyped_storage()._cdata for p in model.parameters()] == storages


def test_mixed_dtypes_make_one_group_each_and_tied_parameters_pack_once():
    model = make_model()
    model.ln.to(torch.bfloat16)
    params = norm_params(model) + [model.bn.weight]  # duplicate entry, as a tied parameter would be
    with ParamArena(model, params) as arena:
        dtypes = sorted(str(g.flat.dtype) for g in arena.groups)
        assert dtypes == ["torch.bfloat16", "torch.float32"]
        assert arena.numel == sum(p.numel() for p in norm_params(model))


def test_unsupported_dtype_raises_and_leaves_the_model_alone():
    model = make_model().double()
    flags = [p.requires_grad for p in model.parameters()]
    storages = [p.untyped_storage()._cdata for p in model.parameters()]
    with pytest.raises(TypeError, match="unsupported parameter dtype torch.float64"):
        ParamArena(model, norm_params(model))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [p.untyped_storage()._cdata for p in model.parameters()] == storages


def test_snapshot_lives_from_hold_to_drop_and_rolls_back_bit_exactly():
    """No snapshot buffer outside a step (the forward/backward peak never holds one)."""
    model = make_model()
    with ParamArena(model, norm_params(model)) as arena:
        assert all(g.snap is None for g in arena.groups)
        with pytest.raises(RuntimeError, match="no step wrote one"):
            arena.restore_snapshot()
        before = [g.flat.clone() for g in arena.groups]
        arena.hold_snapshot()
        arena.save_snapshot()
        for g in arena.groups:
            g.flat.add_(1.0)
        arena.restore_snapshot()
        assert all(torch.equal(g.flat, b) for g, b in zip(arena.groups, before))
        arena.drop_snapshot()
        assert all(g.snap is None for g in arena.groups)


def test_step_snapshot_lives_in_the_grad_buffer_until_the_next_zero_grad():
    """hold_snapshot(in_grad=True): the fused step writes the pre-step values over the grads it
    has read; rollback restores them bit-exactly; zero_grad (and drop) unbind it."""
    model = make_model()
    with ParamArena(model, norm_params(model)) as arena:
        engine = UpdateEngine(arena, lr=1e-2)
        (group,) = arena.groups
        for _ in range(2):
            arena.zero_grad()
            assert group.snap is None
            arena.backward(model(torch.randn(2, 3, 8, 8))["logits"].square().mean())
            before = group.flat.clone()
            engine.step(write_snapshot=True)
            assert group.snap is group.grad
            assert torch.equal(group.grad, before) and not torch.equal(group.flat, before)
            arena.restore_snapshot()
            assert torch.equal(group.flat, before)
        arena.zero_grad()
        assert group.snap is None and not group.grad.any()
        arena.keep_own_snapshot()  # SAR: its own buffer stays, a grad-buffer snapshot never does
        arena.hold_snapshot(in_grad=True)
        arena.drop_snapshot()
        assert group.snap is None
        arena.hold_snapshot()
        own = group.snap  # C++ engine: one tensor per segment
        assert [t.numel() for t in own] == group.sizes
        before = group.flat.clone()
        engine.step(write_snapshot=True)  # uses the held buffer
        assert group.snap is own and torch.equal(torch.cat(own), before)
        arena.drop_snapshot()
        assert group.snap is own
        group.flat.add_(1.0)
        arena.restore_snapshot()
        assert torch.equal(group.flat, before)


def test_original_storages_are_the_base_snapshot_and_get_the_values_back():
    """Peak memory holds each selected parameter twice (arena and base), as before: the C++
    engine reads the original storages as its base snapshot (no copy), and close() copies the
    values back into them, so every Parameter gets its own storage again."""
    model = make_model()
    params = norm_params(model)
    shared_view = model.bn.weight.detach()  # a caller's reference sees the final values too
    values = [p.detach().clone() for p in params]
    storages = [p.untyped_storage()._cdata for p in params]
    pointers = [p.data_ptr() for p in params]
    with ParamArena(model, params) as arena:
        (group,) = arena.groups
        assert [b.data_ptr() for b in group.base] == pointers
        assert [m.numel() for m in group.exp_avg] == [p.numel() for p in params]  # moments per segment too
        assert all(p.data_ptr() != q for p, q in zip(params, pointers))
        group.flat.mul_(2.0)
        assert all(torch.equal(o, v) for o, v in zip(group.originals, values))
        # the engine's base is the originals: sum_i mean((p_i - base_i)^2) with p = 2 * base
        group.has_grad[:] = b"\x01" * len(params)
        anchor = float(UpdateEngine(arena, lr=0.0).anchor_value())
        assert anchor == pytest.approx(sum(float(v.square().mean()) for v in values), rel=1e-6)
    assert [p.untyped_storage()._cdata for p in params] == storages
    assert [p.data_ptr() for p in params] == pointers
    for p, v in zip(params, values):
        assert torch.equal(p, v * 2.0)
    assert torch.equal(shared_view, values[0] * 2.0)


def test_non_contiguous_parameters_get_a_contiguous_base():
    model = make_model()
    weight = model.bn.weight
    weight.data = torch.randn(weight.numel(), 2)[:, 0]  # strided view
    assert not weight.is_contiguous()
    before = weight.detach().clone()
    with ParamArena(model, [weight]) as arena:
        (group,) = arena.groups
        assert group.base[0].is_contiguous() and torch.equal(group.base[0], before)
        group.flat.add_(1.0)
    assert torch.equal(weight, before + 1.0)


# ---- the original storages' release (Triton arenas): torch's private storage use counter ------
def test_storage_use_count_reads_one_per_sharing_tensor_plus_the_storage_object():
    """``arena._release_unshared`` frees an original storage only where
    ``torch._C._storage_Use_Count`` (private to torch) reads 2: the original tensor and the storage
    object asked for. Its meaning pinned: each tensor sharing the storage (a view, a detached
    alias, a Parameter) adds one, and asking for the storage object again adds none."""
    use_count = torch._C._storage_Use_Count
    param = torch.nn.Parameter(torch.randn(16))
    original = param.data  # what ParamArena._pack keeps, before it rebinds param.data
    storage = original.untyped_storage()
    assert use_count(storage._cdata) == 3  # param, original, the storage object
    param.data = torch.zeros(16)
    assert use_count(storage._cdata) == 2  # unshared: the arena's case
    assert use_count(original.untyped_storage()._cdata) == 2
    view, alias = original[4:], original.detach()
    assert use_count(storage._cdata) == 4
    del view
    assert use_count(storage._cdata) == 3
    del alias
    assert use_count(storage._cdata) == 2


def test_unshared_original_storages_are_freed_and_shared_ones_kept():
    """The originals of rebound parameters: one nothing else holds is emptied (its memory freed,
    the storage object kept for close() to grow back); one a caller still views keeps its bytes."""
    from yolozu_ttt.arena import _release_unshared

    alone, shared = torch.nn.Parameter(torch.randn(1000)), torch.nn.Parameter(torch.randn(1000))
    caller_view = shared.detach()[10:]
    originals = [alone.data, shared.data]
    values = [o.clone() for o in originals]
    alone.data, shared.data = torch.zeros(1000), torch.zeros(1000)
    released = _release_unshared(originals)
    assert [(s._cdata, n) for s, n in released] == [(originals[0].untyped_storage()._cdata, 4000)]
    assert originals[0].untyped_storage().nbytes() == 0 and originals[0].untyped_storage().data_ptr() == 0
    assert originals[1].untyped_storage().nbytes() == 4000 and torch.equal(originals[1], values[1])
    assert torch.equal(caller_view, values[1][10:])


@only_under_interpreter
def test_triton_arena_releases_the_original_storages_while_open():
    """A Triton arena (here in the interpreter on CPU tensors) holds each selected parameter once:
    the originals are emptied while it is open, except one a caller still views; close() grows
    them back with the final values."""
    model = make_model()
    params = norm_params(model)
    caller_view = model.bn.bias.detach()
    values = [p.detach().clone() for p in params]
    with ParamArena(model, params) as arena:
        assert arena.backend == "triton"
        (group,) = arena.groups
        emptied = [o.untyped_storage().nbytes() == 0 for o in group.originals]
        assert emptied == [p is not model.bn.bias for p in params]
        assert sum(n for _, n in group.released) == sum(4 * p.numel() for p in params if p is not model.bn.bias)
        group.flat.mul_(2.0)
    for p, v in zip(params, values):
        assert torch.equal(p, v * 2.0)
    assert torch.equal(caller_view, values[1] * 2.0)


@skip_under_interpreter
def test_release_under_the_interpreter():
    """The Triton arena's release again with TRITON_INTERPRET=1 (set before triton is imported)."""
    run_under_interpreter(__file__, "-k", "releases_the_original_storages")
