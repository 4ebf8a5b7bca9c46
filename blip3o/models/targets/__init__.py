"""Frozen target encoders: images -> the x0 that the generator learns to produce (see ``base.py``).

One module per stage of a target's life: ``base`` (the ``TargetEncoder`` interface, the ``TARGETS`` registry,
save/load), ``presets`` (official and tiny configs, overrides, the build/load factories), and one module per
registered target: ``eva_clip`` (with the EVA-CLIP key mapping), ``siglip``, ``vae``, ``toy_clip``. Adding a
target is one module that registers its class, plus its presets.
"""
from blip3o.models.targets.base import TARGETS, TargetEncoder
from blip3o.models.targets.eva_clip import EvaClipTarget, map_eva_clip_state_dict, pool_tokens, to_eva_clip_state_dict
from blip3o.models.targets.presets import (
    HALF, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TARGET_PRESETS, UPSTREAM_WEIGHTS, build_target_encoder,
    load_target_encoder, make_tiny_target, merge_overrides, preset_config,
)
from blip3o.models.targets.siglip import SiglipTarget
from blip3o.models.targets.toy_clip import ToyClipModel, ToyClipTarget, zero_shot_accuracy
from blip3o.models.targets.vae import VaeTarget

__all__ = [
    "TargetEncoder",
    "EvaClipTarget",
    "SiglipTarget",
    "VaeTarget",
    "ToyClipTarget",
    "ToyClipModel",
    "TARGETS",
    "TARGET_PRESETS",
    "UPSTREAM_WEIGHTS",
    "HALF",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "build_target_encoder",
    "load_target_encoder",
    "make_tiny_target",
    "merge_overrides",
    "preset_config",
    "map_eva_clip_state_dict",
    "to_eva_clip_state_dict",
    "pool_tokens",
    "zero_shot_accuracy",
]
