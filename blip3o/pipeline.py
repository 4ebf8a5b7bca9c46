"""Blip3oPipeline: text -> image, image -> text, image + instruction -> image, text -> CLIP features.

    pipe = Blip3oPipeline.from_pretrained("outputs/toy")            # local dir: no network
    images = pipe(["a red circle", "two blue squares"], num_images_per_prompt=2, seed=42).images
    feats = pipe.embed(["a red circle"])                              # (B, 64, C) target tokens
    answer = pipe.understand(image, "What is in the image?")
    edited = pipe.edit(image, "make the circle blue", seed=0).images
    out = pipe(["the fruit monkeys like, in the colour of the sky"], reason=True)   # out.reasoning[0]
    chat = pipe.chat(max_images=4)                                    # multi-turn: see blip3o/chat.py
    chat.send("a red circle", mode="image"); chat.send("now make it blue", mode="edit")
    ranking = pipe.classify(image, ["cat", "dog", "bird"])           # [(label, score)], best first

Stage 1 (queries + DiT) and stage 2 (the diffusion decoder) each have their own guidance scale and
step count. Seeds are per image (``seed + i`` for image i, or a list of generators), so an image
does not depend on what else is in the batch.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
from PIL import Image

from blip3o.chat import CLASSIFY_PROMPT, Blip3oChat, classify, with_reasoning
from blip3o.decoders import load_decoder as _load_decoder  # from_pretrained has a load_decoder flag
from blip3o.images import to_pil
from blip3o.models.loading import load_generation_model
from blip3o.models.targets import TARGETS
from blip3o.models.understanding import load_image_processor
from blip3o.prompts import encode_edit_prompts, get_template

logger = logging.getLogger(__name__)


@dataclass
class Blip3oPipelineOutput:
    images: List[Image.Image]
    features: torch.Tensor  # (N, C, h, w) generated target features
    reasoning: Optional[List[str]] = None  # per prompt, with reason=True: what the backbone decided to draw


def _dtype(d):
    if d is None or isinstance(d, torch.dtype):
        return d
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if d not in table:
        raise ValueError(f"unknown dtype '{d}'; choose one of {sorted(table)}")
    return table[d]


class Blip3oPipeline:
    def __init__(self, model, decoder=None, device: Union[str, torch.device] = "cpu"):
        self.model = model
        self.decoder = decoder
        self.device = torch.device(device)
        self._offload = False

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], device: Union[str, torch.device, None] = None,
                        dtype=None, decoder_path: Optional[str] = None, load_decoder: bool = True):
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {path}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a model directory")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _dtype(dtype)
        model = load_generation_model(path)  # BLIP3-o (ours or official layout) or transfusion / lmfusion
        if dtype is not None:
            model.to(dtype)
        model.to(device).eval()
        decoder = None
        if load_decoder:
            dpath = decoder_path or model.config.decoder_path
            if dpath and not os.path.isabs(dpath):
                dpath = str(path / dpath)
            if dpath is None and (path / "diffusion-decoder").is_dir():
                dpath = str(path / "diffusion-decoder")
            if dpath and os.path.isdir(dpath):
                decoder = _load_decoder(dpath, torch_dtype=dtype)
                decoder.to(device)
        return cls(model, decoder, device)

    def enable_model_cpu_offload(self):
        """Keep only the stage that runs on the GPU (backbone+DiT, then the decoder): for small GPUs."""
        self._offload = True
        self.model.to("cpu")
        if self.decoder is not None:
            self.decoder.to("cpu")
        return self

    def _stage(self, module):
        if self._offload and module is not None:
            module.to(self.device)

    def _unstage(self, module):
        if self._offload and module is not None:
            module.to("cpu")

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _generators(n: int, seed: Optional[int], generator):
        if generator is not None:
            gens = generator if isinstance(generator, (list, tuple)) else [generator]
            if len(gens) != n:
                raise ValueError(f"got {len(gens)} generators for {n} images")
            return list(gens)
        seed = torch.seed() % (2 ** 31) if seed is None else seed
        return [torch.Generator().manual_seed(seed + i) for i in range(n)]

    def check_image_size(self, height: Optional[int], width: Optional[int]) -> None:
        """Raises ValueError (one line) unless the pixel stage can make height x width images."""
        if height is None and width is None:
            return
        if self.decoder is not None:
            d = self.decoder.default_image_size
            self.decoder.check_image_size(int(height or d), int(width or d))
        elif self.has_decoder():
            raise ValueError("this checkpoint's images are its VAE latents decoded at their trained size; "
                             "height/width cannot change it")
        else:
            raise ValueError("height/width need a pixel decoder, and this checkpoint has none")

    def has_decoder(self) -> bool:
        return self.decoder is not None or TARGETS.get(self.model.config.target).decodes_to_pixels

    def decode(self, feats: torch.Tensor, generators, guidance_scale: Optional[float] = None,
               num_inference_steps: Optional[int] = None, height: Optional[int] = None,
               width: Optional[int] = None) -> List[Image.Image]:
        if self.decoder is not None:
            self._stage(self.decoder)
            tokens = feats.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C), row-major as the reference
            kw = {}
            if guidance_scale is not None:
                kw["guidance_scale"] = guidance_scale
            if num_inference_steps is not None:
                kw["num_inference_steps"] = num_inference_steps
            out = self.decoder(tokens.to(self.device), generator=generators, height=height, width=width,
                               output_type="pil", **kw)
            self._unstage(self.decoder)
            return list(out.images if hasattr(out, "images") else out)
        if TARGETS.get(self.model.config.target).decodes_to_pixels:
            return to_pil(self.model.target_encoder.decode(feats.to(self.device)).clamp(-1, 1))
        raise RuntimeError("this checkpoint has no pixel decoder (diffusion-decoder/); use embed() for features")

    # -- text -> image ---------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, prompts: Union[str, Sequence[str]], num_images_per_prompt: int = 1, seed: Optional[int] = None,
              generator=None, guidance_scale: Optional[float] = None, num_inference_steps: Optional[int] = None,
              progress=None) -> torch.Tensor:
        """Prompt(s) -> generated target features (N, C, h, w) without decoding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        n = len(prompts) * num_images_per_prompt
        gens = self._generators(n, seed, generator)
        self._stage(self.model)
        feats = self.model.generate_features(prompts, generator=gens, guidance_scale=guidance_scale,
                                             num_inference_steps=num_inference_steps,
                                             num_images_per_prompt=num_images_per_prompt, progress=progress)
        self._unstage(self.model)
        return feats

    @torch.no_grad()
    def __call__(self, prompts: Union[str, Sequence[str]], num_images_per_prompt: int = 1,
                 seed: Optional[int] = None, generator=None, guidance_scale: Optional[float] = None,
                 num_inference_steps: Optional[int] = None, decoder_guidance_scale: Optional[float] = None,
                 decoder_num_inference_steps: Optional[int] = None, height: Optional[int] = None,
                 width: Optional[int] = None, progress=None, reason: bool = False) -> Blip3oPipelineOutput:
        """Prompt(s) -> images. ``reason=True``: the backbone first writes a short description of what to draw
        for each prompt, and the queries read the prompt plus that description (returned as ``reasoning``)."""
        reasoning = None
        if reason:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            reasoning = self.reason(prompts)
            prompts = [with_reasoning(p, r) for p, r in zip(prompts, reasoning)]
        feats = self.embed(prompts, num_images_per_prompt, seed, generator, guidance_scale, num_inference_steps,
                           progress)
        # The decoder gets its own per-image generators, derived from the same seeds.
        dgens = self._generators(feats.shape[0], seed if seed is not None else None, None) if generator is None \
            else [torch.Generator().manual_seed(int(g.initial_seed()) + 10 ** 6) for g in generator]
        images = self.decode(feats, dgens, decoder_guidance_scale, decoder_num_inference_steps, height, width)
        return Blip3oPipelineOutput(images=images, features=feats, reasoning=reasoning)

    # -- conversation, reasoning, classification (blip3o/chat.py) --------------------------------------------
    def chat(self, **kwargs):
        """A new conversation (Blip3oChat): multi-turn text and images; kwargs: max_images, max_tokens, truncate..."""
        return Blip3oChat(self, **kwargs)

    @torch.no_grad()
    def reason(self, prompts: Union[str, Sequence[str]], max_new_tokens: int = 96) -> List[str]:
        """The backbone's short explicit description (objects, attributes, layout) of what to draw per prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        chat = Blip3oChat(self, reason_max_new_tokens=max_new_tokens)
        self._stage(self.model)
        out = [chat.reason(p) for p in prompts]
        self._unstage(self.model)
        return out

    @torch.no_grad()
    def classify(self, image, labels: Sequence[str], question: Optional[str] = None):
        """Zero-shot: ``labels`` ranked by length-normalised log-likelihood as the answer -> [(label, score)]."""
        return classify(self, image, labels, question or CLASSIFY_PROMPT)

    # -- image -> text -----------------------------------------------------------------------------------
    @torch.no_grad()
    def understand(self, image: Union[Image.Image, Sequence[Image.Image]], question: Union[str, Sequence[str]],
                   max_new_tokens: int = 128) -> Union[str, List[str]]:
        single = isinstance(image, Image.Image)
        images = [image] if single else list(image)
        questions = [question] * len(images) if isinstance(question, str) else list(question)
        self._stage(self.model)
        answers = self.model.understand(images, questions, max_new_tokens=max_new_tokens)
        self._unstage(self.model)
        return answers[0] if single else answers

    # -- image + instruction -> image --------------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, image: Image.Image, instruction: str, num_images: int = 1, seed: Optional[int] = None,
             generator=None, guidance_scale: Optional[float] = None, num_inference_steps: Optional[int] = None,
             decoder_guidance_scale: Optional[float] = None, height=None, width=None) -> Blip3oPipelineOutput:
        m = self.model
        ip = load_image_processor(m)
        vis = ip(images=[image.convert("RGB")], return_tensors="pt")
        merge = getattr(ip, "merge_size", 2)
        n_tok = int(vis["image_grid_thw"][0].prod()) // (merge * merge)
        enc = encode_edit_prompts(m.tokenizer, [instruction], [n_tok], get_template(m.config.chat_template),
                                  num_queries=m.config.num_queries)
        gens = self._generators(num_images, seed, generator)
        self._stage(m)
        feats = m.generate_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                    pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"],
                                    generator=gens, guidance_scale=guidance_scale,
                                    num_inference_steps=num_inference_steps, num_images_per_prompt=num_images)
        self._unstage(m)
        dgens = self._generators(num_images, None if seed is None else seed + 10 ** 6, None)
        images = self.decode(feats, dgens, decoder_guidance_scale, None, height, width)
        return Blip3oPipelineOutput(images=images, features=feats)
