"""Shared test setup: offline, quiet, tiny presets cached once per checkout."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("BLIP3O_CACHE", str(ROOT / ".cache" / "blip3o"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import blip3o  # noqa: E402,F401  (torchvision shim before transformers/timm)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny ops: threads only add contention (and CI shares 2 cores)


@pytest.fixture(scope="session")
def tiny_qwen_dir():
    from blip3o.models.backbone import resolve_backbone_path

    return resolve_backbone_path("qwen2_5_vl", "tiny")
