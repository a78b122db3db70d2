"""ParamArena: views, in-place grads, frozen parameters, restoration on every exit path."""
from __future__ import annotations

import pytest
import torch
from conftest import make_model

from yolozu_ttt.arena import ParamArena


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
        assert group.grad.abs().sum() == 0 and not arena.any_grad()
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
        for g in arena.groups:
            g.snap.copy_(g.flat)
            g.flat.add_(1.0)
        arena.restore_snapshot()
        assert all(torch.equal(g.flat, b) for g, b in zip(arena.groups, before))
        arena.drop_snapshot()
        assert all(g.snap is None for g in arena.groups)


def test_original_storages_are_released_during_the_run_and_restored_after():
    """Peak memory holds each selected parameter once: unshared originals are emptied meanwhile."""
    model = make_model()
    params = norm_params(model)
    shared_view = model.bn.weight.detach()  # a caller's reference: that storage must stay
    values = [p.detach().clone() for p in params]
    storages = [p.untyped_storage()._cdata for p in params]
    with ParamArena(model, params) as arena:
        (group,) = arena.groups
        sizes = {o.untyped_storage()._cdata: o.untyped_storage().nbytes() for o in group.originals}
        assert sizes[storages[0]] > 0  # bn.weight is shared with shared_view
        assert all(sizes[s] == 0 for s in storages[1:])
        group.flat.mul_(2.0)
    assert [p.untyped_storage()._cdata for p in params] == storages
    for p, v in zip(params, values):
        assert torch.equal(p, v * 2.0)
    assert torch.equal(shared_view, values[0] * 2.0)
