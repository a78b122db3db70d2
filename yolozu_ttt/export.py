"""Dataset-scale ``export-predictions``: one pipeline, under torchrun or alone with ``--resume``.

Active under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) or with ``--resume``;
otherwise ``yolozu_ttt.cli`` runs YOLOZU's ``main`` exactly as before (under the output lock).
Nothing of YOLOZU's is copied: every rank runs YOLOZU's own ``main`` twice at most, with a few of
its module globals rebound (:mod:`yolozu_ttt.seam` lists them). The pipeline, in the order
:meth:`ShardedExport.run` runs it:

1. **lock** (rank 0): ``<output>.lock``, created exclusively (a hard link of a complete file, safe on
   a shared filesystem) with host, pid, start time and a heartbeat refreshed every
   ``LOCK_HEARTBEAT_S``. A second run on the same output is refused before any work
   (:class:`OutputBusy`, exit 2); a lock whose process is gone (same host), whose heartbeat is older
   than ``LOCK_STALE_S``, or that an earlier attempt of this torchrun job left, is taken over with
   a message. Every worker also dies with its launcher (``PR_SET_PDEATHSIG``).
2. **shard** (every rank, inside YOLOZU's ``main``, as its ``build_manifest``): the record list cut
   to ``--max-images``; the checks that must pass before any work (results exchanged in one
   ``all_gather_object``); this rank's contiguous shard minus the images the part files hold.
   After an elastic restart (``TORCHELASTIC_RESTART_COUNT`` > 0) the part files are resumed
   without ``--resume``.
3. **work** (every rank): YOLOZU's ``main`` with ``run_ttt`` -> the chosen backend (sample mode:
   the per-image report is kept; stream mode: rank 0 adapts over the whole dataset, then one
   ``broadcast`` of a flat byte tensor of the selected parameters and every buffer) and the
   adapter's ``predict`` -> YOLOZU's ``predict`` on batches aligned to ``--infer-batch-size``; each
   finished image is one JSON line appended to this rank's part file (created with its first
   image), flushed before the next image starts. With ``--ttt-parallel K`` the backend cuts its
   K-groups from this rank's shard (its ``plan``) and YOLOZU still asks for, and this writes, one
   image at a time: a kill mid-group loses only the group's unwritten images. Its own output goes
   to a scratch file (thrown away).
4. **gather** (over the process group, bounded by ``--dist-timeout``): every rank sends rank 0
   the finished records of its shard, so ``--output`` need be writable on rank 0's host only.
5. **merge** (rank 0): YOLOZU's ``main`` once more over the whole dataset, with ``run_ttt`` and
   ``predict`` answered from those records: YOLOZU builds the output (schema, order, logs) and
   writes it, and its logs, to temporary paths next to the real ones.
6. **publish** (rank 0): ``os.replace`` of each temporary file onto its real path
   (:class:`yolozu_ttt.publish.Publication`); then the part files are removed (each rank its own)
   and the lock released.

Failures: a failing rank appends ``(rank R of W, image PATH)`` to YOLOZU's message (``TTT failed:
...``) and exits 1; torchrun then stops (SIGTERM) or restarts (``--max-restarts``) the group. The
part files stay the durable record; they are removed only after the output is in place. A write
error (part file, stream state, the merged files) or Ctrl-C / SIGTERM ends in one line saying what
was kept (the earlier output, untouched; the part files) and how to continue (exit 1 / 130 / 143).
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
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from .publish import (Fault, HeldLines, Interrupted, Publication, Terminated, WriteFailed, is_write_error, signal_name,
                      strerror)
from .run import last_engine

DEFAULT_TIMEOUT_S = 1800.0
PART_VERSION = 1
FSYNC_EVERY_S = 2.0
PROGRESS_EVERY_S = 1.0
LOCK_HEARTBEAT_S = 5.0   # the lock holder rewrites its heartbeat this often
LOCK_STALE_S = 60.0      # a lock whose heartbeat is older than this is stale (any host)
STREAM_STATE = "stream-state.pt"
ADAPTER_NAMES = ("RTDETRPoseAdapter", "DummyAdapter")
# flags that name where things go, not what is computed: not part of the fingerprint
UNFINGERPRINTED = ("output", "ttt_log_out", "tta_log_out")
PR_SET_PDEATHSIG = 1     # <linux/prctl.h>


class ExportError(SystemExit):
    """A sharded-export failure: its message is printed and the exit status is 1."""


class OutputBusy(ExportError):
    """Another live export holds the output's lock (the cli prints it and exits 2)."""


# --------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistEnv:
    """The torchrun worker's place (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``)
    and its elastic attempt (``TORCHELASTIC_RESTART_COUNT``/``_MAX_RESTARTS``/``_RUN_ID``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    torchrun: bool = False
    restart_count: int = 0
    max_restarts: int = 0
    run_id: str | None = None

    @classmethod
    def from_environ(cls, environ: Any = None) -> "DistEnv | None":
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env or "RANK" not in env:
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
            restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
            max_restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", 0))
        except ValueError as exc:
            raise ExportError(f"invalid torchrun environment: {exc}") from exc
        if world < 1 or not 0 <= rank < world or local_world < 1 or not 0 <= local_rank < local_world:
            raise ExportError(
                f"invalid torchrun environment: RANK={rank} WORLD_SIZE={world} "
                f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}"
            )
        return cls(rank, world, local_rank, local_world, True, restarts, max_restarts,
                   env.get("TORCHELASTIC_RUN_ID") or None)


def die_with_launcher() -> bool:
    """Ask Linux to SIGKILL this worker when its parent (the torchrun launcher) dies
    (``prctl(PR_SET_PDEATHSIG)``): torchrun starts each worker in a session of its own, so nothing
    else stops it. Finished images are already in the part file. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return False
    if os.getppid() == 1:  # the launcher died before the signal was armed
        raise ExportError("the torchrun launcher is gone; nothing was done")
    return True


# --------------------------------------------------------------------------------------
# 1. the lock: one live export per output
# --------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _when(ts: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError):
        return "?"


class OutputLock:
    """``<output>.lock``: one live export per output, on one host or across hosts sharing a filesystem.

    Taken by creating the lock file exclusively (``os.link`` of a complete temporary file: atomic,
    also on NFS), holding ``host``, ``pid``, ``started``, ``heartbeat`` (rewritten every
    ``LOCK_HEARTBEAT_S``), a ``token`` and the torchrun job (``run_id``, ``attempt``). A lock is
    stale when its process is gone (same host), its heartbeat is older than ``LOCK_STALE_S`` (any
    host; clocks are assumed to agree within seconds), or an earlier attempt of this torchrun job
    left it; a stale lock is taken over with a message. Any other lock refuses the run
    (:class:`OutputBusy`)."""

    def __init__(self, output: Path, env: DistEnv | None = None):
        env = env or DistEnv()
        self.output = Path(output)
        self.path = Path(str(self.output) + ".lock")
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                     "heartbeat": time.time(), "token": uuid.uuid4().hex, "run_id": env.run_id,
                     "attempt": env.restart_count, "output": str(self.output)}
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading and judging ---------------------------------------------------------------
    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        try:
            data = json.loads((path or self.path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def stale_reason(self, holder: dict[str, Any] | None) -> str | None:
        """Why ``holder``'s lock may be taken over, or None while it is live."""
        if holder is None:
            return "unreadable"
        if holder.get("run_id") and holder.get("run_id") == self.info["run_id"] \
                and int(holder.get("attempt") or 0) < int(self.info["attempt"]):
            return f"left by attempt {holder.get('attempt')} of this torchrun job"
        pid = holder.get("pid")
        if holder.get("host") == self.info["host"] and isinstance(pid, int) and pid != os.getpid() \
                and not _pid_alive(pid):
            return f"its process {pid} on {holder.get('host')} is gone"
        age = time.time() - float(holder.get("heartbeat") or 0)
        if age > LOCK_STALE_S:
            return f"no heartbeat for {age:.0f} s (> {LOCK_STALE_S:g} s)"
        return None

    def busy_message(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat") or 0)
        return (f"{self.output} is being written by another export (pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {_when(holder.get('started'))}, heartbeat {max(0.0, age):.0f} s ago; "
                f"lock {self.path}): wait for it to finish, or stop it and rerun with --resume to continue "
                f"its part files")

    # -- taking and giving back ------------------------------------------------------------
    def _link(self) -> bool:
        tmp = self.path.with_name(f".{self.path.name}.{self.info['token']}")
        tmp.write_text(json.dumps(self.info), encoding="utf-8")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _take_over(self, holder: dict[str, Any] | None) -> bool:
        """Move a stale lock aside; False if what was moved was not the lock judged stale (it is put back)."""
        aside = self.path.with_name(f".{self.path.name}.stale-{self.info['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = self._read(aside)
        same = holder is None or (moved or {}).get("token") == holder.get("token")
        if not same:  # another run took it over in between: give it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(OSError):
            aside.unlink()
        return same

    def acquire(self) -> str | None:
        """Take the lock, or raise :class:`OutputBusy`. Returns the take-over message, if any."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            linked = self._link()
        except OSError as exc:
            raise ExportError(f"output folder is not writable: {self.path.parent} ({exc})") from None
        note = None
        for _ in range(5):
            if linked or self._link():
                self._thread = threading.Thread(target=self._beat, name="yolozu-ttt-lock", daemon=True)
                self._thread.start()
                return note
            holder = self._read()
            reason = self.stale_reason(holder)
            if reason is None:
                assert holder is not None
                raise OutputBusy(self.busy_message(holder))
            if reason == "unreadable" and self.path.exists() \
                    and time.time() - self.path.stat().st_mtime <= LOCK_STALE_S:
                time.sleep(0.2)  # being replaced by its holder's heartbeat: read it again
                continue
            if self._take_over(holder):
                who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "unknown holder"
                note = f"yolozu-ttt export: taking over the stale lock {self.path} ({who}: {reason})"
            linked = False
        holder = self._read() or {}
        raise OutputBusy(self.busy_message(holder))

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            current = self._read()
            if current is not None and current.get("token") != self.info["token"]:
                self.lost = True  # judged stale and taken over by another run
                return
            self.info["heartbeat"] = time.time()
            tmp = self.path.with_name(f".{self.path.name}.beat-{self.info['token']}")
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(self.info), encoding="utf-8")
                os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=LOCK_HEARTBEAT_S + 1)
            self._thread = None
            current = self._read()
            if current is not None and current.get("token") == self.info["token"]:
                with contextlib.suppress(OSError):
                    self.path.unlink()

    @contextlib.contextmanager
    def held(self) -> Iterator["OutputLock"]:
        note = self.acquire()
        if note:
            print(note, file=sys.stderr, flush=True)
        try:
            yield self
        finally:
            self.release()


# --------------------------------------------------------------------------------------
# 2. shard: the records this rank computes, and what a resumable run must agree on
# --------------------------------------------------------------------------------------
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
# 3. work: part files (the durable record), the stream state
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
    """One rank's part file: one JSON line per finished image, flushed before the next starts. A
    write error is a :class:`WriteFailed` naming the file (a BaseException: YOLOZU's ``main`` does
    not catch it); a line cut short by it is ignored by :func:`read_parts`."""

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        try:
            self._handle = open(path, "x", encoding="utf-8")
        except OSError as exc:
            raise WriteFailed(f"cannot write {path}: {strerror(exc)}") from None
        self._last_sync = time.monotonic()
        self._write(header, sync=True)

    def _write(self, obj: dict[str, Any], *, sync: bool = False) -> None:
        try:
            self._handle.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self._handle.flush()  # on disk for the OS: survives a killed process
            now = time.monotonic()
            if sync or now - self._last_sync >= FSYNC_EVERY_S:  # and a machine crash, within ~2 s
                os.fsync(self._handle.fileno())
                self._last_sync = now
        except OSError as exc:
            raise WriteFailed(f"cannot write {self.path}: {strerror(exc)}") from None

    def write(self, entry: dict[str, Any]) -> None:
        self._write(entry)

    def close(self) -> None:
        if not self._handle.closed:
            try:
                self._handle.flush()
                os.fsync(self._handle.fileno())
            except OSError:
                pass  # what could be written is in the file; the write error itself was reported
            finally:
                with contextlib.suppress(OSError):
                    self._handle.close()


class _StoredReport:
    """What YOLOZU's ``main`` needs from a ``TTTReport``: ``to_dict()``."""

    def __init__(self, data: dict[str, Any] | None):
        self._data = data

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data) if self._data is not None else {}


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
    """Rank 0's one bar for the whole dataset: the unique images finished (resumed ones included),
    read once a second from the part files this host sees (every rank's on a shared filesystem,
    rank 0's host's otherwise); never above the total, however many attempts wrote them."""

    def __init__(self, parts_dir: Path, total: int, desc: str):
        self.parts_dir = parts_dir
        self.total = total
        self.seen: set[int] = set()
        self._offsets: dict[str, int] = {}
        self._tails: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._count()
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=self.done(), desc=desc, unit="img", mininterval=PROGRESS_EVERY_S,
                            file=sys.stderr, dynamic_ncols=True)
        except Exception:  # pragma: no cover - tqdm is a yolozu dependency
            self.bar = None
        self._thread = threading.Thread(target=self._loop, name="yolozu-ttt-progress", daemon=True)
        self._thread.start()

    def _count(self) -> None:
        for path in self.parts_dir.glob("part-*.jsonl"):
            key = str(path)
            try:
                with open(path, "rb") as handle:
                    handle.seek(self._offsets.get(key, 0))
                    data = handle.read()
            except OSError:
                continue
            self._offsets[key] = self._offsets.get(key, 0) + len(data)
            lines = (self._tails.get(key, b"") + data).split(b"\n")
            self._tails[key] = lines.pop()  # an unfinished last line: completed by the next read
            for raw in lines:
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    entry = json.loads(raw)
                    if isinstance(entry, dict) and "i" in entry and 0 <= int(entry["i"]) < self.total:
                        self.seen.add(int(entry["i"]))

    def done(self) -> int:
        return min(self.total, len(self.seen))

    def update(self) -> None:
        with self._lock:
            self._count()
            if self.bar is not None and self.done() != self.bar.n:
                self.bar.update(self.done() - self.bar.n)

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
# the run: lock -> shard -> work -> gather -> merge -> publish
# --------------------------------------------------------------------------------------
class ShardedExport:
    """One ``export-predictions`` invocation on one rank (or a single process with ``--resume``)."""

    def __init__(self, mod: Any, args: argparse.Namespace, *, env: DistEnv, resume: bool, timeout_s: float,
                 patches: Callable[..., dict[str, Any]]):
        self.mod = mod
        self.args = args
        self.env = env
        # an elastic restart continues the part files of the attempt before it, without --resume
        self.resume = bool(resume) or env.restart_count > 0
        self.timeout_s = float(timeout_s)
        self._patches = patches
        self.output_path = Path(mod.repo_root / args.output)
        self.publication = Publication(mod.repo_root, args)  # the files the merge writes, published at the end
        self.parts_dir = Path(str(self.output_path) + ".parts")
        self.lock: OutputLock | None = None
        self.records: list[dict[str, Any]] = []
        self.manifest: dict[str, Any] = {}
        self.index_of: dict[int, int] = {}
        self.entries: dict[int, dict[str, Any]] = {}
        self.shard: tuple[int, int] = (0, 0)
        self.token = ""
        self.writer: _PartWriter | None = None
        self.progress: _Progress | None = None
        self.adapter: Any = None
        self.backend: Any = None
        self.current: str | None = None
        self.pending_report: dict[str, Any] | None = None
        self.pending_engine: dict[str, Any] | None = None
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
        self._sigterm: Any = None
        self._busy = False            # between an image's first adaptation step and its part-file line
        self._stop_requested = False  # SIGTERM came while busy: stop once that image is written

    # -- the pipeline ---------------------------------------------------------------------
    def run(self) -> int:
        try:
            self._setup()                      # process group; workers die with their launcher
            self._lock()                       # 1. lock (rank 0), refused before any work
            try:
                self._work()                   # 2. shard + 3. work, inside YOLOZU's main
            except (Terminated, KeyboardInterrupt):
                raise
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    self.parts_dir.rmdir()  # only if nothing is in it (no rank wrote an image)
                self._fail(exc)
            finally:
                if self.writer is not None:
                    self.writer.close()
            statuses = self._gather()          # 4. every rank's finished records to rank 0
            error = None
            if self.env.rank == 0:
                try:
                    self._close_progress()
                    held = self._merge()       # 5. YOLOZU's main writes temporary files
                    self._publish(held)        # 6. os.replace them into place
                except BaseException as exc:
                    error = f"merge failed on rank 0: {type(exc).__name__}: {exc}"
                    self._announce(error)
                    if isinstance(exc, OSError) and (is_write_error(exc) or self.publication.written()):
                        raise self.publication.write_failed(exc, then=self._then()) from None
                    raise
                finally:
                    self.publication.discard()
            if self._announce(error) is None:
                self._remove_parts()
            if self.env.rank == 0:
                self._summary(statuses)
            return 0
        except (Terminated, KeyboardInterrupt) as exc:
            raise self._interrupted(exc) from None
        finally:
            self._close_progress()
            if self.lock is not None:
                self.lock.release()
            self._teardown()

    # -- setup ------------------------------------------------------------------------
    def _setup(self) -> None:
        import torch

        env = self.env
        if env.torchrun:
            die_with_launcher()
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
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

            timeout = datetime.timedelta(seconds=self.timeout_s)
            kwargs: dict[str, Any] = {}
            if env.restart_count > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torchrun keeps its store across restarts: the addresses the attempt before published
                # there would send gloo's connection set-up to dead workers. This attempt's keys get a
                # prefix of their own.
                store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                                      is_master=False, timeout=timeout)
                kwargs = {"store": dist.PrefixStore(f"yolozu-ttt/attempt-{env.restart_count}", store),
                          "rank": env.rank, "world_size": env.world_size}
            dist.init_process_group(self.dist_backend, timeout=timeout, **kwargs)
            self._pg = True

    def _teardown(self) -> None:
        if self._pg:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._pg = False
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    def _lock(self) -> None:
        """Rank 0 takes the output's lock; every rank learns the outcome in one broadcast."""
        refusal = None
        if self.env.rank == 0:
            self.lock = OutputLock(self.output_path, self.env)
            try:
                note = self.lock.acquire()
                if note:
                    print(note, file=sys.stderr, flush=True)
                self._clear_leftovers()
            except ExportError as exc:  # OutputBusy, or an output folder that cannot be written
                self.lock = None
                refusal = (isinstance(exc, OutputBusy), str(exc.code))
        refusal = self._broadcast(refusal)
        if refusal is not None:
            busy, message = refusal
            if busy:  # one line, from rank 0 only
                raise OutputBusy(message if self.env.rank == 0 else None)
            raise ExportError(message)

    def _clear_leftovers(self) -> None:
        """What a killed run on this output left (its temporary files; a stream state cut short)."""
        self.publication.clear_leftovers()
        for path in self.parts_dir.glob(f".{STREAM_STATE}.tmp-*"):
            with contextlib.suppress(OSError):
                path.unlink()

    def _broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (one collective; the identity in one process)."""
        if self.env.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def settings_extra(self) -> dict[str, Any]:
        return {"world_size": int(self.env.world_size), "distributed_backend": self.dist_backend}

    def _where(self, image: str | None = None) -> str:
        text = f"rank {self.env.rank} of {self.env.world_size}"
        return f"{text}, image {image}" if image else text

    # -- 2. shard: preflight (inside YOLOZU's main, after its own flag checks, before any model work)
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

    def _exchange(self, error: str | None, done_here: int) -> None:
        """Every rank's preflight outcome and resumed count, in one ``all_gather_object``."""
        token = uuid.uuid4().hex[:12]
        if self.env.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, (token, error, done_here))
        else:
            gathered = [(token, error, done_here)]
        errors = [e for _, e, _ in gathered if e]
        if errors:
            with contextlib.suppress(OSError):
                self.parts_dir.rmdir()  # only if this run made it and nothing is in it
            raise ExportError(errors[0])
        self.token = gathered[0][0]
        self.resumed = sum(int(n) for _, _, n in gathered)

    def _manifest(self, real_build_manifest: Callable[..., Any]) -> Callable[..., Any]:
        def build_manifest(dataset_root, *a, **kw):
            manifest = real_build_manifest(dataset_root, *a, **kw)
            records = list(manifest["images"])
            if self.args.max_images is not None:
                records = records[: self.args.max_images]
            self.manifest, self.records = manifest, records
            self.index_of = {id(r): i for i, r in enumerate(records)}
            self.fingerprint = fingerprint_args(self.args, [str(r.get("image")) for r in records])
            self.shard = shard_bounds(len(records), self.env.world_size, self.env.rank, self._unit)
            mine = list(range(*self.shard))
            error = self._preflight(mine)
            self._exchange(error, sum(1 for i in mine if i in self.entries))
            self._started = True
            todo = [i for i in mine if i not in self.entries]
            plan = getattr(self.backend, "plan", None)
            if callable(plan):  # --ttt-parallel: the backend cuts its K-groups from this rank's shard
                plan([records[i] for i in todo])
            if self.env.rank == 0:
                self.progress = _Progress(self.parts_dir, len(records),
                                          f"export ({self.env.world_size} worker{'s' if self.env.world_size > 1 else ''})")
            self.entries = {}
            return dict(manifest, images=[records[i] for i in todo])

        return build_manifest

    def _open_part(self) -> None:
        header = {"yolozu_ttt_part": PART_VERSION, "fingerprint": _digest(self.fingerprint),
                  "args": self.fingerprint, "token": self.token, "rank": self.env.rank,
                  "world_size": self.env.world_size, "attempt": self.env.restart_count, "pid": os.getpid(),
                  "host": socket.gethostname(), "started": time.time()}
        self.writer = _PartWriter(self._part_path(), header)

    def _part_path(self) -> Path:
        return self.parts_dir / f"part-{self.token}-r{self.env.rank:05d}.jsonl"

    def _mark_start(self) -> None:
        if self.work_start is None:
            self.work_start = time.time()

    # An image is adapted once: a SIGTERM (torchrun stopping or restarting the group) that comes
    # while an image is in hand stops the rank once that image is in the part file.
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._busy:
            raise Terminated()
        self._stop_requested = True

    def _begin_image(self) -> None:
        self._mark_start()
        if not self._busy:
            if self._stop_requested:
                raise Terminated()
            self._busy = True

    def _end_image(self) -> None:
        self._busy = False
        if self._stop_requested:
            raise Terminated()

    # -- 3. work: the wrappers YOLOZU's main calls ----------------------------------------------
    def _ttt(self, backend: Callable[..., Any]) -> Callable[..., Any]:
        def run_ttt(adapter, records, *, config):
            self._mark_start()
            if str(getattr(config, "reset", "stream")) == "sample":
                self._begin_image()
                self.current = str(records[0].get("image")) if len(records) == 1 else None
                report = backend(adapter, records, config=config)
                self.pending_report = report.to_dict()
                ran = getattr(backend, "last_engine", None)  # the fast backend's adds --ttt-parallel's K
                self.pending_engine = ran() if callable(ran) else last_engine()
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
                self._save_stream_state(state_path, real, flat)
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

    def _save_stream_state(self, path: Path, report: Any, flat: Any) -> None:
        import torch

        tmp = path.with_name(f".{STREAM_STATE}.tmp-{os.getpid()}")
        try:
            torch.save({"fingerprint": _digest(self.fingerprint), "report": json.dumps(report.to_dict()),
                        "engine": json.dumps(last_engine()), "flat": flat}, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise WriteFailed(f"cannot write {path}: {strerror(exc) if isinstance(exc, OSError) else exc}") from None

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
                self._begin_image()
                self.current = str(group[0][1].get("image"))
                preds = real_predict([rec for _, rec in group])
                if len(preds) != len(group):
                    raise RuntimeError(f"predict() returned {len(preds)} entries for {len(group)} images")
                for (idx, rec), pred in zip(group, preds):
                    entry = {"i": idx, "image": rec.get("image"), "prediction": pred, "rank": self.env.rank,
                             "t": round(time.time(), 3)}
                    if self.pending_report is not None:
                        entry["report"] = self.pending_report
                        entry["engine"] = self.pending_engine
                    if self.writer is None:  # a part file exists once it holds an image
                        self._open_part()
                    self.writer.write(entry)
                    self.computed += 1
                self.pending_report = None
                self._end_image()
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

    # -- 5. merge: the wrappers of YOLOZU's second main ---------------------------------------
    def _replay_ttt(self, adapter, records, *, config):
        if str(getattr(config, "reset", "stream")) == "sample":
            return _StoredReport(self.entries[self.index_of[id(records[0])]].get("report"))
        return _StoredReport(self.stream_report)

    def _replay_predict(self, records):
        return [self.entries[self.index_of[id(rec)]]["prediction"] for rec in records]

    # -- YOLOZU's main, with our namespace and rebound globals -------------------------------
    def _main_ns(self, **changes: Any) -> argparse.Namespace:
        ns = copy.deepcopy(self.args)
        ns.max_images = None  # applied by our build_manifest, before sharding
        ns.device = self.device
        for key, value in changes.items():
            setattr(ns, key, value)
        return ns

    def _run_main(self, ns: argparse.Namespace, names: dict[str, Any]) -> None:
        from .seam import rebound

        def _parse_args(_argv: Any) -> argparse.Namespace:
            return ns

        with rebound(self.mod, _parse_args=_parse_args, **names):
            self.mod.main([])

    def _work(self) -> None:
        """2. shard and 3. work: YOLOZU's main over this rank's shard, output to a scratch file."""
        mod = self.mod
        base = self._patches(self.settings_extra())
        backend = self.backend = base.pop("run_ttt", mod.run_ttt)
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

    def _gather(self) -> list[dict[str, Any]]:
        """4. gather: each rank's status and the finished records of its shard (from its part files,
        earlier attempts included) go to rank 0 in one ``gather_object``; rank 0 adds what its own
        host's part files hold (every rank's, on a shared filesystem)."""
        _, local = read_parts(self.parts_dir)
        start, stop = self.shard
        status = {"rank": self.env.rank, "computed": self.computed, "start": self.work_start, "end": self.work_end,
                  "entries": {i: e for i, e in local.items() if start <= i < stop}}
        if self.env.world_size == 1:
            statuses: list[Any] = [status]
        else:
            import torch.distributed as dist

            statuses = [None] * self.env.world_size if self.env.rank == 0 else []
            try:
                dist.gather_object(status, statuses if self.env.rank == 0 else None, dst=0)
            except Exception as exc:  # a peer died, or did not come within --dist-timeout
                raise ExportError(f"yolozu-ttt export: {self._where()} lost the other workers while gathering "
                                  f"the results ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                  f"{self._then()}") from None
        if self.env.rank != 0:
            return []
        self.entries = local
        for s in statuses:
            for i, entry in s.pop("entries").items():
                self.entries.setdefault(int(i), entry)
        return statuses

    def _merge(self) -> HeldLines:
        """5. merge (rank 0): YOLOZU's main over the whole dataset, answered from the gathered
        records, writing the output and its logs to temporary paths; returns the lines it printed
        that name them (printed once they are published)."""
        mod = self.mod
        missing = [i for i in range(len(self.records)) if i not in self.entries]
        if missing:
            raise ExportError(f"merge: the part files in {self.parts_dir} lack {len(missing)} image(s), e.g. "
                              f"{self.records[missing[0]].get('image')}; rerun with --resume")
        ran = next((e["engine"] for e in self.entries.values() if e.get("engine")), None)
        if bool(getattr(self.args, "ttt", False)):
            self.stream_report, stream_engine = self._load_stream_state_any(self.parts_dir / STREAM_STATE)
            ran = ran or stream_engine
        names = self._patches(self.settings_extra(), ran)  # ran: what adapted, where this rank did not
        names["run_ttt"] = self._replay_ttt
        names["build_manifest"] = lambda *a, **kw: dict(self.manifest, images=self.records)
        for name in ADAPTER_NAMES:
            names[name] = self._adapter_factory(getattr(mod, name), replay=True)
        held = HeldLines(sys.stdout, self.publication)
        try:
            with contextlib.redirect_stdout(held):
                self._run_main(self._main_ns(**self.publication.changes()), names)
        finally:
            if self.adapter is not None:
                with contextlib.suppress(AttributeError):
                    del self.adapter.predict
        return held

    def _publish(self, held: HeldLines) -> None:
        """6. publish (rank 0): each temporary file fsync-ed and ``os.replace``-d onto its final
        path (the logs naming the final output); then the lines naming them are printed."""
        self.publication.finish_logs()
        self.publication.publish()
        held.release()

    def _announce(self, error: str | None) -> str | None:
        """Rank 0 tells every rank whether the output is in place (one broadcast)."""
        error = self._broadcast(error)
        if error is not None and self.env.rank != 0:
            raise ExportError(f"{error}; the part files stay in {self.parts_dir}: rerun with --resume")
        return error

    def _remove_parts(self) -> None:
        """The output is in place: rank 0 removes the parts folder, every other rank its own part
        files (on hosts that do not share rank 0's filesystem)."""
        if self.env.rank == 0:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            return
        with contextlib.suppress(OSError):  # on rank 0's filesystem the folder may be gone already
            for path in list(self.parts_dir.glob(f"part-*-r{self.env.rank:05d}.jsonl")):
                with contextlib.suppress(OSError):
                    path.unlink()
            self.parts_dir.rmdir()

    def _close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def _load_stream_state_any(self, path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The stream adaptation's (report, engine), from the saved state."""
        if not path.is_file():
            return None, None
        import torch

        saved = torch.load(path, map_location="cpu", weights_only=True)
        return json.loads(saved["report"]), json.loads(saved.get("engine") or "null")

    # -- failures and the summary ---------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, Fault):  # a write error of ours (part file, stream state): one line
            raise WriteFailed(f"{exc.message}; {self.publication.kept()}; {self._then()} "
                              f"({self._where(self.current)})", exc.status) from None
        if is_write_error(exc):
            raise self.publication.write_failed(exc, then=self._then()).located(self._where(self.current)) from None
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
        raise ExportError(message) from (exc if not isinstance(exc, SystemExit) else None)

    def _then(self) -> str:
        """What happens to the finished images next, and what the user does."""
        left = self.env.max_restarts - self.env.restart_count
        then = (f"torchrun restarts the workers ({left} restart(s) left) and they continue from them"
                if self.env.torchrun and left > 0 else "rerun with --resume")
        return f"the images finished so far stay in {self.parts_dir}: {then}"

    def _interrupted(self, exc: BaseException) -> Fault:
        """Ctrl-C or SIGTERM: one line, what was kept and how to continue; exit 130 / 143."""
        how, status = signal_name(exc)
        why = " (torchrun stops every worker when one fails)" if self.env.torchrun and status != 130 else ""
        return Interrupted(f"{self._where()} stopped by {how}{why}; {self.publication.kept()}; {self._then()}",
                           status)

    def _summary(self, statuses: list[dict[str, Any]]) -> None:
        computed = sum(int(s.get("computed") or 0) for s in statuses)
        starts = [s["start"] for s in statuses if s.get("start")]
        ends = [s["end"] for s in statuses if s.get("end")]
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


def run_sharded(mod: Any, args: argparse.Namespace, *, env: DistEnv | None, resume: bool, timeout_s: float,
                patches: Callable[..., dict[str, Any]]) -> int:
    """Run one ``export-predictions`` as rank ``env.rank`` of ``env.world_size`` (or alone, with
    ``--resume``). ``patches(extra_settings, ran=None)`` returns the cli's own module rebindings (the backend's
    ``run_ttt`` and the settings wrapper, which adds ``extra_settings`` to the ``ttt`` block)."""
    if timeout_s <= 0:
        raise ExportError(f"--dist-timeout must be > 0 seconds (got {timeout_s:g})")
    job = ShardedExport(mod, args, env=env or DistEnv(), resume=resume, timeout_s=timeout_s, patches=patches)
    return job.run()
