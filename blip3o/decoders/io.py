"""Decoder folders: finding them (local or, on request, the hub), telling the kind, loading each component.

Each subfolder is read with the class its config names, a diffusers class or one of ours, and nothing else:
code shipped in a folder (the official checkpoint's `pipeline_llava_gen.py`) is never executed.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Optional, Union

import diffusers

from blip3o.decoders.components import NullCondition, PixelUnshuffleAutoencoder
from blip3o.decoders.spec import DECODERS


class DecoderLoadError(FileNotFoundError):
    """A decoder folder or hub id could not be resolved locally."""


_WEIGHT_RE = re.compile(r"^diffusion_pytorch_model(?:-\d+-of-\d+)?(?:\.(?P<v>[^.]+))?\.(?:safetensors|bin)$")
_INDEX_RE = re.compile(r"^diffusion_pytorch_model\.(?:safetensors|bin)\.index(?:\.(?P<v>[^.]+))?\.json$")


def detect_variant(folder: str) -> Optional[str]:
    """None when plain weights exist, else the variant the files carry (bf16 preferred, then fp16)."""
    variants = set()
    for name in os.listdir(folder):
        m = _WEIGHT_RE.match(name) or _INDEX_RE.match(name)
        if m:
            variants.add(m.group("v"))
    if not variants or None in variants:
        return None
    for preferred in ("bf16", "fp16", "fp32"):
        if preferred in variants:
            return preferred
    return sorted(variants)[0]


def read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def resolve_component_class(class_name: str) -> type:
    """The class a component folder names: one of ours (shared or a registered decoder's), else diffusers'.
    Anything else is refused rather than imported."""
    ours = [NullCondition, PixelUnshuffleAutoencoder]
    ours += [cls for name in DECODERS.names() for cls in DECODERS.get(name).component_classes]
    for cls in ours:
        if cls.__name__ == class_name:
            return cls
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"unsupported decoder component class '{class_name}' (not a diffusers class)")
    return cls


def load_component(root: str, name: str, torch_dtype=None, variant: Optional[str] = "auto"):
    """Load `root/name` with the class its config names (diffusers class or one of ours); None if absent."""
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        return None
    for cfg_name in ("scheduler_config.json", "config.json"):
        cfg_path = os.path.join(folder, cfg_name)
        if os.path.isfile(cfg_path):
            break
    else:
        return None
    cls = resolve_component_class(read_json(cfg_path).get("_class_name", ""))
    if cfg_name == "scheduler_config.json":
        return cls.from_pretrained(root, subfolder=name, local_files_only=True)
    if getattr(cls, "weightless", False):  # nothing to cast: it only rearranges pixels
        return cls.from_config(cls.load_config(folder))
    if variant == "auto":
        variant = detect_variant(folder)
    kwargs = dict(subfolder=name, local_files_only=True, variant=variant)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return cls.from_pretrained(root, **kwargs)


def resolve_pretrained_dir(
    path_or_id: Union[str, os.PathLike], subfolder: Optional[str] = None, allow_download: bool = False
) -> str:
    """A local folder, or (only with allow_download=True) a hub snapshot; otherwise a one-line error."""
    path = os.fspath(path_or_id)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return local
    looks_like_hub_id = (
        not os.path.isabs(path) and path.count("/") == 1 and not path.startswith(".") and not os.path.exists(path)
    )
    if not looks_like_hub_id:
        raise DecoderLoadError(f"decoder folder not found: {local}")
    if not allow_download:
        raise DecoderLoadError(
            f"decoder '{local}' is not a local folder, and hub downloads are disabled: download '{path}' first "
            f"(e.g. `huggingface-cli download {path}`) and pass the local path, or pass allow_download=True"
        )
    from huggingface_hub import snapshot_download  # only reached on explicit request

    patterns = [f"{subfolder}/*"] if subfolder else None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        root = snapshot_download(path, allow_patterns=patterns, local_files_only=offline)
    except Exception as e:  # network errors, offline mode without a cache, gated repos
        raise DecoderLoadError(f"could not fetch decoder '{path}' from the hub: {type(e).__name__}: {e}") from e
    local = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(local):
        raise DecoderLoadError(f"hub snapshot of '{path}' has no folder '{subfolder}'")
    return local


def read_model_index(root: str) -> Dict[str, Any]:
    """The folder's model_index.json ({} when there is none)."""
    path = os.path.join(root, "model_index.json")
    return read_json(path) if os.path.isfile(path) else {}


def detect_decoder_kind(root: str) -> str:
    """The registered decoder a folder holds: from our model_index.json's pipeline class, else from the
    denoiser's subfolder (unet/, transformer/), since official folders name other pipeline classes."""
    specs = [DECODERS.get(name) for name in DECODERS.names()]
    class_name = read_model_index(root).get("_class_name")
    for spec in specs:
        if class_name == spec.pipeline_class.__name__:
            return spec.name
    for spec in specs:
        if os.path.isdir(os.path.join(root, spec.denoiser)):
            return spec.name
    folders = " or ".join(f"{s.denoiser}/" for s in specs)
    raise DecoderLoadError(f"{root} is not a decoder folder (no model_index.json of ours, no {folders})")
