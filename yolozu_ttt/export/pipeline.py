"""The pipeline that strings the export's parts together, in the order :meth:`ShardedExport.run`
runs them (the package docstring describes each step):

0. set up (every rank): the worker dies with its launcher (torchrun), SIGTERM is caught
   (:class:`~.dist.StopGuard`), the device, threads and process group (:class:`~.dist.ProcessGroup`);
1. lock (rank 0): ``<output>.lock`` (:class:`~.lock.OutputLock`), refused before any work; what a
   killed run left beside the output is removed;
2. shard and 3. work (every rank): YOLOZU's ``main`` over this rank's shard (:class:`~.shard.Shard`);
4. gather (every rank), 5. merge and 6. publish (rank 0) (:class:`~.merge.Merge`);
7. rank 0 tells every rank whether the output is in place; the part files are removed, the lock
   released and a one-line summary printed.

Every failure ends in one line: YOLOZU's own messages with the rank and image appended, a write
error or an interrupt (:mod:`~.publish`) saying what was kept and how to continue.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import traceback
from typing import Any, Callable

from .dist import DistEnv, die_with_launcher
from .errors import ExportError, OutputBusy, say
from .job import Job
from .lock import OutputLock
from .merge import Merge
from .publish import Fault, Interrupted, Terminated, WriteFailed, is_write_error, signal_name
from .shard import Shard
from .stream import clear_leftovers

DEFAULT_TIMEOUT_S = 1800.0


class ShardedExport:
    """One ``export-predictions`` invocation on one rank (or a single process with ``--resume``)."""

    def __init__(self, job: Job):
        self.job = job
        self.lock: OutputLock | None = None
        self.shard = Shard(job)
        self.merged = Merge(job, self.shard)

    def run(self) -> int:
        job = self.job
        try:
            if job.env.torchrun:
                die_with_launcher()            # torchrun starts each worker in a session of its own
            job.stop.install()
            job.group.setup()                  # device, threads, process group
            self._lock()                       # 1. lock (rank 0), refused before any work
            self._work()                       # 2. shard + 3. work, inside YOLOZU's main
            statuses = self.merged.gather(self._then())  # 4. every rank's finished records to rank 0
            error = self._merge() if job.env.rank == 0 else None  # 5. merge + 6. publish
            if self._announce(error) is None:
                self._remove_parts()
            if job.env.rank == 0:
                self._summary(statuses)
            job.group.settle()                 # no rank tears the group down mid-collective
            return 0
        except (Terminated, KeyboardInterrupt) as exc:
            raise self._interrupted(exc) from None
        finally:
            self.shard.close_progress()
            if self.lock is not None:
                self.lock.release()
            job.group.teardown()
            job.stop.restore()

    def _lock(self) -> None:
        """Rank 0 takes the output's lock (and clears what a killed run left beside the output);
        every rank learns the outcome in one broadcast."""
        job, refusal = self.job, None
        if job.env.rank == 0:
            self.lock = OutputLock(job.output_path, job.env)
            try:
                note = self.lock.acquire()
                if note:
                    say(note)
                job.publication.clear_leftovers()
                clear_leftovers(job.parts_dir)
            except ExportError as exc:  # OutputBusy, or an output folder that cannot be written
                self.lock = None
                refusal = (isinstance(exc, OutputBusy), str(exc.code))
        refusal = job.group.broadcast(refusal)
        if refusal is not None:
            busy, message = refusal
            if busy:  # one line, from rank 0 only
                raise OutputBusy(message if job.env.rank == 0 else None)
            raise ExportError(message)

    def _work(self) -> None:
        try:
            self.shard.run()
        except (Terminated, KeyboardInterrupt):
            raise
        except BaseException as exc:
            with contextlib.suppress(OSError):
                self.job.parts_dir.rmdir()  # only if nothing is in it (no rank wrote an image)
            self._fail(exc)

    def _merge(self) -> str | None:
        """Rank 0: merge and publish; a failure is announced to every rank, then raised (a write
        error as one line naming the path and what was kept)."""
        job = self.job
        try:
            self.shard.close_progress()
            self.merged.publish(self.merged.merge())
            return None
        except BaseException as exc:
            self._announce(f"merge failed on rank 0: {type(exc).__name__}: {exc}")
            if isinstance(exc, OSError) and (is_write_error(exc) or job.publication.written()):
                raise job.publication.write_failed(exc, then=self._then()) from None
            raise
        finally:
            job.publication.discard()

    def _announce(self, error: str | None) -> str | None:
        """Rank 0 tells every rank whether the output is in place (one broadcast)."""
        error = self.job.group.broadcast(error)
        if error is not None and self.job.env.rank != 0:
            raise ExportError(f"{error}; the part files stay in {self.job.parts_dir}: rerun with --resume")
        return error

    def _remove_parts(self) -> None:
        """The output is in place: rank 0 removes the parts folder, every other rank its own part
        files (on hosts that do not share rank 0's filesystem)."""
        parts_dir, rank = self.job.parts_dir, self.job.env.rank
        if rank == 0:
            shutil.rmtree(parts_dir, ignore_errors=True)
            return
        with contextlib.suppress(OSError):  # on rank 0's filesystem the folder may be gone already
            for path in list(parts_dir.glob(f"part-*-r{rank:05d}.jsonl")):
                with contextlib.suppress(OSError):
                    path.unlink()
            parts_dir.rmdir()

    # -- failures and the summary ---------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        job, hand = self.job, self.shard.hand
        if isinstance(exc, Fault):  # a write error of ours (part file, stream state): one line
            raise WriteFailed(f"{exc.message}; {job.publication.kept()}; {self._then()} "
                              f"({job.where(hand.current)})", exc.status) from None
        if is_write_error(exc):
            raise job.publication.write_failed(exc, then=self._then()).located(job.where(hand.current)) from None
        if isinstance(exc, SystemExit):
            if exc.code is None or exc.code == 0:
                raise exc
            message = str(exc.code)
        else:
            traceback.print_exception(exc, file=sys.stderr)
            message = f"export failed: {type(exc).__name__}: {exc}"
        if not self.shard.started:
            raise exc  # YOLOZU's flag checks (same on every rank) or our preflight: unchanged
        if hand.adapting:
            message = f"{message} ({job.where()}, stream adaptation)"
        else:
            message = f"{message} ({job.where(hand.current)})"
        raise ExportError(message) from (exc if not isinstance(exc, SystemExit) else None)

    def _then(self) -> str:
        """What happens to the finished images next, and what the user does."""
        env = self.job.env
        left = env.max_restarts - env.restart_count
        then = (f"torchrun restarts the workers ({left} restart(s) left) and they continue from them"
                if env.torchrun and left > 0 else "rerun with --resume")
        return f"the images finished so far stay in {self.job.parts_dir}: {then}"

    def _interrupted(self, exc: BaseException) -> Fault:
        """Ctrl-C or SIGTERM: one line, what was kept and how to continue; exit 130 / 143."""
        how, status = signal_name(exc)
        why = " (torchrun stops every worker when one fails or when it is stopped itself)" if self.job.env.torchrun and status != 130 else ""
        return Interrupted(f"{self.job.where()} stopped by {how}{why}; {self.job.publication.kept()}; "
                           f"{self._then()}", status)

    def _summary(self, statuses: list[dict[str, Any]]) -> None:
        job, data = self.job, self.shard.data
        assert data is not None
        computed = sum(int(s.get("computed") or 0) for s in statuses)
        starts = [s["start"] for s in statuses if s.get("start")]
        ends = [s["end"] for s in statuses if s.get("end")]
        rate = ""
        if computed and starts and ends and max(ends) > min(starts):
            seconds = max(ends) - min(starts)
            rate = f"; {computed / seconds:.3f} images/s ({seconds:.2f} s)"
        adapted = ""
        if job.ttt and str(job.args.ttt_reset) == "stream":
            adapted = "; stream adaptation " + ("ran" if self.shard.stream_adapted else "taken from the part files")
        backend = f", {job.group.backend}" if job.group.backend else ""
        print(f"yolozu-ttt export: {len(data.records)} images, {job.env.world_size} worker(s){backend}: "
              f"{computed} computed, {data.resumed} from part files{adapted}{rate}", file=sys.stderr, flush=True)


def run_sharded(mod: Any, args: argparse.Namespace, *, env: DistEnv | None, resume: bool, timeout_s: float,
                patches: Callable[..., dict[str, Any]]) -> int:
    """Run one ``export-predictions`` as rank ``env.rank`` of ``env.world_size`` (or alone, with
    ``--resume``). ``patches(extra_settings, ran=None)`` returns the cli's own module rebindings (the backend's
    ``run_ttt`` and the settings wrapper, which adds ``extra_settings`` to the ``ttt`` block)."""
    if timeout_s <= 0:
        raise ExportError(f"--dist-timeout must be > 0 seconds (got {timeout_s:g})")
    job = Job.make(mod, args, env=env or DistEnv(), resume=resume, timeout_s=timeout_s, patches=patches)
    return ShardedExport(job).run()
