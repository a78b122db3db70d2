"""What one export is (:class:`Job`: fixed for the whole run) and how YOLOZU's ``main`` is called
with our namespace and a few of its module globals rebound (:mod:`yolozu_ttt.seam` lists them)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable

from .dist import DistEnv, ProcessGroup, StopGuard
from .publish import Publication

ADAPTER_NAMES = ("RTDETRPoseAdapter", "DummyAdapter")


@dataclasses.dataclass
class Job:
    """One ``export-predictions`` on this rank: YOLOZU's export module ``mod`` and namespace
    ``args``, where the worker is (``env``, ``group``), whether part files are resumed, where the
    output, its logs and the part files go, and the cli's module rebindings (``patches(extra,
    ran=None)``: the backend's ``run_ttt`` and the settings wrapper)."""

    mod: Any
    args: argparse.Namespace
    env: DistEnv
    resume: bool
    patches: Callable[..., dict[str, Any]]
    group: ProcessGroup
    stop: StopGuard
    output_path: Path
    parts_dir: Path
    publication: Publication

    @classmethod
    def make(cls, mod: Any, args: argparse.Namespace, *, env: DistEnv, resume: bool, timeout_s: float,
             patches: Callable[..., dict[str, Any]]) -> "Job":
        output = Path(mod.repo_root / args.output)
        device = str(getattr(args, "device", "cpu") or "cpu")
        # an elastic restart continues the part files of the attempt before it, without --resume
        return cls(mod, args, env, bool(resume) or env.restart_count > 0, patches, ProcessGroup(env, device, timeout_s),
                   StopGuard(), output, Path(str(output) + ".parts"), Publication(mod.repo_root, args))

    @property
    def unit(self) -> int:
        """The inference batch: shard boundaries and predict groups fall on its multiples."""
        return max(1, int(getattr(self.args, "infer_batch_size", 1) or 1))

    @property
    def ttt(self) -> bool:
        return bool(getattr(self.args, "ttt", False))

    def settings_extra(self) -> dict[str, Any]:
        return {"world_size": int(self.env.world_size), "distributed_backend": self.group.backend}

    def where(self, image: str | None = None) -> str:
        text = f"rank {self.env.rank} of {self.env.world_size}"
        return f"{text}, image {image}" if image else text

    def main_ns(self, **changes: Any) -> argparse.Namespace:
        ns = copy.deepcopy(self.args)
        ns.max_images = None  # applied by our build_manifest, before sharding
        ns.device = self.group.device
        for key, value in changes.items():
            setattr(ns, key, value)
        return ns

    def run_main(self, ns: argparse.Namespace, names: dict[str, Any]) -> None:
        """YOLOZU's own ``main`` on ``ns``, with ``names`` rebound in its module for the call."""
        from ..seam import rebound

        def _parse_args(_argv: Any) -> argparse.Namespace:
            return ns

        with rebound(self.mod, _parse_args=_parse_args, **names):
            self.mod.main([])
