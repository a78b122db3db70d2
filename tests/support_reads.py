"""Host reads per step: what would make the host wait for a GPU, counted on the CPU."""
from __future__ import annotations

import torch


#: host reads per eager step of each method (what would sync with a GPU): the engine's one read,
#: which brings back the method's scalars with the stats, and EATA's read of its selection before its
#: backward, which saves the backward where nothing is selected (README difference 12)
HOST_READS_PER_STEP = {**dict.fromkeys(("tent", "sar", "cotta", "mim"), 1), "eata": 2}
#: host reads of a step in graph mode (replayed), every method: the one read after the replay
HOST_READS_PER_CAPTURED_STEP = 1
#: host reads of an eager EATA step that selects nothing: the selection's, no backward, no update
HOST_READS_PER_SKIPPED_STEP = 1

class HostReads:
    """Counts, inside ``with``, what would make the host wait for a GPU: the operations
    ``yolozu_ttt.capture.SyncProbe`` flags, plus each ``Tensor.tolist``/``Tensor.numpy`` (on the
    CPU these read memory directly, so the probe cannot see them). ``count`` after the block."""

    def __init__(self) -> None:
        from yolozu_ttt.capture import SyncProbe

        self.probe = SyncProbe()
        self.reads = 0
        self.count = 0

    def __enter__(self) -> "HostReads":
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, self._counted(original))
        self.probe.__enter__()
        return self

    def _counted(self, original):
        def read(t, *args, **kwargs):
            self.reads += 1
            return original(t, *args, **kwargs)

        return read

    def __exit__(self, *exc) -> None:
        self.probe.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self.count = self.reads + sum(self.probe.hits.values())
