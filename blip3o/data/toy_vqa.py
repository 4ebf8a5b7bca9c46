"""Toy-world questions and answers: the understanding half of the toy world (the toy VLM's data and its test).

Every toy scene (``blip3o.data.toy``) answers four kinds of question, each with a one-word answer that its scene
fixes:

* ``colour``   "What colour is the square?" / "What colour are the squares?" -> "red" (asked only of a shape that
  the scene shows in one colour);
* ``shape``    "What shape is the red object?" / "What shape are the red objects?" -> "square" (a colour shown in
  one shape);
* ``count``    "How many squares are there?" -> "one" ... "four" (shapes the scene shows);
* ``position`` "Is the red square to the left of the blue circle?" -> "yes", and the same question with another
  relation -> "no" (position scenes only).

Files (``write_toy_vqa``): ``images/<i>.png`` (the scenes at ``canvas``, 128 px by default: the tiny Qwen2.5-VL's
image processor turns it into 112 px, a 4x4 grid of merged 28-px tokens), ``train.json`` (LLaVA conversations: one
record per image, every question of its scene as one turn, in a shuffled order; what ``data.sources`` reads with
``task: und``) and ``eval.jsonl`` (one row per evaluation question in ``python -m blip3o.eval.understanding``'s
format: ``image``, ``question``, ``answer``, ``category``). Training scene ``i`` is seeded by
``(seed, "vqa", i)``, evaluation scene ``i`` by ``(seed, "vqa-eval", i)``: neither is a stream the generator's
shards or prompts use.

    python -m blip3o.data.toy_vqa toy_vqa --num 4000 --eval 400
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from typing import Dict, List, Tuple

from blip3o.data import toy
from blip3o.data.streams import derive_seed

CATEGORIES = ("colour", "shape", "count", "position")
# How each category's questions begin (position questions begin with "Is the"): category_of reads them back.
OPENINGS = {"colour": "What colour", "shape": "What shape", "count": "How many", "position": "Is the"}


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def questions(scene: toy.Scene) -> List[Tuple[str, str, str]]:
    """Every (category, question, answer) the scene fixes, in a fixed order."""
    objs = scene.objects
    out: List[Tuple[str, str, str]] = []
    for shape in toy.SHAPES:
        of_shape = [o for o in objs if o.shape == shape]
        colours = {o.color for o in of_shape}
        if len(colours) == 1:
            verb = "is the" if len(of_shape) == 1 else "are the"
            out.append(("colour", f"{OPENINGS['colour']} {verb} {_plural(shape, len(of_shape))}?", of_shape[0].color))
    for colour in toy.COLORS:
        of_colour = [o for o in objs if o.color == colour]
        shapes = {o.shape for o in of_colour}
        if len(shapes) == 1:
            verb = "is the" if len(of_colour) == 1 else "are the"
            out.append(("shape", f"{OPENINGS['shape']} {verb} {colour} {_plural('object', len(of_colour))}?",
                        of_colour[0].shape))
    for shape in toy.SHAPES:
        n = sum(o.shape == shape for o in objs)
        if n:
            out.append(("count", f"{OPENINGS['count']} {shape}s are there?", toy.NUMBERS[n]))
    if scene.tag == "position":
        a, b = objs
        rel = scene.relation
        wrong = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
        for r, ans in ((rel, "yes"), (wrong, "no")):
            q = f"{OPENINGS['position']} {a.color} {a.shape} {toy._relation_phrase(r)} the {b.color} {b.shape}?"
            out.append(("position", q, ans))
    return out


def category_of(question: str) -> str:
    """The category of one of ``questions``' questions (a conversation turn may carry the ``<image>`` line)."""
    text = question.replace("<image>\n", "")
    for cat, opening in OPENINGS.items():
        if text.startswith(opening):
            return cat
    raise ValueError(f"not a toy question: {question!r}")


def majority_baseline(train: List[dict], eval_rows: List[dict]) -> Dict[str, object]:
    """Accuracy of answering each category's most frequent training answer (``train``: the records of
    ``train.json``): what a model that ignores the image scores (colour ~1/6, shape ~1/3, count mostly "one",
    position 1/2)."""
    answers: Dict[str, Counter] = {}
    for rec in train:
        turns = rec["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            answers.setdefault(category_of(q["value"]), Counter())[a["value"]] += 1
    per = {}
    for cat in sorted({r["category"] for r in eval_rows}):
        rows = [r for r in eval_rows if r["category"] == cat]
        top = answers.get(cat, Counter()).most_common(1)
        per[cat] = sum(r["answer"] == top[0][0] for r in rows) / len(rows) if top else 0.0
    return {"accuracy": sum(per[r["category"]] for r in eval_rows) / max(len(eval_rows), 1), "per_category": per}


def conversation(scene: toy.Scene, rng: random.Random) -> List[Dict[str, str]]:
    """All of the scene's questions as one LLaVA conversation (the image in the first turn), shuffled."""
    qa = questions(scene)
    rng.shuffle(qa)
    turns = []
    for k, (_, q, a) in enumerate(qa):
        turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q})
        turns.append({"from": "gpt", "value": a})
    return turns


def eval_questions(scene: toy.Scene, rng: random.Random) -> List[Tuple[str, str, str]]:
    """One question per category the scene has, picked at random (position: yes or no at random)."""
    by_cat: Dict[str, List[Tuple[str, str, str]]] = {}
    for q in questions(scene):
        by_cat.setdefault(q[0], []).append(q)
    return [rng.choice(by_cat[c]) for c in CATEGORIES if c in by_cat]


def write_toy_vqa(out_dir: str, num: int, num_eval: int = 400, seed: int = 0, canvas: int = 128) -> Dict[str, object]:
    """Writes ``images/``, ``train.json`` and ``eval.jsonl`` (module docstring); deterministic for its arguments."""
    if num < 1 or num_eval < 1:
        raise ValueError(f"toy VQA needs num >= 1 and num_eval >= 1, got {num} and {num_eval}")
    if canvas not in (64, 128):
        raise ValueError(f"toy canvas must be 64 or 128, got {canvas}")
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    train = []
    for i in range(num):
        rng = random.Random(derive_seed(seed, "vqa", i))
        scene = toy.sample_scene(rng, canvas=canvas)
        name = f"images/train-{i:06d}.png"
        toy.render(scene).save(os.path.join(out_dir, name))
        train.append({"image": name, "conversations": conversation(scene, rng)})
    rows = []
    for i in range(num_eval):
        rng = random.Random(derive_seed(seed, "vqa-eval", i))
        scene = toy.sample_scene(rng, tag=toy.TAGS[i % len(toy.TAGS)], canvas=canvas)
        name = f"images/eval-{i:06d}.png"
        toy.render(scene).save(os.path.join(out_dir, name))
        for cat, q, a in eval_questions(scene, rng):
            rows.append({"image": name, "question": q, "answer": a, "category": cat})
    with open(os.path.join(out_dir, "train.json"), "w", encoding="utf-8") as f:
        json.dump(train, f)
    with open(os.path.join(out_dir, "eval.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"train": os.path.join(out_dir, "train.json"), "eval": os.path.join(out_dir, "eval.jsonl"),
            "num_train": num, "num_eval_questions": len(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m blip3o.data.toy_vqa", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--num", type=int, default=4000, help="training images (each with all its questions)")
    p.add_argument("--eval", type=int, default=400, help="evaluation images (one question per category each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canvas", type=int, default=128)
    a = p.parse_args(argv)
    try:
        info = write_toy_vqa(a.out_dir, a.num, a.eval, a.seed, a.canvas)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
