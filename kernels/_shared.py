"""What the Triton kernel files share: storage rounding, the ticket of a one-launch reduction,
the fixed-order sum of partials, the restore RNG's mixer and the tile heuristic; the named
constants are ``kernels.constants``'s. Private to ``yolozu_ttt.kernels``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import FMIX32_M1, FMIX32_M2

_COUNTERS: dict = {}  # {(device, stream) or device: int32 ticket counter}
_M1 = tl.constexpr(FMIX32_M1)
_M2 = tl.constexpr(FMIX32_M2)


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to the storage dtype, round-to-nearest-even (NaN stays NaN).

    bfloat16 is rounded on the bits so the result is the same on the GPU and in the Triton
    interpreter (whose fp32 -> bf16 cast truncates); the final cast is then exact.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rne = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        nan = (bits | 0x00400000) & 0xFFFF0000
        rounded = tl.where(x != x, nan, rne).to(tl.float32, bitcast=True)
        return rounded.to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def _last_program(counter_ptr):
    """Whether this program is the last of the launch to get here (an acq_rel ticket: every other
    program's stores before its ticket are visible after it); the last one must reset the counter
    to 0 (``tl.atomic_xchg``) when it is done."""
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    last = ticket == tl.num_programs(0) * tl.num_programs(1) - 1
    return last


@triton.jit
def _sum_partials(part_ptr, n, RBLOCK: tl.constexpr):
    """The fp32 sum of ``n`` partials in a fixed order (read past L1: other programs wrote them)."""
    acc = tl.zeros([RBLOCK], tl.float32)
    for i in range(0, n, RBLOCK):
        idx = i + tl.arange(0, RBLOCK)
        acc += tl.load(part_ptr + idx, mask=idx < n, other=0.0, cache_modifier=".cg")
    return tl.sum(acc, axis=0)


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finalizer on uint32; the multiplies wrap on purpose (as in tl.randint's Philox)."""
    h = h ^ (h >> 16)
    h = tl.mul(h, _M1, sanitize_overflow=False)
    h = h ^ (h >> 13)
    h = tl.mul(h, _M2, sanitize_overflow=False)
    return h ^ (h >> 16)


def ticket_counter(device: torch.device) -> torch.Tensor:
    """The int32 ticket counter of ``device``'s current stream (0 between launches: the last
    program of each launch resets it); shared by the kernels of ``entropy`` and ``mim``."""
    key = (device, torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else device
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def num_warps(block: int) -> int:
    """Warps for a 1-D block of ``block`` elements (the update's and MIM's tiles)."""
    return 8 if block >= 2048 else 4
