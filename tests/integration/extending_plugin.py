"""One new variant of each kind, registered from outside the package, as docs/extending.md shows.

Imported by the training entry point through the config's ``imports`` key::

    python -m blip3o.train configs/toy.yaml imports=[tests.integration.extending_plugin] model.target=pooled_pixels

(tests/integration/test_extending.py trains each variant two steps that way).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F

from blip3o.data.transforms import HALF
from blip3o.decoders.sdxl import SDXLFeatureDecoderPipeline, build_sdxl_decoder, sdxl_training_loss
from blip3o.decoders.spec import DECODERS, DecoderSpec
from blip3o.models.backbone import BACKBONES, BackboneAdapter
from blip3o.models.targets import TARGET_PRESETS, TARGETS, TargetEncoder
from blip3o.objectives import OBJECTIVES, MSERegression
from blip3o.prompts import CHATML


# -- backbone: a transformers family + its tiny preset (model.backbone: small_qwen3) -------------------------
class SmallQwen3(BackboneAdapter):
    def tiny_config(self, vocab_size, pad_id, eos_id, bos_id):
        return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                    tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)


BACKBONES.register("small_qwen3")(SmallQwen3(
    name="small_qwen3", template=CHATML, default_path="Qwen/Qwen3-0.6B",
    config_cls="Qwen3Config", model_cls="Qwen3ForCausalLM"))


# -- target: what the generator learns to produce (model.target: pooled_pixels) ------------------------------
@TARGETS.register("pooled_pixels")
class PooledPixelTarget(TargetEncoder):
    """Pixels average-pooled to a grid x grid map, then a fixed random 1x1 projection to `dim` channels."""

    name = "pooled_pixels"

    def __init__(self, config, device=None):
        super().__init__(config)
        c = self.config
        self.image_size, self.channels, self.grid = c["image_size"], c["dim"], (c["grid"], c["grid"])
        self.proj = nn.Conv2d(3, c["dim"], 1, device=device)
        self._freeze()

    def _weights_module(self) -> nn.Module:  # what save_pretrained / from_pretrained store
        return self.proj

    def _encode(self, pixel_values):
        return self.proj(F.adaptive_avg_pool2d(pixel_values, self.grid))


TARGET_PRESETS["pooled_pixels"] = {
    "tiny": dict(image_size=64, grid=8, dim=16, mean=list(HALF), std=list(HALF), interpolation="bicubic",
                 dtype="float32"),
}


# -- objective: its dataclass fields are its settings (model.objective: {name: scaled_mse, scale: 2.0}) -----
@OBJECTIVES.register("scaled_mse")
@dataclass
class ScaledMSE(MSERegression):
    scale: float = 1.0

    def __post_init__(self):
        if self.scale <= 0:
            raise ValueError(f"scale: must be > 0, got {self.scale}")  # -> "model.objective.scale: must be > 0..."

    def loss(self, net, x0, cond, cond_mask=None, generator=None):
        loss, parts = super().loss(net, x0, cond, cond_mask, generator)
        return self.scale * loss, {**parts, "scale": self.scale}


# -- decoder: features -> pixels (model.decoder: small_sdxl; trained with train.task=decoder) ----------------
class SmallSDXLPipeline(SDXLFeatureDecoderPipeline):
    kind = "small_sdxl"  # must equal the registered name: saved folders are recognised by it


def build_small_sdxl(preset: str = "tiny", feature_dim: Optional[int] = None, num_tokens: int = 64,
                     seed: int = 0) -> SmallSDXLPipeline:
    """The tiny SDXL decoder with a 2-step default sampler; the arguments are the spec's build_kwargs."""
    p = build_sdxl_decoder(preset, feature_dim=feature_dim, num_tokens=num_tokens, seed=seed)
    return SmallSDXLPipeline(p.unet, p.vae, p.scheduler, p.null_condition, default_num_inference_steps=2)


DECODERS.register("small_sdxl")(DecoderSpec(
    name="small_sdxl", pipeline_class=SmallSDXLPipeline, build=build_small_sdxl, training_loss=sdxl_training_loss,
    trained=("unet",), official_repo="", official_subfolder=None, target="eva_clip", feature_dim=64,
    target_encoder="none released (a test decoder)"))
