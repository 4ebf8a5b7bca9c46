"""Resumable raw-sample streams: the part of the pipeline whose position is training state.

Every random choice here is *counter based*: it is drawn from a generator seeded with
``(seed, source, reader slot, what, counter)`` instead of from a generator whose internal state evolves.
A stream's position is therefore a handful of integers, and restoring it means setting those integers and
re-opening at most ``interleave`` shards at the right sample (skipping members by their headers, without
reading or decoding their data). Nothing is ever re-decoded on resume.

A *reader slot* is one (rank, DataLoader worker) pair: ``slot = rank * num_workers + worker`` out of
``num_slots = world_size * num_workers``. Each slot reads its own deterministic sequence of shards:

* ``resampled=True`` (the default; open_clip's ``--dataset-resampled``): shard ``j`` of slot ``s`` is drawn
  with replacement from all shards. Every slot sees the whole data set; no epochs.
* ``resampled=False`` (epoch mode): epoch ``e`` is a permutation of the shards seeded by ``(seed, e)``; slot
  ``s`` reads ``perm[s::num_slots]``, so within an epoch each shard is read by exactly one slot of one rank.
  Slots move to the next epoch independently (their shards differ in size), and the stream continues
  forever; the training length is set in steps.

Within a slot, ``interleave`` shards are open at once and each sample is taken from a random one of them;
a :class:`BlockShuffle` then permutes blocks of ``shuffle_buffer`` raw samples.
"""
from __future__ import annotations

import hashlib
import logging
import random
from typing import Dict, List, Optional, Sequence

from blip3o.data.shards import iter_tar_samples
from blip3o.data.stats import SkipStats

logger = logging.getLogger(__name__)


def derive_seed(*parts) -> int:
    """A stable 64-bit seed from a tuple of ints/strings (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def counter_rng(*parts) -> random.Random:
    return random.Random(derive_seed(*parts))


class AllBadError(RuntimeError):
    """Raised when a reader cannot find a single usable sample for a long time; training would otherwise spin."""


class ShardSequence:
    """The infinite, deterministic sequence of shards that one reader slot visits."""

    def __init__(self, shards: Sequence[str], slot: int, num_slots: int, seed: int, name: str, resampled: bool):
        if not shards:
            raise ValueError(f"source '{name}' has no shards")
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} out of range for {num_slots} reader slots")
        self.shards = list(shards)
        self.slot, self.num_slots, self.seed, self.name = slot, num_slots, seed, name
        self.resampled = resampled
        if not resampled and len(self.shards) < num_slots:
            # Epoch mode splits shards across readers; with fewer shards than readers some would get nothing
            # and spin. Sampling with replacement keeps every reader fed (the usual fix for small sources
            # such as a few-tar instruction set mixed into a large run).
            logger.warning(
                "source '%s' has %d shards for %d reader slots (ranks x workers): reading it resampled",
                name, len(self.shards), num_slots)
            self.resampled = True
        self.per_epoch = len(range(slot, len(self.shards), num_slots))
        self._perm_epoch, self._perm = -1, None

    def __getitem__(self, j: int) -> str:
        if self.resampled:
            return self.shards[counter_rng(self.seed, self.name, "resample", self.slot, j).randrange(len(self.shards))]
        epoch, i = divmod(j, self.per_epoch)
        if epoch != self._perm_epoch:
            perm = list(range(len(self.shards)))
            counter_rng(self.seed, self.name, "epoch", epoch).shuffle(perm)
            self._perm_epoch, self._perm = epoch, perm
        return self.shards[self._perm[self.slot + i * self.num_slots]]


class ShardStream:
    """Raw samples of one webdataset source for one reader slot.

    State: ``{"next": index of the next shard to open, "open": [[shard index, samples consumed], ...],
    "draws": samples drawn so far}``.
    """

    def __init__(self, name: str, seq: ShardSequence, interleave: int, stats: SkipStats, dry_limit: int):
        self.name, self.seq, self.stats = name, seq, stats
        self.interleave = max(1, int(interleave))
        if not seq.resampled:
            # Opening more shards than this slot has per epoch would start reading the next epoch (possibly
            # a shard another rank is reading in this one) before the current epoch is done.
            self.interleave = min(self.interleave, seq.per_epoch)
        self.dry_limit = dry_limit
        self.next_j = 0
        self.draws = 0
        self._open: List[list] = []  # [shard index j, samples consumed n, iterator or None, produced anything]
        self._dry = 0

    def state(self) -> dict:
        return {"next": self.next_j, "open": [[e[0], e[1]] for e in self._open], "draws": self.draws}

    def restore(self, state: dict) -> None:
        self.close()
        self.next_j, self.draws = int(state["next"]), int(state["draws"])
        self._open = [[int(j), int(n), None, n > 0] for j, n in state["open"]]

    def close(self) -> None:
        for e in self._open:
            if e[2] is not None:
                e[2].close()
        self._open = []

    def _take_next_shard(self) -> list:
        entry = [self.next_j, 0, None, False]
        self.next_j += 1
        return entry

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, object]:
        while True:
            while len(self._open) < self.interleave:
                self._open.append(self._take_next_shard())
            i = 0
            if len(self._open) > 1:
                i = counter_rng(self.seq.seed, self.name, "pick", self.seq.slot, self.draws).randrange(len(self._open))
            entry = self._open[i]
            if entry[2] is None:
                entry[2] = iter_tar_samples(self.seq[entry[0]], skip=entry[1], on_event=self.stats.add)
            try:
                sample = next(entry[2])
            except StopIteration:
                if not entry[3]:
                    self._dry += 1
                    if self._dry >= self.dry_limit:
                        raise AllBadError(
                            f"source '{self.name}': the last {self._dry} shards opened gave no samples "
                            f"({_counts(self.stats)}); check its shards") from None
                self._open[i] = self._take_next_shard()  # same position, so later picks stay deterministic
                continue
            entry[1] += 1
            entry[3] = True
            self._dry = 0
            self.draws += 1
            sample["__source__"] = self.name
            return sample


class RecordStream:
    """Raw records of one JSON source for one reader slot (records are indexable, so no shards).

    Resampled: record ``n`` of slot ``s`` is a uniform draw. Epoch mode: a seeded permutation per epoch,
    slot ``s`` reads ``perm[s::num_slots]``. State: ``{"n": records drawn}``.
    """

    def __init__(self, name: str, records, slot: int, num_slots: int, seed: int, resampled: bool):
        self.name, self.records = name, records
        self.size = len(records)
        if self.size == 0:
            raise ValueError(f"JSON source '{name}' has no records")
        self.slot, self.num_slots, self.seed = slot, num_slots, seed
        self.resampled = resampled or self.size < num_slots
        self.per_epoch = len(range(slot, self.size, num_slots))
        self.n = 0
        self._perm_epoch, self._perm = -1, None

    def state(self) -> dict:
        return {"n": self.n}

    def restore(self, state: dict) -> None:
        self.n = int(state["n"])

    def close(self) -> None:
        pass

    def _index(self, n: int) -> int:
        if self.resampled:
            return counter_rng(self.seed, self.name, "record", self.slot, n).randrange(self.size)
        epoch, i = divmod(n, self.per_epoch)
        if epoch != self._perm_epoch:
            perm = list(range(self.size))
            counter_rng(self.seed, self.name, "epoch", epoch).shuffle(perm)
            self._perm_epoch, self._perm = epoch, perm
        return self._perm[self.slot + i * self.num_slots]

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, object]:
        idx = self._index(self.n)
        self.n += 1
        return {"__key__": f"{self.name}/{idx}", "__index__": idx, "__source__": self.name,
                "record": self.records[idx]}


class BlockShuffle:
    """Shuffles the raw stream in blocks of ``size`` samples.

    A rolling shuffle buffer (webdataset's ``shuffle``) has state that is the buffer's *contents*; a block
    shuffle's state is where the block started plus an offset. To resume, the upstream stream is restored to
    the block start, the block is refilled (raw bytes only: no decoding) and permuted with the same
    counter-seeded generator, and the first ``pos`` samples are dropped. The cost is at most one block of
    raw reads per reader, independent of how far training got.

    State: ``{"block": b, "pos": p, "start": upstream state at the start of block b}``.
    """

    def __init__(self, upstream, size: int, seed: int, slot: int, stats: SkipStats):
        self.up, self.size = upstream, max(1, int(size))
        self.seed, self.slot, self.stats = seed, slot, stats
        self.block = -1
        self.pos = 0
        self.start: Optional[dict] = None
        self.buf: List[dict] = []

    def _fill(self, block: int) -> None:
        self.start = self.up.state()
        self.buf = [next(self.up) for _ in range(self.size)]
        if self.size > 1:
            counter_rng(self.seed, "block", self.slot, block).shuffle(self.buf)
        self.block, self.pos = block, 0

    def state(self) -> dict:
        return {"block": self.block, "pos": self.pos, "start": self.start}

    def restore(self, state: dict) -> None:
        if state.get("start") is None:  # nothing was drawn yet
            return
        self.up.restore(state["start"])
        with self.stats.muted():  # this block's shard-level events were counted before the checkpoint
            self._fill(int(state["block"]))
        self.pos = int(state["pos"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.pos >= len(self.buf):
            self._fill(self.block + 1)
        sample = self.buf[self.pos]
        self.buf[self.pos] = None  # release the bytes as soon as they are handed on
        self.pos += 1
        return sample


def _counts(stats: SkipStats) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(stats.counts.items())) or "nothing counted"
