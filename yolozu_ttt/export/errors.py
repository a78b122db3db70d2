"""The export's refusals and failures (``SystemExit``: their message is printed, the exit status is 1)."""
from __future__ import annotations


class ExportError(SystemExit):
    """A sharded-export failure: its message is printed and the exit status is 1."""


class OutputBusy(ExportError):
    """Another live export holds the output's lock (the cli prints it and exits 2)."""
