"""Make the CPU-only world importable.

PyPI's only torchvision for torch 2.13 is a CUDA build whose ``_C`` extension cannot load without
libtorch_cuda; its ``_meta_registrations`` then fails on the missing ``torchvision::nms`` schema, and
transformers (which imports torchvision when present) breaks with it. Defining the two op schemas
before torchvision imports lets its pure-Python parts (transforms, ops.misc) and therefore timm and
open_clip import. With a working CUDA torch the real library loads and this is a no-op.
"""
from __future__ import annotations

import glob
import importlib.util
import os

_lib = None
_done = False


def patch_torchvision() -> bool:
    """Returns True when the schema shim was installed (i.e. torchvision's C ops are unavailable)."""
    global _lib, _done
    if _done:
        return _lib is not None
    _done = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch  # only once torchvision is known to be installed

    libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    try:
        if libs:
            torch.ops.load_library(libs[0])
            return False
    except (OSError, ImportError, RuntimeError):
        pass
    try:
        _lib = torch.library.Library("torchvision", "FRAGMENT")
        _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined by someone else in this process
        _lib = None
    return True
