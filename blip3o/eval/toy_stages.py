"""Stage-wise evidence for a toy-world run: which stage limits the end-to-end score.

    python -m blip3o.eval.toy_stages outputs/toy --prompts toy_data/eval/prompts.jsonl   # what run.sh wrote
    python -m blip3o.eval.toy_stages RUN --model RUN/model --samples-per-prompt 2 --bank 4000

For the 48 evaluation prompts (12 per tag) it reports, per tag and overall:

* ``ceiling``: the decoder alone. The ground-truth scenes of the evaluation prompts are rendered, encoded by the
  frozen target (the toy CLIP), and decoded: what the decoder can do with perfect features.
* ``end_to_end``: the generated images (RUN/score.json when it exists, else sampled here as run.sh does).
* ``generator_nn``: the generator without the decoder. Each generated feature map is matched to its nearest
  neighbour (L2) in a bank of training scenes' features, and that training *image* is scored against the prompt.
  ``nn_ceiling`` is the same retrieval from the ground-truth features: how far retrieval itself can go, so the
  generator reads as a fraction of it.
* ``generator_clip``: the generator scored by the toy CLIP itself: the share of generated feature maps whose CLIP
  embedding ranks the prompt above its word-swapped negatives (another colour, shape, count or relation);
  ``clip_ceiling`` is the same for the ground-truth features. The CLIP pools over the grid, so it cannot see
  left from right: position rows measure colour and shape only.
* ``failures`` (under ``ceiling`` and ``end_to_end``): why the failed images fail, from the scorer's own blobs: an
  object of the right colour whose shape reads as another (``shape:square->circle``: rounded corners), too few or
  none of a colour, an excluded object, or the relation.
* ``feature_stats``: generated against ground-truth features (per-channel mean and std in units of the
  ground-truth std, and the ratio of token norms): out-of-distribution features show up here first.
* ``zero_shot``: the toy CLIP's zero-shot shape and colour accuracy (RUN/clip/zero_shot.json).
* ``vqa``: the toy VLM's accuracy on held-out toy questions (colour, shape, count, position) and the
  majority-answer baseline, when the run trained one (RUN/vlm/vqa.json, ``scripts/toy_world.py --vlm``).

Writes RUN/stages.json and prints the table that benchmarks/toy_world.md uses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from blip3o.data import toy
from blip3o.eval.toy import _matches, analyse, score_image
from blip3o.models.targets import ToyClipModel
from blip3o.pipeline import Blip3oPipeline

TAGS = list(toy.TAGS)


def _tag_scores(oks: Sequence[bool], rows: Sequence[dict], per: int) -> Dict[str, object]:
    tags: Dict[str, List[bool]] = {t: [] for t in TAGS}
    for i, ok in enumerate(oks):
        tags[rows[i // per]["tag"]].append(bool(ok))
    acc = {t: float(np.mean(v)) for t, v in tags.items() if v}
    return {"overall": float(np.mean(list(acc.values()))), "tags": acc, "images": len(oks)}


def eval_ground_truth(prompts_path: str, seed: int = 0, limit: Optional[int] = None):
    """The evaluation prompts and the scenes they were drawn from (regenerated from the toy seed)."""
    if not Path(prompts_path).is_file():
        raise FileNotFoundError(f"evaluation prompts not found: {prompts_path}")
    rows = [json.loads(l) for l in Path(prompts_path).read_text().splitlines() if l.strip()]
    per_tag = len(rows) // len(TAGS)
    scenes = toy.eval_scenes(seed, per_tag)
    if [toy.short_caption(s) for s in scenes] != [r["prompt"] for r in rows]:
        raise ValueError(f"{prompts_path} was not written by write_toy_dataset(seed={seed}); cannot rebuild its scenes")
    return rows[:limit], scenes[:limit]


def _images_to_target(target, images: Sequence[Image.Image]) -> torch.Tensor:
    return target.encode(target.preprocess(list(images)).to(target.device))


def _decode(pipe, feats: torch.Tensor, seed: int, steps: Optional[int],
            guidance: Optional[float] = None) -> List[Image.Image]:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(feats.shape[0])]
    return pipe.decode(feats, gens, guidance_scale=guidance, num_inference_steps=steps)


def failure_cause(image: Image.Image, row: dict) -> Optional[str]:
    """Why the scorer fails an image, read from the same blobs it judges; None when it passes. The first prompt
    object that is short decides: ``shape:WANTED->READ`` when enough objects of its colour are there but read as
    another shape (a square with rounded corners reads as a circle), ``too few`` when some of its colour are there,
    ``missing colour`` when none; then ``extra`` (an excluded object) and ``relation``."""
    blobs = analyse(image)
    if score_image(image, row, blobs)[0]:
        return None
    for item in row.get("include", []):
        need, have = int(item.get("count", 1)), len(_matches(blobs, item))
        if have >= need:
            continue
        same = [b for b in blobs if b.color == item.get("color", b.color) and b.shape != item["class"]]
        if have + len(same) >= need:
            read = max(("circle", "square", "triangle"), key=lambda k: sum(b.shape == k for b in same))
            return f"shape:{item['class']}->{read}"
        return "too few" if have + len(same) else "missing colour"
    return "extra" if any(len(_matches(blobs, it)) >= int(it["count"]) for it in row.get("exclude", [])) \
        else "relation"


def judge(images: Sequence[Image.Image], rows: Sequence[dict], per: int = 1):
    """Each image scored once: (the per-tag scores of :func:`_tag_scores`, and under ``failures`` the counts of
    :func:`failure_cause`, most common first)."""
    causes = [failure_cause(im, rows[i // per]) for i, im in enumerate(images)]
    out = _tag_scores([c is None for c in causes], rows, per)
    out["failures"] = summarize_causes(causes)
    return out


def summarize_causes(causes: Sequence[Optional[str]]) -> Dict[str, object]:
    counts: Dict[str, int] = {}
    for c in causes:
        if c is not None:
            counts[c] = counts.get(c, 0) + 1
    return {"failed": sum(counts.values()), "images": len(causes),
            "causes": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}


def failure_causes(images: Sequence[Image.Image], rows: Sequence[dict], per: int = 1) -> Dict[str, object]:
    """Counts of :func:`failure_cause` over ``images`` (``per`` consecutive images per row), most common first."""
    return summarize_causes([failure_cause(im, rows[i // per]) for i, im in enumerate(images)])


def decoder_ceiling(pipe, gt: torch.Tensor, rows, steps: Optional[int] = None, seed: int = 10 ** 6,
                    guidance: Optional[float] = None):
    """The decoder alone: ground-truth features ``gt`` of the scenes behind ``rows``, decoded and scored
    (`guidance`: the decoder's CFG scale; None = its folder's default), with why the failures failed."""
    return judge(_decode(pipe, gt, seed, steps, guidance), rows)


def samples_failures(samples_dir: Path, limit: Optional[int] = None) -> Dict[str, object]:
    """:func:`failure_causes` of a GenEval-layout samples folder (what run.sh sampled and scored)."""
    ims, rows = [], []
    for d in sorted(p for p in samples_dir.iterdir() if (p / "metadata.jsonl").is_file())[:limit]:
        row = json.loads((d / "metadata.jsonl").read_text().splitlines()[0])
        for path in sorted((d / "samples").glob("*.png")):
            with Image.open(path) as im:
                ims.append(im.convert("RGB"))
            rows.append(row)
    return failure_causes(ims, rows)


def training_bank(target, n: int, seed: int = 0, batch: int = 256):
    """Features and images of the first ``n`` training scenes (rendered, not read from shards)."""
    feats, images = [], []
    for start in range(0, n, batch):
        ims = [toy.render(toy.train_scene(seed, i)) for i in range(start, min(n, start + batch))]
        feats.append(_images_to_target(target, ims).flatten(1))
        images.extend(ims)
    return torch.cat(feats), images


def nn_score(queries: torch.Tensor, bank: torch.Tensor, bank_images, rows, per: int):
    idx = torch.cdist(queries.flatten(1).float(), bank.float()).argmin(1).tolist()
    return _tag_scores([score_image(bank_images[j], rows[i // per])[0] for i, j in enumerate(idx)], rows, per)


# words swapped to make the negatives of the CLIP check (beyond the CLIP's own colour/shape swaps)
_EVAL_SWAPS = [["two", "three", "four"], ["left", "right"], ["above", "below"]]


def clip_rank_score(clip, feats: torch.Tensor, rows, per: int) -> Dict[str, object]:
    """Share of feature maps whose CLIP embedding ranks their prompt first among word-swapped negatives."""
    ie = torch.nn.functional.normalize(clip.image.embed(feats.to(clip.logit_scale.device)), dim=-1)
    oks = []
    for i in range(feats.shape[0]):
        prompt = rows[i // per]["prompt"]
        words = prompt.split()
        cands = [prompt]
        for group in [*clip.config["hard_negative_groups"], *_EVAL_SWAPS]:
            for k, w in enumerate(words):
                if w in group:
                    cands += [" ".join(words[:k] + [o] + words[k + 1:]) for o in group if o != w]
        sims = clip.encode_text(cands) @ ie[i]
        oks.append(bool(sims[0] > sims[1:].max()) if len(cands) > 1 else True)
    return _tag_scores(oks, rows, per)


def feature_stats(gen: torch.Tensor, gt: torch.Tensor) -> Dict[str, float]:
    c = gt.shape[1]
    g, t = gen.transpose(0, 1).reshape(c, -1), gt.transpose(0, 1).reshape(c, -1)
    std = t.std(1).clamp_min(1e-6)
    return {"mean_shift": float(((g.mean(1) - t.mean(1)).abs() / std).mean()),
            "std_ratio": float((g.std(1) / std).mean()),
            "norm_ratio": float(gen.flatten(2).norm(dim=1).mean() / gt.flatten(2).norm(dim=1).mean())}


@torch.no_grad()
def run_stages(run: str, prompts: str, model_dir: Optional[str] = None, samples_per_prompt: int = 2,
               bank: int = 4000, seed: int = 0, decoder_steps: Optional[int] = None, limit: Optional[int] = None,
               pipe=None) -> Dict[str, object]:
    """The stage table of a toy run (see the module docstring); ``pipe``: an already loaded pipeline."""
    run_p = Path(run)
    pipe = pipe or Blip3oPipeline.from_pretrained(model_dir or str(run_p / "model"), device="cpu")
    target = pipe.model.target_encoder
    rows, scenes = eval_ground_truth(prompts, limit=limit)
    gt = _images_to_target(target, [toy.render(s) for s in scenes])
    out: Dict[str, object] = {"run": str(run_p), "prompts": len(rows), "samples_per_prompt": samples_per_prompt}

    # (a) the decoder's ceiling: ground-truth features of the evaluation scenes, decoded
    if pipe.has_decoder():
        out["ceiling"] = decoder_ceiling(pipe, gt, rows, decoder_steps, seed + 10 ** 6)

    # (b) end to end
    score_json = run_p / "score.json"
    if score_json.is_file():
        s = json.loads(score_json.read_text())
        out["end_to_end"] = {"overall": s["overall"], "tags": s["tags"], "images": s.get("images")}
        if (run_p / "samples").is_dir():
            out["end_to_end"]["failures"] = samples_failures(run_p / "samples", limit)

    # (c) the generator without the decoder: nearest training scene of each generated feature map
    gens = [torch.Generator().manual_seed(seed + k) for _ in rows for k in range(samples_per_prompt)]
    feats = []
    for i in range(0, len(rows), 16):
        chunk = rows[i:i + 16]
        feats.append(pipe.model.generate_features([r["prompt"] for r in chunk], num_images_per_prompt=samples_per_prompt,
                                                  generator=gens[i * samples_per_prompt:(i + len(chunk)) * samples_per_prompt]))
    gen = torch.cat(feats)
    bank_feats, bank_images = training_bank(target, bank)
    out["generator_nn"] = nn_score(gen, bank_feats, bank_images, rows, samples_per_prompt)
    out["nn_ceiling"] = nn_score(gt, bank_feats, bank_images, rows, 1)
    out["feature_stats"] = feature_stats(gen, gt)

    # (d) the toy CLIP: zero-shot accuracy, and its judgement of the generated features
    clip_dir = run_p / "clip"
    if (clip_dir / "text_tower.safetensors").is_file():
        clip = ToyClipModel.from_pretrained(str(clip_dir))
        out["generator_clip"] = clip_rank_score(clip, gen, rows, samples_per_prompt)
        out["clip_ceiling"] = clip_rank_score(clip, gt, rows, 1)
        if (clip_dir / "zero_shot.json").is_file():
            out["zero_shot"] = json.loads((clip_dir / "zero_shot.json").read_text())
    # (d) the toy VLM, where the run trained one (scripts/toy_vlm.py): its VQA accuracy on held-out toy scenes
    vqa = run_p / "vlm" / "vqa.json"
    if vqa.is_file():
        res = json.loads(vqa.read_text())
        out["vqa"] = {k: res[k] for k in ("accuracy", "per_category", "n", "majority_baseline") if k in res}
    return out


def table(stages: Dict[str, object]) -> str:
    rows = [("decoder ceiling (GT features)", "ceiling"), ("end to end", "end_to_end"),
            ("generator, NN retrieval", "generator_nn"), ("NN retrieval of GT features", "nn_ceiling"),
            ("generator, toy-CLIP ranking", "generator_clip"), ("toy-CLIP ranking of GT features", "clip_ceiling")]
    lines = ["| stage | " + " | ".join(TAGS) + " | overall |", "|---" * (len(TAGS) + 2) + "|"]
    for name, key in rows:
        s = stages.get(key)
        if s:
            lines.append(f"| {name} | " + " | ".join(f"{s['tags'].get(t, float('nan')):.2f}" for t in TAGS)
                         + f" | **{s['overall']:.3f}** |")
    for name, key in rows[:2]:
        f = (stages.get(key) or {}).get("failures")
        if f and f["failed"]:
            lines.append(f"\nwhy the {name.split(' (')[0]} fails ({f['failed']} of {f['images']} images): "
                         + ", ".join(f"{c.replace('shape:', '').replace('->', ' read as ')} {n}" for c, n in f["causes"].items()))
    fs, zs = stages.get("feature_stats"), stages.get("zero_shot")
    if fs:
        lines.append(f"\nfeatures, generated vs GT: mean shift {fs['mean_shift']:.2f} std, std ratio "
                     f"{fs['std_ratio']:.2f}, norm ratio {fs['norm_ratio']:.2f}")
    if zs:
        lines.append(f"toy CLIP zero-shot: shape {zs['shape']:.2f}, colour {zs['colour']:.2f}")
    vqa = stages.get("vqa")
    if vqa:
        base = vqa.get("majority_baseline", {})
        lines.append(f"toy VLM VQA accuracy {vqa['accuracy']:.3f} ("
                     + ", ".join(f"{c} {v:.2f}" for c, v in sorted(vqa["per_category"].items()))
                     + (f"; majority-answer baseline {base['accuracy']:.3f}" if base else "") + ")")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m blip3o.eval.toy_stages", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a toy-world output folder (clip/, decoder/, model/, score.json)")
    p.add_argument("--model", default=None, help="model dir (default RUN/model)")
    p.add_argument("--prompts", default="toy_data/eval/prompts.jsonl", help="the toy evaluation prompts")
    p.add_argument("--eval-limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--bank", type=int, default=4000, help="training scenes in the nearest-neighbour bank")
    p.add_argument("--decoder-steps", type=int, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    try:
        stages = run_stages(a.run, a.prompts, a.model, a.samples_per_prompt, a.bank, decoder_steps=a.decoder_steps,
                            limit=a.eval_limit)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(a.run, "stages.json").write_text(json.dumps(stages, indent=2))
    Path(a.run, "stages.md").write_text(table(stages) + "\n")
    print(table(stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
