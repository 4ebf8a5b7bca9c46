"""Target presets (``TARGET_PRESETS[name][preset]``: an ``official`` and a ``tiny`` config per target) and how a
preset plus overrides becomes a config, and a config an encoder (``build_target_encoder``, ``load_target_encoder``,
``make_tiny_target``).

Nothing here downloads: ``pretrained`` must be a local path unless ``allow_download=True``. Without ``pretrained``
the encoder is randomly initialised (tiny presets for tests, or structure checks on the ``meta`` device).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional, Union

import torch

from blip3o.data.transforms import CLIP_MEAN as OPENAI_CLIP_MEAN
from blip3o.data.transforms import CLIP_STD as OPENAI_CLIP_STD
from blip3o.data.transforms import HALF
from blip3o.models.targets.base import TARGETS, TargetEncoder, is_saved_target
from blip3o.models.targets.toy_clip import TOY_CLIP_PRESETS

# SDXL VAE (stabilityai/sdxl-vae): f8, 4 latent channels, scaling 0.13025, no shift.
_SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
# DC-AE f32c32 as used by SANA (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers); best-effort transcription,
# a local diffusers directory passed as ``pretrained`` replaces it with the checkpoint's own config.
_DC_AE_F32C32 = dict(
    in_channels=3,
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3],
    decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)

TARGET_PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "eva_clip": {
        # EVA-CLIP-E-14-plus at 448 px (docs/decisions.md, "Targets"). bf16 as in BLIP3-o training.
        "official": dict(
            image_size=448, patch_size=14, width=1792, depth=64, num_heads=16, mlp_dim=15360,
            qkv_bias=True, post_norm=True, ln_eps=1e-6, pool=4,
            mean=list(OPENAI_CLIP_MEAN), std=list(OPENAI_CLIP_STD), interpolation="bicubic", dtype="bfloat16",
        ),
        # 64 px / patch 4 -> 16x16 tokens -> pool 2 -> 8x8.
        "tiny": dict(
            image_size=64, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
            qkv_bias=True, post_norm=True, ln_eps=1e-6, pool=2,
            mean=list(OPENAI_CLIP_MEAN), std=list(OPENAI_CLIP_STD), interpolation="bicubic", dtype="float32",
        ),
    },
    "siglip": {
        # google/siglip2-so400m-patch16-512 (model_type "siglip"): 512/16 -> 32x32 tokens -> pool to 8x8.
        "official": dict(
            arch="siglip",
            vision_config=dict(
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                num_channels=3, image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh",
                layer_norm_eps=1e-6,
            ),
            select_layer=-2, grid=[8, 8], mean=list(HALF), std=list(HALF), interpolation="bicubic",
            dtype="bfloat16"
        ),
        # 64 px / patch 8 -> 8x8 tokens; 2 layers, so the penultimate hidden state is layer 1's output.
        "tiny": dict(
            arch="siglip",
            vision_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_channels=3, image_size=64, patch_size=8, hidden_act="gelu_pytorch_tanh",
                layer_norm_eps=1e-6,
            ),
            select_layer=-2, grid=[8, 8], mean=list(HALF), std=list(HALF), interpolation="bicubic",
            dtype="float32",
        ),
    },
    "vae": {
        # SDXL-VAE at 512 px -> (4, 64, 64).
        "official": dict(
            kind="kl", vae_config=_SDXL_VAE, image_size=512, scaling_factor=0.13025, shift_factor=0.0,
            mean=list(HALF), std=list(HALF), interpolation="bicubic", dtype="float32",
        ),
        # DC-AE f32c32 at 512 px -> (32, 16, 16) (the SANA setting: docs/decisions.md, "Targets").
        "official_dc": dict(
            kind="dc", vae_config=_DC_AE_F32C32, image_size=512, scaling_factor=0.41407, shift_factor=0.0,
            mean=list(HALF), std=list(HALF), interpolation="bicubic", dtype="float32",
        ),
        # 4 stages = f8, so a 64 px toy image gives an 8x8 latent grid like the CLIP targets.
        "tiny": dict(
            kind="kl",
            vae_config=dict(
                in_channels=3, out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[8, 16, 16, 16], layers_per_block=1, act_fn="silu", latent_channels=4,
                norm_num_groups=8, sample_size=64, scaling_factor=1.0, mid_block_add_attention=False,
            ),
            image_size=64, scaling_factor=1.0, shift_factor=0.0,
            mean=list(HALF), std=list(HALF), interpolation="bicubic", dtype="float32",
        ),
        # 4 stages = f8 -> 8x8 latent grid, 8 latent channels; last stage uses EfficientViT attention.
        "tiny_dc": dict(
            kind="dc",
            vae_config=dict(
                in_channels=3, latent_channels=8, attention_head_dim=8,
                encoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
                decoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
                encoder_block_out_channels=[8, 16, 16, 16], decoder_block_out_channels=[8, 16, 16, 16],
                encoder_layers_per_block=[1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1],
                encoder_qkv_multiscales=[[], [], [], []], decoder_qkv_multiscales=[[], [], [], []],
                upsample_block_type="interpolate", downsample_block_type="Conv",
                decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=1.0,
            ),
            image_size=64, scaling_factor=1.0, shift_factor=0.0,
            mean=list(HALF), std=list(HALF), interpolation="bicubic", dtype="float32",
        ),
    },
    # The toy world's CLIP: its config (vocabulary from the toy grammar) lives beside its model.
    "toy_clip": TOY_CLIP_PRESETS,
}

# The upstream checkpoints the official presets mirror: fetch them yourself and pass the local path as
# ``pretrained`` (or pass the id with ``allow_download=True``). Not part of the config: where weights come
# from is tracked by the signature's weights fingerprint, not by a name.
UPSTREAM_WEIGHTS = {
    ("eva_clip", "official"): "jiuhai/eva_clip_vision_tower",  # BLIP3-o's 448 px EVA-CLIP-E-14-plus tower
    ("siglip", "official"): "google/siglip2-so400m-patch16-512",
    ("vae", "official"): "stabilityai/sdxl-vae",
    ("vae", "official_dc"): "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers",
}


def merge_overrides(name: str, base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Preset + overrides. Top-level keys replace; a key of the nested library config (the target class's
    ``nested_key``: ``vision_config`` / ``vae_config``) is routed there, so ``build_target_encoder("siglip",
    image_size=384)`` works; a dict given for the nested config itself updates it key by key. Unknown keys
    raise, typos included."""
    cls = TARGETS.get(name)
    cfg = copy.deepcopy(base)
    nested = cls.nested_key
    for k in ("arch", "kind"):  # decide the library class before checking nested field names
        if k in overrides and k in cfg:
            cfg[k] = overrides[k]
    fields = cls.nested_fields(cfg) if nested else set()
    for k, v in overrides.items():
        if k in cfg:
            if k == nested and isinstance(v, dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
        elif nested and k in fields:
            cfg[nested][k] = v
        else:
            raise KeyError(f"unknown config key {k!r} for target {name!r}; top-level keys: {sorted(cfg)}")
    return cfg


def preset_config(name: str, preset: str = "official", **overrides: Any) -> Dict[str, Any]:
    """The config ``TARGET_PRESETS[name][preset]`` updated with ``overrides`` (the class may redirect the
    preset name, e.g. ``vae`` with ``kind="dc"`` picks ``official_dc``/``tiny_dc``)."""
    cls = TARGETS.get(name)
    presets = TARGET_PRESETS[name]
    preset = cls.preset_name(preset, overrides, presets)
    if preset not in presets:
        raise KeyError(f"unknown preset {preset!r} for target {name!r}; choose one of {sorted(presets)}")
    return merge_overrides(name, presets[preset], overrides)


def build_target_encoder(
    name: str,
    pretrained: Optional[str] = None,
    preset: str = "official",
    *,
    device: Union[str, torch.device, None] = None,
    allow_download: bool = False,
    **overrides: Any,
) -> TargetEncoder:
    """Builds a target encoder from ``TARGET_PRESETS[name][preset]`` updated with ``overrides``.

    ``pretrained``: a local path with upstream weights (EVA-CLIP-layout state dict; transformers SigLIP dir;
    diffusers VAE dir) or a directory written by ``save_pretrained``. A hub id is refused unless
    ``allow_download=True``. ``device="meta"`` builds the structure without allocating weights.
    For ``vae``, ``kind="dc"`` with preset ``official``/``tiny`` selects the ``official_dc``/``tiny_dc`` preset.
    """
    if pretrained is not None and os.path.isdir(os.path.expanduser(pretrained)) and is_saved_target(pretrained):
        if overrides:
            raise ValueError("overrides cannot be applied to a saved target encoder; rebuild from a preset")
        enc = TargetEncoder.from_pretrained(pretrained, device=device)
        if enc.name != name:
            raise ValueError(f"{pretrained} holds a {enc.name!r} target, not {name!r}")
        return enc
    cls = TARGETS.get(name)
    cfg = preset_config(name, preset, **overrides)
    if pretrained is None:
        return cls(cfg, device=device)
    # a meta skeleton: no random init of weights that the checkpoint replaces anyway
    enc = cls(cfg, device="meta")
    enc.load_external(pretrained, allow_download=allow_download)
    if device is not None and str(device) != "meta":
        enc.to(device)
    return enc


def load_target_encoder(path_or_spec: Union[str, Dict[str, Any]], device=None) -> TargetEncoder:
    """A directory written by ``save_pretrained``; or a spec: ``"name"``, ``"name:preset"``, or a dict of
    ``build_target_encoder`` keyword arguments (``{"name": ..., "preset": ..., "pretrained": ..., **overrides}``)."""
    if isinstance(path_or_spec, dict):
        spec = dict(path_or_spec)
        if device is not None:
            spec.setdefault("device", device)
        return build_target_encoder(spec.pop("name"), **spec)
    s = str(path_or_spec)
    if os.path.isdir(os.path.expanduser(s)):
        return TargetEncoder.from_pretrained(os.path.expanduser(s), device=device)
    name, _, preset = s.partition(":")
    if name in TARGETS:
        return build_target_encoder(name, preset=preset or "official", device=device)
    raise ValueError(
        f"{s!r} is neither a saved target-encoder directory nor a target spec ('name' or 'name:preset', "
        f"names: {TARGETS.names()})"
    )


def make_tiny_target(name: str, path: str, seed: int = 0, preset: str = "tiny", **overrides: Any) -> str:
    """Builds a randomly initialised tiny target (seeded), saves it to ``path`` and returns ``path``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = build_target_encoder(name, preset=preset, **overrides)
    enc.save_pretrained(path)
    return path
