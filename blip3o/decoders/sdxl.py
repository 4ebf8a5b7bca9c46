"""EVA-CLIP features -> pixels with an SDXL-layout UNet, conditioned the Emu2 way (docs/decisions.md, "Decoders").

Conditioning: the N=64 EVA-CLIP tokens (B, 64, 1792) are the UNet's `encoder_hidden_states`, their mean over
tokens is SDXL's pooled `text_embeds`, and `time_ids` = [H, W, 0, 0, H, W] (original size, crop top-left,
target size). The UNet therefore has cross_attention_dim = C and projection_class_embeddings_input_dim =
C + 6 * addition_time_embed_dim (1792 + 6 * 256 = 3328 for the official decoder, inferred, not verified).

Null condition: a stored (1, 64, C) tensor, zeros unless a folder provides `null_condition/` or the caller
calls `set_null_features` (e.g. with the generator's output for an empty prompt, as the official inference
does, or EVA features of a black image, as the eva-clip-reconstruct branch does). Zeros match the
"null condition = zeros" convention of the DiT stage (docs/decisions.md, "Flow matching") and need no
encoder at load time.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
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

OFFICIAL_REPO = "BLIP3o/BLIP3o-Model-8B"
OFFICIAL_SUBFOLDER = "diffusion-decoder"
EVA_CLIP_DIM = 1792

# SDXL-base UNet with the Emu2 conditioning widths (cross-attention and pooled dims from EVA-CLIP).
OFFICIAL_UNET_CONFIG: Dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers naming quirk: this is the number of heads (head size 64)
    cross_attention_dim=EVA_CLIP_DIM,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=EVA_CLIP_DIM + 6 * 256,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)
OFFICIAL_VAE_CONFIG: Dict[str, Any] = dict(  # the SDXL VAE
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
OFFICIAL_SCHEDULER_CONFIG: Dict[str, Any] = dict(  # SDXL's EulerDiscreteScheduler
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
)
OFFICIAL_STEPS = 50  # Emu2 / BLIP3-o defaults: 50 Euler steps, guidance 3.0, 1024x1024


def spatial_feature_channels(unet) -> int:
    cfg = getattr(unet, "config", unet)
    return int(cfg.in_channels) - int(cfg.out_channels)


def concat_feature_map(latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, c, h, w) latents ++ the (B, N, C) feature tokens as their sqrt(N) x sqrt(N) row-major map,
    nearest-upsampled to (h, w). Cross-attention alone carries no token positions, so a decoder
    conditioned only that way places objects wherever its noise puts them; the map gives it the layout."""
    b, n, c = tokens.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"spatial feature conditioning needs a square token grid, got {n} tokens")
    fmap = tokens.transpose(1, 2).reshape(b, c, g, g).to(latents.dtype)
    fmap = F.interpolate(fmap, size=latents.shape[-2:], mode="nearest")
    return torch.cat([latents, fmap], dim=1)


def tiny_unet_config(feature_dim: int, latent_size: int, latent_channels: int) -> Dict[str, Any]:
    """Two-level SDXL-style UNet (DownBlock then CrossAttn, as SDXL's first level has no attention), ~2.5M."""
    return dict(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(64, 128),
        layers_per_block=1,
        transformer_layers_per_block=1,
        attention_head_dim=(2, 4),  # = number of heads: head size 32, not 2 (TOY_FEASIBILITY: 2.2x faster)
        cross_attention_dim=feature_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=feature_dim + 6 * 32,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def tiny_vae_config(image_size: int) -> Dict[str, Any]:
    """AutoencoderKL with two downsamples: 64 px -> 16x16x4 latents (~0.3M params)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )


def tiny_scheduler_config(prediction_type: str) -> Dict[str, Any]:
    cfg = dict(OFFICIAL_SCHEDULER_CONFIG)
    # "trailing" starts sampling at t=999 even with few steps ("leading" would skip the noisiest levels).
    cfg.update(prediction_type=prediction_type, timestep_spacing="trailing", steps_offset=0)
    return cfg


class SDXLFeatureDecoderPipeline(FeatureDecoderPipeline):
    """EVA-CLIP tokens -> SDXL UNet + AutoencoderKL + EulerDiscreteScheduler (Emu2-style conditioning)."""

    kind = "sdxl"
    denoiser_name = "unet"
    model_cpu_offload_seq = "unet->vae"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: EulerDiscreteScheduler,
        null_condition: NullCondition,
        default_num_inference_steps: int = OFFICIAL_STEPS,
        default_guidance_scale: float = OFFICIAL_GUIDANCE,
    ):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, null_condition=null_condition)
        self.register_to_config(default_num_inference_steps=default_num_inference_steps,
                                default_guidance_scale=float(default_guidance_scale))
        self.set_progress_bar_config(disable=True)

    @property
    def feature_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def encode_condition(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"encoder_hidden_states": features, "text_embeds": features.mean(dim=1)}

    @property
    def spatial_features(self) -> bool:
        """True when the UNet also reads the feature map concatenated to its input (in > out channels)."""
        return spatial_feature_channels(self.unet) > 0

    @staticmethod
    def time_ids(batch: int, height: int, width: int, device, dtype) -> torch.Tensor:
        return torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype).expand(batch, 6)

    def predict(self, latents, t, cond, height, width):
        time_ids = self.time_ids(latents.shape[0], height, width, latents.device, latents.dtype)
        if self.spatial_features:
            latents = concat_feature_map(latents, cond["encoder_hidden_states"])
        return self.unet(
            latents,
            t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": time_ids},
            return_dict=False,
        )[0]

    @classmethod
    def _load_folder(cls, root, torch_dtype=None, variant="auto", **kwargs):
        parts = {name: load_component(root, name, torch_dtype, variant) for name in ("unet", "vae", "scheduler")}
        missing = [name for name, part in parts.items() if part is None]
        if missing:
            raise DecoderLoadError(f"{root}: SDXL decoder folder lacks {', '.join(missing)}/")
        null = load_component(root, "null_condition", torch_dtype, variant)
        if null is None:  # official folders carry no null condition: zeros (see module docstring)
            null = NullCondition(num_tokens=64, feature_dim=parts["unet"].config.cross_attention_dim, source="zeros")
        return cls(**parts, null_condition=null, **sampling_defaults(read_model_index(root), OFFICIAL_STEPS))


def sdxl_training_loss(parts, images, features, generator=None, null_prob=0.1, feature_noise=0.0, prediction=None,
                       time_shift=1.0, edge_weight=0.0):
    """DDPM noising with the scheduler's alphas_cumprod (see blip3o/decoders/training.py)."""
    unet, vae, scheduler = parts["unet"], parts["vae"], parts["scheduler"]
    unet_cfg, dtype = unwrap(unet).config, unwrap(unet).dtype
    check_inputs(images, features, unet_cfg.cross_attention_dim, "sdxl")
    pred_type = check_prediction("sdxl", prediction, scheduler)
    if pred_type not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"sdxl supports epsilon, x0 (sample) or v_prediction, got '{pred_type}'")

    x0 = encode_to_latents(vae, images)
    device, batch = x0.device, x0.shape[0]
    t = (shift_sigma(uniform((batch,), generator, device), time_shift) * scheduler.config.num_train_timesteps).long()
    t = t.clamp_max(scheduler.config.num_train_timesteps - 1)
    noise = randn_tensor(x0.shape, generator=generator, device=device)
    alpha_bar = scheduler.alphas_cumprod.to(device)[t].view(batch, 1, 1, 1).float()
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x_t = a * x0 + s * noise

    feats, drop = prepare_features(features.to(device), null_features(parts), generator, null_prob, feature_noise)
    height, width = images.shape[-2:]
    time_ids = SDXLFeatureDecoderPipeline.time_ids(batch, height, width, device, dtype)
    if spatial_feature_channels(unwrap(unet)) > 0:
        x_t = concat_feature_map(x_t, feats)
    out = unet(
        x_t.to(dtype),
        t,
        encoder_hidden_states=feats.to(dtype),
        added_cond_kwargs={"text_embeds": feats.mean(dim=1).to(dtype), "time_ids": time_ids},
        return_dict=False,
    )[0]
    target = {"epsilon": noise, "sample": x0, "v_prediction": a * noise - s * x0}[pred_type]
    loss = reconstruction_mse(out, target, images, edge_weight)
    return loss, {"mse": loss.detach(), "t_mean": t.float().mean(), "null_frac": drop.float().mean()}


def build_sdxl_decoder(
    preset: str = "tiny",
    feature_dim: Optional[int] = None,
    num_tokens: int = 64,
    image_size: int = 64,
    seed: int = 0,
    vae: str = "kl",
    prediction: Optional[str] = None,
    num_inference_steps: Optional[int] = None,
    spatial_features: bool = False,
    unet_config: Optional[Dict[str, Any]] = None,
    vae_config: Optional[Dict[str, Any]] = None,
    scheduler_config: Optional[Dict[str, Any]] = None,
    device: Optional[str] = None,
    guidance_scale: Optional[float] = None,
    pixel_factor: int = 4,
) -> SDXLFeatureDecoderPipeline:
    """A randomly initialised SDXL feature decoder.

    preset "tiny": 64 px toy images, `vae`="kl" (tiny AutoencoderKL, latents 16x16x4, scaling factor
    calibrated to unit latent std) or "pixel" (PixelUnshuffleAutoencoder, latents 16x16x48 at the default
    `pixel_factor` 4; 2 gives 32x32x12, the UNet then works at twice the resolution). `prediction`
    is the UNet target and becomes the scheduler's prediction_type: "sample"/"x0" (the tiny default: the CPU
    prototype found x0 targets learn far faster), "epsilon" (SDXL's, the official default) or "v_prediction".
    preset "official": the full-size Emu2/SDXL architecture with random weights (2.6B UNet); pass
    device="meta" to build it without allocating memory (e.g. to count parameters).
    The *_config dicts override individual config entries. `guidance_scale` is the pipeline's default CFG scale,
    saved in model_index.json (None: the originals' 3.0; the toy decoder samples best at 1, unguided).
    """
    if prediction is None:
        prediction = "epsilon" if preset == "official" else "sample"
    prediction = {"x0": "sample", "eps": "epsilon", "v": "v_prediction"}.get(prediction, prediction)
    if prediction not in ("sample", "epsilon", "v_prediction"):
        raise ValueError(f"sdxl prediction must be 'sample' (x0), 'epsilon' or 'v_prediction', got '{prediction}'")
    if preset == "official":
        feature_dim = feature_dim or EVA_CLIP_DIM
        u_cfg = dict(OFFICIAL_UNET_CONFIG, cross_attention_dim=feature_dim,
                     projection_class_embeddings_input_dim=feature_dim + 6 * 256)
        v_cfg = dict(OFFICIAL_VAE_CONFIG)
        s_cfg = dict(OFFICIAL_SCHEDULER_CONFIG, prediction_type=prediction)
        steps = OFFICIAL_STEPS
    elif preset == "tiny":
        if feature_dim is None:
            raise ValueError("the tiny sdxl preset needs feature_dim")
        if vae not in ("kl", "pixel"):
            raise ValueError(f"tiny sdxl vae must be 'kl' or 'pixel', got '{vae}'")
        factor = 4 if vae == "kl" else int(pixel_factor)
        if factor not in (1, 2, 4, 8):
            raise ValueError(f"tiny sdxl pixel_factor must be 1, 2, 4 or 8, got {pixel_factor}")
        if image_size % (factor * 2):
            raise ValueError(f"tiny sdxl image_size must be a multiple of {factor * 2}, got {image_size}")
        latent_channels = 4 if vae == "kl" else 3 * factor * factor
        u_cfg = tiny_unet_config(feature_dim, image_size // factor, latent_channels)
        v_cfg = tiny_vae_config(image_size) if vae == "kl" else dict(factor=factor)
        s_cfg = tiny_scheduler_config(prediction)
        steps = 25
    else:
        raise ValueError(f"unknown sdxl preset '{preset}'; choose 'tiny' or 'official'")
    if spatial_features:  # not the official (Emu2) layout: an option for small decoders (toy world)
        u_cfg["in_channels"] = u_cfg["out_channels"] + u_cfg["cross_attention_dim"]
    u_cfg.update(unet_config or {})
    v_cfg.update(vae_config or {})
    s_cfg.update(scheduler_config or {})
    if num_inference_steps:
        steps = num_inference_steps

    with torch.device(device or "cpu"):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**u_cfg)
        if preset == "tiny" and vae == "pixel":
            vae_model = PixelUnshuffleAutoencoder(**v_cfg)
        else:
            vae_model = AutoencoderKL(**v_cfg)
        null = NullCondition(num_tokens=num_tokens, feature_dim=u_cfg["cross_attention_dim"], source="zeros")
    if preset == "tiny" and vae == "kl" and "scaling_factor" not in (vae_config or {}) and device != "meta":
        calibrate_scaling_factor(vae_model, image_size, seed=seed)
    scheduler = EulerDiscreteScheduler(**s_cfg)
    pipe = SDXLFeatureDecoderPipeline(unet, vae_model, scheduler, null, default_num_inference_steps=steps,
                                      default_guidance_scale=check_guidance(guidance_scale))
    for m in (pipe.unet, pipe.vae, pipe.null_condition):
        m.eval()
    return pipe


def save_official_layout(pipe: SDXLFeatureDecoderPipeline, path: str, variant: str = "bf16") -> str:
    """Write `pipe` the way the official `diffusion-decoder/` folder is laid out (for tests and conversions).

    unet/, vae/ and scheduler/ subfolders with `*.{variant}.safetensors` weights in that dtype, a
    feature_extractor/ preprocessor config, and a model_index.json naming the Emu2 pipeline class, whose code
    (`pipeline_llava_gen.py`) we never need. The official folder has no null condition; a non-zero one is
    kept in an extra `null_condition/` subfolder so it survives the round trip (zeros are the load default).
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(variant, torch.float32)
    os.makedirs(path, exist_ok=True)
    for name in ("unet", "vae"):
        # Written directly (config + one variant safetensors file) rather than via module.to(dtype), which
        # would cast the live pipeline or need a deep copy.
        module, folder = getattr(pipe, name), os.path.join(path, name)
        module.save_config(folder)
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, os.path.join(folder, f"diffusion_pytorch_model.{variant}.safetensors"),
                  metadata={"format": "pt"})
    pipe.scheduler.save_pretrained(os.path.join(path, "scheduler"))
    if pipe.null_condition.config.source != "zeros":
        pipe.null_condition.save_pretrained(os.path.join(path, "null_condition"))
    os.makedirs(os.path.join(path, "feature_extractor"), exist_ok=True)
    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor", "crop_size": 448, "size": 448, "do_resize": True,
        "do_center_crop": True, "do_normalize": True, "image_mean": clip_mean, "image_std": clip_std,
    }
    model_index = {
        "_class_name": "EmuVisualGenerationPipeline",
        "_diffusers_version": "0.32.2",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "multimodal_encoder": [None, None],
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(path, "feature_extractor", "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f, indent=2)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(model_index, f, indent=2)
    return path


DECODERS.register("sdxl")(DecoderSpec(
    name="sdxl", pipeline_class=SDXLFeatureDecoderPipeline, build=build_sdxl_decoder, training_loss=sdxl_training_loss,
    trained=("unet",), official_repo=OFFICIAL_REPO, official_subfolder=OFFICIAL_SUBFOLDER, target="eva_clip",
    feature_dim=EVA_CLIP_DIM, target_encoder="eva-clip-E-14-plus (448 px, 64 pooled tokens)",
    save_official=save_official_layout,
))
