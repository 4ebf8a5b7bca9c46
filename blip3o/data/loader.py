"""The training data loader: config -> sources -> :class:`ResumableLoader` with exact resume.

Exact resume, with any number of workers and ranks:

* every reader (one per (rank, worker)) produces a deterministic stream of batches whose position is a small
  dict of counters (``streams.py``); the position after each batch travels with it;
* torch's DataLoader asks its workers for batches in strict round robin (worker 0, 1, ..., 0, 1, ...) and the
  streams are infinite, so the k-th batch always comes from worker ``k % num_workers``;
* the loader keeps, per worker, the position after the last batch *handed to the caller* (batches
  prefetched but not consumed do not count) and the id of the worker whose turn is next;
* on resume each worker restarts at its saved position, and the DataLoader's physical worker 0 plays the
  worker whose turn it was, so the caller sees exactly the batches an unbroken run would have produced next.

Each rank keeps its own state (``state_dict()`` differs per rank); save it per rank.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from blip3o.config import DataConfig
from blip3o.data.cache import resolve_cache
from blip3o.data.collate import BatchCollator
from blip3o.data.json_data import load_json_records, record_kind
from blip3o.data.pipeline import SampleDecoder, SourceSpec, StreamingDataset
from blip3o.data.shards import expand_shards
from blip3o.data.stats import format_counts
from blip3o.data.streams import derive_seed
from blip3o.data.transforms import SquareImage, build_image_transform
from blip3o.prompts import ChatTemplate, get_template

logger = logging.getLogger("blip3o.data")

STATE_VERSION = 1

def as_data_config(data_cfg) -> DataConfig:
    """The loader's settings as a :class:`blip3o.config.DataConfig` (the one schema of the ``data:`` section).

    A DataConfig is used as is; a dict of its fields (tests, benchmarks) is converted, a key that is not a
    field being a one-line error and a None value meaning the field's default; None gives the defaults.
    """
    if data_cfg is None:
        return DataConfig()
    if isinstance(data_cfg, DataConfig):
        return data_cfg
    if isinstance(data_cfg, Mapping):
        fields = {f.name for f in dataclasses.fields(DataConfig)}
        unknown = sorted(set(data_cfg) - fields)
        if unknown:
            raise ValueError(f"data config: unknown field(s) {', '.join(unknown)}; the fields are DataConfig's "
                             "(blip3o/config.py)")
        return DataConfig(**{k: v for k, v in data_cfg.items() if v is not None})
    raise TypeError(f"data config must be a DataConfig or a dict of its fields, got {type(data_cfg).__name__}")


def _as_bool_or_auto(value) -> object:
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return "auto"
        if v in ("1", "true", "yes", "on"):
            return True
        if v in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"use_cache must be true, false or auto, got {value!r}")
    return bool(value)


def parse_sources(data_cfg, target_signature: Optional[dict] = None) -> List[SourceSpec]:
    """Builds the sources from the config. A source dict has: ``shards`` (webdataset) or ``json_path``
    (JSON), and optionally ``name``, ``weight`` (1.0), ``caption_key``, ``image_root``, ``resampled``,
    ``task`` (gen | und | auto), ``cache_dir``, ``json_loader``; the others inherit the data-level value."""
    cfg = as_data_config(data_cfg)
    raw_sources = cfg.sources
    if not raw_sources:
        raw_sources = []
        if cfg.train_shards:
            raw_sources.append({"name": "train", "shards": cfg.train_shards})
        if cfg.json_path:
            raw_sources.append({"name": "json", "json_path": cfg.json_path})
    if not raw_sources:
        raise ValueError("data config has no data: set train_shards, json_path or sources")
    use_cache = _as_bool_or_auto(cfg.use_cache)
    if use_cache is True and target_signature is None:
        raise ValueError("use_cache=true needs the target encoder's signature to check the cache against")
    out: List[SourceSpec] = []
    names = set()
    for i, rs in enumerate(raw_sources):
        rs = dict(rs) if isinstance(rs, dict) else {k: getattr(rs, k) for k in vars(rs)}
        name = str(rs.get("name") or f"source{i}")
        if name in names:
            raise ValueError(f"two sources are named '{name}'")
        names.add(name)
        def pick(key, fallback):  # a source field left out or None inherits the data-level value
            return rs[key] if rs.get(key) is not None else fallback

        common = dict(name=name, weight=float(pick("weight", 1.0)),
                      resampled=bool(pick("resampled", cfg.resampled)),
                      image_root=pick("image_root", cfg.image_root),
                      task=str(pick("task", "auto")))
        if rs.get("shards") is not None and rs.get("json_path") is not None:
            raise ValueError(f"source '{name}' sets both shards and json_path")
        if rs.get("shards") is not None:
            shards = expand_shards(rs["shards"])
            spec = SourceSpec(kind="webdataset", shards=shards,
                              caption_key=pick("caption_key", cfg.caption_key), **common)
            if spec.task == "und":
                raise ValueError(f"source '{name}': understanding data must be JSON conversations")
            if use_cache is not False and target_signature is not None:
                found = resolve_cache(shards, target_signature, pick("cache_dir", cfg.cache_dir),
                                      source=name)
                if found is not None:
                    spec.source_shards = shards
                    spec.shards, spec.cached, spec.x0_shape = found["shards"], True, found["shape"]
                    logger.info("source '%s': using target cache %s", name, ", ".join(found["dirs"]))
                elif use_cache is True:
                    raise ValueError(f"source '{name}': use_cache=true but no complete target cache was found for "
                                     f"its shards; run scripts/cache_targets.py first")
        elif rs.get("json_path") is not None:
            cache_dir = os.environ.get("HF_DATASETS_CACHE")
            loader = pick("json_loader", cfg.json_loader)
            records, bad = load_json_records(str(rs["json_path"]), loader, cache_dir=cache_dir)
            if bad:
                logger.warning("source '%s': %d unparseable JSON records skipped at load time", name, bad)
            spec = SourceSpec(kind="json", records=records, caption_key=rs.get("caption_key"), load_skips=bad,
                              **common)
            if len(records) == 0:
                raise ValueError(f"source '{name}': {rs['json_path']} holds no records")
            if spec.task == "auto":  # a file of only conversations (or only pairs) is that kind throughout
                kinds = {record_kind(records[i], "auto") for i in range(min(len(records), 100))
                         if isinstance(records[i], dict)}
                if len(kinds) == 1:
                    spec.task = kinds.pop()
        else:
            raise ValueError(f"source '{name}' needs shards or json_path")
        out.append(spec)
    cached = [s.name for s in out if s.cached]
    uncached = [s.name for s in out if not s.cached and (s.kind == "webdataset" or s.task != "und")]
    if cached and uncached:
        # A batch is all pixels or all cached latents, so a half-cached mixture cannot be used as it is.
        if use_cache is True:
            raise ValueError(f"use_cache=true but sources {uncached} have no target cache (JSON text-to-image "
                             "sources cannot be cached); cache them or set use_cache=auto|false")
        logger.warning("data: sources %s have a target cache but %s do not; decoding images for all of them",
                       cached, uncached)
        for s in out:
            if s.cached:
                s.shards, s.cached, s.x0_shape = s.source_shards, False, None
    return out


class ResumableLoader:
    """Iterable of batches with ``state_dict()``/``load_state_dict()`` and skip statistics.

    Iterating again (a new ``iter()``) continues from the last batch handed out, so breaking out of a loop and
    re-entering it does not replay or lose data.
    """

    def __init__(self, dataset: StreamingDataset, num_workers: int = 0, prefetch_factor: int = 2,
                 pin_memory: bool = False, log_every: int = 0, fingerprint: str = "", base_skips=None):
        self.dataset = dataset
        self.num_workers = max(0, int(num_workers))
        self.prefetch_factor, self.pin_memory, self.log_every = prefetch_factor, pin_memory, log_every
        self.fingerprint = fingerprint
        self.base_skips = dict(base_skips or {})  # counted while building (e.g. unparseable JSON lines)
        self.config_seed = dataset.seed  # what a saved state is checked against; dataset.seed may be re-seeded
        self._carried: Dict[str, int] = {}  # skip counts carried over an inexact (strict=False) resume
        self._workers: Dict[str, dict] = {}
        self._next_worker = 0
        self._batches = 0
        self._logged_skips = 0

    # -- iteration -------------------------------------------------------------------------------------
    def __iter__(self):
        self.dataset.resume = {"offset": self._next_worker, "workers": dict(self._workers)}
        if self.num_workers == 0:
            source = iter(self.dataset)
        else:
            # A DataLoader iterator draws its workers' base seed from `generator`, by default torch's global
            # generator. That draw would land at the first batch of every run: step 1 of an unbroken run, the
            # first resumed step of a resumed one, shifting the training RNG (noise, timesteps, CFG drops) by
            # one draw after every resume. A private generator keeps the global stream untouched; the workers
            # reseed per batch (pipeline._batch_rng), so their base seed does not reach the data either.
            gen = torch.Generator().manual_seed(derive_seed(self.config_seed, self.dataset.rank, "workers") % 2 ** 63)
            source = iter(DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                     prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                                     persistent_workers=False, generator=gen))
        try:
            for batch in source:
                st = batch.pop("_state")
                worker = int(st["worker"])
                self._workers[str(worker)] = st["snapshot"]
                self._next_worker = (worker + 1) % self.dataset.readers_per_rank
                self._batches += 1
                if self.log_every and self._batches % self.log_every == 0:
                    self._progress()
                yield batch
        finally:
            if hasattr(source, "close"):
                source.close()
            del source

    def _progress(self) -> None:
        total = self.skipped_total
        if total != self._logged_skips:
            logger.warning("data (rank %d, batch %d): %s", self.dataset.rank, self._batches, self.format_stats())
            self._logged_skips = total

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        d = self.dataset
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "seed": self.config_seed,
                "effective_seed": d.seed, "rank": d.rank, "world_size": d.world_size, "num_workers": self.num_workers,
                "batch_size": d.batch_size, "batches": self._batches, "next_worker": self._next_worker,
                "workers": dict(self._workers), "carried_skips": dict(self._carried)}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restores the data position. With ``strict=False`` a state from a different topology (world size,
        workers, batch size, data config) is accepted inexactly: skip counts are kept, and the data order is
        re-seeded from the old seed and step so the resumed run does not replay the data from the start."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported data state version {state.get('version')}")
        d = self.dataset
        mine = {"fingerprint": self.fingerprint, "seed": self.config_seed, "rank": d.rank,
                "world_size": d.world_size, "num_workers": self.num_workers, "batch_size": d.batch_size}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if not diff:
            self._workers = {str(k): v for k, v in state["workers"].items()}
            self._next_worker = int(state["next_worker"])
            self._batches = int(state["batches"])
            self._carried = dict(state.get("carried_skips", {}))
            d.seed = int(state.get("effective_seed", self.config_seed))
            return
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        if strict:
            raise ValueError(f"data state does not match this loader ({what}); exact resume needs the same data "
                             "config, seed, rank, world size, workers and batch size (strict=False resumes inexactly)")
        logger.warning("data: inexact resume (%s): data order re-seeded", what)
        counts: Dict[str, int] = dict(state.get("carried_skips", {}))
        for snap in state["workers"].values():
            for k, v in snap["stats"]["counts"].items():
                counts[k] = counts.get(k, 0) + v
        self._carried = counts
        d.seed = derive_seed(state.get("effective_seed", state.get("seed")), state.get("batches"), "reseed") % (2 ** 31)
        self._workers, self._next_worker, self._batches = {}, 0, int(state.get("batches", 0))

    # -- statistics ------------------------------------------------------------------------------------
    def stats(self) -> Dict[str, int]:
        """Skip counts by reason for this rank so far (all workers, across resumes)."""
        counts = dict(self.base_skips)
        for k, v in self._carried.items():
            counts[k] = counts.get(k, 0) + v
        for snap in self._workers.values():
            for k, v in snap["stats"]["counts"].items():
                counts[k] = counts.get(k, 0) + v
        return counts

    @property
    def skipped_total(self) -> int:
        return sum(self.stats().values())

    @property
    def samples_delivered(self) -> int:
        return sum(snap["stats"]["samples"] for snap in self._workers.values())

    @property
    def batches(self) -> int:
        return self._batches

    def format_stats(self) -> str:
        return format_counts(self.stats(), self.samples_delivered)

    def summary(self) -> str:
        """End-of-run line: ``data: 1000 batches, skipped 3 (bad_image=3), 16000 samples delivered``."""
        return f"data: {self._batches} batches, {self.format_stats()}"


def _fingerprint(sources: Sequence[SourceSpec], shuffle_buffer: int, interleave: int) -> str:
    parts = [(s.name, s.kind, round(s.weight, 9), s.resampled, s.cached, len(s.shards),
              s.shards[0] if s.shards else "", s.shards[-1] if s.shards else "",
              len(s.records) if s.records is not None else 0) for s in sources]
    return f"{derive_seed(tuple(parts), shuffle_buffer, interleave):016x}"


def build_train_dataloader(
    data_cfg: Union[DataConfig, Mapping, None],
    tokenizer,
    image_transform: Optional[Callable] = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    num_workers: Optional[int] = None,
    template="chatml",
    num_queries: int = 64,
    max_length: int = 512,
    target_signature: Optional[dict] = None,
    und_image_transform: Optional[Callable] = None,
) -> ResumableLoader:
    """The training loader for one rank. ``data_cfg`` is a :class:`blip3o.config.DataConfig` (or a dict of its
    fields); see ``blip3o/data/collate.py`` for the batch dict. ``image_transform`` is the target's transform
    (``target.transform``; None: the EVA-CLIP preset); ``num_workers`` None takes ``data_cfg.num_workers``;
    ``target_signature`` (``target.signature()``) enables and checks the cache."""
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to build generation prompts")
    template = get_template(template) if isinstance(template, str) else template
    if not isinstance(template, ChatTemplate):
        raise TypeError("template must be a ChatTemplate or its name")
    cfg = as_data_config(data_cfg)
    if num_workers is None:
        num_workers = int(cfg.num_workers)
    sources = parse_sources(cfg, target_signature)
    if image_transform is None:
        image_transform = build_image_transform("eva_clip")
    decoder = SampleDecoder(sources, image_transform, tokenizer=tokenizer, template=template,
                            und_image=SquareImage(int(cfg.und_image_size)),
                            und_image_tokens=int(cfg.und_image_tokens), max_length=max_length)
    collate = BatchCollator(tokenizer, template, num_queries=num_queries, max_length=max_length,
                            und_image_transform=und_image_transform, und_image_tokens=int(cfg.und_image_tokens))
    shuffle_buffer, interleave = int(cfg.shuffle_buffer), int(cfg.interleave)
    dataset = StreamingDataset(sources, decoder, collate, batch_size=batch_size, seed=seed, rank=rank,
                               world_size=world_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                               interleave=interleave, max_consecutive_bad=int(cfg.max_consecutive_bad))
    load_skips = sum(s.load_skips for s in sources)
    return ResumableLoader(dataset, num_workers=num_workers, prefetch_factor=int(cfg.prefetch_factor),
                           pin_memory=bool(cfg.pin_memory), log_every=int(cfg.log_every),
                           fingerprint=_fingerprint(sources, shuffle_buffer, interleave),
                           base_skips={"bad_json_line": load_skips} if load_skips else None)
