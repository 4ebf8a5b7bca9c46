"""The toy world: coloured shapes on white, GenEval-style captions, real WebDataset shards.

Specification (tests and ``blip3o.eval.toy`` depend on it; the README repeats it):

* canvas 64x64 (or 128x128), white background (255, 255, 255), no anti-aliasing;
* shapes: circle, square (axis-aligned), triangle (isosceles, apex up), all filled, bounding box 10-20 px at
  64x64 (scaled with the canvas); objects never overlap (bounding boxes at least 2 px apart, scaled);
* colours exactly: red (220,30,30), green (30,160,50), blue (30,60,220), yellow (235,200,20),
  purple (140,50,180), orange (245,130,20);
* every image shows 1-4 objects of at most two (colour, shape) kinds, drawn from four GenEval-like tags:
  ``single_object`` "a red circle"; ``counting`` "three blue squares" (2-4 of one kind);
  ``colors`` "a green triangle and a yellow circle" (two kinds of different colours, GenEval's colour
  attribution); ``position`` "a red square to the left of a blue circle" (also "to the right of", "above",
  "below"; the centres are at least 30% of the canvas apart along the named axis, and that axis dominates);
* each sample has ``KEY.png`` (or ``.jpg``), ``KEY.txt`` (the short GenEval-style caption), ``KEY.long.txt``
  (a long descriptive variant that also says where each object is) and ``KEY.json`` (the scene, for
  debugging only; the scorer never reads it);
* evaluation prompts ``eval/prompts.jsonl`` in GenEval's format (``tag``, ``include`` with
  ``class``/``count``/``color``, ``position: [relation, index]`` on the second object of a position prompt,
  ``exclude`` for single objects and counts), drawn from the same grammar with a random stream that
  training never uses (training scene ``i`` is seeded by ``(seed, "train", i)``, evaluation prompt ``i`` by
  ``(seed, "eval", i)``).
"""
from __future__ import annotations

import io
import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from blip3o.data.streams import derive_seed

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
TAGS = ("single_object", "counting", "colors", "position")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = (255, 255, 255)
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
BASE = 64  # sizes below are specified at 64x64 and scaled with the canvas
MIN_OBJ, MAX_OBJ, GAP = 10, 20, 2
POSITION_SEPARATION = 0.3  # fraction of the canvas between centres along the named axis


@dataclass
class ToyObject:
    color: str
    shape: str
    x: int  # bounding box top-left
    y: int
    size: int

    @property
    def center(self) -> Tuple[float, float]:
        return self.x + (self.size - 1) / 2.0, self.y + (self.size - 1) / 2.0


@dataclass
class Scene:
    tag: str
    objects: List[ToyObject]
    relation: Optional[str] = None  # position: objects[0] <relation> objects[1]
    canvas: int = BASE


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(color: str, shape: str, n: int = 1) -> str:
    if n == 1:
        return f"{_article(color)} {color} {shape}"
    return f"{NUMBERS[n]} {color} {shape}s"


def _relation_phrase(rel: str) -> str:
    return {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)


def _place(rng: random.Random, sizes: Sequence[int], canvas: int, gap: int, accept=None,
           tries: int = 200) -> Optional[List[Tuple[int, int]]]:
    """Rejection-samples non-overlapping boxes (at least ``gap`` px apart) inside the canvas."""
    for _ in range(tries):
        boxes: List[Tuple[int, int, int]] = []
        for s in sizes:
            for _ in range(50):
                x, y = rng.randint(1, canvas - s - 1), rng.randint(1, canvas - s - 1)
                if all(x + s + gap <= bx or bx + bs + gap <= x or y + s + gap <= by or by + bs + gap <= y
                       for bx, by, bs in boxes):
                    boxes.append((x, y, s))
                    break
            else:
                break
        if len(boxes) == len(sizes) and (accept is None or accept(boxes)):
            return [(x, y) for x, y, _ in boxes]
    return None


def _relation_holds(a: Tuple[float, float], b: Tuple[float, float], rel: str, canvas: int) -> bool:
    """a <rel> b with a clear margin along the named axis, which must also dominate the other axis."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    sep = POSITION_SEPARATION * canvas
    return {"left of": -dx >= sep and abs(dx) > abs(dy), "right of": dx >= sep and abs(dx) > abs(dy),
            "above": -dy >= sep and abs(dy) > abs(dx), "below": dy >= sep and abs(dy) > abs(dx)}[rel]


def sample_scene(rng: random.Random, tag: Optional[str] = None, canvas: int = BASE) -> Scene:
    scale = canvas / BASE
    tag = tag or rng.choice(TAGS)
    if tag not in TAGS:
        raise ValueError(f"unknown toy tag {tag!r}; choose one of {TAGS}")
    colors, shapes = list(COLORS), list(SHAPES)
    relation = None
    if tag == "single_object":
        kinds = [(rng.choice(colors), rng.choice(shapes))]
    elif tag == "counting":
        kinds = [(rng.choice(colors), rng.choice(shapes))] * rng.randint(2, 4)
    elif tag == "colors":
        c1, c2 = rng.sample(colors, 2)
        kinds = [(c1, rng.choice(shapes)), (c2, rng.choice(shapes))]
    else:
        while True:
            kinds = [(rng.choice(colors), rng.choice(shapes)), (rng.choice(colors), rng.choice(shapes))]
            if kinds[0] != kinds[1]:
                break
        relation = rng.choice(RELATIONS)
    while True:
        sizes = [int(round(rng.randint(MIN_OBJ, MAX_OBJ) * scale)) for _ in kinds]
        accept = None
        if relation is not None:
            def accept(boxes, rel=relation):
                (x0, y0, s0), (x1, y1, s1) = boxes
                return _relation_holds((x0 + (s0 - 1) / 2, y0 + (s0 - 1) / 2), (x1 + (s1 - 1) / 2, y1 + (s1 - 1) / 2),
                                       rel, canvas)
        pos = _place(rng, sizes, canvas, max(1, int(round(GAP * scale))), accept)
        if pos is not None:
            break
    objects = [ToyObject(c, sh, x, y, s) for (c, sh), (x, y), s in zip(kinds, pos, sizes)]
    return Scene(tag, objects, relation, canvas)


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.canvas, scene.canvas), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = COLORS[o.color]
        x1, y1 = o.x + o.size - 1, o.y + o.size - 1
        if o.shape == "square":
            draw.rectangle((o.x, o.y, x1, y1), fill=fill)
        elif o.shape == "circle":
            draw.ellipse((o.x, o.y, x1, y1), fill=fill)
        else:
            draw.polygon([(o.x + (o.size - 1) / 2.0, o.y), (x1, y1), (o.x, y1)], fill=fill)
    return img


def short_caption(scene: Scene) -> str:
    objs = scene.objects
    if scene.tag == "single_object":
        return _noun(objs[0].color, objs[0].shape)
    if scene.tag == "counting":
        return _noun(objs[0].color, objs[0].shape, len(objs))
    a, b = _noun(objs[0].color, objs[0].shape), _noun(objs[1].color, objs[1].shape)
    if scene.tag == "colors":
        return f"{a} and {b}"
    return f"{a} {_relation_phrase(scene.relation)} {b}"


def _where(o: ToyObject, canvas: int) -> str:
    cx, cy = o.center
    col = "left" if cx < canvas / 3 else ("right" if cx >= 2 * canvas / 3 else "")
    row = "top" if cy < canvas / 3 else ("bottom" if cy >= 2 * canvas / 3 else "")
    if row and col:
        return f"in the {row} {col}"
    if row or col:
        return f"at the {row or col}" if row else f"on the {col}"
    return "in the centre"


def long_caption(scene: Scene) -> str:
    """The long descriptive variant: every object with its coarse location on a 3x3 grid."""
    objs, c = scene.objects, scene.canvas
    filled = [f"a filled {o.color} {o.shape}" for o in objs]
    if scene.tag == "single_object":
        text = f"{filled[0]} {_where(objs[0], c)}, on a plain white background."
    elif scene.tag == "counting":
        places = [_where(o, c) for o in objs]
        text = (f"{NUMBERS[len(objs)]} filled {objs[0].color} {objs[0].shape}s on a plain white background: one "
                + ", one ".join(places[:-1]) + f" and one {places[-1]}.")
    elif scene.tag == "colors":
        text = f"{filled[0]} {_where(objs[0], c)} and {filled[1]} {_where(objs[1], c)}, on a plain white background."
    else:
        a, b = objs
        text = (f"{filled[0]} {_relation_phrase(scene.relation)} {filled[1]}, on a plain white background; the "
                f"{a.color} {a.shape} is {_where(a, c)} and the {b.color} {b.shape} is {_where(b, c)}.")
    return text[0].upper() + text[1:]


def eval_row(scene: Scene) -> dict:
    """The GenEval-format prompt row for a scene."""
    objs = scene.objects
    if scene.tag in ("single_object", "counting"):
        o, n = objs[0], len(objs)
        return {"tag": scene.tag, "include": [{"class": o.shape, "count": n, "color": o.color}],
                "exclude": [{"class": o.shape, "count": n + 1, "color": o.color}], "prompt": short_caption(scene)}
    a, b = objs
    if scene.tag == "colors":
        return {"tag": "colors", "include": [{"class": a.shape, "count": 1, "color": a.color},
                                             {"class": b.shape, "count": 1, "color": b.color}],
                "prompt": short_caption(scene)}
    # GenEval puts the reference object first and the located one second: "<b> ... <rel> ... <a>".
    return {"tag": "position", "include": [{"class": b.shape, "count": 1, "color": b.color},
                                           {"class": a.shape, "count": 1, "color": a.color,
                                            "position": [scene.relation, 0]}],
            "prompt": short_caption(scene)}


def train_scene(seed: int, index: int, canvas: int = BASE) -> Scene:
    return sample_scene(random.Random(derive_seed(seed, "train", index)), canvas=canvas)


def eval_scenes(seed: int, per_tag: int, canvas: int = BASE) -> List[Scene]:
    """``per_tag`` scenes per tag with distinct prompts where the grammar allows (18 single objects exist)."""
    out: List[Scene] = []
    for tag in TAGS:
        prompts, i, tries = set(), 0, 0
        while sum(1 for s in out if s.tag == tag) < per_tag:
            scene = sample_scene(random.Random(derive_seed(seed, "eval", tag, i)), tag=tag, canvas=canvas)
            i += 1
            text = short_caption(scene)
            if text in prompts and tries < 50 * per_tag:
                tries += 1
                continue
            prompts.add(text)
            out.append(scene)
    return out


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False)
    else:
        img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_toy_dataset(out_dir: str, num: int, seed: int = 0, canvas: int = BASE, shard_size: int = 1000,
                      image_format: str = "png", eval_per_tag: int = 12, eval_images: bool = False) -> Dict:
    """Writes ``out_dir/train/toy-%06d.tar`` and ``out_dir/eval/prompts.jsonl`` (and, with ``eval_images``,
    the ground-truth images of the evaluation prompts in GenEval's sample layout under ``out_dir/eval/gt``).
    Output is byte-for-byte deterministic for a given (num, seed, canvas, shard_size, format)."""
    import webdataset as wds  # only when writing shards: importing blip3o.data stays free of webdataset

    if canvas not in (64, 128):
        raise ValueError(f"toy canvas must be 64 or 128, got {canvas}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image format must be png or jpg, got {image_format!r}")
    if num < 1 or shard_size < 1:
        raise ValueError("num and shard_size must be >= 1")
    train_dir, eval_dir = os.path.join(out_dir, "train"), os.path.join(out_dir, "eval")
    os.makedirs(train_dir, exist_ok=True)
    os.makedirs(eval_dir, exist_ok=True)
    shards = []
    for start in range(0, num, shard_size):
        path = os.path.join(train_dir, f"toy-{start // shard_size:06d}.tar")
        with open(path, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)
            for i in range(start, min(num, start + shard_size)):
                scene = train_scene(seed, i, canvas)
                writer.write({
                    "__key__": f"{i:08d}", image_format: encode_image(render(scene), image_format),
                    "txt": short_caption(scene).encode(), "long.txt": long_caption(scene).encode(),
                    "json": json.dumps(_scene_dict(scene), sort_keys=True).encode(),
                })
            writer.close()
        shards.append(path)
    scenes = eval_scenes(seed, eval_per_tag, canvas)
    with open(os.path.join(eval_dir, "prompts.jsonl"), "w", encoding="utf-8") as f:
        for scene in scenes:
            f.write(json.dumps(eval_row(scene)) + "\n")
    if eval_images:
        write_ground_truth(scenes, os.path.join(eval_dir, "gt"))
    return {"shards": shards, "prompts": os.path.join(eval_dir, "prompts.jsonl"), "num_eval": len(scenes)}


def write_ground_truth(scenes: Sequence[Scene], out_dir: str) -> None:
    """GenEval's layout: ``<out_dir>/<index:05d>/metadata.jsonl`` (the prompt row) + ``samples/0000.png``."""
    for i, scene in enumerate(scenes):
        d = os.path.join(out_dir, f"{i:05d}")
        os.makedirs(os.path.join(d, "samples"), exist_ok=True)
        with open(os.path.join(d, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.write(json.dumps(eval_row(scene)) + "\n")
        render(scene).save(os.path.join(d, "samples", "0000.png"))


def _scene_dict(scene: Scene) -> dict:
    return {"tag": scene.tag, "relation": scene.relation, "canvas": scene.canvas,
            "objects": [asdict(o) for o in scene.objects]}
