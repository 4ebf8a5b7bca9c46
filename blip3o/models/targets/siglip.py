"""SigLIP / SigLIP2 target: a hidden state (``select_layer``, the penultimate by default), adaptive-avg-pooled
to ``grid``.

transformers ``SiglipVisionModel`` (``arch="siglip"``: the fixed-resolution SigLIP/SigLIP2 checkpoints such as
google/siglip2-so400m-patch16-512) or ``Siglip2VisionModel`` (``arch="siglip2"``: NaFlex checkpoints, fed a
full fixed grid). Shape vocabulary: ``blip3o/models/targets/base.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel

from blip3o.models.targets.base import TARGETS, TargetEncoder, canonical, resolve_pretrained, torch_dtype

_ARCHS = {"siglip": (SiglipVisionConfig, SiglipVisionModel), "siglip2": (Siglip2VisionConfig, Siglip2VisionModel)}
_SIGLIP_KEEP = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps", "num_patches",
)


@TARGETS.register("siglip")
class SiglipTarget(TargetEncoder):
    """SigLIP / SigLIP2 penultimate-layer features, adaptive-avg-pooled to ``grid``."""

    name = "siglip"
    nested_key = "vision_config"

    def __init__(self, config: Dict[str, Any], device: Union[str, torch.device, None] = None):
        super().__init__(config)
        self._setup_shapes()
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.model = self._new_model(self.config, dtype=torch_dtype(self.config["dtype"]))
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
        return _ARCHS["siglip" if arch == "siglip" else "siglip2"]  # a bad arch is reported by _setup_shapes

    @classmethod
    def nested_fields(cls, config: Dict[str, Any]) -> set:
        return {f.name for f in dataclasses.fields(cls._classes(config["arch"])[0])} | {"image_size"}

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
        path, _local = resolve_pretrained(pretrained, allow_download)
        _cfg_cls, model_cls = self._classes(self.config["arch"])
        model = model_cls.from_pretrained(
            path, dtype=self.dtype, attn_implementation="sdpa", vision_use_head=False,
        )
        vc = {k: v for k, v in model.config.to_dict().items() if k in _SIGLIP_KEEP}
        if self.config["arch"] == "siglip2":
            vc["image_size"] = self.config["vision_config"]["image_size"]
        # the checkpoint's own architecture wins over the preset's
        self.config = canonical(dict(self.config, vision_config=vc))
        self._setup_shapes()
        self.model = model
        self._truncate()
        self._freeze()
        self.source = path


# ----------------------------------------------------------------------------------------------------------
