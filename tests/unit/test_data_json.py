"""JSON/JSONL sources: text-to-image pairs, BLIP3o-60k-style prompts, LLaVA conversations for joint training."""
import json

import pytest
import torch

from blip3o.data import IGNORE_INDEX, build_train_dataloader, encode_conversation, load_json_records
from blip3o.data.toy import render, short_caption, train_scene
from blip3o.prompts import CHATML
from tests.unit.test_data_common import (  # noqa: F401  (fixtures)
    _datasets_cache, data_cfg, json_roundtrip, keys, qwen_tokenizer, small_transform, take, toy_dir,
)


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    captions = {}
    for i in range(12):
        scene = train_scene(5, i)
        render(scene).save(root / "sub" / f"{i}.png")
        captions[i] = short_caption(scene)
    return root, captions


def _loader(cfg, tok, batch_size=4, workers=0, **kw):
    return build_train_dataloader(cfg, tok, small_transform(), seed=1, batch_size=batch_size, num_workers=workers,
                                  num_queries=8, max_length=160, **kw)


def test_t2i_json_list(tmp_path, image_root, qwen_tokenizer):
    root, captions = image_root
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"image": f"sub/{i}.png", "caption": c} for i, c in captions.items()]))
    cfg = data_cfg(json_path=str(path), image_root=str(root), resampled=False, shuffle_buffer=1)
    batches = take(_loader(cfg, qwen_tokenizer), 3)
    seen = [k for b in keys(batches) for k in b]
    assert sorted(seen) == sorted(f"json/{i}" for i in range(12))  # one epoch: every record once
    assert batches[0]["pixel_values"].shape == (4, 3, 32, 32)


def test_jsonl_prompt_pairs_with_bad_records(tmp_path, image_root, qwen_tokenizer):
    root, captions = image_root
    lines = [json.dumps({"prompt": c, "image": str(root / "sub" / f"{i}.png")}) for i, c in captions.items()]
    lines += ["{not json", json.dumps({"prompt": "gone", "image": "missing.png"}),
              json.dumps({"prompt": "", "image": str(root / "sub" / "0.png")})]
    path = tmp_path / "blip3o60k.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, bad = load_json_records(str(path))
    assert len(records) == 14 and bad == 1
    loader = _loader(data_cfg(json_path=str(path)), qwen_tokenizer)
    take(loader, 6)
    stats = loader.stats()
    assert stats["bad_json_line"] == 1 and stats["missing_image"] >= 1 and stats["empty_caption"] >= 1


def test_datasets_loader(tmp_path, image_root, qwen_tokenizer):
    root, captions = image_root
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"image": f"sub/{i}.png", "text": c}) + "\n" for i, c in captions.items()))
    records, _ = load_json_records(str(path), loader="datasets", cache_dir=str(tmp_path / "hf"))
    assert len(records) == 12 and records[3]["image"] == "sub/3.png"
    cfg = data_cfg(json_path=str(path), image_root=str(root), json_loader="datasets")
    batch = take(_loader(cfg, qwen_tokenizer), 1)[0]
    assert batch["pixel_values"].shape[0] == 4


def test_encode_conversation_labels(qwen_tokenizer):
    conv = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "And the square?"}, {"from": "gpt", "value": "Blue."}]
    ids, labels = encode_conversation(qwen_tokenizer, conv, CHATML, image_tokens=16, max_length=200)
    pad = qwen_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == 16
    learned = qwen_tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert learned == "Red.<|im_end|>\nBlue.<|im_end|>\n"
    text = qwen_tokenizer.decode(ids)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    with pytest.raises(OverflowError):
        encode_conversation(qwen_tokenizer, conv, CHATML, image_tokens=16, max_length=20)
    with pytest.raises(ValueError, match="assistant"):
        encode_conversation(qwen_tokenizer, conv[:1], CHATML, image_tokens=16, max_length=200)


def test_understanding_mixed_with_generation(tmp_path, image_root, toy_dir, qwen_tokenizer):
    root, captions = image_root
    convs = [{"image": f"sub/{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": c}]}
        for i, c in captions.items()]
    convs.append({"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]})
    convs.append({"image": "sub/0.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                         {"from": "gpt", "value": "x"}]})  # bad: image, no <image>
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(convs))
    cfg = data_cfg(sources=[{"name": "t2i", "shards": str(toy_dir / "train"), "weight": 1},
                            {"name": "und", "json_path": str(path), "image_root": str(root), "weight": 1}],
                   und_image_size=28, und_image_tokens=4, resampled=False)
    loader = _loader(cfg, qwen_tokenizer, batch_size=8, und_image_transform=small_transform())
    batches = take(loader, 6)
    und = [b for b in batches if "und_input_ids" in b]
    assert und, "weights 1:1 must give understanding samples"
    b = und[0]
    n = len(b["und_keys"])
    assert b["und_input_ids"].shape == b["und_labels"].shape == b["und_attention_mask"].shape
    assert b["und_input_ids"].shape[0] == n == len(b["und_images"]) == b["und_has_image"].shape[0]
    assert b["und_pixel_values"].shape == (int(b["und_has_image"].sum()), 3, 32, 32)
    assert all(im is None or im.size == (28, 28) for im in b["und_images"])
    assert ((b["und_labels"] != IGNORE_INDEX) <= b["und_attention_mask"].bool()).all()
    assert b["input_ids"].shape[0] + n == 8  # batch_size counts both kinds
    # ~24 understanding draws in epoch mode cover all 14 records, including the malformed one
    assert loader.stats()["bad_record"] >= 1
    # the understanding part resumes exactly too
    state = json_roundtrip(loader.state_dict())
    again = _loader(cfg, qwen_tokenizer, batch_size=8, und_image_transform=small_transform())
    again.load_state_dict(state)
    nxt = take(again, 2)
    full = take(_loader(cfg, qwen_tokenizer, batch_size=8, und_image_transform=small_transform()), 8)
    assert keys(nxt) == keys(full[6:])
    assert torch.equal(nxt[-1]["input_ids"], full[-1]["input_ids"])


def test_json_errors(tmp_path, qwen_tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        _loader(data_cfg(json_path=str(tmp_path / "nope.json")), qwen_tokenizer)
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="list of records"):
        _loader(data_cfg(json_path=str(tmp_path / "obj.json")), qwen_tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        _loader(data_cfg(json_path=str(tmp_path / "empty.jsonl")), qwen_tokenizer)
