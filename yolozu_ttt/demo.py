"""``yolozu-ttt demo``: reference vs fast TTT on the builtin RT-DETR, offline.

One synthetic labeled dataset (``yolozu.demos.labeled_dataset``), one initial set of
weights (``RTDETRPoseAdapter(config_path="builtin:base", init_seed=0)``; for MIM the same config
with ``enable_mim`` on, so the structured branch runs), and the same
``TTTConfig`` run through ``yolozu.tta.integration.run_ttt`` (reference) and
``yolozu_ttt.run_ttt`` (fast). Writes ``summary.json`` and PNG plots to the run dir.

Default (interleaved) timing, through ``yolozu_ttt.timing`` (the runner ``benches/interleaved.py``
uses too): the batch is loaded once and every provider adapts the same model, reset to the initial
weights before each run, through ``yolozu_ttt.floor.FixedAdapter``. The providers are ``reference``, ``fast``, ``floor`` (Tent's
passes alone, ``yolozu_ttt.floor.tent_floor_run``: what no engine removes; Tent only) and
``fast bf16`` (the fast backend with ``amp="bf16"``). One untimed warm-up round
(``warmup_steps`` steps each) pays the first-call costs, then ``rounds`` timed rounds run every
provider once, in an order that rotates every round (so a burst of load on a shared machine
does not land on one side, and every provider takes every place in the order). Each row is
the median seconds per step over the rounds, with the spread (min-max); the ratios are ratios
of medians; losses and parameters are compared from the first timed round.

``quick=True`` (``--quick``): the earlier single-round form. Before the timed runs, each
backend does ``warmup_steps`` untimed steps on a throw-away model; per-step seconds come from a
forward pre-hook on the model: a step lasts from its first forward to the next step's first
forward (the last one to ``run_ttt``'s return). The progress bar (tqdm) counts steps over all
phases and is driven by the same hook.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .timing import interleave, spreads

DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/yolozu_ttt_demo",
    "method": "tent",
    "steps": 2,
    "device": "cpu",
    "update_filter": "norm_only",
    "images": 2,
    "image_size": 320,
    "lr": 1e-4,
    "seed": 0,
    "warmup_steps": 1,
    "rounds": 3,
}
BACKENDS = ("reference", "fast")
PROVIDERS = ("reference", "fast", "floor", "fast bf16")  # the interleaved table's rows
FLOOR_METHODS = ("tent",)  # the floor measured: Tent's passes (yolozu_ttt.floor)
AT_FLOOR = 1.10  # fast within 10% of the floor reads as "at the floor"
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
    fn = _backend_fn(name)
    adapter, model = _new_adapter(device, image_size, initial_state, config_path)
    clock = _StepClock(model, bar, cap, device)
    with _seeded(seed):
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
        **_report_fields(report),
        "step_seconds": step_seconds,
        "seconds_per_step": (sum(step_seconds) / len(step_seconds)) if step_seconds else None,
        "wall_seconds": float(wall),
        "timing_source": timing_source,
        "forward_calls_seen": len(clock.times),
        **_model_copies(model),
    }


def _report_fields(report: Any) -> dict[str, Any]:
    """A run's report and its per-step figures: the losses (the report's own list when the steps
    carry none) and the update norms."""
    metrics = list(report.step_metrics or [])
    return {
        "report": report.to_dict(),
        "losses": [float(v) for v in (m.get("loss") for m in metrics) if v is not None] or list(report.losses),
        "update_norms": [float(m.get("update_norm") or 0.0) for m in metrics],
    }


def _model_copies(model: Any) -> dict[str, Any]:
    """The adapted parameters and buffers, on the CPU (compared, not written to the summary)."""
    return {"params": _param_copy(model), "buffers": _buffer_copy(model)}


def _plot(run_dir: Path, results: dict[str, dict[str, Any]], title: str,
          timing: dict[str, Any] | None = None) -> dict[str, str]:
    """Loss and update norm per step of every adapting row; time per step (quick: per step of each
    backend; interleaved: each row's median with its min-max spread, and the reading below it)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state; renders with Agg
    from matplotlib.ticker import MaxNLocator

    files: dict[str, str] = {}
    styles = {"reference": {"marker": "o", "linestyle": "-"}, "fast": {"marker": "x", "linestyle": "--"},
              "fast bf16": {"marker": "+", "linestyle": ":"}}
    for key, field, ylabel, filename in (
        ("loss_plot", "losses", "loss", "loss_per_step.png"),
        ("update_norm_plot", "update_norms", "update L2 norm", "update_norm_per_step.png"),
    ):
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        for backend in results:
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

    fig = Figure(figsize=(6, 4.6 if timing else 4), dpi=100)
    ax = fig.subplots()
    if timing is None:
        _draw_step_times(ax, results, title)
    else:
        _draw_round_medians(fig, ax, timing, title)
    ax.set_ylabel("seconds")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0.12, 1, 1) if timing else None)
    path = run_dir / "time_per_step.png"
    fig.savefig(path, format="png")
    files["time_plot"] = str(path)
    return files


def _draw_step_times(ax: Any, results: dict[str, dict[str, Any]], title: str) -> None:
    """Quick: each backend's seconds for each step, side by side."""
    from matplotlib.ticker import MaxNLocator

    width = 0.4
    for i, backend in enumerate(BACKENDS):
        secs = results[backend]["step_seconds"]
        ax.bar([s + 1 + (i - 0.5) * width for s in range(len(secs))], secs, width=width, label=backend)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"time per step - {title}")
    ax.legend()


def _draw_round_medians(fig: Any, ax: Any, timing: dict[str, Any], title: str) -> None:
    """Interleaved: each row's median seconds per step with its min-max spread; the reading below."""
    import textwrap

    rows = timing["rows"]
    names = list(rows)
    med = [rows[n]["median_s_per_step"] for n in names]
    err = [[m - rows[n]["min_s_per_step"] for n, m in zip(names, med)],
           [rows[n]["max_s_per_step"] - m for n, m in zip(names, med)]]
    ax.bar(names, med, yerr=err, capsize=6, color=["C0", "C1", "C7", "C2"][: len(names)])
    ax.set_title(f"s/step: median of {timing['rounds']} interleaved rounds (bars: min-max)\n{title}", fontsize=9)
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(timing["reading"], 110)), fontsize=6.5, va="bottom")


def _check_args(steps: int, images: int, image_size: int, warmup_steps: int, rounds: int) -> None:
    if int(steps) < 1:
        raise DemoError("--steps must be >= 1")
    if not 1 <= int(images) <= MAX_IMAGES:
        raise DemoError(f"--images must be within [1, {MAX_IMAGES}]")
    if int(image_size) < 32:
        raise DemoError("--image-size must be >= 32")
    if int(warmup_steps) < 0:
        raise DemoError("--warmup-steps must be >= 0")
    if int(rounds) < 1:
        raise DemoError("--rounds must be >= 1")


def _quick_rounds(*, records, config, device, image_size, initial_state, config_path, seed, warmup_steps,
                  progress) -> dict[str, dict[str, Any]]:
    """``--quick``: one timed run of each backend (after ``warmup_steps`` on a throw-away model)."""
    from tqdm import tqdm

    phases: list[tuple[str, str, int]] = []
    if int(warmup_steps) > 0:
        phases += [(f"warm-up {b}", b, int(warmup_steps)) for b in BACKENDS]
    phases += [(b, b, int(config.steps)) for b in BACKENDS]
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=sum(n for _, _, n in phases), unit="step", desc="TTT", disable=not progress, dynamic_ncols=True) as bar:
        done = 0
        for label, backend, n in phases:
            bar.set_description(label)
            phase_config = _replace(config, steps=n) if label.startswith("warm-up") else config
            with _unavailable(backend):
                out = _run_backend(backend, records=records, config=phase_config, device=device,
                                   image_size=int(image_size), initial_state=initial_state, config_path=config_path,
                                   seed=int(seed), bar=bar, cap=n)
            done += n
            bar.n = done
            if out["losses"]:
                bar.set_postfix(loss=f"{out['losses'][-1]:.6g}")
            bar.refresh()
            if not label.startswith("warm-up"):
                results[backend] = out
    return results


def _provider_run(provider: str, model: Any, batch: Any, config: Any) -> Callable[[], Any]:
    """One run of ``provider`` on ``model`` over the fixed ``batch``: a TTTReport, or None (floor)."""
    from .floor import FixedAdapter, tent_floor_run

    with _unavailable(provider):
        fn = None if provider == "floor" else _backend_fn("reference" if provider == "reference" else "fast")
    kw = {"amp": "bf16"} if provider == "fast bf16" else {}

    def run() -> Any:
        with _unavailable(provider):
            if fn is None:
                return tent_floor_run(model, batch, config.update_filter, config.steps)
            return fn(FixedAdapter(model, batch), [], config=config, **kw)
    return run


@contextlib.contextmanager
def _unavailable(backend: str) -> Iterator[None]:
    """A backend that cannot be imported is a :class:`DemoError` naming it."""
    try:
        yield
    except ImportError as exc:
        raise DemoError(f"{backend} backend unavailable: {exc}") from exc


def _interleaved_rounds(*, records, config, device, image_size, initial_state, config_path, seed, warmup_steps,
                        rounds, progress) -> tuple[dict[str, dict[str, Any]], dict[str, list[float]]]:
    """Every provider once per round through ``yolozu_ttt.timing.interleave`` (the order rotating
    every round, after one untimed warm-up round of ``warmup_steps`` steps), one model reset to the
    initial weights (eval mode) and the RNG seeded before each run. Returns the adapting rows'
    first timed run (report, losses, update norms, final parameters and buffers) and every
    provider's seconds per step, round by round."""
    import torch
    from tqdm import tqdm

    adapter, model = _new_adapter(device, int(image_size), initial_state, config_path)
    batch = next(iter(adapter.build_loader(records, batch_size=len(records))))
    providers = [p for p in PROVIDERS if p != "floor" or str(config.method) in FLOOR_METHODS]
    warmup = int(warmup_steps) > 0
    first: dict[str, dict[str, Any]] = {}

    def prepare(provider: str, i: int) -> Callable[[], Any]:
        bar.set_description(f"{'warm-up' if i == 0 else f'round {i}/{rounds}'} {provider}")
        run = _provider_run(provider, model, batch, config if i else _replace(config, steps=int(warmup_steps)))
        model.load_state_dict(initial_state)
        model.eval()
        return run

    def done(provider: str, i: int, report: Any, _seconds: float) -> None:
        if i and report is not None and provider not in first:
            first[provider] = {**_report_fields(report), **_model_copies(model)}
        bar.update(1)

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
    total = (int(rounds) + warmup) * len(providers)
    with tqdm(total=total, unit="run", desc="TTT", disable=not progress, dynamic_ncols=True) as bar:
        times = interleave(prepare, providers, int(rounds), warmup=warmup, around=lambda: _seeded(seed),
                           sync=sync, done=done)
    return first, {p: [t / int(config.steps) for t in v] for p, v in times.items()}


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The global RNG seeded with ``seed`` inside, restored after (every run draws alike)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def reading(rows: dict[str, dict[str, Any]], device: str, bf16_loss_diff: float | None) -> str:
    """One sentence that reads the interleaved figures."""
    med = {k: v["median_s_per_step"] for k, v in rows.items()}
    ref, fast = med["reference"], med["fast"]
    parts = [f"fast is {ref / fast:.2f}x the reference"]
    floor = med.get("floor")
    if floor:
        if fast <= AT_FLOOR * floor:
            parts.append(f"it sits at the floor ({fast / floor:.2f}x the passes alone): on this {device} the "
                         "model's own forward and backward are the cost, not the update")
        else:
            parts.append(f"it is {fast / floor:.2f}x the floor (the passes alone): the rest is update and "
                         "bookkeeping the engine still pays")
    bf16 = med.get("fast bf16")
    if bf16:
        diff = f", losses within {bf16_loss_diff:.1e} of fp32's" if bf16_loss_diff is not None else ""
        if bf16 < fast:
            below = "below the floor" if floor and bf16 < floor else "faster"
            parts.append(f"bf16 makes the passes themselves cheaper and goes {below} ({ref / bf16:.2f}x the "
                         f"reference{diff})")
        else:
            parts.append(f"bf16 made nothing cheaper here ({ref / bf16:.2f}x the reference{diff}; it needs a CPU "
                         "with bf16 instructions or a GPU)")
    if floor and ref < floor:
        parts.append("but the reference ran below the floor, which does strictly less work: load on this machine "
                     "moved more than the effect, so rerun with more --rounds on a quieter machine")
    if not str(device).startswith("cuda"):
        parts.append("on a GPU the per-parameter update weighs more against the passes (GPU figures: BENCHMARKS.md)")
    return "; ".join(parts) + "."


def _timing(times: dict[str, list[float]], rounds: int, warmup_steps: int, device: str,
            bf16_loss_diff: float | None) -> dict[str, Any]:
    """The interleaved rounds' figures: each row's median seconds per step, its spread, every
    round's, its ratio to the reference's median; fast over the floor; the reading."""
    rows = {p: {"median_s_per_step": s.median, "min_s_per_step": s.low, "max_s_per_step": s.high,
                "round_s_per_step": list(s.values)} for p, s in spreads(times).items()}
    ref = rows["reference"]["median_s_per_step"]
    for row in rows.values():
        row["speedup_vs_reference"] = ref / row["median_s_per_step"]
    floor = rows.get("floor")
    return {
        "mode": "interleaved",
        "order": "rotating",
        "rounds": int(rounds),
        "warmup_steps": int(warmup_steps),
        "rows": rows,
        "fast_over_floor": rows["fast"]["median_s_per_step"] / floor["median_s_per_step"] if floor else None,
        "reading": reading(rows, device, bf16_loss_diff),
    }


@dataclasses.dataclass
class _Case:
    """What every backend of one demo run shares: the records, the config, the initial weights."""

    dataset: Path
    records: list[dict[str, Any]]
    config: Any
    config_path: str
    initial_state: dict[str, Any]


def _case(run_dir: Path, *, method: str, steps: int, device: str, update_filter: str, images: int,
          image_size: int, lr: float, seed: int) -> _Case:
    from yolozu.tta.config import TTTConfig

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
    return _Case(dataset, records, config, config_path, initial_state)


def _comparison(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Reference vs fast: losses, final parameters and buffers, steps."""
    ref, fast = results["reference"], results["fast"]
    return {
        "max_abs_loss_diff": _max_loss_diff(ref, fast),
        "max_abs_param_diff": _max_abs_diff(ref["params"], fast["params"]),
        "max_abs_buffer_diff": _max_abs_diff(ref["buffers"], fast["buffers"]),
        "steps_compared": min(len(ref["losses"]), len(fast["losses"])),
        "steps_run": {b: int(results[b]["report"]["steps_run"]) for b in results},
    }


def _measure_quick(case: _Case, *, device: str, image_size: int, seed: int, warmup_steps: int, rounds: int,
                   progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any], None]:
    """``--quick``: each backend's one run, timed per step; the speedup is of their mean s/step."""
    results = _quick_rounds(records=case.records, config=case.config, device=device, image_size=image_size,
                            initial_state=case.initial_state, config_path=case.config_path, seed=seed,
                            warmup_steps=warmup_steps, progress=progress)
    ref, fast = results["reference"]["seconds_per_step"], results["fast"]["seconds_per_step"]
    return results, {**_comparison(results), "speedup": ref / fast if ref and fast else None}, None


def _measure_interleaved(case: _Case, *, device: str, image_size: int, seed: int, warmup_steps: int,
                         rounds: int, progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict]:
    """The default: interleaved rounds; every ratio is of medians (a row's s/step is its median)."""
    results, times = _interleaved_rounds(records=case.records, config=case.config, device=device,
                                         image_size=image_size, initial_state=case.initial_state,
                                         config_path=case.config_path, seed=seed, warmup_steps=warmup_steps,
                                         rounds=rounds, progress=progress)
    ref, bf16 = results["reference"], results["fast bf16"]
    comparison = {**_comparison(results), "bf16_max_abs_loss_diff": _max_loss_diff(ref, bf16),
                  "bf16_max_abs_param_diff": _max_abs_diff(ref["params"], bf16["params"])}
    timing = _timing(times, rounds, warmup_steps, device, comparison["bf16_max_abs_loss_diff"])
    rows = timing["rows"]
    comparison.update(speedup=rows["fast"]["speedup_vs_reference"],
                      bf16_speedup=rows["fast bf16"]["speedup_vs_reference"],
                      fast_over_floor=timing["fast_over_floor"])
    for name, out in results.items():
        out["seconds_per_step"] = rows[name]["median_s_per_step"]
    return results, comparison, timing


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
    rounds: int = DEFAULTS["rounds"],
    quick: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the comparison, write ``summary.json`` and the plots, return the summary."""
    _check_args(steps, images, image_size, warmup_steps, rounds)
    run_dir = Path(run_dir)
    case = _case(run_dir, method=method, steps=steps, device=device, update_filter=update_filter, images=images,
                 image_size=image_size, lr=lr, seed=seed)
    measure = _measure_quick if quick else _measure_interleaved
    results, comparison, timing = measure(case, device=str(device), image_size=int(image_size), seed=int(seed),
                                          warmup_steps=int(warmup_steps), rounds=1 if quick else int(rounds),
                                          progress=progress)
    title = f"{method}/{update_filter}, {len(case.records)} img @ {image_size}px"
    summary_path = run_dir / "summary.json"
    files = {"summary": str(summary_path), **_plot(run_dir, results, title, timing)}
    summary = _summary(case, results, comparison, timing, files, steps=steps, lr=lr, seed=seed, device=device,
                       image_size=image_size, warmup_steps=warmup_steps)
    summary_path.write_text(json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def _summary(case: _Case, results: dict[str, dict[str, Any]], comparison: dict[str, Any], timing: dict | None,
             files: dict[str, str], *, steps: int, lr: float, seed: int, device: str, image_size: int,
             warmup_steps: int) -> dict[str, Any]:
    """``summary.json``: the config, the dataset, the build, each backend's run (no tensors), the
    comparison, the files; interleaved: the timing."""
    from . import build_info

    try:
        import yolozu

        yolozu_version = getattr(yolozu, "__version__", None)
    except Exception:  # pragma: no cover
        yolozu_version = None
    summary: dict[str, Any] = {
        "config": {
            "method": str(case.config.method),
            "update_filter": str(case.config.update_filter),
            "steps": int(steps),
            "lr": float(lr),
            "seed": int(seed),
            "device": str(device),
            "images": len(case.records),
            "image_size": int(image_size),
            "batch_size": len(case.records),
            "warmup_steps": int(warmup_steps),
            "mode": "quick" if timing is None else "interleaved",
            "rounds": 1 if timing is None else timing["rounds"],
            "model": {"adapter": "RTDETRPoseAdapter", "config_path": case.config_path, "init_seed": 0},
        },
        "dataset": {"root": str(case.dataset), "images": [str(r.get("image")) for r in case.records]},
        "engine": build_info(),
        "yolozu_version": yolozu_version,
        "backends": {
            b: {k: v for k, v in results[b].items() if k not in ("params", "buffers")} for b in results
        },
        "comparison": comparison,
        "files": files,
    }
    if timing is not None:
        summary["timing"] = timing
    return summary


def _max_loss_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return float(max((abs(x - y) for x, y in zip(a["losses"], b["losses"])), default=0.0))


def _replace(config: Any, **changes: Any) -> Any:
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


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    sep = "  ".join("-" * w for w in widths)
    lines = ["  ".join(c.ljust(w) for c, w in zip(rows[0], widths)).rstrip(), sep]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows[1:]]
    return [*lines, sep]


def _final_loss(backend: dict[str, Any] | None) -> str:
    return _fmt(backend["losses"][-1] if backend and backend["losses"] else None, ".6g")


def format_table(summary: dict[str, Any]) -> str:
    """The stdout table. Interleaved: one row per provider (median s/step, its min-max spread, the
    ratio to the reference, the final loss), the ratios and differences, and the reading. Quick:
    seconds per step of each backend's one run, speedup, max |d loss|, max |d parameter|."""
    cfg, cmp_ = summary["config"], summary["comparison"]
    b = summary["backends"]
    timing = summary.get("timing")
    head = (f"yolozu-ttt demo: {cfg['method']} ({cfg['update_filter']}), {cfg['steps']} steps, "
            f"{cfg['images']} image(s) @ {cfg['image_size']}x{cfg['image_size']}, device {cfg['device']}")
    if timing is None:
        lines = [head, *_columns([
            ("backend", "s/step", "steps", "final loss"),
            *[(name, _fmt(b[name]["seconds_per_step"], ".4f"), str(b[name]["report"]["steps_run"]),
               _final_loss(b[name])) for name in BACKENDS],
        ])]
        lines.append(f"speedup (reference s/step / fast s/step): {_fmt(cmp_['speedup'], '.2f')}x  (one round: --quick)")
    else:
        rows = timing["rows"]
        lines = [f"{head}, {timing['rounds']} interleaved rounds (rotating order; medians)", *_columns([
            ("row", "s/step", "spread (min-max)", "vs reference", "final loss"),
            *[(name, _fmt(r["median_s_per_step"], ".4f"),
               f"{r['min_s_per_step']:.4f}-{r['max_s_per_step']:.4f}", f"{r['speedup_vs_reference']:.2f}x",
               _final_loss(b.get(name)) if name in b else "(no update)") for name, r in rows.items()],
        ])]
        floor = f", fast/floor {timing['fast_over_floor']:.2f}x" if timing["fast_over_floor"] else ""
        lines.append(f"speedup (reference / fast, medians): {cmp_['speedup']:.2f}x{floor}")
    lines.append(f"max |delta loss|      : {_fmt(cmp_['max_abs_loss_diff'], '.3e')}")
    lines.append(f"max |delta parameter| : {_fmt(cmp_['max_abs_param_diff'], '.3e')}")
    if timing is not None:
        lines.append(f"bf16 max |delta loss|: {_fmt(cmp_['bf16_max_abs_loss_diff'], '.3e')}  "
                     f"(parameters {_fmt(cmp_['bf16_max_abs_param_diff'], '.3e')})")
        lines.append(timing["reading"])
    return "\n".join(lines)
