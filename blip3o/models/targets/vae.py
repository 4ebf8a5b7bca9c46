"""VAE-latent target ("VAE + flow matching"): x0 = (latent - shift_factor) * scaling_factor.

diffusers ``AutoencoderKL`` (``kind="kl"``, SDXL-VAE; the posterior mean) or ``AutoencoderDC`` (``kind="dc"``,
DC-AE f32c32 as SANA uses). The only target that ``decode``s back to pixels itself. Shape vocabulary:
``blip3o/models/targets/base.py``.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Dict, Union

import torch
import torch.nn as nn
from diffusers import AutoencoderDC, AutoencoderKL

from blip3o.models.targets.base import TARGETS, TargetEncoder, canonical, resolve_pretrained


@TARGETS.register("vae")
class VaeTarget(TargetEncoder):
    """Scaled VAE latents (AutoencoderKL posterior mean, or AutoencoderDC latent) as x0."""

    name = "vae"
    nested_key = "vae_config"
    decodes_to_pixels = True

    def __init__(self, config: Dict[str, Any], device: Union[str, torch.device, None] = None):
        super().__init__(config)
        self._setup_shapes()
        c = self.config
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.vae = self._model_cls(c["kind"])(**c["vae_config"])
        if self.dtype != torch.float32:
            self.vae.to(self.dtype)
        self._freeze()

    def _setup_shapes(self) -> None:
        c = self.config
        if c["kind"] not in ("kl", "dc"):
            raise ValueError(f"vae kind must be 'kl' or 'dc', got {c['kind']!r}")
        vc = c["vae_config"]
        stages = vc["block_out_channels"] if c["kind"] == "kl" else vc["encoder_block_out_channels"]
        self.downsample = 2 ** (len(stages) - 1)  # both VAEs halve the resolution between stages
        if c["image_size"] % self.downsample:
            raise ValueError(f"image_size {c['image_size']} is not a multiple of the VAE factor {self.downsample}")
        self.image_size = c["image_size"]
        self.channels = vc["latent_channels"]
        self.grid = (c["image_size"] // self.downsample,) * 2

    @staticmethod
    def _model_cls(kind: str):
        return AutoencoderKL if kind == "kl" else AutoencoderDC

    @classmethod
    def nested_fields(cls, config: Dict[str, Any]) -> set:
        return set(inspect.signature(cls._model_cls(config["kind"]).__init__).parameters) - {"self"}

    @classmethod
    def preset_name(cls, preset: str, overrides: Dict[str, Any], presets: Dict[str, Any]) -> str:
        # kind="dc" with preset official/tiny picks the DC-AE twin (official_dc/tiny_dc)
        return f"{preset}_dc" if overrides.get("kind") == "dc" and f"{preset}_dc" in presets else preset

    def _weights_module(self) -> nn.Module:
        return self.vae

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        enc = self.vae.encode(pixel_values)
        # the KL posterior *mean*, not a sample: x0 must be a deterministic function of the image
        lat = enc.latent_dist.mean if self.config["kind"] == "kl" else enc.latent
        return (lat.float() - self.config["shift_factor"]) * self.config["scaling_factor"]

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (B, C, H, W) -> pixels (B, 3, S, S) in [-1, 1], float32 (the VAE's own pixel decoder)."""
        lat = x0.float() / self.config["scaling_factor"] + self.config["shift_factor"]
        out = self.vae.decode(lat.to(device=self.device, dtype=self.dtype)).sample
        return out.float().clamp(-1.0, 1.0)

    def load_external(self, pretrained: str, allow_download: bool = False) -> None:
        """Loads a diffusers VAE directory (or a pipeline directory with a ``vae/`` subfolder)."""
        path, local = resolve_pretrained(pretrained, allow_download)
        sub = "vae" if local and os.path.isfile(os.path.join(path, "vae", "config.json")) else None
        vae = self._model_cls(self.config["kind"]).from_pretrained(path, subfolder=sub, torch_dtype=self.dtype)
        vc = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
        sf = vc.get("scaling_factor", self.config["scaling_factor"])
        sh = vc.get("shift_factor") or 0.0
        # the checkpoint's own architecture and latent scaling win over the preset's
        self.config = canonical(dict(self.config, vae_config=vc, scaling_factor=sf, shift_factor=sh))
        self._setup_shapes()
        self.vae = vae
        self._freeze()
        self.source = path


