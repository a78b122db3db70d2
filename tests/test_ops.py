"""yolozu_ttt.ops against YOLOZU's own reference functions (values and gradients).

Every test runs on three paths:

* in this process on CPU: the torch implementation;
* in a subprocess with ``TRITON_INTERPRET=1`` (``test_triton_interpreter``): the same file,
  so every test exercises the Triton kernels in the interpreter;
* on CUDA when available (``device`` parameter): the Triton kernels natively.
"""
from __future__ import annotations

import pytest
import torch
from conftest import UNDER_INTERPRETER, run_under_interpreter, skip_under_interpreter

from yolozu.tta.integration import _eata_sample_signals, _entropy_loss_from_logits
from yolozu.tta.ttt_mim import apply_mask, generate_block_mask, reconstruction_loss
from yolozu_ttt import common, ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not UNDER_INTERPRETER else [])

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy noise in the interpreter


def _path_name(device: str) -> str:
    return "triton" if common.use_triton(torch.empty(0, device=device)) else "torch"


def _value_and_grad(fn, *inputs, dtype=None):
    """``fn``'s value and input gradients on fresh leaves (optionally evaluated in ``dtype``)."""
    leaves = [x.detach().to(dtype or x.dtype, copy=True).requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _close(actual, expected, *, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol, equal_nan=True)


# =======================================================================================
# entropy_loss
# =======================================================================================

ENTROPY_SHAPES = [(3, 7, 1000), (5, 4097), (2, 3, 5, 81), (6, 2), (2, 65537), (4, 1), (2, 3, 1), (1, 50)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ENTROPY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_entropy_loss_matches_reference(shape, device):
    gen = torch.Generator().manual_seed(sum(shape))
    z = (torch.randn(shape, generator=gen) * 3.0).to(device)
    ref, (ref_grad,) = _value_and_grad(_entropy_loss_from_logits, z, dtype=torch.float64)
    ours, (grad,) = _value_and_grad(ops.entropy_loss, z)
    assert ours.shape == () and ours.dtype == z.dtype
    assert grad.shape == z.shape and grad.dtype == z.dtype
    _close(ours, ref, rtol=1e-5, atol=1e-5)
    _close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    if shape[-1] <= 1:
        assert float(ours) == 0.0 and not grad.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (2, 3, 81), (5, 1)], ids=lambda s: "x".join(map(str, s)))
def test_entropy_loss_eager_path_equals_the_custom_op(shape, dtype, device):
    """Eager calls skip the torch.library layers; value and gradient are the custom op's, bit for bit."""
    z = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 4).to(device=device, dtype=dtype)
    a, b = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    la, lb = ops.entropy_loss(a), torch.ops.yolozu_ttt.entropy_loss_fwd(b)[0]
    (la * 1.7).backward()
    (lb * 1.7).backward()
    assert la.dtype == lb.dtype == dtype and la.shape == lb.shape == ()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_loss_saturated_and_neg_inf(device):
    z = torch.randn(6, 300) * 2.0
    z[0, 3] = 1000.0  # saturated: p = one-hot
    z[1] = -1.0e4
    z[1, 7] = 50.0
    z[2, ::3] = float("-inf")  # p = 0 lanes
    z[3, 1:] = float("-inf")  # single finite class: H = 0
    z[4, 10:20] = 80.0  # ties at saturation
    z[5] = 0.0  # uniform: H = log C
    z = z.to(device)
    ref, (ref_grad,) = _value_and_grad(_entropy_loss_from_logits, z, dtype=torch.float64)
    ours, (grad,) = _value_and_grad(ops.entropy_loss, z)
    assert torch.isfinite(ours) and torch.isfinite(grad).all()
    _close(ours, ref, rtol=1e-5, atol=1e-6)
    _close(grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4, 30, 81), (3, 1203)], ids=lambda s: "x".join(map(str, s)))
def test_entropy_loss_low_precision(shape, dtype, device):
    """Error vs fp64 no worse than 2x the reference's own error in the same dtype.

    In fp16 the reference's ``clamp_min(1e-12)`` underflows to 0 and it returns NaN; there
    the bound is a few fp16 ulps of the fp64 value instead.
    """
    gen = torch.Generator().manual_seed(7)
    z = (torch.randn(shape, generator=gen) * 3.0).to(dtype).to(device)
    exact, (exact_grad,) = _value_and_grad(_entropy_loss_from_logits, z, dtype=torch.float64)
    low, (low_grad,) = _value_and_grad(_entropy_loss_from_logits, z)
    ours, (grad,) = _value_and_grad(ops.entropy_loss, z)
    assert ours.dtype == dtype and grad.dtype == dtype
    eps = torch.finfo(dtype).eps
    ref_err = (low.double() - exact).abs().item()
    our_err = (ours.double() - exact).abs().item()
    if not torch.isfinite(low) or not torch.isfinite(low_grad).all():
        assert dtype == torch.float16
        assert our_err <= 4 * eps * abs(exact.item())
        assert (grad.double() - exact_grad).abs().max() <= 4 * eps * exact_grad.abs().max()
        return
    assert our_err <= 2.0 * ref_err + eps * abs(exact.item()), (our_err, ref_err)
    ref_gerr = (low_grad.double() - exact_grad).abs().max().item()
    our_gerr = (grad.double() - exact_grad).abs().max().item()
    assert our_gerr <= 2.0 * ref_gerr + eps * exact_grad.abs().max().item(), (our_gerr, ref_gerr)


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_loss_noncontiguous_and_upstream_grad(device):
    z = torch.randn(40, 3, 17).to(device).transpose(0, 1)  # (3, 40, 17), non-contiguous
    leaf = z.detach().requires_grad_(True)
    ref_leaf = z.detach().double().requires_grad_(True)
    (3.5 * ops.entropy_loss(leaf)).backward()
    (3.5 * _entropy_loss_from_logits(ref_leaf)).backward()
    _close(leaf.grad, ref_leaf.grad, rtol=1e-4, atol=1e-7)


# =======================================================================================
# entropy_stats (EATA signals)
# =======================================================================================

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape", [(5, 81), (4, 300, 81), (2, 3, 5, 1000), (3, 7, 1), (6, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_entropy_stats_matches_reference(shape, device):
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(shape, generator=gen) * 4.0).to(device)
    if shape[-1] > 1:
        z[..., 0] += 6.0  # some confident rows
    conf_min = 0.5
    ref = _eata_sample_signals(z.double(), conf_min=conf_min)
    ours = ops.entropy_stats(z, conf_min)
    for r, o in zip(ref, ours):
        assert o.dtype == torch.float32 and o.shape == (shape[0],)
        _close(o, r, rtol=1e-5, atol=1e-6)


# =======================================================================================
# Patch masking / masked reconstruction
# =======================================================================================

def _grid(shape, prob, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < prob


MIM_CASES = [
    # (x shape, patch, grid shape)
    ((2, 3, 37, 50), 16, (3, 4)),
    ((2, 3, 32, 48), 16, (2, 3)),
    ((3, 37, 50), 16, (3, 4)),
    ((3, 37, 50), 16, (3, 3, 4)),
    ((2, 3, 37, 50), 16, (2, 3, 4)),
    ((2, 3, 37, 50), 16, (2, 1, 3, 4)),
    ((2, 3, 20, 21), 7, (1, 3, 3, 3)),
    ((1, 2, 5, 9), 4, (2, 3)),
]


def _case_id(case):
    shape, ps, grid = case
    return f"{'x'.join(map(str, shape))}-p{ps}-g{'x'.join(map(str, grid))}"


def over_mim_cases(test):
    """Parametrize ``test(case, prob, device)`` over every MIM case, mask density and device."""
    test = pytest.mark.parametrize("case", MIM_CASES, ids=_case_id)(test)
    test = pytest.mark.parametrize("prob", [0.0, 0.5, 1.0], ids=["empty", "half", "full"])(test)
    return pytest.mark.parametrize("device", DEVICES)(test)


def _mim_case(case, prob, seed, device):
    """(input shape, patch size, the patch grid on ``device``, its full-resolution mask)."""
    shape, ps, gshape = case
    grid = _grid(gshape, prob, seed).to(device)
    return shape, ps, grid, ops.expand_patch_mask(grid, shape[-2], shape[-1], ps)


@over_mim_cases
def test_apply_patch_mask_matches_reference(case, prob, device):
    shape, ps, grid, full = _mim_case(case, prob, 11, device)
    x = torch.randn(shape).to(device)
    w = torch.randn(shape).to(device)  # random upstream gradient
    ref, (ref_grad,) = _value_and_grad(lambda t: (apply_mask(t, full, mask_value=-0.25) * w).sum(), x)
    ours_out = ops.apply_patch_mask(x, grid, patch_size=ps, mask_value=-0.25)
    assert torch.equal(ours_out, apply_mask(x, full, mask_value=-0.25))
    ours, (grad,) = _value_and_grad(lambda t: (ops.apply_patch_mask(t, grid, patch_size=ps, mask_value=-0.25) * w).sum(), x)
    _close(ours, ref)
    assert torch.equal(grad, ref_grad)


@over_mim_cases
def test_masked_reconstruction_loss_matches_reference(case, prob, device):
    shape, ps, grid, full = _mim_case(case, prob, 5, device)
    pred = torch.randn(shape).to(device)
    target = torch.randn(shape).to(device)

    def ref_fn(p, t):
        return reconstruction_loss(p, t, mask=full)

    def our_fn(p, t):
        return ops.masked_reconstruction_loss(p, t, grid, patch_size=ps)

    ref, ref_grads = _value_and_grad(ref_fn, pred, target, dtype=torch.float64)
    ours, grads = _value_and_grad(our_fn, pred, target)
    assert ours.shape == () and ours.dtype == pred.dtype
    _close(ours, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        _close(g, r, rtol=1e-5, atol=1e-8)
    if prob == 0.0:
        assert float(ours) == 0.0 and not any(g.any() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_mim_pipeline_gradients(device):
    """apply -> loss chain, gradients through both the masked input and the target."""
    shape, ps = (2, 3, 37, 50), 16
    grid = _grid((3, 4), 0.6, 2).to(device)
    full = ops.expand_patch_mask(grid, 37, 50, ps)
    x = torch.randn(shape).to(device)
    scale = torch.randn(shape).to(device)

    def ref_fn(t):
        return reconstruction_loss(apply_mask(t, full) * scale + t, t.flip(-1), mask=full)

    def our_fn(t):
        return ops.masked_reconstruction_loss(ops.apply_patch_mask(t, grid, patch_size=ps) * scale + t, t.flip(-1), grid, patch_size=ps)

    ref, (ref_grad,) = _value_and_grad(ref_fn, x, dtype=torch.float64)
    ours, (grad,) = _value_and_grad(our_fn, x)
    _close(ours, ref, rtol=1e-5, atol=1e-6)
    _close(grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_masked_reconstruction_loss_low_precision(dtype, device):
    shape, ps = (2, 3, 37, 50), 16
    grid = _grid((3, 4), 0.5, 9).to(device)
    full = ops.expand_patch_mask(grid, 37, 50, ps)
    pred = torch.randn(shape).to(dtype).to(device)
    target = torch.randn(shape).to(dtype).to(device)
    exact, exact_grads = _value_and_grad(lambda p, t: reconstruction_loss(p, t, mask=full), pred, target, dtype=torch.float64)
    low, low_grads = _value_and_grad(lambda p, t: reconstruction_loss(p, t, mask=full), pred, target)
    ours, grads = _value_and_grad(lambda p, t: ops.masked_reconstruction_loss(p, t, grid, patch_size=ps), pred, target)
    assert ours.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert (ours.double() - exact).abs() <= 2.0 * (low.double() - exact).abs() + eps * exact.abs()
    for g, lg, eg in zip(grads, low_grads, exact_grads):
        assert g.dtype == dtype
        our_err = (g.double() - eg).abs().max()
        ref_err = (lg.double() - eg).abs().max()
        assert our_err <= 2.0 * ref_err + eps * eg.abs().max()


def test_expand_patch_mask_equals_generate_block_mask():
    for (h, w, ps) in [(37, 50, 16), (64, 64, 16), (5, 9, 4), (640, 480, 32)]:
        ref = generate_block_mask(h, w, patch_size=ps, mask_prob=0.6, generator=torch.Generator().manual_seed(4))
        gh, gw = -(-h // ps), -(-w // ps)
        grid = torch.rand((gh, gw), generator=torch.Generator().manual_seed(4)) < 0.6
        assert torch.equal(ops.expand_patch_mask(grid, h, w, ps), ref)


def test_patch_mask_shape_errors():
    x = torch.randn(2, 3, 37, 50)
    with pytest.raises(ValueError, match="grid"):
        ops.apply_patch_mask(x, torch.ones(2, 4, dtype=torch.bool), patch_size=16)
    with pytest.raises(ValueError, match="broadcast"):
        ops.apply_patch_mask(x, torch.ones(4, 3, 4, dtype=torch.bool), patch_size=16)
    with pytest.raises(ValueError, match="3D or 4D"):
        ops.apply_patch_mask(torch.randn(37, 50), torch.ones(3, 4, dtype=torch.bool), patch_size=16)
    with pytest.raises(ValueError, match="same shape"):
        ops.masked_reconstruction_loss(x, x[:1], torch.ones(3, 4, dtype=torch.bool), patch_size=16)


# =======================================================================================
# torch.library: opcheck and torch.compile
# =======================================================================================

def _opcheck_cases(device):
    z = torch.randn(3, 5, 81, device=device, requires_grad=True)
    grid = _grid((3, 4), 0.5, 1).to(device)
    x = torch.randn(2, 3, 37, 50, device=device, requires_grad=True)
    t = torch.randn(2, 3, 37, 50, device=device, requires_grad=True)
    lse = torch.randn(15, device=device)
    h = torch.rand(15, device=device)
    g = torch.tensor(1.5, device=device)
    return [
        (torch.ops.yolozu_ttt.entropy_loss_fwd.default, (z,)),
        (torch.ops.yolozu_ttt.entropy_loss_bwd.default, (g, z.detach(), lse, h)),
        (torch.ops.yolozu_ttt.entropy_stats.default, (z.detach(), 0.3)),
        (torch.ops.yolozu_ttt.apply_patch_mask.default, (x, grid, 16, 0.5)),
        (torch.ops.yolozu_ttt.masked_reconstruction_loss.default, (x, t, grid, 16)),
        (torch.ops.yolozu_ttt.masked_reconstruction_loss_bwd.default, (g, x.detach(), t.detach(), grid, 16)),
        (torch.ops.yolozu_ttt.entropy_loss_samples.default, (z,)),
        (torch.ops.yolozu_ttt.entropy_loss_bwd.default, (g.expand(3) * torch.arange(1, 4, device=device), z.detach(),
                                                         lse.view(3, 5), h.view(3, 5))),  # per-sample grads
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(8))
def test_opcheck(index, device):
    op, args = _opcheck_cases(device)[index]
    torch.library.opcheck(op, args)


@pytest.mark.skipif(UNDER_INTERPRETER, reason="tracing is path-independent; run once outside the interpreter")
def test_torch_compile_fullgraph():
    grid = _grid((3, 4), 0.5, 1)

    def step(z, x):
        loss = ops.entropy_loss(z)
        masked = ops.apply_patch_mask(x, grid, patch_size=16)
        return loss + ops.masked_reconstruction_loss(masked * 2.0, x, grid, patch_size=16)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z = torch.randn(4, 20, 81, requires_grad=True)
    x = torch.randn(2, 3, 37, 50, requires_grad=True)
    out = compiled(z, x)
    out.backward()
    z2, x2 = z.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    ref = step(z2, x2)
    ref.backward()
    _close(out, ref)
    _close(z.grad, z2.grad)
    _close(x.grad, x2.grad)


# =======================================================================================
# Launches per call on the Triton path (counted in the interpreter, or on CUDA)
# =======================================================================================

class _Launches(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts what an op launches: Triton kernels (each jitted kernel's ``run``) and the aten ops
    that would run a kernel on a GPU (not views, not allocations); aten ops inside a Triton run
    (the interpreter's own copies) are not counted."""

    FREE = ("empty", "empty_like", "empty_strided", "lift_fresh", "_local_scalar_dense")

    def __init__(self, monkeypatch):
        super().__init__()
        from yolozu_ttt.kernels import entropy, mim

        self.triton, self.aten, self._inside = [], [], 0
        for module in (entropy, mim):
            for name, kernel in vars(module).items():
                if name.endswith("_kernel") and hasattr(kernel, "run"):
                    monkeypatch.setattr(kernel, "run", self._counting(name, kernel.run))

    def _counting(self, name, run):
        def counted(*args, **kwargs):
            self.triton.append(name)
            self._inside += 1
            try:
                return run(*args, **kwargs)
            finally:
                self._inside -= 1
        return counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside and not func.is_view and name not in self.FREE:
            self.aten.append(name)
        return func(*args, **(kwargs or {}))

    def take(self) -> tuple[list, list]:
        out = (list(self.triton), list(self.aten))
        self.triton.clear()
        self.aten.clear()
        return out


def _triton_device():
    if UNDER_INTERPRETER:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("the Triton path needs CUDA or the interpreter subprocess (test_triton_interpreter)")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_launches_per_call(monkeypatch):
    """Pins the launches of each public op on the Triton path: one kernel per call and direction,
    no other kernel (fills, means, casts, counts folded in), two for entropy_stats of (B, Q, C)."""
    device = _triton_device()
    z = (torch.randn(2, 30, 81) * 3).to(device)
    zb = z.to(torch.bfloat16)
    x = torch.randn(2, 3, 37, 50, device=device)
    grid = _grid((3, 4), 0.5, 1).to(device)
    g = torch.tensor(1.5, device=device)

    def run_all():  # every op once (forward; backward separately)
        zz = z.clone().requires_grad_(True)
        loss = ops.entropy_loss(zz)
        (dz,) = torch.autograd.grad(loss, zz, g)
        ops.entropy_loss(zb)
        ops.entropy_stats(z, 0.2)
        ops.entropy_stats(z[0], 0.2)
        xx = x.clone().requires_grad_(True)
        masked = ops.apply_patch_mask(xx, grid, patch_size=16, mask_value=0.5)
        rec = ops.masked_reconstruction_loss(masked, x, grid, patch_size=16)
        torch.autograd.grad(rec, xx, g)

    run_all()  # warm-up: compiles, the ticket counter
    counter = _Launches(monkeypatch)
    with counter:
        zz = z.clone().requires_grad_(True)
        counter.take()
        loss = ops.entropy_loss(zz)
        assert counter.take() == (["_entropy_fwd_kernel"], [])
        torch.autograd.grad(loss, zz, g)
        assert counter.take() == (["_entropy_bwd_kernel"], [])
        ops.entropy_loss(zb)  # bf16: the mean's cast is in the kernel too
        assert counter.take() == (["_entropy_fwd_kernel"], [])
        ops.entropy_stats(z, 0.2)
        assert counter.take() == (["_entropy_fwd_kernel", "_sample_stats_kernel"], [])
        ops.entropy_stats(z[0], 0.2)
        assert counter.take() == (["_entropy_fwd_kernel"], [])
        xx = x.clone().requires_grad_(True)
        counter.take()
        masked = ops.apply_patch_mask(xx, grid, patch_size=16, mask_value=0.5)
        assert counter.take() == (["_apply_patch_mask_kernel"], [])
        rec = ops.masked_reconstruction_loss(masked, x, grid, patch_size=16)
        assert counter.take() == (["_masked_sse_kernel"], [])
        torch.autograd.grad(rec, xx, g)
        assert counter.take() == (["_masked_sse_bwd_kernel", "_apply_patch_mask_kernel"], [])
        ops.masked_reconstruction_loss(x, x * 0.5, grid, patch_size=16)  # no grad: the same one launch
        triton, _ = counter.take()
        assert triton[-1:] == ["_masked_sse_kernel"]


@pytest.mark.parametrize("case", range(4))
def test_eager_paths_equal_the_custom_ops(case):
    """The eager bypasses of entropy_stats, apply_patch_mask and masked_reconstruction_loss give the
    custom ops' values and gradients, bit for bit."""
    device = _triton_device() if (UNDER_INTERPRETER or torch.cuda.is_available()) else "cpu"
    z = (torch.randn(3, 20, 81, generator=torch.Generator().manual_seed(case)) * 3).to(device)
    x = torch.randn(2, 3, 37, 50, generator=torch.Generator().manual_seed(case)).to(device)
    t = torch.randn(2, 3, 37, 50, generator=torch.Generator().manual_seed(case + 9)).to(device)
    grid = _grid((3, 4), 0.3 * case, case).to(device)
    if case == 0:
        for logits in (z, z[0]):
            ours, theirs = ops.entropy_stats(logits, 0.1), torch.ops.yolozu_ttt.entropy_stats(logits, 0.1)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        return
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ta, tb = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
    la = ops.masked_reconstruction_loss(ops.apply_patch_mask(a, grid, patch_size=16, mask_value=0.25), ta, grid,
                                        patch_size=16)
    lb = torch.ops.yolozu_ttt.masked_reconstruction_loss(torch.ops.yolozu_ttt.apply_patch_mask(b, grid, 16, 0.25), tb,
                                                         grid, 16)
    (la * 1.3).backward()
    (lb * 1.3).backward()
    assert torch.equal(la, lb) and torch.equal(a.grad, b.grad) and torch.equal(ta.grad, tb.grad)


# =======================================================================================
# The Triton path under the interpreter (subprocess: TRITON_INTERPRET must precede import)
# =======================================================================================

@skip_under_interpreter
def test_triton_interpreter():
    """Re-run this whole file with TRITON_INTERPRET=1: every test above on the Triton kernels."""
    pytest.importorskip("triton")
    run_under_interpreter(__file__, "-x")


def test_dispatch_rule():
    cpu = torch.empty(0)
    assert common.use_triton(cpu) is (UNDER_INTERPRETER and common.HAVE_TRITON)
    if torch.cuda.is_available():
        assert common.use_triton(cpu.cuda())
    assert _path_name("cpu") == ("triton" if UNDER_INTERPRETER else "torch")


# =======================================================================================
# torch.func.vmap: each op's batching rule equals a loop of the op over the batch
# =======================================================================================

# torch < 2.5 has no torch.library.register_vmap: there vmap's fallback loops the ops (the equality tests
# run on every torch; the rules' own tests need them)
needs_vmap_rules = pytest.mark.skipif(not hasattr(torch.library, "register_vmap"),
                                      reason="custom ops' batching rules need torch.library.register_vmap (torch 2.5)")

VMAP_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
V = 3  # the vmapped batch


def _loop_tolerance(dtype, terms: int) -> float:
    """Relative bound between two results that sum ``terms`` fp32 terms in different orders (each
    within ``(terms - 1) eps32`` of the exact sum of magnitudes) and are then cast to ``dtype`` (one ulp)."""
    return torch.finfo(dtype).eps + 2 * max(terms - 1, 0) * torch.finfo(torch.float32).eps


def _exactly_or_close(actual, expected, *, terms: int, dtype, strided_rows: bool = False):
    """Per-row and elementwise results equal a loop's bit for bit where the rows' reductions run as in the
    loop (the torch path, the interpreter); on CUDA a row's tile may differ with the row count, and torch
    reduces a strided class axis of several rows in another order than one row's (``strided_rows``:
    torch's default tolerance for the dtype)."""
    if strided_rows:
        torch.testing.assert_close(actual, expected)
    elif actual.device.type == "cpu":
        assert torch.equal(actual, expected)
    else:
        tol = _loop_tolerance(actual.dtype, terms)
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _sample(args, in_dims, i):
    return [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]


def _vmap_and_loop(fn, args, in_dims, *, grad=True, weights_seed=0):
    """``fn`` under vmap and in a loop over the batch: (values, gradients) of each, the gradients of
    ``sum_i w_i * fn(sample i)`` (random w: every sample its own upstream gradient) w.r.t. the float
    tensors among ``args``, taken by autograd through vmap's result."""

    def run(batched: bool):
        leaves = [a.detach().clone().requires_grad_(grad and a.is_floating_point()) if isinstance(a, torch.Tensor)
                  else a for a in args]
        if batched:
            out = torch.func.vmap(fn, in_dims=tuple(in_dims))(*leaves)
        else:
            outs = [fn(*_sample(leaves, in_dims, i)) for i in range(V)]
            out = tuple(map(torch.stack, zip(*outs))) if isinstance(outs[0], tuple) else torch.stack(outs)
        first = out[0] if isinstance(out, tuple) else out
        wanted = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        if not wanted or not first.requires_grad:
            return out, []
        w = torch.rand(first.shape, generator=torch.Generator().manual_seed(weights_seed)).to(first.device)
        grads = torch.autograd.grad((first.double() * w).sum(), wanted, allow_unused=True)
        return out, [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads)]

    return run(True), run(False)


def _raises_like_loop(fn, args, in_dims):
    """Where one sample raises, vmap raises the same error; returns whether it did."""
    try:
        fn(*_sample(args, in_dims, 0))
    except (TypeError, ValueError) as err:
        with pytest.raises(type(err), match=str(err)[:40].replace("(", r"\(").replace(")", r"\)")):
            torch.func.vmap(fn, in_dims=tuple(in_dims))(*args)
        return True
    return False


def _logits(shape, dtype, device, seed):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", VMAP_DTYPES, ids=str)
@pytest.mark.parametrize("in_dim", [0, 1])
@pytest.mark.parametrize("shape", [(7, 13), (2, 3, 81), (5, 1), (200,)], ids=lambda s: "x".join(map(str, s)))
def test_vmap_entropy_loss_equals_loop(shape, in_dim, dtype, device):
    """vmap(entropy_loss) over V samples: the per-sample means (one call on the flattened rows) and their
    gradients equal a loop's; the means up to their fp32 sum's order, the gradients bit for bit."""
    full = list(shape)
    full.insert(min(in_dim, len(shape)), V)
    z = _logits(full, dtype, device, len(shape) + in_dim)
    dims = [min(in_dim, len(shape))]
    if _raises_like_loop(ops.entropy_loss, [z], dims):
        assert dtype == torch.float64 and _path_name(device) == "triton"
        return
    (vals, grads), (loop_vals, loop_grads) = _vmap_and_loop(ops.entropy_loss, [z], dims)
    assert vals.shape == (V,) and vals.dtype == dtype
    rows = max(z[0].numel() // shape[-1], 1)
    strided = z.select(dims[0], 0).stride(-1) != 1 and _path_name(device) == "torch"
    tol = _loop_tolerance(dtype, rows + (shape[-1] if device != "cpu" or strided else 0))
    torch.testing.assert_close(vals, loop_vals, rtol=tol, atol=0.0)
    _exactly_or_close(grads[0], loop_grads[0], terms=shape[-1], dtype=dtype, strided_rows=strided)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", VMAP_DTYPES, ids=str)
@pytest.mark.parametrize("in_dim", [0, 2])
@pytest.mark.parametrize("shape", [(5, 81), (4, 30, 81), (3, 7, 1), (6,)], ids=lambda s: "x".join(map(str, s)))
def test_vmap_entropy_stats_equals_loop(shape, in_dim, dtype, device):
    """vmap(entropy_stats): one call on the samples of every batch element, equal to a loop's."""
    full = list(shape)
    full.insert(min(in_dim, len(shape)), V)
    z = _logits(full, dtype, device, 5 + in_dim)
    dims = [min(in_dim, len(shape)), None]
    if _raises_like_loop(ops.entropy_stats, [z, 0.4], dims):
        assert (dtype == torch.float64 and _path_name(device) == "triton") or len(shape) == 1
        return
    (vals, _), (loop_vals, _) = _vmap_and_loop(ops.entropy_stats, [z, 0.4], dims, grad=False)
    for v, lv in zip(vals, loop_vals):
        assert v.shape == (V, shape[0]) and v.dtype == torch.float32
        _exactly_or_close(v, lv, terms=shape[-1] + z[0].numel() // (shape[0] * shape[-1]), dtype=torch.float32,
                          strided_rows=z.select(dims[0], 0).stride(-1) != 1 and _path_name(device) == "torch")


# (per-sample input shape, patch size, per-sample grid shape, which of (x, grid) is batched and where)
VMAP_MIM_CASES = [
    ((2, 3, 13, 17), 8, (2, 3), (0, None)),
    ((2, 3, 13, 17), 8, (2, 2, 3), (0, 0)),
    ((2, 3, 13, 17), 8, (1, 3, 2, 3), (1, 2)),
    ((2, 3, 13, 17), 8, (2, 1, 2, 3), (None, 0)),
    ((3, 13, 17), 8, (2, 3), (0, 0)),
    ((3, 13, 17), 8, (3, 2, 3), (2, None)),
    ((3, 13, 17), 8, (1, 2, 3), (None, 1)),
]


def _vmap_mim_args(case, dtype, device, seed):
    shape, ps, gshape, (dx, dg) = case
    gen = torch.Generator().manual_seed(seed)

    def batched(s, d, make):
        if d is None:
            return make(s)
        full = list(s)
        full.insert(d, V)
        return make(full)

    x = batched(shape, dx, lambda s: torch.randn(s, generator=gen)).to(device=device, dtype=dtype)
    t = batched(shape, dx, lambda s: torch.randn(s, generator=gen)).to(device=device, dtype=dtype)
    grid = batched(gshape, dg, lambda s: torch.rand(s, generator=gen) < 0.5).to(device)
    return x, t, grid, ps, dx, dg


def _shared_input_close(grad, loop_grad, in_dim):
    """A batched input's gradient equals the loop's bit for bit; an unbatched one (shared by the V samples)
    sums V gradients in its dtype, in another order than the loop's accumulation."""
    if in_dim is not None:
        assert torch.equal(grad, loop_grad)
    else:
        tol = 2 * (V - 1) * torch.finfo(grad.dtype).eps
        torch.testing.assert_close(grad, loop_grad, rtol=tol, atol=tol * float(loop_grad.abs().max()))


def _mim_case_id(case):
    shape, ps, gshape, dims = case
    return f"{'x'.join(map(str, shape))}-g{'x'.join(map(str, gshape))}-dims{dims[0]}{dims[1]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", VMAP_DTYPES, ids=str)
@pytest.mark.parametrize("case", VMAP_MIM_CASES, ids=_mim_case_id)
def test_vmap_apply_patch_mask_equals_loop(case, dtype, device):
    """vmap(apply_patch_mask): one call on the flattened batch (the grids expanded with it), values and
    gradients equal to a loop's bit for bit."""
    x, _, grid, ps, dx, dg = _vmap_mim_args(case, dtype, device, 1)

    def fn(a, g):
        return ops.apply_patch_mask(a, g, patch_size=ps, mask_value=-0.5)

    if _raises_like_loop(fn, [x, grid], [dx, dg]):
        assert dtype == torch.float64 and _path_name(device) == "triton"
        return
    (vals, grads), (loop_vals, loop_grads) = _vmap_and_loop(fn, [x, grid], [dx, dg])
    assert torch.equal(vals, loop_vals) and vals.dtype == dtype
    _shared_input_close(grads[0], loop_grads[0], dx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", VMAP_DTYPES, ids=str)
@pytest.mark.parametrize("case", VMAP_MIM_CASES, ids=_mim_case_id)
def test_vmap_masked_reconstruction_loss_equals_loop(case, dtype, device):
    """vmap(masked_reconstruction_loss): the op per sample (a loop: each sample's own masked count),
    values and gradients w.r.t. pred and target equal to a loop's bit for bit."""
    x, t, grid, ps, dx, dg = _vmap_mim_args(case, dtype, device, 2)

    def fn(p, tt, g):
        return ops.masked_reconstruction_loss(p, tt, g, patch_size=ps)

    if _raises_like_loop(fn, [x, t, grid], [dx, dx, dg]):
        assert dtype == torch.float64 and _path_name(device) == "triton"
        return
    (vals, grads), (loop_vals, loop_grads) = _vmap_and_loop(fn, [x, t, grid], [dx, dx, dg])
    assert torch.equal(vals, loop_vals) and vals.shape == (V,) and vals.dtype == dtype
    for g, lg in zip(grads, loop_grads):
        _shared_input_close(g, lg, dx)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_the_backward_ops_and_nested_vmap(device):
    """The backward ops batch too (vmap of entropy_loss_bwd, of masked_reconstruction_loss_bwd), and
    vmap of vmap equals a double loop."""
    z = _logits((V, 4, 6, 9), torch.float32, device, 3)
    _, lse, h = torch.ops.yolozu_ttt.entropy_loss_fwd(z[0, 0])
    lse_b = torch.stack([torch.ops.yolozu_ttt.entropy_loss_fwd(z[i, 0])[1] for i in range(V)])
    h_b = torch.stack([torch.ops.yolozu_ttt.entropy_loss_fwd(z[i, 0])[2] for i in range(V)])
    g = torch.rand(V, device=device) + 0.5
    bwd = torch.ops.yolozu_ttt.entropy_loss_bwd
    got = torch.func.vmap(bwd)(g, z[:, 0], lse_b, h_b)
    want = torch.stack([bwd(g[i], z[i, 0], lse_b[i], h_b[i]) for i in range(V)])
    _exactly_or_close(got, want, terms=9, dtype=torch.float32)
    got = torch.func.vmap(bwd, in_dims=(0, None, None, None))(g, z[0, 0], lse, h)  # only the grad batched
    want = torch.stack([bwd(g[i], z[0, 0], lse, h) for i in range(V)])
    _exactly_or_close(got, want, terms=9, dtype=torch.float32)

    nested = torch.func.vmap(torch.func.vmap(ops.entropy_loss))(z)
    double = torch.stack([torch.stack([ops.entropy_loss(z[i, j]) for j in range(4)]) for i in range(V)])
    torch.testing.assert_close(nested, double, rtol=_loop_tolerance(torch.float32, 6 + 9), atol=0.0)
    stats = torch.func.vmap(torch.func.vmap(lambda s: ops.entropy_stats(s, 0.3)))(z)
    for a, b in zip(stats, zip(*[zip(*[ops.entropy_stats(z[i, j], 0.3) for j in range(4)]) for i in range(V)])):
        _exactly_or_close(a, torch.stack([torch.stack(col) for col in b]), terms=9, dtype=torch.float32)

    x, t, grid, ps, dx, dg = _vmap_mim_args(VMAP_MIM_CASES[1], torch.float32, device, 4)
    rbwd = torch.ops.yolozu_ttt.masked_reconstruction_loss_bwd
    got = torch.func.vmap(rbwd, in_dims=(0, dx, dx, dg, None))(g, x, t, grid, ps)
    want = torch.stack([rbwd(g[i], x[i], t[i], grid[i], ps) for i in range(V)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_ops_replace_the_plain_torch_twins(device):
    """Under vmap each op equals its plain-torch twin (what the sample-parallel methods ran before the
    ops batched; and the loop, above): support_twins.plain_entropy -> entropy_loss, plain_signals ->
    entropy_stats, masking's where/masked_mean -> apply_patch_mask / masked_reconstruction_loss,
    plain_mask_ratio -> masking.mask_ratio (mask_count). Tolerances: the reference tests' above."""
    from support_twins import plain_entropy as vmap_entropy, plain_mask_ratio, plain_signals as vmap_signals

    from yolozu_ttt import masking

    vmap = torch.func.vmap
    z = _logits((V, 2, 30, 81), torch.float32, device, 8)
    ours, (grad,) = _value_and_grad(lambda t: vmap(ops.entropy_loss)(t).sum(), z)
    twin, (twin_grad,) = _value_and_grad(lambda t: vmap(vmap_entropy)(t).sum(), z)
    _close(ours, twin, rtol=1e-5, atol=1e-5)
    _close(grad, twin_grad, rtol=1e-4, atol=1e-7)
    for a, b in zip(vmap(ops.entropy_stats, in_dims=(0, None))(z, 0.3), vmap(vmap_signals, in_dims=(0, None))(z, 0.3)):
        _close(a, b, rtol=1e-5, atol=1e-6)

    # (C, H, W) images, (gh, gw) grids: what the replicas' MIM passes take
    x, t, grid, ps, _, _ = _vmap_mim_args(VMAP_MIM_CASES[4], torch.float32, device, 6)

    def fused(x, t, grid):
        masked = ops.apply_patch_mask(x, grid, patch_size=ps, mask_value=0.5)
        return ops.masked_reconstruction_loss(masked * 2.0, t, grid, patch_size=ps)

    def plain(x, t, grid):  # the replicas' former masked pass's input masking and loss, without its model
        full = masking.full_mask(grid, x, ps)
        pred = torch.where(full, torch.tensor(0.5, dtype=x.dtype, device=x.device), x) * 2.0
        diff = (pred - t) ** 2
        return masking.masked_mean(diff, full.expand_as(diff), torch.zeros_like(diff.sum()))

    ours, grads = _value_and_grad(lambda a, b: vmap(fused, in_dims=(0, 0, 0))(a, b, grid).sum(), x, t)
    twin, twin_grads = _value_and_grad(lambda a, b: vmap(plain, in_dims=(0, 0, 0))(a, b, grid).sum(), x, t)
    _close(ours, twin, rtol=1e-5, atol=1e-6)
    for g, tg in zip(grads, twin_grads):
        _close(g, tg, rtol=1e-5, atol=1e-8)
    ratio = vmap(masking.mask_ratio, in_dims=(0, None, None, None))(grid, 13, 17, ps)
    assert torch.equal(ratio, vmap(plain_mask_ratio, in_dims=(0, None, None, None))(grid, 13, 17, ps))
    assert torch.equal(ratio, torch.stack([masking.mask_ratio(grid[i], 13, 17, ps) for i in range(V)]))
    full = vmap(ops.expand_patch_mask, in_dims=(0, None, None, None))(grid, 13, 17, ps)
    assert torch.equal(full, torch.stack([ops.expand_patch_mask(grid[i], 13, 17, ps) for i in range(V)]))


CUSTOM_OPS = ["entropy_loss_fwd", "entropy_loss_samples", "entropy_loss_bwd", "entropy_stats", "apply_patch_mask",
              "masked_reconstruction_loss", "masked_reconstruction_loss_bwd"]


@needs_vmap_rules
@pytest.mark.parametrize("name", CUSTOM_OPS)
def test_every_custom_op_has_a_batching_rule(name):
    """A batching rule, not vmap's fallback (which loops the op per sample, its own launches each)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"yolozu_ttt::{name}", "FuncTorchBatched")


@needs_vmap_rules
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_vmap_launches_per_call(monkeypatch):
    """On the Triton path the flattened rules launch once for the whole batch (entropy_loss forward and
    backward, entropy_stats' two, apply_patch_mask forward and backward); masked_reconstruction_loss
    loops, one launch per sample and direction."""
    device = _triton_device()
    z = (torch.randn(V, 2, 30, 81) * 3).to(device)
    x = torch.randn(V, 2, 3, 37, 50, device=device)
    grid = _grid((V, 3, 4), 0.5, 1).to(device)
    vmap = torch.func.vmap

    def run_all():
        zz = z.clone().requires_grad_(True)
        torch.autograd.grad(vmap(ops.entropy_loss)(zz).sum(), zz)
        vmap(ops.entropy_stats, in_dims=(0, None))(z, 0.2)
        xx = x.clone().requires_grad_(True)
        masked = vmap(lambda a, g: ops.apply_patch_mask(a, g, patch_size=16))(xx, grid)
        torch.autograd.grad(masked.sum(), xx)
        rec = vmap(lambda a, g: ops.masked_reconstruction_loss(a, x[0], g, patch_size=16))(xx, grid)
        torch.autograd.grad(rec.sum(), xx)

    run_all()  # warm-up
    counter = _Launches(monkeypatch)
    with counter:
        zz = z.clone().requires_grad_(True)
        counter.take()
        loss = vmap(ops.entropy_loss)(zz).sum()
        assert counter.take()[0] == ["_entropy_fwd_kernel"]
        torch.autograd.grad(loss, zz)
        assert counter.take()[0] == ["_entropy_bwd_kernel"]
        vmap(ops.entropy_stats, in_dims=(0, None))(z, 0.2)
        assert counter.take()[0] == ["_entropy_fwd_kernel", "_sample_stats_kernel"]
        xx = x.clone().requires_grad_(True)
        counter.take()
        masked = vmap(lambda a, g: ops.apply_patch_mask(a, g, patch_size=16))(xx, grid)
        assert counter.take()[0] == ["_apply_patch_mask_kernel"]
        torch.autograd.grad(masked.sum(), xx)
        assert counter.take()[0] == ["_apply_patch_mask_kernel"]
        rec = vmap(lambda a, g: ops.masked_reconstruction_loss(a, x[0], g, patch_size=16))(xx, grid).sum()
        assert counter.take()[0] == ["_masked_sse_kernel"] * V
        torch.autograd.grad(rec, xx)
        assert counter.take()[0] == ["_masked_sse_bwd_kernel"] * V
