"""The toy VLM: the tiny Qwen2.5-VL trained on toy questions (blip3o/data/toy_vqa.py) through the joint recipe
(configs/toy_vlm.yaml), its backbone exported as a plain transformers folder, and its VQA accuracy on held-out toy
scenes, beside the majority-answer baseline of each question category.

    python scripts/toy_vlm.py                                   # OUT=outputs/toy/vlm: data, ~10 min of training, VQA
    python scripts/toy_vlm.py --out outputs/vlm2 train.max_minutes=20
    python scripts/toy_vlm.py train.max_steps=2 --num 64 --eval 16   # a smoke run
    python scripts/toy_world.py --vlm                           # the toy world with the VLM frozen under the generator

Writes OUT/model/ (the joint model), OUT/backbone/ (the backbone alone: what model.backbone_path reads),
OUT/vqa.json (accuracy overall and per category, the baseline, every prediction) and OUT/train.log.
Stages whose output exists are reused (pass --fresh to redo them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy_vlm.yaml"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides for configs/toy_vlm.yaml")
    p.add_argument("--out", default="outputs/toy/vlm")
    p.add_argument("--data", default="toy_data", help="toy shards (the joint recipe's image loss)")
    p.add_argument("--vqa", default="toy_vqa", help="toy questions (written there if missing)")
    p.add_argument("--num", type=int, default=4000, help="toy VQA training images")
    p.add_argument("--eval", type=int, default=400, help="toy VQA evaluation images")
    p.add_argument("--fresh", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    out, data, vqa = (ROOT / a.out).resolve(), (ROOT / a.data).resolve(), (ROOT / a.vqa).resolve()
    if a.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    from blip3o.data.toy import write_toy_dataset
    from blip3o.data.toy_vqa import majority_baseline, write_toy_vqa

    t = time.time()
    if not (data / "eval" / "prompts.jsonl").is_file():
        write_toy_dataset(str(data), num=20000, seed=0)
    if not (vqa / "eval.jsonl").is_file():
        write_toy_vqa(str(vqa), a.num, a.eval)
    timings["data_s"] = time.time() - t

    model_dir = out / "model"
    if not (model_dir / "model.safetensors").is_file():
        # the config's mixture (its weights) with this run's folders
        import yaml

        sources = yaml.safe_load(CONFIG.read_text())["data"]["sources"]
        for src in sources:
            if src.get("task") == "und":
                src.update(json_path=str(vqa / "train.json"), image_root=str(vqa))
            else:
                src["shards"] = str(data / "train")
        cmd = [sys.executable, "-m", "blip3o.train", str(CONFIG), f"data.sources={json.dumps(sources)}",
               f"train.output_dir={model_dir}", *a.overrides]
        print("$", " ".join(cmd[1:]), flush=True)
        t = time.time()
        with open(out / "train.log", "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            raise SystemExit(f"toy VLM training failed (see {out / 'train.log'}):\n"
                             + (out / "train.log").read_text()[-3000:])
        timings["train_s"] = time.time() - t

    from blip3o.eval import understanding

    t = time.time()
    backbone = out / "backbone"
    rc = understanding.main([str(model_dir), "--export-backbone", str(backbone), "--data", str(vqa / "eval.jsonl"),
                             "--out", str(out / "vqa.json"), "--batch-size", "32", "--max-new-tokens", "4"])
    if rc != 0:
        raise SystemExit(f"toy VLM evaluation failed ({rc})")
    timings["vqa_s"] = time.time() - t
    res = json.loads((out / "vqa.json").read_text())
    rows = [json.loads(l) for l in (vqa / "eval.jsonl").read_text().splitlines() if l.strip()]
    res["majority_baseline"] = majority_baseline(json.loads((vqa / "train.json").read_text()), rows)
    res["timings"] = timings
    (out / "vqa.json").write_text(json.dumps(res, indent=2))
    cats = " ".join(f"{c}={v:.2f}" for c, v in sorted(res["per_category"].items()))
    base = " ".join(f"{c}={v:.2f}" for c, v in sorted(res["majority_baseline"]["per_category"].items()))
    print(f"toy VLM VQA accuracy {res['accuracy']:.3f} ({cats}); majority-answer baseline "
          f"{res['majority_baseline']['accuracy']:.3f} ({base}); backbone in {backbone}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
