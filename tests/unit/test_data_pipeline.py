"""Shard lists, bad data (skipped, counted, reported), mixing weights, collation."""
import collections
import logging
import os

import pytest
import torch

from blip3o.data import AllBadError, build_train_dataloader, expand_shards, iter_tar_samples
from blip3o.prompts import IMG_START_TOKEN
from tests.unit.test_data_common import (  # noqa: F401  (fixtures)
    _datasets_cache, data_cfg, good_samples, jpg_bytes, png_bytes, qwen_tokenizer, small_transform, take, toy_dir,
    write_tar,
)


def _loader(cfg, tok, workers=0, batch_size=4, **kw):
    return build_train_dataloader(cfg, tok, small_transform(), seed=0, batch_size=batch_size, num_workers=workers,
                                  num_queries=8, max_length=64, **kw)


# -- shard specifications ------------------------------------------------------------------------------------
def test_expand_shards_forms(toy_dir):
    folder = str(toy_dir / "train")
    files = expand_shards(folder)
    assert len(files) == 8 and files == sorted(files)
    assert expand_shards(os.path.join(folder, "*.tar")) == files
    assert expand_shards(os.path.join(folder, "toy-{000000..000003}.tar")) == files[:4]
    assert expand_shards([files[0], files[1] + "::" + files[2]]) == files[:3]
    assert expand_shards([files[0], files[0]]) == files[:1]


@pytest.mark.parametrize("spec,msg", [
    ("/nonexistent/dir/x.tar", "does not exist"),
    ("/nonexistent/*.tar", "matches no files"),
    ("", "no shards"),
])
def test_expand_shards_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        expand_shards(spec)


def test_expand_shards_empty_folder_and_missing_brace(tmp_path):
    with pytest.raises(ValueError, match="contains no .tar"):
        expand_shards(str(tmp_path))
    write_tar(tmp_path / "a-0.tar", good_samples("a", 1))
    with pytest.raises(ValueError, match="1 of 2 shards"):
        expand_shards(str(tmp_path / "a-{0..1}.tar"))


# -- bad data --------------------------------------------------------------------------------------------------
@pytest.fixture()
def messy_dir(tmp_path):
    """One shard of each kind of damage, plus good data. Per epoch: 30 good samples."""
    d = tmp_path / "messy"
    d.mkdir()
    write_tar(d / "good-0.tar", good_samples("g0_", 10))
    write_tar(d / "good-1.tar", good_samples("g1_", 10, ext="png"))
    bad = [
        ("trunc_jpg", {"jpg": jpg_bytes(size=64)[:200], "txt": b"cut short"}),
        ("not_image", {"jpg": b"this is not a jpeg", "txt": b"text"}),
        ("no_caption", {"jpg": jpg_bytes()}),
        ("empty_caption", {"jpg": jpg_bytes(), "txt": b"   \n"}),
        ("no_image", {"txt": b"caption without an image"}),
    ] + good_samples("g2_", 5, ext="png")
    write_tar(d / "bad-samples.tar", bad)
    (d / "empty.tar").write_bytes(b"")  # 0 bytes
    write_tar(d / "no-members.tar", [])  # a valid tar with nothing in it
    full = d / "trunc-src.tar"
    write_tar(full, good_samples("t_", 10))
    data = full.read_bytes()
    (d / "truncated.tar").write_bytes(data[: len(data) // 2 + 100])  # cut mid-member: the first samples survive
    full.unlink()
    (d / "garbage.tar").write_bytes(os.urandom(3000))  # unreadable
    write_tar(d / "good-2.tar", good_samples("g3_", 5))
    return d


EXPECTED_PER_EPOCH = {"bad_image": 2, "missing_caption": 1, "empty_caption": 1, "missing_image": 1,
                      "empty_shard": 2, "truncated_shard": 1, "unreadable_shard": 1}


def test_iter_tar_samples_reports_damage(messy_dir):
    events = collections.Counter()
    n = {p.name: len(list(iter_tar_samples(str(p), on_event=lambda r, d: events.update([r]))))
         for p in messy_dir.iterdir()}
    assert n["good-0.tar"] == 10 and n["bad-samples.tar"] == 10
    assert n["empty.tar"] == n["no-members.tar"] == n["garbage.tar"] == 0
    assert 0 < n["truncated.tar"] < 10
    assert events == {"empty_shard": 2, "truncated_shard": 1, "unreadable_shard": 1}
    # skipping reads headers only, and lands on the same samples
    all_keys = [s["__key__"] for s in iter_tar_samples(str(messy_dir / "good-0.tar"))]
    assert [s["__key__"] for s in iter_tar_samples(str(messy_dir / "good-0.tar"), skip=7)] == all_keys[7:]


def test_bad_data_is_skipped_and_counted(messy_dir, qwen_tokenizer, caplog):
    # epoch mode, one shard at a time and no shuffle, so each epoch reads every shard exactly once
    cfg = data_cfg(train_shards=str(messy_dir), resampled=False, shuffle_buffer=1, interleave=1)
    loader = _loader(cfg, qwen_tokenizer, batch_size=1)
    good_per_epoch = 10 + 10 + 5 + 5 + 5 + 1  # + what survives of the truncated shard (checked below)
    with caplog.at_level(logging.WARNING, logger="blip3o.data"):
        batches = take(loader, 2 * good_per_epoch + 1)
    seen = [k for b in batches for k in b["keys"]]
    assert all(k.startswith(("g", "t_")) for k in seen)
    survivors = {k for k in seen if k.startswith("t_")}
    assert 0 < len(survivors) < 10
    stats = loader.stats()
    # Two full epochs have been read and the third has begun.
    for reason, per_epoch in EXPECTED_PER_EPOCH.items():
        assert 2 * per_epoch <= stats.get(reason, 0) <= 3 * per_epoch, (reason, stats)
    assert set(stats) == set(EXPECTED_PER_EPOCH)
    assert loader.skipped_total == sum(stats.values())
    # never silent: each reason is logged once with the culprit, and the summary line names them all
    logged = " ".join(r.getMessage() for r in caplog.records)
    for reason in EXPECTED_PER_EPOCH:
        assert f"({reason})" in logged
    summary = loader.summary()
    assert "bad_image=" in summary and "unreadable_shard=" in summary and "samples delivered" in summary


def test_bad_data_with_a_worker_and_resume(messy_dir, qwen_tokenizer):
    cfg = data_cfg(train_shards=str(messy_dir), resampled=True)
    loader = _loader(cfg, qwen_tokenizer, workers=1)
    take(loader, 20)
    before = loader.stats()
    assert sum(before.values()) > 0
    resumed = _loader(cfg, qwen_tokenizer, workers=1)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.stats() == before  # counts are part of the state and are not double-counted on replay
    take(resumed, 5)
    assert resumed.skipped_total >= sum(before.values())


def test_all_bad_shards_fail_clearly(tmp_path, qwen_tokenizer):
    for i in range(3):
        (tmp_path / f"bad-{i}.tar").write_bytes(os.urandom(2000))
    loader = _loader(data_cfg(train_shards=str(tmp_path), max_consecutive_bad=50), qwen_tokenizer)
    with pytest.raises(AllBadError, match="gave no samples.*unreadable_shard"):
        take(loader, 1)


def test_all_bad_samples_fail_clearly(tmp_path, qwen_tokenizer):
    write_tar(tmp_path / "x.tar", [(f"k{i}", {"jpg": b"junk", "txt": b"caption"}) for i in range(20)])
    loader = _loader(data_cfg(train_shards=str(tmp_path), max_consecutive_bad=30), qwen_tokenizer, workers=1)
    with pytest.raises(AllBadError, match="samples in a row were unusable.*bad_image"):
        take(loader, 1)


# -- mixing ----------------------------------------------------------------------------------------------------
def test_mixing_weights_are_respected(toy_dir, qwen_tokenizer):
    shards = sorted(str(p) for p in (toy_dir / "train").glob("*.tar"))
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    cfg = data_cfg(sources=[{"name": "a", "shards": shards[:3], "weight": 6},
                            {"name": "b", "shards": shards[3:6], "weight": 3},
                            {"name": "c", "shards": shards[6:], "weight": 1, "caption_key": "long.txt"}])
    batches = take(_loader(cfg, qwen_tokenizer, batch_size=50), 8)
    counts = collections.Counter(s for b in batches for s in b["sources"])
    n = sum(counts.values())
    assert n == 400
    for name, w in weights.items():  # binomial std at n=400 is <= 0.025
        assert abs(counts[name] / n - w) < 0.075, (counts, weights)
    # a zero weight turns a source off
    cfg["sources"][2]["weight"] = 0
    batches = take(_loader(cfg, qwen_tokenizer, batch_size=50), 4)
    assert "c" not in {s for b in batches for s in b["sources"]}


def test_mixer_proportions_and_resume():
    """The mixer alone, over many draws: tight tolerance, and its position is just counters."""
    import itertools

    from blip3o.data import Mixer

    class Counter:
        def __init__(self, name):
            self.name, self.n = name, 0

        def state(self):
            return {"n": self.n}

        def restore(self, st):
            self.n = st["n"]

        def __next__(self):
            self.n += 1
            return self.name

    mixer = Mixer([Counter("a"), Counter("b"), Counter("c")], [5, 3, 2], seed=7, slot=1)
    draws = [next(mixer) for _ in range(20000)]
    for name, w in zip("abc", (0.5, 0.3, 0.2)):
        assert abs(draws.count(name) / 20000 - w) < 0.012
    state = mixer.state()
    tail = list(itertools.islice(mixer, 100))
    fresh = Mixer([Counter("a"), Counter("b"), Counter("c")], [5, 3, 2], seed=7, slot=1)
    fresh.restore(state)
    assert list(itertools.islice(fresh, 100)) == tail


def test_bad_weights_and_config_errors(toy_dir, qwen_tokenizer):
    shards = str(toy_dir / "train")
    with pytest.raises(ValueError, match="weight"):
        take(_loader(data_cfg(sources=[{"shards": shards, "weight": -1}]), qwen_tokenizer), 1)
    with pytest.raises(ValueError, match="no data"):
        _loader(data_cfg(), qwen_tokenizer)
    with pytest.raises(ValueError, match="named 'x'"):
        _loader(data_cfg(sources=[{"name": "x", "shards": shards}, {"name": "x", "shards": shards}]), qwen_tokenizer)
    # The loader reads DataConfig's fields (the YAML schema) and nothing else.
    with pytest.raises(ValueError, match="unknown field\\(s\\) image_size, image_transform"):
        _loader(data_cfg(train_shards=shards, image_transform="siglip", image_size=64), qwen_tokenizer)


# -- collation -------------------------------------------------------------------------------------------------
def test_generation_batch_layout(toy_dir, qwen_tokenizer):
    cfg = data_cfg(train_shards=str(toy_dir / "train"))
    batch = take(_loader(cfg, qwen_tokenizer, batch_size=6), 1)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 6
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    img_id = qwen_tokenizer.convert_tokens_to_ids(IMG_START_TOKEN)
    assert (ids[:, -1] == img_id).all() and (mask[:, -1] == 1).all()  # left padded: [IMG] is always last
    assert len(batch["keys"]) == 6 and len(batch["sources"]) == 6
    text = qwen_tokenizer.decode(ids[0][mask[0].bool()])
    assert text.startswith("<|im_start|>system\n") and "Please generate image based on the following caption: " in text
    assert text.endswith("<|im_start|>assistant\n[IMG]")


def test_caption_capped_by_tokens(tmp_path, qwen_tokenizer):
    long = ("word " * 500).encode()
    write_tar(tmp_path / "l.tar", [("k0", {"png": png_bytes(), "txt": long}),
                                   ("k1", {"png": png_bytes(), "txt": b"short"})])
    loader = build_train_dataloader(data_cfg(train_shards=str(tmp_path), shuffle_buffer=1), qwen_tokenizer,
                                    small_transform(), batch_size=2, num_workers=0, num_queries=8, max_length=64)
    batch = take(loader, 1)[0]
    assert batch["input_ids"].shape[1] == 64 - 8  # max_length counts the query slots the model appends
    assert loader.skipped_total == 0
