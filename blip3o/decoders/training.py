"""Reconstruction training of the feature decoders: pure loss functions plus a minimal loop for tests.

`decoder_training_loss` takes a pipeline or a mapping of its modules (so a trainer can pass DDP/DeepSpeed
wrapped denoisers), images (B, 3, H, W) in [-1, 1] and their features (B, N, C), and returns
(loss, parts). The objective always matches the scheduler the pipeline samples with:

* sdxl: DDPM noising with the scheduler's alphas_cumprod, t ~ U{0..T-1}; the UNet sees
  x_t = sqrt(a) x0 + sqrt(1-a) eps (what EulerDiscreteScheduler.scale_model_input produces at sampling
  time) and predicts eps, x0 ("sample") or v, as `scheduler.config.prediction_type` says.
* sana: flow matching as in the original (docs/decisions.md, "Flow matching"): sigma uniform on {0.001, ..., 1},
  x_t = (1-sigma) x0 + sigma eps, timestep = 1000 sigma, target eps - x0 ("flow_prediction") or x0 ("sample").

Both replace the features of a random `null_prob` fraction of samples with the stored null condition
(classifier-free guidance dropout; the reference drops 10%), and optionally add Gaussian feature noise
(`feature_noise` times each sample's per-channel std over tokens), which made the toy decoder robust to
the imperfect features a generator produces.
"""
from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from diffusers.utils.torch_utils import randn_tensor

from blip3o.decoders.base import FeatureDecoderPipeline, calibrate_scaling_factor, encode_to_latents

_PREDICTION_ALIASES = {
    "epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction", "v": "v_prediction",
    "x0": "sample", "sample": "sample", "flow": "flow_prediction", "flow_prediction": "flow_prediction",
}


def _unwrap(module):
    """The underlying model of a DDP / DeepSpeed / compiled wrapper (for .config and .dtype)."""
    while hasattr(module, "module") and not hasattr(module, "config"):
        module = module.module
    return getattr(module, "_orig_mod", module)


def _as_parts(pipe_or_modules: Union[FeatureDecoderPipeline, Mapping[str, Any]]) -> Tuple[str, Dict[str, Any]]:
    if isinstance(pipe_or_modules, FeatureDecoderPipeline):
        return pipe_or_modules.kind, dict(pipe_or_modules.components)
    if isinstance(pipe_or_modules, Mapping):
        parts = dict(pipe_or_modules)
        kind = parts.get("kind") or ("sdxl" if "unet" in parts else "sana" if "transformer" in parts else None)
        if kind is None:
            raise ValueError("decoder modules need a 'unet' (sdxl) or 'transformer' (sana) entry")
        return kind, parts
    raise TypeError(f"expected a FeatureDecoderPipeline or a mapping of its modules, got {type(pipe_or_modules)}")


def _null_features(parts: Dict[str, Any]) -> torch.Tensor:
    if parts.get("null_features") is not None:
        return parts["null_features"]
    return parts["null_condition"].features


def _rand(shape, generator, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _prepare_features(features, null, generator, null_prob: float, feature_noise: float):
    """Feature-noise augmentation, then CFG dropout to the null condition."""
    features = features.float()
    batch = features.shape[0]
    if feature_noise > 0:
        scale = features.std(dim=1, keepdim=True, unbiased=False)
        features = features + feature_noise * scale * randn_tensor(
            features.shape, generator=generator, device=features.device
        )
    drop = _rand((batch,), generator, features.device) < null_prob
    if null_prob > 0:
        if null.shape[1] != features.shape[1]:
            raise ValueError(f"null condition has {null.shape[1]} tokens, features have {features.shape[1]}")
        null = null.to(device=features.device, dtype=features.dtype).expand_as(features)
        features = torch.where(drop[:, None, None], null, features)
    return features, drop


def _check_prediction(kind: str, prediction: Optional[str], scheduler) -> str:
    sampled_with = scheduler.config.prediction_type
    if prediction is None:
        return sampled_with
    wanted = _PREDICTION_ALIASES.get(prediction)
    if wanted != sampled_with:
        raise ValueError(
            f"{kind} decoder samples with prediction_type '{sampled_with}' but training asked for '{prediction}'; "
            "build the decoder with the matching prediction instead"
        )
    return wanted


def _check_inputs(images: torch.Tensor, features: torch.Tensor, feature_dim: int, kind: str):
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    if features.ndim != 3 or features.shape[0] != images.shape[0]:
        raise ValueError(f"features must be (B, N, C) with B={images.shape[0]}, got {tuple(features.shape)}")
    if features.shape[-1] != feature_dim:
        raise ValueError(f"{kind} decoder expects feature dim {feature_dim}, got {features.shape[-1]}")


def sdxl_training_loss(parts, images, features, generator=None, null_prob=0.1, feature_noise=0.0, prediction=None):
    unet, vae, scheduler = parts["unet"], parts["vae"], parts["scheduler"]
    unet_cfg, dtype = _unwrap(unet).config, _unwrap(unet).dtype
    _check_inputs(images, features, unet_cfg.cross_attention_dim, "sdxl")
    pred_type = _check_prediction("sdxl", prediction, scheduler)
    if pred_type not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"sdxl supports epsilon, x0 (sample) or v_prediction, got '{pred_type}'")

    x0 = encode_to_latents(vae, images)
    device, batch = x0.device, x0.shape[0]
    t = (_rand((batch,), generator, device) * scheduler.config.num_train_timesteps).long()
    t = t.clamp_max(scheduler.config.num_train_timesteps - 1)
    noise = randn_tensor(x0.shape, generator=generator, device=device)
    alpha_bar = scheduler.alphas_cumprod.to(device)[t].view(batch, 1, 1, 1).float()
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x_t = a * x0 + s * noise

    feats, drop = _prepare_features(features.to(device), _null_features(parts), generator, null_prob, feature_noise)
    height, width = images.shape[-2:]
    time_ids = torch.tensor([height, width, 0, 0, height, width], device=device, dtype=dtype).expand(batch, 6)
    from blip3o.decoders.sdxl import concat_feature_map, spatial_feature_channels

    if spatial_feature_channels(_unwrap(unet)) > 0:
        x_t = concat_feature_map(x_t, feats)
    out = unet(
        x_t.to(dtype),
        t,
        encoder_hidden_states=feats.to(dtype),
        added_cond_kwargs={"text_embeds": feats.mean(dim=1).to(dtype), "time_ids": time_ids},
        return_dict=False,
    )[0]
    target = {"epsilon": noise, "sample": x0, "v_prediction": a * noise - s * x0}[pred_type]
    loss = F.mse_loss(out.float(), target)
    return loss, {"mse": loss.detach(), "t_mean": t.float().mean(), "null_frac": drop.float().mean()}


def sana_training_loss(parts, images, features, generator=None, null_prob=0.1, feature_noise=0.0, prediction=None):
    transformer, vae, scheduler, connector = parts["transformer"], parts["vae"], parts["scheduler"], parts["connector"]
    t_cfg, dtype = _unwrap(transformer).config, _unwrap(transformer).dtype
    _check_inputs(images, features, _unwrap(connector).config.in_dim, "sana")
    pred_type = _check_prediction("sana", prediction, scheduler)
    if pred_type not in ("flow_prediction", "sample"):
        raise ValueError(f"sana supports flow or x0 (sample) prediction, got '{pred_type}'")

    x0 = encode_to_latents(vae, images)
    device, batch = x0.device, x0.shape[0]
    steps = scheduler.config.num_train_timesteps
    # Discrete uniform sigma on {1/T, ..., 1}, as the reference's index into the flow scheduler's sigmas.
    sigma = ((_rand((batch,), generator, device) * steps).floor().clamp_max(steps - 1) + 1) / steps
    noise = randn_tensor(x0.shape, generator=generator, device=device)
    s = sigma.view(batch, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise

    feats, drop = _prepare_features(features.to(device), _null_features(parts), generator, null_prob, feature_noise)
    cond = connector(feats.to(_unwrap(connector).dtype)).to(dtype)
    timestep = sigma * steps * t_cfg.timestep_scale
    out = transformer(x_t.to(dtype), encoder_hidden_states=cond, timestep=timestep, return_dict=False)[0]
    target = noise - x0 if pred_type == "flow_prediction" else x0
    loss = F.mse_loss(out.float(), target)
    return loss, {"mse": loss.detach(), "sigma_mean": sigma.mean(), "null_frac": drop.float().mean()}


_LOSSES = {"sdxl": sdxl_training_loss, "sana": sana_training_loss}


def decoder_training_loss(
    pipeline_or_modules: Union[FeatureDecoderPipeline, Mapping[str, Any]],
    images: torch.Tensor,
    features: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    null_prob: float = 0.1,
    feature_noise: float = 0.0,
    prediction: Optional[str] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Reconstruction loss of a feature decoder (see module docstring). Returns (loss, parts).

    pipeline_or_modules: a FeatureDecoderPipeline, or a mapping with unet/vae/scheduler (sdxl) or
        transformer/vae/scheduler/connector (sana) plus null_condition or a `null_features` tensor.
    prediction: None to use the scheduler's prediction_type; otherwise it must match it ("epsilon",
        "v_prediction", "x0" for sdxl; "flow", "x0" for sana).
    """
    kind, parts = _as_parts(pipeline_or_modules)
    return _LOSSES[kind](parts, images, features, generator, null_prob, feature_noise, prediction)


def trainable_parameters(pipeline: FeatureDecoderPipeline) -> List[torch.nn.Parameter]:
    """Denoiser (+ SANA connector) parameters; freezes the VAE and the null condition as a side effect."""
    frozen = [pipeline.vae, pipeline.null_condition]
    trained = [pipeline.denoiser] + ([pipeline.connector] if pipeline.kind == "sana" else [])
    for m in frozen:
        m.requires_grad_(False)
    for m in trained:
        m.requires_grad_(True)
    return [p for m in trained for p in m.parameters()]


def train_decoder_steps(
    pipe: FeatureDecoderPipeline,
    batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    **loss_kwargs,
) -> List[float]:
    """A bare AdamW loop for tests and benchmarks (real training goes through the shared trainer).

    batches: (images in [-1, 1], features) pairs; a list/tuple is cycled. Returns the per-step losses.
    """
    params = trainable_parameters(pipe)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    source = itertools.cycle(batches) if isinstance(batches, (list, tuple)) else iter(batches)
    trained = [pipe.denoiser] + ([pipe.connector] if pipe.kind == "sana" else [])
    for m in trained:
        m.train()
    losses = []
    try:
        for _ in range(steps):
            images, features = next(source)
            loss, _ = decoder_training_loss(pipe, images, features, generator=generator, **loss_kwargs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
    finally:
        for m in trained:
            m.eval()
        pipe.clear_null_cache()
    return losses


def train_vae_steps(
    pipe: FeatureDecoderPipeline,
    images: Iterable[torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
) -> List[float]:
    """Fit a tiny VAE as an autoencoder (MSE + kl_weight * KL for AutoencoderKL), then recalibrate its scale.

    A randomly initialised tiny AutoencoderKL/DC decodes any latent to noise-like pixels, so a toy decoder
    trained on its latents cannot produce recognisable images; fit it on toy images first (the weights are
    then frozen for decoder training), or use vae="pixel". Returns the per-step reconstruction losses.
    images: batches (B, 3, H, W) in [-1, 1]; a list/tuple is cycled.
    """
    vae = pipe.vae
    params = [p for p in vae.parameters()]
    if not params:
        raise ValueError(f"{type(vae).__name__} has no parameters to train")
    vae.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    source = itertools.cycle(images) if isinstance(images, (list, tuple)) else iter(images)
    vae.train()
    losses, last = [], None
    try:
        for _ in range(steps):
            last = next(source).to(device=vae.device, dtype=vae.dtype)
            out = vae.encode(last)
            if hasattr(out, "latent_dist"):
                z, kl = out.latent_dist.sample(generator), out.latent_dist.kl().mean()
            else:
                z, kl = out.latent, torch.zeros((), device=last.device)
            recon = F.mse_loss(vae.decode(z).sample.float(), last.float())
            loss = recon + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(recon.item())
    finally:
        vae.eval()
        vae.requires_grad_(False)
    if last is not None:
        calibrate_scaling_factor(vae, images=last)
    pipe.clear_null_cache()
    return losses
