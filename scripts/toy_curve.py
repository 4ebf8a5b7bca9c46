"""Toy score versus training minutes, from the checkpoints of one toy-world run.

    # a 60-minute toy run that keeps a checkpoint every 250 steps (decoder and generator side by side) ...
    python scripts/toy_world.py --out outputs/toy60 train.max_minutes=60 train.save_steps=250 train.save_total_limit=0 \
        decoder.train.max_steps=50000 gen.train.max_steps=50000
    # ... scored at 5, 15, 30 and 60 minutes of training
    python scripts/toy_curve.py outputs/toy60 --minutes 5 15 30 60

For each budget T it takes the last decoder and generator checkpoints whose training time (``train_seconds``
in trainer_state.json, the clock ``train.max_minutes`` counts) is within T minutes, loads them (the generator's
EMA weights, as the final model would have), samples the evaluation prompts in GenEval layout exactly as
``scripts/toy_world.py`` does and scores them. With a constant learning rate (the toy configs) the T-minute
checkpoints are what a T-minute run would have produced. Each point also carries the decoder's ceiling at that
time (the evaluation scenes' ground-truth features through that checkpoint's decoder). Writes OUT/curve.json and
OUT/curve.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def checkpoints(run_dir: Path):
    """[(train_seconds, step, path)] of a training output dir's complete checkpoints, by time."""
    out = []
    for p in run_dir.glob("checkpoint-*"):
        state = p / "trainer_state.json"
        if (p / "COMPLETE").is_file() and state.is_file():
            s = json.loads(state.read_text())
            out.append((float(s.get("train_seconds", 0.0)), int(s["step"]), p))
    return sorted(out)


def pick(ckpts, minutes: float):
    """The last checkpoint trained for at most `minutes` (None if the run never saved that early)."""
    within = [c for c in ckpts if c[0] <= 60.0 * minutes + 1e-6]
    return within[-1] if within else None


def checkpoint_weights(ck: Path):
    """A checkpoint's trained tensors, its EMA weights where the run kept them (as save_final writes the model)."""
    from safetensors.torch import load_file

    sd = load_file(str(ck / "trainable.safetensors"))
    if (ck / "ema.safetensors").is_file():
        sd.update(load_file(str(ck / "ema.safetensors")))
    return sd


def load_checkpoint(module, ck: Path) -> None:
    """Loads `checkpoint_weights(ck)` into `module`; raises if a trained tensor is missing or one does not fit."""
    sd = checkpoint_weights(ck)
    missing = {n for n, p in module.named_parameters() if p.requires_grad} - set(sd)
    unexpected = module.load_state_dict(sd, strict=False).unexpected_keys
    if missing or unexpected:
        raise ValueError(f"{ck} does not fit the model (missing {sorted(missing)[:3]}, unexpected {unexpected[:3]})")


def load_pair(dec_ckpt: Path, gen_ckpt: Path):
    from blip3o.config import ExperimentConfig, apply_dict
    from blip3o.models.build import build_model
    from blip3o.pipeline import Blip3oPipeline
    from blip3o.train.distributed import DistInfo
    from blip3o.train.tasks import DecoderTask

    def cfg_of(ck: Path):
        return apply_dict(ExperimentConfig(), json.loads((ck / "trainer_state.json").read_text())["config"])

    dtask = DecoderTask(cfg_of(dec_ckpt), DistInfo())
    load_checkpoint(dtask.model, dec_ckpt)
    decoder = dtask.pipe
    decoder.denoiser.eval()
    model, _ = build_model(cfg_of(gen_ckpt).model)
    load_checkpoint(model, gen_ckpt)
    return Blip3oPipeline(model.eval(), decoder=decoder, device="cpu")


def plot(points, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    xs = [p["minutes"] for p in points]
    ax.plot(xs, [p["overall"] for p in points], "o-", label="overall", lw=2)
    if all("ceiling" in p for p in points):
        ax.plot(xs, [p["ceiling"] for p in points], "s-", label="decoder ceiling", lw=2, color="k")
    for tag in points[0]["tags"]:
        ax.plot(xs, [p["tags"][tag] for p in points], ".--", label=tag, alpha=0.7)
    ax.set_xlabel("training minutes (decoder and generator side by side)")
    ax.set_ylabel("toy score")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a scripts/toy_world.py output folder (decoder/ and model/ with checkpoints)")
    p.add_argument("--minutes", type=float, nargs="+", default=[5, 15, 30, 60])
    p.add_argument("--prompts", default=None, help="eval prompts (default: from the generator's config)")
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--out", default=None, help="default: RUN/curve")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N evaluation prompts")
    p.add_argument("--steps", type=int, default=None, help="sampling steps of the DiT and the decoder")
    p.add_argument("--guidance", type=float, default=None, help="generator CFG scale (default: the model's)")
    p.add_argument("--decoder-guidance", type=float, default=None, help="decoder CFG scale (default: the decoder's)")
    p.add_argument("--tag", default="", help="suffix of the samples folder and curve key (settings sweeps)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from blip3o.data import toy
    from blip3o.eval.geneval import generate_geneval, read_prompt_rows
    from blip3o.eval.toy import score_dir
    from blip3o.eval.toy_stages import _images_to_target, decoder_ceiling, eval_ground_truth

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    run = Path(a.run)
    dec, gen = checkpoints(run / "decoder"), checkpoints(run / "model")
    if not dec or not gen:
        print(f"error: {run} has no complete checkpoints under decoder/ and model/", file=sys.stderr)
        return 2
    out = Path(a.out or run / "curve")
    out.mkdir(parents=True, exist_ok=True)
    # points from earlier invocations stay (score 5 and 15 min while the run is still at 30, then the rest)
    points = json.loads((out / "curve.json").read_text()) if (out / "curve.json").is_file() else []
    scene_images = None  # the evaluation scenes, rendered once (the frozen target encodes them at each point)
    for m in a.minutes:
        d, g = pick(dec, m), pick(gen, m)
        if d is None or g is None:
            print(f"[{m:g} min] no checkpoint that early; skipped", flush=True)
            continue
        prompts = a.prompts or json.loads((g[2] / "trainer_state.json").read_text())["config"]["data"]["eval_prompts"]
        rows = read_prompt_rows(prompts)[: a.eval_limit]
        t = time.time()
        pipe = load_pair(d[2], g[2])
        if a.steps is not None:
            pipe.decoder.register_to_config(default_num_inference_steps=a.steps)
        samples = out / f"samples-{m:g}min{a.tag}"
        shutil.rmtree(samples, ignore_errors=True)
        generate_geneval(pipe, rows, str(samples), n_samples=a.samples_per_prompt, seed=0, batch_size=32,
                         num_inference_steps=a.steps, guidance_scale=a.guidance,
                         decoder_guidance_scale=a.decoder_guidance)
        s = score_dir(str(samples))
        # the decoder's ceiling at this point: the evaluation scenes' ground-truth features through this decoder
        if scene_images is None:
            scene_images = [toy.render(sc) for sc in eval_ground_truth(prompts, limit=a.eval_limit)[1]]
        ceiling = decoder_ceiling(pipe, _images_to_target(pipe.model.target_encoder, scene_images), rows, a.steps)
        point = {"minutes": m, "tag": a.tag, "guidance": a.guidance, "decoder_guidance": a.decoder_guidance,
                 "overall": s["overall"], "tags": s["tags"], "ceiling": ceiling["overall"],
                 "ceiling_tags": ceiling["tags"], "decoder_step": d[1],
                 "decoder_train_s": d[0], "generator_step": g[1], "generator_train_s": g[0],
                 "sample_s": time.time() - t}
        points = sorted([q for q in points if (q["minutes"], q.get("tag", "")) != (m, a.tag)] + [point],
                        key=lambda q: (q.get("tag", ""), q["minutes"]))
        print(f"[{m:g} min{a.tag}] decoder step {d[1]}, generator step {g[1]}: overall {s['overall']:.3f} "
              f"(decoder ceiling {ceiling['overall']:.3f}) "
              + " ".join(f"{k}={v:.2f}" for k, v in s["tags"].items()), flush=True)
        (out / "curve.json").write_text(json.dumps(points, indent=2))
    main_curve = [q for q in points if not q.get("tag")]  # sweeps (--tag) stay in curve.json only
    if main_curve:
        plot(main_curve, out / "curve.png")
    print(f"wrote {out}/curve.json, curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
