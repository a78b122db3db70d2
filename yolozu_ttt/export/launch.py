"""``yolozu-ttt torchrun [TORCHRUN OPTIONS] export-predictions [EXPORT FLAGS]``: the export's launcher.

torch's own launcher (``torch.distributed.run``: its parser, every option, and its ``run``) with
``python -m yolozu_ttt export-predictions ...`` as every worker's command, so a dataset-scale
export ends the way a one-process one does:

- Ctrl-C or SIGTERM to the launcher: torch's agent passes the signal on to the workers, each of
  which ends in its own line (what it kept, exit 130 / 143); the launcher then prints one line
  (how to continue: ``--resume``) and exits 130 / 143, where bare ``torchrun`` ends in its
  ``SignalException`` traceback.
- a failed worker (its own line printed already): one line naming the first failure, and its exit
  status, where bare ``torchrun`` prints a traceback and its failure table.

torch's agent's own notes on that shutdown (``Received ... death signal``, ``Sending process ...
closing signal``: one per worker) are left out (:class:`QuietShutdown`); its other messages stay.
Everything else (the rendezvous, ``--max-restarts``, the workers' environment, the workers' death
with the launcher) is torch's launcher's, unchanged.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
from typing import Iterator, Sequence

from ..flags import PROG
from .errors import say

COMMAND = "export-predictions"
NAME = f"{PROG} torchrun"
#: torch's options that choose what the workers run: the launcher sets that itself
WORKER_OPTIONS = ("-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path")

USAGE = f"""usage: {NAME} [TORCHRUN OPTIONS] {COMMAND} [EXPORT FLAGS]

torch's launcher (torchrun) with `{PROG} {COMMAND}` as every worker's command: the same
options (e.g. --standalone --nproc-per-node 4, --nnodes, --rdzv-endpoint, --max-restarts), and
one line, no traceback, when it is stopped (Ctrl-C: exit 130, SIGTERM: exit 143; rerun with
--resume to continue from the images finished so far) or a worker fails (its exit status).
Run `{PROG} {COMMAND} --help` for the export's flags; torchrun's options follow.
"""


class QuietShutdown(logging.Filter):
    """Leaves out torch's agent's notes on stopping its workers (the workers and the launcher each
    say it in their own line); every other record passes."""

    #: (logger, message template) of the notes left out
    NOTES = (("torch.distributed.elastic.agent.server.api", "Received %s death signal, shutting down workers"),
             ("torch.distributed.elastic.multiprocessing.api", "Sending process %s closing signal %s"))

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.name, record.msg) not in self.NOTES


@contextlib.contextmanager
def quiet_shutdown() -> Iterator[None]:
    """:class:`QuietShutdown` on torch's two loggers for the block."""
    quiet = QuietShutdown()
    loggers = {logging.getLogger(name) for name, _ in QuietShutdown.NOTES}
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _split(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(torchrun's options, the export's flags) around the command word, or None without it."""
    if COMMAND not in argv:
        return None
    at = argv.index(COMMAND)
    return argv[:at], argv[at + 1:]


def _stopped(sigval: int) -> int:
    """The launcher was stopped by ``sigval``: its one line; the exit status 128 + the signal."""
    sig = signal.Signals(int(sigval))
    how = "Ctrl-C (SIGINT)" if sig == signal.SIGINT else sig.name
    say(f"{NAME}: stopped by {how}; every worker was stopped and said above what it kept; rerun the same "
        f"command with --resume to continue from the images finished so far")
    return 128 + int(sig)


def _failed(failures: dict) -> int:
    """Workers failed (each printed its own line): one line naming the first; its exit status (128
    + the signal for a worker a signal ended)."""
    rank = min(failures, key=lambda r: failures[r].timestamp)
    failure = failures[rank]
    code = int(failure.exitcode)
    status = code if code > 0 else 128 + (-code if code < 0 else 1)
    how = f"signal {failure.signal_name()}" if code < 0 else f"exit status {code}"
    others = f" ({len(failures)} workers failed)" if len(failures) > 1 else ""
    say(f"{NAME}: worker rank {rank} ended with {how}{others}; its own line above says why")
    return status


def launch(argv: Sequence[str]) -> int:
    """Run the export under torch's launcher; the launcher's exit status (see the module docstring)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        from torch.distributed.run import get_args_parser

        print(USAGE)
        get_args_parser().print_help()
        return 0 if argv else 2
    split = _split(argv)
    if split is None:
        print(USAGE, end="", file=sys.stderr)
        print(f"{NAME}: error: the command is missing: {NAME} [TORCHRUN OPTIONS] {COMMAND} ...", file=sys.stderr)
        return 2
    options, flags = split
    chosen = [o for o in options if o.split("=", 1)[0] in WORKER_OPTIONS]
    if chosen:
        print(f"{NAME}: error: {chosen[0]} is not an option here: every worker runs `{PROG} {COMMAND}`",
              file=sys.stderr)
        return 2

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([*options, "--module", "yolozu_ttt", COMMAND, *flags])
    try:
        with quiet_shutdown():
            record(run)(args)  # as torch's own main: a scheduler's error file gets the first failure
    except SignalException as exc:
        return _stopped(exc.sigval)
    except ChildFailedError as exc:
        return _failed(exc.failures)
    except KeyboardInterrupt:  # Ctrl-C before torch's agent took the signal over (or after it gave it back)
        return _stopped(signal.SIGINT)
    return 0
