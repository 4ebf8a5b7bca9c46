"""`bash run.sh` with no IMG_FOLDER/OUTPUT_FOLDER/HF_HOME runs the toy-world default end to end; here
with few-step overrides (the full default is a benchmark: benchmarks/toy_world.md)."""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT, run_env


def test_run_sh_toy_default_with_few_steps(tmp_path, toy_data):
    env = run_env()
    for k in ("IMG_FOLDER", "OUTPUT_FOLDER", "HF_HOME"):
        env.pop(k, None)
    out = tmp_path / "toy"
    r = subprocess.run(["bash", str(ROOT / "run.sh"), "--out", str(out), "--data", str(toy_data),
                        "train.max_steps=2", "train.per_device_train_batch_size=4", "data.num_workers=0",
                        "train.save_steps=1", "train.save_total_limit=0", "gen.train.compile=eager",
                        "--samples-per-prompt", "1", "--eval-limit", "4", "--steps", "2"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    score = json.loads((out / "score.json").read_text())
    assert 0.0 <= score["overall"] <= 1.0 and score["images"] == 4
    for f in ("grid.png", "loss.png", "timings.json"):
        assert (out / f).is_file(), f
    # the stages got what the 14-minute budget left after the data and the toy CLIP (max_steps=2 ends them first)
    minutes = json.loads((out / "timings.json").read_text())["stage_minutes"]
    assert 10 < minutes["decoder"] < 14 and abs(minutes["decoder"] - minutes["generator"] - 0.5) < 0.02, minutes
    assert (out / "model" / "diffusion-decoder" / "model_index.json").is_file()
    # the generator trained on the toy CLIP's cached features (written beside the decoder) with its DiT compiled
    assert (out / "clip" / "x0_cache" / "signature.json").is_file()
    gen_log = (out / "generator.log").read_text()
    assert "using target cache" in gen_log and "NextDiT compiled" in gen_log
    assert "toy score" in r.stdout
    # the toy CLIP stage ran first, and both later stages target its frozen image tower
    assert (out / "clip" / "text_tower.safetensors").is_file()
    assert json.loads((out / "model" / "config.json").read_text())["target"] == "toy_clip"
    # the stage table: decoder ceiling, end to end, decoder-free generator score, CLIP zero-shot
    stages = json.loads((out / "stages.json").read_text())
    for key in ("ceiling", "end_to_end", "generator_nn", "nn_ceiling"):
        assert 0.0 <= stages[key]["overall"] <= 1.0 and set(stages[key]["tags"]) <= {
            "single_object", "counting", "colors", "position"}, key
    assert stages["end_to_end"]["overall"] == score["overall"] and stages["generator_nn"]["images"] == 4
    assert stages["ceiling"]["images"] == 4 and set(stages["zero_shot"]) == {"shape", "colour", "n"}
    for key in ("ceiling", "end_to_end"):  # why the failed images failed, counted over the same images
        f = stages[key]["failures"]
        assert f["images"] == 4 and f["failed"] == sum(f["causes"].values()) == round(4 * (1 - stages[key]["overall"]))
    assert "decoder ceiling" in (out / "stages.md").read_text() and "decoder ceiling" in r.stdout

    # score vs minutes from the same run's checkpoints (both stages saved at steps 1 and 2)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "toy_curve.py"), str(out), "--minutes", "0", "600",
                        "--eval-limit", "4", "--steps", "2", "--samples-per-prompt", "1"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "no checkpoint that early" in r.stdout  # nothing is trained for 0 minutes
    (point,) = json.loads((out / "curve" / "curve.json").read_text())
    assert point["minutes"] == 600 and point["generator_step"] == 2 and point["decoder_step"] == 2
    assert 0.0 <= point["overall"] <= 1.0 and (out / "curve" / "curve.png").is_file()
    assert 0.0 <= point["ceiling"] <= 1.0 and set(point["ceiling_tags"]) == set(point["tags"])

    # the sampling study on the development prompts (seed 1, never the evaluation set)
    dev = tmp_path / "dev.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "toy_dev.py"), str(out), "--per-tag", "1",
                        "--variants", "cfg:3@2", "rescale:3:0.7@2", "interval:3:0.3:0.9@2", "--decoder-steps", "2",
                        "--decoder-guidance", "1.5", "--out", str(dev)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    recs = [json.loads(l) for l in dev.read_text().splitlines()]
    assert [x["variant"] for x in recs] == ["cfg:3@2", "rescale:3:0.7@2", "interval:3:0.3:0.9@2"]
    assert all(0.0 <= x["e2e"] <= 1.0 and 0.0 <= x["rank"] <= 1.0 and x["std_ratio"] > 0 for x in recs)
    assert all(x["decoder_guidance"] == 1.5 for x in recs)

    # an earlier generator checkpoint through the run's final decoder; the decoder's checkpoints carry its EMA
    # (configs/toy_decoder.yaml), which toy_curve loaded above with a check that every tensor fits
    assert (out / "decoder" / "checkpoint-1" / "ema.safetensors").is_file()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "toy_dev.py"), str(out), "--per-tag", "1",
                        "--checkpoint", str(out / "model" / "checkpoint-1"), "--variants", "cfg:3@2",
                        "--decoder-steps", "2", "--out", str(dev)], env=env, capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rec = json.loads(dev.read_text().splitlines()[-1])
    assert rec["checkpoint"].endswith("checkpoint-1") and 0.0 <= rec["e2e"] <= 1.0
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "toy_dev.py"), str(out), "--per-tag", "1",
                        "--checkpoint", str(out / "decoder" / "checkpoint-1")], env=env, capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode != 0 and "does not fit the model" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
