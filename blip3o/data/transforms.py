"""Image transforms for the generation targets, in PIL + numpy (no torchvision needed on CPU machines).

The target encoder owns its transform (``target.transform``); these are the building blocks and the
reference presets:

* ``eva_clip``: resize the shorter side to 448 (bicubic), centre-crop 448, OpenAI CLIP mean/std
  (BLIP3-o's ``EvaClipImageTrainProcessor``).
* ``siglip``: resize to a square (bicubic, no crop), mean = std = 0.5 (transformers' ``SiglipImageProcessor``).
* ``vae``: resize the shorter side (bilinear), centre-crop, scale to [-1, 1] (diffusers' training examples).

All transforms are picklable classes, so DataLoader workers can receive them under any start method.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS}


def resize_shorter(img: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return img.resize((nw, nh), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def normalize(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> (x / 255 - mean) / std as float32 (3, H, W), in one fused numpy pass.

    numpy rather than torch on purpose: this runs per sample in data workers (and in the main process with
    num_workers=0), where torch's intra-op threads only add scheduling overhead for tensors this small.
    """
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3), a fresh array
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32)))
    offset = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    arr *= scale
    arr -= offset
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class ImageTransform:
    """RGB convert -> resize (shorter side + centre crop, or straight to a square) -> tensor -> normalise."""

    def __init__(self, size: int, mean: Sequence[float] = HALF, std: Sequence[float] = HALF,
                 crop: bool = True, resample: str = "bicubic"):
        if resample not in _RESAMPLE:
            raise ValueError(f"unknown resample '{resample}'; choose one of {sorted(_RESAMPLE)}")
        self.size, self.crop, self.resample = int(size), crop, resample
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        rs = _RESAMPLE[self.resample]
        if self.crop:
            img = center_crop(resize_shorter(img, self.size, rs), self.size)
        elif img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), rs)
        return normalize(img, self.mean, self.std)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, crop={self.crop}, resample={self.resample})"


def eva_clip_transform(size: int = 448) -> ImageTransform:
    return ImageTransform(size, CLIP_MEAN, CLIP_STD, crop=True, resample="bicubic")


def clip_transform(size: int = 224) -> ImageTransform:
    return ImageTransform(size, CLIP_MEAN, CLIP_STD, crop=True, resample="bicubic")


def siglip_transform(size: int = 384) -> ImageTransform:
    return ImageTransform(size, HALF, HALF, crop=False, resample="bicubic")


def vae_transform(size: int = 256) -> ImageTransform:
    return ImageTransform(size, HALF, HALF, crop=True, resample="bilinear")


TRANSFORMS: Dict[str, Callable[..., ImageTransform]] = {
    "eva_clip": eva_clip_transform, "clip": clip_transform, "siglip": siglip_transform, "vae": vae_transform,
}


def build_image_transform(name: str, size: Optional[int] = None) -> ImageTransform:
    if name not in TRANSFORMS:
        raise KeyError(f"unknown image transform '{name}'; choose one of {sorted(TRANSFORMS)}")
    return TRANSFORMS[name]() if size is None else TRANSFORMS[name](size)


class SquareImage:
    """Resize + centre-crop to a fixed square, kept as PIL: understanding images, whose pixel processing
    belongs to the backbone's own processor, but whose token count must be fixed when the text is built."""

    def __init__(self, size: int = 448):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        return center_crop(resize_shorter(img.convert("RGB"), self.size), self.size)
