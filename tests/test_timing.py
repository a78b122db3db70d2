"""yolozu_ttt.timing: the interleaved runner the demo and benches/interleaved.py time with.

Its clock is replaced by a counter that only the runs (and the device sync) advance, so every
measured second is known exactly: what the runner times, and what it leaves out, is seen."""
from __future__ import annotations

import contextlib

import pytest

from yolozu_ttt import timing


class Clock:
    """``time.perf_counter`` stand-in: moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rotation_starts_each_round_one_provider_later():
    p = ["a", "b", "c"]
    assert [timing.rotation(p, i) for i in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                         ["a", "b", "c"]]
    assert list(timing.schedule(p, 2)) == [(0, p), (1, ["b", "c", "a"]), (2, ["c", "a", "b"])]
    assert list(timing.schedule(p, 2, warmup=False)) == [(1, ["b", "c", "a"]), (2, ["c", "a", "b"])]


def test_every_provider_takes_every_place_once_in_n_rounds():
    p = ["a", "b", "c", "d"]
    orders = [o for _, o in timing.schedule(p, len(p), warmup=False)]
    for place in range(len(p)):
        assert sorted(o[place] for o in orders) == p, place


@pytest.mark.parametrize("warmup", [True, False])
def test_interleave_times_the_run_and_the_sync_not_the_setup(monkeypatch, warmup):
    clock = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    cost = {"a": 1.0, "b": 10.0}
    seen, events = [], []

    def prepare(provider, i):
        clock.now += 1000.0  # setup is not timed
        events.append(("prepare", provider, i))

        def run():
            clock.now += cost[provider] * (100 if i == 0 else i)  # warm-up rounds cost more
            events.append(("run", provider, i))
            return provider.upper()
        return run

    def sync():
        clock.now += 0.5
        events.append(("sync",))

    @contextlib.contextmanager
    def around():
        events.append(("enter",))
        yield
        clock.now += 2000.0  # leaving the context is not timed either
        events.append(("exit",))

    times = timing.interleave(prepare, ["a", "b"], 3, warmup=warmup, around=around, sync=sync,
                              done=lambda *a: seen.append(a))
    assert times == {"a": [1.5, 2.5, 3.5], "b": [10.5, 20.5, 30.5]}  # the warm-up round dropped
    rounds = ([(0, ["a", "b"])] if warmup else []) + [(1, ["b", "a"]), (2, ["a", "b"]), (3, ["b", "a"])]
    assert [(p, i) for i, order in rounds for p in order] == [(p, i) for p, i, _, _ in seen]
    for provider, i, result, seconds in seen:
        assert result == provider.upper() and seconds == cost[provider] * (100 if i == 0 else i) + 0.5
    assert events[:5] == [("prepare", rounds[0][1][0], rounds[0][0]), ("enter",),
                          ("run", rounds[0][1][0], rounds[0][0]), ("sync",), ("exit",)]


def test_spread_is_median_and_range():
    s = timing.Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.low, s.high, s.values) == (2.5, 1.0, 10.0, (3.0, 1.0, 2.0, 10.0))
    assert timing.spreads({"x": [4, 1, 2]})["x"].median == 2.0
    with pytest.raises(ValueError, match="no timed rounds"):
        timing.Spread.of([])
