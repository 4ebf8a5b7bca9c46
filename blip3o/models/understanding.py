"""Image understanding (image + question -> text) through the backbone's own chat and ``generate``.

BLIP3-o leaves understanding to the frozen backbone, so this is deliberately thin: build the
backbone's chat prompt with its image placeholders, run its image processor, call its generate.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from PIL import Image
from transformers import AutoImageProcessor

from blip3o.prompts import get_template, left_pad


def load_image_processor(model, processor=None):
    if processor is not None:
        return processor
    if getattr(model, "image_processor", None) is not None:
        return model.image_processor
    src = model._source_dir or model.config.backbone_path
    if src is None:
        raise ValueError("no image processor: pass processor= or load the model from a directory that has one")
    return AutoImageProcessor.from_pretrained(src)


def build_understanding_inputs(model, images: Sequence[Image.Image], questions: Sequence[str], processor=None):
    """Left-padded chat inputs with ``<|vision_start|><|image_pad|>*n<|vision_end|>`` per image."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions")
    if not model.adapter.multimodal:
        raise ValueError(f"backbone '{model.config.backbone}' has no vision tower; understanding needs qwen2_5_vl")
    tok = model.tokenizer
    ip = load_image_processor(model, processor)
    tpl = get_template(model.config.chat_template)
    vis = ip(images=[im.convert("RGB") for im in images], return_tensors="pt")
    merge = getattr(ip, "merge_size", 2)
    seqs = []
    for grid, q in zip(vis["image_grid_thw"], questions):
        n = int(grid.prod()) // (merge * merge)
        user = tpl.vision_start + tpl.image_pad * n + tpl.vision_end + q
        seqs.append(tok(tpl.render(user), add_special_tokens=False)["input_ids"])
    enc = left_pad(seqs, tok.pad_token_id)
    enc["pixel_values"] = vis["pixel_values"]
    enc["image_grid_thw"] = vis["image_grid_thw"]
    return enc


@torch.no_grad()
def answer(model, images, questions, processor=None, max_new_tokens: int = 64, do_sample: bool = False) -> List[str]:
    enc = build_understanding_inputs(model, images, questions, processor)
    dev = model.latent_queries.device
    enc = {k: v.to(dev) for k, v in enc.items()}
    out = model.backbone.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  pad_token_id=model.tokenizer.pad_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    return [t.strip() for t in model.tokenizer.batch_decode(new, skip_special_tokens=True)]
