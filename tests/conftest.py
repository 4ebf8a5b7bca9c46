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

TIERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(config, items):
    # The folder is the tier (tests/unit, tests/integration, tests/system), so a test cannot forget its mark
    # and `pytest -m "not system"` is the quick loop.
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if len(parts) > 1 and parts[0] in TIERS:
            item.add_marker(parts[0])


@pytest.fixture(scope="session")
def tiny_qwen_dir():
    from blip3o.models.backbone import resolve_backbone_path

    return resolve_backbone_path("qwen2_5_vl", "tiny")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A small real toy world: WebDataset shards + GenEval-format eval prompts."""
    from blip3o.data.toy import write_toy_dataset

    d = tmp_path_factory.mktemp("toy")
    write_toy_dataset(str(d), num=400, seed=0, shard_size=100)
    return d


def train_cmd(toy, out, *overrides, steps=6):
    import sys

    return [sys.executable, "-m", "blip3o.train", str(ROOT / "configs" / "toy.yaml"),
            f"data.train_shards={toy / 'train'}", f"data.eval_prompts={toy / 'eval' / 'prompts.jsonl'}",
            f"train.output_dir={out}", f"train.max_steps={steps}", "train.logging_steps=1", "train.save_steps=3",
            "train.per_device_train_batch_size=4", "data.num_workers=0", "data.shuffle_buffer=50", *overrides]


def run_env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def make_tiny_checkpoint(out, decoder="sdxl", target="eva_clip", with_decoder=True):
    """A saved tiny model dir (random weights) with a tiny diffusion-decoder/, as training writes it."""
    from blip3o.config import load_config
    from blip3o.models.build import build_model

    cfg = load_config(None, ["preset=tiny", f"model.target={target}", "model.num_queries=16",
                             "model.num_inference_steps=3"])
    torch.manual_seed(0)
    model, _ = build_model(cfg.model)
    if with_decoder:
        from blip3o.decoders import build_decoder

        dec = build_decoder(decoder, preset="tiny", feature_dim=model.config.target_channels,
                            num_tokens=model.config.target_grid[0] * model.config.target_grid[1],
                            num_inference_steps=3)
        dec.save_pretrained(str(Path(out) / "diffusion-decoder"))
        model.config.decoder_path = "diffusion-decoder"
    model.save_pretrained(out)
    return Path(out)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")
