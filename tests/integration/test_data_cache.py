"""Target-feature cache: written once, read instead of images, checked against the configured target."""
import importlib.util
import json
import os
import shutil

import pytest
import torch

from blip3o.data import CacheMismatchError, build_train_dataloader, cache_shards, expand_shards
from blip3o.data.shards import iter_tar_samples
from tests.unit.test_data_common import (  # noqa: F401  (fixtures)
    StandInTarget, _datasets_cache, data_cfg, good_samples, keys, qwen_tokenizer, take, toy_dir,
    write_tar,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def shard_dir(tmp_path, toy_dir):
    d = tmp_path / "shards"
    shutil.copytree(toy_dir / "train", d)
    write_tar(d / "zz-with-bad.tar", good_samples("ok", 3) + [("bad", {"jpg": b"junk", "txt": b"x"})])
    return d


def _loader(cfg, tok, target, **kw):
    return build_train_dataloader(cfg, tok, target.transform, seed=2, batch_size=4, num_workers=0, num_queries=8,
                                  max_length=64, target_signature=target.signature(), **kw)


def test_cache_roundtrip(shard_dir, qwen_tokenizer):
    target = StandInTarget()
    shards = expand_shards(str(shard_dir))
    result = cache_shards(shards, target, batch_size=16)
    assert result["shards_written"] == 9 and result["samples"] == 323 and result["skipped_bad_image"] == 1
    cache = shard_dir / "x0_cache" / "standin"
    sig = json.loads((cache / "signature.json").read_text())
    assert sig["target"] == target.signature() and sig["shape"] == [8, 4, 4] and sig["dtype"] == "float16"
    # same keys, same order, bad image left out; every non-image field kept
    orig = [s["__key__"] for s in iter_tar_samples(str(shard_dir / "toy-000000.tar"))]
    cached = list(iter_tar_samples(str(cache / "toy-000000.tar")))
    assert [s["__key__"] for s in cached] == orig
    assert set(cached[0]) - {"__key__", "__url__", "__index__"} == {"x0.npy", "txt", "long.txt", "json"}
    # a re-run skips finished shards
    assert cache_shards(shards, target)["shards_existing"] == 9

    # Shards without bad samples give the same raw stream cached or not, so features can be compared.
    cfg = data_cfg(train_shards=str(shard_dir / "toy-*.tar"), shuffle_buffer=8)
    cached_batches = take(_loader(dict(cfg, use_cache=True), qwen_tokenizer, target), 5)
    image_batches = take(_loader(dict(cfg, use_cache=False), qwen_tokenizer, target), 5)
    assert keys(cached_batches) == keys(image_batches)
    b = cached_batches[0]
    assert "pixel_values" not in b and b["target_latents"].shape == (4, 8, 4, 4)
    assert b["target_latents"].dtype == torch.float32
    ref = target.encode(image_batches[0]["pixel_values"])
    assert torch.allclose(b["target_latents"], ref, atol=2e-3, rtol=2e-3)  # float16 storage
    assert torch.equal(b["input_ids"], image_batches[0]["input_ids"])
    cfg = data_cfg(train_shards=str(shard_dir))
    # "auto" uses the cache when it matches
    assert "target_latents" in take(_loader(dict(cfg, use_cache="auto"), qwen_tokenizer, target), 1)[0]


def test_cache_with_understanding_and_partial_sources(shard_dir, qwen_tokenizer, tmp_path):
    target = StandInTarget()
    cache_shards(expand_shards(str(shard_dir / "toy-*.tar")), target)
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Say {i}."},
                                                   {"from": "gpt", "value": f"{i}."}]} for i in range(8)]))
    cfg = data_cfg(sources=[{"name": "t2i", "shards": str(shard_dir / "toy-*.tar")},
                            {"name": "chat", "json_path": str(chat)}], use_cache=True)
    batches = take(_loader(cfg, qwen_tokenizer, target), 4)  # conversations need no cache
    assert any("und_input_ids" in b for b in batches)
    assert all("pixel_values" not in b for b in batches) and any("target_latents" in b for b in batches)
    # a second image source without a cache: auto decodes images for all, true refuses
    other = tmp_path / "other"
    other.mkdir()
    write_tar(other / "o.tar", good_samples("o", 5))
    cfg["sources"].append({"name": "other", "shards": str(other)})
    with pytest.raises(ValueError, match="no complete target cache"):
        _loader(cfg, qwen_tokenizer, target)
    cfg["use_cache"] = "auto"
    assert all("target_latents" not in b for b in take(_loader(cfg, qwen_tokenizer, target), 3))


def test_cache_signature_mismatch_is_an_error(shard_dir, qwen_tokenizer):
    shards = expand_shards(str(shard_dir))
    cache_shards(shards, StandInTarget(tag="v1"))
    other = StandInTarget(tag="v2")
    cfg = data_cfg(train_shards=str(shard_dir))
    for mode in (True, "auto"):
        with pytest.raises(CacheMismatchError, match="different target.*tag"):
            _loader(dict(cfg, use_cache=mode), qwen_tokenizer, other)
    with pytest.raises(CacheMismatchError, match="another target"):
        cache_shards(shards, other, out_dir=str(shard_dir / "x0_cache" / "standin"))
    # use_cache=false never looks
    assert "pixel_values" in take(_loader(dict(cfg, use_cache=False), qwen_tokenizer, other), 1)[0]


def test_missing_or_partial_cache(shard_dir, qwen_tokenizer):
    target = StandInTarget()
    cfg = data_cfg(train_shards=str(shard_dir))
    with pytest.raises(ValueError, match="no complete target cache"):
        _loader(dict(cfg, use_cache=True), qwen_tokenizer, target)
    assert "pixel_values" in take(_loader(dict(cfg, use_cache="auto"), qwen_tokenizer, target), 1)[0]
    cache_shards(expand_shards(str(shard_dir))[:3], target)  # only some shards cached
    assert "pixel_values" in take(_loader(dict(cfg, use_cache="auto"), qwen_tokenizer, target), 1)[0]
    with pytest.raises(ValueError, match="signature"):
        build_train_dataloader(dict(cfg, use_cache=True), qwen_tokenizer, target.transform, batch_size=2,
                               num_workers=0)


@pytest.mark.skipif(importlib.util.find_spec("blip3o.models.targets") is None, reason="target encoders not present")
def test_cache_targets_script(shard_dir, qwen_tokenizer, tmp_path, capsys):
    """The CLI with a saved tiny target encoder (blip3o.models.targets), in-process to keep the test fast."""
    from blip3o.models.targets import load_target_encoder, make_tiny_target

    target_dir = make_tiny_target("siglip", str(tmp_path / "target"))
    spec = importlib.util.spec_from_file_location("cache_targets", os.path.join(ROOT, "scripts", "cache_targets.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    one = str(shard_dir / "toy-000000.tar")
    assert script.main([one, "--target-dir", target_dir, "--batch-size", "8", "--dtype", "float32"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == 40
    target = load_target_encoder(target_dir)
    cfg = data_cfg(train_shards=one, use_cache=True)
    batch = take(_loader(cfg, qwen_tokenizer, target), 1)[0]
    assert list(batch["target_latents"].shape[1:]) == target.signature()["shape"]
    assert script.main(["/nonexistent/*.tar", "--target-dir", target_dir]) == 2
