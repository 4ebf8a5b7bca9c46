"""The per-reader pipeline: raw streams -> mix -> block shuffle -> decode/validate -> batch -> collate.

:class:`StreamingDataset` is a torch ``IterableDataset`` that yields *whole batches* (the DataLoader runs
with ``batch_size=None``): each batch carries, under ``"_state"``, the reader's position right after its
last sample. :class:`blip3o.data.loader.ResumableLoader` strips that and keeps the latest one per worker;
that is the data part of a checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from blip3o.data import stats as S
from blip3o.data.cache import X0_FIELD, decode_x0
from blip3o.data.collate import count_images, encode_conversation
from blip3o.data.image_io import decode_image, open_image
from blip3o.data.json_data import record_caption, record_image_path, record_kind
from blip3o.data.mixing import Mixer
from blip3o.data.streams import AllBadError, BlockShuffle, RecordStream, ShardSequence, ShardStream, derive_seed
from blip3o.data.transforms import SquareImage

logger = logging.getLogger(__name__)


@dataclass
class SourceSpec:
    """One data source after config parsing. ``kind`` is "webdataset" or "json"."""

    name: str
    kind: str
    weight: float = 1.0
    shards: List[str] = field(default_factory=list)  # webdataset (already expanded; cache shards if cached)
    records: object = None  # json: indexable records
    image_root: Optional[str] = None
    caption_key: Optional[str] = "txt"
    resampled: bool = True
    task: str = "auto"  # gen | und | auto (json: "conversations" -> und); webdataset is always gen
    cached: bool = False  # shards are target-feature cache shards (KEY.x0.npy instead of an image)
    x0_shape: Optional[List[int]] = None
    load_skips: int = 0  # JSON records that could not be parsed when the file was loaded
    source_shards: List[str] = field(default_factory=list)  # the original shards when ``shards`` are cache shards


class SampleDecoder:
    """Raw sample -> decoded sample dict (``kind`` gen/und) or None, counting every skip by reason."""

    def __init__(self, sources: Sequence[SourceSpec], image_transform: Optional[Callable], tokenizer=None,
                 template=None, und_image=None, und_image_tokens: int = 256, max_length: int = 512):
        self.sources = {s.name: s for s in sources}
        self.image_transform = image_transform
        self.tokenizer, self.template = tokenizer, template
        self.und_image = und_image or SquareImage(448)
        self.und_image_tokens, self.max_length = und_image_tokens, max_length

    def __call__(self, raw: dict, stats: S.SkipStats) -> Optional[dict]:
        src = self.sources[raw["__source__"]]
        if src.kind == "json":
            return self._json(raw, src, stats)
        return self._wds(raw, src, stats)

    def _caption(self, value, where: str, stats: S.SkipStats) -> Optional[str]:
        if value is None:
            stats.add(S.MISSING_CAPTION, where)
            return None
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                stats.add(S.EMPTY_CAPTION, f"{where}: not UTF-8")
                return None
        if not isinstance(value, str) or not value.strip():
            stats.add(S.EMPTY_CAPTION, where)
            return None
        return value.strip()

    def _pixels(self, img: Image.Image, where: str, stats: S.SkipStats):
        try:
            return self.image_transform(img)
        except Exception as e:  # noqa: BLE001
            stats.add(S.BAD_TRANSFORM, f"{where}: {type(e).__name__}: {e}")
            return None

    def _wds(self, raw: dict, src: SourceSpec, stats: S.SkipStats) -> Optional[dict]:
        where = f"{raw['__key__']} in {raw.get('__url__')}"
        caption = self._caption(raw.get(src.caption_key), where, stats)
        if caption is None:
            return None
        out = {"kind": "gen", "key": raw["__key__"], "source": src.name, "caption": caption}
        if src.cached:
            if X0_FIELD not in raw:
                stats.add(S.BAD_CACHE, f"{where}: no {X0_FIELD}")
                return None
            try:
                x0 = torch.from_numpy(decode_x0(raw[X0_FIELD]).astype(np.float32))
            except Exception as e:  # noqa: BLE001
                stats.add(S.BAD_CACHE, f"{where}: {type(e).__name__}: {e}")
                return None
            if src.x0_shape is not None and list(x0.shape) != list(src.x0_shape):
                stats.add(S.BAD_CACHE, f"{where}: shape {list(x0.shape)} != {src.x0_shape}")
                return None
            out["target_latents"] = x0
            return out
        img = decode_image(raw, stats)
        if img is None:
            return None
        pixels = self._pixels(img, where, stats)
        if pixels is None:
            return None
        out["pixel_values"] = pixels
        return out

    def _json(self, raw: dict, src: SourceSpec, stats: S.SkipStats) -> Optional[dict]:
        rec = raw["record"]
        where = f"record {raw['__index__']} of source '{src.name}'"
        if not isinstance(rec, dict):
            stats.add(S.BAD_RECORD, f"{where}: not an object")
            return None
        kind = record_kind(rec, src.task)
        try:
            path = record_image_path(rec, src.image_root)
        except ValueError as e:
            stats.add(S.BAD_RECORD, f"{where}: {e}")
            return None
        out = {"kind": kind, "key": raw["__key__"], "source": src.name}
        if kind == "und":
            return self._conversation(rec, path, out, where, stats)
        if kind == "edit":
            return self._edit(rec, src, out, where, stats)
        found, value = record_caption(rec, src.caption_key)
        caption = self._caption(value if found else None, where, stats)
        if caption is None:
            return None
        if path is None or not os.path.isfile(path):
            stats.add(S.MISSING_IMAGE, f"{where}: {path or 'no image field'}")
            return None
        img = open_image(path, path, stats)
        if img is None:
            return None
        pixels = self._pixels(img, path, stats)
        if pixels is None:
            return None
        out.update(caption=caption, pixel_values=pixels)
        return out

    def _edit(self, rec, src, out, where, stats) -> Optional[dict]:
        """An editing triple becomes a generation sample whose prompt also carries the source image
        (seen by the backbone's vision tower, like understanding images) and whose target is the edit."""
        instruction = self._caption(rec.get("instruction"), where, stats)
        if instruction is None:
            return None
        images = []
        for field in ("source", "target"):
            path = rec[field] if os.path.isabs(str(rec[field])) or not src.image_root else \
                os.path.join(src.image_root, rec[field])
            if not os.path.isfile(path):
                stats.add(S.MISSING_IMAGE, f"{where}: {field} {path}")
                return None
            img = open_image(path, path, stats)
            if img is None:
                return None
            images.append(img)
        pixels = self._pixels(images[1], where, stats)
        if pixels is None:
            return None
        out.update(kind="gen", caption=instruction, edit_image=self.und_image(images[0]), pixel_values=pixels)
        return out

    def _conversation(self, rec, path, out, where, stats) -> Optional[dict]:
        conv = rec.get("conversations")
        if not isinstance(conv, (list, tuple)) or not conv:
            stats.add(S.BAD_RECORD, f"{where}: no conversations")
            return None
        n_img = count_images(conv)
        if n_img != (1 if path else 0):
            stats.add(S.BAD_RECORD, f"{where}: {n_img} <image> placeholders but {'an' if path else 'no'} image")
            return None
        img = None
        if path:
            if not os.path.isfile(path):
                stats.add(S.MISSING_IMAGE, f"{where}: {path}")
                return None
            img = open_image(path, path, stats)
            if img is None:
                return None
            img = self.und_image(img)
        try:
            ids, labels = encode_conversation(self.tokenizer, conv, self.template, self.und_image_tokens,
                                              self.max_length)
        except OverflowError as e:
            stats.add(S.TOO_LONG, f"{where}: {e}")
            return None
        except ValueError as e:
            stats.add(S.BAD_RECORD, f"{where}: {e}")
            return None
        out.update(input_ids=ids, labels=labels, image=img)
        return out


class StreamingDataset(IterableDataset):
    """Yields collated batches forever; see the module docstring of ``streams.py`` for the order."""

    def __init__(self, sources: Sequence[SourceSpec], decoder: SampleDecoder, collate: Callable, *,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 1000, interleave: int = 4, max_consecutive_bad: int = 1000):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.sources = list(sources)
        self.decoder, self.collate = decoder, collate
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers = max(0, int(num_workers))
        self.shuffle_buffer, self.interleave = shuffle_buffer, interleave
        self.max_consecutive_bad = max(1, int(max_consecutive_bad))
        # Set by the loader before each DataLoader is created (so forked/spawned workers get it):
        # {"offset": logical id of physical worker 0, "workers": {str(logical id): snapshot}}.
        self.resume: Dict[str, object] = {"offset": 0, "workers": {}}

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.num_workers)

    def _logical_worker(self):
        info = get_worker_info()
        n = self.readers_per_rank
        if info is None:
            return 0
        if info.num_workers != n:
            raise RuntimeError(f"dataset built for {n} workers runs under {info.num_workers}")
        # Physical worker 0 is asked first by the DataLoader; it plays whichever reader's turn it was when the
        # state was saved, so the round-robin order continues exactly across a resume.
        return (info.id + int(self.resume.get("offset", 0))) % n

    def build_reader(self, worker: int):
        n = self.readers_per_rank
        slot, num_slots = self.rank * n + worker, self.world_size * n
        snap = self.resume.get("workers", {}).get(str(worker))
        st = (snap or {}).get("stats", {})
        stats = S.SkipStats(f"rank {self.rank} worker {worker}", st.get("counts"), st.get("samples", 0))
        streams = []
        for src in self.sources:
            if src.kind == "json":
                streams.append(RecordStream(src.name, src.records, slot, num_slots, self.seed, src.resampled))
            else:
                seq = ShardSequence(src.shards, slot, num_slots, self.seed, src.name, src.resampled)
                dry = max(self.max_consecutive_bad, 10 * len(src.shards))
                streams.append(ShardStream(src.name, seq, self.interleave, stats, dry))
        mixer = Mixer(streams, [s.weight for s in self.sources], self.seed, slot)
        shuffle = BlockShuffle(mixer, self.shuffle_buffer, self.seed, slot, stats)
        batches = 0
        if snap:
            shuffle.restore(snap["shuffle"])
            batches = int(snap["batches"])
        return shuffle, stats, batches

    def __iter__(self):
        worker = self._logical_worker()
        in_worker = get_worker_info() is not None
        shuffle, stats, batches = self.build_reader(worker)
        try:
            while True:
                with _batch_rng(derive_seed(self.seed, self.rank, worker, batches) % (2 ** 32), in_worker):
                    batch = self.collate(self._next_samples(shuffle, stats, worker))
                batches += 1
                batch["_state"] = {"worker": worker, "snapshot": {
                    "shuffle": shuffle.state(), "batches": batches, "stats": stats.state()}}
                yield batch
        finally:
            shuffle.up.close()

    def _next_samples(self, shuffle, stats: S.SkipStats, worker: int) -> List[dict]:
        samples: List[dict] = []
        consecutive_bad = 0  # a batch always ends on a good sample, so the run of bad ones starts here
        while len(samples) < self.batch_size:
            sample = self.decoder(next(shuffle), stats)
            if sample is None:
                consecutive_bad += 1
                if consecutive_bad >= self.max_consecutive_bad:
                    raise AllBadError(
                        f"data: {consecutive_bad} samples in a row were unusable on rank {self.rank} worker "
                        f"{worker} ({S.format_counts(stats.counts)}); check the data paths and caption_key")
                continue
            consecutive_bad = 0
            stats.samples += 1
            samples.append(sample)
        return samples


@contextlib.contextmanager
def _batch_rng(seed: int, in_worker: bool):
    """Seeds python/numpy/torch from the batch index, so random transforms replay exactly after a resume.

    In a DataLoader worker the global generators belong to the data pipeline and are simply reseeded. In the
    main process (num_workers=0) they belong to training (noise, dropout, CFG drop), so they are saved and
    restored around the batch: data loading must not shift the model's random stream.
    """
    if in_worker:
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        yield
        return
    py, npy, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators are never touched
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)
