"""The private YOLOZU names yolozu-ttt relies on, in one place, and the YOLOZU range it supports.

Each name is a plain import, so an unsupported YOLOZU fails here, at import, naming the missing
name, instead of half-way through a run.
"""
from __future__ import annotations

SUPPORTED_YOLOZU = ">=4.12,<5"  # as pyproject.toml's dependency

# ``yolozu export``'s body (fills the default --dataset, runs the orchestrator with YOLOZU's own
# subprocess runner and run meta, prints the output path): ``yolozu-ttt export`` calls it as is
from yolozu.cli_commands import _cmd_export  # noqa: E402,F401
# its subprocess runner: ``yolozu-ttt export --ttt-backend fast`` rebinds this module global for
# the call, so the export subprocess is this package's ``export-predictions``
from yolozu.cli_commands import _subprocess_or_die  # noqa: E402,F401
# Tent's entropy loss, as YOLOZU's run_ttt computes it: the floor's loss (yolozu_ttt.floor)
from yolozu.tta.integration import _entropy_loss_from_logits  # noqa: E402,F401
