"""The toy CLIP: hard negatives, save/load through the target-encoder code path, the `clip` training task,
and the stage-evidence tool on a trained toy run."""
import json
import subprocess
import sys

import pytest
import torch

from blip3o.models.targets import TargetEncoder, ToyClipModel, ToyClipTarget, load_target_encoder, zero_shot_accuracy
from tests.conftest import ROOT, run_env


def test_hard_negatives_swap_exactly_one_word_within_its_group():
    torch.manual_seed(0)
    m = ToyClipModel()
    caps = ["a red circle", "three blue squares", "a green triangle to the left of a yellow circle", "a an the"]
    ids = m.tokenize(caps)
    neg = m.hard_negatives(ids, k=4, generator=torch.Generator().manual_seed(1))
    groups = [set(m.word_ids[w] for w in g) for g in m.config["hard_negative_groups"]]
    for b in range(3):
        for j in range(4):
            diff = (neg[b, j] != ids[b]).nonzero().flatten().tolist()
            assert len(diff) == 1, (caps[b], j)
            old, new = int(ids[b, diff[0]]), int(neg[b, j, diff[0]])
            assert any(old in g and new in g for g in groups)
            assert (old in groups[0]) == (j % 2 == 1)  # odd swaps a colour, even a shape
    assert torch.equal(neg[3], ids[3].expand(4, -1))  # nothing to swap: unchanged


def test_save_and_load_through_the_target_encoder_path(tmp_path):
    torch.manual_seed(0)
    m = ToyClipModel().eval()
    m.save_pretrained(str(tmp_path / "clip"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    for t in (TargetEncoder.from_pretrained(str(tmp_path / "clip")), load_target_encoder(str(tmp_path / "clip"))):
        assert isinstance(t, ToyClipTarget) and t.channels == 32 and t.grid == (8, 8)
        assert torch.equal(t.encode(x), m.image.grid(x).detach())
        assert not any(p.requires_grad for p in t.parameters())
    back = ToyClipModel.from_pretrained(str(tmp_path / "clip"))
    caps = ["a red circle", "two green squares"]
    assert torch.equal(back.encode_text(caps), m.encode_text(caps).detach())
    assert torch.equal(back.logit_scale, m.logit_scale.detach())
    with pytest.raises(FileNotFoundError, match="text_tower"):
        (tmp_path / "clip" / "text_tower.safetensors").unlink()
        ToyClipModel.from_pretrained(str(tmp_path / "clip"))
    with pytest.raises(ValueError, match="unknown setting"):
        ToyClipModel(dimm=3)


def test_downsample_gives_a_coarser_grid_that_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    m = ToyClipModel(downsample=2, dim=48).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert m.image.grid(x).shape == (2, 48, 4, 4)
    m.save_pretrained(str(tmp_path / "clip"))
    t = TargetEncoder.from_pretrained(str(tmp_path / "clip"))
    assert t.grid == (4, 4) and t.channels == 48 and torch.equal(t.encode(x), m.image.grid(x).detach())
    with pytest.raises(ValueError, match="downsample"):
        ToyClipTarget(dict(m.config, downsample=5))


def test_clip_task_trains_learns_colour_and_saves_a_target(tmp_path, toy_data):
    out = tmp_path / "clip"
    r = subprocess.run([sys.executable, "-m", "blip3o.train", str(ROOT / "configs" / "toy_clip.yaml"),
                        f"data.train_shards={toy_data / 'train'}", f"train.output_dir={out}", "train.max_steps=40",
                        "train.per_device_train_batch_size=32", "train.logging_steps=5", "train.save_steps=20",
                        "data.num_workers=0", "train.max_minutes=0"],
                       env=run_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0], losses
    zs = json.loads((out / "zero_shot.json").read_text())
    assert zs["colour"] > 0.5, zs  # chance is 1/6: the colour words are learnt within a few dozen steps
    assert zs == pytest.approx(zero_shot_accuracy(ToyClipModel.from_pretrained(str(out))))
    # a generator config points at it like at any saved target
    from blip3o.config import load_config
    from blip3o.models.build import load_target

    cfg = load_config(ROOT / "configs" / "toy_gen.yaml", [f"model.target_path={out}"])
    assert isinstance(load_target(cfg.model), ToyClipTarget)


def test_clip_task_refuses_another_target(tmp_path, toy_data):
    r = subprocess.run([sys.executable, "-m", "blip3o.train", str(ROOT / "configs" / "toy_clip.yaml"),
                        f"data.train_shards={toy_data / 'train'}", f"train.output_dir={tmp_path}",
                        "model.target=eva_clip", "train.max_steps=1"],
                       env=run_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0 and "model.target: toy_clip" in r.stderr
