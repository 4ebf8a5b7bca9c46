"""What the image-only tasks share (``decoder``, ``clip``): images in [-1, 1] from the shared loader.

The loader always builds generation prompts, so these tasks still need the backbone's tokenizer, although they
read only the images (and, for the toy CLIP, the raw captions).
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import AutoTokenizer

from blip3o.data import build_train_dataloader
from blip3o.data.transforms import center_crop, resize_shorter
from blip3o.models.backbone import resolve_backbone_path
from blip3o.prompts import add_special_tokens


class ImageLoaderTask:
    """Mixin: set ``self.cfg`` and ``self.image_size``, call ``_init_tokenizer()``; get the loader."""

    def _init_tokenizer(self) -> None:
        m = self.cfg.model
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path(m.backbone, m.backbone_path))
        add_special_tokens(self.tokenizer)

    def image_transform(self, img) -> torch.Tensor:
        img = center_crop(resize_shorter(img.convert("RGB"), self.image_size), self.image_size)
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0

    def build_loader(self, rank: int, world_size: int, seed: int):
        c = self.cfg
        return build_train_dataloader(
            c.data, self.tokenizer, image_transform=self.image_transform, rank=rank, world_size=world_size,
            seed=seed, batch_size=c.train.per_device_train_batch_size, num_workers=c.data.num_workers,
            template="chatml", num_queries=c.model.num_queries, max_length=c.model.max_length,
            target_signature=None)
