"""Target-feature cache: the frozen target encoder run once, its ``x0`` stored beside the shards.

Layout written by ``scripts/cache_targets.py`` for shards ``/data/pretrain/000123.tar``::

    /data/pretrain/x0_cache/<target name>/signature.json     target.signature() + dtype + shape
    /data/pretrain/x0_cache/<target name>/000123.tar         same keys, same order (bad images left out);
                                                             each sample: KEY.x0.npy + every non-image field
                                                             of the original (txt, json, ...)

``KEY.x0.npy`` is a ``numpy.save`` array of shape (C, h, w), float16 by default (half the disk of float32;
training runs in bf16 anyway) or float32. A cached shard replaces its original entirely, so training reads
captions and features from one stream and never touches the images.

When ``use_cache`` is on, the pipeline looks for a cache whose ``signature.json`` equals the configured
target's signature; a cache that exists but belongs to another target (other model, preset, resolution,
pooling) is an error, not a silent fallback.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from blip3o.data.image_io import decode_image
from blip3o.data.shards import IMAGE_EXTS, iter_tar_samples, shard_cache_path
from blip3o.data.stats import SkipStats

logger = logging.getLogger(__name__)

SIGNATURE_FILE = "signature.json"
X0_FIELD = "x0.npy"


def canonical(obj) -> object:
    """JSON round trip, so tuples/lists and int/float keys compare the way they are stored."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def read_signature(cache_dir: str) -> Optional[dict]:
    path = os.path.join(cache_dir, SIGNATURE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_signature(cache_dir: str, target_signature: dict, dtype: str, shape: Sequence[int]) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    payload = {"target": canonical(target_signature), "dtype": dtype, "shape": [int(s) for s in shape],
               "format": "KEY.x0.npy per sample, numpy.save, (C, h, w)"}
    tmp = os.path.join(cache_dir, f"{SIGNATURE_FILE}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(cache_dir, SIGNATURE_FILE))


def _diff(a: dict, b: dict) -> str:
    keys = sorted(set(a) | set(b))
    parts = [f"{k}: cache={a.get(k)!r} vs configured={b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    return "; ".join(parts[:4]) + (" ..." if len(parts) > 4 else "")


class CacheMismatchError(ValueError):
    pass


def resolve_cache(shards: Sequence[str], target_signature: Optional[dict], cache_dir: Optional[str] = None,
                  source: str = "") -> Optional[Dict[str, object]]:
    """Finds the cache for ``shards`` that matches ``target_signature``.

    Returns ``{"shards": [cache paths], "shape": [C, h, w], "dirs": [...]}`` when every shard has a cached
    counterpart, None when no cache exists (or one is incomplete, with a warning), and raises
    :class:`CacheMismatchError` when a cache exists for a *different* target signature.
    """
    want = canonical(target_signature) if target_signature is not None else None
    out: List[str] = []
    shape = None
    used_dirs: List[str] = []
    by_dir: Dict[str, str] = {}  # shard folder -> chosen cache folder
    for shard in shards:
        folder = os.path.dirname(shard)
        if folder not in by_dir:
            candidates = [cache_dir] if cache_dir else sorted(
                os.path.dirname(p) for p in glob.glob(os.path.join(folder, "x0_cache", "*", SIGNATURE_FILE)))
            chosen, mismatched = None, []
            for cand in candidates:
                sig = read_signature(cand)
                if sig is None:
                    continue
                if want is not None and canonical(sig.get("target")) == want:
                    chosen = cand
                    shape = sig.get("shape")
                    break
                mismatched.append((cand, sig))
            if chosen is None:
                if mismatched:
                    cand, sig = mismatched[0]
                    raise CacheMismatchError(
                        f"source '{source}': target cache {cand} was made for a different target "
                        f"({_diff(sig.get('target') or {}, want or {})}); re-run scripts/cache_targets.py "
                        "for this target or set use_cache=false")
                return None
            by_dir[folder] = chosen
            used_dirs.append(chosen)
        path = os.path.join(by_dir[folder], os.path.basename(shard))
        if not os.path.isfile(path):
            logger.warning("source '%s': target cache %s is incomplete (no %s)", source, by_dir[folder], path)
            return None
        out.append(path)
    return {"shards": out, "shape": shape, "dirs": used_dirs}


def encode_x0(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def decode_x0(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def cache_shards(shards: Sequence[str], target, out_dir: Optional[str] = None, batch_size: int = 32,
                 dtype: str = "float16", device: str = "cpu", overwrite: bool = False, rank: int = 0,
                 world_size: int = 1) -> Dict[str, int]:
    """Runs ``target.encode(target.transform(image))`` over ``shards`` and writes the cached shards.

    Shards are split across ``world_size`` processes by index (shard i goes to rank i % world_size); each
    finished shard is written to a temporary name and renamed, so an interrupted run leaves no half shard
    and re-running skips the finished ones. Returns counts (shards written/skipped, samples, skips by reason).
    """
    import webdataset as wds  # only when writing a cache: importing blip3o.data stays free of webdataset

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    name = getattr(target, "name", None) or "target"
    signature = target.signature()
    stats = SkipStats("cache")
    result = {"shards_written": 0, "shards_existing": 0, "samples": 0}
    written_dirs = set()
    signed = set()  # cache folders whose signature.json this run has written
    for i, shard in enumerate(shards):
        if i % world_size != rank:
            continue
        dst = shard_cache_path(shard, out_dir, name)
        cdir = os.path.dirname(dst)
        if cdir not in written_dirs:
            existing = read_signature(cdir)
            if existing is not None and canonical(existing.get("target")) != canonical(signature) and not overwrite:
                raise CacheMismatchError(
                    f"{cdir} holds a cache for another target ({_diff(existing['target'], canonical(signature))}); "
                    "pass --overwrite or another --out")
            written_dirs.add(cdir)
        if os.path.exists(dst) and not overwrite:
            result["shards_existing"] += 1
            continue
        os.makedirs(cdir, exist_ok=True)
        tmp = dst + f".tmp{os.getpid()}"
        pending: List[dict] = []

        def flush(writer):
            if not pending:
                return
            pixels = torch.stack([p.pop("__pixels__") for p in pending]).to(device)
            with torch.no_grad():
                x0 = target.encode(pixels).float().cpu().numpy().astype(dtype)
            if cdir not in signed:
                # Written before the first shard lands, so a cache folder with shards always says what made them.
                write_signature(cdir, signature, dtype, x0.shape[1:])
                signed.add(cdir)
            for p, feat in zip(pending, x0):
                p[X0_FIELD] = encode_x0(feat)
                writer.write(p)
            result["samples"] += len(pending)
            pending.clear()

        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)
            for raw in iter_tar_samples(shard, on_event=stats.add):
                img = decode_image(raw, stats)
                if img is None:
                    continue
                try:
                    pixels = target.transform(img)
                except Exception as e:  # noqa: BLE001 - any transform failure is a per-sample skip
                    stats.add("bad_transform", f"{raw['__key__']} in {shard}: {e}")
                    continue
                keep = {k: v for k, v in raw.items() if not k.startswith("__") and k not in IMAGE_EXTS}
                keep.update({"__key__": raw["__key__"], "__pixels__": pixels})
                pending.append(keep)
                if len(pending) >= batch_size:
                    flush(writer)
            flush(writer)
            writer.close()
        os.replace(tmp, dst)
        result["shards_written"] += 1
        logger.info("cached %s -> %s", shard, dst)
    result.update({f"skipped_{k}": v for k, v in stats.counts.items()})
    return result
