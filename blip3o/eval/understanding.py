"""A small built-in VQA / MME-style runner over a JSONL of (image, question, answer), through the
backbone's own chat (BLIP3-o leaves understanding to the frozen backbone).

    python -m blip3o.eval.understanding CKPT --data vqa.jsonl [--image-root DIR] [--out results.json]

Each line: ``{"image": "path.jpg", "question": "...", "answer": "yes"}`` (optional ``"category"``).
Scores: exact match after normalisation (lowercase, strip punctuation / articles), and for yes/no
answers MME's accuracy and accuracy+ (both questions of an image right), per category.

For the full benchmark suites use lmms-eval, whose Qwen2.5-VL model class evaluates a BLIP3-o
checkpoint's understanding unchanged (the backbone is frozen and saved in the standard layout):
``python -m blip3o.eval.understanding CKPT --export-backbone DIR`` writes the backbone as a plain
Qwen2.5-VL directory for ``lmms-eval --model qwen2_5_vl --model_args pretrained=DIR --tasks mme``.
"""
from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from PIL import Image

from blip3o.pipeline import Blip3oPipeline

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(ans: str) -> str:
    ans = ans.lower().strip()
    ans = ans.translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", ans).split())


def read_rows(path: str, image_root: str = None) -> List[Dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"VQA file not found: {p}")
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    root = Path(image_root) if image_root else p.parent
    for r in rows:
        for k in ("image", "question", "answer"):
            if k not in r:
                raise ValueError(f"{p}: row without '{k}': {r}")
        r["image_path"] = str(root / r["image"])
    return rows


def score(rows: List[Dict], predictions: List[str]) -> Dict:
    per_cat = defaultdict(list)
    per_img = defaultdict(list)
    for r, pred in zip(rows, predictions):
        ok = normalize(pred) == normalize(str(r["answer"])) or (
            normalize(str(r["answer"])) in ("yes", "no") and normalize(pred).split()[:1] == [normalize(str(r["answer"]))])
        per_cat[r.get("category", "all")].append(ok)
        per_img[(r.get("category", "all"), r["image"])].append(ok)
    acc = {c: sum(v) / len(v) for c, v in per_cat.items()}
    acc_plus = {}
    for (c, _), v in per_img.items():
        acc_plus.setdefault(c, []).append(all(v))
    return {"accuracy": sum(sum(v) for v in per_cat.values()) / max(len(rows), 1), "per_category": acc,
            "accuracy_plus": {c: sum(v) / len(v) for c, v in acc_plus.items()}, "n": len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", help="JSONL of image/question/answer")
    p.add_argument("--image-root", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--export-backbone", default=None, help="write the backbone as a plain transformers dir")
    a = p.parse_args(argv)
    try:
        pipe = Blip3oPipeline.from_pretrained(a.checkpoint, device=a.device, load_decoder=False)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.export_backbone:
        m = pipe.model
        m.backbone.save_pretrained(a.export_backbone)
        m.tokenizer.save_pretrained(a.export_backbone)
        if m.image_processor is not None:
            m.image_processor.save_pretrained(a.export_backbone)
        print(f"wrote the backbone to {a.export_backbone}")
        if not a.data:
            return 0
    if not a.data:
        print("error: --data is required (or --export-backbone)", file=sys.stderr)
        return 2
    try:
        rows = read_rows(a.data, a.image_root)
        images = [Image.open(r["image_path"]).convert("RGB") for r in rows]
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    preds = []
    for i in range(0, len(rows), a.batch_size):
        preds += pipe.understand(images[i:i + a.batch_size], [r["question"] for r in rows[i:i + a.batch_size]],
                                 max_new_tokens=a.max_new_tokens)
    res = score(rows, preds)
    res["predictions"] = [{"image": r["image"], "question": r["question"], "answer": r["answer"], "prediction": pr}
                          for r, pr in zip(rows, preds)]
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "predictions"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
