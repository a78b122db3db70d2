"""The export's refusals and failures (``SystemExit``: their message is printed, the exit status is
1), and how a process says its one line."""
from __future__ import annotations

import sys


def say(line: str) -> None:
    """``line`` and its newline on stderr in one write: torchrun's workers share the launcher's
    stderr and run unbuffered (``python -u``), where ``print`` writes the text and the newline
    apart and two workers' lines can run together on one line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class ExportError(SystemExit):
    """A sharded-export failure: its message is printed and the exit status is 1."""


class OutputBusy(ExportError):
    """Another live export holds the output's lock (the cli prints it and exits 2)."""
