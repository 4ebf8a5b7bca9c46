"""Blip3oConfig + Blip3oForConditionalGeneration: prompt -> backbone + 64 queries -> DiT -> target features.

Shape vocabulary: B batch, L prompt length (left padded), Q queries (64), H backbone width,
C target channels (1792 for EVA-CLIP-E), h x w target grid (8 x 8).

    input_ids (B, L) --embed--> (B, L, H) ++ latent_queries (B, Q, H)
        --backbone decoder (causal, left-pad aware positions)--> post-norm states (B, L+Q, H)
        --last Q--> cond (B, Q, H)  (zeroed for cfg_dropout of the samples while training)
    x0 (B, C, h, w) from the frozen target encoder (or a feature cache)
    objective(DiT, x0, cond) -> loss       |   objective.sample(DiT, cond) -> x0_hat

What trains: in the sequential recipe (the paper's) only ``latent_queries`` and ``dit``; the joint
recipe also unfreezes the backbone and adds its language-modelling loss on understanding data.
The target encoder and pixel decoder are separate frozen components (like the VAE in diffusers'
training scripts); a saved model directory carries them in ``target_encoder/`` and
``diffusion-decoder/`` so it is self-contained.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from blip3o.models.backbone import get_backbone
from blip3o.models.dit import DiTConfig, NextDiT
from blip3o.models.targets import load_target_encoder
from blip3o.models.understanding import answer
from blip3o.objectives import build_objective, saved_settings
from blip3o.prompts import tokenize_for_generation
from blip3o.registry import Registry
from blip3o.sampling import zeroed_condition

logger = logging.getLogger(__name__)

# The language model's attention and MLP projections that LoRA adapters wrap (joint recipe, transfusion).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora_adapters(layers: nn.Module, rank: int, alpha: float) -> None:
    """peft LoRA adapters (rank, alpha, no dropout) on ``LORA_TARGETS`` inside ``layers``."""
    # peft is imported here, not at the top: only LoRA runs need it, so the package is not required otherwise.
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS)),
                            layers)


@dataclass(frozen=True)
class Recipe:
    trains_backbone: bool  # besides the queries and the DiT; then with its language-modelling loss


# model.recipe: what trains. sequential is the paper's (frozen backbone).
RECIPES: "Registry[Recipe]" = Registry("recipe")
RECIPES.register("sequential")(Recipe(trains_backbone=False))
RECIPES.register("joint")(Recipe(trains_backbone=True))
# model.generator -> model class; blip3o/models/fusion.py registers transfusion and lmfusion.
GENERATORS: "Registry[type]" = Registry("generator")


class Blip3oConfig(PretrainedConfig):
    model_type = "blip3o"

    def __init__(
        self,
        backbone: str = "qwen2_5_vl",
        backbone_config: Optional[Dict[str, Any]] = None,
        backbone_path: Optional[str] = None,
        recipe: str = "sequential",
        num_queries: int = 64,
        query_init_std: float = 1.0,
        dit_config: Optional[Dict[str, Any]] = None,
        target: str = "eva_clip",
        target_channels: int = 1792,
        target_grid: Sequence[int] = (8, 8),
        target_path: Optional[str] = None,
        target_norm: str = "none",
        objective: str = "flow",
        objective_kwargs: Optional[Dict[str, Any]] = None,
        cfg_dropout: float = 0.1,
        text_loss_weight: float = 0.0,
        decoder: str = "sdxl",
        decoder_path: Optional[str] = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 3.0,
        guidance_rescale: float = 0.0,
        max_prompt_length: int = 512,
        inference_max_length: int = 0,
        chat_template: str = "chatml",
        img_token_id: Optional[int] = None,
        attn_implementation_backbone: str = "sdpa",
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        **kwargs,
    ):
        self.backbone = backbone
        self.backbone_config = backbone_config or {}
        self.backbone_path = backbone_path
        self.recipe = recipe
        self.num_queries = num_queries
        self.query_init_std = query_init_std
        self.dit_config = dit_config or {}
        self.target = target
        self.target_channels = target_channels
        self.target_grid = list(target_grid)
        self.target_path = target_path
        self.target_norm = target_norm
        self.objective = objective
        self.objective_kwargs = saved_settings(objective, objective_kwargs or {})  # older dirs: flat flow settings
        self.cfg_dropout = cfg_dropout
        self.text_loss_weight = text_loss_weight
        self.decoder = decoder
        self.decoder_path = decoder_path
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.max_prompt_length = max_prompt_length  # training prompts (queries included) are cut to this
        self.inference_max_length = inference_max_length  # 0: never cut at inference, as the original
        self.chat_template = chat_template
        self.img_token_id = img_token_id
        self.attn_implementation_backbone = attn_implementation_backbone
        self.lora_rank = lora_rank  # joint recipe: > 0 trains peft LoRA adapters instead of the whole backbone
        self.lora_alpha = lora_alpha
        super().__init__(**kwargs)

    @property
    def freeze_backbone(self) -> bool:
        return not RECIPES.get(self.recipe).trains_backbone


@dataclass
class Blip3oOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    image_loss: Optional[torch.Tensor] = None
    text_loss: Optional[torch.Tensor] = None
    parts: Optional[Dict[str, torch.Tensor]] = None


class GeneratorModelMixin:
    """What every generator model (BLIP3-o, transfusion, lmfusion) shares: the frozen target encoder kept
    outside the state dict, target normalisation buffers (``target_mean``/``target_std``), and a
    self-contained save directory (weights + tokenizer + image processor + target_encoder/)."""

    @property
    def target_encoder(self):
        """The frozen target encoder, loaded on first use from ``config.target_path`` (relative paths
        are resolved against the directory the model was loaded from)."""
        if self._target_encoder is None:
            path = self.config.target_path
            if path is None:
                raise RuntimeError("this model has no target encoder attached and config.target_path is empty")
            if self._source_dir and not os.path.isabs(path) and (Path(self._source_dir) / path).is_dir():
                path = str(Path(self._source_dir) / path)
            self.attach_target_encoder(load_target_encoder(path).to(self.device))
        return self._target_encoder

    def attach_target_encoder(self, encoder) -> None:
        # Kept out of nn.Module's registry on purpose: the frozen encoder is a separate component
        # (saved in target_encoder/), not part of this model's state dict or optimizer.
        self.__dict__["_target_encoder"] = encoder

    def normalize_target(self, x0: torch.Tensor) -> torch.Tensor:
        if self.config.target_norm == "none":
            return x0
        shape = (1, -1) + (1,) * (x0.dim() - 2)
        return (x0 - self.target_mean.view(shape)) / self.target_std.view(shape)

    def denormalize_target(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.target_norm == "none":
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.target_std.view(shape) + self.target_mean.view(shape)

    @torch.no_grad()
    def init_target_stats(self, x0: torch.Tensor) -> None:
        """Per-channel mean/std from a batch of raw targets (used with target_norm='channel')."""
        dims = [0] + list(range(2, x0.dim()))
        self.target_mean.copy_(x0.float().mean(dims))
        self.target_std.copy_(x0.float().std(dims).clamp_min(1e-6))

    def save_pretrained(self, save_directory, save_target_encoder: bool = True, **kwargs):
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        if save_target_encoder and self._target_encoder is not None:
            self._target_encoder.save_pretrained(str(save_directory / "target_encoder"))
            self.config.target_path = "target_encoder"
        super().save_pretrained(str(save_directory), **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(save_directory))
        if self.image_processor is not None:
            self.image_processor.save_pretrained(str(save_directory))

    def _load_side_files(self, path: str) -> None:
        """After from_pretrained: remember the source dir (relative target paths), re-apply the recipe,
        load the tokenizer (left padding) and image processor saved beside the weights."""
        self._source_dir = path if os.path.isdir(path) else None
        self.apply_recipe()
        if self._source_dir and (Path(path) / "tokenizer_config.json").is_file():
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.tokenizer.padding_side = "left"
        if self._source_dir and (Path(path) / "preprocessor_config.json").is_file():
            self.image_processor = AutoImageProcessor.from_pretrained(path)


@GENERATORS.register("blip3o")
class Blip3oForConditionalGeneration(GeneratorModelMixin, PreTrainedModel):
    config_class = Blip3oConfig
    base_model_prefix = "blip3o"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    main_input_name = "input_ids"

    def __init__(self, config: Blip3oConfig, backbone: Optional[nn.Module] = None):
        super().__init__(config)
        self.adapter = get_backbone(config.backbone)
        self.backbone = backbone if backbone is not None else self.adapter.from_config(
            config.backbone_config, attn_implementation=config.attn_implementation_backbone)
        if config.lora_rank > 0:
            self.add_lora(config.lora_rank, config.lora_alpha)
        hidden = self.adapter.hidden_size(self.backbone)
        self.latent_queries = nn.Parameter(torch.randn(1, config.num_queries, hidden) * config.query_init_std)
        self.dit = NextDiT(DiTConfig.from_dict(config.dit_config))
        c = config.target_channels
        # Per-channel target statistics for target_norm="channel" (identity otherwise); persisted so
        # sampling de-normalises exactly as training normalised.
        self.register_buffer("target_mean", torch.zeros(c))
        self.register_buffer("target_std", torch.ones(c))
        self.objective = build_objective(config.objective, **config.objective_kwargs)
        self.tokenizer = None
        self.image_processor = None  # the backbone's own (understanding / editing inputs)
        self.__dict__["_target_encoder"] = None
        self._source_dir: Optional[str] = None
        self.apply_recipe()
        self.post_init()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _init_weights(self, module):
        # Every submodule initialises itself (the backbone is usually pretrained, the DiT has its own
        # scheme, queries are N(0, std)); transformers' generic re-init would clobber them.
        pass

    def add_lora(self, rank: int, alpha: float) -> None:
        """peft LoRA adapters on the language model's attention and MLP projections (as transfusion's)."""
        add_lora_adapters(self.adapter.decoder(self.backbone).layers, rank, alpha)
        self.config.lora_rank, self.config.lora_alpha = rank, alpha

    def apply_recipe(self) -> None:
        """Sequential (paper): only queries + DiT train. Joint: the backbone trains too (with
        ``lora_rank`` > 0 only its LoRA adapters)."""
        self.backbone.requires_grad_(not self.config.freeze_backbone)
        if not self.config.freeze_backbone and getattr(self.config, "lora_rank", 0) > 0:
            for n, p in self.backbone.named_parameters():
                p.requires_grad_("lora_" in n)
        self.latent_queries.requires_grad_(True)
        self.dit.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()  # a frozen backbone never runs in train mode (dropout etc.)
        return self

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.dit.set_gradient_checkpointing(enabled) if hasattr(self.dit, "set_gradient_checkpointing") else \
            setattr(self.dit, "gradient_checkpointing", enabled)
        if enabled:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.backbone.gradient_checkpointing_disable()

    # -- conditioning ----------------------------------------------------------------------------
    def encode_condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         pixel_values: Optional[torch.Tensor] = None,
                         image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final post-norm hidden states at the Q query slots: (B, Q, H).

        With ``pixel_values`` (editing / image-conditioned generation), the backbone's own vision
        tower encodes the input image and its tokens replace the ``<|image_pad|>`` slots of the
        prompt, exactly as in its understanding path; the queries then read image + instruction.
        """
        decoder = self.adapter.decoder(self.backbone)
        emb = self.adapter.embeddings(self.backbone)(input_ids)
        if pixel_values is not None:
            if not self.adapter.multimodal:
                raise ValueError(f"backbone '{self.config.backbone}' has no vision tower for image conditioning")
            feats = self.backbone.model.get_image_features(pixel_values, image_grid_thw).pooler_output
            feats = torch.cat(list(feats)).to(emb.dtype)
            slots = input_ids == self.backbone.config.image_token_id
            if int(slots.sum()) != feats.shape[0]:
                raise ValueError(f"{int(slots.sum())} <|image_pad|> slots for {feats.shape[0]} image tokens")
            emb = emb.masked_scatter(slots.unsqueeze(-1).expand_as(emb), feats)
        b = emb.shape[0]
        q = self.latent_queries.to(emb.dtype).expand(b, -1, -1)
        inputs = torch.cat([emb, q], dim=1)
        mask = torch.cat([attention_mask.to(torch.long),
                          attention_mask.new_ones((b, q.shape[1]), dtype=torch.long)], dim=1)
        # Left padding: positions count real tokens only, so a prompt gets the same positions (and so
        # the same conditioning) whether batched with longer prompts or alone.
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        out = decoder(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state[:, -q.shape[1]:]

    def _dit(self, x, t, cond, cond_mask):
        return self.dit(x, t, cond, cond_mask)

    # -- training -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        target_latents: Optional[torch.Tensor] = None,
        und_input_ids: Optional[torch.Tensor] = None,
        und_attention_mask: Optional[torch.Tensor] = None,
        und_labels: Optional[torch.Tensor] = None,
        und_pixel_values: Optional[torch.Tensor] = None,
        und_image_grid_thw: Optional[torch.Tensor] = None,
        cond_pixel_values: Optional[torch.Tensor] = None,
        cond_image_grid_thw: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        **unused,
    ) -> Blip3oOutput:
        if input_ids is None and und_input_ids is not None:
            # A joint-recipe batch that drew only understanding samples (a mixture draws each sample's source):
            # the text loss alone, with a zero image loss still tied to every trainable generator weight so that
            # data-parallel wrappers see the same parameters used on every rank.
            zero = sum(p.reshape(-1)[0] for p in (self.latent_queries, *self.dit.parameters()) if p.requires_grad) * 0.0
            image_loss, parts = zero, {}
        else:
            image_loss, parts = self._image_loss(input_ids, attention_mask, pixel_values, target_latents,
                                                 cond_pixel_values, cond_image_grid_thw, generator)
        loss = image_loss
        text_loss = None
        if und_input_ids is not None and self.config.text_loss_weight > 0:
            text_loss = self.text_loss(und_input_ids, und_attention_mask, und_labels, und_pixel_values,
                                       und_image_grid_thw)
            loss = loss + self.config.text_loss_weight * text_loss
            parts = dict(parts, text_loss=text_loss.detach())
        return Blip3oOutput(loss=loss, image_loss=image_loss.detach(), text_loss=text_loss, parts=parts)

    def text_loss(self, input_ids, attention_mask, labels, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        """The backbone's next-token loss on its labelled (answer) tokens, the value its own ``labels=`` path gives.
        That path projects every position onto the vocabulary (152k for Qwen) before dropping the unlabelled ones;
        here the LM head runs on the labelled positions only: the toy VLM's step went from ~5 s to a fraction of
        it, since its prompts and image slots are most of each sequence."""
        kw = {} if pixel_values is None else {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        base, head = getattr(self.backbone, "model", None), self.backbone.get_output_embeddings()
        if base is None or head is None or self.config.lora_rank > 0:  # (a PEFT wrapper: its own forward)
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw).loss
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).last_hidden_state
        target = labels[:, 1:].to(hidden.device)
        keep = target != -100
        logits = head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), target[keep])

    def _image_loss(self, input_ids, attention_mask, pixel_values, target_latents, cond_pixel_values,
                    cond_image_grid_thw, generator):
        if input_ids is None:
            raise ValueError("forward needs input_ids (the generation prompts)")
        if target_latents is None:
            if pixel_values is None:
                raise ValueError("forward needs pixel_values (encoded by the target encoder) or target_latents")
            with torch.no_grad():
                target_latents = self.target_encoder.encode(pixel_values)
        x0 = self.normalize_target(target_latents.float())
        cond = self.encode_condition(input_ids, attention_mask, cond_pixel_values, cond_image_grid_thw)
        if self.training and self.config.cfg_dropout > 0:
            # Whole conditioning zeroed (not a learned null token), as the reference; that is what
            # the sampler feeds as the unconditional branch.
            keep = (torch.rand(cond.shape[0], generator=generator) >= self.config.cfg_dropout)
            cond = cond * keep.to(cond.device, cond.dtype).view(-1, 1, 1)
        dit_dtype = next(self.dit.parameters()).dtype
        return self.objective.loss(self._dit, x0.to(dit_dtype), cond.to(dit_dtype), None, generator)

    # -- generation -----------------------------------------------------------------------------
    def tokenize_prompts(self, prompts: Sequence[str], tokenizer=None) -> Dict[str, torch.Tensor]:
        return tokenize_for_generation(tokenizer or self.tokenizer, prompts, self.config.chat_template,
                                       self.config.inference_max_length, self.config.num_queries)

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
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Samples target features (B * num_images_per_prompt, C, h, w) for prompts (strings or token
        ids). Cond and uncond run in one batched forward per step; pass a list of generators for
        per-sample seeds (sample i is then the same alone or in any batch)."""
        if input_ids is None:
            enc = self.tokenize_prompts(prompts, tokenizer)
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        dev = self.latent_queries.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        cond = self.encode_condition(input_ids, attention_mask,
                                     None if pixel_values is None else pixel_values.to(dev), image_grid_thw)
        if num_images_per_prompt > 1:
            cond = cond.repeat_interleave(num_images_per_prompt, 0)
        dit_dtype = next(self.dit.parameters()).dtype
        shape = (cond.shape[0], self.config.target_channels, *self.config.target_grid)
        x = self.objective.sample_from(
            zeroed_condition(self._dit, cond.to(dit_dtype), None), shape, cond.device,
            num_steps=num_inference_steps or self.config.num_inference_steps,
            guidance_scale=self.config.guidance_scale if guidance_scale is None else guidance_scale,
            generator=generator, progress=progress, guidance_rescale=self.config.guidance_rescale)
        return self.denormalize_target(x.float())

    @torch.no_grad()
    def understand(self, images, questions: Sequence[str], processor=None, max_new_tokens: int = 64,
                   do_sample: bool = False) -> List[str]:
        """Image + question -> answer through the backbone's own chat and generate (unchanged)."""
        return answer(self, images, questions, processor=processor, max_new_tokens=max_new_tokens,
                      do_sample=do_sample)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Loads a directory saved from this class. Official BLIP3-o releases and fusion models have other
        layouts: ``blip3o.models.loading.load_generation_model`` tells them apart and loads any of them."""
        path = str(pretrained_model_name_or_path)
        cfg_file = Path(path) / "config.json"
        if cfg_file.is_file():
            # transformers must never read another layout's config itself: an official release's flat
            # Qwen2.5-VL config would silently become a wrong model config
            mtype = json.loads(cfg_file.read_text()).get("model_type")
            if mtype != cls.config_class.model_type:
                raise ValueError(f"{path}: model_type '{mtype}' is not '{cls.config_class.model_type}'; load it with "
                                 f"blip3o.models.loading.load_generation_model")
        elif not os.path.isdir(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(f"model directory '{path}' not found (and HF_HUB_OFFLINE=1 forbids the hub)")
        model = super().from_pretrained(path, *args, **kwargs)
        model._load_side_files(path)
        return model


AutoConfig.register("blip3o", Blip3oConfig)
AutoModel.register(Blip3oConfig, Blip3oForConditionalGeneration)
