"""The decoder registry: one :class:`DecoderSpec` per decoder, registered where the decoder is defined.

A spec is everything the rest of the code may ask about a decoder by name: how to build it (and which
keyword arguments that takes), its pipeline class (for loading folders), its reconstruction loss, which
modules that loss trains, its official checkpoint, the target encoder it was made for, and the extra
component classes its folders may name. Code asks the spec, never compares decoder names.

Adding a decoder is one module that defines the pipeline, a builder and a loss, then registers::

    DECODERS.register("mine")(DecoderSpec(name="mine", pipeline_class=MinePipeline, build=build_mine_decoder,
                                          training_loss=mine_training_loss, trained=("transformer",), ...))

and one import line in ``blip3o/decoders/__init__.py``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, FrozenSet, Mapping, Optional, Tuple

from blip3o.registry import Registry

# What build_decoder passes on when it loads released weights instead of building.
LOAD_OPTIONS = frozenset({"torch_dtype", "variant"})


@dataclass(frozen=True)
class DecoderSpec:
    name: str
    pipeline_class: type  # a FeatureDecoderPipeline subclass whose `kind` is `name`
    build: Callable[..., Any]  # build(preset=..., **kwargs) -> a randomly initialised pipeline
    # training_loss(parts, images, features, generator, null_prob, feature_noise, prediction) -> (loss, parts);
    # a loss that takes a `time_shift` keyword gets it when the config asks for a shift other than 1
    training_loss: Callable[..., Any]
    trained: Tuple[str, ...]  # pipeline modules the reconstruction loss trains, denoiser first
    official_repo: str
    official_subfolder: Optional[str]
    target: str  # the target encoder (model.target) whose features the official decoder reads
    feature_dim: int  # of that target encoder
    target_encoder: str  # which checkpoint of it, in words
    component_classes: Tuple[type, ...] = ()  # our own ModelMixin classes its folders may name
    save_official: Optional[Callable[..., str]] = None  # writes the official folder layout, where one exists

    def __post_init__(self):
        if self.pipeline_class.kind != self.name:
            raise ValueError(f"decoder '{self.name}': {self.pipeline_class.__name__}.kind is "
                             f"'{self.pipeline_class.kind}'")
        if not self.trained or self.trained[0] != self.denoiser:
            raise ValueError(f"decoder '{self.name}': trained must start with the denoiser '{self.denoiser}'")

    @property
    def denoiser(self) -> str:
        """The denoiser's module name ("unet", "transformer"): also the subfolder that marks the decoder's folders."""
        return self.pipeline_class.denoiser_name

    @property
    def build_kwargs(self) -> FrozenSet[str]:
        """The keyword arguments `build` takes besides the preset (feature_dim, vae, prediction, *_config, ...)."""
        return frozenset(p for p in inspect.signature(self.build).parameters if p != "preset")

    def check_build_kwargs(self, kwargs: Mapping[str, Any], loading: bool = False) -> None:
        """One-line ValueError naming every argument the builder (or, `loading`, the weight loader) does not take."""
        allowed = LOAD_OPTIONS if loading else self.build_kwargs
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            what = "loading released weights" if loading else "building"
            raise ValueError(f"decoder '{self.name}': unknown argument(s) {', '.join(unknown)} when {what}; "
                             f"it takes {', '.join(sorted(allowed))}")


DECODERS: Registry[DecoderSpec] = Registry("decoder")
