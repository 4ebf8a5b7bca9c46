"""Writes a directory laid out like the official BLIP3o-Model-4B release (docs/decisions.md, "Release layout"), but with
a tiny backbone and DiT: flat transformers-4.51 Qwen2.5-VL config.json with model_type "blip3o_qwen",
legacy key names (model.layers.*, visual.*, model.latent_queries, model.dit.model.*), tied lm_head
absent, tokenizer files with [IMG]/[/IMG]/<image>, plus an EVA tower tensor that loaders must ignore."""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from blip3o.models.backbone import get_backbone, resolve_backbone_path
from blip3o.models.dit import DIT_PRESETS, NextDiT, DiTConfig


def legacy_name(key: str):
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    if key == "lm_head.weight":
        return None  # tied in the 4B release: absent from the files
    raise KeyError(key)


def write_official_fixture(out: Path, n_query: int = 64, dit_channels: int = 32, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(resolve_backbone_path("qwen2_5_vl", "tiny"))
    bb = get_backbone("qwen2_5_vl").from_pretrained(str(src))
    cfg = bb.config.to_dict()
    text = dict(cfg["text_config"])
    rope = text.pop("rope_parameters")
    for k in ("model_type", "architectures", "transformers_version", "dtype", "layer_types"):
        text.pop(k, None)
    flat = dict(text)
    flat.update(
        architectures=["blip3oQwenForCausalLM"], model_type="blip3o_qwen", torch_dtype="bfloat16",
        transformers_version="4.51.3", vision_config=dict(cfg["vision_config"], model_type="qwen2_5_vl"),
        rope_theta=rope["rope_theta"], rope_scaling={"type": "default", "rope_type": "default",
                                                     "mrope_section": rope["mrope_section"]},
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True, vocab_size=151668, pad_token_id=151643,
        gen_vision_tower="eva-clip-E-14-plus", n_query=n_query, gen_pooling="early_pool2d_4", gen_hidden_size=1792,
        vision_tower_pretrained=None, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
        mm_patch_merge_type="flat", tokenizer_padding_side="right", tokenizer_model_max_length=512,
        mm_use_im_start_end=False, mm_use_im_patch_token=False, use_mm_proj=True,
    )
    (out / "config.json").write_text(json.dumps(flat, indent=2))
    sd = {}
    for k, v in bb.state_dict().items():
        name = legacy_name(k)
        if name is not None:
            sd[name] = v.contiguous()
    torch.manual_seed(seed)
    hidden = text["hidden_size"]
    sd["model.latent_queries"] = torch.randn(1, n_query, hidden)
    dit_cfg = DIT_PRESETS["tiny"].to_dict()
    dit_cfg.update(in_channels=dit_channels, caption_dim=hidden)
    dit = NextDiT(DiTConfig.from_dict(dit_cfg))
    for k, v in dit.state_dict().items():
        sd["model.dit.model." + k] = v.contiguous()
    sd["model.gen_vision_tower.vision_tower.model.cls_token"] = torch.zeros(1, 1, 8)
    # Two shards + index, as `save_pretrained` writes large checkpoints.
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "preprocessor_config.json", "chat_template.jinja"):
        if (src / f).is_file():
            shutil.copy(src / f, out / f)
    return out
