"""The flags yolozu-ttt adds to YOLOZU's commands and their checks, each written once: used by
``export-predictions`` (:mod:`yolozu_ttt.cli`) and ``yolozu-ttt export`` (:mod:`yolozu_ttt.orchestrate`).

Every flag defaults to ``argparse.SUPPRESS`` where YOLOZU's namespace must stay YOLOZU's, and
:func:`take` removes ours from the namespace and checks them (a usage error, exit 2, before
anything runs)."""
from __future__ import annotations

import argparse
import dataclasses

PROG = "yolozu-ttt"
TTT_BACKENDS = ("reference", "fast")
BACKEND_FLAG = "--ttt-backend"
RESUME_FLAG = "--resume"
TIMEOUT_FLAG = "--dist-timeout"
AMP_FLAG = "--ttt-amp"
PARALLEL_FLAG = "--ttt-parallel"
OUR_FLAGS = (BACKEND_FLAG, RESUME_FLAG, TIMEOUT_FLAG, AMP_FLAG, PARALLEL_FLAG)


def add_amp(parser: argparse.ArgumentParser, help: str) -> None:
    from .amp import AMP_MODES

    parser.add_argument(AMP_FLAG, choices=AMP_MODES, default=argparse.SUPPRESS, help=help)


def add_parallel(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(PARALLEL_FLAG, type=int, default=argparse.SUPPRESS, metavar="K", help=help)


def add_backend(parser: argparse.ArgumentParser, default: str, help: str) -> None:
    parser.add_argument(BACKEND_FLAG, choices=TTT_BACKENDS, default=default, help=help)


def check_amp(parser: argparse.ArgumentParser, amp: str, backend: str) -> None:
    """``--ttt-amp`` other than off: a usage error (exit 2) unless on the fast backend."""
    if amp != "off" and backend != "fast":
        parser.error(f"{AMP_FLAG} {amp} needs {BACKEND_FLAG} fast: YOLOZU's reference run_ttt has no "
                     "mixed-precision mode (it always adapts in fp32)")


def check_parallel(parser: argparse.ArgumentParser, parallel: int, backend: str, reset: str) -> None:
    """``--ttt-parallel K``: a usage error (exit 2, before anything is written) unless K >= 1, and
    K > 1 only in sample mode (``reset``) on the fast backend."""
    if parallel < 1:
        parser.error(f"{PARALLEL_FLAG} must be >= 1 (got {parallel})")
    if parallel > 1 and backend != "fast":
        parser.error(f"{PARALLEL_FLAG} {parallel} needs {BACKEND_FLAG} fast: YOLOZU's reference run_ttt adapts "
                     "one image at a time")
    if parallel > 1 and str(reset) != "sample":
        parser.error(f"{PARALLEL_FLAG} {parallel} needs --ttt-reset sample: stream mode adapts one model over the "
                     "whole dataset in order, so there is no image to adapt beside another")


@dataclasses.dataclass(frozen=True)
class Ours:
    """Our flags' values, taken out of YOLOZU's namespace."""

    backend: str
    amp: str = "off"
    parallel: int = 1


def take(parser: argparse.ArgumentParser, args: argparse.Namespace, *, keep_backend: bool) -> Ours:
    """Remove ``--ttt-amp`` and ``--ttt-parallel`` (and ``--ttt-backend`` unless ``keep_backend``:
    ``export-predictions`` keeps it in the namespace, as it always has) from ``args`` and check
    them against the backend and ``--ttt-reset``."""
    ns = vars(args)
    backend = ns["ttt_backend"] if keep_backend else ns.pop("ttt_backend", "reference")
    ours = Ours(backend, ns.pop("ttt_amp", "off"), ns.pop("ttt_parallel", 1))
    check_amp(parser, ours.amp, ours.backend)
    check_parallel(parser, ours.parallel, ours.backend, getattr(args, "ttt_reset", "stream"))
    return ours
