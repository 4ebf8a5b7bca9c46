"""The toy VLM: toy questions whose answers the scene fixes, the joint-recipe stage a few steps through
scripts/toy_vlm.py, its exported backbone loaded back under the generator, and its VQA row in the stage table."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from blip3o.data import toy
from blip3o.data.toy_vqa import (CATEGORIES, category_of, conversation, eval_questions, majority_baseline,
                                 questions, write_toy_vqa)
from tests.conftest import ROOT, run_env


def test_every_answer_is_what_the_scene_shows():
    for i in range(200):
        scene = toy.sample_scene(random.Random(i))
        objs = scene.objects
        qa = questions(scene)
        assert qa and {c for c, _, _ in qa} <= set(CATEGORIES)
        for cat, q, a in qa:
            assert category_of(q) == cat
            if cat == "colour":  # "What colour is/are the <shape>(s)?"
                shape = q.split()[-1].rstrip("?").rstrip("s")
                assert {o.color for o in objs if o.shape == shape} == {a}
            elif cat == "shape":
                colour = q.split()[-2]
                assert {o.shape for o in objs if o.color == colour} == {a}
            elif cat == "count":
                shape = q.split()[2][:-1]
                assert toy.NUMBERS[sum(o.shape == shape for o in objs)] == a
            else:
                assert scene.tag == "position" and a in ("yes", "no")
                assert (toy._relation_phrase(scene.relation) in q) == (a == "yes")
        # a shape shown in two colours gets no colour question (its answer would be ambiguous)
        for shape in toy.SHAPES:
            if len({o.color for o in objs if o.shape == shape}) > 1:
                assert not any(c == "colour" and shape in q for c, q, _ in qa)


def test_conversation_and_eval_rows():
    scene = toy.sample_scene(random.Random(3), tag="position")
    turns = conversation(scene, random.Random(0))
    assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) == 2 * len(questions(scene))
    picked = eval_questions(scene, random.Random(0))
    assert [c for c, _, _ in picked] == list(CATEGORIES)  # a position scene has all four


def test_write_is_deterministic_and_disjoint_from_training(tmp_path):
    a, b = write_toy_vqa(str(tmp_path / "a"), 12, 8), write_toy_vqa(str(tmp_path / "b"), 12, 8)
    for name in ("train.json", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows = [json.loads(l) for l in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == a["num_eval_questions"] and {r["category"] for r in rows} == set(CATEGORIES)
    assert all((tmp_path / "a" / r["image"]).is_file() and r["image"].startswith("images/eval-") for r in rows)
    with pytest.raises(ValueError, match="num >= 1"):
        write_toy_vqa(str(tmp_path / "c"), 0, 8)
    # the baseline answers each category's most frequent training answer, whatever the image
    train = json.loads((tmp_path / "a" / "train.json").read_text())
    base = majority_baseline(train, rows)
    colours = [t["value"] for r in train for q, t in zip(r["conversations"][::2], r["conversations"][1::2])
               if category_of(q["value"]) == "colour"]
    tops = {c for c in colours if colours.count(c) == max(map(colours.count, colours))}  # (ties: any of them)
    asked = [r["answer"] for r in rows if r["category"] == "colour"]
    assert base["per_category"]["colour"] in {sum(a == t for a in asked) / len(asked) for t in tops}
    with pytest.raises(ValueError, match="not a toy question"):
        category_of("What is this?")


def configured_backbone() -> str:
    """The random init configs/toy_vlm.yaml trains from (the weights must have moved away from it)."""
    import yaml

    return yaml.safe_load((ROOT / "configs" / "toy_vlm.yaml").read_text())["model"].get("backbone_path") or "tiny"


@pytest.fixture(scope="module")
def vlm_run(toy_data, tmp_path_factory):
    """scripts/toy_vlm.py for three steps on a small toy VQA set."""
    d = tmp_path_factory.mktemp("vlm")
    cmd = [sys.executable, str(ROOT / "scripts" / "toy_vlm.py"), "--out", str(d / "run"), "--data", str(toy_data),
           "--vqa", str(d / "vqa"), "--num", "24", "--eval", "8", "train.max_steps=3", "train.save_steps=3", "train.logging_steps=1",
           "train.per_device_train_batch_size=4", "data.num_workers=0", "data.shuffle_buffer=10"]
    r = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return d, r.stdout


def test_toy_vlm_trains_the_backbone_and_scores_vqa(vlm_run):
    d, stdout = vlm_run
    run = d / "run"
    res = json.loads((run / "vqa.json").read_text())
    assert res["n"] == len((d / "vqa" / "eval.jsonl").read_text().splitlines()) and 0 <= res["accuracy"] <= 1
    assert set(res["per_category"]) == set(CATEGORIES) and set(res["majority_baseline"]["per_category"]) == set(CATEGORIES)
    assert "toy VLM VQA accuracy" in stdout
    # the joint recipe trained the backbone itself (its language-modelling loss), not only queries + DiT
    recs = [json.loads(l) for l in (run / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all("text_loss" in r for r in recs)
    from safetensors.torch import load_file

    from blip3o.models.backbone import resolve_backbone_path

    exported = load_file(str(run / "backbone" / "model.safetensors"))
    random_init = load_file(str(Path(resolve_backbone_path("qwen2_5_vl", configured_backbone())) / "model.safetensors"))
    changed = [k for k in exported if k in random_init and not (exported[k] == random_init[k]).all()]
    assert any("visual" in k for k in changed) and any("language_model" in k or "layers" in k for k in changed)


def test_exported_backbone_loads_frozen_under_the_generator(vlm_run, toy_data, tmp_path):
    """The trained-then-frozen toy VLM goes under the generator through model.backbone_path, the code path of real
    weights; the generator trains a step and its saved model reloads with that backbone."""
    d, _ = vlm_run
    backbone = d / "run" / "backbone"
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "blip3o.train", str(ROOT / "configs" / "toy.yaml"), f"data.train_shards={toy_data / 'train'}",
           f"data.eval_prompts={toy_data / 'eval' / 'prompts.jsonl'}", f"model.backbone_path={backbone}",
           f"train.output_dir={out}", "train.max_steps=1", "train.save_steps=1", "train.per_device_train_batch_size=2",
           "data.num_workers=0", "data.shuffle_buffer=10"]
    r = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import torch
    from safetensors.torch import load_file

    from blip3o.models.backbone import resolve_backbone_path
    from blip3o.pipeline import Blip3oPipeline

    saved = load_file(str(out / "model.safetensors"))
    ref = load_file(str(backbone / "model.safetensors"))
    rand = load_file(str(Path(resolve_backbone_path("qwen2_5_vl", configured_backbone())) / "model.safetensors"))
    assert all(torch.equal(saved["backbone." + k], v) for k, v in ref.items())  # frozen: unchanged by the step
    assert any(not torch.equal(ref[k], rand[k]) for k in ref)  # and the trained VLM, not the random preset
    pipe = Blip3oPipeline.from_pretrained(str(out), device="cpu", load_decoder=False)  # reloads with it
    assert pipe.model.generate_features(["a red circle"], num_inference_steps=2).shape[0] == 1


def test_stage_table_reports_the_vqa_accuracy(vlm_run):
    from blip3o.eval.toy_stages import table

    res = json.loads((vlm_run[0] / "run" / "vqa.json").read_text())
    stages = {"vqa": {k: res[k] for k in ("accuracy", "per_category", "n", "majority_baseline")}}
    line = table(stages).splitlines()[-1]
    assert line.startswith(f"toy VLM VQA accuracy {res['accuracy']:.3f}") and "majority-answer baseline" in line
