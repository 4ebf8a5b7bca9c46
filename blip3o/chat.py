"""Conversation with one BLIP3-o model: multi-turn history, text and images in and out, zero-shot classification.

    chat = pipe.chat(max_images=4, seed=0)                   # or Blip3oChat(pipe, ...)
    r = chat.send("a red barn at dusk", mode="image")         # r.images[0]; r.text is empty
    r = chat.send("what colour is the roof?")                  # mode="auto": the backbone picks text/image/edit
    r = chat.send("now make it blue", mode="edit")             # edits the most recent image of the conversation
    r = chat.send("the fruit monkeys like, in the colour of the sky", mode="image", reason=True)  # r.reasoning
    r = chat.send("how do barns get their colour?", interleaved=True)   # r.parts: [str, Image, str, ...]
    r = chat.send("hello", mode="text")                        # text-only chat, no image needed
    ranking = pipe.classify(image, ["cat", "dog", "bird"])     # [(label, score), ...], best first

Every turn is rendered in the backbone's own chat template with the whole history before it, and every image in
the history, uploaded or generated, enters as ``<|vision_start|><|image_pad|>*n<|vision_end|>`` filled by the
backbone's vision tower. What follows the open assistant turn depends on the mode:

* ``text``:  the backbone's own ``generate`` writes the answer (understanding stays the frozen backbone's);
* ``image``: the user turn reads "Please generate image based on the following caption: {text}" and ``[IMG]`` +
  the queries follow, as in training; the DiT and the pixel decoder make the picture;
* ``edit``:  the most recent image moves from its place in the history into the user turn, followed by "Please
  edit the given image as follows: {text}", then ``[IMG]`` + queries: the editing path's prompt with the
  history before it; so a chain of edits keeps editing the latest result;
* ``auto``:  the backbone is asked whether the user wants a new picture, a change to the last picture or words
  (one word: ``picture`` / ``edit`` / ``words``), each answer scored by length-normalised log-likelihood in one
  batched forward; ``edit`` is only a candidate when the conversation has an image.

``reason=True`` (image turns): the backbone first writes a short description of what to draw (objects,
attributes, layout); the queries then read the request plus that reasoning. ``interleaved=True``: the backbone
answers in words and marks pictures as ``<image>a short description</image>``; each tag becomes an image generated
with the conversation so far (text and pictures of the answer before it) as context; the reply is the ordered list.

History budget: at most ``max_images`` images (default 4) and ``max_tokens`` prompt tokens (default 4096, image
tokens included) per model call. Over budget, the oldest images are replaced by the text
"[image removed: history budget]" first, then the oldest turns are dropped; the reply's ``notice`` says what went.
The current turn's own images are never dropped. With ``truncate=False`` an over-budget turn raises
HistoryBudgetError instead (and the history is left as it was).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from blip3o.models.understanding import load_image_processor
from blip3o.prompts import EDIT_INSTRUCTION, GEN_INSTRUCTION, IMAGE_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, \
    get_template

MODES = ("auto", "text", "image", "edit")
IMAGE_TAG = re.compile(r"<image>(.*?)</image>", re.S)  # the interleaved-output tag
DROPPED_IMAGE = "[image removed: history budget]"
ROUTER_PROMPT = ('The user wrote: "{text}"\nDo they want a new picture drawn, a change to the last picture, or an '
                 'answer in words? Reply with one word: {choices}.')
ROUTES = {"picture": "image", "edit": "edit", "words": "text"}
REASON_PROMPT = ("Before drawing, describe in one or two sentences exactly what the picture for this request should "
                 "show: the objects, their colours and other attributes, and the layout. Request: {text}")
INTERLEAVE_PROMPT = ("Answer in words; where a picture helps, put it in place as <image>a short description of the "
                     "picture</image>.")
CLASSIFY_PROMPT = "What is in the image? Answer with one word or a short phrase."

Part = Union[str, Image.Image]


class ChatError(ValueError):
    """Input a conversation cannot act on; the message is one line meant for the user."""


class HistoryBudgetError(ChatError):
    pass


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    parts: List[Part]

    @property
    def text(self) -> str:
        return " ".join(p for p in self.parts if isinstance(p, str)).strip()

    @property
    def images(self) -> List[Image.Image]:
        return [p for p in self.parts if isinstance(p, Image.Image)]


@dataclass
class ChatReply:
    mode: str  # what was done: text | image | edit | interleaved
    parts: List[Part]
    reasoning: Optional[str] = None
    notice: Optional[str] = None  # e.g. images dropped to fit the history budget
    route_scores: Optional[Dict[str, float]] = None  # auto mode: the backbone's score per choice
    prompts: List[str] = field(default_factory=list)  # captions the images were generated from

    @property
    def text(self) -> str:
        return "\n\n".join(p for p in self.parts if isinstance(p, str)).strip()

    @property
    def images(self) -> List[Image.Image]:
        return [p for p in self.parts if isinstance(p, Image.Image)]


def load_image(image) -> Image.Image:
    """A PIL image or a path -> RGB PIL image; anything unreadable -> ChatError (one line)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:  # FileNotFoundError, UnidentifiedImageError, truncated files
            raise ChatError(f"cannot read image {image}: {type(e).__name__}") from None
    raise ChatError(f"cannot read image: expected a PIL image or a path, got {type(image).__name__}")


def with_reasoning(prompt: str, reasoning: Optional[str]) -> str:
    """The caption the queries read when reasoning is on: the request, then the backbone's description."""
    return f"{prompt}\n{reasoning}" if reasoning else prompt


def split_interleaved(text: str) -> List[Tuple[str, str]]:
    """'a <image>x</image> b' -> [("text", "a"), ("image", "x"), ("text", "b")] (empty pieces left out)."""
    out, pos = [], 0
    for m in IMAGE_TAG.finditer(text):
        if text[pos:m.start()].strip():
            out.append(("text", text[pos:m.start()].strip()))
        if m.group(1).strip():
            out.append(("image", m.group(1).strip()))
        pos = m.end()
    if text[pos:].strip():
        out.append(("text", text[pos:].strip()))
    return out


class _Vision:
    """Image -> (pixel_values, grid) through the backbone's image processor, cached per image object."""

    def __init__(self, model):
        self.ip = load_image_processor(model)
        self.merge = getattr(self.ip, "merge_size", 2)
        self._cache: Dict[int, tuple] = {}

    def encode(self, im: Image.Image):
        hit = self._cache.get(id(im))
        if hit is None or hit[0] is not im:
            v = self.ip(images=[im.convert("RGB")], return_tensors="pt")
            hit = self._cache[id(im)] = (im, v["pixel_values"], v["image_grid_thw"])
        return hit[1], hit[2]

    def forget(self, im: Optional[Image.Image] = None) -> None:
        """Frees the cached pixels of ``im`` (of every image when None): dropped images must not stay in memory."""
        if im is None:
            self._cache.clear()
        elif id(im) in self._cache and self._cache[id(im)][0] is im:
            del self._cache[id(im)]

    def n_tokens(self, im: Image.Image) -> int:
        return int(self.encode(im)[1][0].prod()) // (self.merge * self.merge)

    def batch(self, images: Sequence[Image.Image]):
        if not images:
            return None
        enc = [self.encode(im) for im in images]
        return torch.cat([e[0] for e in enc]), torch.cat([e[1] for e in enc])


def _vision_kwargs(model, ids: torch.Tensor, vision, repeat: int = 1) -> dict:
    """Backbone kwargs for a prompt with images: the vision tower runs once even when ``repeat`` rows share
    the images (classification / routing batches); mm_token_type_ids gives the image tokens their 3D positions."""
    if vision is None:
        return {}
    dev = ids.device
    pv, grid = vision
    feats = model.backbone.get_image_features(pv.to(dev), grid.to(dev), return_dict=True)
    feats.pooler_output = tuple(feats.pooler_output) * repeat
    image_id = model.backbone.config.image_token_id
    return {"mm_encoder_outputs": {"image": feats}, "image_grid_thw": grid.to(dev).repeat(repeat, 1),
            "mm_token_type_ids": (ids == image_id).int()}


@torch.no_grad()
def continuation_scores(model, prefix: List[int], options: List[List[int]], vision=None) -> List[float]:
    """Mean log-probability of each option's tokens after ``prefix``: one batched forward for all options
    (right padded, so the prefix sits at the same positions in every row); only the option positions' logits
    are kept, so a large label set does not materialise (K, L, vocab) logits."""
    dev = model.latent_queries.device
    width = max(len(o) for o in options)
    ids = torch.full((len(options), len(prefix) + width), model.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, o in enumerate(options):
        ids[k, :len(prefix) + len(o)] = torch.tensor(prefix + o)
        mask[k, :len(prefix) + len(o)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    kw = _vision_kwargs(model, ids, vision, repeat=len(options))
    logits = model.backbone(input_ids=ids, attention_mask=mask, logits_to_keep=width + 1, use_cache=False,
                            **kw).logits.float()
    logp = logits.log_softmax(-1)  # kept position j predicts option token j
    return [float(logp[k, torch.arange(len(o)), torch.tensor(o, device=dev)].mean()) for k, o in enumerate(options)]


class Blip3oChat:
    """An ordered user/assistant history over one Blip3oPipeline; see the module docstring."""

    def __init__(self, pipe, max_images: int = 4, max_tokens: int = 4096, truncate: bool = True, seed: int = 0,
                 system: Optional[str] = None, guidance_scale: Optional[float] = None,
                 num_inference_steps: Optional[int] = None, decoder_guidance_scale: Optional[float] = None,
                 decoder_num_inference_steps: Optional[int] = None, max_new_tokens: int = 256,
                 reason_max_new_tokens: int = 96, max_interleaved_images: int = 4):
        if max_images < 1 or max_tokens < 1:
            raise ChatError(f"max_images and max_tokens must be >= 1, got {max_images} and {max_tokens}")
        if not hasattr(pipe.model, "encode_condition"):
            raise ChatError(f"chat needs a BLIP3-o (queries) checkpoint, not {type(pipe.model).__name__}")
        self.pipe, self.model, self.tok = pipe, pipe.model, pipe.model.tokenizer
        self.tpl = get_template(self.model.config.chat_template)
        self.system = system or self.tpl.system
        self.max_images, self.max_tokens, self.truncate, self.seed = max_images, max_tokens, truncate, seed
        self.gen_kw = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)
        self.dec_kw = (decoder_guidance_scale, decoder_num_inference_steps)
        self.max_new_tokens, self.reason_max_new_tokens = max_new_tokens, reason_max_new_tokens
        self.max_interleaved_images = max_interleaved_images
        self._vision = _Vision(self.model) if self.model.adapter.multimodal else None
        self.history: List[Turn] = []

    def reset(self) -> None:
        self.history = []
        if self._vision is not None:
            self._vision.forget()

    @property
    def messages(self) -> List[dict]:
        """The history as ``[{"role", "text", "images"}]`` (for UIs and transcripts)."""
        return [{"role": t.role, "text": t.text, "images": t.images} for t in self.history]

    # -- prompt rendering -----------------------------------------------------------------------------------
    def _content(self, parts: Sequence[Part], skip, images: list) -> str:
        tpl, s = self.tpl, ""
        for p in parts:
            if isinstance(p, str):
                for marker in (tpl.vision_start, tpl.vision_end, tpl.image_pad, IMG_START_TOKEN):
                    p = p.replace(marker, "")  # typed text must not forge image slots
                s += p
            elif p is not skip:
                if self._vision is None:
                    raise ChatError(f"backbone '{self.model.config.backbone}' has no vision tower: text-only chat")
                s += tpl.vision_start + tpl.image_pad * self._vision.n_tokens(p) + tpl.vision_end
                images.append(p)
        return s

    def _prompt(self, turns: Sequence[Turn], user_parts: Sequence[Part], skip=None, image_slot=False):
        """(token ids, images in slot order) for ``turns`` + a final user turn + the open assistant turn;
        ``skip``: an image left out of ``turns`` (the edit turn moves the latest image into its user turn)."""
        tpl, images = self.tpl, []
        s = tpl.bos + tpl.system_start + self.system + tpl.turn_end
        for t in turns:
            start = tpl.user_start if t.role == "user" else tpl.assistant_start
            s += start + self._content(t.parts, skip, images) + tpl.turn_end
        s += tpl.user_start + self._content(user_parts, None, images) + tpl.turn_end + tpl.assistant_start
        ids = self.tok(s, add_special_tokens=False)["input_ids"]
        if image_slot:
            ids.append(self.tok.convert_tokens_to_ids(IMG_START_TOKEN))
        return ids, images

    def _drop_oldest_image(self, keep) -> bool:
        for t in self.history:
            for i, p in enumerate(t.parts):
                if isinstance(p, Image.Image) and p is not keep:
                    t.parts[i] = DROPPED_IMAGE
                    self._vision.forget(p)
                    return True
        return False

    def _fit(self, build, notices: List[str], keep=None):
        """Calls ``build() -> (ids, images)`` until the prompt fits the budget, dropping history as documented."""
        images_dropped = turns_dropped = 0
        while True:
            ids, images = build()
            if len(images) <= self.max_images and len(ids) <= self.max_tokens:
                break
            what = f"{len(images)} images (max_images={self.max_images}), {len(ids)} tokens " \
                   f"(max_tokens={self.max_tokens})"
            if not self.truncate:
                raise HistoryBudgetError(f"history over budget: {what}, and truncate=False; reset() the chat or "
                                         "raise the budget")
            if self._drop_oldest_image(keep):
                images_dropped += 1
            elif self.history:
                self.history.pop(0)
                turns_dropped += 1
            else:
                raise HistoryBudgetError(f"this turn alone is over the history budget: {what}")
        if images_dropped:
            notices.append(f"dropped the {images_dropped} oldest image(s) from the history to fit the budget "
                           f"(max_images={self.max_images}, max_tokens={self.max_tokens})")
        if turns_dropped:
            notices.append(f"dropped the {turns_dropped} oldest turn(s) to fit max_tokens={self.max_tokens}")
        return ids, images

    # -- the backbone and the generator ---------------------------------------------------------------------
    @torch.no_grad()
    def _generate_text(self, ids: List[int], images, max_new_tokens: int, keep_image_tags: bool = False) -> str:
        dev = self.model.latent_queries.device
        x = torch.tensor([ids], device=dev)
        kw = {}
        if images:  # generate runs the vision tower itself; mm_token_type_ids gives image tokens 3D positions
            pv, grid = self._vision.batch(images)
            kw = {"pixel_values": pv.to(dev), "image_grid_thw": grid.to(dev),
                  "mm_token_type_ids": (x == self.model.backbone.config.image_token_id).int()}
        out = self.model.backbone.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                           max_new_tokens=max_new_tokens, pad_token_id=self.tok.pad_token_id, **kw)
        new = out[0, len(ids):].tolist()
        if not keep_image_tags:
            return self.tok.decode(new, skip_special_tokens=True).strip()
        # <image> is one of our special tokens: keep it, drop the template's
        text = self.tok.decode(new, skip_special_tokens=False)
        for t in set(self.tok.all_special_tokens) | {IMG_START_TOKEN, IMG_END_TOKEN}:
            if t != IMAGE_TOKEN:
                text = text.replace(t, "")
        return text.strip()

    @torch.no_grad()
    def _generate_image(self, ids: List[int], images, seed: int) -> Image.Image:
        if not self.pipe.has_decoder():
            raise ChatError("this checkpoint has no pixel decoder (diffusion-decoder/): it cannot draw; use text turns")
        dev = self.model.latent_queries.device
        x = torch.tensor([ids], device=dev)
        vis = self._vision.batch(images) if images else None
        feats = self.model.generate_features(input_ids=x, attention_mask=torch.ones_like(x),
                                             pixel_values=None if vis is None else vis[0],
                                             image_grid_thw=None if vis is None else vis[1].to(dev),
                                             generator=[torch.Generator().manual_seed(seed)], **self.gen_kw)
        return self.pipe.decode(feats, [torch.Generator().manual_seed(seed + 10 ** 6)], *self.dec_kw)[0]

    def _latest_image(self, user: Turn):
        for t in [*self.history, user][::-1]:
            if t.images:
                return t.images[-1]
        return None

    # -- turns ---------------------------------------------------------------------------------------------
    def route(self, user: Turn, notices: List[str]) -> Tuple[str, Dict[str, float]]:
        """auto mode: the backbone's own choice between picture / edit / words, scored by likelihood."""
        choices = ["picture", "edit", "words"] if self._latest_image(user) is not None else ["picture", "words"]
        q = ROUTER_PROMPT.format(text=user.text, choices=", ".join(choices))
        ids, images = self._fit(lambda: self._prompt(self.history, user.images + [q]), notices)
        end = self.tok(self.tpl.turn_end, add_special_tokens=False)["input_ids"][:1]
        opts = [self.tok(c, add_special_tokens=False)["input_ids"] + end for c in choices]
        scores = continuation_scores(self.model, ids, opts, self._vision.batch(images) if images else None)
        best = max(range(len(choices)), key=lambda k: scores[k])
        return ROUTES[choices[best]], dict(zip(choices, scores))

    def reason(self, text: str, user_images: Sequence[Image.Image] = (), notices: Optional[List[str]] = None) -> str:
        """The backbone's short description of what to draw for ``text`` (with the history as context)."""
        parts = [*user_images, REASON_PROMPT.format(text=text)]
        ids, images = self._fit(lambda: self._prompt(self.history, parts), [] if notices is None else notices)
        return self._generate_text(ids, images, self.reason_max_new_tokens)

    def send(self, text: str = "", image=None, mode: str = "auto", reason: bool = False, interleaved: bool = False,
             seed: Optional[int] = None) -> ChatReply:
        """One user turn (text and/or an image: PIL or path) -> the model's reply, appended to the history."""
        if mode not in MODES:
            raise ChatError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
        if not isinstance(text, str):
            raise ChatError(f"text must be a string, got {type(text).__name__}")
        text = text.strip()
        upload = None if image is None else load_image(image)
        if not text and upload is None:
            raise ChatError("empty turn: type a message, upload an image, or both")
        if interleaved and mode not in ("auto", "text"):
            raise ChatError(f"interleaved answers are text with pictures: use mode auto or text, not {mode}")
        user = Turn("user", ([upload] if upload is not None else []) + ([text] if text else []))
        seed = self.seed + len(self.history) if seed is None else seed
        notices: List[str] = []
        scores = None
        self.pipe._stage(self.model)
        try:
            if interleaved:
                mode = "interleaved"
            elif mode == "auto":
                mode, scores = self.route(user, notices)
            if mode == "edit" and self._latest_image(user) is None:
                raise ChatError("an edit turn needs an image in the conversation: upload one or generate one first")
            if mode in ("image", "edit") and not text:
                raise ChatError(f"an {mode} turn needs text (what to draw, or how to change the image)")
            parts, reasoning, prompts = self._reply(mode, text, user, reason, seed, notices)
        finally:
            self.pipe._unstage(self.model)
        self.history += [user, Turn("assistant", list(parts))]
        return ChatReply(mode=mode, parts=parts, reasoning=reasoning, notice="; ".join(notices) or None,
                         route_scores=scores, prompts=prompts)

    def _reply(self, mode, text, user, reason, seed, notices):
        reasoning, prompts = None, []
        if mode == "text":
            ids, images = self._fit(lambda: self._prompt(self.history, user.parts), notices)
            parts: List[Part] = [self._generate_text(ids, images, self.max_new_tokens)]
        elif mode == "image":
            if reason:
                reasoning = self.reason(text, user.images, notices)
            caption = with_reasoning(text, reasoning)
            ids, images = self._fit(lambda: self._prompt(self.history, user.images + [GEN_INSTRUCTION + caption],
                                                         image_slot=True), notices)
            parts, prompts = ([reasoning] if reasoning else []) + [self._generate_image(ids, images, seed)], [caption]
        elif mode == "edit":
            src = self._latest_image(user)
            ids, images = self._fit(lambda: self._prompt(self.history, [src, EDIT_INSTRUCTION + text], skip=src,
                                                         image_slot=True), notices, keep=src)
            parts, prompts = [self._generate_image(ids, images, seed)], [text]
        else:
            parts, prompts = self._interleaved(user, seed, notices)
        return parts, reasoning, prompts

    def _interleaved(self, user: Turn, seed: int, notices: List[str]):
        ids, images = self._fit(lambda: self._prompt(self.history, user.parts + ["\n" + INTERLEAVE_PROMPT]), notices)
        answer = self._generate_text(ids, images, self.max_new_tokens, keep_image_tags=True)
        parts: List[Part] = []
        prompts: List[str] = []
        for kind, piece in split_interleaved(answer):
            if kind == "text" or len(prompts) >= self.max_interleaved_images:
                parts.append(piece if kind == "text" else f"(picture: {piece})")
                continue
            # the conversation so far: the history, this request, and the answer up to this picture
            so_far = [user, Turn("assistant", list(parts))]
            ids, images = self._fit(lambda: self._prompt([*self.history, *so_far], [GEN_INSTRUCTION + piece],
                                                         image_slot=True), notices)
            parts.append(self._generate_image(ids, images, seed + len(prompts)))
            prompts.append(piece)
        return parts or [""], prompts


def classify(pipe, image, labels: Sequence[str], question: str = CLASSIFY_PROMPT) -> List[Tuple[str, float]]:
    """Zero-shot classification: labels ranked by the backbone's length-normalised log-likelihood of each label
    (then the end of the turn) as the answer to ``question`` about ``image``; one forward for the label set."""
    if isinstance(labels, str) or not labels:
        raise ChatError("classify needs a non-empty list of labels")
    labels = [l.strip() if isinstance(l, str) else l for l in labels]
    if not all(isinstance(l, str) and l for l in labels):
        raise ChatError("every label must be a non-empty string")
    chat = Blip3oChat(pipe)
    im = load_image(image)
    ids, images = chat._prompt([], [im, question])
    tok = chat.tok
    end = tok(chat.tpl.turn_end, add_special_tokens=False)["input_ids"][:1]
    opts = [tok(l, add_special_tokens=False)["input_ids"] + end for l in labels]
    pipe._stage(pipe.model)
    scores = continuation_scores(pipe.model, ids, opts, chat._vision.batch(images))
    pipe._unstage(pipe.model)
    return sorted(zip(labels, scores), key=lambda x: -x[1])
