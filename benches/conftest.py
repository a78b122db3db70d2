"""Bench helpers: the builtin RT-DETR's parameter sizes and a reference/fast ratio summary."""
from __future__ import annotations

import functools
import platform

import pytest
import torch


@functools.lru_cache(maxsize=None)
def rtdetr_param_sizes(update_filter: str = "all") -> tuple[int, ...]:
    """Numels of the builtin RT-DETR's selected parameters (9.86M for all, 16k for norm_only)."""
    from yolozu.inference.adapter import RTDETRPoseAdapter
    from yolozu.tta.ttt_mim import select_parameters

    model = RTDETRPoseAdapter(config_path="builtin:base", init_seed=0).get_model()
    return tuple(int(p.numel()) for p in select_parameters(model, update_filter=update_filter))


class FixedAdapter:
    """YOLOZU's adapter contract over one fixed batch."""

    def __init__(self, model, batch):
        self.model, self.batch = model, batch

    def get_model(self):
        return self.model

    def build_loader(self, records, *, batch_size=1):
        yield self.batch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print mean(reference) / mean(fast) for every group that has both providers."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return
    groups: dict[str, dict[str, float]] = {}
    peaks: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        provider = bench.extra_info.get("provider") or (bench.params or {}).get("provider")
        if provider and bench.stats is not None:
            groups.setdefault(bench.group or bench.name, {})[provider] = bench.stats.mean
            if "peak_rss_growth_mib" in bench.extra_info:
                peaks.setdefault(bench.group or bench.name, {})[provider] = bench.extra_info["peak_rss_growth_mib"]
    rows = [(g, v) for g, v in sorted(groups.items()) if {"reference", "fast"} <= v.keys()]
    if not rows:
        return
    terminalreporter.write_sep("-", f"speed-up reference/fast (means, same run) on {machine()}")
    for group, v in rows:
        line = f"{group:<56} reference {v['reference'] * 1e3:10.2f} ms  fast {v['fast'] * 1e3:10.2f} ms  speed-up {v['reference'] / v['fast']:6.2f}x"
        if "floor" in v:
            line += f"  (floor {v['floor'] * 1e3:.2f} ms: reference/floor {v['reference'] / v['floor']:.2f}x, fast/floor {v['fast'] / v['floor']:.2f}x)"
        if group in peaks:
            line += "  peak RSS growth MiB " + ", ".join(f"{k} {v}" for k, v in sorted(peaks[group].items()))
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _single_rng_state():
    torch.manual_seed(0)
    yield
