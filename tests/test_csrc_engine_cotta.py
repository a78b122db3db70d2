"""CoTTA in the C++ fused step: teacher EMA against YOLOZU's ``_ema_update``, counter-based restore."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import expected_restore_mask
from support_engines import step_stats
from yolozu.tta import integration as ref

import yolozu_ttt._C as C

# _C.fused_step with a fresh float64 ``out`` (its options through a StepSpec), returning its scalars by name.
fused_step = functools.partial(step_stats, C.fused_step)

SIZES = [7, 1, 1000, 33]


class Arena:
    """Flat buffers for segment sizes with a bound teacher; keeps every tensor handed to C++ alive."""

    def __init__(self, sizes, dtype=torch.float32, *, seed=0, has_grad=None):
        gen = torch.Generator().manual_seed(seed)
        n = sum(sizes)
        self.sizes = list(sizes)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.base = torch.randn(n, generator=gen).to(dtype)
        self.flat = (self.base.float() + 0.05 + 0.1 * torch.rand(n, generator=gen)).to(dtype)  # != base
        self.grad = torch.randn(n, generator=gen).to(dtype)
        self.m, self.v = torch.zeros(n), torch.zeros(n)
        self.snap = torch.empty_like(self.flat)
        self.teacher = torch.randn(n, generator=gen).to(dtype)
        self.has_grad = bytearray(b"\x01" * len(sizes)) if has_grad is None else bytearray(has_grad)
        self.group = C.ArenaGroup(self.flat, self.grad, self.m, self.v, self.base, self.snap, self.offsets,
                                  self.sizes, self.has_grad)
        self.group.set_teacher(self.teacher)

    def views(self, buf):
        return [buf[o:o + n] for o, n in zip(self.offsets, self.sizes)]


def assert_ema_like(mine: torch.Tensor, theirs: torch.Tensor, t: torch.Tensor, p: torch.Tensor, momentum: float) -> None:
    """``mine`` and ``theirs`` are two fp32 evaluations of the EMA t*m + (1-m)*p (m clamped to [0, 1]),
    rounded in whatever order and with or without fused multiply-adds (the CPU's kernels decide):
    each is within gamma_4 * (|t m| + |(1-m) p|) of the exact value (m and 1-m rounded to fp32, two
    products, one sum; Higham's gamma_n = n u / (1 - n u), u = 2^-24), so they differ by at most
    twice that, elementwise."""
    m = min(max(float(momentum), 0.0), 1.0)
    u = 2.0 ** -24
    gamma = 4 * u / (1 - 4 * u)
    scale = (t.double() * m).abs() + (p.double() * (1.0 - m)).abs()
    excess = (mine.double() - theirs.double()).abs() - 2 * gamma * scale
    assert excess.max() <= 0, f"EMA off by {excess.max():.3g} beyond fp32's reach"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize("momentum", [0.999, 0.9, 0.0, 1.0, 1.5, -0.5])
def test_ema_matches_reference_without_update(momentum):
    """No grads: p is unchanged and the teacher gets ``_ema_update``'s t*m + (1-m)*p (m clamped)."""
    a = Arena(SIZES, has_grad=b"\x00" * len(SIZES))
    student = torch.nn.ParameterList([torch.nn.Parameter(v.clone()) for v in a.views(a.flat)])
    teacher = torch.nn.ParameterList([torch.nn.Parameter(v.clone()) for v in a.views(a.teacher)])
    p0, t_before = a.flat.clone(), a.teacher.clone()
    fused_step([a.group], 1e-2, write_snapshot=False, ema_momentum=momentum)
    ref._ema_update(teacher, student, momentum=momentum)
    assert torch.equal(a.flat, p0)
    assert_ema_like(a.teacher, teacher_flat(teacher), t_before, p0, momentum)
    if momentum >= 1.0:
        assert torch.equal(bits(a.teacher), bits(teacher_flat(teacher)))
    if momentum <= 0.0:
        assert torch.equal(bits(a.teacher), bits(p0))


def teacher_flat(teacher) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in teacher])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ema_follows_the_updated_params(dtype):
    """With grads, the EMA uses the post-Adam parameters (segments without a grad: the old ones)."""
    a = Arena(SIZES, dtype, has_grad=b"\x01\x00\x01\x01")
    t0 = a.teacher.clone()
    for step in range(3):
        fused_step([a.group], 3e-2, max_grad_norm=0.5, ema_momentum=0.8)
        expected = (t0.float() * 0.8 + 0.2 * a.flat.float()).to(dtype)  # fp32 math, rounded once
        if dtype == torch.float32:
            student = torch.nn.ParameterList([torch.nn.Parameter(a.flat.clone())])
            teacher = torch.nn.ParameterList([torch.nn.Parameter(t0.clone())])
            ref._ema_update(teacher, student, momentum=0.8)
            assert_ema_like(a.teacher, teacher[0].detach(), t0, a.flat, 0.8)
        torch.testing.assert_close(a.teacher, expected, rtol=0, atol=0)
        t0 = a.teacher.clone()
        a.grad.mul_(-1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_per_segment_equals_a_flat_teacher(dtype):
    """The arena gives the C++ engine one teacher tensor per parameter: the same EMA bit for bit."""
    flat, split = Arena(SIZES, dtype, seed=3), Arena(SIZES, dtype, seed=3)
    pieces = [t.clone() for t in split.views(split.teacher)]
    split.group.set_teacher(pieces)
    for step in range(3):
        kw = dict(ema_momentum=0.9, restore_prob=0.2, restore_seed=1, restore_counter=step)
        assert fused_step([split.group], 1e-2, **kw) == fused_step([flat.group], 1e-2, **kw)
        assert torch.equal(torch.cat(pieces), flat.teacher) and torch.equal(split.flat, flat.flat)
    assert not torch.equal(split.teacher, flat.teacher)  # the flat buffer was unbound


def test_ema_needs_a_teacher_and_teacher_must_match():
    a = Arena(SIZES)
    a.group.set_teacher(None)
    with pytest.raises(ValueError, match="teacher"):
        fused_step([a.group], 1e-2, ema_momentum=0.9)
    with pytest.raises(ValueError, match="teacher has"):
        a.group.set_teacher(torch.zeros(a.flat.numel() + 1))
    with pytest.raises(TypeError, match="teacher dtype differs from param"):
        a.group.set_teacher(torch.zeros(a.flat.numel(), dtype=torch.float16))
    with pytest.raises(ValueError, match="teacher has 1 tensors"):
        a.group.set_teacher([torch.zeros(a.flat.numel())])


@pytest.mark.parametrize("options,match", [({"restore_prob": -0.1}, "restore_prob must be >= 0"),
                                           ({"lr": -1e-2}, "lr must be >= 0"),
                                           ({"betas": (0.9, 1.0)}, r"betas must lie in \[0, 1\)")])
def test_bad_step_options_stop_at_the_spec_before_the_engine(options, match):
    """The one validation is the StepSpec's: a bad option raises there, and no call reaches the
    engine (which checks only memory safety), so the arena is as it was."""
    a = Arena(SIZES)
    before = a.flat.clone()
    calls = []
    with pytest.raises(ValueError, match="yolozu_ttt: " + match):
        step_stats(lambda *args: calls.append(args), [a.group], **{"lr": 1e-2, **options})
    assert calls == [] and torch.equal(a.flat, before) and a.group.steps == [0] * len(SIZES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prob", [0.01, 0.3])
def test_restore_pattern_values_and_norms(dtype, prob):
    """Restored elements equal base bit-exactly (segments without a grad too); the others are the
    Adam result; the pattern is the documented hash; norms are those of the final parameters."""
    flags = b"\x01\x00\x01\x01"
    a = Arena(SIZES, dtype, has_grad=flags)
    free = Arena(SIZES, dtype, has_grad=flags)  # the same step without restore
    pre = a.flat.clone()
    stats = fused_step([a.group], 1e-2, ema_momentum=0.9, restore_prob=prob, restore_seed=11, restore_counter=4)
    fused_step([free.group], 1e-2, ema_momentum=0.9)
    mask = expected_restore_mask(a.flat.numel(), prob, 11, 4)
    assert stats["restored"] == int(mask.sum()) > 0
    assert torch.equal(bits(a.flat[mask]), bits(a.base[mask]))
    assert torch.equal(bits(a.flat[~mask]), bits(free.flat[~mask]))
    assert torch.equal(bits(a.teacher), bits(free.teacher))  # EMA on the pre-restore parameters
    assert torch.equal(bits(a.snap), bits(pre))
    upd = torch.linalg.vector_norm((a.flat.double() - pre.double()))
    tot = torch.linalg.vector_norm((a.flat.double() - a.base.double()))
    assert stats["update_norm"] == pytest.approx(float(upd), rel=1e-5)
    assert stats["total_update_norm"] == pytest.approx(float(tot), rel=1e-5)
    assert float(tot) < float(torch.linalg.vector_norm(free.flat.double() - free.base.double()))


def test_restore_is_deterministic_and_keyed():
    """Same (seed, counter): bit-identical; another seed, counter or group: another pattern."""
    n = 50_000

    def run(seed, counter, threads=None):
        a = Arena([n], seed=3)
        if threads is not None:
            C.set_num_threads(threads)
        stats = fused_step([a.group], 1e-2, ema_momentum=0.99, restore_prob=0.3, restore_seed=seed,
                             restore_counter=counter)
        return stats, a.flat.clone(), a.teacher.clone()

    threads = C.num_threads()
    try:
        s1, p1, t1 = run(7, 2, threads=1)
        s2, p2, t2 = run(7, 2, threads=max(2, threads))
    finally:
        C.set_num_threads(threads)
    assert s1 == s2 and torch.equal(bits(p1), bits(p2)) and torch.equal(bits(t1), bits(t2))
    patterns = [expected_restore_mask(n, 0.3, s, c, g) for s, c, g in [(7, 2, 0), (8, 2, 0), (7, 3, 0), (7, 2, 1)]]
    for other in patterns[1:]:
        assert not torch.equal(patterns[0], other)
    assert len({C.restore_key(7, c, 0) for c in range(1000)}) == 1000
    # full-width seeds and counters: pinned in test_kernels_constants.py (RESTORE_KEY_VECTORS)


def test_each_group_draws_its_own_pattern():
    """Two groups in one step: group i uses restore_key(seed, counter, i)."""
    a, b = Arena([3000], seed=1), Arena([2000], torch.bfloat16, seed=2)
    stats = fused_step([a.group, b.group], 1e-2, restore_prob=0.3, restore_seed=5, restore_counter=9)
    ma, mb = expected_restore_mask(3000, 0.3, 5, 9, 0), expected_restore_mask(2000, 0.3, 5, 9, 1)
    assert stats["restored"] == int(ma.sum()) + int(mb.sum())
    assert torch.equal(bits(a.flat[ma]), bits(a.base[ma])) and torch.equal(bits(b.flat[mb]), bits(b.base[mb]))
    assert not torch.equal(ma[:2000], mb)


@pytest.mark.parametrize("prob", [0.01, 0.3])
def test_restored_fraction_is_binomial(prob):
    """Over ~200k elements and several steps, the restored fraction is within 5 sigma of p."""
    n = 200_003
    a = Arena([n // 2, n - n // 2], seed=4)
    for counter in range(3):
        stats = fused_step([a.group], 1e-3, restore_prob=prob, restore_seed=123, restore_counter=counter)
        sigma = math.sqrt(prob * (1.0 - prob) / n)
        assert abs(stats["restored"] / n - prob) < 5 * sigma, (counter, stats["restored"] / n)


@pytest.mark.parametrize("prob", [1.0, 2.5])
def test_prob_one_restores_everything(prob):
    a = Arena(SIZES, has_grad=b"\x01\x00\x01\x01")
    pre = a.flat.clone()
    stats = fused_step([a.group], 1e-2, ema_momentum=0.5, restore_prob=prob, restore_seed=1)
    assert stats["restored"] == a.flat.numel()
    assert torch.equal(bits(a.flat), bits(a.base))
    assert stats["total_update_norm"] == 0.0
    assert stats["update_norm"] == pytest.approx(float(torch.linalg.vector_norm(pre.double() - a.base.double())))


def test_prob_zero_restores_nothing():
    a, free = Arena(SIZES), Arena(SIZES)
    stats = fused_step([a.group], 1e-2, ema_momentum=0.9, restore_prob=0.0, restore_seed=1)
    fused_step([free.group], 1e-2, ema_momentum=0.9)
    assert stats["restored"] == 0.0
    assert torch.equal(bits(a.flat), bits(free.flat)) and torch.equal(bits(a.teacher), bits(free.teacher))
