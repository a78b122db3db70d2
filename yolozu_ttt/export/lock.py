"""The output lock: one live export per output (``<output>.lock``), on one host or across hosts."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from .dist import DistEnv
from .errors import ExportError, OutputBusy, say

LOCK_HEARTBEAT_S = 5.0   # the lock holder rewrites its heartbeat this often
LOCK_STALE_S = 60.0      # a lock whose heartbeat is older than this is stale (any host)


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
            say(note)
        try:
            yield self
        finally:
            self.release()

