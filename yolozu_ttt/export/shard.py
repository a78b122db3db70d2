"""2. shard and 3. work (every rank): YOLOZU's ``main`` over this rank's shard, each finished image
appended to its part file; its own output goes to a scratch file (thrown away).

:class:`Dataset` is what the shard step learns (inside YOLOZU's ``main``, as its
``build_manifest``): the records, this rank's shard, the fingerprint, and what the part files of an
earlier attempt already hold. :class:`Shard` runs the work and keeps what it did.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import time
import uuid
from typing import Any, Callable, Iterator

from .errors import ExportError
from .job import ADAPTER_NAMES, Job
from .parts import PART_VERSION, PartWriter, Progress, describe_fingerprint_diff, digest, fingerprint_args, \
    read_parts, shard_bounds
from .stream import STREAM_STATE, StoredReport, load_state, nbytes, pack, save_state, stream_tensors, unpack


def _engine_ran(backend: Any) -> dict[str, Any] | None:
    """What the backend's last call ran (the fast backend says, with --ttt-parallel's K; YOLOZU's
    ``run_ttt`` records nothing)."""
    ran = getattr(backend, "engine_ran", None)
    return ran() if callable(ran) else None


@dataclasses.dataclass
class Dataset:
    """The record list (cut to ``--max-images``), its manifest, this rank's ``[start, stop)`` and
    what a resumable run must agree on (``fingerprint``); ``done`` the images the part files hold."""

    manifest: dict[str, Any]
    records: list[Any]
    fingerprint: dict[str, Any]
    shard: tuple[int, int]
    done: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    token: str = ""
    resumed: int = 0

    def __post_init__(self) -> None:
        self.index_of = {id(r): i for i, r in enumerate(self.records)}

    @property
    def digest(self) -> str:
        return digest(self.fingerprint)


@dataclasses.dataclass
class InHand:
    """The image (or stream adaptation) this rank is on, and its report until its line is written."""

    current: str | None = None
    adapting: bool = False
    report: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None


@dataclasses.dataclass
class Tally:
    computed: int = 0
    start: float | None = None
    end: float | None = None

    def mark_start(self) -> None:
        if self.start is None:
            self.start = time.time()


class Shard:
    """The work on this rank: YOLOZU's ``main`` with ``build_manifest``, ``run_ttt`` and the
    adapter's ``predict`` wrapped (:meth:`run`)."""

    def __init__(self, job: Job):
        self.job = job
        self.data: Dataset | None = None
        self.hand = InHand()
        self.tally = Tally()
        self.writer: PartWriter | None = None
        self.progress: Progress | None = None
        self.adapter: Any = None
        self.backend: Any = None
        self.stream: dict[str, Any] | None = None  # rank 0: the stream adaptation's report and engine
        self.stream_adapted = False
        self.started = False  # past the checks every rank makes before any work

    # -- 2. shard: inside YOLOZU's main, after its own flag checks, before any model work ---------
    def _preflight(self, data: Dataset) -> str | None:
        job, args = self.job, self.job.args
        if bool(getattr(args, "tta", False)) and str(getattr(args, "tta_mode", "")) == "model" \
                and str(getattr(args, "adapter", "")) == "rtdetr_pose":
            return ("--tta-mode model is not supported under torchrun or with --resume (its flipped "
                    "prediction pass is not sharded); use --tta-mode postprocess, or one process without --resume")
        try:
            job.parts_dir.mkdir(parents=True, exist_ok=True)
            probe = job.parts_dir / f".probe-{job.env.rank}-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            return f"output folder is not writable: {job.output_path.parent} ({exc})"
        headers, entries = read_parts(job.parts_dir)
        if headers and not job.resume:
            return (f"{job.parts_dir} holds part files of an earlier run ({len(entries)} images done): "
                    "pass --resume to continue it, or delete that folder")
        for header in headers:
            if header.get("fingerprint") != data.digest:
                return (f"--resume: the part files in {job.parts_dir} were made with different export flags "
                        f"({describe_fingerprint_diff(header.get('args') or {}, data.fingerprint)}); "
                        "rerun with the flags they were made with, or delete that folder")
        data.done = entries
        for i in range(*data.shard):
            if i in entries:
                continue
            image = data.records[i].get("image") if isinstance(data.records[i], dict) else None
            if not isinstance(image, str) or not os.path.isfile(image):
                return f"image not found: {image} ({job.where()}, record {i})"
        return None

    def _exchange(self, data: Dataset, error: str | None) -> None:
        """Every rank's preflight outcome and resumed count, in one ``all_gather_object``."""
        done_here = sum(1 for i in range(*data.shard) if i in data.done)
        gathered = self.job.group.all_gather((uuid.uuid4().hex[:12], error, done_here))
        errors = [e for _, e, _ in gathered if e]
        if errors:
            with contextlib.suppress(OSError):
                self.job.parts_dir.rmdir()  # only if this run made it and nothing is in it
            raise ExportError(errors[0])
        data.token = gathered[0][0]
        data.resumed = sum(int(n) for _, _, n in gathered)

    def _manifest(self, real_build_manifest: Callable[..., Any]) -> Callable[..., Any]:
        job = self.job

        def build_manifest(dataset_root, *a, **kw):
            manifest = real_build_manifest(dataset_root, *a, **kw)
            records = list(manifest["images"])
            if job.args.max_images is not None:
                records = records[: job.args.max_images]
            data = Dataset(manifest, records, fingerprint_args(job.args, [str(r.get("image")) for r in records]),
                           shard_bounds(len(records), job.env.world_size, job.env.rank, job.unit))
            self.data = data
            self._exchange(data, self._preflight(data))
            self.started = True
            todo = [i for i in range(*data.shard) if i not in data.done]
            plan = getattr(self.backend, "plan", None)
            if callable(plan):  # --ttt-parallel: the backend cuts its K-groups from this rank's shard
                plan([records[i] for i in todo])
            if job.env.rank == 0:
                workers = f"{job.env.world_size} worker{'s' if job.env.world_size > 1 else ''}"
                self.progress = Progress(job.parts_dir, len(records), f"export ({workers})")
            data.done = {}
            return dict(manifest, images=[records[i] for i in todo])

        return build_manifest

    # -- 3. work: the wrappers YOLOZU's main calls ----------------------------------------------
    def _open_part(self) -> PartWriter:
        job, data = self.job, self.data
        assert data is not None
        header = {"yolozu_ttt_part": PART_VERSION, "fingerprint": data.digest, "args": data.fingerprint,
                  "token": data.token, "rank": job.env.rank, "world_size": job.env.world_size,
                  "attempt": job.env.restart_count, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.time()}
        return PartWriter(job.parts_dir / f"part-{data.token}-r{job.env.rank:05d}.jsonl", header)

    def _begin_image(self) -> None:
        self.tally.mark_start()
        self.job.stop.begin_image()

    def _ttt(self, backend: Callable[..., Any]) -> Callable[..., Any]:
        def run_ttt(adapter, records, *, config):
            self.tally.mark_start()
            if str(getattr(config, "reset", "stream")) == "sample":
                self._begin_image()
                self.hand.current = str(records[0].get("image")) if len(records) == 1 else None
                report = backend(adapter, records, config=config)
                self.hand.report = report.to_dict()
                self.hand.engine = _engine_ran(backend)
                return report
            return self._stream(backend, adapter, config)

        return run_ttt

    def _stream(self, backend: Callable[..., Any], adapter: Any, config: Any) -> Any:
        """Stream mode: rank 0 adapts over the whole dataset (or loads the state an earlier attempt
        saved, once, checked against the fingerprint), then one broadcast of the state's bytes."""
        job, data = self.job, self.data
        assert data is not None
        tensors = stream_tensors(adapter.get_model(), config)
        report: Any = StoredReport(None)
        flat = None
        if job.env.rank == 0:
            path = job.parts_dir / STREAM_STATE
            saved = load_state(path, data.digest) if job.resume else None
            if saved is None:
                self.hand.current, self.hand.adapting = None, True
                report = backend(adapter, list(data.records), config=config)
                self.hand.adapting = False
                self.stream_adapted = True
                saved = {"report": report.to_dict(), "engine": _engine_ran(backend), "flat": pack(tensors).cpu()}
                save_state(path, data.digest, saved["report"], saved["engine"], saved["flat"])
            else:
                report = StoredReport(saved["report"])
                unpack(saved["flat"], tensors)
            self.stream, flat = saved, saved["flat"]
        if job.env.world_size > 1:
            buf = job.group.broadcast_bytes(flat, nbytes(tensors))  # selected parameters + buffers
            if job.env.rank != 0:
                unpack(buf, tensors)
        return report

    def _groups(self, records: list[Any]) -> Iterator[list[tuple[int, Any]]]:
        assert self.data is not None
        unit, group = self.job.unit, []
        for rec in records:
            idx = self.data.index_of.get(id(rec))
            if idx is None:
                raise RuntimeError("predict() got a record that is not in the dataset's record list")
            if group and group[-1][0] // unit != idx // unit:
                yield group
                group = []
            group.append((idx, rec))
        if group:
            yield group

    def _write(self, group: list[tuple[int, Any]], preds: list[Any]) -> None:
        for (idx, rec), pred in zip(group, preds):
            entry = {"i": idx, "image": rec.get("image"), "prediction": pred, "rank": self.job.env.rank,
                     "t": round(time.time(), 3)}
            if self.hand.report is not None:
                entry["report"], entry["engine"] = self.hand.report, self.hand.engine
            if self.writer is None:  # a part file exists once it holds an image
                self.writer = self._open_part()
            self.writer.write(entry)
            self.tally.computed += 1
        self.hand.report = None

    def _predict(self, real_predict: Callable[[list[Any]], list[Any]]) -> Callable[[list[Any]], list[Any]]:
        def predict(records):
            if not isinstance(records, list):
                return real_predict(records)  # YOLOZU's own error
            out: list[Any] = []
            for group in self._groups(records):
                self._begin_image()
                self.hand.current = str(group[0][1].get("image"))
                preds = real_predict([rec for _, rec in group])
                if len(preds) != len(group):
                    raise RuntimeError(f"predict() returned {len(preds)} entries for {len(group)} images")
                self._write(group, preds)
                self.job.stop.end_image()
                out.extend(preds)
            self.hand.current = None
            self.tally.end = time.time()
            return out

        return predict

    def _adapter(self, real_cls: Any) -> Callable[..., Any]:
        def make(*a, **kw):
            adapter = real_cls(*a, **kw)
            adapter.predict = self._predict(adapter.predict)
            self.adapter = adapter
            return adapter

        return make

    def run(self) -> None:
        """YOLOZU's main over this rank's shard, output to a scratch file."""
        job, mod = self.job, self.job.mod
        names = job.patches(job.settings_extra())
        self.backend = names.pop("run_ttt", mod.run_ttt)
        scratch = job.parts_dir / f"scratch-r{job.env.rank:05d}-{os.getpid()}.json"
        ns = job.main_ns(output=str(scratch), ttt_log_out=None, tta_log_out=None)
        names["build_manifest"] = self._manifest(mod.build_manifest)
        names["run_ttt"] = self._ttt(self.backend)
        for name in ADAPTER_NAMES:
            names[name] = self._adapter(getattr(mod, name))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                job.run_main(ns, names)
        finally:
            with contextlib.suppress(OSError):
                scratch.unlink()
            if self.writer is not None:
                self.writer.close()

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
