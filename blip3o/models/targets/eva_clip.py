"""EVA-CLIP-E-14-plus target (BLIP3-o's own): timm ``Eva`` as the BLIP3-o EVA tower, and the mapping from
EVA-CLIP-repo checkpoints to it.

The tower: post-norm blocks, fused qkv with q/v bias, GELU MLP, learned absolute pos-embed incl. CLS, no RoPE,
no final norm. x0 = raw output of the last block, CLS dropped, avg-pooled by ``pool`` (448 px: 32x32 tokens ->
8x8). Shape vocabulary: ``blip3o/models/targets/base.py``.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from timm.models.eva import Eva

from blip3o.models.targets.base import TARGETS, TargetEncoder, load_state_file, resolve_pretrained, torch_dtype


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
            dtype=torch_dtype(c["dtype"]),
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
        raw = load_state_file(path)
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
        path, local = resolve_pretrained(pretrained, allow_download)
        if not local:
            path = snapshot_download(path, allow_patterns=["*.safetensors", "*.bin", "*.json", "*.pt", "*.pth"])
        self.load_eva_clip_weights(path)


