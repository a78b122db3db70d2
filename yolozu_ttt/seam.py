"""The one seam to YOLOZU: every private YOLOZU name this package uses, checked when imported.

YOLOZU's public API (``TTTConfig``, ``TTTReport``, ``select_parameters``, the adapters, ...) is
imported where it is used. Everything else this package reaches into, helpers with a leading
underscore and the module globals the export rebinds for one call, is listed in :data:`PRIVATE`
and :data:`EXPORT_GLOBALS` below and checked here, once, at import. A YOLOZU without one of them
fails with one :class:`UnsupportedYolozu` message naming the YOLOZU versions this release supports,
instead of an ``AttributeError`` deep inside a run.

Use the modules through this one::

    from yolozu_ttt.seam import integration as _ref     # _ref._take_batches(...)
    from yolozu_ttt.seam import export_cli, rebound      # with rebound(export_cli, run_ttt=...):

It also holds how a batched prediction reaches YOLOZU's decoding (:class:`AnsweredForward`: the
export's ``--ttt-parallel K`` answers the model call of YOLOZU's own ``predict`` through the adapter's
model slot, :data:`ADAPTER_MODEL_SLOT`).
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any, Iterator

#: The YOLOZU releases this yolozu-ttt release is built and tested against (pyproject: ``yolozu>=4.12,<5``).
SUPPORTED_YOLOZU = ">=4.12,<5"

#: Private names, by YOLOZU module, and who uses them.
PRIVATE: dict[str, tuple[str, ...]] = {
    "yolozu.tta.integration": (
        "_take_batches",              # run.py: the reference's batch cut (max_batches)
        "_memory_start",              # run.py: the report's memory block
        "_memory_finish",             # run.py
        "_count_unique_params",       # methods/loop.py: updated_param_count
        "_entropy_loss_from_logits",  # methods/loop.py, eata.py: the entropy fallback (ops.entropy_loss mirrors it)
        "_eata_sample_signals",       # methods/eata.py (ops.entropy_stats mirrors it)
        "_extract_logits",            # methods/eata.py, sar.py
        "_forward_cotta_augs",        # methods/cotta.py
    ),
    "yolozu.tta.tent": (
        "_extract_outputs",           # methods/tent.py
        "_extract_logits",            # methods/tent.py
        "_entropy",                   # methods/tent.py
        "_deterministic_weak_photometric_view",  # methods/tent.py
        "_aux_consistency_loss",      # methods/tent.py
    ),
    "yolozu.tta.ttt_mim": (
        "_default_recon_fn",          # methods/mim.py
        "_default_geom_input",        # methods/mim.py
    ),
    "yolozu.inference.export_predictions_cli": (
        "_parse_args",                # cli.py: YOLOZU's own export parser, captured
    ),
    "yolozu.cli_commands": (
        "_cmd_export",                # orchestrate.py: `yolozu export`'s body, called as is
        "_subprocess_or_die",         # orchestrate.py: its subprocess runner (rebound for the fast backend)
    ),
}

EXPORT_MODULE = "yolozu.inference.export_predictions_cli"

#: The globals of YOLOZU's export module that yolozu-ttt rebinds for the duration of one call
#: (restored afterwards, also on failure): ``argparse`` (to capture the parser), ``_parse_args``
#: (to hand ``main`` our namespace), ``run_ttt`` and ``build_ttt_settings_from_args`` (the fast
#: backend), ``build_manifest``, the adapter classes (the sharded export), and ``repo_root`` (read).
EXPORT_GLOBALS = ("argparse", "_parse_args", "main", "run_ttt", "build_ttt_settings_from_args", "build_manifest",
                  "RTDETRPoseAdapter", "DummyAdapter", "repo_root")

#: Every module global rebound for one call, by module: the export module's above; ``yolozu
#: export``'s output-reuse check (``yolozu-ttt export`` reuses an output only from the backend that
#: made it) and its subprocess runner (the fast backend's export subprocess is ours).
REBOUND: dict[str, tuple[str, ...]] = {
    EXPORT_MODULE: EXPORT_GLOBALS,
    "yolozu.inference.export_orchestrator": ("ensure_output_matches",),
    "yolozu.cli_commands": ("_subprocess_or_die",),
}


class UnsupportedYolozu(ImportError):
    """The installed YOLOZU lacks a name yolozu-ttt needs (``missing``; ``supported`` is
    :data:`SUPPORTED_YOLOZU`, for callers that catch this import error)."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = list(missing)
        self.supported = SUPPORTED_YOLOZU


def _yolozu_version() -> str:
    try:
        import yolozu

        return str(getattr(yolozu, "__version__", "unknown"))
    except Exception:  # pragma: no cover - yolozu itself not importable
        return "not importable"


def missing_names() -> list[str]:
    """Every required ``module.name`` the installed YOLOZU lacks (empty when it fits)."""
    missing = []
    wanted = {module: tuple(dict.fromkeys((*PRIVATE.get(module, ()), *REBOUND.get(module, ()))))
              for module in dict.fromkeys((*PRIVATE, *REBOUND))}
    for module_name, names in wanted.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(module_name)
            continue
        missing.extend(f"{module_name}.{name}" for name in names if not hasattr(module, name))
    return missing


def check() -> None:
    """Raise :class:`UnsupportedYolozu` (one message) if the installed YOLOZU lacks a required name."""
    missing = missing_names()
    if missing:
        from . import __version__

        raise UnsupportedYolozu(
            f"yolozu-ttt {__version__} supports yolozu {SUPPORTED_YOLOZU}; the installed yolozu "
            f"{_yolozu_version()} lacks {', '.join(missing)}: install a supported yolozu "
            f"(pip install 'yolozu{SUPPORTED_YOLOZU}')",
            missing,
        )


check()

from yolozu import cli_commands  # noqa: E402  (checked above)
from yolozu.inference import export_orchestrator  # noqa: E402
from yolozu.inference import export_predictions_cli as export_cli  # noqa: E402
from yolozu.tta import integration, tent, ttt_mim  # noqa: E402

_REBIND_LOCK = threading.RLock()


@contextlib.contextmanager
def rebound(module: Any, **names: Any) -> Iterator[None]:
    """Bind ``module.NAME = value`` for each of ``names`` for the duration of the block (one
    thread at a time), restoring every one afterwards, also on failure."""
    with _REBIND_LOCK:
        saved = {name: getattr(module, name) for name in names}
        try:
            for name, value in names.items():
                setattr(module, name, value)
            yield
        finally:
            for name, value in saved.items():
                setattr(module, name, value)


# --------------------------------------------------------------------------------------
# a batched prediction into YOLOZU's decoding (the export's --ttt-parallel K)
# --------------------------------------------------------------------------------------
#: Where YOLOZU's ``RTDETRPoseAdapter`` keeps the model its ``predict`` runs (``_ensure_backend`` sets
#: ``adapter._backend = {..., "model": model}``; ``get_model()`` returns it). An instance attribute,
#: so not checked at import: an adapter without it is predicted by its own forward (:func:`answerable`).
ADAPTER_MODEL_SLOT = ("_backend", "model")


def answerable(adapter: Any) -> bool:
    """Whether ``adapter.predict`` can be answered from outputs computed elsewhere (:class:`AnsweredForward`).

    YOLOZU's ``RTDETRPoseAdapter.predict(records)`` preprocesses the records, runs the model in
    ``adapter._backend["model"]`` on each batch (under inference mode, autocast where its ``amp`` is
    on) and decodes what it returns with its own decoder (a closure of ``predict``, not exposed: the
    softmax scores against the background logit, top-k, threshold, boxes and poses, the entry). So its
    output is decodable by handing it over through that slot, where ``predict`` runs the model itself
    in fp32: its ``amp`` off, no ``torch.compile`` (``compile_model``), the slot built and holding it."""
    slot = getattr(adapter, ADAPTER_MODEL_SLOT[0], None)
    amp = str(getattr(adapter, "amp", "off") or "off").strip().lower()
    return (isinstance(slot, dict) and slot.get(ADAPTER_MODEL_SLOT[1]) is not None
            and amp in ("", "off", "none", "false", "0") and not bool(getattr(adapter, "compile_model", False)))


class AnsweredForward:
    """The next call of the model YOLOZU's ``predict`` runs, answered with ``output`` (one-shot).

    ``AnsweredForward(adapter, x, output)`` (``adapter`` :func:`answerable`) binds the adapter's model
    slot (:data:`ADAPTER_MODEL_SLOT`) to itself until its first call or :meth:`close`. Its first call,
    with one positional tensor equal to ``x`` (shape, dtype, device and values) and the model in eval
    mode, returns ``output`` (``answered`` True): YOLOZU's ``predict`` then decodes ``output`` exactly as
    it decodes the model's own output, so ``output`` must be what the model gives for ``x`` (the export:
    that image's row of its group's batched eval forward, the model holding that image's replica). Any
    other first call (another input, keywords, the model in training mode) runs the model (``answered``
    False). Either way the slot holds the model again before the call returns; only the slot is
    touched, never the model (its ``forward``, hooks and flags). ``answered`` is None until a call."""

    def __init__(self, adapter: Any, x: Any, output: Any):
        self.slot = getattr(adapter, ADAPTER_MODEL_SLOT[0])
        self.model = self.slot[ADAPTER_MODEL_SLOT[1]]
        self.x, self.output = x, output
        self.answered: bool | None = None
        self.slot[ADAPTER_MODEL_SLOT[1]] = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        self.close()
        x = args[0] if len(args) == 1 and not kwargs else None
        self.answered = bool(torch.is_tensor(x) and not self.model.training and x.shape == self.x.shape
                             and x.device == self.x.device and x.dtype == self.x.dtype and torch.equal(x, self.x))
        return self.output if self.answered else self.model(*args, **kwargs)

    @property
    def pending(self) -> bool:
        """Whether the slot still holds this answer (not called, not closed)."""
        return self.slot.get(ADAPTER_MODEL_SLOT[1]) is self

    def close(self) -> None:
        """The model back in the slot (idempotent)."""
        if self.pending:
            self.slot[ADAPTER_MODEL_SLOT[1]] = self.model


__all__ = ["SUPPORTED_YOLOZU", "PRIVATE", "EXPORT_GLOBALS", "REBOUND", "UnsupportedYolozu", "check", "missing_names",
           "cli_commands", "export_orchestrator", "export_cli", "integration", "tent", "ttt_mim", "rebound",
           "ADAPTER_MODEL_SLOT", "answerable", "AnsweredForward"]
