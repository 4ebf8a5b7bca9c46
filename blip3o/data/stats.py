"""Counting what the data pipeline skips, so bad data is never silent.

Every skip has a reason (the constants below and the shard-level ones in ``shards.py``). Each reader
(one per DataLoader worker) keeps its own :class:`SkipStats`; its counts travel to the main process with
every batch and are part of the loader's ``state_dict``, so totals survive a resume.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, Mapping, Optional

logger = logging.getLogger("blip3o.data")

# Sample-level reasons.
BAD_IMAGE = "bad_image"  # undecodable, truncated, not an image, decompression bomb
MISSING_IMAGE = "missing_image"  # no jpg/png/webp field, or the JSON record's file does not exist
MISSING_CAPTION = "missing_caption"  # no caption field
EMPTY_CAPTION = "empty_caption"  # caption present but blank (or not UTF-8)
BAD_TRANSFORM = "bad_transform"  # the image decoded but the transform failed on it
BAD_CACHE = "bad_cache"  # cached x0 unreadable or of the wrong shape
BAD_RECORD = "bad_record"  # JSON record that is not a usable t2i pair or conversation
TOO_LONG = "too_long"  # a conversation whose image block or answer does not fit max_length


class SkipStats:
    """Per-reader skip counters. The first skip of each reason is logged at WARNING with its detail (so the
    culprit file is named once), later ones at DEBUG; the totals are reported by the loader."""

    def __init__(self, where: str = "", counts: Optional[Mapping[str, int]] = None, samples: int = 0):
        self.where = where
        self.counts: Dict[str, int] = dict(counts or {})
        self.samples = samples  # good samples delivered
        self._muted = 0

    def add(self, reason: str, detail: str = "") -> None:
        if self._muted:
            return
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        level = logging.WARNING if n == 1 else logging.DEBUG
        if logger.isEnabledFor(level):
            suffix = " (further ones are counted, not logged)" if n == 1 else ""
            logger.log(level, "data%s: skipped (%s) %s%s", f" [{self.where}]" if self.where else "", reason,
                       detail, suffix)

    @contextlib.contextmanager
    def muted(self):
        """While replaying already-counted input after a resume, nothing is counted twice."""
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def state(self) -> dict:
        return {"counts": dict(self.counts), "samples": self.samples}


def format_counts(counts: Mapping[str, int], samples: Optional[int] = None) -> str:
    """``skipped 12 (bad_image=10, empty_caption=2) of 5012`` — one line for progress and summaries."""
    total = sum(counts.values())
    detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if v)
    head = f"skipped {total}" + (f" ({detail})" if detail else "")
    if samples is not None:
        head += f", {samples} samples delivered"
    return head
