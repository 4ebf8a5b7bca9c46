"""Editing is trainable: (source, instruction, target) JSON triples go through the real entry point,
the source image reaches the queries through the backbone's vision tower, and the result edits."""
import json
import subprocess
import sys

from PIL import Image

from tests.conftest import ROOT, run_env


def test_edit_triples_train_and_the_model_edits(tmp_path):
    (tmp_path / "img").mkdir()
    colors = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 50)}
    rows = []
    for i, (a, b) in enumerate([("red", "blue"), ("blue", "green"), ("green", "red")] * 4):
        Image.new("RGB", (64, 64), colors[a]).save(tmp_path / "img" / f"s{i}.png")
        Image.new("RGB", (64, 64), colors[b]).save(tmp_path / "img" / f"t{i}.png")
        rows.append({"source": f"img/s{i}.png", "instruction": f"make it {b}", "target": f"img/t{i}.png"})
    rows.append({"source": "img/missing.png", "instruction": "x", "target": "img/t0.png"})  # skipped, counted
    data = tmp_path / "edit.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "blip3o.train", str(ROOT / "configs" / "toy.yaml"), f"data.json_path={data}",
           f"data.image_root={tmp_path}", "data.und_image_size=56", "data.und_image_tokens=4", "data.num_workers=0",
           f"train.output_dir={out}", "train.max_steps=3", "train.logging_steps=1", "train.save_steps=3",
           "train.per_device_train_batch_size=4", "data.eval_prompts=null", "data.train_shards=null"]
    r = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(rec["loss"] == rec["loss"] for rec in recs)
    from blip3o.pipeline import Blip3oPipeline

    pipe = Blip3oPipeline.from_pretrained(out, device="cpu", load_decoder=False)
    assert pipe.model.image_processor is not None
