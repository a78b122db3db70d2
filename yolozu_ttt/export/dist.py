"""The process-group plumbing: where this worker is (:class:`DistEnv`), dying with the launcher,
the process group and its collectives (:class:`ProcessGroup`), and SIGTERM (:class:`StopGuard`)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from typing import Any

from .errors import ExportError
from .publish import Terminated

PR_SET_PDEATHSIG = 1     # <linux/prctl.h>


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """The torchrun worker's place (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``)
    and its elastic attempt (``TORCHELASTIC_RESTART_COUNT``/``_MAX_RESTARTS``/``_RUN_ID``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    torchrun: bool = False
    restart_count: int = 0
    max_restarts: int = 0
    run_id: str | None = None

    @classmethod
    def from_environ(cls, environ: Any = None) -> "DistEnv | None":
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env or "RANK" not in env:
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
            restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
            max_restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", 0))
        except ValueError as exc:
            raise ExportError(f"invalid torchrun environment: {exc}") from exc
        if world < 1 or not 0 <= rank < world or local_world < 1 or not 0 <= local_rank < local_world:
            raise ExportError(
                f"invalid torchrun environment: RANK={rank} WORLD_SIZE={world} "
                f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}"
            )
        return cls(rank, world, local_rank, local_world, True, restarts, max_restarts,
                   env.get("TORCHELASTIC_RUN_ID") or None)


def die_with_launcher() -> bool:
    """Ask Linux to SIGKILL this worker when its parent (the torchrun launcher) dies
    (``prctl(PR_SET_PDEATHSIG)``): torchrun starts each worker in a session of its own, so nothing
    else stops it. Finished images are already in the part file. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return False
    if os.getppid() == 1:  # the launcher died before the signal was armed
        raise ExportError("the torchrun launcher is gone; nothing was done")
    return True




class ProcessGroup:
    """This worker's device, threads and process group (gloo on CPU, NCCL one GPU per rank), and
    the few collectives the export makes; the identity in one process."""

    def __init__(self, env: DistEnv, device: str, timeout_s: float):
        self.env = env
        self.device = device
        self.timeout_s = float(timeout_s)
        self.backend: str | None = None
        self._pg = False

    def setup(self) -> None:
        import torch

        env, cuda = self.env, self.device.startswith("cuda")
        if env.torchrun and cuda and self.device == "cuda":
            # one GPU per rank
            self.device = f"cuda:{env.local_rank % max(1, torch.cuda.device_count())}"
            self.backend = "nccl"
        elif env.world_size > 1:
            self.backend = "gloo"  # CPU, or ranks sharing an explicitly named GPU
        if cuda and torch.cuda.is_available():
            torch.cuda.set_device(torch.device(self.device))
        if env.torchrun and not cuda:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // env.local_world_size))
        if env.world_size > 1:
            self._init()

    def _init(self) -> None:
        import datetime

        import torch.distributed as dist

        env = self.env
        timeout = datetime.timedelta(seconds=self.timeout_s)
        kwargs: dict[str, Any] = {}
        if env.restart_count > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps its store across restarts: the addresses the attempt before published
            # there would send gloo's connection set-up to dead workers. This attempt's keys get a
            # prefix of their own.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                                  is_master=False, timeout=timeout)
            kwargs = {"store": dist.PrefixStore(f"yolozu-ttt/attempt-{env.restart_count}", store),
                      "rank": env.rank, "world_size": env.world_size}
        dist.init_process_group(self.backend, timeout=timeout, **kwargs)
        self._pg = True

    def settle(self) -> None:
        """Every rank done with the group's collectives before any rank tears it down (on the path
        where every rank gets here: a finished export). Seen once in ~35 two-worker exports: a rank
        that destroyed gloo's group while its peer was still in the last collective aborted at
        exit (std::terminate on a joinable worker thread). A barrier, not an all-reduce: with an
        all-reduce that abort came back (twice in ~60 two-worker exports). On torch before 2.8 a
        gloo worker thread freeing the barrier's held work needs the GIL that the group's
        destructor keeps (a rank hung at exit once on 2.6): one reason the floor is 2.8."""
        if self._pg:
            import torch.distributed as dist

            dist.barrier()

    def teardown(self) -> None:
        if self._pg:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._pg = False

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (one collective)."""
        if self.env.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (one collective)."""
        if self.env.world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on rank 0, in rank order (``[]`` elsewhere); a peer that died or did
        not come within the timeout raises."""
        if self.env.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.env.world_size if self.env.rank == 0 else []
        dist.gather_object(obj, out if self.env.rank == 0 else None, dst=0)
        return out

    def broadcast_bytes(self, flat: Any, nbytes: int) -> Any:
        """Rank 0's flat byte tensor on every rank (``nbytes`` long; on the GPU under NCCL)."""
        import torch
        import torch.distributed as dist

        comm = torch.device(self.device) if self.backend == "nccl" else torch.device("cpu")
        buf = flat.to(comm) if self.env.rank == 0 else torch.empty(nbytes, dtype=torch.uint8, device=comm)
        dist.broadcast(buf, src=0)
        return buf


class StopGuard:
    """SIGTERM (torchrun stopping or restarting the group, a scheduler, ``kill``): an image is
    adapted once, so a SIGTERM that comes while an image is in hand stops the run once that image
    is in the part file (:class:`Terminated`); otherwise at once."""

    def __init__(self) -> None:
        self.busy = False             # between an image's first adaptation step and its part-file line
        self.stop_requested = False   # SIGTERM came while busy: stop once that image is written
        self._saved: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._saved = signal.signal(signal.SIGTERM, self._on_sigterm)

    def restore(self) -> None:
        if self._saved is not None:
            signal.signal(signal.SIGTERM, self._saved)
            self._saved = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self.busy:
            raise Terminated()
        self.stop_requested = True

    def begin_image(self) -> None:
        if not self.busy:
            if self.stop_requested:
                raise Terminated()
            self.busy = True

    def end_image(self) -> None:
        self.busy = False
        if self.stop_requested:
            raise Terminated()
