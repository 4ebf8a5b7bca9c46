"""Lumina-Next style cross-attention diffusion transformer ("NextDiTCrossAttn") used as the BLIP3-o flow head.

The module predicts a flow-matching velocity for a grid of CLIP features, conditioned on LLM hidden states.
Parameter names and shapes match the official release exactly: ``NextDiT(DiTConfig()).state_dict()`` has the
642 keys found under ``model.dit.model.`` in the BLIP3o-Model-4B/-8B checkpoints, so those tensors load with the
prefix stripped (``caption_dim`` 2048 for 4B, 3584 for 8B).

Shape vocabulary
----------------
    B      batch size
    C      input/output channels of the feature grid (official: 1792, EVA-CLIP width)
    H, W   spatial size of the feature grid (official: 8 x 8)
    p      patch size (official: 1); Ht = H // p, Wt = W // p
    N      number of image tokens, Ht * Wt, row-major (h, w)
    L      number of conditioning tokens (official: 64 learnable-query hidden states)
    Hc     conditioning (LLM) width, ``caption_dim`` (2048 / 3584)
    D      transformer width, ``dim`` (official: 1792)
    T      adaLN conditioning width, ``time_dim`` = min(D, 1024) unless overridden
    nh     query heads; nkv key/value heads; hd = D // nh head width (official: 28, 28, 64)
    F      SwiGLU inner width: multiple_of-ceil(int(8 D / 3)) (official: 4864)

Conventions
-----------
* ``timestep`` is on the 0..1000 scale with 1000 = pure noise (BLIP3-o passes the scheduler's ``t`` directly,
  NOT Lumina's ``1 - t / 1000``). It goes straight into a 256-channel sinusoidal embedding (cos first, shift 0).
* Patchify follows Lumina: the input patch vector is ordered (C, ph, pw), the output patch vector (ph, pw, C).
  With p = 1 (official) both are just C.
* 2-D RoPE is diffusers' ``get_2d_rotary_pos_embed_lumina(hd, 384, 384)`` restricted to the token grid. Its
  frequencies do not depend on the table size, so it is built directly at (Ht, Wt), kept as a per-device cache
  (never in the state dict) and applied in real arithmetic (same maths as the complex product, in fp32).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# blip3o/__init__ (which installs the torchvision shim) always runs before this submodule imports diffusers.
from diffusers.models.embeddings import (
    LuminaCombinedTimestepCaptionEmbedding,
    PixArtAlphaTextProjection,
    get_2d_rotary_pos_embed_lumina,
)
from diffusers.models.normalization import LuminaLayerNormContinuous, RMSNorm

__all__ = ["DiTConfig", "NextDiT", "DIT_PRESETS", "build_dit", "ROPE_MAX_LEN"]

# Lumina builds its RoPE table for a 384 x 384 token grid; larger grids have no official positions.
ROPE_MAX_LEN = 384


@dataclass
class DiTConfig:
    """Sizes of a :class:`NextDiT`. The defaults are the official BLIP3-o DiT (4B variant, LLM width 2048)."""

    input_size: int = 8  # nominal grid side (H = W); forward accepts any multiple of patch_size up to 384 * p
    patch_size: int = 1
    in_channels: int = 1792
    dim: int = 1792
    n_layers: int = 24
    n_heads: int = 28
    n_kv_heads: int = 28
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    qk_norm: bool = True
    caption_dim: int = 2048  # width of the conditioning tokens (LLM hidden size)
    time_embed_dim: int | None = None  # None -> min(dim, 1024), as hard-coded in Lumina
    # Initial value of the per-head cross-attention gates (the output is scaled by tanh(gate)). Lumina-Next's 0
    # starts every block as pure self-attention, which suits long runs from a pretrained DiT; a run of a few
    # thousand steps from scratch spends them opening the gates (Adam moves a gate by ~lr per step).
    cross_attn_gate_init: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 4:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be divisible by 4 for 2-D RoPE")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.patch_size < 1 or self.input_size % self.patch_size:
            raise ValueError(f"input_size ({self.input_size}) must be a multiple of patch_size ({self.patch_size})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def time_dim(self) -> int:
        return self.time_embed_dim if self.time_embed_dim is not None else min(self.dim, 1024)

    @property
    def ffn_inner_dim(self) -> int:
        # Lumina-Next (diffusers <= 0.32): int(2/3 * 4D), optional multiplier, then round up to multiple_of.
        inner = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            inner = int(self.ffn_dim_multiplier * inner)
        return self.multiple_of * math.ceil(inner / self.multiple_of)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig keys: {unknown}")
        return cls(**dict(d))


# ----------------------------------------------------------------------------------------------------------------
# Building blocks that diffusers does not provide in a reusable/version-stable form
# ----------------------------------------------------------------------------------------------------------------


class _TimestepCaptionEmbedding(LuminaCombinedTimestepCaptionEmbedding):
    """diffusers' Lumina time + pooled-caption embedding (same parameters and maths), with a safe masked mean.

    The only change: the token count in the masked mean is clamped to >= 1, so a sample whose mask is all zeros
    yields LN(0)-based features instead of NaN. For any mask with at least one valid token it is identical.
    """

    def forward(self, timestep: torch.Tensor, caption_feat: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        time_embed = self.timestep_embedder(self.time_proj(timestep).to(dtype=caption_feat.dtype))  # (B, T)
        m = caption_mask.float().unsqueeze(-1)  # (B, L, 1)
        pooled = (caption_feat * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, D)
        return time_embed + self.caption_embedder(pooled.to(caption_feat))


class _RMSNormZero(nn.Module):
    """Lumina adaLN: RMSNorm(x) * (1 + scale_msa), plus gate_msa, scale_mlp, gate_mlp from SiLU -> Linear(temb).

    Same names/maths as diffusers' ``LuminaRMSNormZero``, which hard-codes the conditioning width to
    min(dim, 1024); here it is a parameter so ``time_embed_dim`` can be configured.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(cond_dim, 4 * dim, bias=True)
        self.norm = RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.linear(self.silu(temb)).chunk(4, dim=1)  # 4 x (B, D)
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


class _SwiGLU(nn.Module):
    """linear_2(silu(linear_1 x) * linear_3 x), no biases; SiLU in fp32 like diffusers' ``FP32SiLU``.

    Written here because diffusers >= 0.33 changed ``LuminaFeedForward``'s width rule (issue #29/#93 upstream).
    """

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, inner_dim, bias=False)
        self.linear_2 = nn.Linear(inner_dim, dim, bias=False)
        self.linear_3 = nn.Linear(dim, inner_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_1(x)
        return self.linear_2(F.silu(h.float()).to(h.dtype) * self.linear_3(x))


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of x (B, nh, N, hd) by per-token angles.

    ``cos`` is cos(angle) repeated per pair and ``sin`` is (-sin, +sin) per pair, both fp32 (N, hd). This equals
    diffusers' ``apply_rotary_emb(x, freqs_cis, use_real=False)`` (complex product in fp32, cast back) without
    complex tensors, which some compilers/sharding wrappers handle poorly, and with fewer kernels.
    """
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    swapped = torch.stack((pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (xf * cos + swapped * sin).type_as(x)


class _Attention(nn.Module):
    """Projections of one Lumina attention: to_q/to_k/to_v (no bias) + LayerNorm across heads on q and k.

    ``attn1`` (self) has no output projection: the official block sums the self- and gated cross-attention
    outputs and sends the sum through ``attn2.to_out.0`` only (``with_out=True`` for attn2).
    """

    def __init__(self, dim: int, kv_in_dim: int, n_heads: int, n_kv_heads: int, qk_norm: bool, with_out: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.to_q = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.to_k = nn.Linear(kv_in_dim, n_kv_heads * self.head_dim, bias=False)
        self.to_v = nn.Linear(kv_in_dim, n_kv_heads * self.head_dim, bias=False)
        # diffusers' Attention uses eps=1e-5 here regardless of the model's norm_eps.
        self.norm_q = nn.LayerNorm(n_heads * self.head_dim, eps=1e-5) if qk_norm else None
        self.norm_k = nn.LayerNorm(n_kv_heads * self.head_dim, eps=1e-5) if qk_norm else None
        if with_out:
            self.to_out = nn.ModuleList([nn.Linear(n_heads * self.head_dim, dim, bias=False), nn.Dropout(0.0)])

    def attend(
        self,
        x: torch.Tensor,
        ctx: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        rope_k: bool,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x (B, N, D) queries, ctx (B, S, D') keys/values -> (B, nh, N, hd). Default scale 1/sqrt(hd)."""
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q = q.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)  # (B, nh, N, hd)
        k = k.unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, nkv, S, hd)
        v = v.unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        q = _apply_rope(q, *rope)
        if rope_k:
            k = _apply_rope(k, *rope)
        if self.n_kv_heads != self.n_heads:
            # Lumina repeats each kv head n_rep times consecutively (== repeat_interleave).
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class NextDiTBlock(nn.Module):
    """One Lumina-Next block with joint self + gated cross attention (official ``LuminaNextDiTBlock``)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        # Per-head cross-attention gate; at the default tanh(0) = 0 the block starts as pure self-attention.
        self.gate = nn.Parameter(torch.full((cfg.n_heads,), float(cfg.cross_attn_gate_init)))
        self.attn1 = _Attention(d, d, cfg.n_heads, cfg.n_kv_heads, cfg.qk_norm, with_out=False)
        self.attn2 = _Attention(d, d, cfg.n_heads, cfg.n_kv_heads, cfg.qk_norm, with_out=True)
        self.feed_forward = _SwiGLU(d, cfg.ffn_inner_dim)
        self.norm1 = _RMSNormZero(d, cfg.time_dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(d, eps=cfg.norm_eps)
        self.norm2 = RMSNorm(d, eps=cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(d, eps=cfg.norm_eps)
        self.norm1_context = RMSNorm(d, eps=cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # (B, N, D)
        ctx: torch.Tensor,  # (B, L, D) projected conditioning
        ctx_mask: torch.Tensor | None,  # (B, 1, 1, L) bool or None
        temb: torch.Tensor,  # (B, T)
        rope: tuple[torch.Tensor, torch.Tensor],  # 2 x (N, hd)
    ) -> torch.Tensor:
        h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
        self_out = self.attn1.attend(h, h, rope, rope_k=True, attn_mask=None)  # (B, nh, N, hd)
        # Queries carry RoPE, conditioning keys do not (they have no spatial position).
        cross_out = self.attn2.attend(h, self.norm1_context(ctx), rope, rope_k=False, attn_mask=ctx_mask)
        mixed = self_out + cross_out * self.gate.tanh().view(1, -1, 1, 1).to(cross_out.dtype)
        out = self.attn2.to_out[0](mixed.transpose(1, 2).flatten(2))  # (B, N, D)
        x = x + gate_msa.unsqueeze(1).tanh() * self.norm2(out)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1)))
        return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(ffn)


class NextDiT(nn.Module):
    """Velocity predictor: (x_t (B, C, H, W), t (B,), cond (B, L, Hc)) -> v (B, C, H, W).

    State-dict keys equal the official ``model.dit.model.*`` suffixes (see module docstring).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = cfg.gradient_checkpointing
        d, p = cfg.dim, cfg.patch_size
        self.caption_projection = PixArtAlphaTextProjection(cfg.caption_dim, d, act_fn="gelu_tanh")
        self.patch_embedder = nn.Module()
        self.patch_embedder.proj = nn.Linear(p * p * cfg.in_channels, d, bias=True)
        self.time_caption_embed = _TimestepCaptionEmbedding(
            hidden_size=cfg.time_dim, cross_attention_dim=d, frequency_embedding_size=256
        )
        self.layers = nn.ModuleList([NextDiTBlock(cfg) for _ in range(cfg.n_layers)])
        self.norm_out = LuminaLayerNormContinuous(
            embedding_dim=d,
            conditioning_embedding_dim=cfg.time_dim,
            elementwise_affine=False,
            eps=1e-6,
            bias=True,
            out_dim=p * p * cfg.in_channels,
        )
        # (device, Ht, Wt) -> (cos, sin), fp32 (N, hd) as _apply_rope wants them. Plain attribute: never saved,
        # rebuilt per device.
        self._rope_cache: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    # Outside torch.compile's graph (train.compile): traced, the cache lookup is guarded on the dict's contents, so
    # the first step (which fills it) and the second would compile the DiT twice.
    @torch.compiler.disable
    def _rope(self, ht: int, wt: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), ht, wt)
        if key not in self._rope_cache:
            if ht > ROPE_MAX_LEN or wt > ROPE_MAX_LEN:
                raise ValueError(f"token grid {ht}x{wt} exceeds the {ROPE_MAX_LEN}x{ROPE_MAX_LEN} RoPE table")
            # A table first built under inference_mode must stay usable by later autograd passes.
            with torch.inference_mode(False), torch.no_grad():
                # Equal to get_2d_rotary_pos_embed_lumina(hd, 384, 384)[:ht, :wt] (complex64, (N, hd/2)).
                freqs = get_2d_rotary_pos_embed_lumina(self.cfg.head_dim, ht, wt).flatten(0, 1)
                cos = freqs.real.float().repeat_interleave(2, dim=-1)
                sin = torch.stack((-freqs.imag.float(), freqs.imag.float()), dim=-1).flatten(-2)
                self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        x: (B, C, H, W) noisy latents; timestep: (B,) or scalar on the 0..1000 scale (1000 = noise);
        encoder_hidden_states: (B, L, Hc); encoder_attention_mask: (B, L), nonzero = valid (default all valid).
        Returns the prediction, (B, C, H, W), in x's dtype.
        """
        b, c, hh, ww = x.shape
        p = self.cfg.patch_size
        if hh % p or ww % p:
            raise ValueError(f"spatial size {hh}x{ww} is not divisible by patch_size {p}")
        ht, wt = hh // p, ww // p

        # Patchify: (B, C, H, W) -> (B, N, C*p*p), patch vector ordered (C, ph, pw) as in LuminaPatchEmbed.
        tokens = x.reshape(b, c, ht, p, wt, p).permute(0, 2, 4, 1, 3, 5).reshape(b, ht * wt, c * p * p)
        h = self.patch_embedder.proj(tokens)  # (B, N, D)

        ctx = self.caption_projection(encoder_hidden_states)  # (B, L, D)
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        if encoder_attention_mask is None:
            temb = self.time_caption_embed(timestep, ctx, ctx.new_ones(ctx.shape[:2]))
            ctx_mask = None  # all keys valid: no mask lets SDPA pick its fastest kernel
        else:
            temb = self.time_caption_embed(timestep, ctx, encoder_attention_mask)
            ctx_mask = encoder_attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)

        rope = self._rope(ht, wt, x.device)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                h = torch.utils.checkpoint.checkpoint(layer, h, ctx, ctx_mask, temb, rope, use_reentrant=False)
            else:
                h = layer(h, ctx, ctx_mask, temb, rope)

        h = self.norm_out(h, temb)  # (B, N, p*p*C)
        # Unpatchify: patch vector ordered (ph, pw, C), as in LuminaNextDiT2DModel.
        out = h.view(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hh, ww)
        return out.to(x.dtype)


DIT_PRESETS: dict[str, DiTConfig] = {
    # BLIP3o-4B head (Qwen2.5-VL-3B, hidden 2048): 642 tensors, 1,362,257,824 parameters.
    "official": DiTConfig(),
    # BLIP3o-8B head (Qwen2.5-VL-7B, hidden 3584): 1,365,010,336 parameters.
    "official_8b": DiTConfig(caption_dim=3584),
    # CPU-scale experiments.
    "small": DiTConfig(
        input_size=8, in_channels=64, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, multiple_of=64, caption_dim=256
    ),
    # Unit tests / smoke runs.
    "tiny": DiTConfig(
        input_size=8, in_channels=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=16, caption_dim=64
    ),
}


def build_dit(preset_or_dict: str | Mapping[str, Any] | DiTConfig = "official", **overrides: Any) -> NextDiT:
    """Build a :class:`NextDiT` from a preset name, a config dict or a :class:`DiTConfig`, with field overrides."""
    if isinstance(preset_or_dict, str):
        if preset_or_dict not in DIT_PRESETS:
            raise KeyError(f"unknown DiT preset {preset_or_dict!r}; choose from {sorted(DIT_PRESETS)}")
        base = DIT_PRESETS[preset_or_dict].to_dict()
    elif isinstance(preset_or_dict, DiTConfig):
        base = preset_or_dict.to_dict()
    else:
        base = dict(preset_or_dict)
    base.update(overrides)
    return NextDiT(DiTConfig.from_dict(base))
