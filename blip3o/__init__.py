"""blip3o: a research training framework for BLIP3-o (arXiv 2505.09568).

Importing the package has no side effects beyond making torchvision importable on CPU-only
machines (see ``blip3o._compat``); nothing downloads or prints.
"""
from blip3o._compat import patch_torchvision as _patch_torchvision

_patch_torchvision()

__version__ = "0.1.0"
