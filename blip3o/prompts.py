"""Chat templates and the generation prompt, shared by training data, inference and evaluation.

One format for training and inference. The reference closes the assistant turn in training
(``assistant\\n<|im_end|>\\n`` then ``[IMG]`` + queries) but leaves it open at inference
(``assistant\\n`` then ``[IMG]`` + queries), so its queries are conditioned on different contexts
in the two phases. We always leave the assistant turn open: the image (``[IMG]`` + 64 query
slots) *is* the assistant's reply, which is also what a chat model expects to follow
``assistant\\n``.

Sequence layout for text-to-image (left padded, so the 64 query slots are always the last 64
positions and a batch gives the same conditioning as one prompt at a time)::

    [pad ... pad] <system> <user: "Please generate image based on the following caption: {caption}">
                  <assistant-open> [IMG] q_1 ... q_64
                                         ^ query embeddings are spliced in by the model

The user message (instruction + caption) is tokenised as one string, as the original does, so the ids
equal the original's (tests/unit/test_golden_original.py). The tokenizer-level work (template, truncation by
tokens, padding) is here; the model only appends the learnable query embeddings after ``[IMG]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

IMG_START_TOKEN = "[IMG]"
IMG_END_TOKEN = "[/IMG]"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (IMG_START_TOKEN, IMG_END_TOKEN, IMAGE_TOKEN)
GEN_INSTRUCTION = "Please generate image based on the following caption: "
DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    bos: str
    system_start: str
    user_start: str
    assistant_start: str
    turn_end: str
    system: str = DEFAULT_SYSTEM
    # Understanding images are inserted as these markers around `n` image-pad tokens.
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"

    def prefix(self) -> str:
        return f"{self.bos}{self.system_start}{self.system}{self.turn_end}{self.user_start}"

    def suffix(self) -> str:
        return f"{self.turn_end}{self.assistant_start}"

    def render(self, user_text: str) -> str:
        return self.prefix() + user_text + self.suffix()


CHATML = ChatTemplate(
    name="chatml", bos="", system_start="<|im_start|>system\n", user_start="<|im_start|>user\n",
    assistant_start="<|im_start|>assistant\n", turn_end="<|im_end|>\n",
)
LLAMA3 = ChatTemplate(
    name="llama3", bos="<|begin_of_text|>", system_start="<|start_header_id|>system<|end_header_id|>\n\n",
    user_start="<|start_header_id|>user<|end_header_id|>\n\n",
    assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n", turn_end="<|eot_id|>",
)
TEMPLATES: Dict[str, ChatTemplate] = {"chatml": CHATML, "llama3": LLAMA3}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise KeyError(f"unknown chat template '{name}'; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def add_special_tokens(tokenizer) -> Dict[str, int]:
    """Adds [IMG], [/IMG], <image> (in that order, so Qwen2.5 gives 151665/151666/151667 as the
    official release) and returns their ids. Idempotent."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        # LLaMA-3 has no pad token; reusing EOS is safe because padding is always masked.
        tokenizer.pad_token = tokenizer.eos_token
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _ids(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generation_head_len(tokenizer, template: ChatTemplate = CHATML, instruction: str = GEN_INSTRUCTION) -> int:
    """Tokens before the caption's first token. The instruction's trailing space belongs to the caption
    (``': A photo'`` -> ``[':', 'ĠA', 'Ġphoto']``), so the head ends at the ``':'``."""
    return len(_ids(tokenizer, template.prefix() + instruction.rstrip(" ")))


def generation_prompt_ids(tokenizer, caption: str, template: ChatTemplate = CHATML,
                          max_length: Optional[int] = 512, num_queries: int = 64,
                          instruction: str = GEN_INSTRUCTION) -> List[int]:
    """One generation prompt, ``... user\n{instruction}{caption}<|im_end|>\n<|im_start|>assistant\n[IMG]``.

    The whole user message is tokenised at once, as the original does in training and at inference
    (docs/decisions.md, "Prompts"), so the caption's first word keeps its leading-space token. ``max_length``
    counts the whole sequence including the ``num_queries`` query slots the model appends; a longer
    prompt loses the end of its caption (by tokens, never the template). ``None`` keeps every token, as
    the original's inference does.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}")
    img_id = tokenizer.convert_tokens_to_ids(IMG_START_TOKEN)
    if img_id is None or img_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMG_START_TOKEN} token; call blip3o.prompts.add_special_tokens first")
    # The suffix starts with a special token (<|im_end|>, <|eot_id|>), where the tokenizer splits anyway,
    # so tokenising it apart gives the ids of the whole rendered string.
    user = _ids(tokenizer, template.prefix() + instruction + caption)
    tail = _ids(tokenizer, template.suffix()) + [img_id]
    if max_length is not None:
        budget = max_length - num_queries - len(tail)
        if budget <= generation_head_len(tokenizer, template, instruction):
            raise ValueError(f"max_length={max_length} leaves no room for a caption ({num_queries} queries + template)")
        user = user[:budget]
    return user + tail


def encode_generation_prompts(
    tokenizer,
    captions: Sequence[str],
    template: ChatTemplate = CHATML,
    max_length: Optional[int] = 512,
    num_queries: int = 64,
    instruction: str = GEN_INSTRUCTION,
) -> Dict[str, torch.Tensor]:
    """Captions -> left-padded generation prompts ending in ``[IMG]`` (:func:`generation_prompt_ids` each), the
    one builder of training batches and inference. Returns ``input_ids`` and ``attention_mask`` of shape (B, L)
    *without* the query slots."""
    seqs = [generation_prompt_ids(tokenizer, c, template, max_length, num_queries, instruction) for c in captions]
    return left_pad(seqs, tokenizer.pad_token_id)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, labels: Optional[Sequence[Sequence[int]]] = None):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
            if labels is not None:
                out["labels"][i, width - len(s):] = torch.tensor(labels[i], dtype=torch.long)
    return out


EDIT_INSTRUCTION = "Please edit the given image as follows: "


def encode_edit_prompts(
    tokenizer,
    instructions: Sequence[str],
    image_token_counts: Sequence[int],
    template: ChatTemplate = CHATML,
    max_length: int = 2048,
    num_queries: int = 64,
    instruction_prefix: str = EDIT_INSTRUCTION,
) -> Dict[str, torch.Tensor]:
    """Image + instruction -> left-padded prompts ending in ``[IMG]``. The user turn holds the input
    image as ``<|vision_start|><|image_pad|>*n<|vision_end|>`` (filled with the backbone's own vision
    features by the model) followed by the instruction; the queries then generate the target."""
    img_id = tokenizer.convert_tokens_to_ids(IMG_START_TOKEN)
    seqs = []
    for text, n in zip(instructions, image_token_counts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError("edit instructions must be non-empty strings")
        user = template.vision_start + template.image_pad * int(n) + template.vision_end + instruction_prefix + text
        ids = _ids(tokenizer, template.render(user)) + [img_id]
        if len(ids) + num_queries > max_length:
            raise ValueError(f"edit prompt of {len(ids)} tokens + {num_queries} queries exceeds max_length={max_length}")
        seqs.append(ids)
    return left_pad(seqs, tokenizer.pad_token_id)


def tokenize_for_generation(tokenizer, prompts, template_name: str, max_length: Optional[int], num_slots: int):
    """Validated user prompts -> the generation batch (a model's ``tokenize_prompts``): ``num_slots`` is what
    follows the prompt (BLIP3-o's queries, or a fusion model's image block); ``max_length`` None (or 0) cuts
    nothing."""
    if tokenizer is None:
        raise ValueError("pass tokenizer= or load the model with from_pretrained from a directory with tokenizer files")
    if isinstance(prompts, str):
        prompts = [prompts]
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError("prompts must be non-empty strings")
    return encode_generation_prompts(tokenizer, list(prompts), get_template(template_name),
                                     max_length=max_length or None, num_queries=num_slots)
