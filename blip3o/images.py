"""Image utilities shared by training, inference, evaluation and the scripts: tensors to PIL, grids, and a
picture of feature maps for runs without a pixel decoder.

    images = to_pil(pixels)                       # (B, 3, H, W) in [-1, 1] -> list of RGB PIL images
    make_grid(images, cols=4).save("grid.png")    # tiles left to right, top to bottom, on white
    feature_summary_image(feats).save("pca.png")  # (B, C, h, w) features -> first 3 principal components as RGB
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from PIL import Image


def to_pil(pixels: torch.Tensor) -> List[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images (rounded to the nearest level, out-of-range values clipped)."""
    arr = ((pixels.detach().float() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def make_grid(images: Sequence[Image.Image], cols: Optional[int] = None) -> Image.Image:
    """Tiles of the first image's size, `cols` per row (default: up to 4), row-major, on a white canvas."""
    n = len(images)
    cols = cols or min(n, 4)
    rows = (n + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def feature_summary_image(x: torch.Tensor, cell: int = 8) -> Image.Image:
    """Without a pixel decoder, a sample grid shows each feature map's first three principal
    components as RGB (one tile per sample), enough to see collapse or mode structure."""
    b, c, h, w = x.shape
    flat = x.float().permute(0, 2, 3, 1).reshape(-1, c)
    flat = flat - flat.mean(0)
    _, _, v = torch.pca_lowrank(flat, q=min(3, c), center=False)
    proj = (flat @ v[:, :3]).reshape(b, h, w, -1)
    lo, hi = proj.amin(dim=(0, 1, 2)), proj.amax(dim=(0, 1, 2))
    proj = ((proj - lo) / (hi - lo + 1e-6) * 255).byte()
    if proj.shape[-1] < 3:
        proj = torch.cat([proj, proj[..., :1].expand(-1, -1, -1, 3 - proj.shape[-1])], -1)
    tiles = [Image.fromarray(p.numpy()).resize((w * cell, h * cell), Image.NEAREST) for p in proj]
    return make_grid(tiles)
