"""Building blocks of the fusion generators (``blip3o/models/fusion.py``): latent patches, the timestep
embedding, the block-causal attention mask, rotary application and the text/image routing of LMFusion."""
from __future__ import annotations

import math

import torch
from torch import nn

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/p)(w/p), C p p), patches in raster order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, C p p) -> (B, C, h, w)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps on the 0..1000 scale -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def fusion_attention_mask(attention_mask: torch.Tensor, image_block_ids: torch.Tensor) -> torch.Tensor:
    """Block-causal mask for text + image sequences: (B, 1, S, S) bool, True = may attend.

    ``attention_mask`` (B, S): 1 for real tokens, 0 for padding. ``image_block_ids`` (S,) or (B, S): 0 for
    text, k >= 1 for the tokens of the k-th image. Query i sees key j when j is a real token and either
    j <= i (causal) or i and j lie in the same image (bidirectional inside an image). Every position also
    sees itself, so fully padded rows stay finite (their outputs are never used).
    """
    b, s = attention_mask.shape
    blk = image_block_ids.to(attention_mask.device)
    if blk.dim() == 1:
        blk = blk.unsqueeze(0).expand(b, s)
    idx = torch.arange(s, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]  # (S_q, S_k)
    same_image = (blk[:, :, None] == blk[:, None, :]) & (blk[:, :, None] > 0)
    allowed = (causal[None] | same_image) & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(s, dtype=torch.bool, device=attention_mask.device)[None]
    return allowed[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, D): broadcast over heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _route(split, x: torch.Tensor, f_text, f_image) -> torch.Tensor:
    """Applies f_text to the text tokens and f_image to the image tokens of x (dim 1); split is None when
    every token uses f_text, else (text index, image index, inverse permutation), shared by the batch."""
    if split is None:
        return f_text(x)
    ti, ii, inv = split
    return torch.cat([f_text(x[:, ti]), f_image(x[:, ii])], dim=1)[:, inv]


# ----------------------------------------------------------------------------------------------------------
# config + model
# ----------------------------------------------------------------------------------------------------------
