"""The C++ fused update (yolozu_ttt._C) against torch.optim.Adam + clip_grad_norm_ and YOLOZU's helpers."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import engine_stats, non_finite_update_inputs, same_float, torch_reference_norms
from support_engines import step_stats
from yolozu.tta import integration as ref

import yolozu_ttt._C as C
from yolozu_ttt.common import GRAD_STAT_KEYS, SAR_STAT_KEYS, STAT_KEYS
from yolozu_ttt.engine import StepSpec

# The engine calls with a fresh float64 ``out``, returning its scalars by name (a step through its StepSpec).
fused_step = functools.partial(step_stats, C.fused_step)
grad_stats = functools.partial(engine_stats, C.grad_stats, keys=GRAD_STAT_KEYS)
sar_perturb = functools.partial(engine_stats, C.sar_perturb, keys=SAR_STAT_KEYS)

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
        stats = fused_step([arena.group], lr=3e-2, max_grad_norm=max_norm)
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
        fused_step([arena.group], lr=1e-2, max_grad_norm=max_norm)
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
        stats = fused_step([arena.group], lr=1e-1)
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
        stats = fused_step([arena.group], lr=1e-2, anchor_lambda=lam)
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
    sar = sar_perturb([arena.group], 0.05, adaptive)
    assert sar["applied"] == 1.0 and rho == 0.05
    assert torch.equal(torch.cat(arena.snap) if per_segment else arena.snap, before)
    for p, mine in zip(params, arena.views(arena.flat)):
        torch.testing.assert_close(mine, p.detach(), rtol=1e-6, atol=1e-7)
    assert sar_perturb([arena.group], 0.0, adaptive)["applied"] == 0.0


def test_non_finite_grads_propagate_to_the_norms():
    arena = Arena([torch.ones(10), torch.ones(3)], torch.float32)
    arena.grad[4] = float("nan")
    stats = fused_step([arena.group], lr=1e-2, max_grad_norm=1.0)
    assert math.isnan(stats["grad_norm"]) and math.isnan(stats["update_norm"])
    assert math.isnan(stats["total_update_norm"])
    arena2 = Arena([torch.ones(10)], torch.float32)
    arena2.grad.fill_(3e19)  # the reference's fp32 sum of squares overflows to inf
    assert math.isinf(fused_step([arena2.group], lr=1e-2)["grad_norm"])


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
            stats = fused_step([arena.group], lr=1e-2, max_grad_norm=0.3)
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
    stats = fused_step([a.group, b.group], lr=1e-2, max_grad_norm=0.1)
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
    (lambda: C.fused_step([], torch.empty(7, dtype=torch.float64), StepSpec(lr=1e-3).native), "groups must not be empty"),
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
    plain = grad_stats([arena.group], 0.0)
    valued = grad_stats([arena.group], 0.0, anchor_value=True)
    norm, anchor = valued["grad_norm"], valued["anchor_loss"]
    assert plain["anchor_loss"] == 0.0 and norm == plain["grad_norm"]
    want = sum(((p.float() - b.float()) ** 2).mean().item()
               for i, (p, b) in enumerate(zip(arena.views(arena.flat), arena.views(arena.base))) if i != 1)
    assert anchor == pytest.approx(want, rel=1e-5)
    assert grad_stats([arena.group], 0.25)["anchor_loss"] == pytest.approx(anchor, rel=1e-6)


def test_write_snapshot_requires_a_snapshot_buffer():
    arena = Arena([torch.zeros(3)], torch.float32, snapshot=False)
    with pytest.raises(ValueError, match="write_snapshot needs a snapshot buffer"):
        fused_step([arena.group], lr=1e-3, write_snapshot=True)
    fused_step([arena.group], lr=1e-3, write_snapshot=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_snapshot_buffer_binds_late_and_unbinds(dtype):
    """set_snapshot: a buffer bound after construction receives the pre-step values; None unbinds."""
    arena = Arena([torch.randn(37), torch.randn(5, 3)], dtype, snapshot=False)
    arena.grad.copy_(torch.randn(arena.flat.numel()).to(dtype))
    arena.has_grad = None
    before = arena.flat.clone()
    snap = torch.full_like(arena.flat, 7.0)
    arena.group.set_snapshot(snap)
    fused_step([arena.group], lr=1e-2, write_snapshot=True)
    assert torch.equal(snap, before) and not torch.equal(arena.flat, before)
    for bad, match in ((torch.empty(3, dtype=dtype), "snap has 3 elements, param has 52"),
                       (torch.empty_like(arena.flat, dtype=torch.float16), "snap dtype differs from param"),
                       ([torch.empty(37, dtype=dtype)], "snap has 1 tensors, the arena has 2 segments")):
        with pytest.raises((TypeError, ValueError), match=match):
            arena.group.set_snapshot(bad)
    pieces = [torch.empty(37, dtype=dtype), torch.empty(15, dtype=dtype)]  # one tensor per segment
    arena.group.set_snapshot(pieces)
    before = arena.flat.clone()
    fused_step([arena.group], lr=1e-2, write_snapshot=True)
    assert torch.equal(torch.cat(pieces), before) and not torch.equal(arena.flat, before)
    arena.group.set_snapshot(None)
    with pytest.raises(ValueError, match="write_snapshot needs a snapshot buffer"):
        fused_step([arena.group], lr=1e-3, write_snapshot=True)


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
        assert fused_step([inside.group], **kw) == fused_step([apart.group], **kw)
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
        assert fused_step([split.group], **kw) == fused_step([flat.group], **kw)
        assert grad_stats([split.group], anchor_lambda, True) == grad_stats([flat.group], anchor_lambda, True)
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
        sar_perturb([arena.group], 0.05, False)


def test_group_keeps_its_tensors_alive():
    """Tensors whose pointers the group holds stay valid after the caller drops them."""
    group = C.ArenaGroup(torch.ones(1000), torch.ones(1000), torch.zeros(1000), torch.zeros(1000),
                         torch.ones(1000), torch.empty(1000), [0], [1000])
    junk = [torch.full((1000,), 7.0) for _ in range(50)]  # would reuse freed storage
    stats = fused_step([group], lr=0.5)
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
        fused_step([arena.group], lr=1e-2)
        for p, mine in zip(params, arena.views(arena.flat)):
            torch.testing.assert_close(mine, p.detach(), rtol=1e-5, atol=1e-6)
    arena.group.reset_state()  # a fresh run: step counts 0, old moments ignored
    assert arena.group.steps == [0, 0]


def test_stat_counts_match_common():
    """The C++ engine writes as many scalars as yolozu_ttt.common names (their order: the tests below)."""
    assert (C.NUM_STATS, C.NUM_GRAD_STATS, C.NUM_SAR_STATS) == (len(STAT_KEYS), len(GRAD_STAT_KEYS),
                                                                len(SAR_STAT_KEYS))


def assert_each_in_its_slot(out: torch.Tensor, keys: tuple[str, ...], want: dict[str, float]) -> None:
    """out[i] is want[keys[i]] for every key, the wanted values differ from each other by more than 1%
    (so any two slots swapped fail), and out past the layout is untouched (-7)."""
    values = [want[k] for k in keys]
    assert all(abs(a - b) > 0.01 * max(abs(a), abs(b)) for i, a in enumerate(values) for b in values[i + 1:])
    for i, key in enumerate(keys):
        assert out[i].item() == pytest.approx(want[key], rel=1e-5), key
    assert out[len(keys):].tolist() == [-7.0] * (out.numel() - len(keys))


def test_each_stat_lands_in_its_slot():
    """fused_step, grad_stats and sar_perturb: every scalar against a hand computation, by key."""
    g = torch.Generator().manual_seed(13)
    values = [torch.randn(n, generator=g) for n in [40, 300]]
    arena = Arena(values, torch.float32)
    arena.base.add_(0.1 * torch.randn(arena.base.numel(), generator=g))  # the anchor value is not 0
    arena.grad.copy_(torch.randn(arena.flat.numel(), generator=g))
    lam, max_norm = 0.3, 0.5
    p0, base, grad = arena.flat.clone(), arena.base.clone(), arena.grad.clone()
    anchor = sum(((p - b).double() ** 2).mean().item() for p, b in zip(arena.views(p0), arena.views(base)))
    full = torch.cat([gr + 2 * lam * (p - b) / p.numel()  # the grad with the EATA anchor gradient
                      for gr, p, b in zip(arena.views(grad), arena.views(p0), arena.views(base))])
    gnorm = torch.linalg.vector_norm(full.double()).item()
    coef = (max_norm / (torch.tensor(gnorm, dtype=torch.float32) + 1e-6)).item()  # clip_grad_norm_'s fp32 value

    out = torch.full((4,), -7.0, dtype=torch.float64)
    C.grad_stats([arena.group], out, lam, anchor_value=True)
    assert_each_in_its_slot(out, GRAD_STAT_KEYS, {"grad_norm": gnorm, "anchor_loss": anchor})

    out = torch.full((9,), -7.0, dtype=torch.float64)
    C.fused_step([arena.group], out, StepSpec(lr=1e-2, max_grad_norm=max_norm, anchor_lambda=lam, restore_prob=0.3,
                                              restore_seed=2).native, restore_counter=1)
    assert_each_in_its_slot(out, STAT_KEYS, {
        "grad_norm": gnorm, "grad_norm_clipped": coef * gnorm, "anchor_loss": anchor, "clip_coef": coef,
        "update_norm": torch.linalg.vector_norm((arena.flat - p0).double()).item(),
        "total_update_norm": torch.linalg.vector_norm((arena.flat - base).double()).item(),
        "restored": float((arena.flat == base).sum()),  # elements put back to base (~30%)
    })

    arena.grad.copy_(grad)
    out = torch.full((3,), -7.0, dtype=torch.float64)
    C.sar_perturb([arena.group], out, 0.05, False)
    assert_each_in_its_slot(out, SAR_STAT_KEYS,
                            {"direction_norm": torch.linalg.vector_norm(grad.double()).item(), "applied": 1.0})


@pytest.mark.parametrize("call,kwargs", [("fused_step", dict(options=StepSpec(lr=1e-2, max_grad_norm=0.5).native)),
                                         ("grad_stats", {}), ("sar_perturb", dict(rho=0.05, adaptive=False))])
@pytest.mark.parametrize("out,match", [
    (torch.zeros(7, dtype=torch.float32), "out must be float64, got torch.float32"),
    (torch.zeros(1, dtype=torch.float64), "out has 1 elements, {call} writes {n}"),
    (torch.zeros(14, dtype=torch.float64)[::2], "out must be contiguous"),
    (None, "out must be a tensor, got None"),
])
def test_bad_out_is_a_value_error_before_anything_changes(call, kwargs, out, match):
    arena = Arena([torch.randn(5), torch.randn(3)], torch.float32)
    arena.grad.normal_()
    arena.snap.zero_()
    before = [t.clone() for t in (arena.flat, arena.grad, arena.snap)]
    n = {"fused_step": len(STAT_KEYS), "grad_stats": len(GRAD_STAT_KEYS), "sar_perturb": len(SAR_STAT_KEYS)}[call]
    with pytest.raises(ValueError, match=match.format(call=call, n=n)):
        getattr(C, call)([arena.group], out, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, (arena.flat, arena.grad, arena.snap)))
    assert arena.group.steps == [0, 0]


@pytest.mark.parametrize("first,sizes,lr", [
    ("nan", [7, 1, 300], math.inf),  # inf * 0 where a grad, so the Adam moment, is 0: a NaN in the sums
    ("inf", [7, 1, 300], math.inf),  # every element moves by +-inf: the sums overflow, no NaN
    ("inf", [4], 1e19),  # finite steps of ~1e19 whose fp32 sum of squares overflows within one tile
    ("inf", [1, 1, 1, 1], 1e19),  # ... across work items: the fp64 sum is finite, the fp32 norm is not
    ("nan", [40, 2000], math.inf),  # a NaN tile among overflowing ones, in one work item
    ("nan", [40, 140000], math.inf),  # ... a NaN work item among overflowing ones (OpenMP-parallel)
])
def test_non_finite_update_norms_are_those_of_torch(first, sizes, lr):
    """NaN stays NaN: a non-finite update norm is what torch's fp32 reference computes, NaN where
    its sum holds a NaN and inf where it overflows (step 1 as named, step 2 whatever torch says)."""
    values, grads = non_finite_update_inputs(first, sizes)
    want, params = torch_reference_norms(values, grads, lr, steps=2)
    arena = Arena(values, torch.float32)
    for step, (update, total) in enumerate(want):
        arena.grad.copy_(torch.cat(grads))
        stats = fused_step([arena.group], lr=lr)
        if step == 0:
            assert math.isnan(update) if first == "nan" else math.isinf(update)
            assert math.isnan(total) if first == "nan" else math.isinf(total)
        assert same_float(stats["update_norm"], update), (step, stats["update_norm"], update)
        assert same_float(stats["total_update_norm"], total), (step, stats["total_update_norm"], total)
    for p, mine in zip(params, arena.views(arena.flat)):
        torch.testing.assert_close(mine, p, rtol=1e-5, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("anchor_lambda", [0.0, 0.3])
def test_a_closed_gate_applies_nothing_and_an_open_one_everything(anchor_lambda):
    """``gate``: a 1-element float64 tensor read at the call. 0: no parameter, moment or step count
    changes (the stats are still written, the update norm 0, the total update norm that of the
    unchanged values); nonzero: exactly the ungated step."""
    g = torch.Generator().manual_seed(11)
    values = [torch.randn(n, generator=g) for n in (5, 300)]
    grads = torch.randn(305, generator=g)
    arenas = [Arena(values, torch.float32) for _ in range(3)]
    for arena in arenas:
        fused_step([arena.group], lr=1e-2, anchor_lambda=anchor_lambda)  # a first step, so base != flat
        arena.grad.copy_(grads)
    plain, opened, closed = arenas
    state = [t.clone() for t in (closed.flat, closed.m, closed.v)]
    want = fused_step([plain.group], lr=1e-2, anchor_lambda=anchor_lambda)
    got = fused_step([opened.group], lr=1e-2, anchor_lambda=anchor_lambda, gate=torch.ones(1, dtype=torch.float64))
    assert got == want
    for a, b in zip((opened.flat, opened.m, opened.v), (plain.flat, plain.m, plain.v)):
        assert torch.equal(a, b)
    shut = fused_step([closed.group], lr=1e-2, anchor_lambda=anchor_lambda, gate=torch.zeros(1, dtype=torch.float64))
    for a, b in zip((closed.flat, closed.m, closed.v), state):
        assert torch.equal(a, b)
    assert closed.group.steps == [1, 1] and plain.group.steps == [2, 2]
    assert shut["update_norm"] == 0.0
    assert shut["total_update_norm"] == pytest.approx(float((closed.flat - closed.base).norm()), rel=1e-6)
    with pytest.raises(ValueError, match="gate must have one element"):
        fused_step([closed.group], lr=1e-2, gate=torch.zeros(2, dtype=torch.float64))
