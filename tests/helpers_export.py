"""Helpers for the export fault tests: process trees, and a worker entry point that records adaptations.

Run as a script (``torchrun ... tests/helpers_export.py export-predictions ...``) it is
``yolozu-ttt`` with ``FastBackend.__call__`` wrapped: each adaptation appends ``start`` and ``end``
lines (rank, attempt, image) to ``$YTTT_ADAPT_LOG``; with ``$YTTT_KILL_AT=R:K`` rank R of the first
attempt SIGKILLs itself when its K-th adaptation starts (a worker dying mid-run, deterministically).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


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


def _log(kind: str, image: str) -> None:
    line = {"kind": kind, "rank": int(os.environ.get("RANK", 0)),
            "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)), "image": image}
    with open(os.environ["YTTT_ADAPT_LOG"], "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def main() -> int:
    from yolozu_ttt import cli

    real = cli.FastBackend.__call__
    kill_rank, kill_at = (int(x) for x in os.environ.get("YTTT_KILL_AT", "-1:0").split(":"))
    started = [0]

    def recorded(self, adapter, records, *, config):
        image = str(records[0].get("image")) if len(records) == 1 else "*"
        started[0] += 1
        _log("start", image)
        if (int(os.environ.get("RANK", 0)), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))) == (kill_rank, 0) \
                and started[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        report = real(self, adapter, records, config=config)
        _log("end", image)
        return report

    cli.FastBackend.__call__ = recorded
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
