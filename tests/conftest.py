"""Shared fixtures; the helpers live in the support_* modules by job and are re-exported here, so
``from conftest import X`` keeps working: support_models (TinyDet, adapters, each method's case),
support_parity (reference comparisons), support_interpreter (Triton's interpreter), support_engines
(update-engine helpers), support_reads (host reads per step), support_capture (CUDA graphs'
stand-in)."""
from __future__ import annotations

import pytest
import torch

from support_models import (  # noqa: F401 (re-exported)
    LoRALinear, TinyDet, ListAdapter, make_model, make_batches, METHOD_CONFIGS, method_config, method_case,
)
from support_parity import (  # noqa: F401 (re-exported)
    run_both, EXACT_FIELDS, assert_reports_match, assert_models_match, check_parity,
    assert_raises_like_reference, assert_bfloat16_tracks_reference, max_prediction_diff,
)
from support_interpreter import (  # noqa: F401 (re-exported)
    UNDER_INTERPRETER, skip_under_interpreter, only_under_interpreter, assert_triton_engine_runs,
    triton_interpreter_problem, run_under_interpreter,
)
from support_engines import (  # noqa: F401 (re-exported)
    engine_stats, expected_restore_mask, torch_reference_norms, same_float, non_finite_update_inputs,
)
from support_reads import (  # noqa: F401 (re-exported)
    HOST_READS_PER_CAPTURED_STEP, HOST_READS_PER_SKIPPED_STEP, HOST_READS_PER_STEP, HostReads,
)
from support_capture import LaunchLog, ReplayedCalls  # noqa: F401 (re-exported)


@pytest.fixture
def tiny_model() -> TinyDet:
    return make_model()

@pytest.fixture
def batches() -> list[torch.Tensor]:
    return make_batches()

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

@pytest.fixture
def replayed(monkeypatch):
    """Graph mode on a CPU arena: captured steps through ReplayedCalls (strict: every replay runs
    the launches its capture ran), the update alone eagerly; the list of the ReplayedCalls made."""
    from yolozu_ttt import capture
    from yolozu_ttt.engine import UpdateEngine

    made: list[ReplayedCalls] = []

    def graphs(device):
        made.append(ReplayedCalls(strict=True))
        return made[-1]

    monkeypatch.setattr(capture, "CudaGraphs", graphs)
    monkeypatch.setattr(UpdateEngine, "_graph_possible", lambda self: True)
    monkeypatch.setattr(UpdateEngine, "_graph_run", lambda self, launch: launch.run())
    return made


@pytest.fixture
def deterministic_cudnn():
    """cuDNN picks deterministic kernels, so two runs (backends, modes) see the same forward/backward numbers."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread here and in every subprocess started meanwhile (``OMP_NUM_THREADS=1``), for
    byte-for-byte comparisons with YOLOZU's own CLI.

    With two threads YOLOZU's own export is not reproducible on an AVX-512 CPU: about one process in
    ten gets eval-forward outputs ~1e-6 off the others' (the same command run 16 times gives two
    different files; with one thread every run gives the same bytes), so a byte comparison of two
    two-thread processes fails by chance whatever the code under test does."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
