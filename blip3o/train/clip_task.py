"""Training task ``clip``: the toy world's CLIP (``blip3o.models.targets.toy_clip``) on image-caption shards.

    python -m blip3o.train configs/toy_clip.yaml
    python -m blip3o.train configs/toy_clip.yaml data.train_shards=toy_data/train train.max_minutes=3

The final directory is a ``toy_clip`` target encoder (point the generator and decoder at it with
``model.target: toy_clip`` and ``model.target_path``) with the text tower beside it, and ``zero_shot.json``:
the tower's zero-shot shape and colour accuracy on held-out toy scenes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict

import torch

from blip3o.config import ExperimentConfig
from blip3o.models.targets import TARGET_PRESETS, ToyClipModel, zero_shot_accuracy
from blip3o.train.distributed import DistInfo
from blip3o.train.image_task import ImageLoaderTask
from blip3o.train.task_registry import TASKS

logger = logging.getLogger("blip3o.train")


class _ClipModule(torch.nn.Module):
    """Wraps the toy CLIP so that forward returns (loss, parts), as the loop expects."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, images, captions, generator=None):
        return self.clip(images, captions, generator=generator)


@TASKS.register("clip")
class ClipTask(ImageLoaderTask):
    def __init__(self, cfg: ExperimentConfig, dist: DistInfo):
        m = cfg.model
        if m.target != "toy_clip":
            raise ValueError(f"train.task clip trains the toy CLIP: set model.target: toy_clip (got '{m.target}')")
        if m.target_preset not in TARGET_PRESETS["toy_clip"]:
            raise ValueError(f"model.target_preset: '{m.target_preset}' is not one of {sorted(TARGET_PRESETS['toy_clip'])}")
        self.cfg, self.dist = cfg, dist
        torch.manual_seed(cfg.train.seed)
        self.clip = ToyClipModel(TARGET_PRESETS["toy_clip"][m.target_preset], **m.target_kwargs)
        self.model = _ClipModule(self.clip)
        self.image_size = int(self.clip.config["image_size"])
        self._init_tokenizer()  # the loader's prompts are unused: this task reads the raw captions

    def to_device(self, batch, device):
        return {"images": batch["pixel_values"].to(device), "captions": batch["captions"]}

    def loss(self, module, batch):
        return module(batch["images"], batch["captions"])

    def flops_per_sample(self) -> Dict[str, float]:
        # convs: 2 * params * output positions (x3 for fwd + bwd); the bag-of-words text side is negligible
        flops, x = 0.0, torch.zeros(1, 3, self.image_size, self.image_size)
        with torch.no_grad():
            for layer in self.clip.image.net:
                x = layer(x)
                if isinstance(layer, torch.nn.Conv2d):
                    flops += 6.0 * layer.weight.numel() * x.shape[-1] * x.shape[-2]
        return {"trainable": flops, "frozen": 0.0}

    @torch.no_grad()
    def sample(self, path: Path, ema=None):
        """Zero-shot accuracy of the current weights (JSON beside where image tasks write their grid)."""
        was = self.clip.training
        self.clip.eval()
        acc = zero_shot_accuracy(self.clip, n=150)
        self.clip.train(was)
        out = path.with_suffix(".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(acc))
        logger.info("zero-shot shape %.3f colour %.3f", acc["shape"], acc["colour"])
        return out

    def save_final(self, out: Path, ema=None, state_dict=None):
        if state_dict is not None:
            raise ValueError("the clip task does not support sharded engines (ZeRO-3, FSDP): it is a toy-sized model")
        if ema is not None:
            ema.copy_to(self.model)
        self.clip.eval()
        self.clip.save_pretrained(str(out))
        acc = zero_shot_accuracy(self.clip)
        (out / "zero_shot.json").write_text(json.dumps(acc, indent=2))
        (out / "experiment.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        logger.info("saved toy CLIP to %s (zero-shot shape %.3f, colour %.3f)", out, acc["shape"], acc["colour"])
