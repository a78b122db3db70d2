"""4. gather (every rank), 5. merge and 6. publish (rank 0).

Every rank sends rank 0 the finished records of its shard (so ``--output`` need be writable on
rank 0's host only); rank 0 runs YOLOZU's ``main`` once more over the whole dataset with
``run_ttt`` and ``predict`` answered from those records: YOLOZU builds the output (schema, order,
logs) and writes it, and its logs, to temporary paths next to the real ones, which are then
``os.replace``-d into place (:class:`yolozu_ttt.export.publish.Publication`).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any

from .errors import ExportError
from .job import ADAPTER_NAMES, Job
from .parts import read_parts
from .publish import HeldLines
from .shard import Shard
from .stream import STREAM_STATE, StoredReport, load_state


class Merge:
    """Rank 0's merge of every rank's finished records (:meth:`gather` runs on every rank)."""

    def __init__(self, job: Job, shard: Shard):
        self.job, self.shard = job, shard
        self.entries: dict[int, dict[str, Any]] = {}
        self.stream_report: dict[str, Any] | None = None

    def gather(self, then: str) -> list[dict[str, Any]]:
        """Each rank's status and the finished records of its shard (from its part files, earlier
        attempts included) go to rank 0 in one ``gather_object``; rank 0 adds what its own host's
        part files hold (every rank's, on a shared filesystem). Returns the statuses (rank 0)."""
        job, shard = self.job, self.shard
        _, local = read_parts(job.parts_dir)
        start, stop = shard.data.shard if shard.data is not None else (0, 0)
        status = {"rank": job.env.rank, "computed": shard.tally.computed, "start": shard.tally.start,
                  "end": shard.tally.end, "entries": {i: e for i, e in local.items() if start <= i < stop}}
        try:
            statuses = job.group.gather(status)
        except Exception as exc:  # a peer died, or did not come within --dist-timeout
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ExportError(f"yolozu-ttt export: {job.where()} lost the other workers while gathering "
                              f"the results ({type(exc).__name__}: {first}); {then}") from None
        if job.env.rank != 0:
            return []
        self.entries = local
        for s in statuses:
            for i, entry in s.pop("entries").items():
                self.entries.setdefault(int(i), entry)
        return statuses

    def _ran(self) -> dict[str, Any] | None:
        """What adapted (the engine the part files or the stream state record), for a merge that
        adapted nothing itself; the stream state is loaded at most once, checked."""
        ran = next((e["engine"] for e in self.entries.values() if e.get("engine")), None)
        if not self.job.ttt:
            return ran
        stream = self.shard.stream
        if stream is None and self.shard.data is not None:
            stream = load_state(self.job.parts_dir / STREAM_STATE, self.shard.data.digest)
        if stream is not None:
            self.stream_report = stream["report"]
            ran = ran or stream["engine"]
        return ran

    def merge(self) -> HeldLines:
        """YOLOZU's main over the whole dataset, answered from the gathered records, writing the
        output and its logs to temporary paths; returns the lines it printed that name them."""
        job, data = self.job, self.shard.data
        assert data is not None
        missing = [i for i in range(len(data.records)) if i not in self.entries]
        if missing:
            raise ExportError(f"merge: the part files in {job.parts_dir} lack {len(missing)} image(s), e.g. "
                              f"{data.records[missing[0]].get('image')}; rerun with --resume")
        names = job.patches(job.settings_extra(), self._ran())  # ran: what adapted, where this rank did not
        names["run_ttt"] = self._replay_ttt
        names["build_manifest"] = lambda *a, **kw: dict(data.manifest, images=data.records)
        for name in ADAPTER_NAMES:
            names[name] = self._replayed
        held = HeldLines(sys.stdout, job.publication)
        try:
            with contextlib.redirect_stdout(held):
                job.run_main(job.main_ns(**job.publication.changes()), names)
        finally:
            if self.shard.adapter is not None:
                with contextlib.suppress(AttributeError):
                    del self.shard.adapter.predict
        return held

    def publish(self, held: HeldLines) -> None:
        """Each temporary file fsync-ed and ``os.replace``-d onto its final path (the logs naming
        the final output); then the lines naming them are printed."""
        self.job.publication.finish_logs()
        self.job.publication.publish()
        held.release()

    # -- the wrappers of YOLOZU's second main ------------------------------------------------
    def _replayed(self, *a: Any, **kw: Any) -> Any:
        adapter = self.shard.adapter
        adapter.predict = self._replay_predict
        return adapter

    def _replay_ttt(self, adapter: Any, records: list[Any], *, config: Any) -> StoredReport:
        if str(getattr(config, "reset", "stream")) == "sample":
            return StoredReport(self.entries[self.shard.data.index_of[id(records[0])]].get("report"))
        return StoredReport(self.stream_report)

    def _replay_predict(self, records: list[Any]) -> list[Any]:
        return [self.entries[self.shard.data.index_of[id(rec)]]["prediction"] for rec in records]
