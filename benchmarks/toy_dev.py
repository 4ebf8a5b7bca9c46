"""Sampling-time study of a trained toy generator on a *development* prompt set, never the evaluation prompts.

The development prompts are drawn from the toy grammar with seed 1 (``toy.eval_scenes(1, per_tag)``: streams
``(1, "eval", tag, i)``), which neither training (``(0, "train", i)``) nor the scored evaluation set (seed 0) uses,
so settings chosen here are not tuned on what ``bash run.sh`` reports. For each sampling variant it reports the
end-to-end toy score (through the run's decoder), the toy-CLIP rank of the generated features and their statistics
against the ground-truth features of the same scenes, beside the decoder's ceiling on those scenes.

    OMP_NUM_THREADS=2 python benchmarks/toy_dev.py outputs/toy --per-tag 24 --variants cfg:9 cfg:6 rescale:9:0.7
    # variants: cfg:G | rescale:G:PHI (CFG, then the x0 prediction's std pulled back towards the conditional one) |
    #           interval:G:LO:HI (CFG only for sigma in [LO, HI], conditional elsewhere) | steps suffix @N
    OMP_NUM_THREADS=2 python benchmarks/toy_dev.py outputs/toy --decoder-guidance 3   # the decoder's CFG (default: its own)
    OMP_NUM_THREADS=2 python benchmarks/toy_dev.py outputs/toy --checkpoint outputs/toy/model/checkpoint-1000
    # an earlier point of the generator (its EMA weights) through the run's final decoder: does it still improve?
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from blip3o.data import toy
from blip3o.eval.toy_stages import (_decode, _images_to_target, clip_rank_score, decoder_ceiling, feature_stats,
                                    judge)
from blip3o.models.targets import ToyClipModel
from blip3o.pipeline import Blip3oPipeline
from blip3o.sampling import zeroed_condition
from scripts.toy_curve import load_checkpoint


def dev_set(per_tag: int, seed: int = 1):
    scenes = toy.eval_scenes(seed, per_tag)
    return [toy.eval_row(s) for s in scenes], scenes


def parse(variant: str):
    body, _, steps = variant.partition("@")
    kind, *nums = body.split(":")
    return kind, [float(n) for n in nums], int(steps) if steps else None


@torch.no_grad()
def sample(model, prompts, variant: str, per: int, seed: int = 0) -> torch.Tensor:
    """The model's own sampler (``generate_features``); only the guidance interval is added here, by wrapping
    the predictor the Euler loop calls with the step's sigma."""
    kind, nums, steps = parse(variant)
    enc = model.tokenize_prompts(prompts)
    cond = model.encode_condition(enc["input_ids"], enc["attention_mask"]).repeat_interleave(per, 0)
    gens = [torch.Generator().manual_seed(seed + k) for _ in prompts for k in range(per)]
    guided = zeroed_condition(model._dit, cond, None)
    predict = guided
    if kind == "interval":  # CFG only for sigma in [lo, hi], the conditional prediction elsewhere
        lo, hi = nums[1], nums[2]

        def predict(x, t, scale, rescale, sigma):
            return guided(x, t, scale if lo <= sigma <= hi else 1.0, rescale, sigma)
    shape = (cond.shape[0], model.config.target_channels, *model.config.target_grid)
    x = model.objective.sample_from(predict, shape, cond.device, num_steps=steps or model.config.num_inference_steps,
                                    guidance_scale=nums[0], generator=gens,
                                    guidance_rescale=nums[1] if kind == "rescale" else 0.0)
    return model.denormalize_target(x.float())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--model", default=None)
    p.add_argument("--checkpoint", default=None,
                   help="a generator checkpoint dir (RUN/model/checkpoint-N) to sample instead of the final weights")
    p.add_argument("--per-tag", type=int, default=24)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["cfg:9"])
    p.add_argument("--decoder-steps", type=int, default=None, help="the decoder's sampling steps (default: its own)")
    p.add_argument("--decoder-guidance", type=float, default=None,
                   help="the decoder's CFG scale (default: its folder's default_guidance_scale)")
    p.add_argument("--out", default=None, help="JSON lines appended here")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    run = Path(a.run)
    pipe = Blip3oPipeline.from_pretrained(a.model or str(run / "model"), device="cpu")
    model = pipe.model
    if a.checkpoint:  # an earlier point of the run, through the run's final decoder
        try:
            load_checkpoint(model, Path(a.checkpoint))
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    rows, scenes = dev_set(a.per_tag)
    gt = _images_to_target(model.target_encoder, [toy.render(s) for s in scenes])
    clip = ToyClipModel.from_pretrained(str(run / "clip"))
    per = a.samples_per_prompt
    ceiling = decoder_ceiling(pipe, gt, rows, a.decoder_steps, guidance=a.decoder_guidance)
    print(f"dev set: {len(rows)} prompts; decoder ceiling {ceiling['overall']:.3f} {ceiling['tags']}", flush=True)
    for v in a.variants:
        t0 = time.time()
        feats = torch.cat([sample(model, [r["prompt"] for r in rows[i:i + 24]], v, per) for i in range(0, len(rows), 24)])
        ims = _decode(pipe, feats, 0, a.decoder_steps, a.decoder_guidance)
        e2e = judge(ims, rows, per)
        rank = clip_rank_score(clip, feats, rows, per)
        fs = feature_stats(feats, gt)
        rec = {"run": str(run), "checkpoint": a.checkpoint, "variant": v, "decoder_guidance": a.decoder_guidance,
               "e2e": e2e["overall"], "e2e_tags": e2e["tags"], "rank": rank["overall"], "rank_tags": rank["tags"],
               "ceiling": ceiling["overall"], **fs, "failures": e2e["failures"]["causes"],
               "ceiling_failures": ceiling["failures"]["causes"], "seconds": time.time() - t0,
               "load": os.getloadavg()[0]}
        print(f"{v:>22}: e2e {rec['e2e']:.3f} rank {rec['rank']:.3f} std {fs['std_ratio']:.2f} "
              f"shift {fs['mean_shift']:.2f} | " + " ".join(f"{k[:5]}={x:.2f}" for k, x in e2e["tags"].items()), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
