"""``yolozu-ttt`` command line: ``export-predictions``, ``demo`` and ``doctor``.

``export-predictions`` is YOLOZU's own ``export_predictions`` CLI
(``yolozu.inference.export_predictions_cli``): its parser is built by YOLOZU's own
``_parse_args`` (argument builders included), one flag is added
(``--ttt-backend {reference,fast}``) and YOLOZU's own ``main`` does the work.

* ``--ttt-backend reference`` (the default), or no ``--ttt``: nothing is patched;
  YOLOZU's ``main`` runs unchanged, so its output is byte-identical.
* ``--ttt-backend fast`` with ``--ttt``: for the duration of the call, the name
  ``run_ttt`` that the YOLOZU export module looks up (it does
  ``from yolozu.tta.integration import run_ttt``) is bound to a wrapper around
  ``yolozu_ttt.run_ttt``, and ``build_ttt_settings_from_args`` (the name that fills the
  ``--wrap`` meta ``ttt`` block and the ``--ttt-log-out`` JSON) to a wrapper that adds
  ``"backend": "fast"`` and an ``engine`` summary from ``build_info()``. Both names are
  restored afterwards, also on failure. Failures are still raised by YOLOZU's own
  ``TTT failed: ...`` handler, with its exit code.
* Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set), or with ``--resume``: the dataset-scale
  export of ``yolozu_ttt.export`` (contiguous shards per rank, per-rank part files flushed per
  image, resume, rank-0 merge through YOLOZU's own ``main``); the ``ttt`` block and log also
  record ``world_size`` and ``distributed_backend``. Its two flags (``--resume``,
  ``--dist-timeout``) default to ``argparse.SUPPRESS``, so a namespace without them is exactly
  YOLOZU's.
* ``--ttt-parallel K`` (fast backend, ``--ttt-reset sample``; default 1, unchanged): YOLOZU's
  sample loop is answered K images at a time (:class:`FastBackend`), each image adapted by its
  own replica and predicted through one batched eval forward of its group; bad K, stream mode and
  the reference backend are usage errors (exit 2, before anything is written), a K that does not
  fit the memory is refused after the first image is adapted, before any prediction is written.
  Recorded as ``parallel`` in the ``ttt`` block and log, and in its ``engine`` the K that ran.
* Every ``export-predictions`` holds ``<output>.lock`` while it runs (``yolozu_ttt.export.OutputLock``):
  a second run on a live output is refused before any work with one line and exit status 2.
* Every ``export-predictions`` publishes atomically (``yolozu_ttt.export.publish``): YOLOZU's ``main``
  writes the output and its logs to temporary files beside them, renamed into place when complete;
  a write error, Ctrl-C or SIGTERM keeps the earlier files and ends in one line (exit 1 / 130 / 143).
* Every private YOLOZU name (the export module's globals rebound here included) comes through
  ``yolozu_ttt.seam``, checked against this release's supported YOLOZU when imported.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
from typing import Any, Callable, Sequence

from .flags import (OUR_FLAGS, PARALLEL_FLAG, PROG, RESUME_FLAG, TIMEOUT_FLAG, add_amp, add_backend, add_parallel,
                    take)

EXPORT_MODULE = "yolozu.inference.export_predictions_cli"
COMMANDS = ("export-predictions", "export", "torchrun", "demo", "doctor")

_PATCH_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------
# export-predictions: parser
# --------------------------------------------------------------------------------------
class ParallelDoesNotFit(SystemExit):
    """``--ttt-parallel K`` refused after the first image: K replicas do not fit the memory (the
    message names the largest K that does); the last export's files are untouched (YOLOZU's ``main``
    writes temporary files, :mod:`yolozu_ttt.export.publish`)."""


class _ParserCaptured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser captured")
        self.parser = parser


class _CapturingParser(argparse.ArgumentParser):
    """ArgumentParser whose first ``parse_args`` hands the parser back instead of parsing.

    It also keeps YOLOZU's abbreviations working: a prefix that matches one of YOLOZU's
    flags and one of ours (``--ttt-b``, ``--ttt-ba`` for ``--ttt-backend``) resolves to
    YOLOZU's flag, as it does in YOLOZU's own CLI, instead of becoming ambiguous.
    """

    _capturing = True

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._capturing:
            self._capturing = False
            raise _ParserCaptured(self)
        return super().parse_args(args, namespace)

    def _get_option_tuples(self, option_string):  # type: ignore[override]
        result = super()._get_option_tuples(option_string)
        if len(result) > 1:
            kept = [t for t in result if not set(OUR_FLAGS) & set(getattr(t[0], "option_strings", ()))]
            if kept:
                result = kept
        return result


class _ArgparseProxy:
    """Stands in for the ``argparse`` module inside YOLOZU's export module only."""

    def __init__(self, real: Any):
        self._real = real
        self.ArgumentParser = _CapturingParser

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _export_module():
    from .seam import export_cli  # checked against this release's YOLOZU on import

    return export_cli


def _yolozu_export_parser(mod: Any) -> argparse.ArgumentParser:
    """YOLOZU's export parser, exactly as its ``_parse_args`` builds it (not a copy)."""
    from .seam import rebound

    try:
        with _PATCH_LOCK, rebound(mod, argparse=_ArgparseProxy(mod.argparse)):
            mod._parse_args([])
    except _ParserCaptured as captured:
        return captured.parser
    raise RuntimeError(f"{EXPORT_MODULE}._parse_args did not build an argparse parser")


def build_export_parser(mod: Any | None = None) -> argparse.ArgumentParser:
    mod = _export_module() if mod is None else mod
    parser = _yolozu_export_parser(mod)
    parser.prog = f"{PROG} export-predictions"
    parser.description = (
        "YOLOZU's export_predictions CLI (every flag is YOLOZU's), plus --ttt-backend: "
        "run --ttt on yolozu_ttt's fused engine (fast) or on YOLOZU's run_ttt (reference)."
    )
    add_backend(
        parser,
        "reference",
        help=(
            "Which run_ttt executes --ttt: 'reference' is yolozu.tta.integration.run_ttt "
            "(YOLOZU unchanged, byte-identical output); 'fast' is yolozu_ttt.run_ttt, "
            "recorded as backend=fast plus an engine summary in the --wrap meta ttt block "
            "and the --ttt-log-out JSON (default: reference). Without --ttt it has no effect."
        ),
    )
    from .export import DEFAULT_TIMEOUT_S

    parser.add_argument(
        RESUME_FLAG,
        action="store_true",
        default=argparse.SUPPRESS,
        help=(
            "Write finished images to part files next to --output as they finish (always on under "
            "torchrun) and skip the images part files of an earlier run of the same export already "
            "hold (same flags; any number of workers). Refused if the part files were made with "
            "other flags."
        ),
    )
    parser.add_argument(
        TIMEOUT_FLAG,
        type=float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help=(
            "Under torchrun: the process group timeout of every collective, and how long rank 0 "
            f"waits for other ranks without any new finished image before failing (default: {DEFAULT_TIMEOUT_S:g})."
        ),
    )
    add_amp(  # absent: off, and the namespace is YOLOZU's (+ --ttt-backend)
        parser,
        help=(
            "Precision of the --ttt adaptation passes on the fast backend: 'off' (fp32, the default: "
            "unchanged), 'bf16' or 'fp16' (torch.autocast for the model's device; fp32 weights, optimizer "
            "state and losses; fp16 with a dynamic loss scale). Recorded as amp in the --wrap meta ttt "
            "block and the --ttt-log-out JSON. Needs --ttt-backend fast (YOLOZU's run_ttt has no such mode)."
        ),
    )
    add_parallel(  # absent: 1, and the namespace is YOLOZU's (+ --ttt-backend)
        parser,
        help=(
            "Adapt K images at once (--ttt-reset sample, fast backend): each image by its own replica of "
            "the selected parameters, Adam state, norm statistics and guards, so its report and its "
            "prediction are what it gets alone; the K are then predicted in one batched eval forward. "
            "Default 1 (one image at a time, unchanged). A K whose replicas and activations do not fit the "
            "free memory is refused, naming the largest K that does. Recorded as parallel in the --wrap "
            "meta ttt block and the --ttt-log-out JSON."
        ),
    )
    return parser


# --------------------------------------------------------------------------------------
# export-predictions: fast backend
# --------------------------------------------------------------------------------------
def engine_summary(method: str | None = None, ran: dict[str, Any] | None = None) -> dict[str, Any]:
    """``build_info()`` as recorded next to ``"backend": "fast"``, and ``ran``, the engine that
    actually adapted (the backend's session's, or the one recorded in the part files where this
    process adapted nothing): ``"engine": "fast"`` with the update ``"backend"`` (cpp or triton),
    or ``"engine": "reference"`` with the fallback ``"reason"``."""
    from . import build_info

    info = dict(build_info())
    if method is not None:
        info["method"] = str(method)
    info.update(ran or {})
    return info


class FastBackend:
    """``run_ttt`` stand-in used for one ``export-predictions`` invocation.

    Built once per invocation and reused for every call YOLOZU makes: with
    ``--ttt-reset sample`` YOLOZU calls ``run_ttt(adapter, [record], config=...)`` once
    per record, always with the same adapter (same model object) and the same
    ``TTTConfig``. Resolved once and reused across those calls:

    * the ``yolozu_ttt.run_ttt`` callable (module import/resolution);
    * the engine summary (``build_info()``) recorded in the meta / log;
    * the session of ``yolozu_ttt.run.prepare_session(adapter, config)``, built once per
      (model, config) and reused for every record: selection, arena, engine and method
      bound once; each ``run(records) -> TTTReport`` resets to the session's start (the
      values the model had when it bound, which YOLOZU's sample loop also restores before
      every record) with fresh optimizer state, and reports what ``run_ttt`` would.

    YOLOZU's own sample loop already snapshots the selected parameters and norm
    buffers once and restores them in place around each record; the model and adapter
    are never rebuilt.

    With ``parallel`` K > 1 (``--ttt-parallel``, sample mode) YOLOZU's loop still calls
    ``run_ttt([record])`` then ``predict([record])`` once per record; each call is answered by the
    session's :class:`~yolozu_ttt.groups.GroupDriver` (the API's driver, with the memory check, a
    group of one alone, and each group predicted in one batched eval forward), the groups cut from
    the records :meth:`plan` named (the order YOLOZU adapts them in). The call for record i hands
    out its report with its replica loaded into the model and, where YOLOZU's ``predict`` can take
    it (:func:`yolozu_ttt.seam.answerable`), binds that image's row of the batched forward as the
    answer to ``predict``'s model call (:class:`yolozu_ttt.seam.AnsweredForward`), which YOLOZU's
    own ``predict`` decodes. Any other model call runs the model, which holds image i's state.
    """

    def __init__(self, amp: str = "off", ran: dict[str, Any] | None = None, parallel: int = 1) -> None:
        self.ran = ran  # the engine the part files record (a merge that adapted nothing itself)
        self.amp = amp  # --ttt-amp, passed on only when on (off: the calls are exactly as before)
        self.parallel = parallel  # --ttt-parallel K
        self._planned: list[Any] = []
        self._position: dict[int, int] = {}
        self._driver: Any = None  # the session's GroupDriver (--ttt-parallel K)
        self.answer: Any = None  # the last image's answer to YOLOZU's predict (seam.AnsweredForward)
        self.calls = 0
        self._run_ttt: Callable[..., Any] | None = None
        self._prepare: Callable[..., Any] | None = None
        self._session: Any = None
        self._session_key: tuple[int, int] | None = None
        self._engine: dict[str, Any] | None = None
        self._ran: dict[str, Any] | None = None  # what the last call ran (its session's engine)

    def _resolve(self) -> Callable[..., Any]:
        if self._run_ttt is None:
            import yolozu_ttt

            try:
                run_mod = importlib.import_module("yolozu_ttt.run")
            except ImportError:
                run_mod = None
            prepare = getattr(run_mod, "prepare_session", None) if run_mod is not None else None
            self._prepare = prepare if callable(prepare) else None
            self._run_ttt = yolozu_ttt.run_ttt
        return self._run_ttt

    def __call__(self, adapter: Any, records: list[dict[str, Any]], *, config: Any) -> Any:
        self.calls += 1
        if self.answer is not None:
            self.answer.close()  # not taken by a predict: the model back in its slot before the next image
            self.answer = None
        run_ttt = self._resolve()
        if self._prepare is not None:
            model = adapter.get_model() if hasattr(adapter, "get_model") else None
            if model is not None:
                key = (id(model), id(config))
                if self._session is None or self._session_key != key:
                    self._session = self._prepare(adapter, config, **self._amp_kw())
                    self._session_key = key
                    self._driver = None
                grouped = self.parallel > 1 and str(getattr(config, "reset", "")) == "sample" and len(records) == 1
                report = self._grouped(adapter, records[0]) if grouped else self._session.run(records)
                self._ran = getattr(self._session, "engine", None)
                return report
        self._ran = None  # no session to say (a model-less adapter: YOLOZU's error follows)
        return run_ttt(adapter, records, config=config, **self._amp_kw())

    # -- --ttt-parallel K -----------------------------------------------------------------
    def plan(self, records: list[Any]) -> None:
        """The records YOLOZU's sample loop adapts, in its order: the K-groups are cut from them."""
        self._planned = list(records)
        self._position = {id(r): i for i, r in enumerate(self._planned)}
        if self._driver is not None:
            self._driver.plan(self._planned)

    def planning(self, build_manifest: Callable[..., Any], max_images: int | None) -> Callable[..., Any]:
        """YOLOZU's ``build_manifest``, telling :meth:`plan` the records its main then adapts."""
        def planned(*a: Any, **kw: Any) -> Any:
            manifest = build_manifest(*a, **kw)
            records = list(manifest["images"])
            self.plan(records if max_images is None else records[:max_images])
            return manifest

        return planned

    def _grouped(self, adapter: Any, record: Any) -> Any:
        """Record ``record`` through the session's driver; its answer to YOLOZU's ``predict`` bound."""
        from . import seam
        from .groups import DoesNotFit, GroupDriver

        if self._driver is None:
            self._driver = GroupDriver(self._session, self.parallel, subject=f"{PARALLEL_FLAG} {self.parallel}",
                                       items="the images", check_memory=True, singles_alone=True,
                                       predict=seam.answerable(adapter), stacklevel=2)
            self._driver.plan(self._planned)
        position = self._position.get(id(record))
        try:
            handout = self._driver.alone(record) if position is None else self._driver.take(position)
        except DoesNotFit as refusal:  # a SystemExit: YOLOZU's handler turns any Exception into "TTT failed"
            raise ParallelDoesNotFit(f"{PROG} export-predictions: {refusal}") from None
        if handout.output is not None:
            self.answer = seam.AnsweredForward(adapter, handout.x, handout.output)
        return handout.report

    def engine_ran(self) -> dict[str, Any] | None:
        """The engine the last call ran (its session's :attr:`~yolozu_ttt.run.TTTSession.engine`),
        plus the K this backend adapted at once (``parallel``, 1 with ``parallel_reason`` where it
        went one by one)."""
        engine = self._ran
        if engine is None or self.parallel <= 1:
            return engine
        ran = self._driver.ran if self._driver is not None else {"parallel": self.parallel}
        return {**engine, **ran}

    def _amp_kw(self) -> dict[str, Any]:
        return {"amp": self.amp} if self.amp != "off" else {}

    def engine(self, method: str | None) -> dict[str, Any]:
        """The engine summary, built after the run (the meta and the log are written then)."""
        if self._engine is None:
            self._engine = engine_summary(method, self._ran or self.ran)
            if self.parallel > 1:  # the K this process adapted with, else the one the part files record
                ran = (self.engine_ran() if self.calls else self.ran) or {}
                self._engine.update({key: v for key, v in ran.items() if key.startswith("parallel")})
        return dict(self._engine)


def _backend_patches(mod: Any, args: argparse.Namespace, extra: dict[str, Any] | None = None,
                     amp: str = "off", ran: dict[str, Any] | None = None, parallel: int = 1) -> dict[str, Any]:
    """Module names to rebind for ``args``: the fast backend's ``run_ttt`` and a settings
    wrapper (``backend``/``engine`` for fast, plus ``extra`` such as ``world_size``), and with
    ``parallel`` > 1 YOLOZU's ``build_manifest`` telling the backend the records it adapts; empty
    for the reference backend in one process, which therefore runs YOLOZU unchanged."""
    fast = bool(getattr(args, "ttt", False)) and args.ttt_backend == "fast"
    names: dict[str, Any] = {}
    if not fast and not extra:
        return names
    backend = FastBackend(amp, ran, parallel) if fast else None
    build_settings = mod.build_ttt_settings_from_args

    def _settings_with_backend(ns: Any) -> dict[str, Any]:
        settings = build_settings(ns)
        if backend is not None:
            settings["backend"] = "fast"
            settings["engine"] = backend.engine(getattr(ns, "ttt_method", None))
            if amp != "off":
                settings["amp"] = amp
            if parallel > 1:
                settings["parallel"] = parallel
        settings.update(extra or {})
        return settings

    if backend is not None:
        names["run_ttt"] = backend
        if parallel > 1:  # under torchrun or --resume the export plans each rank's shard instead
            names["build_manifest"] = backend.planning(mod.build_manifest, args.max_images)
    names["build_ttt_settings_from_args"] = _settings_with_backend
    return names


def export_predictions(argv: Sequence[str]) -> int:
    mod = _export_module()
    parser = build_export_parser(mod)
    args = parser.parse_args(list(argv))
    resume = bool(vars(args).pop("resume", False))
    ours = take(parser, args, keep_backend=True)  # ours: YOLOZU's main sees its own namespace
    amp, parallel = ours.amp, ours.parallel
    timeout_s = vars(args).pop("dist_timeout", None)
    from . import export
    from .export.errors import say
    from .export.publish import Fault

    try:
        env = export.DistEnv.from_environ()
        if env is not None or resume:
            with _PATCH_LOCK:
                return export.run_sharded(
                    mod, args, env=env, resume=resume,
                    timeout_s=export.DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s),
                    patches=lambda extra, ran=None: _backend_patches(mod, args, extra, amp, ran, parallel),
                )

        run_one_process(mod, args, _backend_patches(mod, args, amp=amp, parallel=parallel))
        return 0
    except export.OutputBusy as busy:  # one line, no traceback; torchrun's other ranks stay silent
        if busy.code:
            say(f"{PROG} export-predictions: {busy.code}")
        return 2
    except Fault as fault:  # a write error, Ctrl-C or SIGTERM: one line, what was kept, how to go on
        say(f"{PROG} export-predictions: {fault.message}")
        return fault.status


def run_one_process(mod: Any, args: argparse.Namespace, names: dict[str, Any]) -> None:
    """YOLOZU's own ``main`` on ``args`` (plus the backend's ``names``, none for the reference
    backend), under the output's lock, writing temporary files that are published when it is done
    (:func:`yolozu_ttt.export.publish.run_published`): the earlier output stays in place until then, and
    the published bytes are the ones YOLOZU's ``main`` wrote."""
    from . import export
    from .export.publish import Publication, run_published
    from .seam import rebound

    publication = Publication(mod.repo_root, args)
    ns = argparse.Namespace(**{**vars(args), **publication.changes()})

    def _parse_args(_argv: Any) -> argparse.Namespace:
        return ns

    with export.OutputLock(publication.output).held(), _PATCH_LOCK, rebound(mod, _parse_args=_parse_args, **names):
        publication.clear_leftovers()
        run_published(lambda: mod.main([]), publication,
                      then_interrupted="nothing finished is kept without --resume: rerun the export (with --resume, "
                                       "finished images are kept in part files and a rerun continues them)")


# --------------------------------------------------------------------------------------
# doctor
# --------------------------------------------------------------------------------------
def _yes_no(flag: Any) -> str:
    return "yes" if flag else "no"


def format_doctor(info: dict[str, Any]) -> list[str]:
    lines = [f"yolozu-ttt {info.get('version')}  (torch {info.get('torch') or 'not importable'})"]
    if info.get("cpp_extension"):
        lines.append("compiled extension : loaded (yolozu_ttt._C)")
    else:
        lines.append("compiled extension : FAILED to load")
        lines.append(f"  reason           : {info.get('cpp_extension_error') or 'unknown'}")
        lines.append("  fix              : reinstall with `pip install -e .` (needs a C++ compiler and CMake)")
    lines.append(f"OpenMP             : {_yes_no(info.get('openmp'))}, threads={info.get('threads')}")
    lines.append(f"Triton             : {info.get('triton') or 'not available'}")
    lines.append(f"CUDA               : {'available' if info.get('cuda') else 'not available'}")
    methods = info.get("accelerated_methods") or []
    lines.append(f"accelerated methods: {', '.join(str(m) for m in methods) if methods else 'none'}")
    return lines


def doctor_checks(info: dict[str, Any]) -> dict[str, Any]:
    """What ``doctor`` adds to ``build_info()``: the threads in use (torch's intra-op pool, which
    runs the model's passes, and the engine's OpenMP team), the installed YOLOZU against the range
    this release supports (``seam.SUPPORTED_YOLOZU``), and the update engine a CUDA run would take
    (``triton`` when Triton imports, as ``yolozu_ttt.common.use_triton`` decides; otherwise None)."""
    import torch
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    from . import common
    from .seam import SUPPORTED_YOLOZU

    try:
        import yolozu

        yolozu_version: str | None = str(getattr(yolozu, "__version__", None) or "")
    except Exception:  # pragma: no cover - yolozu is a dependency
        yolozu_version = None
    try:
        in_range = Version(yolozu_version).release is not None and yolozu_version in SpecifierSet(SUPPORTED_YOLOZU)
    except (InvalidVersion, TypeError):
        in_range = False
    return {
        "torch_threads": int(torch.get_num_threads()),
        "engine_threads": int(info.get("threads") or 1),
        "yolozu": yolozu_version,
        "yolozu_supported": SUPPORTED_YOLOZU,
        "yolozu_in_range": bool(in_range),
        "gpu_update_engine": "triton" if common.HAVE_TRITON else None,
    }


def format_checks(checks: dict[str, Any]) -> list[str]:
    version = checks["yolozu"] or "not importable"
    verdict = "supported" if checks["yolozu_in_range"] else "NOT supported"
    gpu = ("Triton kernels (fused update, entropy, MIM)" if checks["gpu_update_engine"] == "triton"
           else "no Triton kernels (triton does not import here; install it for CUDA runs)")
    return [
        f"threads in use     : torch {checks['torch_threads']} (model passes), engine {checks['engine_threads']} (OpenMP update)",
        f"yolozu             : {version} ({verdict}; this release supports yolozu{checks['yolozu_supported']})",
        f"a GPU run uses     : {gpu}",
    ]


def doctor(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} doctor",
        description="Show what this yolozu-ttt install can do; exit 1 if the compiled extension failed to load.",
    )
    parser.add_argument("--json", action="store_true", help="Print build_info() and the checks as JSON instead.")
    args = parser.parse_args(list(argv))
    from . import build_info

    info = build_info()
    checks = doctor_checks(info)
    if args.json:
        print(json.dumps({**info, **checks}, indent=2, sort_keys=True))
    else:
        for line in [*format_doctor(info), *format_checks(checks)]:
            print(line)
    if not info.get("cpp_extension"):
        print(
            f"yolozu-ttt doctor: compiled extension not loaded: {info.get('cpp_extension_error') or 'unknown'}",
            file=sys.stderr,
        )
        return 1
    return 0


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------
def _demo_parser() -> argparse.ArgumentParser:
    from yolozu.tta.cli_options import TTT_METHOD_CHOICES, TTT_UPDATE_FILTER_CHOICES

    from .demo import DEFAULTS

    parser = argparse.ArgumentParser(
        prog=f"{PROG} demo",
        description=(
            "Offline: synthetic dataset + builtin RT-DETR (builtin:base, init_seed=0); TTT with the "
            "reference, the fast backend, the floor (the passes alone) and fast bf16 from the same "
            "initial weights, in interleaved rounds; prints a table of medians with their spread and "
            "writes summary.json and PNG plots to the run dir."
        ),
    )
    parser.add_argument("--run-dir", default=DEFAULTS["run_dir"], help=f"Output folder (default: {DEFAULTS['run_dir']}).")
    parser.add_argument("--method", choices=TTT_METHOD_CHOICES, default=DEFAULTS["method"], help="TTT method (default: tent).")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help=f"TTT steps (default: {DEFAULTS['steps']}).")
    parser.add_argument("--device", default=DEFAULTS["device"], help="Torch device (default: cpu).")
    parser.add_argument(
        "--update-filter",
        choices=TTT_UPDATE_FILTER_CHOICES,
        default=DEFAULTS["update_filter"],
        help=f"Parameters TTT updates (default: {DEFAULTS['update_filter']}).",
    )
    parser.add_argument("--images", type=int, default=DEFAULTS["images"], help=f"Images in the TTT batch, 1-8 (default: {DEFAULTS['images']}).")
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help=f"Square model input size (default: {DEFAULTS['image_size']}).")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help=f"TTT learning rate (default: {DEFAULTS['lr']}).")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="Dataset / TTT seed (default: 0).")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=DEFAULTS["warmup_steps"],
        help=f"Untimed steps per backend on a throw-away model before timing (default: {DEFAULTS['warmup_steps']}; 0 disables).",
    )
    parser.add_argument("--rounds", type=int, default=DEFAULTS["rounds"],
                        help=f"Interleaved timed rounds, medians reported (default: {DEFAULTS['rounds']}).")
    parser.add_argument("--quick", action="store_true",
                        help="One timed run of each backend (no floor, no bf16 row): the single-round form.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def demo(argv: Sequence[str]) -> int:
    args = _demo_parser().parse_args(list(argv))
    from .demo import DemoError, format_table, run_demo

    try:
        summary = run_demo(
            run_dir=args.run_dir,
            method=args.method,
            steps=args.steps,
            device=args.device,
            update_filter=args.update_filter,
            images=args.images,
            image_size=args.image_size,
            lr=args.lr,
            seed=args.seed,
            warmup_steps=args.warmup_steps,
            rounds=args.rounds,
            quick=args.quick,
            progress=not args.no_progress,
        )
    except DemoError as exc:
        print(f"yolozu-ttt demo: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary))
    for name in summary["files"].values():
        print(name)
    return 0


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------
_USAGE = f"""usage: {PROG} {{export-predictions,export,torchrun,demo,doctor}} [options]

Compiled, fused test-time adaptation backend for YOLOZU.

commands:
  export-predictions  YOLOZU's export_predictions CLI (all of its flags) plus
                      --ttt-backend {{reference,fast}} (default: reference)
                      --ttt-amp {{off,bf16,fp16}} (fast only; default: off)
                      --ttt-parallel K (fast, sample mode; default: 1)
  export              YOLOZU's `yolozu export` (all of its flags) plus the same three
                      flags; with --ttt --ttt-backend fast its export subprocess is
                      `yolozu-ttt export-predictions`
  torchrun            torchrun's options, then export-predictions and its flags: the
                      export on N workers, ending in one line when stopped or failed
  demo                offline reference-vs-fast TTT comparison on the builtin RT-DETR
                      (table, summary.json, PNG plots)
  doctor              show the compiled engine / OpenMP / Triton / CUDA status;
                      exit 1 if the compiled extension failed to load

Run `{PROG} COMMAND --help` for a command's options.
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"{PROG} {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        from . import seam  # noqa: F401  (every private YOLOZU name, checked on import)
    except ImportError as exc:  # an unsupported or missing YOLOZU: one line, no traceback
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if command == "export-predictions":
        return export_predictions(rest)
    if command == "export":
        from .orchestrate import export

        return export(rest)
    if command == "torchrun":
        from .export.launch import launch

        return launch(rest)
    if command == "demo":
        return demo(rest)
    if command == "doctor":
        return doctor(rest)
    print(_USAGE, end="", file=sys.stderr)
    print(f"{PROG}: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
