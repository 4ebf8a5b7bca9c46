"""JSON / JSONL datasets: text-to-image pairs, BLIP3o-60k-style prompt/image pairs, LLaVA conversations.

Accepted record shapes (image paths are relative to the source's ``image_root``, or absolute)::

    {"image": "imgs/0001.jpg", "caption": "a red circle"}                     # text-to-image
    {"image": "0001.png", "prompt": "a photo of a cat"}                        # BLIP3o-60k style
    {"image": "coco/1.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                              {"from": "gpt", "value": "A cat."}]}   # understanding
    {"conversations": [...]}                                                   # text-only understanding

Files: ``.jsonl`` (one object per line), ``.json`` (a list, or ``{"data": [...]}``), or anything
``datasets.load_dataset("json")`` reads. Small files are parsed with the standard library; large ones
(> ``DATASETS_THRESHOLD`` bytes) or ``loader="datasets"`` go through ``datasets``, whose Arrow table is
memory-mapped and so shared by DataLoader workers instead of being copied into each of them (a Python list
of millions of dicts is touched by refcounting and ends up duplicated per worker).
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

DATASETS_THRESHOLD = 256 * 1024 * 1024
CAPTION_KEYS = ("caption", "prompt", "txt", "text")
IMAGE_KEYS = ("image", "image_path", "img", "file_name")


def load_json_records(path: str, loader: str = "auto", cache_dir: Optional[str] = None):
    """Returns an indexable sequence of dict records and the number of unparseable lines skipped."""
    if not os.path.exists(path):
        raise ValueError(f"JSON data path {path} does not exist")
    if loader not in ("auto", "json", "datasets"):
        raise ValueError(f"json loader must be auto, json or datasets, got {loader!r}")
    plain = path.endswith((".json", ".jsonl")) and os.path.isfile(path)
    if loader == "datasets" or (loader == "auto" and (not plain or os.path.getsize(path) > DATASETS_THRESHOLD)):
        import datasets  # heavy import (pyarrow, pandas): only when asked for

        files = path
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".json", ".jsonl")))
            if not files:
                raise ValueError(f"JSON data folder {path} contains no .json/.jsonl files")
        ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache_dir)
        return ds, 0
    bad = 0
    if path.endswith(".jsonl"):
        records: List[dict] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    bad += 1
                    if bad == 1:
                        logger.warning("data: skipped unparseable line %d of %s (%s); further ones are counted",
                                       lineno, path, e)
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
                else:
                    bad += 1
        return records, bad
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise ValueError(f"{path} must hold a list of records (or {{'data': [...]}})")
    records = [r for r in obj if isinstance(r, dict)]
    return records, len(obj) - len(records)


def record_image_path(rec: dict, image_root: Optional[str]) -> Optional[str]:
    for k in IMAGE_KEYS:
        v = rec.get(k)
        if isinstance(v, (list, tuple)):
            if len(v) != 1:
                raise ValueError(f"'{k}' lists {len(v)} images; one image per record is supported")
            v = v[0]
        if isinstance(v, str) and v:
            return v if os.path.isabs(v) or not image_root else os.path.join(image_root, v)
    return None


def record_caption(rec: dict, caption_key: Optional[str]) -> Tuple[bool, Optional[str]]:
    """(found a caption field, its value). ``caption_key`` first, then the usual names."""
    keys: Sequence[str] = ((caption_key,) if caption_key else ()) + CAPTION_KEYS
    for k in keys:
        if k in rec:
            v = rec[k]
            return True, v if isinstance(v, str) else None
    return False, None


def record_kind(rec: dict, task: str) -> str:
    if task in ("gen", "und", "edit"):
        return task
    if rec.get("conversations") is not None:
        return "und"
    # Editing triples: {"source": input image, "instruction": text, "target": edited image}.
    if rec.get("source") is not None and rec.get("target") is not None and rec.get("instruction") is not None:
        return "edit"
    return "gen"
