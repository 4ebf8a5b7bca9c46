"""Exponential moving average of the trainable parameters, and the one place its weights enter a model.

    ema = EMA(model.named_parameters(), decay=0.9999)   # fp32 shadow copies, by parameter name
    ema.update(model.named_parameters(), step)          # after each optimiser step (step: updates so far)
    with ema.swapped_in(model):                         # sample with the averaged weights ...
        ...                                             # ... and get the live ones back afterwards
    ema.copy_to(model)                                  # for good, before saving the final model
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EMA:
    def __init__(self, named_params, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.shadow = {n: p.detach().clone().float() for n, p in named_params}

    def decay_at(self, step: int) -> float:
        """The decay of update number `step` (0-based): with warm-up, min(decay, (1+n)/(10+n))."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, named_params, step: int = 0):
        """`step`: how many updates came before this one (the trainer's step, so a resumed run continues the
        warm-up where it was)."""
        d = self.decay_at(step)
        for n, p in named_params:
            self.shadow[n].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Writes the averages into the module's parameters of the same names, in each parameter's dtype."""
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The averages in the module inside the block; its live weights restored exactly on the way out."""
        with torch.no_grad():
            live = {n: p.detach().clone() for n, p in module.named_parameters() if n in self.shadow}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in live:
                        p.copy_(live[n])
