"""The C++ fused update (yolozu_ttt._C) against torch.optim.Adam + clip_grad_norm_ and YOLOZU's helpers."""
from __future__ import annotations

import math

import pytest
import torch
from yolozu.tta import integration as ref

import yolozu_ttt._C as C

SHAPES = [[7, 1, 1000, 33], [4097], [1, 1, 1], [16385, 3]]


class Arena:
    """Flat buffers for a list of segment sizes; keeps every tensor handed to C++ alive."""

    def __init__(self, values: list[torch.Tensor], dtype: torch.dtype, *, snapshot: bool = True, has_grad=None):
        self.sizes = [int(v.numel()) for v in values]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.flat = torch.cat([v.reshape(-1) for v in values]).to(dtype)
        self.grad = torch.zeros_like(self.flat)
        self.m = torch.zeros(self.flat.numel())
        self.v = torch.zeros(self.flat.numel())
        self.base = self.flat.clone()
        self.snap = torch.empty_like(self.flat) if snapshot else None
        self.has_grad = has_grad
        self.group = C.ArenaGroup(self.flat, self.grad, self.m, self.v, self.base, self.snap, self.offsets,
                                  self.sizes, has_grad)

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        return [buf[o:o + n] for o, n in zip(self.offsets, self.sizes)]


def torch_step(params, grads, opt, max_norm):
    """The reference engine's work for one step: grad norm, clip, Adam (+ norms computed by caller)."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    with_grad = [p for p in params if p.grad is not None]
    gnorm = ref._global_grad_norm(params)
    if max_norm is not None and with_grad:
        torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    clipped = ref._global_grad_norm(params)
    opt.step()
    return gnorm, clipped


@pytest.mark.parametrize("sizes", SHAPES)
@pytest.mark.parametrize("max_norm", [None, 0.5, 1e9])
def test_fp32_matches_torch_adam_and_clip(sizes, max_norm):
    g = torch.Generator().manual_seed(len(sizes))
    values = [torch.randn(n, generator=g) for n in sizes]
    arena = Arena(values, torch.float32)
    params = [v.clone().requires_grad_(True) for v in values]
    base = ref._snapshot_params(params)
    opt = torch.optim.Adam(params, lr=3e-2)
    for step in range(4):
        grads = [torch.randn(n, generator=g) * (step + 1) for n in sizes]
        pre = ref._snapshot_params(params)
        gnorm, clipped = torch_step(params, grads, opt, max_norm)
        before = arena.flat.clone()
        arena.grad.copy_(torch.cat(grads))
        stats = C.fused_step([arena.group], lr=3e-2, max_grad_norm=max_norm)
        assert torch.equal(arena.snap, before)  # pre-step snapshot, bit-exact
        for p, mine in zip(params, arena.views(arena.flat)):
            torch.testing.assert_close(mine, p.detach(), rtol=1e-5, atol=1e-6)
        for p, m, v in zip(params, arena.views(arena.m), arena.views(arena.v)):
            torch.testing.assert_close(m, opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert stats["grad_norm"] == pytest.approx(gnorm, rel=1e-5)
        assert stats["grad_norm_clipped"] == pytest.approx(clipped, rel=1e-5)
        assert stats["update_norm"] == pytest.approx(ref._global_l2_update_norm(pre), rel=1e-3, abs=1e-7)
        assert stats["total_update_norm"] == pytest.approx(ref._global_l2_update_norm(base), rel=1e-4)
    assert arena.group.steps == [4] * len(sizes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_low_precision_params_use_fp32_math(dtype, max_norm):
    """Adam in fp32 with fp32 moments; the parameter is rounded to its dtype once per step."""
    sizes = [7, 1, 1000, 33]
    g = torch.Generator().manual_seed(3)
    values = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    arena = Arena(values, dtype)
    master = [v.float().clone().requires_grad_(True) for v in values]
    opt = torch.optim.Adam(master, lr=1e-2)
    for _ in range(3):
        grads = [torch.randn(n, generator=g).to(dtype) for n in sizes]
        torch_step(master, [gr.float() for gr in grads], opt, max_norm)
        with torch.no_grad():
            for p in master:
                p.copy_(p.to(dtype).float())  # the stored parameter is the rounded one
        arena.grad.copy_(torch.cat(grads))
        C.fused_step([arena.group], lr=1e-2, max_grad_norm=max_norm)
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        for p, mine in zip(master, arena.views(arena.flat)):
            assert mine.dtype == dtype
            torch.testing.assert_close(mine.float(), p.detach(), rtol=ulp, atol=1e-3)


def test_segment_without_grad_is_skipped_like_torch():
    sizes = [5, 9, 3]
    g = torch.Generator().manual_seed(7)
    values = [torch.randn(n, generator=g) for n in sizes]
    flags = bytearray(len(sizes))
    arena = Arena(values, torch.float32, has_grad=flags)
    params = [v.clone().requires_grad_(True) for v in values]
    base = ref._snapshot_params(params)
    opt = torch.optim.Adam(params, lr=1e-1)
    pattern = [[1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 0]]
    for present in pattern:
        grads = [torch.randn(n, generator=g) if k else None for n, k in zip(sizes, present)]
        torch_step(params, grads, opt, None)
        flags[:] = bytes(present)
        arena.grad.copy_(torch.cat([gr if gr is not None else torch.zeros(n) for gr, n in zip(grads, sizes)]))
        stats = C.fused_step([arena.group], lr=1e-1)
        for p, mine in zip(params, arena.views(arena.flat)):
            torch.testing.assert_close(mine, p.detach(), rtol=1e-5, atol=1e-6)
        assert stats["total_update_norm"] == pytest.approx(ref._global_l2_update_norm(base), rel=1e-5)
    assert arena.group.steps == [sum(col) for col in zip(*pattern)]


def test_anchor_gradient_matches_autograd_of_eata_anchor_loss():
    sizes = [4, 1000, 7]
    g = torch.Generator().manual_seed(11)
    values = [torch.randn(n, generator=g) for n in sizes]
    arena = Arena(values, torch.float32)
    params = [v.clone().requires_grad_(True) for v in values]
    base = ref._snapshot_params(params)
    opt = torch.optim.Adam(params, lr=1e-2)
    lam = 0.7
    for _ in range(3):
        grads = [torch.randn(n, generator=g) for n in sizes]
        opt.zero_grad(set_to_none=True)
        anchor = ref._eata_anchor_loss(base)
        (sum((p * gr).sum() for p, gr in zip(params, grads)) + lam * anchor).backward()
        gnorm = ref._global_grad_norm(params)
        opt.step()
        arena.grad.copy_(torch.cat(grads))
        stats = C.fused_step([arena.group], lr=1e-2, anchor_lambda=lam)
        assert stats["anchor_loss"] == pytest.approx(float(anchor.detach()), rel=1e-5, abs=1e-12)
        assert stats["grad_norm"] == pytest.approx(gnorm, rel=1e-5)
        for p, mine in zip(params, arena.views(arena.flat)):
            torch.testing.assert_close(mine, p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("per_segment", [False, True])
def test_sar_perturb_matches_reference_and_snapshots(adaptive, per_segment):
    sizes = [6, 300]
    g = torch.Generator().manual_seed(5)
    values = [torch.randn(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g) for n in sizes]
    arena = Arena(values, torch.float32)
    if per_segment:  # the backup as one tensor per segment (what the arena gives the C++ engine)
        pieces = [torch.empty(n) for n in sizes]
        arena.group.set_snapshot(pieces)
        arena.snap = pieces
    params = [v.clone().requires_grad_(True) for v in values]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    backup, rho = ref._sar_perturb_and_backup(params, rho=0.05, adaptive=adaptive, first_step_scale=1.0)
    arena.grad.copy_(torch.cat(grads))
    before = arena.flat.clone()
    norm, applied = C.sar_perturb([arena.group], 0.05, adaptive)
    assert applied and rho == 0.05
    assert torch.equal(torch.cat(arena.snap) if per_segment else arena.snap, before)
    for p, mine in zip(params, arena.views(arena.flat)):
        torch.testing.assert_close(mine, p.detach(), rtol=1e-6, atol=1e-7)
    assert C.sar_perturb([arena.group], 0.0, adaptive)[1] is False


def test_non_finite_grads_propagate_to_the_norms():
    arena = Arena([torch.ones(10), torch.ones(3)], torch.float32)
    arena.grad[4] = float("nan")
    stats = C.fused_step([arena.group], lr=1e-2, max_grad_norm=1.0)
    assert math.isnan(stats["grad_norm"]) and math.isnan(stats["update_norm"])
    assert math.isnan(stats["total_update_norm"])
    arena2 = Arena([torch.ones(10)], torch.float32)
    arena2.grad.fill_(3e19)  # the reference's fp32 sum of squares overflows to inf
    assert math.isinf(C.fused_step([arena2.group], lr=1e-2)["grad_norm"])


def test_results_do_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(1)
    values = [torch.randn(n, generator=g) for n in [70001, 3, 50000]]
    grads = torch.randn(120004, generator=g)
    out = []
    threads = C.num_threads()
    try:
        for n in (1, 2, 1):
            C.set_num_threads(n)
            arena = Arena(values, torch.float32)
            arena.grad.copy_(grads)
            stats = C.fused_step([arena.group], lr=1e-2, max_grad_norm=0.3)
            out.append((stats, arena.flat.clone()))
    finally:
        C.set_num_threads(threads)
    for stats, flat in out[1:]:
        assert stats == out[0][0]
        assert torch.equal(flat, out[0][1])


def test_multiple_groups_share_one_grad_norm():
    g = torch.Generator().manual_seed(2)
    a = Arena([torch.randn(50, generator=g)], torch.float32)
    b = Arena([torch.randn(20, generator=g).to(torch.bfloat16)], torch.bfloat16)
    a.grad.normal_(generator=g)
    b.grad.copy_(torch.randn(20, generator=g))
    total = math.sqrt(float(a.grad.pow(2).sum()) + float(b.grad.float().pow(2).sum()))
    stats = C.fused_step([a.group, b.group], lr=1e-2, max_grad_norm=0.1)
    assert stats["grad_norm"] == pytest.approx(total, rel=1e-5)
    assert stats["grad_norm_clipped"] == pytest.approx(0.1, rel=1e-3)


@pytest.mark.parametrize("make,match", [
    (lambda: C.ArenaGroup(torch.zeros(4), torch.zeros(3), torch.zeros(4), torch.zeros(4), torch.zeros(4), None, [0], [4]), "grad has 3 elements"),
    (lambda: C.ArenaGroup(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), None, [0], [3]), "segments cover 3"),
    (lambda: C.ArenaGroup(torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float16), torch.zeros(4), torch.zeros(4), None, [0], [4]), "must be float32"),
    (lambda: C.ArenaGroup(torch.zeros(4, 2).t(), torch.zeros(8), torch.zeros(8), torch.zeros(8), torch.zeros(8), None, [0], [8]), "param must be contiguous"),
    (lambda: C.ArenaGroup(torch.zeros(4, dtype=torch.int32), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), None, [0], [4]), "unsupported dtype torch.int32"),
    (lambda: C.ArenaGroup([1.0], torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), None, [0], [4]), "param must be a torch.Tensor"),
    (lambda: C.ArenaGroup(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), None, [0], [4], bytearray(2)), "one entry per segment"),
    (lambda: C.fused_step([], lr=1e-3), "groups must not be empty"),
])
def test_bad_inputs_have_clear_errors(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_stats_anchor_value_at_lambda_zero(dtype):
    """anchor_value=True: the anchor value sum_i mean((p_i - base_i)^2) over segments with a grad,
    the grad norm untouched (no anchor gradient at lambda 0)."""
    values = [torch.randn(37), torch.randn(5, 3), torch.randn(300)]
    arena = Arena(values, dtype, has_grad=bytearray(b"\x01\x00\x01"))
    arena.grad.copy_(torch.randn(arena.flat.numel()).to(dtype))
    arena.base.copy_((arena.flat.float() + 0.05 * torch.randn(arena.flat.numel())).to(dtype))
    plain = C.grad_stats([arena.group], 0.0)
    norm, anchor = C.grad_stats([arena.group], 0.0, anchor_value=True)
    assert plain[1] == 0.0 and norm == plain[0]
    want = sum(((p.float() - b.float()) ** 2).mean().item()
               for i, (p, b) in enumerate(zip(arena.views(arena.flat), arena.views(arena.base))) if i != 1)
    assert anchor == pytest.approx(want, rel=1e-5)
    assert C.grad_stats([arena.group], 0.25)[1] == pytest.approx(anchor, rel=1e-6)


def test_write_snapshot_requires_a_snapshot_buffer():
    arena = Arena([torch.zeros(3)], torch.float32, snapshot=False)
    with pytest.raises(ValueError, match="write_snapshot needs a snapshot buffer"):
        C.fused_step([arena.group], lr=1e-3, write_snapshot=True)
    C.fused_step([arena.group], lr=1e-3, write_snapshot=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snapshot_buffer_binds_late_and_unbinds(dtype):
    """set_snapshot: a buffer bound after construction receives the pre-step values; None unbinds."""
    arena = Arena([torch.randn(37), torch.randn(5, 3)], dtype, snapshot=False)
    arena.grad.copy_(torch.randn(arena.flat.numel()).to(dtype))
    arena.has_grad = None
    before = arena.flat.clone()
    snap = torch.full_like(arena.flat, 7.0)
    arena.group.set_snapshot(snap)
    C.fused_step([arena.group], lr=1e-2, write_snapshot=True)
    assert torch.equal(snap, before) and not torch.equal(arena.flat, before)
    for bad, match in ((torch.empty(3, dtype=dtype), "snap has 3 elements, param has 52"),
                       (torch.empty_like(arena.flat, dtype=torch.float16), "snap dtype differs from param"),
                       ([torch.empty(37, dtype=dtype)], "snap has 1 tensors, the arena has 2 segments")):
        with pytest.raises((TypeError, ValueError), match=match):
            arena.group.set_snapshot(bad)
    pieces = [torch.empty(37, dtype=dtype), torch.empty(15, dtype=dtype)]  # one tensor per segment
    arena.group.set_snapshot(pieces)
    before = arena.flat.clone()
    C.fused_step([arena.group], lr=1e-2, write_snapshot=True)
    assert torch.equal(torch.cat(pieces), before) and not torch.equal(arena.flat, before)
    arena.group.set_snapshot(None)
    with pytest.raises(ValueError, match="write_snapshot needs a snapshot buffer"):
        C.fused_step([arena.group], lr=1e-3, write_snapshot=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_norm,anchor_lambda", [(None, 0.0), (0.5, 0.0), (None, 0.3), (0.5, 0.3)])
def test_snapshot_in_the_grad_buffer_gives_the_same_step(dtype, max_norm, anchor_lambda):
    """The step reads each grad before writing the snapshot over it: bit-identical to a separate
    snapshot buffer, and the grad buffer ends holding the pre-step parameters."""
    g = torch.Generator().manual_seed(5)
    values = [torch.randn(n, generator=g) for n in [7, 1, 16385, 33]]
    apart = Arena(values, dtype)
    inside = Arena(values, dtype, snapshot=False)
    inside.group.set_snapshot(inside.grad)
    for step in range(3):
        grads = torch.randn(apart.flat.numel(), generator=g).to(dtype)
        apart.grad.copy_(grads)
        inside.grad.copy_(grads)
        before = inside.flat.clone()
        kw = dict(lr=1e-2, max_grad_norm=max_norm, anchor_lambda=anchor_lambda)
        assert C.fused_step([inside.group], **kw) == C.fused_step([apart.group], **kw)
        assert torch.equal(inside.grad, before) and torch.equal(apart.snap, before)
        for k in ("flat", "m", "v"):
            assert torch.equal(getattr(inside, k), getattr(apart, k)), (step, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("anchor_lambda,restore_prob", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.3)])
def test_base_and_moments_given_per_segment_equal_flat_ones(dtype, anchor_lambda, restore_prob):
    """A base and moments of one separate tensor per segment (the arena passes the parameters'
    original storages, and small moment allocations) work exactly like flat ones: Adam,
    total-update norm, EATA anchor, CoTTA restore."""
    g = torch.Generator().manual_seed(9)
    values = [torch.randn(n, generator=g) for n in [7, 1, 16385, 33]]
    flat = Arena(values, dtype)
    split = Arena(values, dtype)
    pieces = [v.to(dtype).clone() for v in values]  # separate storages, drift below moves flat away
    split.group.set_base(pieces)
    moments = [[torch.full((v.numel(),), float("nan")) for v in values] for _ in range(2)]  # never read unset
    split.group.set_moments(*moments)
    for step in range(3):
        grads = torch.randn(flat.flat.numel(), generator=g).to(dtype)
        flat.grad.copy_(grads)
        split.grad.copy_(grads)
        kw = dict(lr=5e-2, max_grad_norm=0.5, anchor_lambda=anchor_lambda, restore_prob=restore_prob,
                  restore_seed=3, restore_counter=step)
        assert C.fused_step([split.group], **kw) == C.fused_step([flat.group], **kw)
        assert C.grad_stats([split.group], anchor_lambda, True) == C.grad_stats([flat.group], anchor_lambda, True)
        assert torch.equal(split.flat, flat.flat)
        assert torch.equal(torch.cat(moments[0]), flat.m) and torch.equal(torch.cat(moments[1]), flat.v)
    if restore_prob:  # about 30% of the elements were put back to the (per-segment) base last step
        assert (split.flat == torch.cat(pieces)).float().mean() > 0.2
    assert all(torch.equal(a, v.to(dtype)) for a, v in zip(pieces, values))  # the base is only read


@pytest.mark.parametrize("base,match", [
    ([torch.zeros(3)], "base has 1 tensors, the arena has 2 segments"),
    ([torch.zeros(3), torch.zeros(5)], "base segment 1 must have 4 elements"),
    ([torch.zeros(3), torch.zeros(4, dtype=torch.float16)], "base segment 1 must have 4 elements of the param dtype"),
    ([torch.zeros(3), torch.zeros(4, 2)[:, 0]], "base segment must be contiguous"),
    (torch.zeros(6), "base has 6 elements, param has 7"),
])
def test_bad_base_has_a_clear_error(base, match):
    arena = Arena([torch.zeros(3), torch.zeros(4)], torch.float32)
    with pytest.raises(ValueError, match=match):
        arena.group.set_base(base)


@pytest.mark.parametrize("moments,match", [
    ([torch.zeros(3)], "exp_avg has 1 tensors, the arena has 2 segments"),
    ([torch.zeros(3), torch.zeros(4, dtype=torch.bfloat16)], "exp_avg segment 1 must have 4 elements of float32"),
    (torch.zeros(7, dtype=torch.bfloat16), "exp_avg must be float32"),
])
def test_bad_moments_have_a_clear_error(moments, match):
    arena = Arena([torch.zeros(3), torch.zeros(4)], torch.bfloat16)
    with pytest.raises((TypeError, ValueError), match=match):
        arena.group.set_moments(moments, arena.v)


def test_sar_perturb_refuses_a_snapshot_in_the_grad_buffer():
    arena = Arena([torch.randn(9)], torch.float32, snapshot=False)
    arena.grad.fill_(1.0)
    arena.group.set_snapshot(arena.grad)
    with pytest.raises(ValueError, match="apart from the grad buffer"):
        C.sar_perturb([arena.group], 0.05, False)


def test_group_keeps_its_tensors_alive():
    """Tensors whose pointers the group holds stay valid after the caller drops them."""
    group = C.ArenaGroup(torch.ones(1000), torch.ones(1000), torch.zeros(1000), torch.zeros(1000),
                         torch.ones(1000), torch.empty(1000), [0], [1000])
    junk = [torch.full((1000,), 7.0) for _ in range(50)]  # would reuse freed storage
    stats = C.fused_step([group], lr=0.5)
    assert stats["grad_norm"] == pytest.approx(math.sqrt(1000.0), rel=1e-6)
    del junk


def test_first_step_never_reads_the_moment_buffers():
    """The arena allocates the moments uninitialised: step 1 must start them at 0 regardless."""
    g = torch.Generator().manual_seed(21)
    values = [torch.randn(n, generator=g) for n in [5, 300]]
    arena = Arena(values, torch.float32, has_grad=bytearray(b"\x01\x00"))
    arena.m.fill_(float("nan"))
    arena.v.fill_(float("nan"))
    params = [v.clone().requires_grad_(True) for v in values]
    opt = torch.optim.Adam(params, lr=1e-2)
    schedule = [[1, 0], [1, 1], [1, 1]]  # the second tensor's first step comes later
    for present in schedule:
        grads = [torch.randn(p.numel(), generator=g) if k else None for p, k in zip(params, present)]
        torch_step(params, grads, opt, None)
        arena.has_grad[:] = bytes(present)
        arena.grad.copy_(torch.cat([gr if gr is not None else torch.zeros(p.numel()) for gr, p in zip(grads, params)]))
        C.fused_step([arena.group], lr=1e-2)
        for p, mine in zip(params, arena.views(arena.flat)):
            torch.testing.assert_close(mine, p.detach(), rtol=1e-5, atol=1e-6)
    arena.group.reset_state()  # a fresh run: step counts 0, old moments ignored
    assert arena.group.steps == [0, 0]
