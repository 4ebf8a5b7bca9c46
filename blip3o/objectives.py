"""Training objectives for the generator: flow matching (the paper's default) and MSE regression.

Both see the generator as ``net(x, t, cond, cond_mask) -> out`` with x and out shaped like the
target x0 (B, C, h, w) and t on the 0..1000 scale (1000 = pure noise, BLIP3-o's convention).

Flow matching, exactly as the reference (§1.6): sigma uniform on the 1000-step grid
{0.001, ..., 1.0}; x_t = (1 - sigma) x0 + sigma eps; the net predicts the velocity eps - x0 at
t = 1000 sigma; the loss is the fp32 mean squared error. Options (not the reference default):
logit-normal sigma sampling (SD3) and a sigma shift. Sampling follows the reference too: sigmas
``np.linspace(1, 1/steps, steps)`` in float64 then float32, and the DiT timestep 1000 sigma truncated to
an integer (``sample_timesteps``: ``auto`` does that exactly when training drew timesteps from the
integer grid, i.e. uniform sampling without shift, and passes floats for continuous schedules).

MSE is a real deterministic regressor (the reference's "MSE" was MSE(x, x.detach()) == 0): the same
network sees a zero canvas at t = 0 and predicts x0 directly from the conditioning, so the ablation
compares objectives with identical architectures and parameter counts.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from blip3o.registry import Registry
from blip3o.sampling import Predictors, euler_sample, zeroed_condition

Net = Callable[..., torch.Tensor]
Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]
# name -> class. The dataclass fields are the objective's settings (model.objective: {name: flow, time_shift: 3.0});
# a ValueError from __post_init__ starts with the setting's name, which the config error prefixes with
# "model.objective.".
OBJECTIVES: "Registry[type]" = Registry("objective")

NUM_TRAIN_TIMESTEPS = 1000


def randn_like_per_sample(shape, generator: Generators, device, dtype) -> torch.Tensor:
    """Noise where sample i depends only on generator i, so a sample is identical alone or in a batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32)
                            for g in generator]).to(device=device, dtype=dtype)
    dev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=dev, dtype=torch.float32).to(device=device, dtype=dtype)


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


@OBJECTIVES.register("flow")
@dataclass
class FlowMatching:
    time_sampling: str = "uniform"  # uniform (reference) | logit_normal
    logit_mean: float = 0.0  # logit_normal only
    logit_std: float = 1.0
    time_shift: float = 1.0  # SD3-style shift of sigma; 1.0 = none (reference)
    # DiT timesteps at sampling: integer = 1000 sigma truncated, as the original (the values its uniform-grid
    # training saw); float = exact; auto = integer when time_sampling=uniform and time_shift=1, else float.
    sample_timesteps: str = "auto"
    deterministic: ClassVar[bool] = False

    def __post_init__(self):
        for name, choices in (("time_sampling", ("uniform", "logit_normal")),
                              ("sample_timesteps", ("auto", "integer", "float"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: '{getattr(self, name)}' is not one of {list(choices)}")
        if self.time_sampling != "logit_normal" and (self.logit_mean, self.logit_std) != (0.0, 1.0):
            raise ValueError("logit_mean/logit_std: only used with time_sampling=logit_normal")

    @property
    def integer_timesteps(self) -> bool:
        if self.sample_timesteps == "auto":  # trained on the integer grid -> sample on integers
            return self.time_sampling == "uniform" and self.time_shift == 1.0
        return self.sample_timesteps == "integer"

    def sample_sigma(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # Drawn on CPU like the reference, so runs are reproducible across devices.
        if self.time_sampling == "uniform":
            return self.sigma_from_uniform(torch.rand(batch, generator=generator))
        if self.time_sampling == "logit_normal":
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, generator=generator))
            return shift_sigma(sigma, self.time_shift)
        raise ValueError(f"unknown time_sampling '{self.time_sampling}'")

    def sigma_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """u ~ U[0, 1) -> index floor(1000 u) into the 1000-step grid -> timesteps 1000..1 -> sigma 1..0.001."""
        idx = (u * NUM_TRAIN_TIMESTEPS).long()
        return shift_sigma((NUM_TRAIN_TIMESTEPS - idx).float() / NUM_TRAIN_TIMESTEPS, self.time_shift)

    def loss(self, net: Net, x0: torch.Tensor, cond: torch.Tensor, cond_mask: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        sigma = self.sample_sigma(x0.shape[0], generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
        return self.loss_at(net, x0, cond, cond_mask, sigma, noise)

    def loss_at(self, net: Net, x0: torch.Tensor, cond: torch.Tensor, cond_mask: Optional[torch.Tensor],
                sigma: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss at given noise levels and noise (what ``loss`` draws)."""
        b = x0.shape[0]
        s = sigma.view(b, *([1] * (x0.dim() - 1))).to(x0.dtype)
        xt = (1 - s) * x0 + s * noise
        pred = net(xt, sigma * NUM_TRAIN_TIMESTEPS, cond, cond_mask)
        target = noise - x0
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"flow_loss": loss.detach(), "sigma_mean": sigma.mean().detach()}

    def sigmas(self, steps: int) -> torch.Tensor:
        # Reference schedule: linspace(1, 1/steps, steps) then a final 0, computed in float64 as numpy
        # does there (torch.linspace in float32 is one ulp off on most of the 30 values, which moves
        # truncated timesteps, e.g. 499 instead of 500).
        s = torch.from_numpy(np.linspace(1.0, 1.0 / steps, steps)).float()
        return torch.cat([shift_sigma(s, self.time_shift), torch.zeros(1)])

    @torch.no_grad()
    def sample(self, net: Net, cond: torch.Tensor, cond_mask: Optional[torch.Tensor], shape: Tuple[int, ...],
               num_steps: int = 30, guidance_scale: float = 3.0, generator: Generators = None,
               progress: Optional[Callable] = None) -> torch.Tensor:
        """For a net whose unconditional prediction is the zeroed condition's (the DiT)."""
        return self.sample_from(zeroed_condition(net, cond, cond_mask), shape, cond.device, num_steps,
                                guidance_scale, generator, progress)

    @torch.no_grad()
    def sample_from(self, predict: Predictors, shape: Tuple[int, ...], device, num_steps: int = 30,
                    guidance_scale: float = 3.0, generator: Generators = None,
                    progress: Optional[Callable] = None, guidance_rescale: float = 0.0) -> torch.Tensor:
        x = randn_like_per_sample(shape, generator, device, torch.float32)
        return euler_sample(predict, x, self.sigmas(num_steps), guidance_scale, progress=progress,
                            integer_timesteps=self.integer_timesteps, guidance_rescale=guidance_rescale)


@OBJECTIVES.register("mse")
@dataclass
class MSERegression:
    deterministic: ClassVar[bool] = True

    def predict(self, net: Net, cond: torch.Tensor, cond_mask: Optional[torch.Tensor], shape) -> torch.Tensor:
        canvas = torch.zeros(shape, device=cond.device, dtype=cond.dtype)
        t = torch.zeros(shape[0], device=cond.device)
        return net(canvas, t, cond, cond_mask)

    def loss(self, net: Net, x0: torch.Tensor, cond: torch.Tensor, cond_mask: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None):
        pred = self.predict(net, cond.to(x0.dtype), cond_mask, x0.shape)
        loss = F.mse_loss(pred.float(), x0.float())
        return loss, {"mse_loss": loss.detach()}

    @torch.no_grad()
    def sample(self, net: Net, cond: torch.Tensor, cond_mask: Optional[torch.Tensor], shape, num_steps: int = 1,
               guidance_scale: float = 1.0, generator: Generators = None, progress=None) -> torch.Tensor:
        return self.sample_from(zeroed_condition(net, cond, cond_mask), shape, cond.device,
                                guidance_scale=guidance_scale)

    @torch.no_grad()
    def sample_from(self, predict: Predictors, shape, device, num_steps: int = 1, guidance_scale: float = 1.0,
                    generator: Generators = None, progress=None, guidance_rescale: float = 0.0) -> torch.Tensor:
        if guidance_rescale:
            raise ValueError("model.guidance_rescale: the mse objective has no sampling trajectory to rescale")
        # Deterministic: seeds and steps do not matter. Guidance extrapolates the two regressions
        # (cond vs uncond), mirroring CFG, and is skipped at 1.0.
        canvas = torch.zeros(shape, device=device)
        return predict(canvas, torch.zeros(shape[0], device=device), guidance_scale)


def build_objective(name: str, **settings):
    cls = OBJECTIVES.get(name)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"objective '{name}': unknown setting(s) {unknown}; its settings: {sorted(known) or 'none'}")
    return cls(**settings)


def saved_settings(name: str, settings: Dict[str, Any]) -> Dict[str, Any]:
    """The objective settings of a saved model config in today's form. Configs written before the settings
    nested under model.objective hold the five flow settings under every objective, with `shift` for
    `time_shift`; objectives without them ignored them then, so they are dropped here."""
    if "shift" not in settings:
        return dict(settings)
    old = {("time_shift" if k == "shift" else k): v for k, v in settings.items()}
    known = {f.name for f in fields(OBJECTIVES.get(name))}
    return {k: v for k, v in old.items() if k in known}
