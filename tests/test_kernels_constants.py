"""yolozu_ttt.kernels.constants: the constants the Triton kernels, the engine and the C++ engine share
(each Python value equals its C++ copy), and the restore RNG's key pinned to fixed vectors.

The vectors were computed outside this code base from the published definition of murmur3's
``fmix32`` (Appleby's MurmurHash3.cpp: ``h ^= h >> 16; h *= 0x85ebca6b; h ^= h >> 13;
h *= 0xc2b2ae35; h ^= h >> 16``, in numpy uint32 arithmetic) chained as the key's docstring says;
``fmix32(1) == 0x514e28b7`` is the value commonly published for murmur3's finaliser.
"""
from __future__ import annotations

import pytest

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


def test_the_engine_clips_with_the_shared_epsilon():
    from yolozu_ttt import engine

    assert engine.CLIP_EPS is K.CLIP_EPS


@pytest.mark.parametrize("h,expected", FMIX32_VECTORS)
def test_fmix32_is_murmur3s(h, expected):
    assert K.fmix32(h) == expected


@pytest.mark.parametrize("args,expected", RESTORE_KEY_VECTORS)
def test_restore_key_is_pinned(args, expected):
    assert K.restore_key(*args) == expected
    assert C.restore_key(*args) == expected
