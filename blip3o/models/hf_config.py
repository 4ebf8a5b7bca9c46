"""``ModelConfig`` (the YAML's ``model:`` section) -> the HF config a generator saves as ``config.json``.

One mapping for every generator config (``Blip3oConfig``, ``FusionConfig``): each ``ModelConfig`` field that the
HF config takes is copied under its HF name, so a new setting added to both flows through without another
hand-written copy. Facts known only at build time (the backbone's own config, the target's shape, token ids,
resolved paths) are passed as keyword arguments and win.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Dict

from blip3o.config import ModelConfig

# ModelConfig field -> HF config argument where the names differ. The HF names are what saved config.json
# files hold, so they stay; a generator-specific HF name avoids attributes transformers treats specially
# (it reads ``generator``/``decoder``-like attributes as sub-model configs).
RENAMED = {
    "max_length": "max_prompt_length",
    "attn_implementation": "attn_implementation_backbone",
    "generator": "generator_type",
    "fusion_patch_size": "patch_size",
}


def objective_kwargs_for(cfg: ModelConfig) -> Dict[str, Any]:
    """The objective's settings, as ``build_objective(cfg.objective, **kwargs)`` takes them."""
    obj = cfg.objective if isinstance(cfg.objective, dict) else {"name": cfg.objective}
    return {k: v for k, v in obj.items() if k != "name"}


def hf_config_for(config_cls, cfg: ModelConfig, **facts: Any):
    """``config_cls(**kwargs)``: the ``ModelConfig`` fields ``config_cls.__init__`` accepts (renamed by
    ``RENAMED``), ``objective_kwargs``, then ``facts``. A fact the config does not take is an error."""
    params = {n for n, p in inspect.signature(config_cls.__init__).parameters.items()
              if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    unknown = set(facts) - params
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no field(s) {sorted(unknown)}")
    kwargs: Dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        name = RENAMED.get(f.name, f.name)
        if name in params:
            kwargs[name] = copy.deepcopy(getattr(cfg, f.name))
    if "objective" in params:  # the YAML's nested {name: ..., settings} -> the name and its settings
        kwargs["objective"] = cfg.objective["name"] if isinstance(cfg.objective, dict) else cfg.objective
    kwargs["objective_kwargs"] = objective_kwargs_for(cfg)
    kwargs.update(facts)
    return config_cls(**kwargs)
