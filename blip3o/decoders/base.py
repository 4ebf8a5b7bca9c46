"""Shared machinery of the CLIP-feature -> pixel decoders.

Shape vocabulary: B batch, N feature tokens (64), C feature channels (1792 EVA-CLIP, 1152 SigLIP2),
c/h/w latent channels and grid, H/W pixels.

Both decoders are ordinary `diffusers.DiffusionPipeline`s whose components are diffusers model classes
(plus two tiny ModelMixin classes defined here), so `save_pretrained` writes a standard folder. Loading is
done by `FeatureDecoderPipeline.from_pretrained`, which reads each subfolder with its own class and never
executes code from the folder (the official checkpoint's `pipeline_llava_gen.py` is ignored).
"""
from __future__ import annotations

import inspect
import json
import os
import re
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

import diffusers
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, EncoderOutput
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

GeneratorArg = Union[torch.Generator, List[torch.Generator], None]


class DecoderLoadError(FileNotFoundError):
    """A decoder folder or hub id could not be resolved locally."""


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


# Classes a decoder folder may name; anything else is refused rather than imported.
_LOCAL_CLASSES: Dict[str, type] = {
    "NullCondition": NullCondition,
    "PixelUnshuffleAutoencoder": PixelUnshuffleAutoencoder,
}


def register_component_class(cls: type) -> type:
    _LOCAL_CLASSES[cls.__name__] = cls
    return cls


def resolve_component_class(class_name: str) -> type:
    if class_name in _LOCAL_CLASSES:
        return _LOCAL_CLASSES[class_name]
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"unsupported decoder component class '{class_name}' (not a diffusers class)")
    return cls


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


# ---------------------------------------------------------------------------------------------------------------
# Folder loading.
# ---------------------------------------------------------------------------------------------------------------
_WEIGHT_RE = re.compile(r"^diffusion_pytorch_model(?:-\d+-of-\d+)?(?:\.(?P<v>[^.]+))?\.(?:safetensors|bin)$")
_INDEX_RE = re.compile(r"^diffusion_pytorch_model\.(?:safetensors|bin)\.index(?:\.(?P<v>[^.]+))?\.json$")


def detect_variant(folder: str) -> Optional[str]:
    """None when plain weights exist, else the variant the files carry (bf16 preferred, then fp16)."""
    variants = set()
    for name in os.listdir(folder):
        m = _WEIGHT_RE.match(name) or _INDEX_RE.match(name)
        if m:
            variants.add(m.group("v"))
    if not variants or None in variants:
        return None
    for preferred in ("bf16", "fp16", "fp32"):
        if preferred in variants:
            return preferred
    return sorted(variants)[0]


def read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def load_component(root: str, name: str, torch_dtype=None, variant: Optional[str] = "auto"):
    """Load `root/name` with the class its config names (diffusers class or one of ours); None if absent."""
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        return None
    for cfg_name in ("scheduler_config.json", "config.json"):
        cfg_path = os.path.join(folder, cfg_name)
        if os.path.isfile(cfg_path):
            break
    else:
        return None
    cls = resolve_component_class(read_json(cfg_path).get("_class_name", ""))
    if cfg_name == "scheduler_config.json":
        return cls.from_pretrained(root, subfolder=name, local_files_only=True)
    if getattr(cls, "weightless", False):  # nothing to cast: it only rearranges pixels
        return cls.from_config(cls.load_config(folder))
    if variant == "auto":
        variant = detect_variant(folder)
    kwargs = dict(subfolder=name, local_files_only=True, variant=variant)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return cls.from_pretrained(root, **kwargs)


def resolve_pretrained_dir(
    path_or_id: Union[str, os.PathLike], subfolder: Optional[str] = None, allow_download: bool = False
) -> str:
    """A local folder, or (only with allow_download=True) a hub snapshot; otherwise a one-line error."""
    path = os.fspath(path_or_id)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return local
    looks_like_hub_id = (
        not os.path.isabs(path) and path.count("/") == 1 and not path.startswith(".") and not os.path.exists(path)
    )
    if not looks_like_hub_id:
        raise DecoderLoadError(f"decoder folder not found: {local}")
    if not allow_download:
        raise DecoderLoadError(
            f"decoder '{local}' is not a local folder, and hub downloads are disabled: download '{path}' first "
            f"(e.g. `huggingface-cli download {path}`) and pass the local path, or pass allow_download=True"
        )
    from huggingface_hub import snapshot_download  # only reached on explicit request

    patterns = [f"{subfolder}/*"] if subfolder else None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        root = snapshot_download(path, allow_patterns=patterns, local_files_only=offline)
    except Exception as e:  # network errors, offline mode without a cache, gated repos
        raise DecoderLoadError(f"could not fetch decoder '{path}' from the hub: {type(e).__name__}: {e}") from e
    local = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(local):
        raise DecoderLoadError(f"hub snapshot of '{path}' has no folder '{subfolder}'")
    return local


# ---------------------------------------------------------------------------------------------------------------
# The common pipeline.
# ---------------------------------------------------------------------------------------------------------------
class FeatureDecoderPipeline(DiffusionPipeline):
    """features (B, N, C) -> images, with batched classifier-free guidance and per-sample generators.

    Subclasses provide the denoiser-specific pieces: `encode_condition` (features -> dict of model inputs),
    `predict` (one denoiser call) and `feature_dim`. The null (unconditional) condition is the stored
    `null_condition.features` run through `encode_condition` once and cached until any conditioning weight
    or the null tensor changes (tracked with tensor version counters, so optimiser steps invalidate it).
    """

    kind: ClassVar[str] = ""
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
        guidance_scale: float = 3.0,
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
        target = _PIPELINE_CLASSES[kind]
        if cls is not FeatureDecoderPipeline and not issubclass(target, cls):
            raise ValueError(f"{root} holds a '{kind}' decoder, not a {cls.__name__}")
        return target._load_folder(root, torch_dtype=torch_dtype, variant=variant, **kwargs)

    @classmethod
    def _load_folder(cls, root: str, torch_dtype=None, variant="auto", **kwargs) -> "FeatureDecoderPipeline":
        raise NotImplementedError

    @staticmethod
    def _pipeline_config(root: str) -> Dict[str, Any]:
        path = os.path.join(root, "model_index.json")
        return read_json(path) if os.path.isfile(path) else {}


_PIPELINE_CLASSES: Dict[str, type] = {}


def register_pipeline_class(cls: type) -> type:
    _PIPELINE_CLASSES[cls.kind] = cls
    return cls


def detect_decoder_kind(root: str) -> str:
    """'sdxl' or 'sana' from model_index.json, or from the subfolders (official folders name other classes)."""
    cfg = FeatureDecoderPipeline._pipeline_config(root)
    for kind, cls in _PIPELINE_CLASSES.items():
        if cfg.get("_class_name") == cls.__name__:
            return kind
    if os.path.isdir(os.path.join(root, "unet")):
        return "sdxl"
    if os.path.isdir(os.path.join(root, "transformer")):
        return "sana"
    raise DecoderLoadError(f"{root} is not a decoder folder (no model_index.json of ours, no unet/ or transformer/)")
