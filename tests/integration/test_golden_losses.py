"""Golden losses (torchtitan-style): the first 20 losses of the tiny toy run at a fixed seed.

Fails loudly when numerics change by accident (a refactor, a default, a data-order change). If a change is
meant to move the losses, regenerate the file and say why in the commit:

    BLIP3O_REGEN_GOLDEN=1 python -m pytest -q tests/integration/test_golden_losses.py
"""
import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, run_env, train_cmd

GOLDEN = ROOT / "tests" / "golden" / "toy_losses.json"
STEPS = 20


@pytest.fixture(scope="module")
def golden_toy(tmp_path_factory):
    # Its own fixed toy world (not the shared fixture) so other tests can change theirs freely.
    from blip3o.data.toy import write_toy_dataset

    d = tmp_path_factory.mktemp("golden_toy")
    write_toy_dataset(str(d), num=200, seed=0, shard_size=100)
    return d


def test_first_20_losses_match_the_golden_file(golden_toy, tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd(golden_toy, out, "train.seed=0", "train.save_steps=1000", steps=STEPS)
    r = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["loss"] for r in recs}
    assert sorted(got) == list(range(1, STEPS + 1))
    losses = [got[s] for s in range(1, STEPS + 1)]
    if os.environ.get("BLIP3O_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({"config": "configs/toy.yaml (tests/conftest.py train_cmd overrides)",
                                      "steps": STEPS, "losses": losses}, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["losses"]
    # One CPU thread, fixed seeds: the run is deterministic; the tolerance only absorbs float summation order.
    for step, (a, b) in enumerate(zip(losses, want), start=1):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step}: loss {a!r} != golden {b!r}"
