"""DPG-Bench generation: one ``{name}.png`` per prompt, a 2x2 grid of 4 samples (the benchmark's convention).

    python -m blip3o.eval.dpg CKPT --prompts dpg_bench/prompts.jsonl --out outputs/dpg
    torchrun --nproc_per_node=8 -m blip3o.eval.dpg CKPT --prompts ... --out ...

Prompts are ``{"name", "prompt"}`` JSONL (or a folder of ``<name>.txt``). Settings go to
``OUT/generation_settings.json``. ``--rewrite``: the backbone first writes an explicit description of each prompt
(``Blip3oPipeline(..., reason=True)``), the queries read prompt + description, saved as ``OUT/{name}.reasoning.txt``.
Scoring (mPLUG VQA over DPG's questions) is external.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List

import torch
from tqdm.auto import tqdm

from blip3o.images import make_grid
from blip3o.pipeline import Blip3oPipeline


def read_dpg_prompts(path: str) -> List[Dict]:
    p = Path(path)
    if p.is_dir():
        rows = [{"name": f.stem, "prompt": f.read_text().strip()} for f in sorted(p.glob("*.txt"))]
    elif p.is_file():
        rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    else:
        raise FileNotFoundError(f"DPG prompts not found: {p}")
    if not rows:
        raise ValueError(f"{p} has no prompts")
    for r in rows:
        if not str(r.get("name", "")).strip() or not str(r.get("prompt", "")).strip():
            raise ValueError(f"{p}: every prompt needs a non-empty 'name' and 'prompt'")
    return rows


def generate_dpg(pipe, rows, out: str, seed: int = 42, n_samples: int = 4, guidance_scale=None,
                 num_inference_steps=None, rank: int = 0, world_size: int = 1, rewrite: bool = False) -> int:
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    done = 0
    for i, r in enumerate(tqdm(rows, desc=f"dpg[{rank}]", disable=rank != 0)):
        if i % world_size != rank or (out_p / f"{r['name']}.png").is_file():
            continue
        gens = [torch.Generator().manual_seed(seed + k) for k in range(n_samples)]
        res = pipe([r["prompt"]], num_images_per_prompt=n_samples, generator=gens, guidance_scale=guidance_scale,
                   num_inference_steps=num_inference_steps, reason=rewrite)
        if res.reasoning is not None:
            (out_p / f"{r['name']}.reasoning.txt").write_text(res.reasoning[0] + "\n")
        make_grid(res.images, cols=math.ceil(math.sqrt(n_samples))).save(out_p / f"{r['name']}.png")
        done += 1
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--prompts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rewrite", action="store_true", help="the backbone rewrites each prompt first (reasoning.txt)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    a = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        rows = read_dpg_prompts(a.prompts)
        pipe = Blip3oPipeline.from_pretrained(a.checkpoint, device=a.device, dtype=a.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "generation_settings.json").write_text(json.dumps(
            {"checkpoint": str(a.checkpoint), "prompts": a.prompts, "seed": a.seed, "n_samples": a.n_samples,
             "grid": "2x2" if a.n_samples == 4 else f"{a.n_samples} tiles",
             "guidance_scale": a.guidance or pipe.model.config.guidance_scale,
             "num_inference_steps": a.steps or pipe.model.config.num_inference_steps, "rewrite": a.rewrite},
            indent=2))
    n = generate_dpg(pipe, rows, a.out, a.seed, a.n_samples, a.guidance, a.steps, rank, world, rewrite=a.rewrite)
    print(f"rank {rank}: wrote {n} grids to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
