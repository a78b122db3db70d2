"""Tests of kernels/update.py, the Triton twin of the fused C++ update (yolozu_ttt._C).

Triton's interpreter must be switched on (TRITON_INTERPRET=1) before triton is imported, and
another test module of the same pytest process may already have imported it; so every check
runs in a subprocess: this file re-runs itself as ``python tests/test_kernels_update.py --worker
DEVICE``, runs every registered check once and prints one JSON line of results, and each pytest
test asserts on its own entry.

    interpret: CPU tensors under TRITON_INTERPRET=1 (always)
    cuda:      compiled kernels on the GPU (skipped without CUDA)

References: the C++ engine (same arena inputs, run on CPU copies), torch.optim.Adam +
torch.nn.utils.clip_grad_norm_ on separate parameter tensors (float32), an fp32-math torch
reference rounded to the dtype (bfloat16 / float16), and plain torch for SAR and EMA. The fused
CoTTA step (teacher EMA + counter-based restore) is checked against the C++ one and a numpy port
of the documented hash.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

import pytest
from conftest import triton_interpreter_problem

_MARKER = "KERNELS_UPDATE_RESULTS "
SIZES = [7, 1, 1000, 33]  # odd sizes: a 1-element segment, a multi-block segment, ragged tails
DTYPES = ("float32", "bfloat16", "float16")
_CHECKS: dict[str, Callable[[str], None]] = {}


def _check(name: str):
    def register(fn):
        _CHECKS[name] = fn
        return fn

    return register


# ------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


@pytest.fixture(scope="module", params=["interpret", "cuda"])
def worker_results(request) -> dict[str, Any]:
    mode = request.param
    if mode == "cuda" and not _cuda_available():
        pytest.skip("CUDA is not available")
    env = dict(os.environ)
    if mode == "interpret":
        problem = triton_interpreter_problem()
        if problem:
            pytest.skip(problem)
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", mode],
                          env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARKER):
            return json.loads(line[len(_MARKER):])
    pytest.fail(f"worker ({mode}) failed, rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                f"stderr:\n{proc.stderr[-4000:]}")


def _names() -> list[str]:
    return list(_CHECKS)


def test_update_kernels(worker_results, name):
    res = worker_results.get(name)
    assert res is not None, f"check {name} did not run"
    assert res["ok"], res["error"]


def pytest_generate_tests(metafunc):
    if "name" in metafunc.fixturenames:
        metafunc.parametrize("name", _names())


# ------------------------------------------------------------------------------------------
# worker side (imports torch, triton and the kernels only here)
# ------------------------------------------------------------------------------------------
def _env(mode: str):
    import torch

    from yolozu_ttt.kernels import update as U

    device = torch.device("cuda" if mode == "cuda" else "cpu")
    return torch, U, device


def _dt(name: str):
    import torch

    return getattr(torch, name)


def _offsets(sizes):
    out, o = [], 0
    for s in sizes:
        out.append(o)
        o += s
    return out


def _make_buffers(dtype, sizes, seed, device="cpu"):
    """A fresh arena: params p, base = p + small drift, zero moments, zero grads."""
    import torch

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
    import torch

    gen = torch.Generator().manual_seed(1000 + seed)
    return (scale * torch.randn(sum(sizes), generator=gen)).to(dtype)


def _tol(dtype):
    import torch

    return {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2.0 ** -7, 1e-5),
            torch.float16: (2.0 ** -10, 1e-6)}[dtype]


def _close(actual, expected, dtype, what, equal_nan=False):
    import torch

    rtol, atol = _tol(dtype)
    torch.testing.assert_close(actual.detach().cpu().float(), expected.detach().cpu().float(), rtol=rtol,
                               atol=atol, equal_nan=equal_nan, msg=lambda m: f"{what}: {m}")


def _bits(t):
    import torch

    t = t.detach().cpu()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _stats_close(ours, cpp: dict, rtol, what, equal_nan=False):
    import torch

    from yolozu_ttt.kernels.update import STAT_KEYS

    expected = torch.tensor([float(cpp[k]) for k in STAT_KEYS], dtype=torch.float64)
    torch.testing.assert_close(ours.detach().cpu().double(), expected, rtol=rtol, atol=1e-7,
                               equal_nan=equal_nan, msg=lambda m: f"{what} stats: {m}")


# schedule: (has_grad per segment, max_grad_norm, anchor_lambda)
_SCHEDULE = [
    (b"\x01\x01\x01\x01", None, 0.0),
    (b"\x01\x01\x00\x01", 0.5, 0.0),   # big segment lacks a grad; clipping active
    (b"\x01\x01\x01\x01", None, 0.3),  # anchor, single pass
    (b"\x00\x01\x01\x01", 0.5, 0.3),   # anchor + clip, two passes
    (b"\x01\x01\x01\x01", 100.0, 0.0),  # clip inactive (coef 1)
    (b"\x01\x00\x01\x01", None, 0.0),
]


def _vs_cpp(mode, dtype_name, block_size, snap_in_grad=False):
    """The Triton step against the C++ one over a schedule of flags, clipping and anchors. With
    ``snap_in_grad`` the Triton snapshot is the grad buffer itself (the C++ one stays separate):
    the same step, the grad buffer ends holding the pre-step params, and sar_perturb refuses it."""
    torch, U, device = _env(mode)
    import yolozu_ttt._C as C

    dtype = _dt(dtype_name)
    ref = _make_buffers(dtype, SIZES, seed=4 if snap_in_grad else 1)
    ours = _clone_to(ref, device)
    if snap_in_grad:
        ours["snap"] = None
    hg_ref, hg_ours = bytearray(len(SIZES)), bytearray(len(SIZES))
    g_ref = _bind(C.ArenaGroup, ref, SIZES, hg_ref)
    g_ours = _bind(U.TritonArenaGroup, ours, SIZES, hg_ours, block_size=block_size)
    if snap_in_grad:
        g_ours.set_snapshot(ours["grad"])
    snapshot = "grad" if snap_in_grad else "snap"
    stat_rtol = 1e-5 if dtype == torch.float32 else 1e-3
    for step, (flags, max_norm, lam) in enumerate(_SCHEDULE):
        g = _grads(dtype, SIZES, step)
        ref["grad"].copy_(g)
        ours["grad"].copy_(g)
        hg_ref[:] = flags
        hg_ours[:] = flags
        pre = ours["param"].clone()
        out = U.fused_step([g_ours], 1e-2, max_grad_norm=max_norm, anchor_lambda=lam)
        expected = C.fused_step([g_ref], 1e-2, max_grad_norm=max_norm, anchor_lambda=lam)
        assert out.dtype == torch.float32 and out.shape == (len(U.STAT_KEYS),) and out.device.type == device.type
        what = f"{dtype_name} step {step}"
        _stats_close(out, expected, stat_rtol, what)
        assert torch.equal(_bits(ours[snapshot]), _bits(pre)), f"{what}: the {snapshot} buffer is not the pre-step params"
        for k in ("param", "exp_avg", "exp_avg_sq"):
            _close(ours[k], ref[k], dtype if k == "param" else torch.float32, f"{what} {k}")
        assert g_ours.steps == list(g_ref.steps), (g_ours.steps, g_ref.steps)
    if snap_in_grad:
        try:
            U.sar_perturb([g_ours], 0.05, False)
        except ValueError as exc:
            assert "apart from the grad buffer" in str(exc), exc
        else:
            raise AssertionError("sar_perturb accepted a snapshot in the grad buffer")


for _d in DTYPES:
    _check(f"vs_cpp_{_d}")(lambda mode, _d=_d: _vs_cpp(mode, _d, 256))  # multi-block segment
    _check(f"vs_cpp_{_d}_default_block")(lambda mode, _d=_d: _vs_cpp(mode, _d, 2048))
    _check(f"snapshot_in_grad_{_d}")(lambda mode, _d=_d: _vs_cpp(mode, _d, 256, snap_in_grad=True))


@_check("vs_torch_adam_float32")
def _vs_torch_adam(mode):
    torch, U, device = _env(mode)
    shapes = [(7,), (1,), (10, 100), (3, 11)]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    bufs = _make_buffers(torch.float32, sizes, seed=2, device=device)
    hg = bytearray(len(sizes))
    group = _bind(U.TritonArenaGroup, bufs, sizes, hg, block_size=256)
    offs = _offsets(sizes)
    params = [torch.nn.Parameter(bufs["param"][o:o + n].clone().view(s)) for o, n, s in zip(offs, sizes, shapes)]
    bases = [bufs["base"][o:o + n].clone().view(s) for o, n, s in zip(offs, sizes, shapes)]
    opt = torch.optim.Adam(params, lr=1e-2)
    for step, (flags, max_norm, lam) in enumerate(_SCHEDULE):
        g = _grads(torch.float32, sizes, step).to(device)
        bufs["grad"].copy_(g)
        hg[:] = flags
        # reference: separate tensors, .grad None where the segment has no grad
        old = [p.detach().clone() for p in params]
        anchor = torch.zeros((), dtype=torch.float64, device=device)
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

        out = U.fused_step([group], 1e-2, max_grad_norm=max_norm, anchor_lambda=lam).cpu()
        what = f"torch Adam step {step}"
        expected = torch.tensor([float(total), float(clipped), float(upd), float(tot), float(anchor), 0.0])
        torch.testing.assert_close(out[:5].double(), expected[:5].double(), rtol=2e-5, atol=1e-7,
                                   msg=lambda m: f"{what} stats: {m}")
        for p, o, n in zip(params, offs, sizes):
            _close(bufs["param"][o:o + n], p.detach().reshape(-1), torch.float32, f"{what} param")
            st = opt.state.get(p)
            if st:
                _close(bufs["exp_avg"][o:o + n], st["exp_avg"].reshape(-1), torch.float32, f"{what} exp_avg")
                _close(bufs["exp_avg_sq"][o:o + n], st["exp_avg_sq"].reshape(-1), torch.float32,
                       f"{what} exp_avg_sq")
    assert group.steps == [int(opt.state[p]["step"]) for p in params], group.steps


def _lowp_vs_fp32_ref(mode, dtype_name):
    """bf16/fp16 params with fp32 moments vs torch fp32 math rounded to the dtype each step."""
    torch, U, device = _env(mode)
    dtype = _dt(dtype_name)
    bufs = _make_buffers(dtype, SIZES, seed=3, device=device)
    hg = bytearray(len(SIZES))
    group = _bind(U.TritonArenaGroup, bufs, SIZES, hg, block_size=256)
    p = bufs["param"].clone()
    base = bufs["base"].float()
    m = torch.zeros(p.numel(), device=device)
    v = torch.zeros_like(m)
    steps = [0] * len(SIZES)
    offs = _offsets(SIZES)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    for step, (flags, max_norm, lam) in enumerate(_SCHEDULE):
        g_lp = _grads(dtype, SIZES, step).to(device)
        bufs["grad"].copy_(g_lp)
        hg[:] = flags
        out = U.fused_step([group], lr, max_grad_norm=max_norm, anchor_lambda=lam)
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
        what = f"{dtype_name} fp32-ref step {step}"
        _close(bufs["param"], p, dtype, f"{what} param")
        torch.testing.assert_close(bufs["exp_avg"], m, rtol=1e-4, atol=1e-6, msg=lambda x: f"{what} m: {x}")
        torch.testing.assert_close(bufs["exp_avg_sq"], v, rtol=1e-4, atol=1e-8, msg=lambda x: f"{what} v: {x}")
        torch.testing.assert_close(out[0].cpu().double(), total.cpu().double(), rtol=1e-5, atol=1e-7)
        # keep the reference on the kernel's params so one-ulp rounding ties do not compound
        p.copy_(bufs["param"])


for _d in ("bfloat16", "float16"):
    _check(f"lowp_vs_fp32_ref_{_d}")(lambda mode, _d=_d: _lowp_vs_fp32_ref(mode, _d))


def _nan_grads(mode, dtype_name, max_norm):
    torch, U, device = _env(mode)
    import yolozu_ttt._C as C

    dtype = _dt(dtype_name)
    ref = _make_buffers(dtype, SIZES, seed=4)
    ours = _clone_to(ref, device)
    flags = b"\x01\x00\x01\x01"
    g_ref = _bind(C.ArenaGroup, ref, SIZES, bytearray(flags))
    g_ours = _bind(U.TritonArenaGroup, ours, SIZES, bytearray(flags), block_size=256)
    g = _grads(dtype, SIZES, 0)
    g[1008 + 5] = float("nan")
    ref["grad"].copy_(g)
    ours["grad"].copy_(g)
    pre = ours["param"].clone()
    out = U.fused_step([g_ours], 1e-2, max_grad_norm=max_norm)
    expected = C.fused_step([g_ref], 1e-2, max_grad_norm=max_norm)
    _stats_close(out, expected, 1e-3, f"nan {dtype_name}", equal_nan=True)
    assert not bool(torch.isfinite(out).all()), "non-finite flag not raised"
    for k in ("param", "exp_avg", "exp_avg_sq"):
        _close(ours[k], ref[k], dtype if k == "param" else torch.float32, f"nan {dtype_name} {k}", equal_nan=True)
    assert torch.equal(_bits(ours["snap"]), _bits(pre))
    assert torch.equal(_bits(ours["param"][7:8]), _bits(pre[7:8])), "segment without grad changed"
    if max_norm is not None:  # NaN clip coefficient reaches every segment with a grad
        assert bool(torch.isnan(ours["param"][:7]).all()) and bool(torch.isnan(ours["param"][8:]).all())
    else:  # Adam is elementwise: only the NaN element goes NaN
        assert int(torch.isnan(ours["param"]).sum()) == 1


for _d in DTYPES:
    _check(f"nan_grad_clip_{_d}")(lambda mode, _d=_d: _nan_grads(mode, _d, 1.0))
    _check(f"nan_grad_noclip_{_d}")(lambda mode, _d=_d: _nan_grads(mode, _d, None))


@_check("multi_group_shared_clip")
def _multi_group(mode):
    torch, U, device = _env(mode)
    import yolozu_ttt._C as C

    layouts = [(torch.float32, [7, 1, 1000, 33]), (torch.bfloat16, [5, 300]), (torch.float16, [1, 129])]
    refs, ours, g_refs, g_ours, flags_r, flags_o = [], [], [], [], [], []
    for i, (dt, sizes) in enumerate(layouts):
        r = _make_buffers(dt, sizes, seed=10 + i)
        o = _clone_to(r, device)
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
        out = U.fused_step(g_ours, 1e-2, max_grad_norm=0.7, anchor_lambda=0.1)
        expected = C.fused_step(g_refs, 1e-2, max_grad_norm=0.7, anchor_lambda=0.1)
        _stats_close(out, expected, 1e-4, f"multi-group step {step}")
        assert float(out[5]) < 1.0
        for i, (dt, _) in enumerate(layouts):
            for k in ("param", "exp_avg", "exp_avg_sq"):
                _close(ours[i][k], refs[i][k], dt if k == "param" else torch.float32, f"group {i} {k}")
            assert g_ours[i].steps == list(g_refs[i].steps)


@_check("deterministic")
def _deterministic(mode):
    torch, U, device = _env(mode)
    runs = []
    for _ in range(2):
        bufs = _make_buffers(torch.float32, SIZES, seed=5, device=device)
        hg = bytearray(len(SIZES))
        group = _bind(U.TritonArenaGroup, bufs, SIZES, hg, block_size=64)
        outs = []
        for step, (flags, max_norm, lam) in enumerate(_SCHEDULE):
            bufs["grad"].copy_(_grads(torch.float32, SIZES, step).to(device))
            hg[:] = flags
            outs.append(U.fused_step([group], 1e-2, max_grad_norm=max_norm, anchor_lambda=lam).cpu())
        runs.append((torch.stack(outs), {k: v.cpu() for k, v in bufs.items()}))
    assert torch.equal(_bits(runs[0][0]), _bits(runs[1][0])), "stats differ between runs"
    for k in runs[0][1]:
        assert torch.equal(_bits(runs[0][1][k]), _bits(runs[1][1][k])), f"{k} differs between runs"


@_check("grad_stats")
def _grad_stats(mode):
    torch, U, device = _env(mode)
    import yolozu_ttt._C as C

    for dtype_name in DTYPES:
        dtype = _dt(dtype_name)
        ref = _make_buffers(dtype, SIZES, seed=6)
        g = _grads(dtype, SIZES, 3)
        ref["grad"].copy_(g)
        ours = _clone_to(ref, device)
        flags = b"\x01\x01\x00\x01"
        g_ref = _bind(C.ArenaGroup, ref, SIZES, bytearray(flags))
        g_ours = _bind(U.TritonArenaGroup, ours, SIZES, bytearray(flags), block_size=256)
        before = {k: v.clone() for k, v in ours.items()}
        for lam, value in ((0.0, False), (0.0, True), (0.5, False)):
            out = U.grad_stats([g_ours], anchor_lambda=lam, anchor_value=value)
            norm, anchor = C.grad_stats([g_ref], lam, anchor_value=value)
            assert (anchor != 0.0) == (lam != 0.0 or value)
            assert out.shape == (2,) and out.dtype == torch.float32
            torch.testing.assert_close(out.cpu().double(), torch.tensor([norm, anchor], dtype=torch.float64),
                                       rtol=1e-5, atol=1e-8)
        for k, v in before.items():
            assert torch.equal(_bits(ours[k]), _bits(v)), f"grad_stats changed {k}"
        assert g_ours.steps == [0] * len(SIZES)


def _sar(mode, adaptive):
    torch, U, device = _env(mode)
    import yolozu_ttt._C as C

    for dtype_name in DTYPES:
        dtype = _dt(dtype_name)
        ref = _make_buffers(dtype, SIZES, seed=7)
        ref["grad"].copy_(_grads(dtype, SIZES, 4))
        ours = _clone_to(ref, device)
        cpp = _clone_to(ref, "cpu")
        flags = b"\x01\x01\x00\x01"
        g_ours = _bind(U.TritonArenaGroup, ours, SIZES, bytearray(flags), block_size=256)
        g_cpp = _bind(C.ArenaGroup, cpp, SIZES, bytearray(flags))
        rho = 0.05
        pre = ours["param"].clone()
        out = U.sar_perturb([g_ours], rho, adaptive)
        norm_cpp, applied_cpp = C.sar_perturb([g_cpp], rho, adaptive)
        # torch reference (yolozu _sar_perturb_and_backup): fp32 direction over params with a grad
        p32, g32 = ref["param"].float(), ref["grad"].float()
        expected_p = ref["param"].clone()
        dirs = []
        for o, n, f in zip(_offsets(SIZES), SIZES, flags):
            if f:
                d = g32[o:o + n] * (p32[o:o + n].abs() if adaptive else 1.0)
                dirs.append((o, n, d))
        norm = float(torch.sqrt(sum((d * d).sum() for _, _, d in dirs)))
        scale = rho / (norm + 1e-12)
        for o, n, d in dirs:
            expected_p[o:o + n] = (p32[o:o + n] + scale * d).to(dtype)
        what = f"sar adaptive={adaptive} {dtype_name}"
        assert out.shape == (2,)
        torch.testing.assert_close(float(out[0]), norm, rtol=1e-5, atol=0.0)
        torch.testing.assert_close(float(out[0]), norm_cpp, rtol=1e-6, atol=0.0)
        assert float(out[1]) == 1.0 and applied_cpp
        _close(ours["param"], expected_p, dtype, f"{what} vs torch")
        _close(ours["param"], cpp["param"], dtype, f"{what} vs _C")
        assert torch.equal(_bits(ours["snap"]), _bits(pre)), f"{what}: snapshot"
        assert torch.equal(_bits(ours["param"][8:1008]), _bits(pre[8:1008])), f"{what}: no-grad segment moved"
        # restore_ rolls back bit-exactly
        U.restore_(ours["param"], ours["snap"])
        assert torch.equal(_bits(ours["param"]), _bits(pre))
    # rho = 0, or zero grads: nothing changes, not applied
    bufs = _make_buffers(torch.float32, SIZES, seed=8, device=device)
    bufs["grad"].copy_(_grads(torch.float32, SIZES, 5).to(device))
    group = _bind(U.TritonArenaGroup, bufs, SIZES, None)
    before = {k: v.clone() for k, v in bufs.items()}
    out0 = U.sar_perturb([group], 0.0, adaptive)
    assert float(out0[1]) == 0.0 and float(out0[0]) > 0.0
    bufs["grad"].zero_()
    before["grad"] = bufs["grad"].clone()
    out1 = U.sar_perturb([group], 0.05, adaptive)
    assert float(out1[0]) == 0.0 and float(out1[1]) == 0.0
    for k, v in before.items():
        assert torch.equal(_bits(bufs[k]), _bits(v)), f"{k} changed though not applied"


_check("sar_perturb")(lambda mode: _sar(mode, False))
_check("sar_perturb_adaptive")(lambda mode: _sar(mode, True))


@_check("ema")
def _ema(mode):
    torch, U, device = _env(mode)
    gen = torch.Generator().manual_seed(9)
    n = 1000 + 37
    for dtype_name in DTYPES:
        dtype = _dt(dtype_name)
        t = torch.randn(n, generator=gen).to(dtype)
        s = torch.randn(n, generator=gen).to(dtype)
        for momentum in (0.999, 0.5, 0.0, 1.0):
            ours = t.clone().to(device)
            ret = U.ema_(ours, s.to(device), momentum, block_size=256)
            assert ret is ours
            if dtype == torch.float32:  # the reference: teacher.mul_(m).add_(student, alpha=1-m)
                expected = t.clone().mul_(momentum).add_(s, alpha=1.0 - momentum)
            else:  # fp32 math rounded once to the dtype
                expected = (t.float() * momentum + (1.0 - momentum) * s.float()).to(dtype)
            _close(ours, expected, dtype, f"ema {dtype_name} m={momentum}")
            if momentum == 1.0:
                assert torch.equal(_bits(ours), _bits(t))
            if momentum == 0.0:
                assert torch.equal(_bits(ours), _bits(s))


@_check("no_grad_at_all")
def _no_grad(mode):
    torch, U, device = _env(mode)
    bufs = _make_buffers(torch.bfloat16, SIZES, seed=11, device=device)
    bufs["grad"].copy_(_grads(torch.bfloat16, SIZES, 1).to(device))
    hg = bytearray(len(SIZES))
    group = _bind(U.TritonArenaGroup, bufs, SIZES, hg, block_size=256)
    pre = bufs["param"].clone()
    for max_norm in (None, 1.0):
        out = U.fused_step([group], 1e-2, max_grad_norm=max_norm).cpu()
        assert torch.equal(_bits(bufs["param"]), _bits(pre))
        assert float(out[0]) == 0.0 and float(out[1]) == 0.0 and float(out[2]) == 0.0
        drift = torch.linalg.vector_norm(pre.float() - bufs["base"].float())
        torch.testing.assert_close(float(out[3]), float(drift), rtol=1e-6, atol=0.0)
    assert group.steps == [0] * len(SIZES)
    group.reset_state()
    assert float(bufs["exp_avg"].abs().sum()) == 0.0


@_check("validation")
def _validation(mode):
    torch, U, device = _env(mode)
    bufs = _make_buffers(torch.float32, SIZES, seed=12, device=device)

    def raises(exc, fn):
        try:
            fn()
        except exc:
            return
        raise AssertionError(f"expected {exc.__name__}")

    raises(ValueError, lambda: U.TritonArenaGroup(bufs["param"], bufs["grad"], bufs["exp_avg"], bufs["exp_avg_sq"],
                                                  bufs["base"], bufs["snap"], [0, 7], [7, 5], None))
    raises(ValueError, lambda: _bind(U.TritonArenaGroup, bufs, SIZES, bytearray(2)))
    bad = dict(bufs, exp_avg=bufs["exp_avg"].double())
    raises(TypeError, lambda: _bind(U.TritonArenaGroup, bad, SIZES, None))
    bad = dict(bufs, grad=bufs["grad"].half())
    raises(TypeError, lambda: _bind(U.TritonArenaGroup, bad, SIZES, None))
    no_snap = dict(bufs, snap=None)
    group = _bind(U.TritonArenaGroup, no_snap, SIZES, None)
    raises(ValueError, lambda: U.fused_step([group], 1e-2))
    raises(ValueError, lambda: U.sar_perturb([group], 0.05, False))
    raises(ValueError, lambda: U.fused_step([], 1e-2))
    raises(ValueError, lambda: U.fused_step([group], -1.0, write_snapshot=False))
    U.fused_step([group], 1e-2, write_snapshot=False)  # fine without a snapshot buffer


# ---- CoTTA: teacher EMA + stochastic restore fused into the step ---------------------------
def _restore_mask(n, prob, seed, counter, group):
    """numpy port of the draw: element j restores where (fmix32(j ^ key) >> 8) * 2^-24 < prob."""
    import numpy as np
    import torch

    import yolozu_ttt._C as C

    key = np.uint32(C.restore_key(seed, counter, group))
    with np.errstate(over="ignore"):
        h = np.arange(n, dtype=np.uint64).astype(np.uint32) ^ key
        for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
            h = (h ^ (h >> np.uint32(shift))) * np.uint32(mul)
        h = h ^ (h >> np.uint32(16))
    return torch.from_numpy((h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24) < np.float32(prob))


@_check("restore_key_port")
def _restore_key_port(mode):
    _, U, _ = _env(mode)
    import yolozu_ttt._C as C

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


def _cotta_vs_cpp(mode, dtype_name):
    torch, U, device = _env(mode)
    import yolozu_ttt._C as C

    dtype = _dt(dtype_name)
    ref = _make_buffers(dtype, SIZES, seed=13)
    ours = _clone_to(ref, device)
    t_ref = (ref["param"].float() + 0.1).to(dtype)
    t_ours = t_ref.clone().to(device)
    hg_ref, hg_ours = bytearray(len(SIZES)), bytearray(len(SIZES))
    g_ref = _bind(C.ArenaGroup, ref, SIZES, hg_ref)
    g_ours = _bind(U.TritonArenaGroup, ours, SIZES, hg_ours, block_size=256)
    g_ref.set_teacher(t_ref)
    g_ours.set_teacher(t_ours)
    exact = mode == "interpret"  # the GPU may contract a*b+c into an FMA; the interpreter does not
    n = ref["param"].numel()
    t_before = t_ours.clone()
    for step, (flags, max_norm, m, prob, seed, counter) in enumerate(_COTTA_SCHEDULE):
        g = _grads(dtype, SIZES, 40 + step)
        ref["grad"].copy_(g)
        ours["grad"].copy_(g)
        hg_ref[:] = flags
        hg_ours[:] = flags
        kw = dict(max_grad_norm=max_norm, ema_momentum=m, restore_prob=prob, restore_seed=seed,
                  restore_counter=counter)
        out = U.fused_step([g_ours], 1e-2, **kw)
        expected = C.fused_step([g_ref], 1e-2, **kw)
        what = f"cotta {dtype_name} step {step}"
        _stats_close(out, expected, 1e-5 if dtype == torch.float32 else 1e-3, what)
        mask = _restore_mask(n, prob, seed, counter, 0)
        assert float(out[6]) == expected["restored"] == float(mask.sum()), (what, float(out[6]), expected["restored"])
        assert prob == 0.0 or bool(mask.any())
        # the same restore pattern: restored elements are base, bit for bit, in both engines
        assert torch.equal(_bits(ours["param"])[mask], _bits(ours["base"])[mask]), f"{what}: restored != base"
        assert torch.equal(_bits(ref["param"])[mask], _bits(ref["base"])[mask]), f"{what}: _C restored != base"
        if exact and dtype == torch.float32:
            assert torch.equal(_bits(ours["param"]), _bits(ref["param"])), f"{what}: param bits"
            assert torch.equal(_bits(t_ours), _bits(t_ref)), f"{what}: teacher bits"
        else:
            _close(ours["param"], ref["param"], dtype, f"{what} param")
            _close(t_ours, t_ref, dtype, f"{what} teacher")
        if m is not None and m >= 1.0:
            assert torch.equal(_bits(t_ours), _bits(t_before)), f"{what}: m >= 1 must leave the teacher"
        t_before = t_ours.clone()
        assert g_ours.steps == list(g_ref.steps)


for _d in DTYPES:
    _check(f"cotta_vs_cpp_{_d}")(lambda mode, _d=_d: _cotta_vs_cpp(mode, _d))


@_check("cotta_ema_vs_torch")
def _cotta_ema_vs_torch(mode):
    """No grads: the fused EMA is the reference's teacher.mul_(m).add_(student, alpha=1-m)."""
    torch, U, device = _env(mode)
    for dtype_name in DTYPES:
        dtype = _dt(dtype_name)
        bufs = _make_buffers(dtype, SIZES, seed=14, device=device)
        group = _bind(U.TritonArenaGroup, bufs, SIZES, bytearray(len(SIZES)), block_size=256)
        t0 = torch.randn(bufs["param"].numel(), generator=torch.Generator().manual_seed(15)).to(dtype)
        t = t0.clone().to(device)
        group.set_teacher(t)
        out = U.fused_step([group], 1e-2, write_snapshot=False, ema_momentum=0.8)
        p = bufs["param"].cpu()
        expected = (t0.float() * 0.8 + 0.2 * p.float()).to(dtype)
        _close(t, expected, dtype, f"ema {dtype_name}")
        if dtype == torch.float32:
            _close(t, t0.clone().mul_(0.8).add_(p, alpha=0.2), dtype, "ema vs torch ops")
        assert float(out[6]) == 0.0 and float(out[2]) == 0.0


@_check("cotta_multi_group_keys")
def _cotta_multi_group(mode):
    """Group i draws with restore_key(seed, counter, i), as in _C."""
    torch, U, device = _env(mode)
    import yolozu_ttt._C as C

    layouts = [(torch.float32, [7, 1000]), (torch.bfloat16, [5, 300])]
    refs, ours, g_refs, g_ours = [], [], [], []
    for i, (dt, sizes) in enumerate(layouts):
        r = _make_buffers(dt, sizes, seed=20 + i)
        r["grad"].copy_(_grads(dt, sizes, 30 + i))
        o = _clone_to(r, device)
        refs.append(r)
        ours.append(o)
        g_refs.append(_bind(C.ArenaGroup, r, sizes, bytearray([1] * len(sizes))))
        g_ours.append(_bind(U.TritonArenaGroup, o, sizes, bytearray([1] * len(sizes)), block_size=128))
        g_refs[-1].set_teacher(r["param"].clone())
        g_ours[-1].set_teacher(o["param"].clone())
    kw = dict(max_grad_norm=0.7, ema_momentum=0.9, restore_prob=0.2, restore_seed=77, restore_counter=3)
    out = U.fused_step(g_ours, 1e-2, **kw)
    expected = C.fused_step(g_refs, 1e-2, **kw)
    _stats_close(out, expected, 1e-4, "cotta multi-group")
    masks = [_restore_mask(sum(s), 0.2, 77, 3, i) for i, (_, s) in enumerate(layouts)]
    assert float(out[6]) == sum(float(mk.sum()) for mk in masks)
    for o, r, mk in zip(ours, refs, masks):
        assert torch.equal(_bits(o["param"])[mk], _bits(o["base"])[mk])
        assert torch.equal(_bits(r["param"])[mk], _bits(r["base"])[mk])


@_check("cotta_prob_one_and_validation")
def _cotta_prob_one(mode):
    torch, U, device = _env(mode)
    bufs = _make_buffers(torch.float16, SIZES, seed=16, device=device)
    bufs["grad"].copy_(_grads(torch.float16, SIZES, 2).to(device))
    group = _bind(U.TritonArenaGroup, bufs, SIZES, bytearray(b"\x01\x00\x01\x01"), block_size=256)
    pre = bufs["param"].clone()
    out = U.fused_step([group], 1e-2, restore_prob=1.0, restore_seed=4).cpu()
    assert float(out[6]) == bufs["param"].numel()
    assert torch.equal(_bits(bufs["param"]), _bits(bufs["base"]))
    assert float(out[3]) == 0.0
    torch.testing.assert_close(float(out[2]), float(torch.linalg.vector_norm(pre.float() - bufs["base"].float())),
                               rtol=1e-5, atol=0.0)

    def raises(exc, fn):
        try:
            fn()
        except exc:
            return
        raise AssertionError(f"expected {exc.__name__}")

    raises(ValueError, lambda: U.fused_step([group], 1e-2, ema_momentum=0.9))  # no teacher bound
    raises(ValueError, lambda: group.set_teacher(torch.zeros(3, dtype=torch.float16, device=device)))
    raises(TypeError, lambda: group.set_teacher(torch.zeros(bufs["param"].numel(), device=device)))
    raises(ValueError, lambda: U.fused_step([group], 1e-2, restore_prob=-0.5))
    group.set_teacher(bufs["param"].clone())
    group.set_teacher(None)
    raises(ValueError, lambda: U.fused_step([group], 1e-2, ema_momentum=0.9))


# ------------------------------------------------------------------------------------------
def _worker(mode: str) -> None:
    results = {}
    for name, fn in _CHECKS.items():
        t0 = time.perf_counter()
        try:
            fn(mode)
            results[name] = {"ok": True, "error": ""}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 3)
    print(_MARKER + json.dumps(results), flush=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
