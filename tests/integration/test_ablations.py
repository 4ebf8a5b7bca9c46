"""scripts/run_ablations.py end to end on tiny budgets (+ its diversity metric and variant registry),
and scripts/train_toy_vae.py through the runner's prerequisite stage."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, run_env


def _runner():
    from scripts import run_ablations

    return run_ablations


def test_diversity_metric():
    ra = _runner()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert ra.mean_pairwise_distance([a, a.copy(), a.copy()]) == 0.0
    b = 255 - a
    d = ra.mean_pairwise_distance([a, b])
    assert d > 0
    # uint8 is scaled to [0, 1]: black vs white is exactly 1
    assert ra.mean_pairwise_distance([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)]) == 1.0
    # three samples: the mean of the three pairs
    c = np.zeros_like(a)
    pairs = [ra.mean_pairwise_distance(p) for p in ([a, b], [a, c], [b, c])]
    assert ra.mean_pairwise_distance([a, b, c]) == pytest.approx(np.mean(pairs))
    with pytest.raises(ValueError):
        ra.mean_pairwise_distance([a])


def test_unknown_variant_is_one_line():
    ra = _runner()
    assert ra.parse_variants("clip_flow, vae_flow,clip_flow") == ["clip_flow", "vae_flow"]
    with pytest.raises(ValueError) as e:
        ra.parse_variants("clip_flow,clip_flwo")
    assert "unknown variant 'clip_flwo'" in str(e.value) and "clip_mse" in str(e.value)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_ablations.py"), "--variants", "nope"],
                       env=run_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: unknown variant 'nope'")


def test_run_ablations_end_to_end(tmp_path, toy_data):
    out = tmp_path / "abl"
    cmd = [sys.executable, str(ROOT / "scripts" / "run_ablations.py"), "--data", str(toy_data), "--out", str(out),
           "--variants", "clip_flow,clip_mse,vae_flow", "--steps", "2", "--eval-limit", "2", "--div-prompts", "2",
           "--div-seeds", "2", "--sample-steps", "2", "--vae-args", "--steps 2 --images 32",
           "decoder.train.max_steps=2", "clip.train.max_steps=2", "train.per_device_train_batch_size=4", "data.num_workers=0",
           "data.shuffle_buffer=50",
           "gen.train.compile=eager"]  # the DiT traced, not built by inductor (a minute per variant)
    r = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads((out / "results.json").read_text())
    by = {v["name"]: v for v in res["variants"]}
    assert list(by) == ["clip_flow", "clip_mse", "vae_flow"]
    for name, v in by.items():
        assert v["status"] == "ok", v
        assert v["steps"] == 2 and v["images"] == 2
        for k in ("score", "diversity_pixel", "diversity_feature_rel", "train_min", "s_per_step", "sample_s_per_img"):
            assert math.isfinite(v[k]), (name, k, v[k])
        assert 0.0 <= v["score"] <= 1.0 and 0.0 <= v["diversity_pixel"] <= 1.0
        assert (out / name / "grid.png").is_file() and (out / name / "diversity.png").is_file()
    assert by["clip_mse"]["objective"] == "mse" and by["vae_flow"]["target"] == "vae"
    # an MSE generator is deterministic: the seeds change nothing before the decoder
    assert by["clip_mse"]["diversity_feature_rel"] == pytest.approx(0.0, abs=1e-6)
    assert by["clip_flow"]["diversity_feature_rel"] > 0
    # prerequisites: the toy CLIP and its decoder, one trained VAE loadable through the normal target path
    assert set(res["prereqs"]) == {"toy_clip", "decoder_toy_clip", "toy_vae"}
    assert json.loads((out / "clip_flow" / "model" / "config.json").read_text())["target"] == "toy_clip"
    vae = res["prereqs"]["toy_vae"]
    assert math.isfinite(vae["recon_mse_heldout_01"]) and abs(vae["x0_std"] - 1.0) < 1e-3
    from blip3o.models.targets import load_target_encoder

    enc = load_target_encoder(vae["path"])
    assert enc.name == "vae" and (enc.channels, *enc.grid) == tuple(vae["x0_shape"])
    md = (out / "results.md").read_text()
    assert all(n in md for n in by) and "overall" in md and "diversity" in md
    assert (out / "ablations.png").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(_runner().VARIANTS))
def test_every_toy_variant_is_a_valid_experiment(name):
    # The variant files are the grid's only definition: each base config + its overrides must validate (a
    # renamed field in a config refactor would otherwise surface only in a long ablation run).
    from blip3o.config import load_config

    v = _runner().VARIANTS[name]
    cfg = load_config(ROOT / v.config, list(v.overrides))
    assert cfg.model.objective["name"] == v.objective
