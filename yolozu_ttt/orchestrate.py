"""``yolozu-ttt export``: YOLOZU's ``yolozu export`` (its orchestrator) with the fast backend.

``yolozu export`` (``yolozu.inference.export_orchestrator.export_with_backend``) fingerprints the
configuration, reuses a cached or existing output, and for ``--backend torch``/``dummy`` runs
``python -m yolozu.inference.export_predictions_cli ...`` in a subprocess, then adds its run meta
(config hash, git, platform, timestamp) to the artefact. This command is that command:

* its parser is YOLOZU's ``parse_common_export_args`` (every flag of ``yolozu export``), plus
  ``--ttt-backend {reference,fast}``, ``--ttt-amp {off,bf16,fp16}`` and ``--ttt-parallel K``, all
  of which default to ``argparse.SUPPRESS`` and are removed before YOLOZU sees the namespace (K is
  checked as ``export-predictions`` checks it, before anything runs);
* without ``--ttt``, or with ``--ttt-backend reference``, YOLOZU's own ``export`` body
  (``yolozu.cli_commands._cmd_export``) runs on the namespace YOLOZU's parser produced, with
  nothing patched but the existing-output check below (with ``--ttt``): the artefact is
  ``yolozu export``'s, byte for byte but its timestamps (and, with ``--ttt``, the report's measured
  ``seconds`` and peak RSS, which differ between any two runs of ``yolozu export``);
* with ``--ttt --ttt-backend fast``, the same body runs with one name rebound for the call: the
  subprocess runner (``yolozu.cli_commands._subprocess_or_die``) is wrapped so that the export
  subprocess is ``python -m yolozu_ttt export-predictions ... --ttt-backend fast [--ttt-amp M]
  [--ttt-parallel K]``
  (this package's ``export-predictions``: YOLOZU's export CLI on the fused engine) instead of
  YOLOZU's module; every other command passes through unchanged. That subprocess records
  ``"backend": "fast"``, the ``engine`` that ran (and ``amp``) in the artefact's ``meta.ttt``, which
  the orchestrator keeps. It needs ``--backend torch`` or ``dummy`` (the other backends' ``--ttt`` is
  YOLOZU's score-only lite mode, which runs no ``run_ttt``): refused otherwise. An existing output (or cache entry) is reused only when it was made by
  the same backend and precision: YOLOZU's config fingerprint has no backend field, so without
  that check a reference artefact would be returned for a fast request (and the other way round).
  K is not part of that check: every K gives each image what it gets alone.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

from .flags import AMP_FLAG, BACKEND_FLAG, PARALLEL_FLAG, PROG, add_amp, add_backend, add_parallel, take

EXPORTER_MODULE = "yolozu.inference.export_predictions_cli"
OUR_COMMAND = ("-m", "yolozu_ttt", "export-predictions")
TORCH_BACKENDS = ("torch", "dummy")  # the backends whose export subprocess runs run_ttt


def build_parser() -> argparse.ArgumentParser:
    """``yolozu export``'s parser (YOLOZU's ``parse_common_export_args``) plus our three flags."""
    from yolozu.inference.export_orchestrator import parse_common_export_args

    parser = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description=(
            "YOLOZU's `yolozu export` (every flag is YOLOZU's), plus --ttt-backend and --ttt-amp: "
            "with --ttt --ttt-backend fast its export subprocess is `yolozu-ttt export-predictions` "
            "on the fused engine."
        ),
    )
    parse_common_export_args(parser)
    add_backend(
        parser, argparse.SUPPRESS,
        help="Which run_ttt executes --ttt: 'reference' (YOLOZU unchanged, the default) or 'fast' "
             "(yolozu_ttt's engine, recorded as backend/engine in meta.ttt). No effect without --ttt.",
    )
    add_amp(
        parser,
        help="Precision of the --ttt adaptation passes (fast backend only; default: off).",
    )
    add_parallel(
        parser,
        help="Adapt K images at once, each by its own replica (fast backend, --ttt-reset sample; default: 1).",
    )
    return parser


def fast_command(cmd: list[str], amp: str, parallel: int = 1) -> list[str]:
    """YOLOZU's exporter command with this package's ``export-predictions`` in its place (same
    interpreter, same arguments, plus ``--ttt-backend fast``, ``--ttt-amp`` and
    ``--ttt-parallel``); other commands unchanged."""
    if len(cmd) < 3 or list(cmd[1:3]) != ["-m", EXPORTER_MODULE]:
        return list(cmd)
    ours = [cmd[0], *OUR_COMMAND, *cmd[3:], BACKEND_FLAG, "fast"]
    if amp != "off":
        ours += [AMP_FLAG, amp]
    if parallel != 1:
        ours += [PARALLEL_FLAG, str(parallel)]
    return ours


def _made_by(path: Path) -> tuple[str, str]:
    """(backend, amp) an existing artefact records in ``meta.ttt`` (YOLOZU's: reference, off)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("meta") or {}
    except (OSError, ValueError, AttributeError):
        return "reference", "off"  # YOLOZU's own check reports unreadable files
    ttt = meta.get("ttt") if isinstance(meta, dict) else None
    ttt = ttt if isinstance(ttt, dict) else {}
    return str(ttt.get("backend", "reference")), str(ttt.get("amp", "off"))


def _same_backend_check(original: Callable[..., None], want: tuple[str, str]) -> Callable[..., None]:
    def ensure_output_matches(path: Path, *, expected_config_hash: str) -> None:
        original(path, expected_config_hash=expected_config_hash)
        made = _made_by(Path(path))
        if made != want:
            raise SystemExit(
                f"existing output was made by the {made[0]} backend (amp {made[1]}), not {want[0]} "
                f"(amp {want[1]}): {path} (use --force to replace it)"
            )

    return ensure_output_matches


def export(argv: Sequence[str]) -> int:
    from .seam import cli_commands, export_orchestrator, rebound

    parser = build_parser()
    args = parser.parse_args(list(argv))
    ours = take(parser, args, keep_backend=False)
    backend, amp, parallel = ours.backend, ours.amp, ours.parallel
    if backend == "fast" and args.ttt and str(args.backend) not in TORCH_BACKENDS:
        parser.error(f"{BACKEND_FLAG} fast needs --backend torch or dummy: YOLOZU's --backend {args.backend} "
                     "runs no run_ttt (its --ttt is the score-only lite mode)")
    if not args.ttt:
        return int(cli_commands._cmd_export(args))  # YOLOZU's `yolozu export`, nothing patched

    check = _same_backend_check(export_orchestrator.ensure_output_matches, (backend, amp))
    with rebound(export_orchestrator, ensure_output_matches=check):
        if backend != "fast":
            return int(cli_commands._cmd_export(args))
        run = cli_commands._subprocess_or_die  # YOLOZU's own (the seam checks it exists)

        def subprocess_or_die(cmd: list[str]) -> str:
            return run(fast_command(cmd, amp, parallel))

        with rebound(cli_commands, _subprocess_or_die=subprocess_or_die):
            return int(cli_commands._cmd_export(args))
