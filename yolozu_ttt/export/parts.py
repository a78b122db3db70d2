"""The part files: what a resumable run must agree on (the fingerprint), the shards, one rank's
part writer (the durable record of finished images) and rank 0's progress bar over all of them."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .publish import WriteFailed, strerror

PART_VERSION = 1
FSYNC_EVERY_S = 2.0
PROGRESS_EVERY_S = 1.0
# flags that name where things go, not what is computed: not part of the fingerprint
UNFINGERPRINTED = ("output", "ttt_log_out", "tta_log_out")


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
    from .. import __version__

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


def digest(fp: dict[str, Any]) -> str:
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


class PartWriter:
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



class Progress:
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


