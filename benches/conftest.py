"""Bench helpers: the builtin RT-DETR's parameter sizes and a reference/fast ratio summary."""
from __future__ import annotations

import functools
import os
import platform

import pytest
import torch

from yolozu_ttt.floor import FixedAdapter, tent_floor_run  # noqa: F401  (the benches' floor is the demo's)


@functools.lru_cache(maxsize=None)
def rtdetr_param_sizes(update_filter: str = "all") -> tuple[int, ...]:
    """Numels of the builtin RT-DETR's selected parameters (9.86M for all, 16k for norm_only)."""
    from yolozu.inference.adapter import RTDETRPoseAdapter
    from yolozu.tta.ttt_mim import select_parameters

    model = RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model()
    return tuple(int(p.numel()) for p in select_parameters(model, update_filter=update_filter))


def bench_device() -> torch.device:
    """The end-to-end benches' device: ``YOLOZU_TTT_BENCH_DEVICE`` (default cpu), e.g. ``cuda``."""
    return torch.device(os.environ.get("YOLOZU_TTT_BENCH_DEVICE", "cpu"))


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def peak_memory_growth(run, model, device: torch.device | str) -> tuple[str, float]:
    """``(key, MiB)``: the allocator's peak growth while ``run(copy)`` adapts a fresh deep copy of
    ``model`` (made inside the measurement, its own size subtracted, so memory a backend frees from
    the model's original storages counts as freed).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: every allocation and free that torch's CPU
    allocator makes, summed in time order (``torch.profiler`` with ``profile_memory``): exact, unlike
    the process RSS, which the C library's heap keeps high after frees.
    """
    import copy

    from torch.profiler import ProfilerActivity, profile

    size = _nbytes(model)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        clone = copy.deepcopy(model)
        run(clone)
        del clone
        torch.cuda.synchronize()
        return "peak_cuda_growth_mib", round((torch.cuda.max_memory_allocated() - start - size) / 2**20, 1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        clone = copy.deepcopy(model)
        run(clone)
        del clone
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return "peak_cpu_growth_mib", round((peak - size) / 2**20, 1)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print mean(reference) / mean(fast) for every group that has both providers, and the ratio of
    the fastest rounds (load on a shared machine only ever adds time, so mins are the steadier
    statistic when a group has few rounds)."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return
    groups: dict[str, dict[str, float]] = {}
    mins: dict[str, dict[str, float]] = {}
    peaks: dict[str, dict[str, float]] = {}
    bandwidth: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        provider = bench.extra_info.get("provider") or (bench.params or {}).get("provider")
        if provider and bench.stats is not None:
            groups.setdefault(bench.group or bench.name, {})[provider] = bench.stats.mean
            mins.setdefault(bench.group or bench.name, {})[provider] = bench.stats.min
            for key in ("peak_cpu_growth_mib", "peak_cuda_growth_mib"):
                if key in bench.extra_info:
                    peaks.setdefault(bench.group or bench.name, {})[provider] = bench.extra_info[key]
            if "GB/s" in bench.extra_info:
                bandwidth.setdefault(bench.group or bench.name, {})[provider] = bench.extra_info["GB/s"]
    rows = [(g, v) for g, v in sorted(groups.items()) if {"reference", "fast"} <= v.keys()]
    if not rows:
        return
    terminalreporter.write_sep("-", f"speed-up reference/fast (means, same run) on {machine()}")
    for group, v in rows:
        m = mins[group]
        line = (f"{group:<56} reference {v['reference'] * 1e3:10.2f} ms  fast {v['fast'] * 1e3:10.2f} ms  "
                f"speed-up {v['reference'] / v['fast']:6.2f}x (mins {m['reference'] / m['fast']:.2f}x)")
        if "floor" in v:
            line += f"  (floor {v['floor'] * 1e3:.2f} ms: reference/floor {v['reference'] / v['floor']:.2f}x, fast/floor {v['fast'] / v['floor']:.2f}x)"
        if group in peaks:
            line += "  peak memory growth MiB " + ", ".join(f"{k} {v}" for k, v in sorted(peaks[group].items()))
        if group in bandwidth:
            line += "  GB/s " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(bandwidth[group].items()))
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _single_rng_state():
    torch.manual_seed(0)
    yield
