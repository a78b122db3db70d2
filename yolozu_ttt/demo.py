"""``yolozu-ttt demo``: reference vs fast TTT on the builtin RT-DETR, offline.

One synthetic labeled dataset (``yolozu.demos.labeled_dataset``), one initial set of
weights (``RTDETRPoseAdapter(config_path="builtin:base", init_seed=0)``; for MIM the same config
with ``enable_mim`` on, so the structured branch runs), and the same
``TTTConfig`` run through ``yolozu.tta.integration.run_ttt`` (reference) and
``yolozu_ttt.run_ttt`` (fast), each on a fresh adapter loaded with a copy of the same
initial ``state_dict``. Writes ``summary.json`` and PNG plots to the run dir.

Timing: before the timed runs, each backend does ``warmup_steps`` untimed steps on a
throw-away model (first-call costs of autograd, the allocator and thread pools would
otherwise land on whichever backend runs first). Per-step seconds come from a forward
pre-hook on the model: a step lasts from its first forward to the next step's first
forward (the last one to ``run_ttt``'s return). The progress bar (tqdm) counts steps
over all phases (warm-up and timed, both backends) and is driven by the same hook: it
advances when the next step starts, and at a phase's end, so it counts finished steps.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/yolozu_ttt_demo",
    "method": "tent",
    "steps": 3,
    "device": "cpu",
    "update_filter": "norm_only",
    "images": 4,
    "image_size": 320,
    "lr": 1e-4,
    "seed": 0,
    "warmup_steps": 1,
}
BACKENDS = ("reference", "fast")
MAX_IMAGES = 8  # the synthetic sample has 4 train + 4 val images


class DemoError(RuntimeError):
    """A demo input problem, reported without a traceback."""


def _backend_fn(name: str) -> Callable[..., Any]:
    if name == "reference":
        from yolozu.tta.integration import run_ttt

        return run_ttt
    import yolozu_ttt

    return yolozu_ttt.run_ttt


def prepare_dataset(run_dir: Path, seed: int) -> Path:
    """The synthetic labeled sample under ``run_dir/dataset`` (created once, then reused)."""
    root = run_dir / "dataset"
    if (root / "sample_manifest.json").is_file():
        return root
    if root.exists():
        raise DemoError(f"{root} exists but is not a yolozu demo dataset (no sample_manifest.json)")
    from yolozu.demos.labeled_dataset import generate_labeled_sample

    run_dir.mkdir(parents=True, exist_ok=True)
    generate_labeled_sample(run_dir=root, seed=int(seed))
    return root


def load_records(dataset: Path, images: int) -> list[dict[str, Any]]:
    from yolozu.dataset import build_manifest

    records: list[dict[str, Any]] = []
    for split in ("val", "train"):
        records.extend(build_manifest(dataset, split=split)["images"])
    return records[:images]


def model_config_path(run_dir: Path, method: str) -> str:
    """``builtin:base``; for MIM that config with ``enable_mim`` on, written into ``run_dir``, so the
    structured MIM branch runs (YOLOZU's plain branch needs a model that outputs a reconstruction
    of its input, which the detector does not)."""
    if str(method) != "mim":
        return "builtin:base"
    import importlib.resources

    data = json.loads(importlib.resources.files("rtdetr_pose").joinpath("configs/base.json").read_text(encoding="utf-8"))
    data.setdefault("model", {})["enable_mim"] = True
    path = run_dir / "rtdetr_base_mim.json"
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return str(path)


def _new_adapter(device: str, image_size: int, initial_state: dict[str, Any] | None, config_path: str):
    from yolozu.inference.adapter import RTDETRPoseAdapter

    adapter = RTDETRPoseAdapter(
        config_path=config_path, init_seed=0, device=device, image_size=(image_size, image_size)
    )
    model = adapter.get_model()
    if initial_state is not None:
        model.load_state_dict(initial_state)
    return adapter, model


class _StepClock:
    """Forward pre-hook: timestamps each forward call and advances the progress bar."""

    def __init__(self, model: Any, bar: Any, cap: int, device: str):
        import torch

        self.times: list[float] = []
        self.bar = bar
        self.cap = cap
        self._sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
        self._handle = model.register_forward_pre_hook(self._hook)

    def __deepcopy__(self, memo: dict) -> "_StepClock":
        """Copies of the model (CoTTA's teacher) get a hook that records nothing and holds no
        progress bar (a tqdm bar cannot be deep-copied: it holds the terminal's stream)."""
        clone = object.__new__(type(self))
        clone.times, clone.bar, clone.cap, clone._sync, clone._handle = [], None, 0, None, None
        return clone

    def _hook(self, _module: Any, _inputs: Any) -> None:
        if self._sync is not None:
            self._sync()
        self.times.append(time.perf_counter())
        # a new forward means the previous step finished; the phase's last step is
        # counted by the caller when run_ttt returns
        if self.bar is not None and 1 < len(self.times) <= self.cap:
            self.bar.update(1)

    def stop(self) -> float:
        if self._sync is not None:
            self._sync()
        end = time.perf_counter()
        self._handle.remove()
        return end


def _step_seconds(forward_times: list[float], end: float, n_steps: int, total: float) -> tuple[list[float], str]:
    """Per-step wall time; grouped forward timestamps when they divide evenly, else an even split."""
    n_fwd = len(forward_times)
    if n_steps > 0 and n_fwd >= n_steps and n_fwd % n_steps == 0:
        per = n_fwd // n_steps
        starts = forward_times[::per] + [end]
        return [float(b - a) for a, b in zip(starts, starts[1:])], "forward_hook"
    if n_steps <= 0:
        return [], "none"
    return [float(total) / n_steps] * n_steps, "report_seconds_even_split"


def _param_copy(model: Any) -> dict[str, Any]:
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def _buffer_copy(model: Any) -> dict[str, Any]:
    return {name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers() if b is not None}


def _max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    worst = 0.0
    for name, ta in a.items():
        tb = b.get(name)
        if tb is None or tb.shape != ta.shape:
            return math.inf
        if ta.numel() == 0:
            continue
        if not ta.is_floating_point():
            worst = max(worst, float((ta != tb).any()))
            continue
        worst = max(worst, float((ta.double() - tb.double()).abs().max()))
    return worst


def _run_backend(
    name: str,
    *,
    records: list[dict[str, Any]],
    config: Any,
    device: str,
    image_size: int,
    initial_state: dict[str, Any],
    config_path: str,
    seed: int,
    bar: Any,
    cap: int,
) -> dict[str, Any]:
    import torch

    fn = _backend_fn(name)
    adapter, model = _new_adapter(device, image_size, initial_state, config_path)
    clock = _StepClock(model, bar, cap, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        start = time.perf_counter()
        try:
            report = fn(adapter, records, config=config)
        finally:
            end = clock.stop()
    wall = end - start
    metrics = list(report.step_metrics or [])
    n_steps = len(metrics) if metrics else len(report.losses)
    step_seconds, timing_source = _step_seconds(clock.times, end, n_steps, float(report.seconds))
    return {
        "report": report.to_dict(),
        "losses": [float(v) for v in (m.get("loss") for m in metrics) if v is not None] or list(report.losses),
        "update_norms": [float(m.get("update_norm") or 0.0) for m in metrics],
        "step_seconds": step_seconds,
        "seconds_per_step": (sum(step_seconds) / len(step_seconds)) if step_seconds else None,
        "wall_seconds": float(wall),
        "timing_source": timing_source,
        "forward_calls_seen": len(clock.times),
        "params": _param_copy(model),
        "buffers": _buffer_copy(model),
    }


def _plot(run_dir: Path, results: dict[str, dict[str, Any]], title: str) -> dict[str, str]:
    from matplotlib.figure import Figure  # no pyplot: no global backend state; renders with Agg
    from matplotlib.ticker import MaxNLocator

    files: dict[str, str] = {}
    styles = {"reference": {"marker": "o", "linestyle": "-"}, "fast": {"marker": "x", "linestyle": "--"}}
    for key, field, ylabel, filename in (
        ("loss_plot", "losses", "loss", "loss_per_step.png"),
        ("update_norm_plot", "update_norms", "update L2 norm", "update_norm_per_step.png"),
    ):
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        for backend in BACKENDS:
            values = results[backend][field]
            ax.plot(range(1, len(values) + 1), values, label=backend, **styles[backend])
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per step - {title}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = run_dir / filename
        fig.savefig(path, format="png")
        files[key] = str(path)

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    width = 0.4
    for i, backend in enumerate(BACKENDS):
        secs = results[backend]["step_seconds"]
        ax.bar([s + 1 + (i - 0.5) * width for s in range(len(secs))], secs, width=width, label=backend)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("seconds")
    ax.set_title(f"time per step - {title}")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "time_per_step.png"
    fig.savefig(path, format="png")
    files["time_plot"] = str(path)
    return files


def run_demo(
    *,
    run_dir: str | Path = DEFAULTS["run_dir"],
    method: str = DEFAULTS["method"],
    steps: int = DEFAULTS["steps"],
    device: str = DEFAULTS["device"],
    update_filter: str = DEFAULTS["update_filter"],
    images: int = DEFAULTS["images"],
    image_size: int = DEFAULTS["image_size"],
    lr: float = DEFAULTS["lr"],
    seed: int = DEFAULTS["seed"],
    warmup_steps: int = DEFAULTS["warmup_steps"],
    progress: bool = True,
) -> dict[str, Any]:
    """Run the comparison, write ``summary.json`` and the plots, return the summary."""
    if int(steps) < 1:
        raise DemoError("--steps must be >= 1")
    if not 1 <= int(images) <= MAX_IMAGES:
        raise DemoError(f"--images must be within [1, {MAX_IMAGES}]")
    if int(image_size) < 32:
        raise DemoError("--image-size must be >= 32")
    if int(warmup_steps) < 0:
        raise DemoError("--warmup-steps must be >= 0")

    from tqdm import tqdm
    from yolozu.tta.config import TTTConfig

    from . import build_info

    run_dir = Path(run_dir)
    dataset = prepare_dataset(run_dir, seed)
    records = load_records(dataset, int(images))
    config = TTTConfig(
        enabled=True,
        method=str(method),
        reset="stream",
        steps=int(steps),
        batch_size=len(records),  # every image in the one TTT batch
        max_batches=1,
        lr=float(lr),
        update_filter=str(update_filter),
        seed=int(seed),
    )
    config_path = model_config_path(run_dir, str(method))
    _, model0 = _new_adapter(device, int(image_size), None, config_path)
    initial_state = {k: v.detach().clone() for k, v in model0.state_dict().items()}
    del model0

    phases: list[tuple[str, str, int]] = []
    if int(warmup_steps) > 0:
        phases += [(f"warm-up {b}", b, int(warmup_steps)) for b in BACKENDS]
    phases += [(b, b, int(steps)) for b in BACKENDS]
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=sum(n for _, _, n in phases), unit="step", desc="TTT", disable=not progress, dynamic_ncols=True) as bar:
        done = 0
        for label, backend, n in phases:
            bar.set_description(label)
            phase_config = _replace(config, steps=n) if label.startswith("warm-up") else config
            try:
                out = _run_backend(
                    backend,
                    records=records,
                    config=phase_config,
                    device=device,
                    image_size=int(image_size),
                    initial_state=initial_state,
                    config_path=config_path,
                    seed=int(seed),
                    bar=bar,
                    cap=n,
                )
            except ImportError as exc:
                raise DemoError(f"{backend} backend unavailable: {exc}") from exc
            done += n
            bar.n = done
            if out["losses"]:
                bar.set_postfix(loss=f"{out['losses'][-1]:.6g}")
            bar.refresh()
            if not label.startswith("warm-up"):
                results[backend] = out

    ref, fast = results["reference"], results["fast"]
    n_common = min(len(ref["losses"]), len(fast["losses"]))
    max_dloss = max((abs(a - b) for a, b in zip(ref["losses"], fast["losses"])), default=0.0)
    speedup = (
        ref["seconds_per_step"] / fast["seconds_per_step"]
        if ref["seconds_per_step"] and fast["seconds_per_step"]
        else None
    )
    comparison = {
        "speedup": speedup,
        "max_abs_loss_diff": float(max_dloss),
        "max_abs_param_diff": _max_abs_diff(ref["params"], fast["params"]),
        "max_abs_buffer_diff": _max_abs_diff(ref["buffers"], fast["buffers"]),
        "steps_compared": int(n_common),
        "steps_run": {b: int(results[b]["report"]["steps_run"]) for b in BACKENDS},
    }
    title = f"{method}/{update_filter}, {len(records)} img @ {image_size}px"
    files = _plot(run_dir, results, title)
    summary_path = run_dir / "summary.json"
    files = {"summary": str(summary_path), **files}

    try:
        import yolozu

        yolozu_version = getattr(yolozu, "__version__", None)
    except Exception:  # pragma: no cover
        yolozu_version = None
    summary: dict[str, Any] = {
        "config": {
            "method": str(method),
            "update_filter": str(update_filter),
            "steps": int(steps),
            "lr": float(lr),
            "seed": int(seed),
            "device": str(device),
            "images": len(records),
            "image_size": int(image_size),
            "batch_size": len(records),
            "warmup_steps": int(warmup_steps),
            "model": {"adapter": "RTDETRPoseAdapter", "config_path": config_path, "init_seed": 0},
        },
        "dataset": {"root": str(dataset), "images": [str(r.get("image")) for r in records]},
        "engine": build_info(),
        "yolozu_version": yolozu_version,
        "backends": {
            b: {k: v for k, v in results[b].items() if k not in ("params", "buffers")} for b in BACKENDS
        },
        "comparison": comparison,
        "files": files,
    }
    summary_path.write_text(json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def _replace(config: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(config, **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def format_table(summary: dict[str, Any]) -> str:
    """The stdout table: seconds per step, speedup, max |d loss|, max |d parameter|."""
    cfg, cmp_ = summary["config"], summary["comparison"]
    b = summary["backends"]
    rows = [
        ("backend", "s/step", "steps", "final loss"),
        *[
            (
                name,
                _fmt(b[name]["seconds_per_step"], ".4f"),
                str(b[name]["report"]["steps_run"]),
                _fmt(b[name]["losses"][-1] if b[name]["losses"] else None, ".6g"),
            )
            for name in BACKENDS
        ],
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"yolozu-ttt demo: {cfg['method']} ({cfg['update_filter']}), {cfg['steps']} steps, "
        f"{cfg['images']} image(s) @ {cfg['image_size']}x{cfg['image_size']}, device {cfg['device']}",
    ]
    sep = "  ".join("-" * w for w in widths)
    lines.append("  ".join(c.ljust(w) for c, w in zip(rows[0], widths)))
    lines.append(sep)
    for r in rows[1:]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    lines.append(sep)
    lines.append(f"speedup (reference s/step / fast s/step): {_fmt(cmp_['speedup'], '.2f')}x")
    lines.append(f"max |delta loss|      : {_fmt(cmp_['max_abs_loss_diff'], '.3e')}")
    lines.append(f"max |delta parameter| : {_fmt(cmp_['max_abs_param_diff'], '.3e')}")
    return "\n".join(lines)
