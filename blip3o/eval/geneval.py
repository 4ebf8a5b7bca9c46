"""GenEval-layout generation (also used by the toy world).

    python -m blip3o.eval.geneval CKPT --prompts geneval/evaluation_metadata.jsonl \
        --out outputs/geneval --n-samples 4 --seed 42
    torchrun --nproc_per_node=8 -m blip3o.eval.geneval CKPT --prompts ... --out ...   # sharded by rank

Writes GenEval's layout: ``OUT/{index:05d}/metadata.jsonl`` (the prompt's row), ``OUT/{index:05d}/samples/
{k:04d}.png`` and ``OUT/{index:05d}/grid.png``, plus ``OUT/generation_settings.json`` with the exact settings
(seed, guidance, steps, rewrite flag, checkpoint). ``--rewrite``: prompt rewriting by the model itself: the backbone
first writes a short description of what to draw (``Blip3oPipeline(..., reason=True)``), the queries read the
prompt plus that description, and it is saved as ``OUT/{index:05d}/reasoning.txt``. Prompt i gets seeds ``seed + k`` for its k-th sample, so
the output does not depend on the number of ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from blip3o.images import make_grid
from blip3o.pipeline import Blip3oPipeline


def read_prompt_rows(path: str) -> List[Dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    if not rows:
        raise ValueError(f"{p} has no prompts")
    for r in rows:
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise ValueError(f"{p}: every row needs a non-empty 'prompt'")
    return rows


def generate_geneval(pipe, rows: List[Dict], out: str, n_samples: int = 4, seed: int = 42, batch_size: int = 8,
                     guidance_scale: Optional[float] = None, num_inference_steps: Optional[int] = None,
                     decoder_guidance_scale: Optional[float] = None, rank: int = 0, world_size: int = 1,
                     progress: bool = True, rewrite: bool = False) -> int:
    """Generates the rows assigned to this rank (strided by index); returns the number of images."""
    out_p = Path(out)
    mine = [(i, r) for i, r in enumerate(rows) if i % world_size == rank]
    todo = [(i, r) for i, r in mine if not (out_p / f"{i:05d}" / "samples" / f"{n_samples - 1:04d}.png").is_file()]
    count = 0
    bar = tqdm(total=len(todo), desc=f"geneval[{rank}]", disable=not progress or rank != 0)
    per_batch = max(1, batch_size // n_samples)
    for start in range(0, len(todo), per_batch):
        chunk = todo[start:start + per_batch]
        gens = [__import__("torch").Generator().manual_seed(seed + k) for _ in chunk for k in range(n_samples)]
        res = pipe([r["prompt"] for _, r in chunk], num_images_per_prompt=n_samples, generator=gens,
                   guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                   decoder_guidance_scale=decoder_guidance_scale, reason=rewrite)
        for j, (i, r) in enumerate(chunk):
            d = out_p / f"{i:05d}"
            (d / "samples").mkdir(parents=True, exist_ok=True)
            (d / "metadata.jsonl").write_text(json.dumps(r) + "\n")
            if res.reasoning is not None:
                (d / "reasoning.txt").write_text(res.reasoning[j] + "\n")
            ims = res.images[j * n_samples:(j + 1) * n_samples]
            for k, im in enumerate(ims):
                im.save(d / "samples" / f"{k:04d}.png")
            make_grid(ims, cols=min(n_samples, 4)).save(d / "grid.png")
            count += len(ims)
        bar.update(len(chunk))
    bar.close()
    return count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--prompts", required=True, help="GenEval metadata JSONL (tag/include/prompt per line)")
    p.add_argument("--out", required=True)
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--decoder-guidance", type=float, default=None)
    p.add_argument("--rewrite", action="store_true", help="the backbone rewrites each prompt into an explicit description first (saved as reasoning.txt)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    a = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = a.device
    if device is None and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        rows = read_prompt_rows(a.prompts)
        pipe = Blip3oPipeline.from_pretrained(a.checkpoint, device=device, dtype=a.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not pipe.has_decoder():
        print(f"error: {a.checkpoint} has no pixel decoder; GenEval needs images", file=sys.stderr)
        return 2
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        settings = {"checkpoint": str(a.checkpoint), "prompts": a.prompts, "n_samples": a.n_samples, "seed": a.seed,
                    "guidance_scale": a.guidance or pipe.model.config.guidance_scale,
                    "num_inference_steps": a.steps or pipe.model.config.num_inference_steps,
                    "decoder_guidance_scale": a.decoder_guidance, "rewrite": a.rewrite, "world_size": world}
        (Path(a.out) / "generation_settings.json").write_text(json.dumps(settings, indent=2))
    n = generate_geneval(pipe, rows, a.out, a.n_samples, a.seed, a.batch_size, a.guidance, a.steps,
                         a.decoder_guidance, rank, world, rewrite=a.rewrite)
    print(f"rank {rank}: wrote {n} images to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
