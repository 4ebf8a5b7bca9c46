"""Load any saved generator directory: the one place that tells the layouts apart.

    model = load_generation_model("outputs/toy/model")   # ours, an official BLIP3-o release, or transfusion/lmfusion

``checkpoint_kind`` reads ``model_type`` from config.json: ``blip3o`` (saved by
``Blip3oForConditionalGeneration``), ``official`` (``blip3o_qwen``: the BLIP3o-Model-4B/8B release layout,
converted by ``blip3o.models.official``) or ``fusion`` (``blip3o_fusion``: transfusion / lmfusion).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from blip3o.models.blip3o import Blip3oConfig, Blip3oForConditionalGeneration
from blip3o.models.fusion import Blip3oFusionForConditionalGeneration, FusionConfig
from blip3o.models.official import OFFICIAL_MODEL_TYPES, load_official


def checkpoint_kind(path: Union[str, os.PathLike]) -> str:
    """``blip3o`` | ``official`` | ``fusion`` for a saved model directory (ValueError for anything else)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model directory")
    try:
        mtype = json.loads(f.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e})") from None
    if mtype == FusionConfig.model_type:
        return "fusion"
    if mtype in OFFICIAL_MODEL_TYPES:
        return "official"
    if mtype == Blip3oConfig.model_type:
        return "blip3o"
    raise ValueError(f"{path}: model_type '{mtype}' is none of {Blip3oConfig.model_type}, "
                     f"{FusionConfig.model_type}, {', '.join(OFFICIAL_MODEL_TYPES)}: not a generator directory")


def load_generation_model(path: Union[str, os.PathLike]):
    """Loads any saved generator directory: a fusion model, or BLIP3-o (ours or the official layout)."""
    kind = checkpoint_kind(path)
    if kind == "fusion":
        return Blip3oFusionForConditionalGeneration.from_pretrained(str(path))
    if kind == "official":
        return load_official(str(path))
    return Blip3oForConditionalGeneration.from_pretrained(str(path))
