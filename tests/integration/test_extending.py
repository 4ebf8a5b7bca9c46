"""docs/extending.md is true: a backbone, a target, an objective and a decoder, each registered in one file outside
the package (tests/integration/extending_plugin.py), train two steps through the real entry point, loaded with the
config's ``imports`` key; a misspelt name fails with one line that lists the new variant."""
import json
import math
import subprocess

import pytest

from tests.conftest import ROOT, run_env, train_cmd

PLUGIN = "imports=[tests.integration.extending_plugin]"


def run(cmd):
    return subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


def train(toy, out, *overrides):
    r = run(train_cmd(toy, out, PLUGIN, *overrides, steps=2))
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert json.loads((out / "experiment.json").read_text())["imports"] == ["tests.integration.extending_plugin"]
    return recs


@pytest.mark.parametrize("overrides", [
    ["model.backbone=small_qwen3"],
    ["model.target=pooled_pixels"],
    ["train.task=decoder", "model.decoder=small_sdxl", "data.eval_prompts=null"],
], ids=["backbone", "target", "decoder"])
def test_a_variant_from_a_plugin_trains(toy_data, tmp_path, overrides):
    train(toy_data, tmp_path / "run", "model.num_queries=8", *overrides)


def test_an_objective_setting_from_the_yaml_reaches_the_loss(toy_data, tmp_path):
    recs = train(toy_data, tmp_path / "run", "model.num_queries=8", "model.objective={name: scaled_mse, scale: 2.5}")
    for r in recs:
        assert r["scale"] == 2.5
        assert r["loss"] == pytest.approx(2.5 * r["mse_loss"], rel=1e-5)


@pytest.mark.parametrize("override,message", [
    ("model.target=pooled_pixel", "model.target: 'pooled_pixel' is not one of ['eva_clip', 'pooled_pixels', "),
    ("model.objective={name: scaled_mse, scale: -1}", "model.objective.scale: must be > 0, got -1.0"),
], ids=["misspelt", "bad-setting"])
def test_misspelt_or_bad_plugin_variants_fail_with_one_line(toy_data, tmp_path, override, message):
    r = run(train_cmd(toy_data, tmp_path / "bad", PLUGIN, override, steps=1))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error:") and message in last, r.stderr[-2000:]


def test_imports_key_in_yaml_and_overrides_and_a_missing_module(tmp_path):
    from blip3o.config import ConfigError, load_config

    y = tmp_path / "exp.yaml"
    y.write_text("preset: tiny\nimports: [json]\n")
    assert load_config(y, ["imports=[csv, json]"]).imports == ["json", "csv"]
    missing = r"^imports: cannot import 'no_such_pkg\.mod' \(No module named 'no_such_pkg'\)$"
    with pytest.raises(ConfigError, match=missing):
        load_config(None, ["imports=no_such_pkg.mod"])
    with pytest.raises(ConfigError, match="imports: expected a list of module names"):
        load_config(None, ["imports={a: 1}"])
