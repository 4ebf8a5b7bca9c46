"""Build a fresh model for training from a typed ModelConfig: pretrained backbone + target encoder
+ new queries and DiT. (Loading a saved model is ``Blip3oForConditionalGeneration.from_pretrained``.)"""
from __future__ import annotations

import logging
import os
from typing import Tuple

import torch

from blip3o.config import ModelConfig
from blip3o.models.backbone import check_local_or_allowed, get_backbone, materialize, resolve_backbone_path
from blip3o.models.blip3o import Blip3oConfig, Blip3oForConditionalGeneration
from blip3o.prompts import IMG_START_TOKEN, add_special_tokens

logger = logging.getLogger(__name__)


def resolve_target_path(cfg: ModelConfig) -> str:
    from blip3o.models import targets

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
    from blip3o.models.targets import build_target_encoder, load_target_encoder

    path = resolve_target_path(cfg)
    try:
        return load_target_encoder(path)
    except (FileNotFoundError, OSError, ValueError):
        # A raw weight file/dir rather than one written by TargetEncoder.save_pretrained.
        return build_target_encoder(cfg.target, pretrained=path, preset=cfg.target_preset)


def dit_config_for(cfg: ModelConfig, channels: int, grid, hidden: int) -> dict:
    from blip3o.models.dit import DIT_PRESETS

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


def objective_kwargs_for(cfg: ModelConfig) -> dict:
    return dict(time_sampling=cfg.time_sampling, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                shift=cfg.time_shift, sample_timesteps=cfg.sample_timesteps)


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
    from transformers import AutoTokenizer

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
        from transformers import AutoImageProcessor

        model.image_processor = AutoImageProcessor.from_pretrained(bpath)


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Tuple[Blip3oForConditionalGeneration, object]:
    if cfg.init_from:
        return _from_saved(cfg)
    if cfg.generator != "blip3o":  # transfusion / lmfusion: the backbone itself denoises latents
        from blip3o.models.fusion import build_fusion_model

        return build_fusion_model(cfg, dtype)
    adapter, bpath, backbone, tokenizer = load_backbone(cfg, dtype)
    hidden = adapter.hidden_size(backbone)

    target = load_target(cfg)
    channels, grid = target.channels, list(target.grid)
    objective_kwargs = objective_kwargs_for(cfg)
    config = Blip3oConfig(
        backbone=cfg.backbone, backbone_config=backbone.config.to_dict(), backbone_path=bpath, recipe=cfg.recipe,
        num_queries=cfg.num_queries, dit_config=dit_config_for(cfg, channels, grid, hidden), target=cfg.target,
        target_channels=channels, target_grid=grid, target_path=resolve_target_path(cfg),
        target_norm=cfg.target_norm, objective=cfg.objective, objective_kwargs=objective_kwargs,
        cfg_dropout=cfg.cfg_dropout, text_loss_weight=cfg.text_loss_weight if cfg.recipe == "joint" else 0.0,
        decoder=cfg.decoder, decoder_path=cfg.decoder_path, num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale, max_prompt_length=cfg.max_length,
        inference_max_length=cfg.inference_max_length, chat_template=adapter.template.name,
        img_token_id=tokenizer.convert_tokens_to_ids(IMG_START_TOKEN),
        attn_implementation_backbone=cfg.attn_implementation,
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
    )
    model = Blip3oForConditionalGeneration(config, backbone=backbone)
    model.tokenizer = tokenizer
    attach_image_processor(model, bpath)
    model.attach_target_encoder(target)
    return model, tokenizer


def _from_saved(cfg: ModelConfig):
    """Continue from a saved model (ours or official layout): the recipe and loss settings of the new
    config apply; architecture and weights come from the directory."""
    import os

    if not os.path.isdir(cfg.init_from):
        raise FileNotFoundError(f"model.init_from: '{cfg.init_from}' is not a directory")
    from blip3o.models.fusion import Blip3oFusionForConditionalGeneration, is_fusion_checkpoint

    if is_fusion_checkpoint(cfg.init_from):  # continue a transfusion / lmfusion model
        model = Blip3oFusionForConditionalGeneration.from_pretrained(cfg.init_from)
        model.config.cfg_dropout = cfg.cfg_dropout
        if model._target_encoder is None:
            model.target_encoder  # noqa: B018  (loads from the saved target_path)
        return model, model.tokenizer
    model = Blip3oForConditionalGeneration.from_pretrained(cfg.init_from)
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
