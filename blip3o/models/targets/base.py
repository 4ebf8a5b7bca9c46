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

Variants, one module each (``TARGET_PRESETS[name]`` in ``presets.py`` holds an ``official`` and a ``tiny``
config for each): ``eva_clip`` (BLIP3-o's EVA-CLIP-E-14-plus, timm ``Eva``), ``siglip`` (transformers SigLIP /
SigLIP2), ``vae`` (diffusers AutoencoderKL / AutoencoderDC latents; the one that decodes to pixels),
``toy_clip`` (the toy world's trained CLIP). This module holds what they share: the ``TargetEncoder``
interface and its capabilities, the ``TARGETS`` registry, preprocessing, identity and save/load.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

import blip3o  # noqa: F401  (installs the torchvision shim before timm/transformers/diffusers import)
from blip3o.data.transforms import ImageTransform
from blip3o.registry import Registry

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

TARGETS: Registry = Registry("target encoder")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def canonical(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """JSON round trip: tuples -> lists etc., so a config hashes the same before and after save/load."""
    return json.loads(json.dumps(cfg, sort_keys=True))


def _config_hash(cfg: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]



def _is_hub_id(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s))


def resolve_pretrained(pretrained: str, allow_download: bool) -> Tuple[str, bool]:
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


def load_state_file(path: str) -> Dict[str, torch.Tensor]:
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
                        sd.update(load_state_file(h))
                    return sd
                return load_state_file(hits[0])
        raise FileNotFoundError(f"no weights file (*.safetensors, *.bin, *.pt, *.pth) in {path}")
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for s in shards:
            sd.update(load_state_file(os.path.join(os.path.dirname(path), s)))
        return sd
    if path.endswith(".safetensors"):
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



def is_saved_target(path: str) -> bool:
    p = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(p):
        return False
    with open(p) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError:
            return False
    return isinstance(meta, dict) and "format_version" in meta and "name" in meta and "config" in meta



# ----------------------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------------------


class TargetEncoder(nn.Module):
    """A frozen image encoder producing the generator's x0 (B, channels, *grid).

    Subclasses set ``name`` (the registry key), build their network from ``config`` in ``__init__`` and
    implement ``_encode`` (normalised pixels -> x0 in any dtype).
    """

    name: str = ""
    # --- capabilities: what code outside asks the registered class instead of comparing names ---
    decodes_to_pixels: bool = False  # has ``decode(x0) -> pixels`` of its own (no diffusion decoder needed)
    nested_key: Optional[str] = None  # config key holding the wrapped library's own config (overrides go there)

    @classmethod
    def nested_fields(cls, config: Dict[str, Any]) -> set:
        """Field names the nested library config accepts (routes ``build_target_encoder`` overrides)."""
        return set()

    @classmethod
    def preset_name(cls, preset: str, overrides: Dict[str, Any], presets: Dict[str, Any]) -> str:
        """The preset that ``preset`` + ``overrides`` select (a variant of the class may need another one)."""
        return preset

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        self.config: Dict[str, Any] = canonical(config)
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
        return torch_dtype(self.config["dtype"])

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
        """PIL image (any mode) -> (3, S, S) float32, the encoder's own preprocessing: shorter side to S,
        centre crop, (x / 255 - mean) / std (``blip3o.data.transforms.ImageTransform``)."""
        interpolation = self.config.get("interpolation", "bicubic")
        return ImageTransform(self.image_size, self.mean, self.std, crop=True, resample=interpolation)(image)

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

