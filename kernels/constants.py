"""The named constants the kernels, the engine and the C++ engine share, and the host side of the
restore RNG's key (no Triton here: the CPU engine imports it on machines without Triton).

Each constant has one definition here; ``csrc/update.h`` holds the C++ copies (``yolozu_ttt._C``
exports them by the same names, and a test checks every pair equal).
"""
from __future__ import annotations

#: torch.nn.utils.clip_grad_norm_'s: ``coef = max_norm / (||g|| + CLIP_EPS)``
CLIP_EPS = 1e-6
#: SAR's (the reference's): the ascent scale ``rho / (||d|| + SAR_EPS)``
SAR_EPS = 1e-12
#: partials summed per iteration by a reduction's last program / finalize kernel
RBLOCK = 1024
#: murmur3's fmix32 multipliers (Appleby's MurmurHash3, ``fmix32``)
FMIX32_M1 = 0x85EBCA6B
FMIX32_M2 = 0xC2B2AE35
#: the restore key's mixing constants: the golden-ratio seed offset and the counter and group multipliers
RESTORE_SEED_MIX = 0x9E3779B9
RESTORE_COUNTER_MUL = 0x632BE5AB
RESTORE_GROUP_MUL = 0x85157AF5
#: the restore draw's random bits: ``u = (fmix32(j ^ key) >> (32 - UNIFORM_BITS)) * 2^-UNIFORM_BITS``
UNIFORM_BITS = 24

MASK32 = 0xFFFFFFFF


def fmix32(h: int) -> int:
    """murmur3's fmix32 on a Python int (mod 2^32)."""
    h ^= h >> 16
    h = (h * FMIX32_M1) & MASK32
    h ^= h >> 13
    h = (h * FMIX32_M2) & MASK32
    return h ^ (h >> 16)


def restore_key(seed: int, counter: int, group: int) -> int:
    """The 32-bit restore key of one (seed, step counter, group); bit-identical to ``_C.restore_key``:
    fmix32 chained over the seed's halves, the counter's halves and the group."""
    seed, counter, group = (int(v) & 0xFFFFFFFFFFFFFFFF for v in (seed, counter, group))
    h = fmix32((seed & MASK32) ^ RESTORE_SEED_MIX)
    h = fmix32(h ^ (seed >> 32))
    h = fmix32(h ^ ((counter * RESTORE_COUNTER_MUL) & MASK32))
    h = fmix32(h ^ ((counter >> 32) & MASK32))
    return fmix32(h ^ (((group + 1) * RESTORE_GROUP_MUL) & MASK32))
