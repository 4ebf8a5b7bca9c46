"""Load directories laid out like the official BLIP3o-Model-4B/8B release (docs/decisions.md, "Release layout").

Those were written by transformers 4.51 from ``blip3oQwenForCausalLM``: a *flat* Qwen2.5-VL
config.json (text fields at top level, ``vision_config`` nested, ``rope_scaling`` with
``mrope_section``) with ``model_type`` "blip3o_qwen", and state-dict names ``model.layers.*``,
``visual.*``, ``lm_head`` (absent when tied), ``model.latent_queries``, ``model.dit.model.*``.
No DiT sizes are stored, so the official ones are used with ``caption_dim`` = the LLM width.

transformers 5 must not be allowed to read that config itself: it would find the nested vision
config and silently build the whole model config from it (§13). We parse the JSON, build the
nested 5.x config, rename keys, and log what we ignore.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.initialization import no_init_weights

from blip3o.config import ModelConfig
from blip3o.models.blip3o import Blip3oConfig, Blip3oForConditionalGeneration
from blip3o.models.dit import DIT_PRESETS, DiTConfig
from blip3o.models.hf_config import hf_config_for

logger = logging.getLogger(__name__)

OFFICIAL_MODEL_TYPES = ("blip3o_qwen", "blip3o_qwen_inference")
# Keys the release may carry that inference does not need (the frozen EVA tower of a training
# output, the parameter-free projector, an unused VAE).
IGNORED_PREFIXES = ("model.gen_vision_tower.", "model.down_projector.", "model.vae.")
_BLIP3O_EXTRA_FIELDS = {
    "gen_vision_tower", "n_query", "gen_pooling", "gen_hidden_size", "vision_tower_pretrained", "use_mm_proj",
    "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature", "mm_patch_merge_type",
    "image_aspect_ratio", "tokenizer_padding_side", "tokenizer_model_max_length", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_projector_lr", "mm_hidden_size",
    "gen_projector_type", "n_und_query", "mm_vision_tower", "architectures", "model_type", "transformers_version",
    "torch_dtype", "dtype", "_name_or_path", "use_cache",
}
_TOP_LEVEL_QWEN = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                   "vision_token_id", "tie_word_embeddings")

KEY_MAP = (  # official prefix -> ours (first match wins)
    ("model.dit.model.", "dit."),
    ("model.latent_queries", "latent_queries"),
    ("model.embed_tokens.", "backbone.model.language_model.embed_tokens."),
    ("model.layers.", "backbone.model.language_model.layers."),
    ("model.norm.", "backbone.model.language_model.norm."),
    ("visual.", "backbone.model.visual."),
    ("lm_head.", "backbone.lm_head."),
)


def backbone_config_from_official(raw: Dict) -> Dict:
    """Flat transformers-4.51 Qwen2.5-VL config -> the nested dict transformers 5 expects."""
    vision = dict(raw.get("vision_config", {}))
    vision.pop("model_type", None)
    text = {k: v for k, v in raw.items() if k not in _BLIP3O_EXTRA_FIELDS and k not in _TOP_LEVEL_QWEN
            and k not in ("vision_config", "rope_scaling", "rope_theta", "text_config")}
    rs = raw.get("rope_scaling") or {}
    rope = {"rope_type": "default", "rope_theta": raw.get("rope_theta", 1e6)}
    if "mrope_section" in rs:
        rope["mrope_section"] = rs["mrope_section"]
    text["rope_parameters"] = rope
    out = {"text_config": text, "vision_config": vision}
    for k in _TOP_LEVEL_QWEN:
        if k in raw:
            out[k] = raw[k]
    return out


def rename_official_key(key: str):
    """Returns our name for an official key, or None when it is deliberately ignored."""
    if key.startswith(IGNORED_PREFIXES):
        return None
    for old, new in KEY_MAP:
        if key.startswith(old):
            return new + key[len(old):]
    return False  # unknown


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    sd: Dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(path / f)))
    return sd


def infer_dit_config(sd: Dict[str, torch.Tensor], default: Dict) -> Dict:
    """DiT sizes from the tensors themselves. The release stores none, and for it this returns the
    official defaults; for anything else (e.g. a small re-trained head) the shapes are the truth."""
    d = dict(default)
    pre = "model.dit.model."
    w = sd[pre + "patch_embedder.proj.weight"]
    gate = sd[pre + "layers.0.gate"]
    d["dim"] = w.shape[0]
    d["n_heads"] = d["n_kv_heads"] = gate.shape[0]
    d["caption_dim"] = sd[pre + "caption_projection.linear_1.weight"].shape[1]
    d["time_embed_dim"] = sd[pre + "layers.0.norm1.linear.weight"].shape[1]
    d["n_layers"] = len({k.split(".")[4] for k in sd if k.startswith(pre + "layers.")})
    kv = sd[pre + "layers.0.attn1.to_k.weight"].shape[0]
    d["n_kv_heads"] = kv // (d["dim"] // d["n_heads"])
    in_pp = w.shape[1]
    p = d.get("patch_size", 1)
    d["in_channels"] = in_pp // (p * p)
    inner = sd[pre + "layers.0.feed_forward.linear_1.weight"].shape[0]
    if DiTConfig.from_dict(d).ffn_inner_dim != inner:
        d["multiple_of"], d["ffn_dim_multiplier"] = inner, None  # ceil to a multiple of `inner` gives `inner`
    if d["time_embed_dim"] == min(d["dim"], 1024):
        d["time_embed_dim"] = None
    return d


def load_official(path: str, dtype: torch.dtype = None, **unused):
    root = Path(path)
    raw = json.loads((root / "config.json").read_text())
    if not raw.get("gen_vision_tower"):
        raise ValueError(f"{path}: config has no gen_vision_tower, so it is a plain Qwen2.5-VL, not BLIP3-o")
    bcfg = backbone_config_from_official(raw)
    hidden = bcfg["text_config"]["hidden_size"]
    sd = read_state_dict(root)
    dit = DIT_PRESETS["official"].to_dict()
    dit["caption_dim"] = hidden
    dit["gradient_checkpointing"] = False
    dit = infer_dit_config(sd, dit)
    tok_img = None
    tokenizer = None
    if (root / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(root))
        tokenizer.padding_side = "left"
        tok_img = tokenizer.convert_tokens_to_ids("[IMG]")
    # The release as a ModelConfig: the paper's defaults (sequential recipe, flow, EVA-CLIP, SDXL decoder)
    # plus what its config.json says.
    release = ModelConfig(
        backbone="qwen2_5_vl", recipe="sequential", num_queries=int(raw.get("n_query", 64)), target="eva_clip",
        objective="flow", decoder="sdxl",
        decoder_path="diffusion-decoder" if (root / "diffusion-decoder").is_dir() else None,
        max_length=int(raw.get("tokenizer_model_max_length", 512)),
    )
    config = hf_config_for(
        Blip3oConfig, release, backbone_config=bcfg, backbone_path=str(root), dit_config=dit,
        target_channels=dit["in_channels"], target_grid=[dit["input_size"]] * 2, target_path=None,
        text_loss_weight=0.0, chat_template="chatml", img_token_id=tok_img or 151665,
    )
    with no_init_weights():
        model = Blip3oForConditionalGeneration(config)
    ours, ignored, unknown = {}, [], []
    for k, v in sd.items():
        new = rename_official_key(k)
        if new is None:
            ignored.append(k)
        elif new is False:
            unknown.append(k)
        else:
            ours[new] = v
    if config.backbone_config.get("tie_word_embeddings") and "backbone.lm_head.weight" not in ours:
        ours["backbone.lm_head.weight"] = ours["backbone.model.language_model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(ours, strict=False)
    # Our own buffers (target stats) are not in the release; their defaults are the identity.
    missing = [k for k in missing if k not in ("target_mean", "target_std")]
    if missing or unexpected or unknown:
        raise ValueError(f"{path}: official checkpoint does not match: missing={missing[:5]} "
                         f"unexpected={list(unexpected)[:5]} unknown={unknown[:5]} (counts {len(missing)}/"
                         f"{len(unexpected)}/{len(unknown)})")
    if ignored:
        prefixes = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in ignored})
        logger.info("official checkpoint: ignored %d tensors not needed for inference (%s)", len(ignored),
                    ", ".join(prefixes))
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    model._source_dir = str(root)
    model.tokenizer = tokenizer
    model.official_ignored_keys = ignored
    model.apply_recipe()
    model.eval()
    return model
