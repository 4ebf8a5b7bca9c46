"""SigLIP2 features -> pixels with SANA (docs/decisions.md, "Decoders").

features (B, 64, 1152) -> connector [Linear(1152 -> caption_channels), GELU(tanh), Linear, RMSNorm(eps 1e-5,
weight initialised to sqrt(5.5))] -> SanaTransformer2DModel cross-attention context; AutoencoderDC latents;
DPMSolverMultistepScheduler with flow sigmas, 30 steps, CFG 3.0. The unconditional input is the SigLIP2
features of a black image, precomputed by the caller and stored in `null_condition/` (zeros until set).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from diffusers.utils.torch_utils import randn_tensor

from blip3o.decoders.components import (
    NullCondition,
    PixelUnshuffleAutoencoder,
    calibrate_scaling_factor,
    encode_to_latents,
)
from blip3o.decoders.io import DecoderLoadError, load_component, read_model_index
from blip3o.decoders.pipeline import OFFICIAL_GUIDANCE, FeatureDecoderPipeline, check_guidance, sampling_defaults
from blip3o.decoders.spec import DECODERS, DecoderSpec
from blip3o.decoders.training import (check_inputs, check_prediction, null_features, prepare_features,
                                      reconstruction_mse, uniform, unwrap)
from blip3o.objectives import shift_sigma  # the generator's SD3 shift, for the decoder's time_shift

OFFICIAL_REPO = "BLIP3o/SigLIP2_SANA"
SIGLIP2_DIM = 1152
OFFICIAL_STEPS = 30

# Sana_1600M_512px_diffusers (as published for diffusers; from memory of the public config, not fetched here).
OFFICIAL_TRANSFORMER_CONFIG: Dict[str, Any] = dict(
    in_channels=32,
    out_channels=32,
    num_attention_heads=70,
    attention_head_dim=32,
    num_layers=20,
    num_cross_attention_heads=20,
    cross_attention_head_dim=112,
    cross_attention_dim=2240,
    caption_channels=2304,
    mlp_ratio=2.5,
    attention_bias=False,
    sample_size=16,
    patch_size=1,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=None,
)
# dc-ae-f32c32-sana-1.0 (same caveat).
OFFICIAL_VAE_CONFIG: Dict[str, Any] = dict(
    in_channels=3,
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)
OFFICIAL_SCHEDULER_CONFIG: Dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)


class SanaFeatureConnector(ModelMixin, ConfigMixin):
    """Maps vision features into SANA's caption space: Linear, GELU(tanh), Linear, RMSNorm (weight sqrt(5.5)).

    The RMSNorm weight starts at sqrt(5.5) so the connector output has roughly the scale of the Gemma-2 text
    embeddings the pretrained SANA transformer was trained on (docs/decisions.md, "Decoders").
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_dim: int = SIGLIP2_DIM, caption_channels: int = 2304, norm_eps: float = 1e-5,
                 norm_init: float = 5.5 ** 0.5):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, caption_channels)
        self.act = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(caption_channels, caption_channels)
        self.norm = RMSNorm(caption_channels, eps=norm_eps, elementwise_affine=True)
        with torch.no_grad():
            self.norm.weight.fill_(norm_init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear_2(self.act(self.linear_1(features))))


def tiny_transformer_config(latent_size: int, latent_channels: int, patch_size: int) -> Dict[str, Any]:
    """4 layers of width 128 (4 heads of 32) over an 8x8 token grid (~1.5M params)."""
    return dict(
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_attention_heads=4,
        attention_head_dim=32,
        num_layers=4,
        num_cross_attention_heads=4,
        cross_attention_head_dim=32,
        cross_attention_dim=128,
        caption_channels=128,
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=latent_size,
        patch_size=patch_size,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        # Absolute sin-cos positions (SANA 1600M uses none and relies on its conv FFN): a 4-layer toy model
        # learns layouts much faster with them.
        interpolation_scale=1.0,
    )


def tiny_vae_config() -> Dict[str, Any]:
    """AutoencoderDC with two downsamples (f4c8): 64 px -> 16x16x8 latents (~0.16M params)."""
    return dict(
        in_channels=3,
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(16, 32, 32),
        decoder_block_out_channels=(16, 32, 32),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
    )


class SanaFeatureDecoderPipeline(FeatureDecoderPipeline):
    """SigLIP2 tokens -> connector -> SanaTransformer2DModel + AutoencoderDC, DPM-Solver++ flow sampling."""

    kind = "sana"
    denoiser_name = "transformer"
    model_cpu_offload_seq = "connector->transformer->vae"

    def __init__(
        self,
        transformer: SanaTransformer2DModel,
        vae: AutoencoderDC,
        scheduler: DPMSolverMultistepScheduler,
        connector: SanaFeatureConnector,
        null_condition: NullCondition,
        default_num_inference_steps: int = OFFICIAL_STEPS,
        default_guidance_scale: float = OFFICIAL_GUIDANCE,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, scheduler=scheduler, connector=connector, null_condition=null_condition
        )
        self.register_to_config(default_num_inference_steps=default_num_inference_steps,
                                default_guidance_scale=float(default_guidance_scale))
        self.set_progress_bar_config(disable=True)

    @property
    def feature_dim(self) -> int:
        return int(self.connector.config.in_dim)

    def _condition_modules(self):
        return (self.connector,)

    def encode_condition(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = features.to(self.connector.dtype)
        return {"encoder_hidden_states": self.connector(features).to(self.transformer.dtype)}

    def predict(self, latents, t, cond, height, width):
        timestep = t.expand(latents.shape[0]).to(latents.device) * self.transformer.config.timestep_scale
        return self.transformer(
            latents, encoder_hidden_states=cond["encoder_hidden_states"], timestep=timestep, return_dict=False
        )[0]

    @classmethod
    def _load_folder(cls, root, torch_dtype=None, variant="auto", **kwargs):
        names = ("transformer", "vae", "scheduler", "connector")
        parts = {name: load_component(root, name, torch_dtype, variant) for name in names}
        missing = [name for name, part in parts.items() if part is None]
        if missing:
            raise DecoderLoadError(f"{root}: SANA decoder folder lacks {', '.join(missing)}/")
        null = load_component(root, "null_condition", torch_dtype, variant)
        if null is None:
            null = NullCondition(num_tokens=64, feature_dim=parts["connector"].config.in_dim, source="zeros")
        return cls(**parts, null_condition=null, **sampling_defaults(read_model_index(root), OFFICIAL_STEPS))


def sana_training_loss(parts, images, features, generator=None, null_prob=0.1, feature_noise=0.0, prediction=None,
                       time_shift=1.0, edge_weight=0.0):
    """Flow matching on the scheduler's flow sigmas (see blip3o/decoders/training.py)."""
    transformer, vae, scheduler, connector = parts["transformer"], parts["vae"], parts["scheduler"], parts["connector"]
    t_cfg, dtype = unwrap(transformer).config, unwrap(transformer).dtype
    check_inputs(images, features, unwrap(connector).config.in_dim, "sana")
    pred_type = check_prediction("sana", prediction, scheduler)
    if pred_type not in ("flow_prediction", "sample"):
        raise ValueError(f"sana supports flow or x0 (sample) prediction, got '{pred_type}'")

    x0 = encode_to_latents(vae, images)
    device, batch = x0.device, x0.shape[0]
    steps = scheduler.config.num_train_timesteps
    # Discrete uniform sigma on {1/T, ..., 1}, as the reference's index into the flow scheduler's sigmas.
    sigma = ((uniform((batch,), generator, device) * steps).floor().clamp_max(steps - 1) + 1) / steps
    sigma = shift_sigma(sigma, time_shift)
    noise = randn_tensor(x0.shape, generator=generator, device=device)
    s = sigma.view(batch, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise

    feats, drop = prepare_features(features.to(device), null_features(parts), generator, null_prob, feature_noise)
    cond = connector(feats.to(unwrap(connector).dtype)).to(dtype)
    timestep = sigma * steps * t_cfg.timestep_scale
    out = transformer(x_t.to(dtype), encoder_hidden_states=cond, timestep=timestep, return_dict=False)[0]
    target = noise - x0 if pred_type == "flow_prediction" else x0
    loss = reconstruction_mse(out, target, images, edge_weight)
    return loss, {"mse": loss.detach(), "sigma_mean": sigma.mean(), "null_frac": drop.float().mean()}


def build_sana_decoder(
    preset: str = "tiny",
    feature_dim: Optional[int] = None,
    num_tokens: int = 64,
    image_size: int = 64,
    seed: int = 0,
    vae: str = "dc",
    prediction: Optional[str] = None,
    num_inference_steps: Optional[int] = None,
    transformer_config: Optional[Dict[str, Any]] = None,
    vae_config: Optional[Dict[str, Any]] = None,
    scheduler_config: Optional[Dict[str, Any]] = None,
    connector_config: Optional[Dict[str, Any]] = None,
    device: Optional[str] = None,
    guidance_scale: Optional[float] = None,
) -> SanaFeatureDecoderPipeline:
    """A randomly initialised SANA feature decoder.

    preset "tiny": 64 px, `vae`="dc" (tiny AutoencoderDC f4c8, latents 16x16x8, scaling calibrated) or
    "pixel" (PixelUnshuffleAutoencoder, latents 16x16x48); the transformer patchifies by 2 into 8x8 tokens.
    `prediction`: "flow" (velocity eps - x0, the reference objective and the official default; scheduler
    prediction_type "flow_prediction") or "x0" (the transformer predicts the clean latent; scheduler
    prediction_type "sample", still on flow sigmas; the tiny default, since x0 targets learn far faster on CPU).
    preset "official": Sana 1600M 512px + DC-AE f32c32 + connector 1152->2304, random weights; device="meta"
    builds it without memory. The *_config dicts override individual config entries. `guidance_scale` is the
    pipeline's default CFG scale, saved in model_index.json (None: the originals' 3.0).
    """
    if prediction is None:
        prediction = "flow" if preset == "official" else "x0"
    pred_type = {"flow": "flow_prediction", "flow_prediction": "flow_prediction", "x0": "sample",
                 "sample": "sample"}.get(prediction)
    if pred_type is None:
        raise ValueError(f"sana prediction must be 'flow' or 'x0', got '{prediction}'")
    if preset == "official":
        feature_dim = feature_dim or SIGLIP2_DIM
        t_cfg = dict(OFFICIAL_TRANSFORMER_CONFIG)
        v_cfg = dict(OFFICIAL_VAE_CONFIG)
        steps = OFFICIAL_STEPS
    elif preset == "tiny":
        if feature_dim is None:
            raise ValueError("the tiny sana preset needs feature_dim")
        if vae not in ("dc", "pixel"):
            raise ValueError(f"tiny sana vae must be 'dc' or 'pixel', got '{vae}'")
        factor, patch = 4, 2
        if image_size % (factor * patch):
            raise ValueError(f"tiny sana image_size must be a multiple of {factor * patch}, got {image_size}")
        latent_channels = 8 if vae == "dc" else 3 * factor * factor
        t_cfg = tiny_transformer_config(image_size // factor, latent_channels, patch)
        v_cfg = tiny_vae_config() if vae == "dc" else dict(factor=factor)
        steps = 20
    else:
        raise ValueError(f"unknown sana preset '{preset}'; choose 'tiny' or 'official'")
    s_cfg = dict(OFFICIAL_SCHEDULER_CONFIG, prediction_type=pred_type)
    t_cfg.update(transformer_config or {})
    v_cfg.update(vae_config or {})
    s_cfg.update(scheduler_config or {})
    c_cfg = dict(in_dim=feature_dim, caption_channels=t_cfg["caption_channels"])
    c_cfg.update(connector_config or {})
    if num_inference_steps:
        steps = num_inference_steps

    with torch.device(device or "cpu"):
        torch.manual_seed(seed)
        transformer = SanaTransformer2DModel(**t_cfg)
        if preset == "tiny" and vae == "pixel":
            vae_model = PixelUnshuffleAutoencoder(**v_cfg)
        else:
            vae_model = AutoencoderDC(**v_cfg)
        connector = SanaFeatureConnector(**c_cfg)
        null = NullCondition(num_tokens=num_tokens, feature_dim=feature_dim, source="zeros")
    if preset == "tiny" and vae == "dc" and "scaling_factor" not in (vae_config or {}) and device != "meta":
        calibrate_scaling_factor(vae_model, image_size, seed=seed)
    scheduler = DPMSolverMultistepScheduler(**s_cfg)
    pipe = SanaFeatureDecoderPipeline(transformer, vae_model, scheduler, connector, null,
                                      default_num_inference_steps=steps,
                                      default_guidance_scale=check_guidance(guidance_scale))
    for m in (pipe.transformer, pipe.vae, pipe.connector, pipe.null_condition):
        m.eval()
    return pipe


DECODERS.register("sana")(DecoderSpec(
    name="sana", pipeline_class=SanaFeatureDecoderPipeline, build=build_sana_decoder, training_loss=sana_training_loss,
    trained=("transformer", "connector"), official_repo=OFFICIAL_REPO, official_subfolder=None, target="siglip",
    feature_dim=SIGLIP2_DIM, target_encoder="siglip2-so400m-patch16-512 (penultimate layer, 64 pooled tokens)",
    component_classes=(SanaFeatureConnector,),
))
