"""Evaluation entry points on the tiny checkpoint with tiny prompt files: GenEval layout, DPG grids,
the built-in VQA runner (and its scorer), the lmms-eval backbone export."""
import json
import subprocess
import sys

from PIL import Image

from tests.conftest import ROOT, run_env


def mod(name, *args):
    return subprocess.run([sys.executable, "-m", name, *map(str, args)], env=run_env(), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_geneval_layout_from_the_real_prompt_file(tiny_ckpt, tmp_path):
    real = (ROOT.parent / "shared" / "benchmarks" / "geneval" / "evaluation_metadata.jsonl")
    rows = real.read_text().splitlines()[:3] if real.is_file() else [
        json.dumps({"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"})] * 3
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(rows) + "\n")
    r = mod("blip3o.eval.geneval", tiny_ckpt, "--prompts", prompts, "--out", tmp_path / "g", "--n-samples", 2,
            "--steps", 2, "--seed", 7)
    assert r.returncode == 0, r.stderr[-2000:]
    for i in range(3):
        d = tmp_path / "g" / f"{i:05d}"
        assert json.loads((d / "metadata.jsonl").read_text()) == json.loads(rows[i])
        assert sorted(p.name for p in (d / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert (d / "grid.png").is_file()
    s = json.loads((tmp_path / "g" / "generation_settings.json").read_text())
    assert s["seed"] == 7 and s["num_inference_steps"] == 2 and s["rewrite"] is False


def test_dpg_grids(tiny_ckpt, tmp_path):
    prompts = tmp_path / "dpg.jsonl"
    prompts.write_text('{"name": "a1", "prompt": "a red circle"}\n{"name": "b2", "prompt": "two blue squares"}\n')
    r = mod("blip3o.eval.dpg", tiny_ckpt, "--prompts", prompts, "--out", tmp_path / "d", "--steps", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "d" / "a1.png").size == (128, 128)  # 2x2 grid of 64px samples
    assert (tmp_path / "d" / "b2.png").is_file()


def test_vqa_runner_and_backbone_export(tiny_ckpt, tmp_path):
    Image.new("RGB", (56, 56), (220, 30, 30)).save(tmp_path / "r.png")
    data = tmp_path / "vqa.jsonl"
    data.write_text('{"image": "r.png", "question": "Is it red?", "answer": "yes", "category": "color"}\n'
                    '{"image": "r.png", "question": "Is it blue?", "answer": "no", "category": "color"}\n')
    r = mod("blip3o.eval.understanding", tiny_ckpt, "--data", data, "--out", tmp_path / "res.json",
            "--max-new-tokens", 3, "--export-backbone", tmp_path / "bb")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["n"] == 2 and 0.0 <= res["accuracy"] <= 1.0 and len(res["predictions"]) == 2
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "bb") is not None


def test_vqa_scorer():
    from blip3o.eval.understanding import score

    rows = [{"image": "a", "question": "q", "answer": "Yes", "category": "c"},
            {"image": "a", "question": "q2", "answer": "no", "category": "c"},
            {"image": "b", "question": "q", "answer": "the cat", "category": "d"}]
    res = score(rows, ["yes, it is", "yes", "Cat."])
    assert res["per_category"] == {"c": 0.5, "d": 1.0} and res["accuracy_plus"] == {"c": 0.0, "d": 1.0}


def test_eval_errors(tiny_ckpt, tmp_path):
    r = mod("blip3o.eval.geneval", tiny_ckpt, "--prompts", tmp_path / "none.jsonl", "--out", tmp_path / "g")
    assert r.returncode == 2 and "prompt file not found" in r.stderr
