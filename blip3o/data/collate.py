"""Batch collation: generation prompts through the shared chat template, understanding conversations.

Batch dict (all keys optional except ``keys``/``sources``; a key group is present iff the batch has at least
one sample of that kind, because sources are mixed per sample):

generation (text-to-image) samples, B_g of them
    ``input_ids``, ``attention_mask``  (B_g, L) left-padded prompts ending in ``[IMG]``, from
                                        :func:`blip3o.prompts.encode_generation_prompts` (the model appends the
                                        query slots, so L excludes them)
    ``pixel_values``                    (B_g, 3, S, S) from the target's transform, or
    ``target_latents``                  (B_g, C, h, w) float32 from the target-feature cache
    ``keys``, ``sources``               list[str] of length B_g
understanding (image-to-text) samples, B_u of them
    ``und_input_ids``, ``und_attention_mask``, ``und_labels``  (B_u, L_u), left-padded; labels are -100
                                        except on assistant answers (and their end-of-turn token)
    ``und_images``                      list of B_u PIL images (resized and centre-cropped to ``und_image_size``)
                                        or None for text-only conversations
    ``und_has_image``                   (B_u,) bool
    ``und_pixel_values``                (N_img, 3, S', S') when an ``und_image_transform`` is given: one row per
                                        conversation that has an image, in order
    ``und_keys``, ``und_sources``       list[str] of length B_u
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from blip3o.prompts import IMAGE_TOKEN, ChatTemplate, encode_edit_prompts, encode_generation_prompts, left_pad

IGNORE_INDEX = -100
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "model"}


def _ids(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _token_id(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no '{token}' token, which the chat template needs for images")
    return tid


def encode_conversation(
    tokenizer, conversations: Sequence[dict], template: ChatTemplate, image_tokens: int, max_length: int,
) -> Tuple[List[int], List[int]]:
    """LLaVA-style ``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]`` -> (ids, labels).

    The ``<image>`` placeholder becomes ``vision_start + image_pad * image_tokens + vision_end``; the backbone
    replaces the pads with its vision features. Raises ValueError (the caller counts it as a skip) for
    malformed conversations or ones whose image block or first answer would not fit ``max_length``.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("conversations must be a non-empty list")
    system = template.system
    turns = list(conversations)
    if isinstance(turns[0], dict) and turns[0].get("from") == "system":
        system = str(turns[0].get("value", ""))
        turns = turns[1:]
    ids: List[int] = _ids(tokenizer, f"{template.bos}{template.system_start}{system}{template.turn_end}")
    labels: List[int] = [IGNORE_INDEX] * len(ids)
    image_end = -1  # index just after the image block; truncation must not cut into it
    n_images = 0
    has_answer = False
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError("each turn needs a string 'value'")
        role = turn.get("from", turn.get("role"))
        text = turn["value"]
        if role in _USER_ROLES:
            part = _ids(tokenizer, template.user_start)
            chunks = text.split(IMAGE_TOKEN)
            if len(chunks) > 1:
                n_images += len(chunks) - 1
                if n_images > 1:
                    raise ValueError("more than one <image> per conversation is not supported")
                block = ([_token_id(tokenizer, template.vision_start)]
                         + [_token_id(tokenizer, template.image_pad)] * image_tokens
                         + [_token_id(tokenizer, template.vision_end)])
                before = _ids(tokenizer, chunks[0].rstrip("\n"))
                after = _ids(tokenizer, chunks[1].lstrip("\n"))
                nl = _ids(tokenizer, "\n")
                part = part + before + block + nl + after
                image_end = len(ids) + len(part) - len(after) - len(nl)
            else:
                part = part + _ids(tokenizer, text)
            part = part + _ids(tokenizer, template.turn_end)
            ids += part
            labels += [IGNORE_INDEX] * len(part)
        elif role in _ASSISTANT_ROLES:
            head = _ids(tokenizer, template.assistant_start)
            body = _ids(tokenizer, text) + _ids(tokenizer, template.turn_end)
            ids += head + body
            labels += [IGNORE_INDEX] * len(head) + body
            has_answer = True
        else:
            raise ValueError(f"unknown role {role!r}")
    if not has_answer:
        raise ValueError("conversation has no assistant turn to learn from")
    if len(ids) > max_length:
        if image_end > max_length:
            raise OverflowError(f"image block ends at token {image_end} > max_length {max_length}")
        ids, labels = ids[:max_length], labels[:max_length]
        if all(l == IGNORE_INDEX for l in labels):
            raise OverflowError(f"no answer token fits in max_length {max_length}")
    return ids, labels


def count_images(conversations) -> int:
    return sum(str(t.get("value", "")).count(IMAGE_TOKEN) for t in conversations if isinstance(t, dict))


class BatchCollator:
    """Turns a list of decoded samples into the batch dict described in the module docstring."""

    def __init__(self, tokenizer, template: ChatTemplate, num_queries: int = 64, max_length: int = 512,
                 und_image_transform=None, und_image_tokens: int = 256):
        self.tokenizer, self.template = tokenizer, template
        self.und_image_tokens = und_image_tokens
        self.num_queries, self.max_length = num_queries, max_length
        self.und_image_transform = und_image_transform

    def __call__(self, samples: Sequence[dict]) -> Dict[str, object]:
        gen = [s for s in samples if s["kind"] == "gen"]
        und = [s for s in samples if s["kind"] == "und"]
        batch: Dict[str, object] = {"keys": [s["key"] for s in gen], "sources": [s["source"] for s in gen],
                                    "captions": [s["caption"] for s in gen]}
        if gen and any("edit_image" in s for s in gen):
            # Editing rows carry their source image as <|image_pad|> slots before the instruction; plain
            # rows keep the generation prompt. One left-padded batch either way.
            rows = []
            for s in gen:
                if "edit_image" in s:
                    enc = encode_edit_prompts(self.tokenizer, [s["caption"]], [self.und_image_tokens],
                                              self.template, max_length=self.max_length + self.und_image_tokens,
                                              num_queries=self.num_queries)
                else:
                    enc = encode_generation_prompts(self.tokenizer, [s["caption"]], template=self.template,
                                                    max_length=self.max_length, num_queries=self.num_queries)
                rows.append(enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist())
            batch.update(left_pad(rows, self.tokenizer.pad_token_id))
            batch["cond_images"] = [s["edit_image"] for s in gen if "edit_image" in s]
        elif gen:
            batch.update(encode_generation_prompts(
                self.tokenizer, [s["caption"] for s in gen], template=self.template,
                max_length=self.max_length, num_queries=self.num_queries))
        if gen:
            if "target_latents" in gen[0]:
                batch["target_latents"] = torch.stack([s["target_latents"] for s in gen])
            else:
                batch["pixel_values"] = torch.stack([s["pixel_values"] for s in gen])
        if und:
            enc = left_pad([s["input_ids"] for s in und], self.tokenizer.pad_token_id,
                           labels=[s["labels"] for s in und])
            batch["und_input_ids"] = enc["input_ids"]
            batch["und_attention_mask"] = enc["attention_mask"]
            batch["und_labels"] = enc["labels"]
            batch["und_images"] = [s["image"] for s in und]
            batch["und_has_image"] = torch.tensor([s["image"] is not None for s in und], dtype=torch.bool)
            if self.und_image_transform is not None:
                imgs = [self.und_image_transform(s["image"]) for s in und if s["image"] is not None]
                if imgs:
                    batch["und_pixel_values"] = torch.stack(imgs)
            batch["und_keys"] = [s["key"] for s in und]
            batch["und_sources"] = [s["source"] for s in und]
        return batch
