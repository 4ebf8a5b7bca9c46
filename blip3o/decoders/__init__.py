"""CLIP-feature -> pixel decoders (docs/decisions.md, "Decoders") as diffusers pipelines.

    sdxl: EVA-CLIP tokens (B, 64, 1792) -> SDXL UNet + AutoencoderKL + Euler   (BLIP3o-4B/8B `diffusion-decoder/`)
    sana: SigLIP2 tokens (B, 64, 1152) -> connector + SANA + AutoencoderDC + DPM-Solver++  (BLIP3o/SigLIP2_SANA)

    pipe = build_decoder("sdxl", preset="tiny", feature_dim=64)       # random tiny decoder (CPU)
    images = pipe(features, generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    pipe.save_pretrained(path); pipe = load_decoder(path)             # kind detected from the folder
    load_decoder("/ckpt/BLIP3o-Model-8B/diffusion-decoder")           # official layout, bf16 variant files
    loss, parts = decoder_training_loss(pipe, images, features)       # reconstruction objective

Nothing here downloads unless `allow_download=True` is passed with a hub id.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

from blip3o.decoders.components import NullCondition, PixelUnshuffleAutoencoder
from blip3o.decoders.io import DecoderLoadError, detect_decoder_kind
from blip3o.decoders.pipeline import FeatureDecoderPipeline
# Importing a decoder's module registers its spec.
from blip3o.decoders.sana import SanaFeatureConnector, SanaFeatureDecoderPipeline, build_sana_decoder
from blip3o.decoders.sdxl import SDXLFeatureDecoderPipeline, build_sdxl_decoder, save_official_layout
from blip3o.decoders.spec import DECODERS, DecoderSpec
from blip3o.decoders.training import (
    decoder_training_loss,
    train_decoder_steps,
    train_vae_steps,
    trainable_parameters,
)


def build_decoder(
    name: str, preset: str = "tiny", pretrained: Optional[bool] = None, allow_download: bool = False, **overrides: Any
) -> FeatureDecoderPipeline:
    """Build a decoder by registry name.

    preset "tiny": random CPU-sized decoder for 64 px toy images (overrides: feature_dim (required),
        num_tokens, image_size, seed, vae, prediction, num_inference_steps, *_config dicts; the spec's
        `build_kwargs` lists them, and any other name is a one-line ValueError).
    preset "official": by default loads the released weights from the spec's hub id (only possible with
        allow_download=True or a populated HF cache; otherwise a one-line DecoderLoadError); with
        pretrained=False builds the full-size architecture with random weights (device="meta" to skip memory).
    """
    spec = DECODERS.get(name)
    loading = preset == "official" and pretrained is not False
    spec.check_build_kwargs(overrides, loading=loading)
    if loading:
        return load_decoder(spec.official_repo, subfolder=spec.official_subfolder, allow_download=allow_download,
                            **overrides)
    if pretrained:
        raise ValueError("pretrained weights exist only for preset='official'")
    return spec.build(preset=preset, **overrides)


def load_decoder(
    path: Union[str, os.PathLike],
    subfolder: Optional[str] = None,
    torch_dtype: Optional[torch.dtype] = None,
    variant: Optional[str] = "auto",
    allow_download: bool = False,
) -> FeatureDecoderPipeline:
    """Load a decoder folder, detecting the kind from model_index.json or the denoiser's subfolder (unet/,
    transformer/).

    Accepts our `save_pretrained` folders and the official `diffusion-decoder/` layout (unet/vae/scheduler,
    optional feature_extractor, `*.bf16.safetensors`; its custom pipeline code is ignored). variant="auto"
    uses plain weights when present, else the bf16/fp16 variant files. Weights load as float32 unless
    torch_dtype is given.
    """
    return FeatureDecoderPipeline.from_pretrained(
        path, subfolder=subfolder, torch_dtype=torch_dtype, variant=variant, allow_download=allow_download
    )


def make_tiny_decoder(
    name: str,
    path: Union[str, os.PathLike],
    feature_dim: int,
    num_tokens: int = 64,
    image_size: int = 64,
    seed: int = 0,
    null_features: Optional[torch.Tensor] = None,
    layout: str = "diffusers",
    **overrides: Any,
) -> str:
    """Build a random tiny decoder, save it to `path` and return the path.

    null_features: the unconditional input to store, e.g. target-encoder features of a black image (sana) or
        of an empty input (sdxl); zeros when omitted.
    layout "official" (decoders whose spec has `save_official`: sdxl) writes the `diffusion-decoder/` layout
        instead: bf16 variant weights, Emu2 model_index.json, no null condition.
    """
    pipe = build_decoder(name, preset="tiny", feature_dim=feature_dim, num_tokens=num_tokens,
                         image_size=image_size, seed=seed, **overrides)
    if null_features is not None:
        pipe.set_null_features(null_features, source="custom")
    path = os.fspath(path)
    if layout == "official":
        save_official = DECODERS.get(name).save_official
        if save_official is None:
            have = [n for n in DECODERS.names() if DECODERS.get(n).save_official is not None]
            raise ValueError(f"the official folder layout exists only for the {', '.join(have)} decoder(s), not {name}")
        save_official(pipe, path)
    elif layout == "diffusers":
        pipe.save_pretrained(path)
    else:
        raise ValueError(f"layout must be 'diffusers' or 'official', got '{layout}'")
    return path


__all__ = [
    "DECODERS",
    "DecoderLoadError",
    "DecoderSpec",
    "FeatureDecoderPipeline",
    "NullCondition",
    "PixelUnshuffleAutoencoder",
    "SanaFeatureConnector",
    "SanaFeatureDecoderPipeline",
    "SDXLFeatureDecoderPipeline",
    "build_decoder",
    "build_sana_decoder",
    "build_sdxl_decoder",
    "decoder_training_loss",
    "detect_decoder_kind",
    "load_decoder",
    "make_tiny_decoder",
    "save_official_layout",
    "train_decoder_steps",
    "train_vae_steps",
    "trainable_parameters",
]
