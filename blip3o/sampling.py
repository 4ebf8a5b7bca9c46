"""Euler ODE sampler for flow matching with classifier-free guidance.

The sampler sees a model as :class:`Predictors`: the conditional and the unconditional prediction
``(x, t) -> v``, and optionally ``both`` that returns the two from one batched forward (the DiT on stacked
conditions, a fusion backbone on a stacked prompt cache), which is how ours run. At guidance scale g each
step takes v = guided(v_c, v_u, g) = v_u + g (v_c - v_u), then x <- x + (sigma_next - sigma) v; at g = 1
only the conditional prediction runs. The model sees t = 1000 sigma, either truncated to an integer as the
reference does at inference (its training timesteps are the integers 1..1000 of the 1000-step grid, so
those are the values its weights know) or as the exact float (``integer_timesteps=False``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> prediction shaped like x


def guided(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: from the unconditional prediction past the conditional one by `scale`."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def rescale_guided(v_guided: torch.Tensor, v_cond: torch.Tensor, x: torch.Tensor, sigma: float,
                   phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, diffusers' ``guidance_rescale``) for a flow velocity v = noise - x0.

    A large guidance scale inflates the predicted sample's spread past anything the data has (the toy world's
    generated features reach twice the ground-truth std, which its decoder renders as saturated frames). The
    x0 that the guided velocity implies, x - sigma v, is scaled per sample to the std of the conditional one,
    and mixed back with weight ``phi`` (0 = plain CFG)."""
    dims = tuple(range(1, x.dim()))
    x0_g, x0_c = x - sigma * v_guided, x - sigma * v_cond
    x0_r = x0_g * (x0_c.std(dims, keepdim=True) / x0_g.std(dims, keepdim=True).clamp_min(1e-6))
    x0 = phi * x0_r + (1.0 - phi) * x0_g
    return (x - x0) / sigma


@dataclass
class Predictors:
    """What a guided sampler evaluates. ``both(x, t) -> (pred_cond, pred_uncond)`` must equal the two
    separate calls; a model gives it to run them as one batch. With guidance, ``both`` or ``cond`` and
    ``uncond`` are needed; without, ``cond``."""
    cond: Optional[Predict] = None
    uncond: Optional[Predict] = None
    both: Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, scale: float, rescale: float = 0.0,
                 sigma: Optional[float] = None) -> torch.Tensor:
        """The guided prediction in float32 (``rescale`` > 0: :func:`rescale_guided` at noise level ``sigma``)."""
        if scale == 1.0:
            if self.cond is None:
                raise ValueError("sampling without guidance needs the conditional prediction (Predictors.cond)")
            return self.cond(x, t).float()
        if self.both is not None:
            c, u = self.both(x, t)
        elif self.cond is not None and self.uncond is not None:
            c, u = self.cond(x, t), self.uncond(x, t)
        else:
            raise ValueError("guidance needs Predictors.both or both of Predictors.cond and Predictors.uncond")
        v = guided(c.float(), u.float(), scale)
        if rescale > 0.0:
            if not sigma:
                raise ValueError("guidance rescale needs the step's noise level sigma > 0")
            v = rescale_guided(v, c.float(), x.float(), sigma, rescale)
        return v


def zeroed_condition(net: Callable, cond: torch.Tensor, cond_mask: Optional[torch.Tensor]) -> Predictors:
    """Predictors of a net ``net(x, t, cond, cond_mask)`` trained with CFG dropout that zeroes the whole
    condition (the DiT, as the reference): the unconditional prediction is the zeroed condition's, and
    ``both`` runs the two halves in one forward. x is cast to the condition's dtype."""
    def cond_fn(x, t):
        return net(x.to(cond.dtype), t, cond, cond_mask)

    def uncond_fn(x, t):
        return net(x.to(cond.dtype), t, torch.zeros_like(cond), cond_mask)

    def both(x, t):
        mask = None if cond_mask is None else torch.cat([cond_mask, cond_mask])
        v = net(torch.cat([x, x]).to(cond.dtype), torch.cat([t, t]), torch.cat([torch.zeros_like(cond), cond]), mask)
        v_u, v_c = v.chunk(2)
        return v_c, v_u

    return Predictors(cond_fn, uncond_fn, both)


@torch.no_grad()
def euler_sample(predict: Predictors, x: torch.Tensor, sigmas: torch.Tensor, guidance_scale: float = 3.0,
                 progress: Optional[Callable] = None, integer_timesteps: bool = False,
                 guidance_rescale: float = 0.0) -> torch.Tensor:
    """x: initial noise (B, C, h, w) at sigmas[0]; returns the sample at sigmas[-1] (float32)."""
    x = x.float()
    steps = range(len(sigmas) - 1)
    if progress is not None:
        steps = progress(steps)
    for i in steps:
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        # float32 product as diffusers' scheduler forms its timesteps, then (reference) truncation
        t = sigmas[i:i + 1].float() * 1000.0
        if integer_timesteps:
            t = t.long().float()
        t = t.to(x.device).repeat(x.shape[0])
        x = x + (s_next - s) * predict(x, t, guidance_scale, guidance_rescale, s)
    return x
