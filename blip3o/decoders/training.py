"""Reconstruction training of the feature decoders: the shared loss machinery plus a minimal loop for tests.

`decoder_training_loss` takes a pipeline or a mapping of its modules (so a trainer can pass DDP/DeepSpeed
wrapped denoisers), images (B, 3, H, W) in [-1, 1] and their features (B, N, C), and returns
(loss, parts), calling the loss the decoder's spec registers (`sdxl_training_loss` in sdxl.py,
`sana_training_loss` in sana.py). The objective always matches the scheduler the pipeline samples with:

* sdxl: DDPM noising with the scheduler's alphas_cumprod, t ~ U{0..T-1} (optionally shifted: `time_shift`); the UNet sees
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

from blip3o.decoders.components import calibrate_scaling_factor
from blip3o.decoders.pipeline import FeatureDecoderPipeline
from blip3o.decoders.spec import DECODERS, DecoderSpec

PREDICTION_ALIASES = {
    "epsilon": "epsilon", "eps": "epsilon", "v_prediction": "v_prediction", "v": "v_prediction",
    "x0": "sample", "sample": "sample", "flow": "flow_prediction", "flow_prediction": "flow_prediction",
}


def unwrap(module):
    """The underlying model of a DDP / DeepSpeed / compiled wrapper (for .config and .dtype)."""
    while hasattr(module, "module") and not hasattr(module, "config"):
        module = module.module
    return getattr(module, "_orig_mod", module)


def _as_parts(pipe_or_modules: Union[FeatureDecoderPipeline, Mapping[str, Any]]) -> Tuple[DecoderSpec, Dict[str, Any]]:
    if isinstance(pipe_or_modules, FeatureDecoderPipeline):
        return pipe_or_modules.spec, dict(pipe_or_modules.components)
    if isinstance(pipe_or_modules, Mapping):
        parts = dict(pipe_or_modules)
        if parts.get("kind"):
            return DECODERS.get(parts["kind"]), parts
        specs = [DECODERS.get(name) for name in DECODERS.names()]
        for spec in specs:  # the denoiser's name tells the decoder (unet: sdxl, transformer: sana)
            if spec.denoiser in parts:
                return spec, parts
        need = " or ".join(f"'{s.denoiser}' ({s.name})" for s in specs)
        raise ValueError(f"decoder modules need a {need} entry")
    raise TypeError(f"expected a FeatureDecoderPipeline or a mapping of its modules, got {type(pipe_or_modules)}")


def null_features(parts: Dict[str, Any]) -> torch.Tensor:
    if parts.get("null_features") is not None:
        return parts["null_features"]
    return parts["null_condition"].features


def uniform(shape, generator, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def edge_map(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, 1, H, W) in [0, 1]: the largest colour step to a 4-neighbour,
    marked on both pixels of the step (0 on flat regions, 1 where a channel jumps across the full range)."""
    x = images.float()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True)
    e = torch.zeros_like(x[:, :1])
    e[..., :, 1:] = torch.maximum(e[..., :, 1:], dx)
    e[..., :, :-1] = torch.maximum(e[..., :, :-1], dx)
    e[..., 1:, :] = torch.maximum(e[..., 1:, :], dy)
    e[..., :-1, :] = torch.maximum(e[..., :-1, :], dy)
    return (e / 2).clamp(0, 1)


def reconstruction_mse(out: torch.Tensor, target: torch.Tensor, images: torch.Tensor, edge_weight: float = 0.0):
    """MSE of the denoiser's output; with `edge_weight` > 0, weighted per pixel by 1 + edge_weight * edge_map,
    normalised by the mean weight so the loss keeps its scale. The weight reaches the latent grid exactly when
    the latents are the pixels unshuffled (the pixel stand-in: C = 3 f^2), else as its average over each cell."""
    if not edge_weight:
        return F.mse_loss(out.float(), target.float())
    w = 1 + edge_weight * edge_map(images.to(out.device))
    (b, c, h, wd), (H, W) = out.shape, images.shape[-2:]
    f = H // h
    if H == h * f and W == wd * f and c == 3 * f * f:
        w = F.pixel_unshuffle(w.expand(-1, 3, -1, -1), f) if f > 1 else w.expand(-1, 3, -1, -1)
    else:
        w = F.adaptive_avg_pool2d(w, (h, wd))
    w = w.expand_as(out)
    return (w * (out.float() - target.float()) ** 2).mean() / w.mean()


def prepare_features(features, null, generator, null_prob: float, feature_noise: float):
    """Feature-noise augmentation, then CFG dropout to the null condition."""
    features = features.float()
    batch = features.shape[0]
    if feature_noise > 0:
        scale = features.std(dim=1, keepdim=True, unbiased=False)
        features = features + feature_noise * scale * randn_tensor(
            features.shape, generator=generator, device=features.device
        )
    drop = uniform((batch,), generator, features.device) < null_prob
    if null_prob > 0:
        if null.shape[1] != features.shape[1]:
            raise ValueError(f"null condition has {null.shape[1]} tokens, features have {features.shape[1]}")
        null = null.to(device=features.device, dtype=features.dtype).expand_as(features)
        features = torch.where(drop[:, None, None], null, features)
    return features, drop


def check_prediction(kind: str, prediction: Optional[str], scheduler) -> str:
    sampled_with = scheduler.config.prediction_type
    if prediction is None:
        return sampled_with
    wanted = PREDICTION_ALIASES.get(prediction)
    if wanted != sampled_with:
        raise ValueError(
            f"{kind} decoder samples with prediction_type '{sampled_with}' but training asked for '{prediction}'; "
            "build the decoder with the matching prediction instead"
        )
    return wanted


def check_inputs(images: torch.Tensor, features: torch.Tensor, feature_dim: int, kind: str):
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    if features.ndim != 3 or features.shape[0] != images.shape[0]:
        raise ValueError(f"features must be (B, N, C) with B={images.shape[0]}, got {tuple(features.shape)}")
    if features.shape[-1] != feature_dim:
        raise ValueError(f"{kind} decoder expects feature dim {feature_dim}, got {features.shape[-1]}")


def decoder_training_loss(
    pipeline_or_modules: Union[FeatureDecoderPipeline, Mapping[str, Any]],
    images: torch.Tensor,
    features: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    null_prob: float = 0.1,
    feature_noise: float = 0.0,
    prediction: Optional[str] = None,
    time_shift: float = 1.0,
    edge_weight: float = 0.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Reconstruction loss of a feature decoder (see module docstring). Returns (loss, parts).

    pipeline_or_modules: a FeatureDecoderPipeline, or a mapping with unet/vae/scheduler (sdxl) or
        transformer/vae/scheduler/connector (sana) plus null_condition or a `null_features` tensor.
    prediction: None to use the scheduler's prediction_type; otherwise it must match it ("epsilon",
        "v_prediction", "x0" for sdxl; "flow", "x0" for sana).
    time_shift: the SD3 shift s*u / (1 + (s-1)*u) of the noise level u in [0, 1] (sdxl: the timestep fraction
        t/T; sana: sigma); s > 1 trains more at high noise, where the features must decide the layout, and
        less near the clean image, where x0 is a copy of the input. 1.0 = uniform (the originals).
    edge_weight: lambda of the per-pixel loss weight 1 + lambda * edge(image) (:func:`edge_map`, in [0, 1]), mapped
        onto the latent grid; 0 = plain MSE (the originals). Under MSE a decoder unsure of an object's exact extent
        predicts the average, whose corners threshold round; weighting the edges pays for getting them right.
    """
    spec, parts = _as_parts(pipeline_or_modules)
    if time_shift <= 0:
        raise ValueError(f"time_shift must be > 0, got {time_shift}")
    if edge_weight < 0:
        raise ValueError(f"edge_weight must be >= 0, got {edge_weight}")
    kwargs = {"time_shift": time_shift} if time_shift != 1.0 else {}  # plugin losses need not know the option
    if edge_weight:
        kwargs["edge_weight"] = edge_weight
    return spec.training_loss(parts, images, features, generator, null_prob, feature_noise, prediction, **kwargs)


def trained_modules(pipeline: FeatureDecoderPipeline) -> List[torch.nn.Module]:
    """The modules reconstruction training updates, denoiser first (the decoder spec's `trained`)."""
    return [getattr(pipeline, name) for name in pipeline.spec.trained]


def trainable_parameters(pipeline: FeatureDecoderPipeline) -> List[torch.nn.Parameter]:
    """Parameters of the modules the decoder's loss trains (the denoiser, and SANA's connector); freezes the
    VAE and the null condition as a side effect."""
    frozen = [pipeline.vae, pipeline.null_condition]
    trained = trained_modules(pipeline)
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
    trained = trained_modules(pipe)
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
