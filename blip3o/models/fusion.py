"""Transfusion and LMFusion: the backbone itself denoises the image's VAE latents (``model.generator``).

Instead of BLIP3-o's queries + separate DiT, one transformer reads text and image in one sequence:

    [pad ... pad] <chat prompt with the caption> [IMG] z_1 ... z_N [/IMG]
                  └──── text: causal, LM loss ────┘ └─ image block ─┘
    z_i = patch_in(patchify(x_t))_i + pos_i + time_embed(t)      (x_t: noised latents, p x p patches)
    backbone layers (our own loop over its decoder layers, one block-causal mask)
    -> outputs at z_1..z_N -> patch_out -> unpatchify -> velocity (eps - x0), flow-matching loss

Attention (``fusion_attention_mask``): causal over the sequence, bidirectional inside each image block,
padding masked; so no text token sees a later image, and the prompt before an image never sees it.

* ``transfusion`` (Zhou et al. 2024): one set of weights for both modalities; the backbone trains (full
  fine-tune, or LoRA adapters with ``lora_rank > 0``); loss = image_loss_weight * flow loss +
  text_loss_weight * LM loss on the caption tokens (and the template tokens that close the turn).
* ``lmfusion`` (Shi et al. 2024): the pretrained text weights stay frozen; each decoder layer gets an
  image expert (copies of its q/k/v/o projections, q/k norms where present, MLP and both norms, plus a
  copy of the final norm), initialised from the text weights and trained. Text tokens use the text
  weights, image tokens the expert; both meet in ONE attention over the whole sequence. Text-only
  behaviour is exactly the frozen backbone's.

Positions: plain 1-D positions counting real tokens (left padding skipped). Qwen2.5-VL's language model
uses M-RoPE; we give all three sections (t, h, w) the same 1-D index, which makes M-RoPE equal to
ordinary RoPE and keeps text positions identical to its text-only path. (Qwen2.5-VL's own 3-D image
positions belong to its vision tower's tokens, which are not used here.) The image patches' 2-D layout
is carried by a learned position embedding.

Sampling: the prompt (and, for CFG, the empty-caption prompt in the same batch) runs once and its
per-layer keys/values are cached; each Euler step runs only the N image tokens against that cache
(valid because the prompt never attends to the image). Same sampler and sigma schedule as
``blip3o/sampling.py``; latents decode through the VAE target.

Shape vocabulary: B batch, L prompt length (left padded), N image tokens ((h/p)(w/p)), S = L + N + 1,
H backbone width, C latent channels, h x w latent grid, p patch size.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from blip3o.models.backbone import get_backbone
from blip3o.models.blip3o import GENERATORS, GeneratorModelMixin, add_lora_adapters
from blip3o.models.fusion_config import FUSION_GENERATORS, FusionConfig  # noqa: F401  (public here too)
from blip3o.models.fusion_layers import TimestepEmbedder, _rope, _route, fusion_attention_mask, patchify, unpatchify
from blip3o.models.understanding import build_understanding_inputs
from blip3o.objectives import build_objective
from blip3o.prompts import left_pad, tokenize_for_generation
from blip3o.sampling import Predictors

@dataclass
class FusionOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    image_loss: Optional[torch.Tensor] = None
    text_loss: Optional[torch.Tensor] = None
    parts: Optional[Dict[str, torch.Tensor]] = None


class _PrefixCache:
    """Per-layer keys/values of the prompt, its key mask, and the position of the first image token; plus
    the image block's rotary tables and key mask, which are the same at every Euler step (built on first use)."""

    def __init__(self, kv, valid, next_pos):
        self.kv, self.valid, self.next_pos = kv, valid, next_pos
        self.image_rope = None
        self.image_mask = None


class Blip3oFusionForConditionalGeneration(GeneratorModelMixin, PreTrainedModel):
    config_class = FusionConfig
    base_model_prefix = "fusion"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: FusionConfig, backbone: Optional[nn.Module] = None):
        super().__init__(config)
        if config.generator_type not in FUSION_GENERATORS:
            raise ValueError(f"generator '{config.generator_type}' is not one of {list(FUSION_GENERATORS)}")
        self.adapter = get_backbone(config.backbone)
        self.backbone = backbone if backbone is not None else self.adapter.from_config(
            config.backbone_config, attn_implementation=config.attn_implementation_backbone)
        dec = self.decoder_stack
        hidden = self.adapter.hidden_size(self.backbone)
        c, (h, w), p = config.target_channels, config.target_grid, config.patch_size
        if h % p or w % p:
            raise ValueError(f"model.fusion_patch_size: the {h}x{w} latent grid is not divisible by {p}")
        self.num_image_tokens = (h // p) * (w // p)
        self.patch_in = nn.Linear(c * p * p, hidden)
        self.image_pos = nn.Parameter(torch.randn(1, self.num_image_tokens, hidden) * 0.02)
        self.time_embed = TimestepEmbedder(hidden)
        self.patch_out = nn.Linear(hidden, c * p * p)
        # Zero output projection: the first prediction is 0, as DiT's final layer (stable start).
        nn.init.zeros_(self.patch_out.weight)
        nn.init.zeros_(self.patch_out.bias)
        if config.generator_type == "lmfusion":
            # The image expert: a copy of every decoder layer's modality-specific weights + the final norm.
            self.image_layers = nn.ModuleList(copy.deepcopy(layer) for layer in dec.layers)
            self.image_norm = copy.deepcopy(dec.norm)
        elif config.lora_rank > 0:
            add_lora_adapters(dec.layers, config.lora_rank, config.lora_alpha)
        self.register_buffer("target_mean", torch.zeros(c))
        self.register_buffer("target_std", torch.ones(c))
        self.objective = build_objective(config.objective, **config.objective_kwargs)
        self.tokenizer = None
        self.image_processor = None
        self.__dict__["_target_encoder"] = None
        self._source_dir: Optional[str] = None
        self._gradient_checkpointing = False
        self.apply_recipe()
        self.post_init()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _init_weights(self, module):
        pass  # pretrained backbone, copied experts and new projections all initialise themselves

    @property
    def decoder_stack(self) -> nn.Module:
        return self.adapter.decoder(self.backbone)

    @property
    def prompt_reserve(self) -> int:
        """Sequence slots after the prompt (the image block and [/IMG]): prompts are cut to fit the rest."""
        return self.num_image_tokens + 1

    @property
    def is_lmfusion(self) -> bool:
        return self.config.generator_type == "lmfusion"

    def _new_modules(self) -> List[nn.Module]:
        return [self.patch_in, self.time_embed, self.patch_out]

    def apply_recipe(self) -> None:
        """transfusion: the backbone's language model (or its LoRA adapters) + projections train;
        lmfusion: only the image expert + projections. A vision tower, if any, stays frozen."""
        self.backbone.requires_grad_(False)
        if self.is_lmfusion:
            self.image_layers.requires_grad_(True)
            self.image_norm.requires_grad_(True)
        elif self.config.lora_rank > 0:
            for n, p in self.decoder_stack.named_parameters():
                p.requires_grad_("lora_" in n)
        else:
            self.decoder_stack.requires_grad_(True)
            if self.config.text_loss_weight > 0:  # an untied lm_head only gets gradients from the text loss
                self.backbone.get_output_embeddings().requires_grad_(True)
        for m in self._new_modules():
            m.requires_grad_(True)
        self.image_pos.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.is_lmfusion:
            self.backbone.eval()  # frozen text weights never run in train mode
        return self

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self._gradient_checkpointing = bool(enabled)

    def flops_per_sample(self, prompt_tokens: int = 64) -> Dict[str, float]:
        """Rough matmul FLOPs of one training sample (6 N per trained token, 2 N per frozen forward)."""
        dec = self.decoder_stack
        layers = sum(p.numel() for n, p in dec.layers.named_parameters() if "lora_" not in n)
        n_img = self.num_image_tokens
        seq = prompt_tokens + n_img + 1
        new = sum(p.numel() for m in self._new_modules() for p in m.parameters()) * n_img
        if self.is_lmfusion:
            return {"trainable": 6.0 * (layers * n_img + new), "frozen": 2.0 * layers * (prompt_tokens + 1)}
        if self.config.lora_rank > 0:
            return {"trainable": 6.0 * new, "frozen": 4.0 * layers * seq}
        return {"trainable": 6.0 * (layers * seq + new), "frozen": 0.0}

    # -- the transformer -------------------------------------------------------------------------------
    def _image_layer(self, i: int) -> nn.Module:
        return self.image_layers[i] if self.is_lmfusion else self.decoder_stack.layers[i]

    def _image_norm(self) -> nn.Module:
        return self.image_norm if self.is_lmfusion else self.decoder_stack.norm

    def _layer(self, lt: nn.Module, li: nn.Module, x, cos, sin, mask, split, past=None):
        """One pre-norm decoder layer with modality routing: text tokens through ``lt``'s weights, image
        tokens through ``li``'s, one attention over all of them (plus cached prefix keys/values)."""
        at, ai = lt.self_attn, li.self_attn
        b, s, _ = x.shape
        hd = at.head_dim
        h = _route(split, x, lt.input_layernorm, li.input_layernorm)
        q = _route(split, h, at.q_proj, ai.q_proj).view(b, s, -1, hd)
        k = _route(split, h, at.k_proj, ai.k_proj).view(b, s, -1, hd)
        v = _route(split, h, at.v_proj, ai.v_proj).view(b, s, -1, hd)
        if getattr(at, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm on q and k
            q = _route(split, q, at.q_norm, ai.q_norm)
            k = _route(split, k, at.k_norm, ai.k_norm)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _rope(q, k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        kv = (k, v)
        g = at.num_key_value_groups
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=at.scaling)
        o = o.transpose(1, 2).reshape(b, s, -1)
        x = x + _route(split, o, at.o_proj, ai.o_proj)
        h = _route(split, x, lt.post_attention_layernorm, li.post_attention_layernorm)
        x = x + _route(split, h, lt.mlp, li.mlp)
        return x, kv

    def _run(self, x, cos, sin, mask, split, image_only: bool = False, cache: Optional[_PrefixCache] = None,
             keep_kv: bool = False):
        dec = self.decoder_stack
        kvs = []
        for i, lt in enumerate(dec.layers):
            if image_only:
                lt = self._image_layer(i)
            li = self._image_layer(i) if split is not None else lt
            past = cache.kv[i] if cache is not None else None
            if self._gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, kv = checkpoint(self._layer, lt, li, x, cos, sin, mask, split, past, use_reentrant=False)
            else:
                x, kv = self._layer(lt, li, x, cos, sin, mask, split, past)
            if keep_kv:
                kvs.append(kv)
        return x, kvs

    def _embed_image(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_in.weight.dtype
        tok = self.patch_in(patchify(xt.to(dtype), self.config.patch_size))
        return tok + self.image_pos.to(dtype) + self.time_embed(t).to(dtype)[:, None]

    def _image_out(self, hidden: torch.Tensor) -> torch.Tensor:
        c, (h, w) = self.config.target_channels, self.config.target_grid
        return unpatchify(self.patch_out(hidden), self.config.patch_size, c, h, w).float()

    def forward_sequence(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, xt: torch.Tensor,
                         t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt (B, L) + noised latents x_t at timesteps t (0..1000) -> (post-norm hidden states of the
        prompt (B, L, H), predicted velocity (B, C, h, w)). Sequence: prompt, N image tokens, [/IMG]."""
        dec = self.decoder_stack
        b, L = input_ids.shape
        n = self.num_image_tokens
        emb = self.adapter.embeddings(self.backbone)
        end_id = self.config.img_end_token_id
        end = emb(input_ids.new_full((b, 1), end_id if end_id is not None else self.config.prompt_pad_id))
        x = torch.cat([emb(input_ids), self._embed_image(xt, t).to(end.dtype), end], dim=1)
        s = x.shape[1]
        valid = torch.cat([attention_mask.long(), attention_mask.new_ones((b, n + 1), dtype=torch.long)], dim=1)
        blk = torch.zeros(s, dtype=torch.long, device=x.device)
        blk[L:L + n] = 1
        mask = fusion_attention_mask(valid, blk)
        pos = (valid.cumsum(-1) - 1).clamp_min(0)  # left padding: positions count real tokens only
        cos, sin = dec.rotary_emb(x, pos)
        split = None
        if self.is_lmfusion:
            is_img = blk > 0
            ti, ii = (~is_img).nonzero().squeeze(1), is_img.nonzero().squeeze(1)
            split = (ti, ii, torch.argsort(torch.cat([ti, ii])))
        x, _ = self._run(x, cos, sin, mask, split)
        x = _route(split, x, dec.norm, self._image_norm())
        return x[:, :L], self._image_out(x[:, L:L + n])

    def text_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only logits through this model's own layer loop (text weights): (B, L, vocab)."""
        h, _ = self._prefix(input_ids, attention_mask, keep_kv=False)
        return self.backbone.get_output_embeddings()(self.decoder_stack.norm(h)).float()

    def _prefix(self, input_ids, attention_mask, keep_kv=True):
        dec = self.decoder_stack
        x = self.adapter.embeddings(self.backbone)(input_ids)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        cos, sin = dec.rotary_emb(x, pos)
        mask = fusion_attention_mask(attention_mask, torch.zeros(x.shape[1], dtype=torch.long, device=x.device))
        return self._run(x, cos, sin, mask, None, keep_kv=keep_kv)

    @torch.no_grad()
    def prefix_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _PrefixCache:
        _, kvs = self._prefix(input_ids, attention_mask, keep_kv=True)
        return _PrefixCache(kvs, attention_mask.bool(), attention_mask.long().sum(-1))

    def image_velocity(self, xt: torch.Tensor, t: torch.Tensor, cache: _PrefixCache) -> torch.Tensor:
        """Velocity for x_t given a cached prompt: only the N image tokens run through the layers."""
        b, n = xt.shape[0], self.num_image_tokens
        x = self._embed_image(xt, t)
        if cache.image_rope is None or cache.image_rope[0].dtype != x.dtype:
            pos = cache.next_pos[:, None] + torch.arange(n, device=x.device)[None]
            cache.image_rope = self.decoder_stack.rotary_emb(x, pos)
            keys = torch.cat([cache.valid, cache.valid.new_ones((b, n))], dim=1)
            cache.image_mask = keys[:, None, None, :].expand(b, 1, n, keys.shape[1])
        cos, sin = cache.image_rope
        x, _ = self._run(x, cos, sin, cache.image_mask, None, image_only=True, cache=cache)
        return self._image_out(self._image_norm()(x))

    # -- training -------------------------------------------------------------------------------
    def _drop_captions(self, input_ids, attention_mask, drop):
        """Replaces the prompts of rows where ``drop`` by the empty-caption prompt (left padded to L)."""
        u = torch.tensor(self.config.uncond_input_ids, dtype=input_ids.dtype, device=input_ids.device)
        L = input_ids.shape[1]
        if len(u) > L or len(u) == 0:
            return input_ids, attention_mask
        ids = input_ids.new_full((L,), self.config.prompt_pad_id)
        ids[L - len(u):] = u
        m = attention_mask.new_zeros((L,))
        m[L - len(u):] = 1
        d = drop.to(input_ids.device)[:, None]
        return torch.where(d, ids[None], input_ids), torch.where(d, m[None], attention_mask)

    def lm_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token loss on the caption and the closing template tokens (not the fixed system/instruction
        head), from the post-norm prompt states; logits only where there is a label."""
        b, L = input_ids.shape
        first = L - attention_mask.long().sum(-1)
        start = (first + self.config.prompt_head_len).clamp_min(1)
        target = torch.arange(L, device=input_ids.device)[None] >= start[:, None]  # (B, L) label positions
        sel = target[:, 1:]
        logits = self.backbone.get_output_embeddings()(hidden[:, :-1][sel]).float()
        return F.cross_entropy(logits, input_ids[:, 1:][sel])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: Optional[torch.Tensor] = None, target_latents: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, **unused) -> FusionOutput:
        if target_latents is None:
            if pixel_values is None:
                raise ValueError("forward needs pixel_values (encoded by the VAE target) or target_latents")
            with torch.no_grad():
                target_latents = self.target_encoder.encode(pixel_values)
        x0 = self.normalize_target(target_latents.float())
        if self.training and self.config.cfg_dropout > 0:
            # CFG: the caption is dropped (the empty-caption prompt), which the sampler's uncond half feeds.
            drop = torch.rand(input_ids.shape[0], generator=generator) < self.config.cfg_dropout
            input_ids, attention_mask = self._drop_captions(input_ids, attention_mask, drop)
        stash = {}

        def net(xt, t, cond, cond_mask):
            stash["text"], v = self.forward_sequence(input_ids, attention_mask, xt, t)
            return v

        image_loss, parts = self.objective.loss(net, x0, x0.new_zeros(x0.shape[0], 1), None, generator)
        loss = self.config.image_loss_weight * image_loss
        text_loss = None
        if not self.is_lmfusion and self.config.text_loss_weight > 0:
            text_loss = self.lm_loss(stash["text"], input_ids, attention_mask)
            loss = loss + self.config.text_loss_weight * text_loss
            parts = dict(parts, text_loss=text_loss.detach())
        return FusionOutput(loss=loss, image_loss=image_loss.detach(), text_loss=text_loss, parts=parts)

    # -- generation -----------------------------------------------------------------------------
    def tokenize_prompts(self, prompts: Sequence[str], tokenizer=None) -> Dict[str, torch.Tensor]:
        return tokenize_for_generation(tokenizer or self.tokenizer, prompts, self.config.chat_template,
                                       getattr(self.config, "inference_max_length", 0), self.prompt_reserve)

    @torch.no_grad()
    def generate_features(
        self,
        prompts: Optional[Sequence[str]] = None,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        tokenizer=None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]] = None,
        num_images_per_prompt: int = 1,
        progress=None,
        **unused,
    ) -> torch.Tensor:
        """Samples latents (B * num_images_per_prompt, C, h, w): the prompt is cached once, cond and
        uncond (empty caption) run in one batch per Euler step; per-sample generators as Blip3o's."""
        if unused.get("pixel_values") is not None:
            raise ValueError("image-conditioned generation is not supported by the fusion generators")
        if input_ids is None:
            enc = self.tokenize_prompts(prompts, tokenizer)
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        if num_images_per_prompt > 1:
            input_ids = input_ids.repeat_interleave(num_images_per_prompt, 0)
            attention_mask = attention_mask.repeat_interleave(num_images_per_prompt, 0)
        b = input_ids.shape[0]
        g = self.config.guidance_scale if guidance_scale is None else guidance_scale
        rows = [r[m.bool()].tolist() for r, m in zip(input_ids, attention_mask)]
        dev = self.patch_in.weight.device

        def cache_of(rows):
            enc = left_pad(rows, self.config.prompt_pad_id)
            return self.prefix_cache(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))

        if g == 1.0:
            cache = cache_of(rows)
            predict = Predictors(cond=lambda x, t: self.image_velocity(x, t, cache))
        else:  # one cache of [empty captions; prompts], so a guided step is one forward of the doubled batch
            both_cache = cache_of([list(self.config.uncond_input_ids)] * b + rows)

            def both(x, t):
                v_u, v_c = self.image_velocity(torch.cat([x, x]), torch.cat([t, t]), both_cache).chunk(2)
                return v_c, v_u

            predict = Predictors(both=both)
        c, (h, w) = self.config.target_channels, self.config.target_grid
        x = self.objective.sample_from(predict, (b, c, h, w), dev,
                                       num_steps=num_inference_steps or self.config.num_inference_steps,
                                       guidance_scale=g, generator=generator, progress=progress,
                                       guidance_rescale=self.config.guidance_rescale)
        return self.denormalize_target(x.float())

    @torch.no_grad()
    def understand(self, images, questions: Sequence[str], processor=None, max_new_tokens: int = 64,
                   do_sample: bool = False) -> List[str]:
        """Image + question -> answer through the backbone's own chat (LMFusion: the untouched backbone)."""
        enc = {k: v.to(self.device) if torch.is_tensor(v) else v
               for k, v in build_understanding_inputs(self, images, questions, processor).items()}
        out = self.backbone.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(f"model directory '{path}' not found (and HF_HUB_OFFLINE=1 forbids the hub)")
        model = super().from_pretrained(path, *args, **kwargs)
        model._load_side_files(path)
        return model


for _name in FUSION_GENERATORS:
    GENERATORS.register(_name)(Blip3oFusionForConditionalGeneration)
AutoConfig.register(FusionConfig.model_type, FusionConfig)
AutoModel.register(FusionConfig, Blip3oFusionForConditionalGeneration)
