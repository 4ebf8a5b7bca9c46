"""Pixel-based scorer for the toy world (GenEval's rules, with colour masks instead of a detector).

    python -m blip3o.eval.toy SAMPLES_DIR [--json OUT.json]

``SAMPLES_DIR`` uses GenEval's layout: ``<index:05d>/metadata.jsonl`` (one prompt row: ``tag``, ``include``,
optional ``exclude``, ``prompt``) and ``<index:05d>/samples/*.png``. Each image is judged from its pixels and
its own prompt row only:

1. every pixel is assigned to the nearest of the six toy colours or white (RGB distance), or to nothing when
   it is far from all of them;
2. each colour mask is split into 8-connected components; components smaller than ``MIN_AREA`` px (at 64x64,
   scaled with the image) are noise and ignored;
3. a component's shape comes from its fill ratio (area / bounding-box area: square ~1, circle ~pi/4, triangle
   ~1/2) with the width profile as tie-breaker (a triangle is wider at the bottom than the top);
4. GenEval's rules: each ``include`` item needs at least ``count`` matching objects (shape + colour), each
   ``exclude`` item fewer than ``count``; ``position: [rel, j]`` compares the centroid of the largest match with
   that of item ``j``'s largest match, which must be at least ``POSITION_MARGIN`` of the width apart along the
   named axis.

Reported: accuracy per tag and overall (the mean of the tag accuracies, as GenEval reports it).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Duplicated from blip3o.data.toy on purpose: the scorer must not depend on the generator's code paths.
PALETTE = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20),
}
WHITE = (255, 255, 255)
MAX_COLOR_DIST = 90.0  # farther than this from every palette colour and white: belongs to nothing
MIN_AREA = 12  # px at 64x64
POSITION_MARGIN = 0.1  # fraction of the image width/height


@dataclass
class Blob:
    color: str
    shape: str
    area: int
    cx: float
    cy: float
    bbox: Tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    fill: float


def color_labels(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int: index into PALETTE order, len(PALETTE) for white, -1 for none."""
    refs = np.array(list(PALETTE.values()) + [WHITE], dtype=np.float32)
    d = np.linalg.norm(img[:, :, None, :].astype(np.float32) - refs[None, None], axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > MAX_COLOR_DIST] = -1
    return lab


def components(mask: np.ndarray) -> List[np.ndarray]:
    """8-connected components of a boolean mask, each as an (N, 2) array of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist()):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pix = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append(np.array(pix))
    return out


def classify_shape(pix: np.ndarray) -> Tuple[str, float]:
    y0, x0 = pix.min(0)
    y1, x1 = pix.max(0)
    h, w = y1 - y0 + 1, x1 - x0 + 1
    fill = len(pix) / float(h * w)
    # Width profile: mean row width in the top third vs the bottom third, relative to the box width.
    rows = np.bincount(pix[:, 0] - y0, minlength=h).astype(np.float32)
    third = max(1, h // 3)
    taper = (rows[-third:].mean() - rows[:third].mean()) / w
    if taper > 0.3 and fill < 0.75:
        return "triangle", fill
    if fill >= 0.9:
        return "square", fill
    if fill >= 0.62:
        return "circle", fill
    return "triangle", fill


def analyse(image: Image.Image) -> List[Blob]:
    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    min_area = MIN_AREA * (h * w) / (64 * 64)
    lab = color_labels(arr)
    blobs = []
    for ci, name in enumerate(PALETTE):
        mask = lab == ci
        if not mask.any():
            continue
        for pix in components(mask):
            if len(pix) < min_area:
                continue
            shape, fill = classify_shape(pix)
            (y0, x0), (y1, x1) = pix.min(0), pix.max(0)
            blobs.append(Blob(name, shape, len(pix), float(pix[:, 1].mean()), float(pix[:, 0].mean()),
                              (int(x0), int(y0), int(x1), int(y1)), fill))
    return blobs


def _matches(blobs: Sequence[Blob], item: dict) -> List[Blob]:
    found = [b for b in blobs if b.shape == item["class"] and ("color" not in item or b.color == item["color"])]
    return sorted(found, key=lambda b: -b.area)


def _relation(a: Blob, b: Blob, rel: str, w: int, h: int) -> bool:
    mx, my = POSITION_MARGIN * w, POSITION_MARGIN * h
    return {"left of": a.cx < b.cx - mx, "right of": a.cx > b.cx + mx,
            "above": a.cy < b.cy - my, "below": a.cy > b.cy + my}[rel]


def score_image(image: Image.Image, row: dict, blobs: Optional[List[Blob]] = None) -> Tuple[bool, str]:
    """(correct, reason) for one image against its GenEval-format prompt row (``blobs``: ``analyse(image)``, when the
    caller has it already)."""
    blobs = analyse(image) if blobs is None else blobs
    w, h = image.size
    found = []
    for item in row.get("include", []):
        m = _matches(blobs, item)
        if len(m) < int(item.get("count", 1)):
            return False, f"expected {item.get('count', 1)} {item.get('color', '')} {item['class']}, found {len(m)}"
        found.append(m)
    for item in row.get("exclude", []):
        m = _matches(blobs, item)
        if len(m) >= int(item["count"]):
            return False, f"expected fewer than {item['count']} {item.get('color', '')} {item['class']}, found {len(m)}"
    for i, item in enumerate(row.get("include", [])):
        if "position" in item:
            rel, j = item["position"]
            if not _relation(found[i][0], found[int(j)][0], rel, w, h):
                return False, f"{item.get('color', '')} {item['class']} is not {rel} the reference"
    return True, "ok"


def score_dir(samples_dir: str) -> Dict[str, object]:
    """Scores every ``<index>/samples/*.png`` under ``samples_dir``; writes ``toy_results.jsonl`` there."""
    if not os.path.isdir(samples_dir):
        raise FileNotFoundError(f"samples folder {samples_dir} does not exist")
    folders = sorted(d for d in glob.glob(os.path.join(samples_dir, "*"))
                     if os.path.isfile(os.path.join(d, "metadata.jsonl")))
    if not folders:
        raise ValueError(f"{samples_dir} has no <index>/metadata.jsonl folders (GenEval layout expected)")
    per_tag: Dict[str, List[bool]] = defaultdict(list)
    results = []
    for d in folders:
        with open(os.path.join(d, "metadata.jsonl"), encoding="utf-8") as f:
            row = json.loads(f.readline())
        images = sorted(glob.glob(os.path.join(d, "samples", "*.png")) + glob.glob(os.path.join(d, "samples", "*.jpg")))
        if not images:
            logger.warning("no samples in %s", d)
        for path in images:
            with Image.open(path) as img:
                ok, reason = score_image(img, row)
            per_tag[row.get("tag", "untagged")].append(ok)
            results.append({"image": os.path.relpath(path, samples_dir), "tag": row.get("tag"),
                            "prompt": row.get("prompt"), "correct": ok, "reason": reason})
    if not results:
        raise ValueError(f"{samples_dir} has prompt folders but no sample images")
    with open(os.path.join(samples_dir, "toy_results.jsonl"), "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    tags = {t: float(np.mean(v)) for t, v in sorted(per_tag.items())}
    return {"overall": float(np.mean(list(tags.values()))), "tags": tags,
            "counts": {t: len(v) for t, v in sorted(per_tag.items())}, "images": len(results)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip3o.eval.toy", description=__doc__.split("\n")[0])
    parser.add_argument("samples_dir", help="GenEval-layout folder: <index>/metadata.jsonl + <index>/samples/*.png")
    parser.add_argument("--json", default=None,
                        help="where to write the summary (default SAMPLES_DIR/toy_scores.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = score_dir(args.samples_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for tag, acc in summary["tags"].items():
        print(f"{tag:<16} {acc:6.3f}  ({summary['counts'][tag]} images)")
    print(f"{'overall':<16} {summary['overall']:6.3f}  ({summary['images']} images)")
    out = args.json or os.path.join(args.samples_dir, "toy_scores.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
