"""Image bytes or files -> RGB PIL images, or a counted skip: what the training pipeline and the target
cache writer (``pipeline.py``, ``cache.py``) both read images with."""
from __future__ import annotations

import io
import warnings
from typing import Optional

from PIL import Image

from blip3o.data import stats as S
from blip3o.data.shards import IMAGE_EXTS


def decode_image(raw: dict, stats: S.SkipStats) -> Optional[Image.Image]:
    """Decodes the first image field of a webdataset sample (jpg/jpeg/png/webp) to RGB, or counts why not."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        stats.add(S.MISSING_IMAGE, f"{raw['__key__']} in {raw.get('__url__')}: no {'/'.join(IMAGE_EXTS)} field")
        return None
    return open_image(io.BytesIO(raw[ext]), f"{raw['__key__']}.{ext} in {raw.get('__url__')}", stats)


def open_image(fp, where: str, stats: S.SkipStats) -> Optional[Image.Image]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            img.load()  # decode now: a truncated JPEG fails here, not later inside the transform
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad input; all mean "skip it"
        stats.add(S.BAD_IMAGE, f"{where}: {type(e).__name__}: {e}")
        return None
