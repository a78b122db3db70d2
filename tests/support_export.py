"""Helpers for the export tests: a shrunk RT-DETR export set-up, process trees, and a worker entry
point that records adaptations.

Run as a script (``torchrun ... tests/support_export.py export-predictions ...``) it is
``yolozu-ttt`` with ``FastBackend.__call__`` wrapped: each adaptation appends ``start`` and ``end``
lines (rank, attempt, image; ``end`` also whether the image's prediction will be answered from its
group's batched forward) to ``$YTTT_ADAPT_LOG``; with ``$YTTT_KILL_AT=R:K`` rank R of the first
attempt SIGKILLs itself when its K-th adaptation starts (a worker dying mid-run, deterministically).
Two more faults for the export's fault tests, on rank 0 of the first attempt: ``$YTTT_SIGNAL_AT=SIG:K``
sends itself signal SIG when YOLOZU's ``predict`` is called for the K-th time (an interrupt
mid-run, with or without ``--ttt``), and ``$YTTT_DISK_FULL=NAME`` makes every ``Path.write_text`` of
the file NAME (or a temporary file beside it, ``.NAME.tmp-*``) write half its text and fail with
ENOSPC (:func:`disk_full`).
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import sys
import time
from pathlib import Path


TINY_MODEL = {"num_classes": 3, "hidden_dim": 32, "num_queries": 8, "stem_channels": 8,
              "backbone_channels": [8, 16, 32], "stage_blocks": [1, 1, 1], "num_encoder_layers": 1,
              "num_decoder_layers": 1, "nhead": 2, "encoder_dim_feedforward": 32, "decoder_dim_feedforward": 32}


def tiny_export_data(root: Path) -> dict[str, Path]:
    """In ``root``: 16 distinct images (YOLOZU's demo sample and its mirror images), a shrunk
    RT-DETR config (``TINY_MODEL``) and a checkpoint of it."""
    import importlib.resources

    import torch
    from PIL import Image, ImageOps
    from yolozu.demos.labeled_dataset import generate_labeled_sample
    from yolozu.inference.adapter import RTDETRPoseAdapter

    generate_labeled_sample(run_dir=root / "demo", seed=0)
    images = root / "ds" / "images" / "val"
    images.mkdir(parents=True)
    i = 0
    for split in ("val", "train"):
        for path in sorted((root / "demo" / "images" / split).glob("*.png")):
            with Image.open(path) as src:
                img = src.convert("RGB")
            for variant in (img, ImageOps.mirror(img)):
                variant.save(images / f"img_{i:03d}.png")
                i += 1
    base = json.loads(importlib.resources.files("rtdetr_pose").joinpath("configs/base.json").read_text(encoding="utf-8"))
    base["model"].update(TINY_MODEL)
    config = root / "tiny.json"
    config.write_text(json.dumps(base), encoding="utf-8")
    model = RTDETRPoseAdapter(config_path=str(config), init_seed=0).get_model()
    torch.save(model.state_dict(), root / "tiny.pt")
    return {"root": root, "dataset": root / "ds", "config": config, "checkpoint": root / "tiny.pt"}


def export_args(data, *, reset: str | None, n: int, backend: str = "fast", dataset: Path | None = None) -> list[str]:
    """A tiny export of ``n`` images: no TTT, or TTT with ``reset`` (1 step in sample mode) on ``backend``."""
    args = ["--adapter", "rtdetr_pose", "--config", str(data["config"]), "--checkpoint", str(data["checkpoint"]),
            "--dataset", str(dataset or data["dataset"]), "--split", "val", "--max-images", str(n),
            "--image-size", "64", "--score-threshold", "0.0", "--max-detections", "3", "--wrap"]
    if reset is not None:
        # lr 0.01: the steps stay under the default guards (max update norm 1.0), so TTT changes the output
        args += ["--ttt", "--ttt-reset", reset, "--ttt-steps", "1" if reset == "sample" else "2",
                 "--ttt-update-filter", "norm_only", "--ttt-seed", "0", "--ttt-lr", "0.01", "--ttt-backend", backend]
        if reset == "stream":
            args += ["--ttt-batch-size", "2", "--ttt-max-batches", "2", "--infer-batch-size", "2"]
    return args


def children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished


def kill_tree(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_until(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def _log(kind: str, image: str, **extra) -> None:
    line = {"kind": kind, "rank": int(os.environ.get("RANK", 0)),
            "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)), "image": image, **extra}
    with open(os.environ["YTTT_ADAPT_LOG"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def disk_full(name: str):
    """A ``Path.write_text`` for which the file ``name`` and its temporary files (``.name.tmp-*``)
    sit on a full disk: half the text is written, then ENOSPC, as a real full disk does."""
    real = pathlib.Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == name or self.name.startswith(f".{name}.tmp-"):
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *args, **kwargs)

    return write_text


def _first_attempt_rank_0() -> bool:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))) == (0, 0)


def _signal_at_predict(spec: str) -> None:
    from yolozu.inference.adapter import RTDETRPoseAdapter

    name, at = spec.split(":")
    sig, real, calls = getattr(signal, name), RTDETRPoseAdapter.predict, [0]

    def predict(self, records):
        calls[0] += 1
        if calls[0] == int(at) and _first_attempt_rank_0():
            os.kill(os.getpid(), sig)
        return real(self, records)

    RTDETRPoseAdapter.predict = predict


def hold(at: int, where: Path) -> None:
    """Each worker of the first attempt holds at the start of its ``at``-th adaptation (its earlier
    images written, this one in hand) until a SIGTERM or SIGINT reaches it, with a ``held-<rank>``
    file in ``where`` while it waits; the signal then goes to the handler the run installed, and the
    adaptation goes on. So a test stops a run mid-run for certain, however fast the images go."""
    from yolozu_ttt import cli

    real, started = cli.FastBackend.__call__, [0]

    def held(self, adapter, records, *, config):
        started[0] += 1
        if started[0] == at and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0:
            got: list[int] = []
            handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

            def chained(signum, frame):
                got.append(signum)
                for s, h in handlers.items():
                    signal.signal(s, h)
                if callable(handlers[signum]):
                    handlers[signum](signum, frame)

            for s in handlers:
                signal.signal(s, chained)
            (where / f"held-{os.environ.get('RANK', '0')}").write_text("", encoding="utf-8")
            deadline = time.monotonic() + 300
            while not got and time.monotonic() < deadline:
                time.sleep(0.02)
        return real(self, adapter, records, config=config)

    cli.FastBackend.__call__ = held


def hold_from_env() -> None:
    """:func:`hold` in a torchrun worker whose environment asks for it (``$YTTT_HOLD_AT=K``,
    ``$YTTT_HOLD_DIR``): what :func:`held_env`'s ``sitecustomize`` runs at every start-up."""
    if os.environ.get("YTTT_HOLD_AT") and os.environ.get("LOCAL_RANK") is not None:
        hold(int(os.environ["YTTT_HOLD_AT"]), Path(os.environ["YTTT_HOLD_DIR"]))


def held_env(env: dict[str, str], root: Path, at: int) -> dict[str, str]:
    """``env`` for a torchrun export whose workers :func:`hold` at their ``at``-th adaptation (whatever
    command the launcher gives them: a ``sitecustomize`` on ``PYTHONPATH`` installs it)."""
    site = root / "hold-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import support_export\nsupport_export.hold_from_env()\n", encoding="utf-8")
    path = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return dict(env, PYTHONPATH=path, YTTT_HOLD_AT=str(at), YTTT_HOLD_DIR=str(root))


def main() -> int:
    from yolozu_ttt import cli

    if os.environ.get("YTTT_SIGNAL_AT"):
        _signal_at_predict(os.environ["YTTT_SIGNAL_AT"])
    if os.environ.get("YTTT_DISK_FULL") and _first_attempt_rank_0():
        pathlib.Path.write_text = disk_full(os.environ["YTTT_DISK_FULL"])

    real = cli.FastBackend.__call__
    kill_rank, kill_at = (int(x) for x in os.environ.get("YTTT_KILL_AT", "-1:0").split(":"))
    started = [0]

    def recorded(self, adapter, records, *, config):
        image = str(records[0].get("image")) if len(records) == 1 else "*"
        started[0] += 1
        if "YTTT_ADAPT_LOG" in os.environ:
            _log("start", image)
        if (int(os.environ.get("RANK", 0)), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))) == (kill_rank, 0) \
                and started[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        report = real(self, adapter, records, config=config)
        if "YTTT_ADAPT_LOG" not in os.environ:
            return report
        # --ttt-parallel: whether YOLOZU's predict is answered from a group's batched forward
        _log("end", image, answered=self.answer is not None and self.answer.pending)
        return report

    cli.FastBackend.__call__ = recorded
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
