"""Euler ODE sampler for flow matching with classifier-free guidance.

One batched forward per step: the unconditional half (conditioning zeroed, as trained with CFG
dropout) and the conditional half go through the net together, v = v_u + g (v_c - v_u), then
x <- x + (sigma_next - sigma) v. The DiT sees t = 1000 sigma, either truncated to an integer as the
reference does at inference (its training timesteps are the integers 1..1000 of the 1000-step grid, so
those are the values its weights know) or as the exact float (``integer_timesteps=False``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


@torch.no_grad()
def euler_sample(net: Callable, x: torch.Tensor, cond: torch.Tensor, cond_mask: Optional[torch.Tensor],
                 sigmas: torch.Tensor, guidance_scale: float = 3.0,
                 progress: Optional[Callable] = None, integer_timesteps: bool = False) -> torch.Tensor:
    """x: initial noise (B, C, h, w) at sigmas[0]; returns the sample at sigmas[-1] (float32)."""
    b = x.shape[0]
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        cond_in = torch.cat([torch.zeros_like(cond), cond])
        mask_in = None if cond_mask is None else torch.cat([cond_mask, cond_mask])
    else:
        cond_in, mask_in = cond, cond_mask
    x = x.float()
    steps = range(len(sigmas) - 1)
    if progress is not None:
        steps = progress(steps)
    for i in steps:
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        x_in = torch.cat([x, x]) if use_cfg else x
        # float32 product as diffusers' scheduler forms its timesteps, then (reference) truncation
        t = sigmas[i:i + 1].float() * 1000.0
        if integer_timesteps:
            t = t.long().float()
        t = t.to(x.device).repeat(x_in.shape[0])
        v = net(x_in.to(cond.dtype), t, cond_in, mask_in).float()
        if use_cfg:
            v_u, v_c = v[:b], v[b:]
            v = v_u + guidance_scale * (v_c - v_u)
        x = x + (s_next - s) * v
    return x
