"""The small pieces the feature decoders share: our two ModelMixin components and the VAE helpers.

Shape vocabulary: B batch, N feature tokens (64), C feature channels (1792 EVA-CLIP, 1152 SigLIP2),
c/h/w latent channels and grid, H/W pixels.

The components are saved and loaded like any diffusers model (`blip3o/decoders/io.py` knows their class
names); the VAE helpers hide that AutoencoderKL, AutoencoderDC and the pixel stand-in differ in names only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, EncoderOutput


# ---------------------------------------------------------------------------------------------------------------
# Small components of our own (saved/loaded like any diffusers model).
# ---------------------------------------------------------------------------------------------------------------
class NullCondition(ModelMixin, ConfigMixin):
    """The unconditional input for classifier-free guidance, stored with the pipeline.

    `features` (1, N, C) is in *input feature* space (what the caller would pass as `features`), so the
    pipeline runs it through the same conditioning path as real features once and caches the result.
    `source` records where it came from: "zeros" (EVA/SDXL default: the reference's null condition is a zero
    tensor), "black_image" (SigLIP2/SANA: encoder features of a black image), "empty_prompt", or "custom".
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_tokens: int = 64, feature_dim: int = 1792, source: str = "zeros"):
        super().__init__()
        self.register_buffer("features", torch.zeros(1, num_tokens, feature_dim))

    def set(self, features: torch.Tensor, source: str = "custom") -> None:
        features = features.detach()
        if features.ndim == 2:
            features = features[None]
        if features.ndim != 3 or features.shape[0] != 1 or features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"null features must be (1, N, {self.config.feature_dim}) or (N, {self.config.feature_dim}), "
                f"got {tuple(features.shape)}"
            )
        self.features = features.to(device=self.features.device, dtype=self.features.dtype).clone()
        self.register_to_config(num_tokens=int(features.shape[1]), source=source)


class PixelUnshuffleAutoencoder(ModelMixin, ConfigMixin):
    """A parameter-free "VAE" for pixel-space toy decoders: latents are the image pixel-unshuffled by `factor`.

    A randomly initialised AutoencoderKL/DC cannot reproduce images, so on the toy world a decoder trained on
    its latents is capped by the random VAE. This stand-in keeps the pipeline's encode/decode structure (and
    the diffusers save/load path) while making the latent an exact, invertible re-arrangement of pixels
    (64x64x3 -> 16x16x48 for factor 4), which the toy prototype found trains well on CPU.
    """

    config_name = "config.json"
    weightless = True  # saved as config only; load_component rebuilds it from config

    @register_to_config
    def __init__(self, in_channels: int = 3, factor: int = 4, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        # A buffer gives the module a dtype/device for ModelMixin.dtype and pipeline.to().
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        z = F.pixel_unshuffle(x, self.config.factor)
        return EncoderOutput(latent=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        x = F.pixel_shuffle(z, self.config.factor)
        return DecoderOutput(sample=x) if return_dict else (x,)


# ---------------------------------------------------------------------------------------------------------------
# VAE helpers (AutoencoderKL, AutoencoderDC and the pixel stand-in differ in names only).
# ---------------------------------------------------------------------------------------------------------------
def vae_scale_factor(vae) -> int:
    cfg = vae.config
    if "factor" in cfg:
        return int(cfg.factor)
    if "encoder_block_out_channels" in cfg:  # AutoencoderDC
        return 2 ** (len(cfg.encoder_block_out_channels) - 1)
    return 2 ** (len(cfg.block_out_channels) - 1)


def vae_latent_channels(vae) -> int:
    cfg = vae.config
    if "factor" in cfg:
        return int(cfg.in_channels) * int(cfg.factor) ** 2
    return int(cfg.latent_channels)


def _shift(vae) -> float:
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode_to_latents(vae, images: torch.Tensor, sample_posterior: bool = False, generator=None) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled diffusion latents ((z - shift) * scaling_factor).

    The KL posterior mean is used by default: for trained SD VAEs its std is negligible, and for a randomly
    initialised tiny VAE the posterior noise (std ~1) would swamp the signal.
    """
    images = images.to(device=vae.device, dtype=vae.dtype)
    out = vae.encode(images)
    if hasattr(out, "latent_dist"):
        z = out.latent_dist.sample(generator) if sample_posterior else out.latent_dist.mode()
    else:
        z = out.latent
    return (z.float() - _shift(vae)) * float(vae.config.scaling_factor)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> pixels in [0, 1] (float32)."""
    z = latents.float() / float(vae.config.scaling_factor) + _shift(vae)
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        # The SDXL VAE overflows in fp16: decode in fp32, then restore (as diffusers' SDXL pipeline does).
        vae.to(torch.float32)
        try:
            x = vae.decode(z).sample
        finally:
            vae.to(torch.float16)
    else:
        x = vae.decode(z.to(vae.dtype)).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def calibrate_scaling_factor(vae, image_size: int = 64, seed: int = 0, n: int = 8,
                             images: Optional[torch.Tensor] = None) -> float:
    """Set `scaling_factor` so latents have unit std (SD's recipe), on `images` or smooth random images.

    Used for tiny VAEs, whose latent scale is arbitrary; diffusion noise levels assume unit-variance data.
    """
    if images is None:
        g = torch.Generator().manual_seed(seed)
        # Low-frequency colour fields rather than white noise: closer to real / toy images.
        coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
        images = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    vae.register_to_config(scaling_factor=1.0)
    z = encode_to_latents(vae, images.to(vae.device))
    std = float(z.std())
    scale = 1.0 / std if std > 1e-6 else 1.0
    vae.register_to_config(scaling_factor=scale)
    return scale
