"""The saved configuration of the fusion generators (``transfusion``, ``lmfusion``; ``blip3o/models/fusion.py``).

Kept apart from the model so that each file holds one concern; ``blip3o.models.fusion`` re-exports both names.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from transformers import PretrainedConfig

from blip3o.objectives import saved_settings

FUSION_GENERATORS = ("transfusion", "lmfusion")


class FusionConfig(PretrainedConfig):
    model_type = "blip3o_fusion"

    def __init__(
        self,
        generator_type: str = "transfusion",
        backbone: str = "qwen2_5_vl",
        backbone_config: Optional[Dict[str, Any]] = None,
        backbone_path: Optional[str] = None,
        target: str = "vae",
        target_channels: int = 4,
        target_grid: Sequence[int] = (8, 8),
        target_path: Optional[str] = None,
        target_norm: str = "none",
        patch_size: int = 2,
        objective: str = "flow",
        objective_kwargs: Optional[Dict[str, Any]] = None,
        cfg_dropout: float = 0.1,
        image_loss_weight: float = 1.0,
        text_loss_weight: float = 0.0,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        num_inference_steps: int = 30,
        guidance_scale: float = 3.0,
        guidance_rescale: float = 0.0,
        max_prompt_length: int = 512,
        chat_template: str = "chatml",
        img_token_id: Optional[int] = None,
        img_end_token_id: Optional[int] = None,
        prompt_pad_id: int = 0,
        uncond_input_ids: Optional[List[int]] = None,
        prompt_head_len: int = 0,
        inference_max_length: int = 0,
        decoder: str = "none",
        decoder_path: Optional[str] = None,
        attn_implementation_backbone: str = "sdpa",
        **kwargs,
    ):
        # (not "generator": transformers reads attributes named generator/decoder as sub-model configs)
        self.generator_type = generator_type
        self.backbone = backbone
        self.backbone_config = backbone_config or {}
        self.backbone_path = backbone_path
        self.target = target
        self.target_channels = target_channels
        self.target_grid = list(target_grid)
        self.target_path = target_path
        self.target_norm = target_norm
        self.patch_size = patch_size
        self.objective = objective
        self.objective_kwargs = saved_settings(objective, objective_kwargs or {})
        self.cfg_dropout = cfg_dropout
        self.image_loss_weight = image_loss_weight
        self.text_loss_weight = text_loss_weight
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.max_prompt_length = max_prompt_length
        self.chat_template = chat_template
        self.img_token_id = img_token_id
        self.img_end_token_id = img_end_token_id
        self.prompt_pad_id = prompt_pad_id
        self.uncond_input_ids = list(uncond_input_ids or [])
        self.prompt_head_len = prompt_head_len
        self.inference_max_length = inference_max_length  # 0: prompts are not cut at inference
        self.decoder = decoder
        self.decoder_path = decoder_path
        self.attn_implementation_backbone = attn_implementation_backbone
        super().__init__(**kwargs)
