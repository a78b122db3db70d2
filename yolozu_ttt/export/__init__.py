"""Dataset-scale ``export-predictions``: one pipeline, under torchrun or alone with ``--resume``.

Active under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) or with ``--resume``;
otherwise ``yolozu_ttt.cli`` runs YOLOZU's ``main`` exactly as before, under the output lock and
published atomically (:mod:`~.publish`).
Nothing of YOLOZU's is copied: every rank runs YOLOZU's own ``main`` twice at most, with a few of
its module globals rebound (:mod:`yolozu_ttt.seam` lists them). The pipeline, in the order
:meth:`~.pipeline.ShardedExport.run` runs it:

1. **lock** (rank 0): ``<output>.lock``, created exclusively (a hard link of a complete file, safe on
   a shared filesystem) with host, pid, start time and a heartbeat refreshed every
   ``LOCK_HEARTBEAT_S``. A second run on the same output is refused before any work
   (:class:`~.errors.OutputBusy`, exit 2); a lock whose process is gone (same host), whose heartbeat is older
   than ``LOCK_STALE_S``, or that an earlier attempt of this torchrun job left, is taken over with
   a message. Every worker also dies with its launcher (``PR_SET_PDEATHSIG``).
2. **shard** (every rank, inside YOLOZU's ``main``, as its ``build_manifest``): the record list cut
   to ``--max-images``; the checks that must pass before any work (results exchanged in one
   ``all_gather_object``); this rank's contiguous shard minus the images the part files hold.
   After an elastic restart (``TORCHELASTIC_RESTART_COUNT`` > 0) the part files are resumed
   without ``--resume``.
3. **work** (every rank): YOLOZU's ``main`` with ``run_ttt`` -> the chosen backend (sample mode:
   the per-image report is kept; stream mode: rank 0 adapts over the whole dataset, then one
   ``broadcast`` of a flat byte tensor of the selected parameters and every buffer) and the
   adapter's ``predict`` -> YOLOZU's ``predict`` on batches aligned to ``--infer-batch-size``; each
   finished image is one JSON line appended to this rank's part file (created with its first
   image), flushed before the next image starts. With ``--ttt-parallel K`` the backend cuts its
   K-groups from this rank's shard (its ``plan``) and YOLOZU still asks for, and this writes, one
   image at a time: a kill mid-group loses only the group's unwritten images. Its own output goes
   to a scratch file (thrown away).
4. **gather** (over the process group, bounded by ``--dist-timeout``): every rank sends rank 0
   the finished records of its shard, so ``--output`` need be writable on rank 0's host only.
5. **merge** (rank 0): YOLOZU's ``main`` once more over the whole dataset, with ``run_ttt`` and
   ``predict`` answered from those records: YOLOZU builds the output (schema, order, logs) and
   writes it, and its logs, to temporary paths next to the real ones.
6. **publish** (rank 0): ``os.replace`` of each temporary file onto its real path
   (:class:`~.publish.Publication`); then the part files are removed (each rank its own)
   and the lock released.

Failures: a failing rank appends ``(rank R of W, image PATH)`` to YOLOZU's message (``TTT failed:
...``) and exits 1; torchrun then stops (SIGTERM) or restarts (``--max-restarts``) the group. The
part files stay the durable record; they are removed only after the output is in place. A write
error (part file, stream state, the merged files) or Ctrl-C / SIGTERM ends in one line saying what
was kept (the earlier output, untouched; the part files) and how to continue (exit 1 / 130 / 143);
launched by ``yolozu-ttt torchrun`` (:mod:`~.launch`), the launcher adds one line, not a traceback.

The parts, one module each:

=============  ==========================================================================
``lock``       :class:`OutputLock`: one live export per output
``dist``       :class:`DistEnv`, dying with the launcher, :class:`~.dist.ProcessGroup` (setup,
               collectives), :class:`~.dist.StopGuard` (SIGTERM)
``parts``      the fingerprint, the shards, the part files and rank 0's progress bar
``stream``     stream mode's adapted state: packed, broadcast, saved and loaded once, checked
``shard``      2. shard and 3. work (:class:`~.shard.Shard`)
``merge``      4. gather, 5. merge and 6. publish (:class:`~.merge.Merge`)
``publish``    atomic publishing of the files YOLOZU's ``main`` writes (every mode, one process
               included) and the one-line faults (write errors, Ctrl-C, SIGTERM)
``job``        what one export is, and how YOLOZU's ``main`` is called
``pipeline``   :class:`~.pipeline.ShardedExport`: the steps strung together; :func:`run_sharded`
``launch``     ``yolozu-ttt torchrun``: torch's launcher with the export as its workers' command,
               ending in one line when stopped (exit 130 / 143) or when a worker failed
=============  ==========================================================================
"""
from __future__ import annotations

from .dist import DistEnv, die_with_launcher
from .errors import ExportError, OutputBusy
from .lock import LOCK_HEARTBEAT_S, LOCK_STALE_S, OutputLock
from .parts import describe_fingerprint_diff, fingerprint_args, read_parts, shard_bounds
from .pipeline import DEFAULT_TIMEOUT_S, ShardedExport, run_sharded
from .stream import pack, unpack

__all__ = ["DEFAULT_TIMEOUT_S", "LOCK_HEARTBEAT_S", "LOCK_STALE_S", "DistEnv", "ExportError", "OutputBusy",
           "OutputLock", "ShardedExport", "describe_fingerprint_diff", "die_with_launcher", "fingerprint_args",
           "pack", "read_parts", "run_sharded", "shard_bounds", "unpack"]
