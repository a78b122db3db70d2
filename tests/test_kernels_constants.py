"""yolozu_ttt.kernels.constants: the constants the Triton kernels, the engine and the C++ engine share
(each Python value equals its C++ copy), the clip epsilon as each engine clips with it (a grad
norm of a few epsilons, where it moves the coefficient), and the restore RNG's key pinned to fixed
vectors.

The vectors were computed outside this code base from the published definition of murmur3's
``fmix32`` (Appleby's MurmurHash3.cpp: ``h ^= h >> 16; h *= 0x85ebca6b; h ^= h >> 13;
h *= 0xc2b2ae35; h ^= h >> 16``, in numpy uint32 arithmetic) chained as the key's docstring says;
``fmix32(1) == 0x514e28b7`` is the value commonly published for murmur3's finaliser.
"""
from __future__ import annotations

import pytest
import torch
from conftest import UNDER_INTERPRETER, run_under_interpreter

import yolozu_ttt._C as C
from yolozu_ttt.kernels import constants as K

SHARED = ("CLIP_EPS", "SAR_EPS", "FMIX32_M1", "FMIX32_M2", "RESTORE_SEED_MIX", "RESTORE_COUNTER_MUL",
          "RESTORE_GROUP_MUL", "UNIFORM_BITS")

FMIX32_VECTORS = [(0x0, 0), (0x1, 0x514E28B7), (0x2, 821347078), (0xDEADBEEF, 233162409), (0xFFFFFFFF, 2180083513)]

RESTORE_KEY_VECTORS = [
    ((0, 0, 0), 1209052960),
    ((1, 0, 0), 3235530890),
    ((0, 1, 0), 755156610),
    ((0, 0, 1), 3900219355),
    ((7, 3, 2), 3103545444),
    ((2 ** 64 - 1, 2 ** 40, 3), 2548140517),
    ((12345678901234, 99, 0), 2578900279),
    ((2 ** 32, 2 ** 32 + 5, 7), 609006084),
]


def test_every_shared_constant_equals_its_cpp_copy():
    assert set(C.CONSTANTS) == set(SHARED)
    for name in SHARED:
        assert getattr(K, name) == C.CONSTANTS[name], name


# ---- CLIP_EPS as each clipping path uses it ---------------------------------------------------
#: a grad norm of a few CLIP_EPS: the epsilon moves clip_grad_norm_'s coefficient by 1/5 here, so an
#: epsilon off by 0.01% moves it by 2e-5 relative, far above the fp32 arithmetic's error (CLIP_TOL)
TINY_NORM, MAX_NORM = 4 * K.CLIP_EPS, K.CLIP_EPS
#: the coefficient in fp32: the norm (fp32 tiles in fp64, then rounded), max_norm, eps, the sum and
#: the quotient each rounded once: 5 roundings of 2**-24 relative, doubled
CLIP_TOL = 10 * 2.0 ** -24


def _tiny_grads(n: int = 1000) -> torch.Tensor:
    g = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return (g * (TINY_NORM / g.norm())).float()


def _assert_clip_coef(coef, grad_norm: float, what: str, tol: float = CLIP_TOL) -> None:
    """``coef`` (a float, or a tensor of them) is ``MAX_NORM / (grad_norm + CLIP_EPS)``
    (clip_grad_norm_'s), in fp64 from the constant."""
    assert grad_norm == pytest.approx(TINY_NORM, rel=1e-6), what
    expected = MAX_NORM / (grad_norm + K.CLIP_EPS)
    worst = float((torch.as_tensor(coef, dtype=torch.float64) - expected).abs().max())
    assert worst <= tol * expected, (what, worst / expected, expected)
    assert abs(MAX_NORM / grad_norm - expected) > 1e3 * tol * expected  # the epsilon is what is checked


def _fused_step_clip(fn, group_cls, device="cpu", **kw) -> dict:
    from support_engines import step_stats

    n = 1000
    bufs = [torch.zeros(n, device=device), _tiny_grads(n).to(device), torch.zeros(n, device=device),
            torch.zeros(n, device=device), torch.zeros(n, device=device), torch.zeros(n, device=device)]
    group = group_cls(*bufs, [0], [n], None, **kw)
    return step_stats(fn, [group], 1e-3, device=device, max_grad_norm=MAX_NORM)


@pytest.mark.skipif(UNDER_INTERPRETER, reason="the C++ engine's case runs outside the interpreter")
def test_the_cpp_engine_clips_with_the_shared_epsilon():
    stats = _fused_step_clip(C.fused_step, C.ArenaGroup)
    _assert_clip_coef(stats["clip_coef"], stats["grad_norm"], "C++ fused_step")


@pytest.mark.skipif(not (UNDER_INTERPRETER or torch.cuda.is_available()), reason="needs the interpreter or CUDA")
def test_the_triton_engine_clips_with_the_shared_epsilon():
    from yolozu_ttt.kernels import update as U

    device = "cpu" if UNDER_INTERPRETER else "cuda"
    stats = _fused_step_clip(U.fused_step, U.TritonArenaGroup, device=device, block_size=256)
    _assert_clip_coef(stats["clip_coef"], stats["grad_norm"], "Triton fused_step")


def test_the_engine_clips_with_the_shared_epsilon():
    """``UpdateEngine.clip_grads`` (SAR's clip before its ascent) scales the grads by clip_grad_norm_'s
    coefficient (on the C++ engine here; on Triton's in the interpreter run)."""
    from conftest import make_model

    from yolozu_ttt.arena import ParamArena
    from yolozu_ttt.engine import UpdateEngine

    model = make_model()
    with ParamArena(model, [model.bn.weight, model.bn.bias]) as arena:
        (group,) = arena.groups
        grads = _tiny_grads(group.grad.numel())
        group.grad.copy_(grads)
        arena.mark_all_grads()
        norm = float(UpdateEngine(arena, lr=1e-3).clip_grads(MAX_NORM))
        ratios = group.grad.double() / grads.double()
        backend = arena.backend
    # each grad times the fp32 coefficient, rounded once more
    _assert_clip_coef(ratios, norm, f"UpdateEngine.clip_grads ({backend})", tol=CLIP_TOL + 2.0 ** -24)


@pytest.mark.skipif(UNDER_INTERPRETER, reason="already under the interpreter")
def test_clipping_under_the_interpreter():
    """The clipping tests again with TRITON_INTERPRET=1: the Triton engine's epsilon."""
    run_under_interpreter(__file__, "-k", "clips_with_the_shared_epsilon")


@pytest.mark.parametrize("h,expected", FMIX32_VECTORS)
def test_fmix32_is_murmur3s(h, expected):
    assert K.fmix32(h) == expected


@pytest.mark.parametrize("args,expected", RESTORE_KEY_VECTORS)
def test_restore_key_is_pinned(args, expected):
    assert K.restore_key(*args) == expected
    assert C.restore_key(*args) == expected
