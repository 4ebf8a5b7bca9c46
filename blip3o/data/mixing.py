"""Weighted mixing of several sources (e.g. long captions + short captions + JourneyDB + BLIP3o-60k).

Each raw draw picks a source with probability ``weight / sum(weights)``, using a counter-seeded generator
(see ``streams.py``), so the choice of draw ``t`` depends only on ``(seed, slot, t)`` and the mixer's
position is the single integer ``t`` plus its sources' positions. Weights are proportions of *raw* draws:
a source with many bad samples delivers proportionally fewer good ones, and that shows in the skip counts.
"""
from __future__ import annotations

import bisect
import itertools
import math
from typing import List, Sequence

from blip3o.data.streams import counter_rng


def normalize_weights(weights: Sequence[float], names: Sequence[str] = ()) -> List[float]:
    out = []
    for i, w in enumerate(weights):
        w = float(w)
        if not math.isfinite(w) or w < 0:
            name = names[i] if i < len(names) else i
            raise ValueError(f"source {name!r} has weight {w}; weights must be finite and >= 0")
        out.append(w)
    total = sum(out)
    if total <= 0:
        raise ValueError("all source weights are zero")
    return [w / total for w in out]


class Mixer:
    """Draws from ``streams`` according to ``weights``. State: ``{"t": draws, "streams": [stream states]}``."""

    def __init__(self, streams: Sequence, weights: Sequence[float], seed: int, slot: int):
        if len(streams) != len(weights):
            raise ValueError("one weight per source is needed")
        self.streams = list(streams)
        self.probs = normalize_weights(weights, [getattr(s, "name", str(i)) for i, s in enumerate(streams)])
        self.cum = list(itertools.accumulate(self.probs))
        self.cum[-1] = 1.0  # guard against rounding leaving a gap at the top
        self.seed, self.slot = seed, slot
        self.t = 0

    def state(self) -> dict:
        return {"t": self.t, "streams": [s.state() for s in self.streams]}

    def restore(self, state: dict) -> None:
        if len(state["streams"]) != len(self.streams):
            raise ValueError("saved data state has a different number of sources than the configuration")
        self.t = int(state["t"])
        for s, st in zip(self.streams, state["streams"]):
            s.restore(st)

    def close(self) -> None:
        for s in self.streams:
            s.close()

    def pick(self, t: int) -> int:
        if len(self.streams) == 1:
            return 0
        u = counter_rng(self.seed, "mix", self.slot, t).random()
        return min(bisect.bisect_right(self.cum, u), len(self.streams) - 1)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        i = self.pick(self.t)
        self.t += 1
        return next(self.streams[i])
