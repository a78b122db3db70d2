"""Shared fixtures: small detectors with every kind of normalisation, a list adapter, report checks."""
from __future__ import annotations

import copy
import functools
import math
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn


class LoRALinear(nn.Module):
    """A linear layer with a low-rank adapter (selected by lora_only / adapter_only)."""

    def __init__(self, dim: int, rank: int = 2):
        super().__init__()
        self.base = nn.Linear(dim, dim)
        self.lora_a = nn.Linear(dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


class TinyDet(nn.Module):
    """Conv+BN, conv+GN, a LoRA block and a LayerNorm'd query head: a detector in miniature.

    Convolutions feeding a norm carry no bias (a bias a norm cancels has a pure-noise gradient
    that Adam amplifies, which no float implementation can match).
    """

    def __init__(self, queries: int = 6, classes: int = 7, width: int = 16):
        super().__init__()
        self.queries, self.classes = queries, classes
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, width, 3, padding=1, stride=2, bias=False)
        self.gn = nn.GroupNorm(4, width)
        self.lora = LoRALinear(width)
        self.head = nn.Linear(width, queries * classes)
        self.ln = nn.LayerNorm(classes)
        self.box = nn.Linear(width, queries * 4)
        self.depth_head = nn.Linear(width, queries)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.gn(self.conv2(h))).mean(dim=(2, 3))
        h = h + torch.tanh(self.lora(h))
        b = h.shape[0]
        logits = self.ln(self.head(h).view(b, self.queries, self.classes)) * 2.0
        return {
            "logits": logits,
            "bbox": torch.sigmoid(self.box(h)).view(b, self.queries, 4),
            "depth": self.depth_head(h).view(b, self.queries, 1),
        }


class ListAdapter:
    """YOLOZU's adapter contract over a fixed list of batches."""

    def __init__(self, model: Any, batches: list[Any]):
        self.model = model
        self.batches = batches

    def get_model(self) -> Any:
        return self.model

    def build_loader(self, records, *, batch_size: int = 1):
        yield from self.batches


def make_model(seed: int = 0, **kwargs: Any) -> TinyDet:
    torch.manual_seed(seed)
    return TinyDet(**kwargs)


def make_batches(n: int = 2, seed: int = 1, shape=(2, 3, 12, 12)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def run_both(model: nn.Module, batches: list[Any], config: Any):
    """Run the reference and the fast backend on identical copies; return both models and reports."""
    from yolozu.tta.integration import run_ttt as reference_run_ttt

    import yolozu_ttt

    ref_model, fast_model = copy.deepcopy(model), copy.deepcopy(model)
    ref = reference_run_ttt(ListAdapter(ref_model, batches), [], config=config)
    fast = yolozu_ttt.run_ttt(ListAdapter(fast_model, batches), [], config=config)
    return ref_model, ref, fast_model, fast


EXACT_FIELDS = (
    "enabled", "method", "reset", "steps_requested", "steps_run", "batches_used", "updated_param_count",
    "warnings", "stopped_early", "stop_reason", "method_profile", "forward_calls", "backward_calls",
    "optimizer_steps", "update_ratio", "abstained_steps", "abstention_ratio",
)


def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
    return a == b


def assert_reports_match(ref: Any, fast: Any, *, rtol: float = 1e-4, atol: float = 1e-6,
                         same_device: bool = True) -> None:
    """Same report contract: exact fields equal, floats within tolerance, same step-entry keys
    (and the same memory-report keys, unless the two runs were on different devices)."""
    for name in EXACT_FIELDS:
        assert getattr(fast, name) == getattr(ref, name), name
    assert _close(ref.losses, fast.losses, rtol, atol), (ref.losses, fast.losses)
    assert _close(ref.mask_ratio, fast.mask_ratio, rtol, atol)
    assert len(ref.step_metrics) == len(fast.step_metrics)
    for r, f in zip(ref.step_metrics, fast.step_metrics):
        assert list(r.keys()) == list(f.keys()), (list(r.keys()), list(f.keys()))
        for key in r:
            assert _close(r[key], f[key], rtol, atol), (key, r[key], f[key])
    if same_device:
        assert (ref.memory or {}).keys() == (fast.memory or {}).keys()
    assert ref.to_dict().keys() == fast.to_dict().keys()


def assert_models_match(ref_model: nn.Module, fast_model: nn.Module, *, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Parameters and buffers equal within tolerance (NaN where the reference has NaN)."""
    ref_state, fast_state = ref_model.state_dict(), fast_model.state_dict()
    assert ref_state.keys() == fast_state.keys()
    for name, value in ref_state.items():
        other = fast_state[name]
        assert other.dtype == value.dtype and other.shape == value.shape, name
        torch.testing.assert_close(other, value, rtol=rtol, atol=atol, equal_nan=True, msg=name)
    assert [p.requires_grad for p in ref_model.parameters()] == [p.requires_grad for p in fast_model.parameters()]
    assert ref_model.training == fast_model.training


def check_parity(model: nn.Module, batches: list[Any], config: Any):
    """Run both backends; the reports and the models must match. Returns (ref report, fast report, fast model)."""
    ref_model, ref, fast_model, fast = run_both(model, batches, config)
    assert_reports_match(ref, fast)
    assert_models_match(ref_model, fast_model)
    return ref, fast, fast_model


def assert_raises_like_reference(model: nn.Module, batches: list[Any], config: Any) -> None:
    """Bad input: YOLOZU's exception type and message; the model keeps its flags and gets no grads."""
    from yolozu.tta.integration import run_ttt as reference_run_ttt

    import yolozu_ttt

    with pytest.raises(Exception) as ref_exc:
        reference_run_ttt(ListAdapter(copy.deepcopy(model), batches), [], config=config)
    fast_model = copy.deepcopy(model)
    flags = [p.requires_grad for p in fast_model.parameters()]
    with pytest.raises(type(ref_exc.value)) as fast_exc:
        yolozu_ttt.run_ttt(ListAdapter(fast_model, batches), [], config=config)
    assert str(fast_exc.value) == str(ref_exc.value)
    assert [p.requires_grad for p in fast_model.parameters()] == flags
    assert all(p.grad is None for p in fast_model.parameters())


def assert_bfloat16_tracks_reference(config: Any) -> None:
    """bf16 parameters: same steps, first loss within 1%, final weights within a few bf16 ulps
    (our Adam keeps fp32 moments where the reference keeps bf16 ones)."""
    model = make_model().to(torch.bfloat16)
    batches = [b.to(torch.bfloat16) for b in make_batches()]
    ref_model, ref, fast_model, fast = run_both(model, batches, config)
    assert fast.steps_run == ref.steps_run == 3
    assert fast.losses[0] == pytest.approx(ref.losses[0], rel=1e-2)
    for a, b in zip(ref_model.parameters(), fast_model.parameters()):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


@pytest.fixture
def tiny_model() -> TinyDet:
    return make_model()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    return make_batches()


UNDER_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
skip_under_interpreter = pytest.mark.skipif(UNDER_INTERPRETER, reason="already under the interpreter")
only_under_interpreter = pytest.mark.skipif(not UNDER_INTERPRETER, reason="runs inside the interpreter subprocess")


def assert_triton_engine_runs() -> None:
    """Under the interpreter, a CPU arena's update engine is Triton's."""
    from yolozu_ttt.arena import ParamArena
    from yolozu_ttt.engine import backend_module

    model = make_model()
    with ParamArena(model, [model.bn.weight]) as arena:
        assert arena.backend == "triton" and backend_module(arena.backend).__name__.endswith("kernels.update")


_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def k(x_ptr, n, out_ptr, R: tl.constexpr):
    acc = tl.zeros([R], dtype=tl.float32)
    for i in range(0, n, R):
        idx = i + tl.arange(0, R)
        acc += tl.load(x_ptr + idx, mask=idx < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))
out = torch.zeros(1)
k[(1,)](torch.ones(40), 40, out, R=16)
assert out.item() == 40.0
"""


@functools.lru_cache(maxsize=None)
def triton_interpreter_problem() -> str | None:
    """Why the installed Triton's interpreter cannot run our kernels, or None when it can.

    Triton 3.6's interpreter with NumPy 2 fails on any loop to a runtime bound ("only
    0-dimensional arrays can be converted to Python scalars"); the compiled kernels are unaffected.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return f"this Triton's interpreter cannot run a loop to a runtime bound: {last[:200]}"


def run_under_interpreter(*pytest_args: str) -> None:
    """Run the selected tests again with TRITON_INTERPRET=1 (set before triton is imported, hence a
    subprocess): the GPU code path, Triton kernels in the interpreter on CPU tensors."""
    problem = triton_interpreter_problem()
    if problem:
        pytest.skip(problem)
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def engine_stats(fn: Any, groups: list, *args: Any, keys: tuple[str, ...], device: Any = "cpu",
                 **kwargs: Any) -> dict[str, float]:
    """Call an update engine's ``fn(groups, out, *args, **kwargs)`` (``fused_step``, ``grad_stats`` or
    ``sar_perturb`` of ``yolozu_ttt._C`` or ``yolozu_ttt.kernels.update``) with a fresh float64 ``out``
    of NaNs on ``device`` (a slot the call does not write stays NaN) and return what it wrote by
    name; ``keys`` is the call's layout in ``yolozu_ttt.common``."""
    out = torch.full((len(keys),), float("nan"), dtype=torch.float64, device=device)
    fn(groups, out, *args, **kwargs)
    return dict(zip(keys, out.tolist()))


def expected_restore_mask(n: int, prob: float, seed: int, counter: int, group: int = 0) -> torch.Tensor:
    """CoTTA's documented restore draws, ported to numpy: element j of arena group ``group`` goes back
    to its base where ``(fmix32(j ^ restore_key(seed, counter, group)) >> 8) * 2^-24 < prob``."""
    import numpy as np

    import yolozu_ttt._C as C

    key = np.uint32(C.restore_key(seed, counter, group))
    with np.errstate(over="ignore"):
        h = np.arange(n, dtype=np.uint64).astype(np.uint32) ^ key
        for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
            h = (h ^ (h >> np.uint32(shift))) * np.uint32(mul)
        h = h ^ (h >> np.uint32(16))
    return torch.from_numpy((h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24) < np.float32(prob))


def torch_reference_norms(values: list[torch.Tensor], grads: list[torch.Tensor], lr: float,
                          steps: int) -> tuple[list[tuple[float, float]], list[torch.Tensor]]:
    """The reference's steps: torch.optim.Adam on copies of ``values`` (the same ``grads`` every step),
    then YOLOZU's fp32 norms of p_new - p_old and p_new - base; per step (update_norm,
    total_update_norm), and the final parameters."""
    from yolozu.tta import integration as ref

    params = [v.clone().requires_grad_(True) for v in values]
    base = ref._snapshot_params(params)
    opt = torch.optim.Adam(params, lr=lr)
    norms = []
    for _ in range(steps):
        pre = ref._snapshot_params(params)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        norms.append((ref._global_l2_update_norm(pre), ref._global_l2_update_norm(base)))
    return norms, [p.detach() for p in params]


def same_float(a: float, b: float) -> bool:
    """NaN is NaN, inf is the same inf, finite values within 1e-5."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b if math.isinf(a) or math.isinf(b) else a == pytest.approx(b, rel=1e-5)


def non_finite_update_inputs(first: str, sizes: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Seeded (values, grads) of one segment per size for the non-finite update-norm tests: with
    ``first == "nan"`` two grads are 0, so at ``lr = inf`` the update holds inf * 0 (a NaN); else
    every element moves by a non-zero step."""
    g = torch.Generator().manual_seed(17)
    values = [torch.randn(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g) for n in sizes]
    if first == "nan":
        grads[0][2] = 0.0
        grads[-1][100] = 0.0
    return values, grads


@pytest.fixture
def fast_backend_calls(monkeypatch) -> list[list[dict]]:
    """The records of every ``run_ttt`` call YOLOZU makes through the CLI's fast backend, in order."""
    from yolozu_ttt import cli

    calls: list[list[dict]] = []
    real_call = cli.FastBackend.__call__

    def spy(self, adapter, records, *, config):
        calls.append(list(records))
        return real_call(self, adapter, records, config=config)

    monkeypatch.setattr(cli.FastBackend, "__call__", spy)
    return calls


def max_prediction_diff(a: list[dict], b: list[dict]) -> float:
    """Largest |score| / |box| difference of two exports' predictions; the image lists, detection
    counts and classes must agree exactly."""
    assert [e["image"] for e in a] == [e["image"] for e in b]
    worst = 0.0
    for ea, eb in zip(a, b):
        assert len(ea["detections"]) == len(eb["detections"])
        for da, db in zip(ea["detections"], eb["detections"]):
            assert da["class_id"] == db["class_id"]
            worst = max(worst, abs(float(da["score"]) - float(db["score"])),
                        *(abs(float(da["bbox"][k]) - float(db["bbox"][k])) for k in ("cx", "cy", "w", "h")))
    return worst


#: host reads per step of each method (what would sync with a GPU): the engine's one read, which
#: brings back the method's scalars with the stats (README difference 12)
HOST_READS_PER_STEP = dict.fromkeys(("tent", "eata", "sar", "cotta", "mim"), 1)


class HostReads:
    """Counts, inside ``with``, what would make the host wait for a GPU: the operations
    ``yolozu_ttt.capture.SyncProbe`` flags, plus each ``Tensor.tolist``/``Tensor.numpy`` (on the
    CPU these read memory directly, so the probe cannot see them). ``count`` after the block."""

    def __init__(self) -> None:
        from yolozu_ttt.capture import SyncProbe

        self.probe = SyncProbe()
        self.reads = 0
        self.count = 0

    def __enter__(self) -> "HostReads":
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, self._counted(original))
        self.probe.__enter__()
        return self

    def _counted(self, original):
        def read(t, *args, **kwargs):
            self.reads += 1
            return original(t, *args, **kwargs)

        return read

    def __exit__(self, *exc) -> None:
        self.probe.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self.count = self.reads + sum(self.probe.hits.values())


@pytest.fixture
def deterministic_cudnn():
    """cuDNN picks deterministic kernels, so two runs (backends, modes) see the same forward/backward numbers."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


#: one small case per method (TinyDet; MIM: test_methods_mim's ReconNet), for the checks every method takes
METHOD_CONFIGS = {
    "tent": dict(method="tent"),
    "eata": dict(method="eata", eata_conf_min=0.0, eata_entropy_min=0.0, eata_entropy_max=100.0),
    "sar": dict(method="sar"),
    "cotta": dict(method="cotta", cotta_restore_prob=0.01),
    "mim": dict(method="mim"),
}


def method_config(method: str, **kw: Any) -> Any:
    """``METHOD_CONFIGS[method]`` as a TTTConfig: 3 steps over 2 batches, lr 1e-2, clip 1.0, then ``kw``."""
    from yolozu.tta.config import TTTConfig

    base = dict(enabled=True, steps=3, max_batches=2, lr=1e-2, max_grad_norm=1.0, **METHOD_CONFIGS[method])
    base.update(kw)
    return TTTConfig(**base)


def method_case(method: str, device: Any = "cpu") -> tuple[nn.Module, list[torch.Tensor]]:
    """The model and batches of ``method``'s small case, on ``device``."""
    if method == "mim":
        from test_methods_mim import ReconNet

        torch.manual_seed(0)
        model, batches = ReconNet("recon"), make_batches(2, shape=(2, 3, 32, 32))
    else:
        model, batches = make_model(), make_batches()
    return model.to(device), [b.to(device) for b in batches]
