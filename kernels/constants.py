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


def seed_prefix(seed: int) -> int:
    """The seed's share of its restore keys: fmix32 chained over its 32-bit halves (what every key of
    one seed starts from; the Triton engine uploads it once per seed and finishes keys on the device)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return fmix32(fmix32((seed & MASK32) ^ RESTORE_SEED_MIX) ^ (seed >> 32))


def counter_words(counter: int) -> tuple[int, int]:
    """The step counter's two words a key mixes in: (low half * RESTORE_COUNTER_MUL mod 2^32, high half)."""
    counter = int(counter) & 0xFFFFFFFFFFFFFFFF
    return (counter * RESTORE_COUNTER_MUL) & MASK32, (counter >> 32) & MASK32


def group_word(group: int) -> int:
    """The group's word a key mixes in last: (group + 1) * RESTORE_GROUP_MUL mod 2^32."""
    return ((int(group) + 1) * RESTORE_GROUP_MUL) & MASK32


def restore_key(seed: int, counter: int, group: int) -> int:
    """The 32-bit restore key of one (seed, step counter, group); bit-identical to ``_C.restore_key``:
    fmix32 chained over the seed's halves (:func:`seed_prefix`), the counter's words and the group's."""
    low, high = counter_words(counter)
    return fmix32(fmix32(fmix32(seed_prefix(seed) ^ low) ^ high) ^ group_word(group & 0xFFFFFFFFFFFFFFFF))
