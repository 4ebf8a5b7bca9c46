"""Build a fresh model for training from a typed ModelConfig: pretrained backbone + target encoder + new
queries and DiT (``generator: blip3o``), or new projections on the backbone (transfusion / lmfusion).
``init_from`` continues a saved model instead (``blip3o.models.loading`` reads it)."""
from __future__ import annotations

import logging
import os
from typing import Tuple

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from blip3o.config import ModelConfig
from blip3o.models import targets
from blip3o.models.backbone import check_local_or_allowed, get_backbone, materialize, resolve_backbone_path
from blip3o.models.blip3o import Blip3oConfig, Blip3oForConditionalGeneration
from blip3o.models.dit import DIT_PRESETS
from blip3o.models.fusion import Blip3oFusionForConditionalGeneration, FusionConfig
from blip3o.models.hf_config import hf_config_for
from blip3o.models.loading import load_generation_model
from blip3o.prompts import (IMG_END_TOKEN, IMG_START_TOKEN, add_special_tokens, encode_generation_prompts,
                            generation_head_len, get_template)

logger = logging.getLogger(__name__)


def resolve_target_path(cfg: ModelConfig) -> str:
    if cfg.target_path:
        if cfg.target_kwargs:
            raise ValueError("model.target_kwargs: applies to building a tiny target preset, not to model.target_path "
                             f"'{cfg.target_path}' (whose architecture comes from its own config)")
        return cfg.target_path
    if cfg.target_preset == "tiny":
        kw = dict(cfg.target_kwargs)
        name = cfg.target + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
        return materialize("target", name, lambda p, s: targets.make_tiny_target(cfg.target, p, seed=s, **kw))
    raise ValueError(f"model.target_path: set a local directory with the {cfg.target} encoder weights "
                     f"(official presets cannot be downloaded here)")


def load_target(cfg: ModelConfig):
    path = resolve_target_path(cfg)
    try:
        return targets.load_target_encoder(path)
    except (FileNotFoundError, OSError, ValueError):
        # A raw weight file/dir rather than one written by TargetEncoder.save_pretrained.
        return targets.build_target_encoder(cfg.target, pretrained=path, preset=cfg.target_preset)


def dit_config_for(cfg: ModelConfig, channels: int, grid, hidden: int) -> dict:
    if cfg.dit_preset not in DIT_PRESETS:
        raise ValueError(f"model.dit_preset: '{cfg.dit_preset}' is not one of {sorted(DIT_PRESETS)}")
    d = DIT_PRESETS[cfg.dit_preset].to_dict()
    d.update(in_channels=channels, input_size=grid[0], caption_dim=hidden)
    unknown = set(cfg.dit) - set(d)
    if unknown:
        raise ValueError(f"model.dit: unknown field(s) {sorted(unknown)}; DiT fields are {sorted(d)}")
    d.update(cfg.dit)
    d["gradient_checkpointing"] = cfg.gradient_checkpointing
    return d


def embed_new_tokens_as_mean(backbone, tokenizer, new_ids) -> None:
    """Resize embeddings to the tokenizer and set new rows to the mean of the old ones (docs/decisions.md,
    "Prompts")."""
    emb = backbone.get_input_embeddings()
    old = emb.weight.shape[0]
    if old < len(tokenizer):
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = backbone.get_input_embeddings()
        with torch.no_grad():
            mean = emb.weight[: min(new_ids)].mean(0)
            for i in new_ids:
                emb.weight[i] = mean


def load_backbone(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """(adapter, resolved path, backbone, tokenizer) with our special tokens added (left padding) and their
    new embedding rows set to the mean of the old ones."""
    adapter = get_backbone(cfg.backbone)
    bpath = resolve_backbone_path(cfg.backbone, cfg.backbone_path)
    check_local_or_allowed(bpath, "model.backbone_path")
    tokenizer = AutoTokenizer.from_pretrained(bpath)
    had = set(tokenizer.get_vocab())
    ids = add_special_tokens(tokenizer)
    tokenizer.padding_side = "left"
    backbone = adapter.from_pretrained(bpath, dtype=dtype, attn_implementation=cfg.attn_implementation)
    embed_new_tokens_as_mean(backbone, tokenizer, [i for t, i in ids.items() if t not in had])
    return adapter, bpath, backbone, tokenizer


def attach_image_processor(model, bpath: str) -> None:
    if os.path.isfile(os.path.join(bpath, "preprocessor_config.json")):
        model.image_processor = AutoImageProcessor.from_pretrained(bpath)


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Tuple[Blip3oForConditionalGeneration, object]:
    if cfg.init_from:
        return _from_saved(cfg)
    if cfg.generator != "blip3o":  # transfusion / lmfusion: the backbone itself denoises latents
        return build_fusion_model(cfg, dtype)
    adapter, bpath, backbone, tokenizer = load_backbone(cfg, dtype)
    hidden = adapter.hidden_size(backbone)

    target = load_target(cfg)
    channels, grid = target.channels, list(target.grid)
    config = hf_config_for(
        Blip3oConfig, cfg, backbone_config=backbone.config.to_dict(), backbone_path=bpath,
        dit_config=dit_config_for(cfg, channels, grid, hidden), target_channels=channels, target_grid=grid,
        target_path=resolve_target_path(cfg), text_loss_weight=cfg.text_loss_weight if cfg.recipe == "joint" else 0.0,
        chat_template=adapter.template.name, img_token_id=tokenizer.convert_tokens_to_ids(IMG_START_TOKEN),
    )
    model = Blip3oForConditionalGeneration(config, backbone=backbone)
    model.tokenizer = tokenizer
    attach_image_processor(model, bpath)
    model.attach_target_encoder(target)
    return model, tokenizer


def build_fusion_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """A fresh transfusion / lmfusion model from a ModelConfig: pretrained backbone + VAE target + new
    projections (and, for lmfusion, the image expert copied from the text weights)."""
    adapter, bpath, backbone, tokenizer = load_backbone(cfg, dtype)
    target = load_target(cfg)
    template = get_template(adapter.template.name)
    uncond = encode_generation_prompts(tokenizer, [""], template, max_length=cfg.max_length, num_queries=0)
    config = hf_config_for(
        FusionConfig, cfg, backbone_config=backbone.config.to_dict(), backbone_path=bpath,
        target_channels=target.channels, target_grid=list(target.grid), target_path=resolve_target_path(cfg),
        chat_template=template.name, img_token_id=tokenizer.convert_tokens_to_ids(IMG_START_TOKEN),
        img_end_token_id=tokenizer.convert_tokens_to_ids(IMG_END_TOKEN), prompt_pad_id=tokenizer.pad_token_id,
        uncond_input_ids=uncond["input_ids"][0].tolist(), prompt_head_len=generation_head_len(tokenizer, template),
    )
    model = Blip3oFusionForConditionalGeneration(config, backbone=backbone)
    model.tokenizer = tokenizer
    attach_image_processor(model, bpath)
    model.attach_target_encoder(target)
    return model, tokenizer


def _from_saved(cfg: ModelConfig):
    """Continue from a saved model (ours, official layout, or fusion): the recipe and loss settings of the
    new config apply; architecture and weights come from the directory."""
    if not os.path.isdir(cfg.init_from):
        raise FileNotFoundError(f"model.init_from: '{cfg.init_from}' is not a directory")
    model = load_generation_model(cfg.init_from)
    if isinstance(model, Blip3oFusionForConditionalGeneration):  # continue a transfusion / lmfusion model
        model.config.cfg_dropout = cfg.cfg_dropout
        if model._target_encoder is None:
            model.target_encoder  # noqa: B018  (loads from the saved target_path)
        return model, model.tokenizer
    have = getattr(model.config, "lora_rank", 0)
    if cfg.lora_rank > 0 and have == 0:
        model.add_lora(cfg.lora_rank, cfg.lora_alpha)
    elif cfg.recipe == "joint" and cfg.lora_rank != have:
        raise ValueError(f"model.lora_rank: {cfg.init_from} was trained with LoRA rank {have}; continue it with "
                         f"model.lora_rank={have}")
    model.config.recipe = cfg.recipe
    model.config.cfg_dropout = cfg.cfg_dropout
    model.config.text_loss_weight = cfg.text_loss_weight if cfg.recipe == "joint" else 0.0
    model.apply_recipe()
    if model._target_encoder is None:
        try:
            model.target_encoder  # noqa: B018  (loads from the saved target_path)
        except (RuntimeError, FileNotFoundError, OSError, ValueError):
            model.attach_target_encoder(load_target(cfg))
    if model.tokenizer is None:
        raise FileNotFoundError(f"model.init_from: no tokenizer files in {cfg.init_from}")
    return model, model.tokenizer
