"""Every recipe in configs/ runs: each YAML is loaded and trained for 2 steps at tiny scale through the real
entry point (in-process, ``blip3o.train.__main__.main``), with only the data, scale and output overridden. The
SFT and editing recipes start from a saved model (``model.init_from``); the joint recipe also runs with LoRA."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import ROOT, make_tiny_checkpoint

# configs/ablations/toy/ holds the ablation runner's variant files (a base config + overrides each), not
# experiment configs: tests/integration/test_ablations.py runs them through scripts/run_ablations.py.
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")
                 if not p.is_relative_to(ROOT / "configs" / "ablations" / "toy"))


def train(*argv) -> int:
    from blip3o.train.__main__ import main

    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def side_data(tmp_path_factory):
    """Understanding conversations (joint recipe) and editing triples (edit recipe) on tiny images."""
    d = tmp_path_factory.mktemp("side")
    (d / "img").mkdir()
    colors = [(220, 30, 30), (30, 60, 220), (30, 160, 50)]
    und, edit = [], []
    for i in range(6):
        Image.new("RGB", (64, 64), colors[i % 3]).save(d / "img" / f"{i}.png")
        und.append({"image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]})
        edit.append({"source": f"img/{i}.png", "instruction": "make it blue", "target": f"img/{(i + 1) % 6}.png"})
    (d / "und.json").write_text(json.dumps(und))
    (d / "edit.jsonl").write_text("\n".join(json.dumps(r) for r in edit) + "\n")
    return d


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("init") / "model", with_decoder=False)


def overrides_for(config: str, toy: Path, side: Path, saved: Path, out: Path) -> list:
    body = yaml.safe_load((ROOT / config).read_text())
    data, model = body.get("data") or {}, body.get("model") or {}
    ov = ["preset=tiny", "model.target_preset=tiny", "model.gradient_checkpointing=false", "train.deepspeed=null",
          "train.mixed_precision='no'", "train.report_to=none", f"train.output_dir={out}", "train.max_steps=2",
          "train.save_steps=2", "train.logging_steps=1", "train.per_device_train_batch_size=2",
          "data.num_workers=0", "data.shuffle_buffer=10"]
    if "sources" in data:  # a mixture: text-to-image shards + understanding conversations
        ov.append(f"data.sources=[{{name: t2i, shards: '{toy / 'train'}', weight: 0.5}}, {{name: und, json_path: "
                  f"'{side / 'und.json'}', image_root: '{side}', weight: 0.5, task: und}}]")
        ov += ["data.und_image_size=56", "data.und_image_tokens=4"]
    elif "json_path" in data:  # editing triples
        ov += [f"data.json_path={side / 'edit.jsonl'}", f"data.image_root={side}", "data.und_image_size=56",
               "data.und_image_tokens=4"]
    else:
        ov.append(f"data.train_shards={toy / 'train'}")
    if "eval_prompts" in data:
        ov.append(f"data.eval_prompts={toy / 'eval' / 'prompts.jsonl'}")
    if "init_from" in model:
        ov.append(f"model.init_from={saved}")
    if (body.get("train") or {}).get("compile") not in (None, False, "no"):
        ov.append("train.compile=eager")  # dynamo's tracing without inductor's minute-long C++ build
    return ov


@pytest.mark.parametrize("config", CONFIGS)
def test_every_recipe_runs_two_steps(config, toy_data, side_data, saved_model, tmp_path):
    out = tmp_path / "run"
    assert train(ROOT / config, *overrides_for(config, toy_data, side_data, saved_model, out)) == 0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all(r["loss"] == r["loss"] for r in recs)
    assert (out / "checkpoint-2" / "COMPLETE").is_file()


def test_init_from_starts_from_the_saved_weights(toy_data, side_data, saved_model, tmp_path):
    """The SFT stage (trained above for 2 steps): its weights come from model.init_from, not a fresh init."""
    from blip3o.config import load_config
    from blip3o.models.blip3o import Blip3oForConditionalGeneration
    from blip3o.models.build import build_model

    ov = overrides_for("configs/sft_8b.yaml", toy_data, side_data, saved_model, tmp_path / "sft")
    model, _ = build_model(load_config(ROOT / "configs" / "sft_8b.yaml", ov).model)
    saved = Blip3oForConditionalGeneration.from_pretrained(saved_model)
    assert torch.equal(model.latent_queries, saved.latent_queries)
    for (n, a), (_, b) in zip(model.dit.state_dict().items(), saved.dit.state_dict().items()):
        assert torch.equal(a, b), n
    assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")] == []


def test_joint_recipe_with_lora_trains_only_adapters_and_reloads(toy_data, side_data, saved_model, tmp_path):
    from blip3o.models.blip3o import Blip3oForConditionalGeneration

    out = tmp_path / "lora"
    ov = overrides_for("configs/joint_8b.yaml", toy_data, side_data, saved_model, out) + ["model.lora_rank=4"]
    assert train(ROOT / "configs" / "joint_8b.yaml", *ov) == 0
    m = Blip3oForConditionalGeneration.from_pretrained(out)
    lora = {n: p for n, p in m.backbone.named_parameters() if "lora_" in n}
    assert lora and m.config.lora_rank == 4
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("backbone.")} == {"backbone." + n for n in lora}
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero: it trained


def test_missing_eval_prompts_file_is_an_error(toy_data, tmp_path, capsys):
    rc = train(ROOT / "configs" / "toy.yaml", f"data.train_shards={toy_data / 'train'}", "data.num_workers=0",
               "data.eval_prompts=/nonexistent/prompts.jsonl", f"train.output_dir={tmp_path}", "train.max_steps=1")
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: data.eval_prompts: file not found: /nonexistent/prompts.jsonl"


def test_data_with_no_usable_sample_is_one_line(tmp_path, capsys):
    import io
    import tarfile

    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for i in range(40):
            for ext, payload in (("jpg", b"not an image"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    rc = train(ROOT / "configs" / "toy.yaml", f"data.train_shards={tmp_path}", "data.eval_prompts=null",
               "data.num_workers=1", "data.max_consecutive_bad=20", f"train.output_dir={tmp_path / 'out'}",
               "train.max_steps=1")
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "unusable" in err[-1] and "Traceback" not in err[-1], err[-5:]
