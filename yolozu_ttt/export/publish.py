"""Publishing an export's files atomically, and the one line a failed or interrupted export ends in.

Every ``export-predictions`` (one process, ``--resume``, torchrun; any backend) hands YOLOZU's
``main`` temporary paths beside the real ones (``.<name>.tmp-<pid>``) for everything it writes:
the output and the TTA / TTT logs its flags ask for (:class:`Publication`). YOLOZU's ``main``
deletes and writes those; the earlier files stay in place, untouched, until each temporary file is
fsync-ed and ``os.replace``-d onto its real path (:meth:`Publication.publish`). Lines ``main``
prints that name a temporary path are held back, with the real path in its place, until then
(:class:`HeldLines`); the logs' ``output`` field names the real output.

A run that fails or is interrupted removes its temporary files and ends in one line (a
:class:`Fault`): a write error (:class:`WriteFailed`, exit 1) names the path; Ctrl-C and SIGTERM
(:class:`Interrupted`, exit 130 / 143) say what was kept and how to continue. Temporary files, and
the kept-aside ``.<name>.kept-<pid>`` links of earlier releases, that a SIGKILL left are removed by
the next run on the same output once it holds the output's lock (:meth:`Publication.clear_leftovers`).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

LEFTOVERS = ("tmp", "kept")  # .<name>.tmp-<pid> (ours), .<name>.kept-<pid> (earlier releases)
#: errno values that mean "this write cannot be done here" whatever the file
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
SIGINT_STATUS, SIGTERM_STATUS = 128 + int(signal.SIGINT), 128 + int(signal.SIGTERM)


class Fault(SystemExit):
    """A failed write or an interrupt: one line (``message``, no traceback) and the exit
    ``status``. Uncaught, it prints the line and exits 1, as any ``SystemExit(str)``."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message, self.status = message, int(status)

    def located(self, where: str) -> "Fault":
        return type(self)(f"{self.message} ({where})", self.status)


class WriteFailed(Fault):
    def __init__(self, message: str, status: int = 1):
        super().__init__(message, status)


class Interrupted(Fault):
    """Ctrl-C (exit 130) or SIGTERM (exit 143)."""


class Terminated(BaseException):
    """SIGTERM, raised where the run is (a BaseException, so YOLOZU's ``except Exception`` around
    ``run_ttt`` does not turn it into a ``TTT failed`` message)."""


def temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_write_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS


def strerror(exc: OSError) -> str:
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else str(exc)


def signal_name(exc: BaseException) -> tuple[str, int]:
    """(how the run was stopped, its exit status) for a KeyboardInterrupt or a :class:`Terminated`."""
    if isinstance(exc, KeyboardInterrupt):
        return "Ctrl-C (SIGINT)", SIGINT_STATUS
    return "SIGTERM", SIGTERM_STATUS


@contextlib.contextmanager
def sigterm_raises(handler: Any = None) -> Iterator[None]:
    """SIGTERM calls ``handler`` (default: raise :class:`Terminated`) for the block; in the main
    thread only (elsewhere signals cannot be handled and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise Terminated()

    saved = signal.signal(signal.SIGTERM, handler or _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


class Publication:
    """The files one run of YOLOZU's ``main`` writes, as (flag, temporary, final): ``--output``,
    and ``--tta-log-out`` / ``--ttt-log-out`` where ``--tta`` / ``--ttt`` is on (YOLOZU's ``main``
    writes a log only then), relative paths under its ``repo_root`` as it resolves them."""

    def __init__(self, repo_root: Path, args: Any):
        root = Path(repo_root)
        self.items: list[tuple[str, Path, Path]] = []
        wanted = (("output", True), ("tta_log_out", bool(getattr(args, "tta", False))),
                  ("ttt_log_out", bool(getattr(args, "ttt", False))))
        for flag, on in wanted:
            value = getattr(args, flag, None)
            if on and value:
                final = Path(value) if Path(value).is_absolute() else root / value
                self.items.append((flag, temporary(final), final))
        self.output = self.items[0][2]
        self.published: list[Path] = []

    def changes(self) -> dict[str, str]:
        """The namespace changes that send YOLOZU's ``main`` to the temporary paths."""
        return {flag: str(tmp) for flag, tmp, _ in self.items}

    def rename(self, text: str) -> str:
        for _, tmp, final in self.items:
            text = text.replace(str(tmp), str(final))
        return text

    def names_temporary(self, text: str) -> bool:
        return any(str(tmp) in text for _, tmp, _ in self.items)

    def clear_leftovers(self) -> list[Path]:
        """Remove what a killed run on these files left beside them (its temporary files, the
        kept-aside links of earlier releases); called while holding the output's lock."""
        removed = []
        for _, tmp, final in self.items:
            for kind in LEFTOVERS:
                for path in final.parent.glob(f".{final.name}.{kind}-*"):
                    if path != tmp and path.name.rsplit("-", 1)[-1].isdigit():
                        with contextlib.suppress(OSError):
                            path.unlink()
                            removed.append(path)
        return removed

    def written(self) -> Path | None:
        """The final path of the last temporary file that exists: the one being written when a
        write failed (YOLOZU's ``main`` writes them in order)."""
        found = None
        for _, tmp, final in self.items:
            if tmp.exists():
                found = final
        return found

    def finish_logs(self) -> None:
        """The logs name the output they belong to: its final path, not the temporary one."""
        (_, out_tmp, out_final), logs = self.items[0], self.items[1:]
        for _, tmp, final in logs:
            if tmp.is_file():
                try:
                    text = tmp.read_text(encoding="utf-8")
                    tmp.write_text(text.replace(json.dumps(str(out_tmp)), json.dumps(str(out_final))), encoding="utf-8")
                except OSError as exc:
                    raise self.write_failed(exc, final) from None

    def publish(self) -> None:
        """Each temporary file fsync-ed and ``os.replace``-d onto its final path, in order."""
        for _, tmp, final in self.items:
            if not tmp.is_file():
                continue
            try:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.replace(tmp, final)
                self.published.append(final)
            except OSError as exc:
                raise self.write_failed(exc, final) from None

    def discard(self) -> None:
        for _, tmp, _ in self.items:
            with contextlib.suppress(OSError):
                tmp.unlink()

    # -- what is kept -------------------------------------------------------------------------
    def kept(self) -> str:
        """The earlier files, which are in place, untouched, until their temporary files are published."""
        there = [str(f) for _, _, f in self.items if f.exists() and f not in self.published]
        said = [f"the earlier {', '.join(there)} {'is' if len(there) == 1 else 'are'} kept unchanged"] if there else []
        said += [f"{', '.join(map(str, self.published))} published"] if self.published else []
        return "; ".join(said) or f"no earlier {self.output} existed and none was written"

    def write_failed(self, exc: OSError, path: Path | None = None, then: str = "") -> WriteFailed:
        path = path or (Path(exc.filename) if exc.filename else None) or self.written() or self.output
        line = f"cannot write {self.rename(str(path))}: {strerror(exc)}; {self.kept()}"
        return WriteFailed(f"{line}; {then}" if then else line)

    def interrupted(self, exc: BaseException, then: str) -> Interrupted:
        how, status = signal_name(exc)
        return Interrupted(f"stopped by {how}; {self.kept()}; {then}", status)


class HeldLines(io.TextIOBase):
    """``sys.stdout`` while YOLOZU's ``main`` runs: each line naming a temporary path is held back,
    with the final path in its place, until :meth:`release` (after publishing); every other line
    passes straight through."""

    def __init__(self, real: Any, publication: Publication):
        self.real, self.publication = real, publication
        self._pending = ""
        self.held: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            self._line(line + "\n")
        return len(text)

    def _line(self, line: str) -> None:
        if self.publication.names_temporary(line):
            self.held.append(self.publication.rename(line))
        else:
            self.real.write(line)

    def flush(self) -> None:
        self.real.flush()

    def release(self) -> None:
        if self._pending:
            self._line(self._pending)
            self._pending = ""
        self.real.write("".join(self.held))
        self.held = []
        self.real.flush()


def run_published(run: Any, publication: Publication, *, then_interrupted: str, then_failed: str = "") -> None:
    """``run()`` (YOLOZU's ``main`` writing ``publication``'s temporary paths), then the files
    published; whatever way it ends, no temporary file is left, and a write error, Ctrl-C or
    SIGTERM ends in one :class:`Fault`. A write error is an OSError with a write errno
    (:data:`WRITE_ERRNOS`), or any OSError once ``main`` has begun writing its files."""
    import sys

    held = HeldLines(sys.stdout, publication)
    try:
        with sigterm_raises(), contextlib.redirect_stdout(held):
            try:
                run()
            except OSError as exc:
                if is_write_error(exc) or publication.written() is not None:
                    raise publication.write_failed(exc, then=then_failed) from None
                raise
            publication.finish_logs()
            publication.publish()
        held.release()
    except (KeyboardInterrupt, Terminated) as exc:
        raise publication.interrupted(exc, then_interrupted) from None
    finally:
        publication.discard()
