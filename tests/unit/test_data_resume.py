"""Exact resumption: a resumed loader yields exactly the continuation of an unbroken one."""
import pytest
import torch

from blip3o.data import build_train_dataloader
from tests.unit.test_data_common import (  # noqa: F401  (fixtures)
    _datasets_cache, data_cfg, json_roundtrip, keys, qwen_tokenizer, small_transform, take, toy_dir,
)


def _cfg(toy_dir, **kw):
    shards = sorted(str(p) for p in (toy_dir / "train").glob("*.tar"))
    sources = [
        {"name": "short", "shards": shards[:5], "weight": 0.7},
        {"name": "long", "shards": shards[5:], "weight": 0.3, "caption_key": "long.txt"},
    ]
    return data_cfg(sources=sources, **kw)


def _loader(cfg, tok, rank=0, world_size=1, workers=0, batch_size=4):
    return build_train_dataloader(cfg, tok, small_transform(), rank=rank, world_size=world_size, seed=3,
                                  batch_size=batch_size, num_workers=workers, template="chatml", num_queries=8,
                                  max_length=96)


def _check_resume(cfg, tok, workers, split=5, total=11, rank=0, world_size=1):
    full = take(_loader(cfg, tok, rank, world_size, workers), total)
    first_loader = _loader(cfg, tok, rank, world_size, workers)
    first = take(first_loader, split)
    state = json_roundtrip(first_loader.state_dict())  # a checkpoint is JSON-serialisable
    resumed_loader = _loader(cfg, tok, rank, world_size, workers)
    resumed_loader.load_state_dict(state)
    rest = take(resumed_loader, total - split)
    assert keys(first + rest) == keys(full)
    # not only the keys: the tensors are the same too
    assert torch.equal(rest[-1]["pixel_values"], full[-1]["pixel_values"])
    assert torch.equal(rest[0]["input_ids"], full[split]["input_ids"])
    return full


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "epoch"])
def test_resume_single_process(toy_dir, qwen_tokenizer, resampled):
    full = _check_resume(_cfg(toy_dir, resampled=resampled), qwen_tokenizer, workers=0, split=7, total=30)
    flat = [k for b in keys(full) for k in b]
    assert len(flat) == 120
    if not resampled:  # the first epoch of one reader visits each sample at most once
        assert len(set(flat)) == len(flat)


def test_resume_two_workers(toy_dir, qwen_tokenizer):
    # an odd split, so the resumed run must start with worker 1, not worker 0
    _check_resume(_cfg(toy_dir, resampled=False), qwen_tokenizer, workers=2, split=5, total=12)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_two_ranks(toy_dir, qwen_tokenizer, workers):
    cfg = _cfg(toy_dir, resampled=False)
    # split=4: 16 samples, exactly one shuffle block, so the resume lands on a block boundary
    per_rank = [_check_resume(cfg, qwen_tokenizer, workers=workers, split=4, total=9, rank=r, world_size=2)
                for r in (0, 1)]
    # In epoch mode ranks read disjoint shards (the 3-shard "long" source falls back to resampling when there
    # are 4 reader slots, 2 ranks x 2 workers, so it is only checked with 2 slots).
    checked = {"short", "long"} if workers == 0 else {"short"}
    k0, k1 = ({k for b in per_rank[r] for k, s in zip(b["keys"], b["sources"]) if s in checked} for r in (0, 1))
    assert k0 and k1 and not k0 & k1


def test_reiterating_continues(toy_dir, qwen_tokenizer):
    cfg = _cfg(toy_dir)
    full = take(_loader(cfg, qwen_tokenizer), 6)
    loader = _loader(cfg, qwen_tokenizer)
    parts = take(loader, 2) + take(loader, 4)  # a second iter() continues where the first stopped
    assert keys(parts) == keys(full)
    assert loader.batches == 6 and loader.samples_delivered == 24


def test_state_mismatch_is_refused(toy_dir, qwen_tokenizer):
    cfg = _cfg(toy_dir)
    a = _loader(cfg, qwen_tokenizer)
    take(a, 2)
    b = _loader(cfg, qwen_tokenizer, batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        b.load_state_dict(a.state_dict())
    b.load_state_dict(a.state_dict(), strict=False)  # inexact resume: re-seeded, not replayed
    first_b = take(b, 1)
    assert keys(first_b)[0][:4] != keys(take(_loader(cfg, qwen_tokenizer, batch_size=8), 1))[0][:4]
    # ... and from then on exact again: the re-seeded state resumes strictly under the new batch size
    c = _loader(cfg, qwen_tokenizer, batch_size=8)
    c.load_state_dict(json_roundtrip(b.state_dict()))
    assert keys(take(c, 2)) == keys(take(b, 2))


def test_different_seeds_and_ranks_differ(toy_dir, qwen_tokenizer):
    cfg = _cfg(toy_dir)
    a = keys(take(_loader(cfg, qwen_tokenizer, rank=0, world_size=2), 3))
    b = keys(take(_loader(cfg, qwen_tokenizer, rank=1, world_size=2), 3))
    assert a != b


class NoisyTransform:
    """A random augmentation (uniform noise from torch's global generator), to check it replays on resume."""

    def __init__(self):
        self.base = small_transform()

    def __call__(self, img):
        return self.base(img) + torch.rand(3, 32, 32)


@pytest.mark.parametrize("workers", [0, 2])
def test_random_transforms_replay_on_resume(toy_dir, qwen_tokenizer, workers):
    cfg = _cfg(toy_dir)

    def build():
        return build_train_dataloader(cfg, qwen_tokenizer, NoisyTransform(), seed=3, batch_size=4,
                                      num_workers=workers, num_queries=8, max_length=96)

    full = take(build(), 5)
    first = build()
    take(first, 3)
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    rest = take(resumed, 2)
    assert torch.equal(rest[1]["pixel_values"], full[4]["pixel_values"])


@pytest.mark.parametrize("workers", [0, 1])
def test_loading_leaves_training_rng_alone(toy_dir, qwen_tokenizer, workers):
    """Neither decoding in the main process nor starting workers (the DataLoader draws their base seed from a
    generator, torch's global one unless given its own) may consume the training RNG: if it did, the first step
    after a resume would draw different noise than the unbroken run."""
    import random

    import numpy as np

    loader = _loader(_cfg(toy_dir), qwen_tokenizer, workers=workers)
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    take(loader, 2)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
