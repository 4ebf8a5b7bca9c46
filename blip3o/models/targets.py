"""Frozen target encoders: images -> the x0 that the BLIP3-o generator learns to produce.

BLIP3-o's DiT does not denoise pixels or VAE latents; it regresses (flow matching) onto frozen *CLIP
features* of the image: EVA-CLIP-E-14-plus features at 448 px, average-pooled from a 32x32 to an 8x8
token grid (docs/decisions.md, "Targets"). SigLIP2 features (the SigLIP2+SANA reconstruction branch)
and plain VAE latents ("VAE + flow matching", sec. 1.7) are alternative targets. They all live behind
one interface so the target is a config value (``TARGETS`` registry), not a code branch.

Shape vocabulary
    B        batch size
    S        ``image_size``: side of the square encoder input in pixels (EVA 448, SigLIP2 512)
    P        encoder patch size (EVA 14, SigLIP2 16)
    h, w     encoder token grid, S/P per side (EVA 32x32); the VAE grid is S / downsample factor
    D        encoder width = ``channels`` of x0 (EVA-E 1792, SigLIP so400m 1152, VAE latent channels)
    H, W     ``grid``: the x0 grid after pooling (8x8 for the CLIP targets); N = H*W tokens
    pixel_values  (B, 3, S, S) float32, already normalised the way the encoder expects (``transform``)
    x0            (B, D, H, W) float32; flattening to tokens is row-major: x0.flatten(2).transpose(1, 2)
                  gives (B, N, D) with token n = (n // W, n % W)

Variants (``TARGET_PRESETS[name]`` holds an ``official`` and a ``tiny`` config for each):
    eva_clip   timm ``Eva`` configured as the BLIP3-o EVA tower: post-norm blocks, fused qkv with q/v bias,
               GELU MLP, learned absolute pos-embed incl. CLS, no RoPE, no final norm. x0 = raw output of
               the last block, CLS dropped, avg-pooled by ``pool``.
    siglip     transformers ``SiglipVisionModel`` (``arch="siglip"``, the fixed-resolution SigLIP/SigLIP2
               checkpoints such as google/siglip2-so400m-patch16-512) or ``Siglip2VisionModel``
               (``arch="siglip2"``, NaFlex checkpoints; fed a full fixed grid). x0 = hidden state
               ``select_layer`` (penultimate), adaptive-avg-pooled to ``grid``.
    vae        diffusers ``AutoencoderKL`` (``kind="kl"``, SDXL-VAE) or ``AutoencoderDC`` (``kind="dc"``,
               DC-AE f32c32). x0 = (latent - shift_factor) * scaling_factor; ``decode`` maps back to pixels.

Nothing here downloads: ``pretrained`` must be a local path unless ``allow_download=True``. Without
``pretrained`` the encoder is randomly initialised (tiny presets for tests, or structure checks on the
``meta`` device).
"""
from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import json
import math
import os
import re
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import blip3o  # noqa: F401  (installs the torchvision shim before timm/transformers/diffusers import)
from blip3o.registry import Registry

__all__ = [
    "TargetEncoder",
    "EvaClipTarget",
    "SiglipTarget",
    "VaeTarget",
    "TARGETS",
    "TARGET_PRESETS",
    "UPSTREAM_WEIGHTS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "build_target_encoder",
    "load_target_encoder",
    "make_tiny_target",
    "map_eva_clip_state_dict",
    "to_eva_clip_state_dict",
    "resize_center_crop",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

TARGETS: Registry = Registry("target encoder")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}

# ----------------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------------

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

# Keys that belong to a nested sub-config; an override of such a key is routed there (e.g. ``image_size``
# for SigLIP is the vision model's own field, not a separate one that could disagree with it).
_NESTED_KEY = {"siglip": "vision_config", "vae": "vae_config"}


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def _canonical(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """JSON round trip: tuples -> lists etc., so a config hashes the same before and after save/load."""
    return json.loads(json.dumps(cfg, sort_keys=True))


def _config_hash(cfg: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def resize_center_crop(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize the shorter side to ``size`` then center-crop ``size`` x ``size``.

    Same integer arithmetic as torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL images (long side
    truncated, crop offset rounded), so features match the reference's torchvision preprocessing exactly.
    """
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), _RESAMPLE[interpolation])
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _pil_to_normalised(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def _is_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s))


def _resolve_pretrained(pretrained: str, allow_download: bool) -> Tuple[str, bool]:
    """Returns (path_or_id, is_local). Refuses hub ids unless downloads are explicitly allowed."""
    path = os.path.expanduser(pretrained)
    if os.path.exists(path):
        return path, True
    if not allow_download:
        raise ValueError(
            f"pretrained={pretrained!r} is not a local file or directory; this project never downloads by "
            f"default: fetch the weights yourself and pass the local path, or pass allow_download=True"
        )
    if not _is_hub_id(pretrained):
        raise ValueError(f"pretrained={pretrained!r} is neither a local path nor a Hugging Face hub id")
    return pretrained, False


def _load_state_file(path: str) -> Dict[str, torch.Tensor]:
    """Loads a safetensors / torch state dict from a file, a sharded index, or a directory holding one."""
    if os.path.isdir(path):
        for pattern in ("model.safetensors", "*.safetensors.index.json", "*.safetensors",
                        "pytorch_model.bin", "*.bin.index.json", "*.bin", "*.pt", "*.pth"):
            hits = sorted(glob.glob(os.path.join(path, pattern)))
            if hits:
                if len(hits) > 1 and not pattern.endswith("index.json") and "*" in pattern:
                    # several loose shards without an index: load them all
                    sd: Dict[str, torch.Tensor] = {}
                    for h in hits:
                        sd.update(_load_state_file(h))
                    return sd
                return _load_state_file(hits[0])
        raise FileNotFoundError(f"no weights file (*.safetensors, *.bin, *.pt, *.pth) in {path}")
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for s in shards:
            sd.update(_load_state_file(os.path.join(os.path.dirname(path), s)))
        return sd
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:  # mmap: a multi-GB tower is not read into memory twice
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zipfile) torch.save format cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    # training checkpoints often wrap the state dict
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


def _weights_fingerprint(module: nn.Module) -> Optional[str]:
    """Cheap hash of the weights (names, shapes, a strided sample of each tensor).

    Two random tiny encoders with the same config but different seeds give different x0, so the config
    hash alone cannot tell feature caches apart; hashing every byte of a 4B-parameter tower would take
    seconds, a few thousand strided values per tensor do not.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if t.is_meta:
            return None
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].cpu()
        sample = sample.to(torch.float64) if sample.is_floating_point() else sample.to(torch.int64)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _nested_fields(name: str, cfg: Dict[str, Any]) -> set:
    """Field names the nested library config of target ``name`` accepts (to route overrides safely)."""
    import dataclasses
    import inspect

    if name == "siglip":
        if cfg["arch"] == "siglip":
            from transformers import SiglipVisionConfig as cfg_cls
        else:
            from transformers import Siglip2VisionConfig as cfg_cls
        return {f.name for f in dataclasses.fields(cfg_cls)} | {"image_size"}
    if name == "vae":
        model_cls = VaeTarget._model_cls(cfg["kind"])
        return set(inspect.signature(model_cls.__init__).parameters) - {"self"}
    return set()


def _merge_overrides(name: str, base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Preset + overrides. Top-level keys replace; a key of the nested library config (``vision_config`` /
    ``vae_config``) is routed there, so ``build_target_encoder("siglip", image_size=384)`` works; a dict
    given for the nested config itself updates it key by key. Unknown keys raise, typos included."""
    cfg = copy.deepcopy(base)
    nested = _NESTED_KEY.get(name)
    for k in ("arch", "kind"):  # decide the library class before checking nested field names
        if k in overrides and k in cfg:
            cfg[k] = overrides[k]
    fields = _nested_fields(name, cfg) if nested else set()
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


# ----------------------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------------------


class TargetEncoder(nn.Module):
    """A frozen image encoder producing the generator's x0 (B, channels, *grid).

    Subclasses set ``name`` (the registry key), build their network from ``config`` in ``__init__`` and
    implement ``_encode`` (normalised pixels -> x0 in any dtype).
    """

    name: str = ""

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        self.config: Dict[str, Any] = _canonical(config)
        self.source: Optional[str] = None  # where the weights came from (informational, not in the signature)
        self.load_report: Dict[str, List[str]] = {}

    # --- shape facts (subclasses provide these from the config) ---
    channels: int
    grid: Tuple[int, int]
    image_size: int

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def mean(self) -> Tuple[float, float, float]:
        return tuple(self.config["mean"])

    @property
    def std(self) -> Tuple[float, float, float]:
        return tuple(self.config["std"])

    @property
    def dtype(self) -> torch.dtype:
        return _torch_dtype(self.config["dtype"])

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # --- frozen-ness ---
    def _freeze(self) -> "TargetEncoder":
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "TargetEncoder":
        # A target encoder is a fixed function: dropout/BN-style train behaviour would make x0 depend on
        # whether the surrounding model is training, so train() keeps it in eval mode.
        return super().train(False)

    # --- preprocessing ---
    def transform(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> (3, S, S) float32, the encoder's own preprocessing."""
        image = image.convert("RGB")
        image = resize_center_crop(image, self.image_size, self.config.get("interpolation", "bicubic"))
        return _pil_to_normalised(image, self.mean, self.std)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """A list of PIL images -> (B, 3, S, S)."""
        return torch.stack([self.transform(im) for im in images])

    # --- encoding ---
    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> x0 (B, channels, *grid), float32."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"{self.name}: expected pixel_values (B, 3, {self.image_size}, {self.image_size}), "
                f"got {tuple(pixel_values.shape)}"
            )
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        out = self._encode(x).float()
        assert out.shape[1:] == (self.channels, *self.grid), out.shape
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode(pixel_values)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encode(self.preprocess(images))

    # --- identity ---
    def signature(self) -> Dict[str, Any]:
        """What a feature cache must match: registry name, config hash, x0 shape, weights fingerprint."""
        return {
            "name": self.name,
            "config_hash": _config_hash(self.config),
            "shape": [self.channels, *self.grid],
            "image_size": self.image_size,
            "weights": _weights_fingerprint(self),
            "format_version": FORMAT_VERSION,
        }

    # --- persistence ---
    def _weights_module(self) -> nn.Module:
        """The module whose state dict is saved (the wrapped network)."""
        raise NotImplementedError

    def _init_nonpersistent_buffers(self) -> None:
        """Refills buffers that state dicts do not carry after a meta-device build + ``to_empty``."""

    def save_pretrained(self, path: str) -> str:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        meta = {"name": self.name, "format_version": FORMAT_VERSION, "config": self.config}
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in self._weights_module().state_dict().items()}
        save_file(sd, os.path.join(path, WEIGHTS_NAME), metadata={"name": self.name})
        return path

    @classmethod
    def from_pretrained(cls, path: str, device: Union[str, torch.device, None] = None) -> "TargetEncoder":
        """Loads a directory written by ``save_pretrained`` (any registered target when called on the base)."""
        cfg_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; not a saved target encoder")
        with open(cfg_path) as f:
            meta = json.load(f)
        if "name" not in meta or "config" not in meta:
            raise ValueError(f"{cfg_path} is not a blip3o target-encoder config")
        target_cls = TARGETS.get(meta["name"])
        if cls is not TargetEncoder and not issubclass(target_cls, cls):
            raise ValueError(f"{path} holds a {meta['name']!r} target, not a {cls.name!r} one")
        # Build on the meta device (no random init of billions of weights), then materialise and fill.
        enc = target_cls(meta["config"], device="meta")
        from safetensors.torch import load_file

        sd = load_file(os.path.join(path, WEIGHTS_NAME))
        enc._materialize(sd, device=device)
        enc.source = os.path.abspath(path)
        return enc

    def _materialize(self, state_dict: Dict[str, torch.Tensor], device=None) -> None:
        module = self._weights_module()
        module.to_empty(device=device or "cpu")
        self._init_nonpersistent_buffers()
        module.load_state_dict(state_dict, strict=True)
        leftover = [n for n, t in list(self.named_parameters()) + list(self.named_buffers()) if t.is_meta]
        if leftover:
            raise RuntimeError(f"{self.name}: tensors left on the meta device after loading: {leftover[:5]}")
        self._freeze()

    def extra_repr(self) -> str:
        h, w = self.grid
        return f"name={self.name!r}, x0=(B, {self.channels}, {h}, {w}), image_size={self.image_size}"


# ----------------------------------------------------------------------------------------------------------
# EVA-CLIP
# ----------------------------------------------------------------------------------------------------------

_EVA_IGNORED = re.compile(r"^(norm|fc_norm|head|lm_head)\.")  # final norm / head: x0 is the raw last block
_EVA_UNSUPPORTED = re.compile(
    r"(^rope\.|\.rope\.|inner_attn_ln|ffn_ln|gamma_1|gamma_2|relative_position|rel_pos_bias|^norm_pre\.)"
)


def _resample_pos_embed(pos: torch.Tensor, num_tokens: int, num_prefix: int = 1) -> torch.Tensor:
    """(1, prefix + g*g, D) -> (1, prefix + G*G, D) by bicubic interpolation of the patch part."""
    old = pos.shape[1] - num_prefix
    g_old, g_new = int(math.isqrt(old)), int(math.isqrt(num_tokens - num_prefix))
    if g_old * g_old != old or g_new * g_new != num_tokens - num_prefix:
        raise ValueError(f"cannot resample a pos_embed of {pos.shape[1]} tokens to {num_tokens}")
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    d = grid.shape[-1]
    grid = grid.float().reshape(1, g_old, g_old, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, d).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


def map_eva_clip_state_dict(
    state_dict: Dict[str, torch.Tensor],
    prefix: Optional[str] = None,
    num_pos_tokens: Optional[int] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]]]:
    """EVA-CLIP-repo-layout vision tower -> the key layout of ``EvaClipTarget.model`` (timm ``Eva``).

    Best effort (the real BLIP3-o tower, ``jiuhai/eva_clip_vision_tower``, could not be fetched here), written
    from the EVA-CLIP ``EVAVisionTransformer`` layout that the reference describes:

    * ``prefix``: stripped from every key; when None it is found from the key ending in ``cls_token``
      (e.g. ``visual.``, ``model.gen_vision_tower.vision_tower.model.``). Keys outside it are ignored.
    * ``blocks.{i}.attn.qkv.bias`` (fused, the BLIP3-o tower's layout) -> ``q_bias`` + ``v_bias``. The key
      part is dropped: a bias on k adds q.b_k to every logit of a query row, which softmax cancels, so the
      output is unchanged (timm keeps k's bias as a zero buffer; EVA-CLIP itself has none).
    * ``blocks.{i}.attn.q_bias`` / ``v_bias`` (BAAI's original layout) map 1:1.
    * ``blocks.{i}.attn.{q,k,v}_proj.weight`` (unfused variant) are concatenated into ``qkv.weight``.
    * ``norm1/norm2``, ``attn.proj``, ``mlp.fc1/fc2``, ``patch_embed.proj``, ``cls_token``, ``pos_embed`` map
      1:1. ``pos_embed`` is bicubically resampled when ``num_pos_tokens`` differs (e.g. BAAI's 224 px
      checkpoint, 257 tokens, into the 448 px tower, 1025 tokens; BLIP3-o's own tower is already 448 px).
    * Final ``norm``/``head``/``fc_norm`` are ignored (x0 is the raw last-block output). RoPE, sub-LN and
      layer-scale keys mean a different architecture than EVA-CLIP-E-14-plus and raise ValueError.

    Returns (mapped state dict, report {"ignored": [...], "outside_prefix": [...]}).
    """
    if prefix is None:
        cands = sorted({k[: -len("cls_token")] for k in state_dict if k.endswith("cls_token")})
        if len(cands) != 1:
            raise ValueError(f"cannot infer the EVA tower prefix (cls_token keys under {cands}); pass prefix=")
        prefix = cands[0]
    out: Dict[str, torch.Tensor] = {}
    report: Dict[str, List[str]] = {"ignored": [], "outside_prefix": []}
    qkv_parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in state_dict.items():
        if not key.startswith(prefix):
            report["outside_prefix"].append(key)
            continue
        k = key[len(prefix):]
        if _EVA_UNSUPPORTED.search(k):
            raise ValueError(
                f"EVA checkpoint key {key!r} implies RoPE / sub-LN / layer-scale / relative position bias, "
                f"which the EVA-CLIP-E-14-plus tower does not have"
            )
        if _EVA_IGNORED.match(k):
            report["ignored"].append(key)
            continue
        m = re.fullmatch(r"(blocks\.\d+\.attn\.)qkv\.bias", k)
        if m:
            q, _k, v = t.chunk(3, dim=0)
            out[m.group(1) + "q_bias"] = q
            out[m.group(1) + "v_bias"] = v
            continue
        m = re.fullmatch(r"(blocks\.\d+\.attn\.)([qkv])_proj\.weight", k)
        if m:
            qkv_parts.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        out[k] = t
    for blk, parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{prefix}{blk}: incomplete q/k/v_proj weights {sorted(parts)}")
        out[blk + "qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if num_pos_tokens is not None and "pos_embed" in out and out["pos_embed"].shape[1] != num_pos_tokens:
        out["pos_embed"] = _resample_pos_embed(out["pos_embed"], num_pos_tokens)
    return out, report


def to_eva_clip_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """Inverse of ``map_eva_clip_state_dict``: our timm layout -> EVA-CLIP layout with a fused ``qkv.bias``
    (zero key bias), i.e. the BLIP3-o tower layout (12 tensors per block + 4 = 772 for 64 blocks)."""
    out: Dict[str, torch.Tensor] = {}
    for k, t in state_dict.items():
        m = re.fullmatch(r"(blocks\.\d+\.attn\.)q_bias", k)
        if m:
            v = state_dict[m.group(1) + "v_bias"]
            out[prefix + m.group(1) + "qkv.bias"] = torch.cat([t, torch.zeros_like(t), v])
        elif k.endswith("attn.v_bias"):
            continue
        else:
            out[prefix + k] = t
    return out


def pool_tokens(tokens: torch.Tensor, grid, pool: int) -> torch.Tensor:
    """The reference's ``early_pool2d_4``: tokens (B, h*w, D) in row-major order -> (B, D, h, w) ->
    ``avg_pool2d(pool)``. Pooled in fp32: averaging 16 bf16 values in bf16 would add rounding noise."""
    b, n, d = tokens.shape
    h, w = grid
    fmap = tokens.transpose(1, 2).reshape(b, d, h, w).float()
    return F.avg_pool2d(fmap, kernel_size=pool, stride=pool) if pool > 1 else fmap


@TARGETS.register("eva_clip")
class EvaClipTarget(TargetEncoder):
    """EVA-CLIP-E-14-plus (448 px) features, CLS dropped, avg-pooled: BLIP3-o's generation target."""

    name = "eva_clip"

    def __init__(self, config: Dict[str, Any], device: Union[str, torch.device, None] = None):
        super().__init__(config)
        c = self.config
        if c["image_size"] % c["patch_size"]:
            raise ValueError(f"image_size {c['image_size']} is not a multiple of patch_size {c['patch_size']}")
        tokens_side = c["image_size"] // c["patch_size"]
        if tokens_side % c["pool"]:
            raise ValueError(f"token grid {tokens_side} is not divisible by pool {c['pool']}")
        self.image_size = c["image_size"]
        self.channels = c["width"]
        self.token_grid = (tokens_side, tokens_side)
        self.grid = (tokens_side // c["pool"],) * 2
        self.model = self._build_eva(c, device)
        self._freeze()

    @staticmethod
    def _build_eva(c: Dict[str, Any], device) -> nn.Module:
        from timm.models.eva import Eva

        # timm takes an MLP *ratio* and truncates dim*ratio; nudge it up so the product lands exactly on mlp_dim.
        ratio = c["mlp_dim"] / c["width"]
        while int(c["width"] * ratio) < c["mlp_dim"]:
            ratio = math.nextafter(ratio, math.inf)
        model = Eva(
            img_size=c["image_size"],
            patch_size=c["patch_size"],
            num_classes=0,
            global_pool="",
            embed_dim=c["width"],
            depth=c["depth"],
            num_heads=c["num_heads"],
            qkv_bias=c["qkv_bias"],
            qkv_fused=True,
            mlp_ratio=ratio,
            swiglu_mlp=False,  # EVA-CLIP-E-14-plus uses a plain GELU MLP (no SwiGLU, no sub-LN)
            scale_mlp=False,
            scale_attn_inner=False,
            use_rot_pos_emb=False,  # ... and no RoPE: absolute pos-embed only
            use_abs_pos_emb=True,
            class_token=True,
            use_post_norm=c["post_norm"],  # x + LN(attn(x)), x + LN(mlp(x))
            use_pre_transformer_norm=False,
            use_post_transformer_norm=False,  # the reference returns the raw last block, no final norm
            use_fc_norm=False,
            norm_layer=partial(nn.LayerNorm, eps=c["ln_eps"]),
            device=device,
            dtype=_torch_dtype(c["dtype"]),
        )
        assert model.blocks[0].mlp.fc1.out_features == c["mlp_dim"]
        return model

    def _weights_module(self) -> nn.Module:
        return self.model

    def _init_nonpersistent_buffers(self) -> None:
        # timm keeps the (always zero) key bias as a non-persistent buffer
        for m in self.model.modules():
            if m is not self.model and hasattr(m, "init_non_persistent_buffers"):
                m.init_non_persistent_buffers()

    @torch.no_grad()
    def encode_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> raw last-block tokens without CLS, (B, h*w, D) in the model dtype."""
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        feats = self.model.forward_features(x)  # (B, 1 + h*w, D)
        return feats[:, self.model.num_prefix_tokens:]

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pool_tokens(self.encode_tokens(pixel_values), self.token_grid, self.config["pool"])

    def load_eva_clip_weights(self, path: str, prefix: Optional[str] = None) -> Dict[str, List[str]]:
        """Loads an EVA-CLIP-layout vision tower (file or directory) via ``map_eva_clip_state_dict``."""
        raw = _load_state_file(path)
        sd, report = map_eva_clip_state_dict(raw, prefix=prefix, num_pos_tokens=self.model.pos_embed.shape[1])
        expected = set(self.model.state_dict())
        missing = sorted(expected - set(sd))
        if missing:
            raise ValueError(f"EVA checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:5]}")
        report["unexpected"] = sorted(set(sd) - expected)
        sd = {k: v for k, v in sd.items() if k in expected}
        if self.device.type == "meta":
            self._materialize(sd)
        else:
            self.model.load_state_dict(sd, strict=True)
            self._freeze()
        self.load_report = report
        self.source = path
        return report

    def load_external(self, pretrained: str, allow_download: bool = False) -> None:
        path, local = _resolve_pretrained(pretrained, allow_download)
        if not local:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, allow_patterns=["*.safetensors", "*.bin", "*.json", "*.pt", "*.pth"])
        self.load_eva_clip_weights(path)


# ----------------------------------------------------------------------------------------------------------
# SigLIP / SigLIP2
# ----------------------------------------------------------------------------------------------------------

_SIGLIP_KEEP = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps", "num_patches",
)


@TARGETS.register("siglip")
class SiglipTarget(TargetEncoder):
    """SigLIP / SigLIP2 penultimate-layer features, adaptive-avg-pooled to ``grid``."""

    name = "siglip"

    def __init__(self, config: Dict[str, Any], device: Union[str, torch.device, None] = None):
        super().__init__(config)
        self._setup_shapes()
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.model = self._new_model(self.config, dtype=_torch_dtype(self.config["dtype"]))
        self._truncate()
        self._freeze()

    def _setup_shapes(self) -> None:
        c = self.config
        vc = c["vision_config"]
        if c["arch"] not in ("siglip", "siglip2"):
            raise ValueError(f"siglip arch must be 'siglip' or 'siglip2', got {c['arch']!r}")
        if vc["image_size"] % vc["patch_size"]:
            raise ValueError("image_size must be a multiple of patch_size")
        self.image_size = vc["image_size"]
        self.channels = vc["hidden_size"]
        side = vc["image_size"] // vc["patch_size"]
        self.token_grid = (side, side)
        self.grid = tuple(c["grid"])
        if self.grid[0] > side or self.grid[1] > side:
            raise ValueError(f"grid {self.grid} is larger than the {side}x{side} token grid (pooling cannot upsample)")
        n_layers = vc["num_hidden_layers"]
        sel = c["select_layer"]
        # hidden_states = (embeddings, layer_1, ..., layer_L): entry ``sel`` is the output of the first
        # L + 1 + sel layers when sel < 0 (sel = -2: L - 1 layers, the penultimate one)
        self.num_kept_layers = n_layers + 1 + sel if sel < 0 else sel
        if not 1 <= self.num_kept_layers <= n_layers:
            raise ValueError(f"select_layer {sel} is out of range for {n_layers} layers")

    @staticmethod
    def _classes(arch: str):
        if arch == "siglip":
            from transformers import SiglipVisionConfig, SiglipVisionModel

            return SiglipVisionConfig, SiglipVisionModel
        from transformers import Siglip2VisionConfig, Siglip2VisionModel

        return Siglip2VisionConfig, Siglip2VisionModel

    def _new_model(self, c, dtype):
        cfg_cls, model_cls = self._classes(c["arch"])
        vc = dict(c["vision_config"])
        if c["arch"] == "siglip2":
            vc.setdefault("num_patches", self.token_grid[0] * self.token_grid[1])
            vc.pop("image_size", None)  # NaFlex models have no fixed size; ours is kept in vision_config
        hf_cfg = cfg_cls(**vc, vision_use_head=False)  # the pooling head is unused: x0 is a hidden state
        hf_cfg._attn_implementation = "sdpa"
        model = model_cls(hf_cfg)
        return model.to(dtype) if dtype != torch.float32 else model

    def _truncate(self) -> None:
        # Layers after the selected one never influence x0: drop them (saves compute and memory; the
        # penultimate-layer target skips the last of the 27 so400m layers).
        layers = self.model.encoder.layers
        self.model.encoder.layers = nn.ModuleList(list(layers)[: self.num_kept_layers])

    def _weights_module(self) -> nn.Module:
        return self.model

    def _init_nonpersistent_buffers(self) -> None:
        emb = self.model.embeddings
        if hasattr(emb, "position_ids"):
            n = emb.position_ids.shape[-1]
            emb.position_ids.copy_(torch.arange(n, device=emb.position_ids.device).expand((1, -1)))

    def _patchify(self, pixel_values: torch.Tensor):
        """SigLIP2 NaFlex input: (B, 3, S, S) -> (B, h*w, p*p*3) in the processor's (row, col, p, p, C) order."""
        b, c, s, _ = pixel_values.shape
        p = self.config["vision_config"]["patch_size"]
        h = w = s // p
        x = pixel_values.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)
        mask = torch.ones(b, h * w, dtype=torch.long, device=x.device)
        shapes = torch.tensor([[h, w]] * b, dtype=torch.long, device=x.device)
        return x, mask, shapes

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config["arch"] == "siglip2":
            x, mask, shapes = self._patchify(pixel_values)
            out = self.model(pixel_values=x, pixel_attention_mask=mask, spatial_shapes=shapes,
                             output_hidden_states=True)
        else:
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        tokens = out.hidden_states[-1]  # raw output of the selected layer (the model is truncated there)
        b, n, d = tokens.shape
        h, w = self.token_grid
        fmap = tokens.transpose(1, 2).reshape(b, d, h, w).float()
        return F.adaptive_avg_pool2d(fmap, self.grid)

    def load_external(self, pretrained: str, allow_download: bool = False) -> None:
        """Loads a transformers SigLIP/SigLIP2 directory (full CLIP-style or vision-only checkpoint)."""
        path, _local = _resolve_pretrained(pretrained, allow_download)
        _cfg_cls, model_cls = self._classes(self.config["arch"])
        model = model_cls.from_pretrained(
            path, dtype=self.dtype, attn_implementation="sdpa", vision_use_head=False,
        )
        vc = {k: v for k, v in model.config.to_dict().items() if k in _SIGLIP_KEEP}
        if self.config["arch"] == "siglip2":
            vc["image_size"] = self.config["vision_config"]["image_size"]
        # the checkpoint's own architecture wins over the preset's
        self.config = _canonical(dict(self.config, vision_config=vc))
        self._setup_shapes()
        self.model = model
        self._truncate()
        self._freeze()
        self.source = path


# ----------------------------------------------------------------------------------------------------------
# VAE latents
# ----------------------------------------------------------------------------------------------------------


@TARGETS.register("vae")
class VaeTarget(TargetEncoder):
    """Scaled VAE latents (AutoencoderKL posterior mean, or AutoencoderDC latent) as x0."""

    name = "vae"

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
        from diffusers import AutoencoderDC, AutoencoderKL

        return AutoencoderKL if kind == "kl" else AutoencoderDC

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
        path, local = _resolve_pretrained(pretrained, allow_download)
        sub = "vae" if local and os.path.isfile(os.path.join(path, "vae", "config.json")) else None
        vae = self._model_cls(self.config["kind"]).from_pretrained(path, subfolder=sub, torch_dtype=self.dtype)
        vc = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
        sf = vc.get("scaling_factor", self.config["scaling_factor"])
        sh = vc.get("shift_factor") or 0.0
        # the checkpoint's own architecture and latent scaling win over the preset's
        self.config = _canonical(dict(self.config, vae_config=vc, scaling_factor=sf, shift_factor=sh))
        self._setup_shapes()
        self.vae = vae
        self._freeze()
        self.source = path


# ----------------------------------------------------------------------------------------------------------
# factory functions
# ----------------------------------------------------------------------------------------------------------


def _is_saved_target(path: str) -> bool:
    p = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(p):
        return False
    with open(p) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError:
            return False
    return isinstance(meta, dict) and "format_version" in meta and "name" in meta and "config" in meta


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
    if pretrained is not None and os.path.isdir(os.path.expanduser(pretrained)) and _is_saved_target(pretrained):
        if overrides:
            raise ValueError("overrides cannot be applied to a saved target encoder; rebuild from a preset")
        enc = TargetEncoder.from_pretrained(pretrained, device=device)
        if enc.name != name:
            raise ValueError(f"{pretrained} holds a {enc.name!r} target, not {name!r}")
        return enc
    cls = TARGETS.get(name)
    presets = TARGET_PRESETS[name]
    if name == "vae" and overrides.get("kind") == "dc" and f"{preset}_dc" in presets:
        preset = f"{preset}_dc"
    if preset not in presets:
        raise KeyError(f"unknown preset {preset!r} for target {name!r}; choose one of {sorted(presets)}")
    cfg = _merge_overrides(name, presets[preset], overrides)
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


# The toy world's trained CLIP registers itself as the "toy_clip" target (its own module: it also holds a
# text tower and the contrastive loss, which no other target has).
from blip3o.models import toy_clip as _toy_clip  # noqa: E402,F401
