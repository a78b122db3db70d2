"""Dataset-scale ``export-predictions``: torchrun shards, per-rank part files, resume, rank-0 merge.

Active under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) or with ``--resume``;
otherwise ``yolozu_ttt.cli`` runs YOLOZU's ``main`` exactly as before. Nothing of YOLOZU's is
copied: every rank runs YOLOZU's own ``main`` twice at most, with a few module names rebound.

Phase A, every rank ("work"). YOLOZU's ``main`` runs with:

* ``build_manifest`` -> YOLOZU's ``build_manifest``, cut to ``--max-images``, then the checks that
  must pass before any work (on every rank, results exchanged in one ``all_gather_object``), then
  this rank's contiguous shard minus the images already in the part files;
* ``run_ttt`` -> the chosen backend (``--ttt-backend``), wrapped: ``--ttt-reset sample`` keeps the
  per-image report for the part file; ``--ttt-reset stream`` adapts on rank 0 only, over the whole
  dataset's records (the batches one process would use), then ONE ``broadcast`` of a flat byte
  tensor holding the selected parameters and every buffer sends the adapted state to all ranks;
* the adapter's ``predict`` -> YOLOZU's ``predict`` on batches aligned to ``--infer-batch-size``
  in global record order; each finished image (prediction, and in sample mode its TTT report) is
  appended as one JSON line to this rank's part file and flushed before the next image starts.

Its own output goes to a scratch file in the parts folder (thrown away).

Phase B, rank 0 ("merge"), after every rank has written its done marker: YOLOZU's ``main`` runs
again over the whole dataset, but ``run_ttt`` and ``predict`` answer from the part files (no
model work). So YOLOZU itself builds the output: its schema, record order, the sample log's first
20 per-sample reports, TTA post-processing, meta and logs. ``Path``/``repo_root`` are bound to a
``Path`` whose ``write_text`` writes a temporary file and ``os.replace``-s it into place. The
parts folder is removed only after that succeeds.

Failures: the failing rank appends ``(rank R of W, image PATH)`` to YOLOZU's message (``TTT
failed: ...``), writes an error marker into the parts folder and exits 1; other ranks stop at their
next image when they see the marker; torchrun stops the rest. Every collective has the process
group timeout ``--dist-timeout`` (default 1800 s); rank 0 waits for the others' done markers by
polling and gives up when no part file has grown for ``--dist-timeout`` seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

DEFAULT_TIMEOUT_S = 1800.0
PART_VERSION = 1
FSYNC_EVERY_S = 2.0
PROGRESS_EVERY_S = 1.0
STREAM_STATE = "stream-state.pt"
ADAPTER_NAMES = ("RTDETRPoseAdapter", "DummyAdapter")
# flags that name where things go, not what is computed: not part of the fingerprint
UNFINGERPRINTED = ("output", "ttt_log_out", "tta_log_out")


class ExportError(SystemExit):
    """A sharded-export failure: its message is printed and the exit status is 1."""


# --------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistEnv:
    """The torchrun worker's place (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    torchrun: bool = False

    @classmethod
    def from_environ(cls, environ: Any = None) -> "DistEnv | None":
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env or "RANK" not in env:
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        except ValueError as exc:
            raise ExportError(f"invalid torchrun environment: {exc}") from exc
        if world < 1 or not 0 <= rank < world or local_world < 1 or not 0 <= local_rank < local_world:
            raise ExportError(
                f"invalid torchrun environment: RANK={rank} WORLD_SIZE={world} "
                f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}"
            )
        return cls(rank, world, local_rank, local_world, True)


def shard_bounds(n: int, world_size: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """Contiguous shard ``[start, stop)`` of ``n`` records for ``rank``; boundaries fall on multiples
    of ``unit`` (the inference batch size, so every rank predicts the batches one process would)."""
    units = -(-n // max(1, unit))
    per, extra = divmod(units, world_size)
    start_u = rank * per + min(rank, extra)
    stop_u = start_u + per + (1 if rank < extra else 0)
    return min(n, start_u * unit), min(n, stop_u * unit)


def fingerprint_args(args: argparse.Namespace, image_paths: list[str]) -> dict[str, Any]:
    """What a part file must agree on to be resumed: every export flag except output locations,
    the record list and the versions."""
    from . import __version__

    try:
        import yolozu

        yolozu_version = getattr(yolozu, "__version__", None)
    except Exception:  # pragma: no cover
        yolozu_version = None
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in UNFINGERPRINTED}
    flags = json.loads(json.dumps(flags, default=str))
    images = hashlib.sha256(json.dumps(image_paths).encode("utf-8")).hexdigest()
    return {"flags": flags, "images": {"count": len(image_paths), "sha256": images},
            "versions": {"yolozu": yolozu_version, "yolozu_ttt": __version__}}


def _digest(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode("utf-8")).hexdigest()


def describe_fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = []
    old_flags, new_flags = old.get("flags", {}), new.get("flags", {})
    for key in sorted(set(old_flags) | set(new_flags)):
        if old_flags.get(key) != new_flags.get(key):
            diffs.append(f"--{key.replace('_', '-')} {old_flags.get(key)!r} -> {new_flags.get(key)!r}")
    oi, ni = old.get("images", {}), new.get("images", {})
    if oi != ni:
        diffs.append(f"dataset records {oi.get('count')} -> {ni.get('count')} images"
                     + ("" if oi.get("count") != ni.get("count") else " (different files)"))
    for name, value in sorted((new.get("versions") or {}).items()):
        if (old.get("versions") or {}).get(name) != value:
            diffs.append(f"{name} {(old.get('versions') or {}).get(name)} -> {value}")
    return "; ".join(diffs) or "unknown difference"


# --------------------------------------------------------------------------------------
# part files
# --------------------------------------------------------------------------------------
def read_parts(parts_dir: Path) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """(headers, entries by global index) of every part file; a line cut short by a kill is ignored."""
    headers: list[dict[str, Any]] = []
    entries: dict[int, dict[str, Any]] = {}
    for path in sorted(parts_dir.glob("part-*.jsonl")):
        with open(path, "rb") as handle:
            lines = handle.read().split(b"\n")
        try:
            header = json.loads(lines[0])
        except ValueError:
            continue  # killed before its header was written: holds nothing
        if not isinstance(header, dict) or header.get("yolozu_ttt_part") != PART_VERSION:
            continue
        header["path"] = str(path)
        headers.append(header)
        for raw in lines[1:]:
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                continue  # the last line of a killed worker
            entries.setdefault(int(entry["i"]), entry)
    return headers, entries


class _PartWriter:
    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self._handle = open(path, "x", encoding="utf-8")
        self._last_sync = time.monotonic()
        self._write(header, sync=True)

    def _write(self, obj: dict[str, Any], *, sync: bool = False) -> None:
        self._handle.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._handle.flush()  # on disk for the OS: survives a killed process
        now = time.monotonic()
        if sync or now - self._last_sync >= FSYNC_EVERY_S:  # and a machine crash, within ~2 s
            os.fsync(self._handle.fileno())
            self._last_sync = now

    def write(self, entry: dict[str, Any]) -> None:
        self._write(entry)

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()


class _StoredReport:
    """What YOLOZU's ``main`` needs from a ``TTTReport``: ``to_dict()``."""

    def __init__(self, data: dict[str, Any] | None):
        self._data = data

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data) if self._data is not None else {}


_BasePath = type(pathlib.Path())


class AtomicPath(_BasePath):  # type: ignore[misc, valid-type]
    """A ``Path`` whose ``write_text`` writes a temporary file next to it, then renames it into place."""

    def write_text(self, data, encoding=None, errors=None, newline=None):  # type: ignore[override]
        tmp = self.with_name(f".{self.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding=encoding, errors=errors, newline=newline) as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return len(data)


# --------------------------------------------------------------------------------------
# flat state for the stream broadcast
# --------------------------------------------------------------------------------------
def _stream_tensors(model: Any, config: Any) -> list[Any]:
    """The selected parameters (YOLOZU's ``select_parameters`` with the run's filter) and every
    buffer (running statistics included): everything stream adaptation can change."""
    from yolozu.tta.ttt_mim import select_parameters

    params = select_parameters(model, update_filter=str(config.update_filter), include=config.include,
                               exclude=config.exclude)
    seen: set[int] = set()
    out = []
    for t in [*params, *(b for _, b in model.named_buffers() if b is not None)]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def pack(tensors: list[Any]) -> Any:
    import torch

    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    with torch.no_grad():
        return torch.cat([t.detach().reshape(-1).contiguous().view(torch.uint8) for t in tensors])


def unpack(flat: Any, tensors: list[Any]) -> None:
    import torch

    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel() * t.element_size()
            chunk = flat[offset:offset + n].to(t.device).clone()  # clone: offset 0, aligned for any dtype
            t.copy_(chunk.view(t.dtype).view(t.shape))
            offset += n
    if offset != flat.numel():
        raise RuntimeError(f"stream state has {flat.numel()} bytes, the model needs {offset}")


def _nbytes(tensors: list[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------
class _Progress:
    """Rank 0's one bar for the whole dataset: finished images over all ranks, counted from the
    newlines every rank's part file gains (read incrementally, once a second)."""

    def __init__(self, parts_dir: Path, total: int, initial: int, desc: str):
        self.parts_dir = parts_dir
        self._offsets: dict[str, int] = {}
        self._lines = 0
        self._headers = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.last_growth = time.monotonic()
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="img", mininterval=PROGRESS_EVERY_S,
                            file=sys.stderr, dynamic_ncols=True)
        except Exception:  # pragma: no cover - tqdm is a yolozu dependency
            self.bar = None
        self._initial = initial
        self._count()  # the files of earlier runs are already in `initial`
        self._base = self._lines - self._headers
        self._thread = threading.Thread(target=self._loop, name="yolozu-ttt-progress", daemon=True)
        self._thread.start()

    def _count(self) -> None:
        grew = False
        for path in self.parts_dir.glob("part-*.jsonl"):
            key = str(path)
            start = self._offsets.get(key)
            try:
                with open(path, "rb") as handle:
                    handle.seek(start or 0)
                    data = handle.read()
            except OSError:
                continue
            if start is None:
                self._headers += 1 if data else 0
            if data:
                grew = True
                self._offsets[key] = (start or 0) + len(data)
                self._lines += data.count(b"\n")
        if grew:
            self.last_growth = time.monotonic()

    def done_now(self) -> int:
        return self._lines - self._headers - self._base

    def update(self) -> None:
        with self._lock:
            self._count()
            if self.bar is not None:
                n = self._initial + self.done_now()
                if n != self.bar.n:
                    self.bar.update(n - self.bar.n)

    def _loop(self) -> None:
        while not self._stop.wait(PROGRESS_EVERY_S):
            with contextlib.suppress(Exception):
                self.update()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.update()
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
class ShardedExport:
    """One ``export-predictions`` invocation on one rank (or a single process with ``--resume``)."""

    def __init__(self, mod: Any, args: argparse.Namespace, *, env: DistEnv, resume: bool, timeout_s: float,
                 patches: Callable[[dict[str, Any]], dict[str, Any]]):
        self.mod = mod
        self.args = args
        self.env = env
        self.resume = bool(resume)
        self.timeout_s = float(timeout_s)
        self._patches = patches
        self.output_path = Path(mod.repo_root / args.output)
        self.parts_dir = Path(str(self.output_path) + ".parts")
        self.records: list[dict[str, Any]] = []
        self.manifest: dict[str, Any] = {}
        self.index_of: dict[int, int] = {}
        self.entries: dict[int, dict[str, Any]] = {}
        self.token = ""
        self.writer: _PartWriter | None = None
        self.progress: _Progress | None = None
        self.adapter: Any = None
        self.current: str | None = None
        self.pending_report: dict[str, Any] | None = None
        self.computed = 0
        self.resumed = 0
        self.work_start: float | None = None
        self.work_end: float | None = None
        self.stream_adapted = False
        self.fingerprint: dict[str, Any] = {}
        self.dist_backend: str | None = None
        self.device = str(getattr(args, "device", "cpu") or "cpu")
        self._pg = False
        self._unit = max(1, int(getattr(args, "infer_batch_size", 1) or 1))
        self._started = False
        self.adapting = False
        self.stream_report: dict[str, Any] | None = None

    # -- setup ------------------------------------------------------------------------
    def _setup(self) -> None:
        import torch

        env = self.env
        cuda = self.device.startswith("cuda")
        if env.torchrun and cuda and self.device == "cuda":
            # one GPU per rank
            self.device = f"cuda:{env.local_rank % max(1, torch.cuda.device_count())}"
            self.dist_backend = "nccl"
        elif env.world_size > 1:
            self.dist_backend = "gloo"  # CPU, or ranks sharing an explicitly named GPU
        if cuda and torch.cuda.is_available():
            torch.cuda.set_device(torch.device(self.device))
        if env.torchrun and not cuda:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // env.local_world_size))
        if env.world_size > 1:
            import datetime

            import torch.distributed as dist

            dist.init_process_group(self.dist_backend, timeout=datetime.timedelta(seconds=self.timeout_s))
            self._pg = True

    def _teardown(self) -> None:
        if self._pg:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._pg = False

    def settings_extra(self) -> dict[str, Any]:
        return {"world_size": int(self.env.world_size), "distributed_backend": self.dist_backend}

    def _where(self, image: str | None = None) -> str:
        text = f"rank {self.env.rank} of {self.env.world_size}"
        return f"{text}, image {image}" if image else text

    # -- preflight (inside YOLOZU's main, after its own flag checks, before any model work) ----
    def _preflight(self, mine: list[int]) -> str | None:
        args = self.args
        if bool(getattr(args, "tta", False)) and str(getattr(args, "tta_mode", "")) == "model" \
                and str(getattr(args, "adapter", "")) == "rtdetr_pose":
            return ("--tta-mode model is not supported under torchrun or with --resume (its flipped "
                    "prediction pass is not sharded); use --tta-mode postprocess, or one process without --resume")
        try:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            probe = self.parts_dir / f".probe-{self.env.rank}-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            return f"output folder is not writable: {self.output_path.parent} ({exc})"
        headers, entries = read_parts(self.parts_dir)
        if headers and not self.resume:
            return (f"{self.parts_dir} holds part files of an earlier run ({len(entries)} images done): "
                    "pass --resume to continue it, or delete that folder")
        digest = _digest(self.fingerprint)
        for header in headers:
            if header.get("fingerprint") != digest:
                return (f"--resume: the part files in {self.parts_dir} were made with different export flags "
                        f"({describe_fingerprint_diff(header.get('args') or {}, self.fingerprint)}); "
                        "rerun with the flags they were made with, or delete that folder")
        self.entries = entries
        for i in mine:
            if i in entries:
                continue
            image = self.records[i].get("image") if isinstance(self.records[i], dict) else None
            if not isinstance(image, str) or not os.path.isfile(image):
                return f"image not found: {image} ({self._where()}, record {i})"
        return None

    def _exchange(self, error: str | None) -> None:
        token = uuid.uuid4().hex[:12]
        if self.env.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, (token, error))
            token = gathered[0][0]
            errors = [e for _, e in gathered if e]
        else:
            errors = [error] if error else []
        if errors:
            with contextlib.suppress(OSError):
                self.parts_dir.rmdir()  # only if this run made it and nothing is in it
            raise ExportError(errors[0])
        self.token = token

    def _manifest(self, real_build_manifest: Callable[..., Any]) -> Callable[..., Any]:
        def build_manifest(dataset_root, *a, **kw):
            manifest = real_build_manifest(dataset_root, *a, **kw)
            records = list(manifest["images"])
            if self.args.max_images is not None:
                records = records[: self.args.max_images]
            self.manifest, self.records = manifest, records
            self.index_of = {id(r): i for i, r in enumerate(records)}
            self.fingerprint = fingerprint_args(self.args, [str(r.get("image")) for r in records])
            start, stop = shard_bounds(len(records), self.env.world_size, self.env.rank, self._unit)
            mine = list(range(start, stop))
            self._exchange(self._preflight(mine))
            self._started = True
            todo = [i for i in mine if i not in self.entries]
            self.resumed = sum(1 for i in range(len(records)) if i in self.entries)
            self._open_part()
            if self.env.rank == 0:
                self.progress = _Progress(self.parts_dir, len(records), len(self.entries),
                                          f"export ({self.env.world_size} worker{'s' if self.env.world_size > 1 else ''})")
            self.entries = {}  # rank 0 reads them all again for the merge
            return dict(manifest, images=[records[i] for i in todo])

        return build_manifest

    def _open_part(self) -> None:
        header = {"yolozu_ttt_part": PART_VERSION, "fingerprint": _digest(self.fingerprint),
                  "args": self.fingerprint, "token": self.token, "rank": self.env.rank,
                  "world_size": self.env.world_size, "pid": os.getpid(), "host": os.uname().nodename,
                  "started": time.time()}
        path = self.parts_dir / f"part-{self.token}-r{self.env.rank:05d}.jsonl"
        self.writer = _PartWriter(path, header)

    # -- failure signalling ---------------------------------------------------------------
    def _marker(self, kind: str, rank: int | None = None) -> Path:
        return self.parts_dir / f"{kind}-{self.token}-r{self.env.rank if rank is None else rank:05d}.json"

    def _peer_error(self) -> dict[str, Any] | None:
        for path in sorted(self.parts_dir.glob(f"error-{self.token}-r*.json")):
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {"rank": "?", "message": f"see {path}"}
        return None

    def _check_peers(self) -> None:
        if self.env.world_size > 1:
            err = self._peer_error()
            if err is not None:
                raise _PeerStopped(f"stopped: rank {err.get('rank')} failed: {err.get('message')}")

    def _mark_start(self) -> None:
        if self.work_start is None:
            self.work_start = time.time()

    # -- phase A wrappers -----------------------------------------------------------------
    def _ttt(self, backend: Callable[..., Any]) -> Callable[..., Any]:
        def run_ttt(adapter, records, *, config):
            self._check_peers()
            self._mark_start()
            if str(getattr(config, "reset", "stream")) == "sample":
                self.current = str(records[0].get("image")) if len(records) == 1 else None
                report = backend(adapter, records, config=config)
                self.pending_report = report.to_dict()
                return report
            return self._stream(backend, adapter, config)

        return run_ttt

    def _stream(self, backend: Callable[..., Any], adapter: Any, config: Any) -> Any:
        import torch

        tensors = _stream_tensors(adapter.get_model(), config)
        state_path = self.parts_dir / STREAM_STATE
        report: Any = None
        flat = None
        if self.env.rank == 0:
            saved = self._load_stream_state(state_path)
            if saved is not None:
                report, flat = _StoredReport(saved["report"]), saved["flat"]
                unpack(flat, tensors)
            else:
                self.current, self.adapting = None, True
                real = backend(adapter, list(self.records), config=config)
                self.adapting = False
                report = real
                self.stream_adapted = True
                flat = pack(tensors).cpu()
                tmp = state_path.with_name(f".{STREAM_STATE}.tmp-{os.getpid()}")
                torch.save({"fingerprint": _digest(self.fingerprint), "report": json.dumps(real.to_dict()),
                            "flat": flat}, tmp)
                os.replace(tmp, state_path)
        if self.env.world_size > 1:
            import torch.distributed as dist

            comm = torch.device(self.device) if self.dist_backend == "nccl" else torch.device("cpu")
            if self.env.rank == 0:
                buf = flat.to(comm)
            else:
                buf = torch.empty(_nbytes(tensors), dtype=torch.uint8, device=comm)
            dist.broadcast(buf, src=0)  # the one collective: selected parameters + buffers, as bytes
            if self.env.rank != 0:
                unpack(buf, tensors)
                report = _StoredReport(None)
        return report

    def _load_stream_state(self, path: Path) -> dict[str, Any] | None:
        if not (self.resume and path.is_file()):
            return None
        import torch

        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") != _digest(self.fingerprint):
            return None
        return {"report": json.loads(saved["report"]), "flat": saved["flat"]}

    def _groups(self, records: list[Any]) -> Iterator[list[tuple[int, Any]]]:
        group: list[tuple[int, Any]] = []
        for rec in records:
            idx = self.index_of.get(id(rec))
            if idx is None:
                raise RuntimeError("predict() got a record that is not in the dataset's record list")
            if group and group[-1][0] // self._unit != idx // self._unit:
                yield group
                group = []
            group.append((idx, rec))
        if group:
            yield group

    def _predict(self, real_predict: Callable[[list[Any]], list[Any]]) -> Callable[[list[Any]], list[Any]]:
        def predict(records):
            if not isinstance(records, list):
                return real_predict(records)  # YOLOZU's own error
            out: list[Any] = []
            for group in self._groups(records):
                self._check_peers()
                self._mark_start()
                self.current = str(group[0][1].get("image"))
                preds = real_predict([rec for _, rec in group])
                if len(preds) != len(group):
                    raise RuntimeError(f"predict() returned {len(preds)} entries for {len(group)} images")
                for (idx, rec), pred in zip(group, preds):
                    entry = {"i": idx, "image": rec.get("image"), "prediction": pred, "rank": self.env.rank,
                             "t": round(time.time(), 3)}
                    if self.pending_report is not None:
                        entry["report"] = self.pending_report
                    assert self.writer is not None
                    self.writer.write(entry)
                    self.computed += 1
                self.pending_report = None
                out.extend(preds)
            self.current = None
            self.work_end = time.time()
            return out

        return predict

    def _adapter_factory(self, real_cls: Any, *, replay: bool) -> Any:
        def make(*a, **kw):
            if replay:
                adapter = self.adapter
                adapter.predict = self._replay_predict
                return adapter
            adapter = real_cls(*a, **kw)
            adapter.predict = self._predict(adapter.predict)
            self.adapter = adapter
            return adapter

        return make

    # -- phase B wrappers -----------------------------------------------------------------
    def _replay_ttt(self, adapter, records, *, config):
        if str(getattr(config, "reset", "stream")) == "sample":
            return _StoredReport(self.entries[self.index_of[id(records[0])]].get("report"))
        return _StoredReport(self.stream_report)

    def _replay_predict(self, records):
        return [self.entries[self.index_of[id(rec)]]["prediction"] for rec in records]

    # -- the phases -----------------------------------------------------------------------
    def _main_ns(self, **changes: Any) -> argparse.Namespace:
        ns = copy.deepcopy(self.args)
        ns.max_images = None  # applied by our build_manifest, before sharding
        ns.device = self.device
        for key, value in changes.items():
            setattr(ns, key, value)
        return ns

    def _run_main(self, ns: argparse.Namespace, names: dict[str, Any]) -> None:
        from .cli import _patched

        def _parse_args(_argv: Any) -> argparse.Namespace:
            return ns

        with _patched(self.mod, _parse_args=_parse_args, **names):
            self.mod.main([])

    def _work(self) -> None:
        mod = self.mod
        base = self._patches(self.settings_extra())
        backend = base.pop("run_ttt", mod.run_ttt)
        scratch = self.parts_dir / f"scratch-r{self.env.rank:05d}-{os.getpid()}.json"
        ns = self._main_ns(output=str(scratch), ttt_log_out=None, tta_log_out=None)
        names = dict(base)
        names["build_manifest"] = self._manifest(mod.build_manifest)
        names["run_ttt"] = self._ttt(backend)
        for name in ADAPTER_NAMES:
            names[name] = self._adapter_factory(getattr(mod, name), replay=False)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self._run_main(ns, names)
        finally:
            with contextlib.suppress(OSError):
                scratch.unlink()

    def _merge(self) -> None:
        mod = self.mod
        headers, self.entries = read_parts(self.parts_dir)
        missing = [i for i in range(len(self.records)) if i not in self.entries]
        if missing:
            raise ExportError(f"merge: the part files in {self.parts_dir} lack {len(missing)} image(s), e.g. "
                              f"{self.records[missing[0]].get('image')}; rerun with --resume")
        if bool(getattr(self.args, "ttt", False)):
            self.stream_report = self._load_stream_state_any(self.parts_dir / STREAM_STATE)
        names = self._patches(self.settings_extra())
        names.pop("run_ttt", None)
        names["run_ttt"] = self._replay_ttt
        names["build_manifest"] = lambda *a, **kw: dict(self.manifest, images=self.records)
        for name in ADAPTER_NAMES:
            names[name] = self._adapter_factory(getattr(mod, name), replay=True)
        names["repo_root"] = AtomicPath(mod.repo_root)
        names["Path"] = AtomicPath
        try:
            self._run_main(self._main_ns(), names)
        finally:
            if self.adapter is not None:
                with contextlib.suppress(AttributeError):
                    del self.adapter.predict

    def _load_stream_state_any(self, path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        import torch

        return json.loads(torch.load(path, map_location="cpu", weights_only=True)["report"])

    def _write_marker(self, kind: str, payload: dict[str, Any]) -> None:
        path = self._marker(kind)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(tmp, path)

    def _wait_for_ranks(self) -> list[dict[str, Any]]:
        done: dict[int, dict[str, Any]] = {}
        while True:
            for r in range(self.env.world_size):
                if r not in done:
                    path = self._marker("done", r)
                    if path.is_file():
                        with contextlib.suppress(OSError, ValueError):
                            done[r] = json.loads(path.read_text(encoding="utf-8"))
            if len(done) == self.env.world_size:
                return [done[r] for r in range(self.env.world_size)]
            err = self._peer_error()
            if err is not None:
                raise ExportError(f"{err.get('message')}; the images finished before it stay in "
                                  f"{self.parts_dir}: rerun with --resume")
            assert self.progress is not None
            self.progress.update()
            if time.monotonic() - self.progress.last_growth > self.timeout_s:
                waiting = [r for r in range(self.env.world_size) if r not in done]
                raise ExportError(f"no progress from rank(s) {waiting} for {self.timeout_s:g} s (--dist-timeout); "
                                  f"the images finished so far stay in {self.parts_dir}: rerun with --resume")
            time.sleep(0.2)

    def run(self) -> int:
        try:
            self._setup()
            try:
                self._work()
            except (_PeerStopped, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fail(exc)
            finally:
                if self.writer is not None:
                    self.writer.close()
            self._write_marker("done", {"rank": self.env.rank, "computed": self.computed,
                                        "start": self.work_start, "end": self.work_end})
            if self.env.rank != 0:
                return 0
            ranks = self._wait_for_ranks()
            if self.progress is not None:
                self.progress.close()
                self.progress = None
            self._merge()
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self._summary(ranks)
            return 0
        except _PeerStopped as exc:
            raise ExportError(f"{exc}; the images finished before it stay in {self.parts_dir}: "
                              "rerun with --resume") from None
        finally:
            if self.progress is not None:
                self.progress.close()
            self._teardown()

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, SystemExit):
            if exc.code is None or exc.code == 0:
                raise exc
            message = str(exc.code)
        else:
            traceback.print_exception(exc, file=sys.stderr)
            message = f"export failed: {type(exc).__name__}: {exc}"
        if not self._started:
            raise exc  # YOLOZU's flag checks (same on every rank) or our preflight: unchanged
        if self.adapting:
            message = f"{message} ({self._where()}, stream adaptation)"
        else:
            message = f"{message} ({self._where(self.current)})"
        with contextlib.suppress(OSError):
            self._write_marker("error", {"rank": self.env.rank, "image": self.current, "message": message})
        raise ExportError(message) from (exc if not isinstance(exc, SystemExit) else None)

    def _summary(self, ranks: list[dict[str, Any]]) -> None:
        computed = sum(int(r.get("computed") or 0) for r in ranks)
        starts = [r["start"] for r in ranks if r.get("start")]
        ends = [r["end"] for r in ranks if r.get("end")]
        rate = ""
        if computed and starts and ends and max(ends) > min(starts):
            seconds = max(ends) - min(starts)
            rate = f"; {computed / seconds:.3f} images/s ({seconds:.2f} s)"
        adapted = ""
        if bool(getattr(self.args, "ttt", False)) and str(self.args.ttt_reset) == "stream":
            adapted = "; stream adaptation " + ("ran" if self.stream_adapted else "taken from the part files")
        backend = f", {self.dist_backend}" if self.dist_backend else ""
        print(f"yolozu-ttt export: {len(self.records)} images, {self.env.world_size} worker(s){backend}: "
              f"{computed} computed, {self.resumed} from part files{adapted}{rate}", file=sys.stderr, flush=True)


class _PeerStopped(BaseException):
    """Another rank failed; this one stops at its next image (a BaseException, so YOLOZU's
    ``except Exception`` around ``run_ttt`` does not turn it into a ``TTT failed`` message)."""


def run_sharded(mod: Any, args: argparse.Namespace, *, env: DistEnv | None, resume: bool, timeout_s: float,
                patches: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Run one ``export-predictions`` as rank ``env.rank`` of ``env.world_size`` (or alone, with
    ``--resume``). ``patches(extra_settings)`` returns the cli's own module rebindings (the backend's
    ``run_ttt`` and the settings wrapper, which adds ``extra_settings`` to the ``ttt`` block)."""
    if timeout_s <= 0:
        raise ExportError(f"--dist-timeout must be > 0 seconds (got {timeout_s:g})")
    job = ShardedExport(mod, args, env=env or DistEnv(), resume=resume, timeout_s=timeout_s, patches=patches)
    return job.run()
