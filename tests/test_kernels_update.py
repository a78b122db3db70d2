"""Tests of kernels/update.py, the Triton twin of the fused C++ update (yolozu_ttt._C).

The kernels run on CUDA tensors where a GPU is present, and always on CPU tensors in Triton's
interpreter: ``test_under_the_interpreter`` re-runs this file with ``TRITON_INTERPRET=1`` (set
before triton is imported, hence a subprocess; skipped, saying why, where the installed Triton's
interpreter cannot run the kernels). Every other test needs one of the two and is skipped
otherwise.

References: the C++ engine (same arena inputs, run on CPU copies), torch.optim.Adam +
torch.nn.utils.clip_grad_norm_ on separate parameter tensors (float32), an fp32-math torch
reference rounded to the dtype (bfloat16 / float16), and plain torch for SAR and the teacher EMA.
The fused CoTTA step (teacher EMA + counter-based restore) is checked against the C++ one and a
numpy port of the documented hash.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import (UNDER_INTERPRETER, engine_stats, expected_restore_mask, non_finite_update_inputs,
                      run_under_interpreter, same_float, skip_under_interpreter, torch_reference_norms)
from support_engines import step_stats

import yolozu_ttt._C as C
from yolozu_ttt.common import GRAD_STAT_KEYS, SAR_STAT_KEYS, STAT_KEYS
from yolozu_ttt.engine import StepSpec
from yolozu_ttt.kernels import update as U

ON_CUDA = torch.cuda.is_available() and not UNDER_INTERPRETER
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
needs_triton_path = pytest.mark.skipif(not (UNDER_INTERPRETER or ON_CUDA),
                                       reason="needs CUDA, or the interpreter subprocess (test_under_the_interpreter)")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy noise in the interpreter

SIZES = [7, 1, 1000, 33]  # odd sizes: a 1-element segment, a multi-block segment, ragged tails
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The engine calls with a fresh float64 ``out`` (NaN where nothing is written), scalars by name.
fused_step = functools.partial(step_stats, U.fused_step, device=DEVICE)  # options through a StepSpec
grad_stats = functools.partial(engine_stats, U.grad_stats, keys=GRAD_STAT_KEYS, device=DEVICE)
sar_perturb = functools.partial(engine_stats, U.sar_perturb, keys=SAR_STAT_KEYS, device=DEVICE)
c_fused_step = functools.partial(step_stats, C.fused_step)
c_grad_stats = functools.partial(engine_stats, C.grad_stats, keys=GRAD_STAT_KEYS)
c_sar_perturb = functools.partial(engine_stats, C.sar_perturb, keys=SAR_STAT_KEYS)


@skip_under_interpreter
def test_under_the_interpreter():
    """Every test of this file on CPU tensors, the Triton kernels in the interpreter."""
    run_under_interpreter(__file__)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _offsets(sizes):
    out, o = [], 0
    for s in sizes:
        out.append(o)
        o += s
    return out


def _make_buffers(dtype, sizes, seed, device="cpu"):
    """A fresh arena: params p, base = p + small drift, zero moments, zero grads."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    base = torch.randn(n, generator=gen)
    p = base + 0.05 * torch.randn(n, generator=gen)
    return {
        "param": p.to(dtype).to(device),
        "grad": torch.zeros(n, dtype=dtype, device=device),
        "exp_avg": torch.zeros(n, device=device),
        "exp_avg_sq": torch.zeros(n, device=device),
        "base": base.to(dtype).to(device),
        "snap": torch.full((n,), 7.0, dtype=dtype, device=device),
    }


def _clone_to(bufs, device):
    return {k: v.detach().clone().to(device) for k, v in bufs.items()}


def _bind(cls, bufs, sizes, has_grad, **kw):
    return cls(bufs["param"], bufs["grad"], bufs["exp_avg"], bufs["exp_avg_sq"], bufs["base"],
               bufs["snap"], _offsets(sizes), list(sizes), has_grad, **kw)


def _grads(dtype, sizes, seed, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + seed)
    return (scale * torch.randn(sum(sizes), generator=gen)).to(dtype)


def _tol(dtype):
    return {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2.0 ** -7, 1e-5),
            torch.float16: (2.0 ** -10, 1e-6)}[dtype]


def _close(actual, expected, dtype, what, equal_nan=False):
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(actual.detach().cpu().float(), expected.detach().cpu().float(), rtol=rtol,
                               atol=atol, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}")


def _bits(t):
    t = t.detach().cpu()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _stats_close(ours: dict, expected: dict, rtol, what, equal_nan=False):
    torch.testing.assert_close(torch.tensor([ours[k] for k in STAT_KEYS], dtype=torch.float64),
                               torch.tensor([expected[k] for k in STAT_KEYS], dtype=torch.float64), rtol=rtol,
                               atol=1e-7, equal_nan=equal_nan, msg=lambda m: f"{what} stats: {m}")


# schedule: (has_grad per segment, max_grad_norm, anchor_lambda)
_SCHEDULE = [
    (b"\x01\x01\x01\x01", None, 0.0),
    (b"\x01\x01\x00\x01", 0.5, 0.0),   # big segment lacks a grad; clipping active
    (b"\x01\x01\x01\x01", None, 0.3),  # anchor, single pass
    (b"\x00\x01\x01\x01", 0.5, 0.3),   # anchor + clip, two passes
    (b"\x01\x01\x01\x01", 100.0, 0.0),  # clip inactive (coef 1)
    (b"\x01\x00\x01\x01", None, 0.0),
]


# ------------------------------------------------------------------------------------------
# the fused step
# ------------------------------------------------------------------------------------------
@needs_triton_path
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size,snap_in_grad", [(256, False), (2048, False), (256, True)],
                         ids=["multi_block_segment", "default_block", "snapshot_in_grad"])
def test_fused_step_matches_cpp(dtype, block_size, snap_in_grad):
    """The Triton step against the C++ one over a schedule of flags, clipping and anchors. With
    ``snap_in_grad`` the Triton snapshot is the grad buffer itself (the C++ one stays separate):
    the same step, the grad buffer ends holding the pre-step params, and sar_perturb refuses it."""
    ref_bufs = _make_buffers(dtype, SIZES, seed=4 if snap_in_grad else 1)
    ours = _clone_to(ref_bufs, DEVICE)
    if snap_in_grad:
        ours["snap"] = None
    hg_ref, hg_ours = bytearray(len(SIZES)), bytearray(len(SIZES))
    g_ref = _bind(C.ArenaGroup, ref_bufs, SIZES, hg_ref)
    g_ours = _bind(U.TritonArenaGroup, ours, SIZES, hg_ours, block_size=block_size)
    if snap_in_grad:
        g_ours.set_snapshot(ours["grad"])
    snapshot = "grad" if snap_in_grad else "snap"
    stat_rtol = 1e-5 if dtype == torch.float32 else 1e-3
    for step, (flags, max_norm, lam) in enumerate(_SCHEDULE):
        g = _grads(dtype, SIZES, step)
        ref_bufs["grad"].copy_(g)
        ours["grad"].copy_(g)
        hg_ref[:] = flags
        hg_ours[:] = flags
        pre = ours["param"].clone()
        out = fused_step([g_ours], 1e-2, max_grad_norm=max_norm, anchor_lambda=lam)
        expected = c_fused_step([g_ref], 1e-2, max_grad_norm=max_norm, anchor_lambda=lam)
        what = f"{dtype} step {step}"
        _stats_close(out, expected, stat_rtol, what)
        assert torch.equal(_bits(ours[snapshot]), _bits(pre)), f"{what}: the {snapshot} buffer is not the pre-step params"
        for k in ("param", "exp_avg", "exp_avg_sq"):
            _close(ours[k], ref_bufs[k], dtype if k == "param" else torch.float32, f"{what} {k}")
        assert g_ours.steps == list(g_ref.steps), (g_ours.steps, g_ref.steps)
    if snap_in_grad:
        with pytest.raises(ValueError, match="apart from the grad buffer"):
            sar_perturb([g_ours], 0.05, False)


@needs_triton_path
def test_fused_step_matches_torch_adam_float32():
    shapes = [(7,), (1,), (10, 100), (3, 11)]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    bufs = _make_buffers(torch.float32, sizes, seed=2, device=DEVICE)
    hg = bytearray(len(sizes))
    group = _bind(U.TritonArenaGroup, bufs, sizes, hg, block_size=256)
    offs = _offsets(sizes)
    params = [torch.nn.Parameter(bufs["param"][o:o + n].clone().view(s)) for o, n, s in zip(offs, sizes, shapes)]
    bases = [bufs["base"][o:o + n].clone().view(s) for o, n, s in zip(offs, sizes, shapes)]
    opt = torch.optim.Adam(params, lr=1e-2)
    for step, (flags, max_norm, lam) in enumerate(_SCHEDULE):
        g = _grads(torch.float32, sizes, step).to(DEVICE)
        bufs["grad"].copy_(g)
        hg[:] = flags
        # reference: separate tensors, .grad None where the segment has no grad
        old = [p.detach().clone() for p in params]
        anchor = torch.zeros((), dtype=torch.float64, device=DEVICE)
        for p, b, o, n, f in zip(params, bases, offs, sizes, flags):
            if not f:
                p.grad = None
                continue
            p.grad = g[o:o + n].clone().view(p.shape)
            if lam:
                d = p.detach() - b
                p.grad += 2.0 * lam * d / n
                anchor += (d.double() ** 2).mean()
        with_grad = [p for p in params if p.grad is not None]
        if max_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
        else:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad]))
        clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad]))
        opt.step()
        upd = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in zip(params, old)))
        tot = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, bases)))

        out = fused_step([group], 1e-2, max_grad_norm=max_norm, anchor_lambda=lam)
        what = f"torch Adam step {step}"
        keys = ("grad_norm", "grad_norm_clipped", "update_norm", "total_update_norm", "anchor_loss")
        expected = torch.tensor([float(total), float(clipped), float(upd), float(tot), float(anchor)])
        torch.testing.assert_close(torch.tensor([out[k] for k in keys], dtype=torch.float64), expected.double(),
                                   rtol=2e-5, atol=1e-7, msg=lambda m: f"{what} stats: {m}")
        for p, o, n in zip(params, offs, sizes):
            _close(bufs["param"][o:o + n], p.detach().reshape(-1), torch.float32, f"{what} param")
            st = opt.state.get(p)
            if st:
                _close(bufs["exp_avg"][o:o + n], st["exp_avg"].reshape(-1), torch.float32, f"{what} exp_avg")
                _close(bufs["exp_avg_sq"][o:o + n], st["exp_avg_sq"].reshape(-1), torch.float32,
                       f"{what} exp_avg_sq")
    assert group.steps == [int(opt.state[p]["step"]) for p in params], group.steps


@needs_triton_path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_matches_fp32_math_rounded(dtype):
    """bf16/fp16 params with fp32 moments vs torch fp32 math rounded to the dtype each step."""
    bufs = _make_buffers(dtype, SIZES, seed=3, device=DEVICE)
    hg = bytearray(len(SIZES))
    group = _bind(U.TritonArenaGroup, bufs, SIZES, hg, block_size=256)
    p = bufs["param"].clone()
    base = bufs["base"].float()
    m = torch.zeros(p.numel(), device=DEVICE)
    v = torch.zeros_like(m)
    steps = [0] * len(SIZES)
    offs = _offsets(SIZES)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    for step, (flags, max_norm, lam) in enumerate(_SCHEDULE):
        g_lp = _grads(dtype, SIZES, step).to(DEVICE)
        bufs["grad"].copy_(g_lp)
        hg[:] = flags
        out = fused_step([group], lr, max_grad_norm=max_norm, anchor_lambda=lam)
        # reference
        p32 = p.float()
        gs = []
        for o, n, f in zip(offs, SIZES, flags):
            if f:
                gseg = g_lp[o:o + n].float()
                if lam:
                    gseg = gseg + (2.0 * lam / n) * (p32[o:o + n] - base[o:o + n])
                gs.append((o, n, gseg))
        total = torch.linalg.vector_norm(torch.cat([x for _, _, x in gs]))
        coef = 1.0
        if max_norm is not None:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for s, (o, n, gseg) in zip([i for i, f in enumerate(flags) if f], gs):
            steps[s] += 1
            gseg = gseg * coef
            sl = slice(o, o + n)
            m[sl] = m[sl] + (1 - b1) * (gseg - m[sl])
            v[sl] = v[sl] * b2 + ((1 - b2) * gseg) * gseg
            bc1 = 1 - b1 ** steps[s]
            bc2 = (1 - b2 ** steps[s]) ** 0.5
            denom = v[sl].sqrt() / bc2 + eps
            p[sl] = (p32[sl] + (-lr / bc1) * m[sl] / denom).to(dtype)
        what = f"{dtype} fp32-ref step {step}"
        _close(bufs["param"], p, dtype, f"{what} param")
        torch.testing.assert_close(bufs["exp_avg"], m, rtol=1e-4, atol=1e-6, msg=lambda x: f"{what} m: {x}")
        torch.testing.assert_close(bufs["exp_avg_sq"], v, rtol=1e-4, atol=1e-8, msg=lambda x: f"{what} v: {x}")
        torch.testing.assert_close(out["grad_norm"], float(total), rtol=1e-5, atol=1e-7)
        # keep the reference on the kernel's params so one-ulp rounding ties do not compound
        p.copy_(bufs["param"])


@needs_triton_path
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_norm", [1.0, None], ids=["clip", "noclip"])
def test_nan_grad_propagates_like_cpp(dtype, max_norm):
    ref_bufs = _make_buffers(dtype, SIZES, seed=4)
    ours = _clone_to(ref_bufs, DEVICE)
    flags = b"\x01\x00\x01\x01"
    g_ref = _bind(C.ArenaGroup, ref_bufs, SIZES, bytearray(flags))
    g_ours = _bind(U.TritonArenaGroup, ours, SIZES, bytearray(flags), block_size=256)
    g = _grads(dtype, SIZES, 0)
    g[1008 + 5] = float("nan")
    ref_bufs["grad"].copy_(g)
    ours["grad"].copy_(g)
    pre = ours["param"].clone()
    out = fused_step([g_ours], 1e-2, max_grad_norm=max_norm)
    expected = c_fused_step([g_ref], 1e-2, max_grad_norm=max_norm)
    _stats_close(out, expected, 1e-3, f"nan {dtype}", equal_nan=True)
    assert not all(math.isfinite(v) for v in out.values()), "non-finite flag not raised"
    for k in ("param", "exp_avg", "exp_avg_sq"):
        _close(ours[k], ref_bufs[k], dtype if k == "param" else torch.float32, f"nan {dtype} {k}", equal_nan=True)
    assert torch.equal(_bits(ours["snap"]), _bits(pre))
    assert torch.equal(_bits(ours["param"][7:8]), _bits(pre[7:8])), "segment without grad changed"
    if max_norm is not None:  # NaN clip coefficient reaches every segment with a grad
        assert bool(torch.isnan(ours["param"][:7]).all()) and bool(torch.isnan(ours["param"][8:]).all())
    else:  # Adam is elementwise: only the NaN element goes NaN
        assert int(torch.isnan(ours["param"]).sum()) == 1


@needs_triton_path
@pytest.mark.parametrize("block_size", [16, 2048])
@pytest.mark.parametrize("first,sizes,lr", [
    ("nan", [7, 1, 300], math.inf),  # inf * 0 where a grad, so the Adam moment, is 0: a NaN in the sums
    ("inf", [7, 1, 300], math.inf),  # every element moves by +-inf: the sums overflow, no NaN
    ("inf", [4], 1e19),  # finite steps of ~1e19 whose fp32 block sum of squares overflows
    ("inf", [1, 1, 1, 1], 1e19),  # ... across blocks: the fp64 sum is finite, the fp32 norm is not
    ("nan", [40, 2000], math.inf),  # a NaN block among overflowing ones (block 16: one NaN of 128 slots)
])
def test_non_finite_update_norms_are_those_of_torch(first, sizes, lr, block_size):
    """NaN stays NaN: a non-finite update norm is what torch's fp32 reference computes, NaN where
    its sum holds a NaN and inf where it overflows (step 1 as named, step 2 whatever torch says)."""
    values, grads = non_finite_update_inputs(first, sizes)
    want, params = torch_reference_norms(values, grads, lr, steps=2)
    flat = torch.cat(values)
    bufs = {"param": flat.clone(), "grad": torch.zeros_like(flat), "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat), "base": flat.clone(), "snap": torch.zeros_like(flat)}
    bufs = _clone_to(bufs, DEVICE)
    group = _bind(U.TritonArenaGroup, bufs, sizes, None, block_size=block_size)
    for step, (update, total) in enumerate(want):
        bufs["grad"].copy_(torch.cat(grads))
        stats = fused_step([group], lr)
        if step == 0:
            assert math.isnan(update) if first == "nan" else math.isinf(update)
            assert math.isnan(total) if first == "nan" else math.isinf(total)
        assert same_float(stats["update_norm"], update), (step, stats["update_norm"], update)
        assert same_float(stats["total_update_norm"], total), (step, stats["total_update_norm"], total)
    torch.testing.assert_close(bufs["param"].cpu(), torch.cat(params), rtol=1e-5, atol=0.0, equal_nan=True)


@needs_triton_path
def test_groups_share_one_clip_coefficient():
    layouts = [(torch.float32, [7, 1, 1000, 33]), (torch.bfloat16, [5, 300]), (torch.float16, [1, 129])]
    refs, ours, g_refs, g_ours, flags_r, flags_o = [], [], [], [], [], []
    for i, (dt, sizes) in enumerate(layouts):
        r = _make_buffers(dt, sizes, seed=10 + i)
        o = _clone_to(r, DEVICE)
        fr, fo = bytearray([1] * len(sizes)), bytearray([1] * len(sizes))
        refs.append(r)
        ours.append(o)
        flags_r.append(fr)
        flags_o.append(fo)
        g_refs.append(_bind(C.ArenaGroup, r, sizes, fr))
        g_ours.append(_bind(U.TritonArenaGroup, o, sizes, fo, block_size=128))
    for step in range(3):
        for i, (dt, sizes) in enumerate(layouts):
            g = _grads(dt, sizes, 20 * i + step)
            refs[i]["grad"].copy_(g)
            ours[i]["grad"].copy_(g)
        flags_r[0][2] = flags_o[0][2] = step % 2  # big fp32 segment toggles its grad
        out = fused_step(g_ours, 1e-2, max_grad_norm=0.7, anchor_lambda=0.1)
        expected = c_fused_step(g_refs, 1e-2, max_grad_norm=0.7, anchor_lambda=0.1)
        _stats_close(out, expected, 1e-4, f"multi-group step {step}")
        assert out["clip_coef"] < 1.0
        for i, (dt, _) in enumerate(layouts):
            for k in ("param", "exp_avg", "exp_avg_sq"):
                _close(ours[i][k], refs[i][k], dt if k == "param" else torch.float32, f"group {i} {k}")
            assert g_ours[i].steps == list(g_refs[i].steps)


@needs_triton_path
def test_two_runs_are_bit_identical():
    runs = []
    for _ in range(2):
        bufs = _make_buffers(torch.float32, SIZES, seed=5, device=DEVICE)
        hg = bytearray(len(SIZES))
        group = _bind(U.TritonArenaGroup, bufs, SIZES, hg, block_size=64)
        outs = []
        for step, (flags, max_norm, lam) in enumerate(_SCHEDULE):
            bufs["grad"].copy_(_grads(torch.float32, SIZES, step).to(DEVICE))
            hg[:] = flags
            outs.append(list(fused_step([group], 1e-2, max_grad_norm=max_norm, anchor_lambda=lam).values()))
        runs.append((torch.tensor(outs, dtype=torch.float64), {k: v.cpu() for k, v in bufs.items()}))
    assert torch.equal(runs[0][0].view(torch.int64), runs[1][0].view(torch.int64)), "stats differ between runs"
    for k in runs[0][1]:
        assert torch.equal(_bits(runs[0][1][k]), _bits(runs[1][1][k])), f"{k} differs between runs"


@needs_triton_path
def test_no_grad_at_all_changes_nothing():
    bufs = _make_buffers(torch.bfloat16, SIZES, seed=11, device=DEVICE)
    bufs["grad"].copy_(_grads(torch.bfloat16, SIZES, 1).to(DEVICE))
    hg = bytearray(len(SIZES))
    group = _bind(U.TritonArenaGroup, bufs, SIZES, hg, block_size=256)
    pre = bufs["param"].clone()
    for max_norm in (None, 1.0):
        out = fused_step([group], 1e-2, max_grad_norm=max_norm)
        assert torch.equal(_bits(bufs["param"]), _bits(pre))
        assert out["grad_norm"] == 0.0 and out["grad_norm_clipped"] == 0.0 and out["update_norm"] == 0.0
        drift = torch.linalg.vector_norm(pre.float() - bufs["base"].float())
        torch.testing.assert_close(out["total_update_norm"], float(drift), rtol=1e-6, atol=0.0)
    assert group.steps == [0] * len(SIZES)
    group.reset_state()
    assert float(bufs["exp_avg"].abs().sum()) == 0.0


@needs_triton_path
def test_bad_inputs_have_clear_errors():
    bufs = _make_buffers(torch.float32, SIZES, seed=12, device=DEVICE)
    with pytest.raises(ValueError):
        U.TritonArenaGroup(bufs["param"], bufs["grad"], bufs["exp_avg"], bufs["exp_avg_sq"], bufs["base"],
                           bufs["snap"], [0, 7], [7, 5], None)
    with pytest.raises(ValueError):
        _bind(U.TritonArenaGroup, bufs, SIZES, bytearray(2))
    with pytest.raises(TypeError):
        _bind(U.TritonArenaGroup, dict(bufs, exp_avg=bufs["exp_avg"].double()), SIZES, None)
    with pytest.raises(TypeError):
        _bind(U.TritonArenaGroup, dict(bufs, grad=bufs["grad"].half()), SIZES, None)
    group = _bind(U.TritonArenaGroup, dict(bufs, snap=None), SIZES, None)
    with pytest.raises(ValueError):
        fused_step([group], 1e-2)
    with pytest.raises(ValueError):
        sar_perturb([group], 0.05, False)
    with pytest.raises(ValueError):
        fused_step([], 1e-2)
    with pytest.raises(ValueError, match="yolozu_ttt: lr must be >= 0"):  # the spec's one check
        fused_step([group], -1.0, write_snapshot=False)
    fused_step([group], 1e-2, write_snapshot=False)  # fine without a snapshot buffer


@needs_triton_path
@pytest.mark.parametrize("call,args", [("fused_step", (StepSpec(lr=1e-2),)), ("grad_stats", ()),
                                       ("sar_perturb", (0.05, False))])
@pytest.mark.parametrize("make_out,match", [
    (lambda n: torch.zeros(n, dtype=torch.float32, device=DEVICE), "dtype torch.float32, expected torch.float64"),
    (lambda n: torch.zeros(n - 1, dtype=torch.float64, device=DEVICE), "expected 1-D with at least"),
    (lambda n: torch.zeros(2 * n, dtype=torch.float64, device=DEVICE)[::2], "expected contiguous"),
    (lambda n: torch.zeros(1, n, dtype=torch.float64, device=DEVICE), "expected 1-D"),
    (lambda n: torch.zeros(n, dtype=torch.float64, device="meta"), "expected the groups'"),
    (lambda n: None, "out must be a torch.Tensor, got NoneType"),
], ids=["float32", "short", "strided", "2d", "other_device", "none"])
def test_bad_out_is_a_value_error_before_anything_changes(call, args, make_out, match):
    bufs = _make_buffers(torch.float32, [5, 3], seed=18, device=DEVICE)
    bufs["grad"].normal_()
    group = _bind(U.TritonArenaGroup, bufs, [5, 3], None)
    before = {k: v.clone() for k, v in bufs.items()}
    n = {"fused_step": len(STAT_KEYS), "grad_stats": len(GRAD_STAT_KEYS), "sar_perturb": len(SAR_STAT_KEYS)}[call]
    with pytest.raises(ValueError, match=match):
        getattr(U, call)([group], make_out(n), *args)
    assert all(torch.equal(_bits(bufs[k]), _bits(v)) for k, v in before.items())
    assert group.steps == [0, 0]


@needs_triton_path
def test_writes_only_its_layout():
    """Each call writes out[:len(layout)] and nothing past it."""
    bufs = _make_buffers(torch.float32, SIZES, seed=19, device=DEVICE)
    bufs["grad"].copy_(_grads(torch.float32, SIZES, 6).to(DEVICE))
    group = _bind(U.TritonArenaGroup, bufs, SIZES, None, block_size=256)
    for call, keys, args in [(U.grad_stats, GRAD_STAT_KEYS, (0.3,)), (U.sar_perturb, SAR_STAT_KEYS, (0.05, True)),
                             (U.fused_step, STAT_KEYS, (StepSpec(lr=1e-2, max_grad_norm=0.5, anchor_lambda=0.3),))]:
        out = torch.full((len(keys) + 3,), -7.0, dtype=torch.float64, device=DEVICE)
        assert call([group], out, *args) is None
        assert all(math.isfinite(v) and v != -7.0 for v in out[:len(keys)].tolist()), (call.__name__, out)
        assert out[len(keys):].tolist() == [-7.0] * 3, call.__name__


# ------------------------------------------------------------------------------------------
# grad_stats and SAR
# ------------------------------------------------------------------------------------------
@needs_triton_path
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_stats_match_cpp_and_change_nothing(dtype):
    ref_bufs = _make_buffers(dtype, SIZES, seed=6)
    ref_bufs["grad"].copy_(_grads(dtype, SIZES, 3))
    ours = _clone_to(ref_bufs, DEVICE)
    flags = b"\x01\x01\x00\x01"
    g_ref = _bind(C.ArenaGroup, ref_bufs, SIZES, bytearray(flags))
    g_ours = _bind(U.TritonArenaGroup, ours, SIZES, bytearray(flags), block_size=256)
    before = {k: v.clone() for k, v in ours.items()}
    for lam, value in ((0.0, False), (0.0, True), (0.5, False)):
        out = grad_stats([g_ours], lam, anchor_value=value)
        expected = c_grad_stats([g_ref], lam, anchor_value=value)
        assert (expected["anchor_loss"] != 0.0) == (lam != 0.0 or value)
        torch.testing.assert_close(torch.tensor([out[k] for k in GRAD_STAT_KEYS], dtype=torch.float64),
                                   torch.tensor([expected[k] for k in GRAD_STAT_KEYS], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-8)
    for k, v in before.items():
        assert torch.equal(_bits(ours[k]), _bits(v)), f"grad_stats changed {k}"
    assert g_ours.steps == [0] * len(SIZES)


@needs_triton_path
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sar_perturb_matches_torch_and_cpp(dtype, adaptive):
    ref_bufs = _make_buffers(dtype, SIZES, seed=7)
    ref_bufs["grad"].copy_(_grads(dtype, SIZES, 4))
    ours = _clone_to(ref_bufs, DEVICE)
    cpp = _clone_to(ref_bufs, "cpu")
    flags = b"\x01\x01\x00\x01"
    g_ours = _bind(U.TritonArenaGroup, ours, SIZES, bytearray(flags), block_size=256)
    g_cpp = _bind(C.ArenaGroup, cpp, SIZES, bytearray(flags))
    rho = 0.05
    pre = ours["param"].clone()
    out = sar_perturb([g_ours], rho, adaptive)
    expected = c_sar_perturb([g_cpp], rho, adaptive)
    # torch reference (yolozu _sar_perturb_and_backup): fp32 direction over params with a grad
    p32, g32 = ref_bufs["param"].float(), ref_bufs["grad"].float()
    expected_p = ref_bufs["param"].clone()
    dirs = []
    for o, n, f in zip(_offsets(SIZES), SIZES, flags):
        if f:
            d = g32[o:o + n] * (p32[o:o + n].abs() if adaptive else 1.0)
            dirs.append((o, n, d))
    norm = float(torch.sqrt(sum((d * d).sum() for _, _, d in dirs)))
    scale = rho / (norm + 1e-12)
    for o, n, d in dirs:
        expected_p[o:o + n] = (p32[o:o + n] + scale * d).to(dtype)
    what = f"sar adaptive={adaptive} {dtype}"
    torch.testing.assert_close(out["direction_norm"], norm, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(out["direction_norm"], expected["direction_norm"], rtol=1e-6, atol=0.0)
    assert out["applied"] == 1.0 and expected["applied"] == 1.0
    _close(ours["param"], expected_p, dtype, f"{what} vs torch")
    _close(ours["param"], cpp["param"], dtype, f"{what} vs _C")
    assert torch.equal(_bits(ours["snap"]), _bits(pre)), f"{what}: snapshot"
    assert torch.equal(_bits(ours["param"][8:1008]), _bits(pre[8:1008])), f"{what}: no-grad segment moved"


@needs_triton_path
@pytest.mark.parametrize("adaptive", [False, True])
def test_sar_perturb_not_applied_moves_nothing(adaptive):
    """rho = 0: nothing changes; zero grads with rho > 0: no parameter moves, not applied, and the
    backup is still written (so a caller restores from it without asking whether it applied)."""
    bufs = _make_buffers(torch.float32, SIZES, seed=8, device=DEVICE)
    bufs["grad"].copy_(_grads(torch.float32, SIZES, 5).to(DEVICE))
    group = _bind(U.TritonArenaGroup, bufs, SIZES, None)
    before = {k: v.clone() for k, v in bufs.items()}
    out0 = sar_perturb([group], 0.0, adaptive)
    assert out0["applied"] == 0.0 and out0["direction_norm"] > 0.0
    for k, v in before.items():
        assert torch.equal(_bits(bufs[k]), _bits(v)), f"{k} changed with rho = 0"
    bufs["grad"].zero_()
    before["grad"] = bufs["grad"].clone()
    out1 = sar_perturb([group], 0.05, adaptive)
    assert out1["direction_norm"] == 0.0 and out1["applied"] == 0.0
    for k, v in before.items():
        want = before["param"] if k == "snap" else v
        assert torch.equal(_bits(bufs[k]), _bits(want)), f"{k} (not applied)"


@needs_triton_path
@pytest.mark.parametrize("adaptive", [False, True])
def test_sar_perturb_nan_direction_poisons_like_the_reference(adaptive):
    """A NaN grad: the reference's scale is NaN and it still steps, so every parameter with a grad
    becomes NaN (the others keep their values); both engines do that on their own, reporting it
    applied, with the backup holding the values before."""
    import yolozu.tta.integration as ref

    flags = b"\x01\x00\x01\x01"
    ref_bufs = _make_buffers(torch.float32, SIZES, seed=9)
    ref_bufs["grad"].copy_(_grads(torch.float32, SIZES, 6))
    ref_bufs["grad"][1008 + 3] = float("nan")  # in the last segment
    params = []
    for o, n, f in zip(_offsets(SIZES), SIZES, flags):
        p = ref_bufs["param"][o:o + n].clone().requires_grad_(True)
        p.grad = ref_bufs["grad"][o:o + n].clone() if f else None
        params.append(p)
    ref._sar_perturb_and_backup(params, rho=0.05, adaptive=adaptive, first_step_scale=1.0)
    expected = torch.cat([p.detach() for p in params])
    for cls, fn, device in ((U.TritonArenaGroup, sar_perturb, DEVICE), (C.ArenaGroup, c_sar_perturb, "cpu")):
        bufs = _clone_to(ref_bufs, device)
        pre = bufs["param"].clone()
        out = fn([_bind(cls, bufs, SIZES, bytearray(flags))], 0.05, adaptive)
        assert math.isnan(out["direction_norm"]) and out["applied"] == 1.0, cls
        assert torch.equal(bufs["param"].cpu().isnan(), expected.isnan()), cls
        finite = ~expected.isnan()
        assert torch.equal(bufs["param"].cpu()[finite], expected[finite]), cls
        assert torch.equal(_bits(bufs["snap"]), _bits(pre)), cls


@needs_triton_path
@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("open_", [0.0, 1.0])
def test_gate_matches_cpp(open_, ema):
    """A gated step on the device: closed (0) changes no parameter, moment, step count or teacher
    (and restores nothing), like the C++ engine's; open, it is the ungated step."""
    flags = b"\x01\x01\x00\x01"
    ref_bufs = _make_buffers(torch.float32, SIZES, seed=12)
    ref_bufs["grad"].copy_(_grads(torch.float32, SIZES, 13))
    ours, cpp = _clone_to(ref_bufs, DEVICE), _clone_to(ref_bufs, "cpu")
    g_ours = _bind(U.TritonArenaGroup, ours, SIZES, bytearray(flags), block_size=256)
    g_cpp = _bind(C.ArenaGroup, cpp, SIZES, bytearray(flags))
    teachers = []
    if ema:
        for g, bufs in ((g_ours, ours), (g_cpp, cpp)):
            teachers.append(bufs["param"].clone() * 0.5)
            g.set_teacher(teachers[-1])
    kw = dict(lr=1e-2, max_grad_norm=1.0, anchor_lambda=0.2, write_snapshot=True,
              ema_momentum=0.9 if ema else None, restore_prob=0.5 if ema else 0.0, restore_seed=3, restore_counter=1)
    before = {k: v.clone() for k, v in ours.items()}
    teacher_before = teachers[0].clone() if ema else None
    out = fused_step([g_ours], gate=torch.full((1,), open_, dtype=torch.float64, device=DEVICE), **kw)
    expected = c_fused_step([g_cpp], gate=torch.full((1,), open_, dtype=torch.float64), **kw)
    for k in ("param", "exp_avg", "exp_avg_sq"):
        _close(ours[k], cpp[k], torch.float32, f"gate {open_} {k} vs _C")
    assert g_ours.steps == g_cpp.steps == [int(open_)] * 2 + [0, int(open_)]
    for key in ("update_norm", "total_update_norm", "restored"):
        assert out[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-12), key
    if open_ == 0.0:
        for k in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(_bits(ours[k]), _bits(before[k])), k
        assert out["update_norm"] == 0.0 and out["restored"] == 0.0
        if ema:
            assert torch.equal(teachers[0], teacher_before)


@needs_triton_path
@pytest.mark.parametrize("reserve", [0, 600])
def test_reserved_steps_keep_the_launch_key(reserve):
    """A graph of a step bakes in the bias table's pointer: sized up front for the run's steps
    (``reserve_steps``), it never moves, so the launch key holds; without, it grows (and moves)
    once the steps outgrow it."""
    bufs = _make_buffers(torch.float32, SIZES, seed=14, device=DEVICE)
    group = _bind(U.TritonArenaGroup, bufs, SIZES, None)
    group.reserve_steps(reserve)
    out = torch.empty(len(STAT_KEYS), dtype=torch.float64, device=DEVICE)
    spec = StepSpec(lr=1e-3)
    keys = {U.prepare_step([group], out, spec).key() for _ in range(400)}  # host halves only
    assert len(keys) == (1 if reserve else 2)


# ------------------------------------------------------------------------------------------
# CoTTA: teacher EMA + stochastic restore fused into the step
# ------------------------------------------------------------------------------------------
@needs_triton_path
def test_restore_key_is_cpps():
    for seed in (0, 1, 2 ** 31, 2 ** 32 + 5, 2 ** 63 - 1, 2 ** 64 - 1):
        for counter in (0, 1, 7, 2 ** 33 + 1):
            for group in (0, 1, 5):
                expected = C.restore_key(seed, counter, group)
                assert U.restore_key(seed, counter, group) == expected, (seed, counter, group)


# schedule: (has_grad per segment, max_grad_norm, ema momentum, restore prob, seed, counter)
_COTTA_SCHEDULE = [
    (b"\x01\x01\x01\x01", None, 0.999, 0.3, 3, 0),
    (b"\x01\x00\x01\x01", 0.5, 0.9, 0.01, 3, 1),     # a segment without grad: EMA + restore still apply
    (b"\x00\x00\x00\x00", None, 0.5, 0.3, 3, 2),     # no Adam at all: EMA + restore only
    (b"\x01\x01\x01\x01", None, 0.9, 0.0, 3, 3),     # EMA only
    (b"\x01\x01\x01\x01", 100.0, 1.5, 0.3, 2 ** 40 + 1, 4),  # m clamped to 1; a 64-bit seed
    (b"\x01\x01\x00\x01", None, None, 0.5, 9, 5),    # restore without EMA
]


@needs_triton_path
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cotta_step_matches_cpp(dtype):
    ref_bufs = _make_buffers(dtype, SIZES, seed=13)
    ours = _clone_to(ref_bufs, DEVICE)
    t_ref = (ref_bufs["param"].float() + 0.1).to(dtype)
    t_ours = t_ref.clone().to(DEVICE)
    hg_ref, hg_ours = bytearray(len(SIZES)), bytearray(len(SIZES))
    g_ref = _bind(C.ArenaGroup, ref_bufs, SIZES, hg_ref)
    g_ours = _bind(U.TritonArenaGroup, ours, SIZES, hg_ours, block_size=256)
    g_ref.set_teacher(t_ref)
    g_ours.set_teacher(t_ours)
    exact = UNDER_INTERPRETER  # the GPU may contract a*b+c into an FMA; the interpreter does not
    n = ref_bufs["param"].numel()
    t_before = t_ours.clone()
    for step, (flags, max_norm, m, prob, seed, counter) in enumerate(_COTTA_SCHEDULE):
        g = _grads(dtype, SIZES, 40 + step)
        ref_bufs["grad"].copy_(g)
        ours["grad"].copy_(g)
        hg_ref[:] = flags
        hg_ours[:] = flags
        kw = dict(max_grad_norm=max_norm, ema_momentum=m, restore_prob=prob, restore_seed=seed,
                  restore_counter=counter)
        out = fused_step([g_ours], 1e-2, **kw)
        expected = c_fused_step([g_ref], 1e-2, **kw)
        what = f"cotta {dtype} step {step}"
        _stats_close(out, expected, 1e-5 if dtype == torch.float32 else 1e-3, what)
        mask = expected_restore_mask(n, prob, seed, counter, 0)
        assert out["restored"] == expected["restored"] == float(mask.sum()), (what, out["restored"],
                                                                                expected["restored"])
        assert prob == 0.0 or bool(mask.any())
        # the same restore pattern: restored elements are base, bit for bit, in both engines
        assert torch.equal(_bits(ours["param"])[mask], _bits(ours["base"])[mask]), f"{what}: restored != base"
        assert torch.equal(_bits(ref_bufs["param"])[mask], _bits(ref_bufs["base"])[mask]), f"{what}: _C restored != base"
        if exact and dtype == torch.float32:
            assert torch.equal(_bits(ours["param"]), _bits(ref_bufs["param"])), f"{what}: param bits"
            assert torch.equal(_bits(t_ours), _bits(t_ref)), f"{what}: teacher bits"
        else:
            _close(ours["param"], ref_bufs["param"], dtype, f"{what} param")
            _close(t_ours, t_ref, dtype, f"{what} teacher")
        if m is not None and m >= 1.0:
            assert torch.equal(_bits(t_ours), _bits(t_before)), f"{what}: m >= 1 must leave the teacher"
        t_before = t_ours.clone()
        assert g_ours.steps == list(g_ref.steps)


@needs_triton_path
@pytest.mark.parametrize("momentum", [0.999, 0.8, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cotta_ema_is_the_references(dtype, momentum):
    """No grads: the fused EMA is the reference's teacher.mul_(m).add_(student, alpha=1-m) (fp32;
    fp32 math rounded once to bf16/fp16); m = 1 keeps the teacher and m = 0 copies the student."""
    bufs = _make_buffers(dtype, SIZES, seed=14, device=DEVICE)
    group = _bind(U.TritonArenaGroup, bufs, SIZES, bytearray(len(SIZES)), block_size=256)
    t0 = torch.randn(bufs["param"].numel(), generator=torch.Generator().manual_seed(15)).to(dtype)
    t = t0.clone().to(DEVICE)
    group.set_teacher(t)
    out = fused_step([group], 1e-2, write_snapshot=False, ema_momentum=momentum)
    p = bufs["param"].cpu()
    what = f"ema {dtype} m={momentum}"
    _close(t, (t0.float() * momentum + (1.0 - momentum) * p.float()).to(dtype), dtype, what)
    if dtype == torch.float32:
        _close(t, t0.clone().mul_(momentum).add_(p, alpha=1.0 - momentum), dtype, f"{what} vs torch ops")
    if momentum == 1.0:
        assert torch.equal(_bits(t), _bits(t0))
    if momentum == 0.0:
        assert torch.equal(_bits(t), _bits(p))
    assert out["restored"] == 0.0 and out["update_norm"] == 0.0


@needs_triton_path
def test_cotta_groups_draw_with_their_own_keys():
    """Group i draws with restore_key(seed, counter, i), as in _C."""
    layouts = [(torch.float32, [7, 1000]), (torch.bfloat16, [5, 300])]
    refs, ours, g_refs, g_ours = [], [], [], []
    for i, (dt, sizes) in enumerate(layouts):
        r = _make_buffers(dt, sizes, seed=20 + i)
        r["grad"].copy_(_grads(dt, sizes, 30 + i))
        o = _clone_to(r, DEVICE)
        refs.append(r)
        ours.append(o)
        g_refs.append(_bind(C.ArenaGroup, r, sizes, bytearray([1] * len(sizes))))
        g_ours.append(_bind(U.TritonArenaGroup, o, sizes, bytearray([1] * len(sizes)), block_size=128))
        g_refs[-1].set_teacher(r["param"].clone())
        g_ours[-1].set_teacher(o["param"].clone())
    kw = dict(max_grad_norm=0.7, ema_momentum=0.9, restore_prob=0.2, restore_seed=77, restore_counter=3)
    out = fused_step(g_ours, 1e-2, **kw)
    expected = c_fused_step(g_refs, 1e-2, **kw)
    _stats_close(out, expected, 1e-4, "cotta multi-group")
    masks = [expected_restore_mask(sum(s), 0.2, 77, 3, i) for i, (_, s) in enumerate(layouts)]
    assert out["restored"] == sum(float(mk.sum()) for mk in masks)
    for o, r, mk in zip(ours, refs, masks):
        assert torch.equal(_bits(o["param"])[mk], _bits(o["base"])[mk])
        assert torch.equal(_bits(r["param"])[mk], _bits(r["base"])[mk])


@needs_triton_path
def test_cotta_restore_prob_one_and_bad_teachers():
    bufs = _make_buffers(torch.float16, SIZES, seed=16, device=DEVICE)
    bufs["grad"].copy_(_grads(torch.float16, SIZES, 2).to(DEVICE))
    group = _bind(U.TritonArenaGroup, bufs, SIZES, bytearray(b"\x01\x00\x01\x01"), block_size=256)
    pre = bufs["param"].clone()
    out = fused_step([group], 1e-2, restore_prob=1.0, restore_seed=4)
    assert out["restored"] == bufs["param"].numel()
    assert torch.equal(_bits(bufs["param"]), _bits(bufs["base"]))
    assert out["total_update_norm"] == 0.0
    torch.testing.assert_close(out["update_norm"], float(torch.linalg.vector_norm(pre.float() - bufs["base"].float())),
                               rtol=1e-5, atol=0.0)
    with pytest.raises(ValueError):
        fused_step([group], 1e-2, ema_momentum=0.9)  # no teacher bound
    with pytest.raises(ValueError):
        group.set_teacher(torch.zeros(3, dtype=torch.float16, device=DEVICE))
    with pytest.raises(TypeError):
        group.set_teacher(torch.zeros(bufs["param"].numel(), device=DEVICE))
    with pytest.raises(ValueError, match="yolozu_ttt: restore_prob must be >= 0"):  # the spec's one check
        fused_step([group], 1e-2, restore_prob=-0.5)
    group.set_teacher(bufs["param"].clone())
    group.set_teacher(None)
    with pytest.raises(ValueError):
        fused_step([group], 1e-2, ema_momentum=0.9)


# ------------------------------------------------------------------------------------------
# graph mode's premise: a step's launches read only device state (replaying them is a step)
# ------------------------------------------------------------------------------------------
@needs_triton_path
@pytest.mark.parametrize("restore", [False, True], ids=["plain", "cotta_restore"])
def test_replaying_the_first_launch_equals_fresh_steps(restore):
    """What a CUDA graph of ``StepLaunch.run`` does: the first step's launches, run again after each
    later step's host half (``prepare_step``: flags, restore key), give the same results as fresh
    ``fused_step`` calls, bit for bit: flags, step counts, bias corrections and restore keys come
    from device memory. The launch key stays the same while nothing it bakes in changes."""
    sizes = SIZES
    fresh, replay = _make_buffers(torch.float32, sizes, seed=7, device=DEVICE), None
    replay = _clone_to(fresh, DEVICE)
    groups, flags = [], []
    for bufs in (fresh, replay):
        hg = bytearray(len(sizes))
        g = _bind(U.TritonArenaGroup, bufs, sizes, hg, block_size=256)
        g.set_teacher(bufs["base"].clone())
        groups.append(g)
        flags.append(hg)
    outs = [torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=DEVICE) for _ in range(2)]
    kw = dict(lr=1e-2, max_grad_norm=0.5, anchor_lambda=0.3, ema_momentum=0.9 if restore else None,
              restore_prob=0.3 if restore else 0.0, restore_seed=5)
    spec = StepSpec(**kw)
    first = None
    for step, (flag_bytes, _, _) in enumerate(_SCHEDULE):
        g = _grads(torch.float32, sizes, step)
        for bufs, hg in zip((fresh, replay), flags):
            bufs["grad"].copy_(g)
            hg[:] = flag_bytes
        U.fused_step([groups[0]], outs[0], spec, restore_counter=step)
        launch = U.prepare_step([groups[1]], outs[1], spec, restore_counter=step)
        if first is None:
            first = launch
        assert launch.key() == first.key(), step
        first.run()
        assert torch.equal(outs[0], outs[1]), (step, outs)
        for k in ("param", "exp_avg", "exp_avg_sq", "snap"):
            assert torch.equal(_bits(fresh[k]), _bits(replay[k])), (step, k)
        assert torch.equal(groups[0].teacher, groups[1].teacher)
    assert groups[0].steps == groups[1].steps
    other = U.prepare_step([groups[1]], outs[1], spec.replace(anchor_lambda=0.5))
    assert other.key() != first.key()  # a new anchor table: a graph would be captured anew
