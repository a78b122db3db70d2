"""Sample-parallel checks shared by the methods' tests: run_parallel against each record alone."""
from __future__ import annotations

import copy
import warnings

import test_parallel
from test_parallel import assert_like_alone, parallel

from yolozu_ttt.parallel import ParallelFallbackWarning


def parallel_like_alone(model, batches, cfg, k):
    """run_parallel (no fallback) on a copy of ``model`` and each record against a fresh run_ttt of it
    alone: the reports, the adapted states and the start."""
    model = copy.deepcopy(model)  # a session leaves its last run's state in the model
    start = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParallelFallbackWarning)
        reports, states = parallel(model, batches, cfg, k)
    assert_like_alone(model, start, batches, cfg, reports, states)
    return reports, states, start


class FramesAdapter(test_parallel.RecordAdapter):
    """Record ``{"i": n}`` is the list of frames ``batches[n]`` (several batches per record)."""

    def build_loader(self, records, *, batch_size: int = 1):
        for record in records:
            yield from self.batches[record["i"]]
