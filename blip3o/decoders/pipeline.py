"""The common sampling pipeline of the CLIP-feature -> pixel decoders: features (B, N, C) -> images.

Each decoder (`sdxl.py`, `sana.py`) is an ordinary `diffusers.DiffusionPipeline` subclass of
:class:`FeatureDecoderPipeline` whose components are diffusers model classes (plus the small ones in
`components.py`), so `save_pretrained` writes a standard folder; `from_pretrained` reads it back through
`io.py` and the decoder registry (`spec.py`).
"""
from __future__ import annotations

import inspect
import os
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from blip3o.decoders.components import decode_latents, vae_latent_channels, vae_scale_factor
from blip3o.decoders.io import detect_decoder_kind, resolve_pretrained_dir
from blip3o.decoders.spec import DECODERS, DecoderSpec

# The originals' CFG scale (Emu2 / BLIP3-o: 3.0); a decoder folder may carry its own (model_index.json
# "default_guidance_scale"): the toy decoder renders best unguided (benchmarks/toy_world.md, session 9).
OFFICIAL_GUIDANCE = 3.0


def sampling_defaults(model_index: Dict[str, Any], steps: int) -> Dict[str, Any]:
    """The sampling defaults a decoder folder's model_index.json carries, else `steps` and the originals' CFG."""
    return {"default_num_inference_steps": int(model_index.get("default_num_inference_steps", steps)),
            "default_guidance_scale": float(model_index.get("default_guidance_scale", OFFICIAL_GUIDANCE))}


def check_guidance(guidance_scale: Optional[float]) -> float:
    """A build's default CFG scale: None -> the originals' 3.0; 1 = unguided (one denoiser pass per step)."""
    if guidance_scale is None:
        return OFFICIAL_GUIDANCE
    if guidance_scale < 1:
        raise ValueError(f"decoder guidance_scale must be >= 1 (1 = no classifier-free guidance), got {guidance_scale}")
    return float(guidance_scale)


GeneratorArg = Union[torch.Generator, List[torch.Generator], None]


class FeatureDecoderPipeline(DiffusionPipeline):
    """features (B, N, C) -> images, with batched classifier-free guidance and per-sample generators.

    Subclasses provide the denoiser-specific pieces: `encode_condition` (features -> dict of model inputs),
    `predict` (one denoiser call) and `feature_dim`. The null (unconditional) condition is the stored
    `null_condition.features` run through `encode_condition` once and cached until any conditioning weight
    or the null tensor changes (tracked with tensor version counters, so optimiser steps invalidate it).
    """

    kind: ClassVar[str] = ""  # its name in the decoder registry
    denoiser_name: ClassVar[str] = ""
    _null_cache: Optional[Dict[str, Any]] = None

    # -- subclass hooks ----------------------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def encode_condition(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Dict[str, torch.Tensor], height: int, width: int):
        raise NotImplementedError

    def _condition_modules(self) -> Sequence[torch.nn.Module]:
        """Modules whose weights the encoded condition depends on (cache invalidation)."""
        return ()

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def spec(self) -> DecoderSpec:
        return DECODERS.get(self.kind)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this: the VAE's factor times the denoiser's own downsampling
        (a UNet halves the latent once per down block after the first; a transformer groups patch_size pixels)."""
        cfg = self.denoiser.config
        blocks = cfg.get("down_block_types")
        down = 2 ** (len(blocks) - 1) if blocks else int(cfg.get("patch_size") or 1)
        return self.vae_scale_factor * down

    def check_image_size(self, height: int, width: int) -> None:
        f = self.size_multiple
        if height < f or width < f or height % f or width % f:
            raise ValueError(f"height and width must be positive multiples of {f} for this decoder, got {height}x{width}")

    @property
    def default_image_size(self) -> int:
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    # -- null condition -----------------------------------------------------------------------------------------
    def set_null_features(self, features: torch.Tensor, source: str = "custom") -> None:
        """Replace the unconditional input (e.g. encoder features of a black image, computed once)."""
        self.null_condition.set(features, source=source)
        self.clear_null_cache()

    def clear_null_cache(self) -> None:
        self._null_cache = None

    def _null_features_for(self, num_tokens: int) -> torch.Tensor:
        null = self.null_condition.features
        if null.shape[1] != num_tokens:
            if self.null_condition.config.source == "zeros":
                return null.new_zeros(1, num_tokens, null.shape[-1])
            raise ValueError(
                f"features have {num_tokens} tokens but the stored null condition has {null.shape[1]}; "
                "set matching null features with set_null_features()"
            )
        return null

    def _cache_key(self, num_tokens: int, device, dtype):
        versions = tuple(p._version for m in self._condition_modules() for p in m.parameters())
        null = self.null_condition.features
        return (num_tokens, str(device), dtype, id(null), null._version, versions)

    def null_condition_embeds(self, num_tokens: int, device, dtype) -> Dict[str, torch.Tensor]:
        """The encoded unconditional input, computed once per (weights, device, dtype) and cached."""
        key = self._cache_key(num_tokens, device, dtype)
        if self._null_cache is None or self._null_cache["key"] != key:
            null = self._null_features_for(num_tokens).to(device=device, dtype=dtype)
            with torch.no_grad():
                value = {k: v.detach() for k, v in self.encode_condition(null).items()}
            self._null_cache = {"key": key, "value": value}
        return self._null_cache["value"]

    # -- checks -------------------------------------------------------------------------------------------------
    def check_features(self, features) -> torch.Tensor:
        if not torch.is_tensor(features):
            raise TypeError(f"features must be a torch.Tensor (B, N, C), got {type(features).__name__}")
        if features.ndim == 2:
            features = features[None]
        if features.ndim != 3:
            raise ValueError(f"features must be (B, N, C), got shape {tuple(features.shape)}")
        if features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"{self.kind} decoder expects feature dim {self.feature_dim}, got {features.shape[-1]} "
                f"(features shape {tuple(features.shape)})"
            )
        return features

    # -- sampling -----------------------------------------------------------------------------------------------
    def prepare_latents(self, batch: int, height: int, width: int, generator: GeneratorArg, device, dtype):
        self.check_image_size(height, width)
        f = self.vae_scale_factor
        shape = (batch, vae_latent_channels(self.vae), height // f, width // f)
        # Noise is drawn in float32 on the generator's device, so a seed gives the same start in any dtype.
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    @torch.no_grad()
    def __call__(
        self,
        features: torch.Tensor,
        guidance_scale: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        generator: GeneratorArg = None,
        num_images_per_sample: int = 1,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Decode features into images.

        features: (B, N, C) or (N, C). Each row yields `num_images_per_sample` images (sample-major order).
        generator: one generator for the whole batch, or a list with one per output image; with a list,
            image i depends only on generator i (same pixels alone or in a batch).
        output_type: "pil" (list of PIL images), "pt" ((B, 3, H, W) float in [0, 1]), "np" ((B, H, W, 3)
            float32 in [0, 1]) or "latent".
        Returns ImagePipelineOutput(images=...) or, with return_dict=False, (images,).
        """
        if output_type not in ("pil", "pt", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt', 'np' or 'latent', got '{output_type}'")
        features = self.check_features(features)
        num_inference_steps = int(num_inference_steps or self.config.get("default_num_inference_steps", 50))
        if guidance_scale is None:
            guidance_scale = float(self.config.get("default_guidance_scale", OFFICIAL_GUIDANCE))
        height = int(height or self.default_image_size)
        width = int(width or self.default_image_size)
        device = self._execution_device
        dtype = self.compute_dtype

        features = features.to(device=device, dtype=dtype)
        if num_images_per_sample > 1:
            features = features.repeat_interleave(num_images_per_sample, dim=0)
        batch, num_tokens = features.shape[:2]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images; pass one per image")

        cond = self.encode_condition(features)
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            null = self.null_condition_embeds(num_tokens, device, dtype)
            cond = {k: torch.cat([null[k].expand(batch, *null[k].shape[1:]), v]) for k, v in cond.items()}

        if latents is None:
            latents = self.prepare_latents(batch, height, width, generator, device, dtype)
        else:
            latents = latents.to(device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma

        # Euler draws (unused, s_churn=0) noise every step; handing it the same generator list keeps
        # per-sample streams independent of the batch.
        accepts_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if accepts_generator else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents, latents]) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            out = self.predict(model_in.to(dtype), t, cond, height, width).float()
            if do_cfg:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            latents = self.scheduler.step(out, t, latents, return_dict=False, **step_kwargs)[0]

        if output_type == "latent":
            images = latents
        else:
            images = decode_latents(self.vae, latents)
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        subfolder: Optional[str] = None,
        torch_dtype: Optional[torch.dtype] = None,
        variant: Optional[str] = "auto",
        allow_download: bool = False,
        **kwargs,
    ) -> "FeatureDecoderPipeline":
        """Load a local decoder folder (ours or the official `diffusion-decoder/` layout).

        variant="auto" picks, per component, plain weights if present else a variant such as bf16. Hub ids
        are only fetched with allow_download=True. From the base class the kind is detected from the folder.
        """
        root = resolve_pretrained_dir(pretrained_model_name_or_path, subfolder, allow_download)
        kind = detect_decoder_kind(root)
        target = DECODERS.get(kind).pipeline_class
        if cls is not FeatureDecoderPipeline and not issubclass(target, cls):
            raise ValueError(f"{root} holds a '{kind}' decoder, not a {cls.__name__}")
        return target._load_folder(root, torch_dtype=torch_dtype, variant=variant, **kwargs)

    @classmethod
    def _load_folder(cls, root: str, torch_dtype=None, variant="auto", **kwargs) -> "FeatureDecoderPipeline":
        raise NotImplementedError
