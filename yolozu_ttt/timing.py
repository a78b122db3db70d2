"""Interleaved timing: every provider once per round, the order rotating every round; medians.

Timing every run of one provider before the next lets a burst of load on a shared machine land on
one side of a ratio. Here each round runs every provider once, in an order that rotates every round
(round ``i`` starts at provider ``i mod n``), so a burst spreads over all of them and, every n
rounds, each provider runs once in each place of the order (a run inherits the caches and the C
library heap the run before it left, so no provider always runs first). An untimed warm-up round (round 0) pays the first-call costs. A provider's
figure is the median over the timed rounds, with its spread (min-max); ratios are ratios of
medians. ``yolozu-ttt demo`` and ``benches/interleaved.py`` time with this one runner.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence


def rotation(providers: Sequence[str], round_index: int) -> list[str]:
    """Round ``round_index``'s order: ``providers`` rotated to start at ``round_index mod n``."""
    k = round_index % len(providers)
    return [*providers[k:], *providers[:k]]


def schedule(providers: Sequence[str], rounds: int, warmup: bool = True) -> Iterator[tuple[int, list[str]]]:
    """``(round, order)`` for the warm-up round 0 (when ``warmup``), then the timed rounds 1..``rounds``."""
    for i in range(0 if warmup else 1, int(rounds) + 1):
        yield i, rotation(providers, i)


def interleave(prepare: Callable[[str, int], Callable[[], Any]], providers: Sequence[str], rounds: int, *,
               warmup: bool = True, around: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
               sync: Callable[[], None] | None = None,
               done: Callable[[str, int, Any, float], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each provider's run in every timed round (:func:`schedule`'s order).

    ``prepare(provider, round)`` sets the run up (untimed: reset the model, pick the round's
    config) and returns it; the run is timed inside ``around()`` (e.g. a seeded RNG), up to
    ``sync()`` (a device's queued work) when given; ``done(provider, round, result, seconds)`` sees
    every run, the warm-up's included (round 0), before the next is prepared."""
    times: dict[str, list[float]] = {p: [] for p in providers}
    for i, order in schedule(providers, rounds, warmup):
        for provider in order:
            run = prepare(provider, i)
            with around():
                start = time.perf_counter()
                result = run()
                if sync is not None:
                    sync()
                seconds = time.perf_counter() - start
            if i:
                times[provider].append(seconds)
            if done is not None:
                done(provider, i, result, seconds)
    return times


@dataclass(frozen=True)
class Spread:
    """One provider's timed rounds: their median and range."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        if not values:
            raise ValueError("no timed rounds")
        v = tuple(float(x) for x in values)
        return cls(float(statistics.median(v)), min(v), max(v), v)


def spreads(times: Mapping[str, Sequence[float]]) -> dict[str, Spread]:
    """:class:`Spread` of every provider's rounds, in ``times``' order."""
    return {k: Spread.of(v) for k, v in times.items()}
