"""The paper's ablation grid on the toy world, at equal generator budgets: CLIP + flow, CLIP + MSE, SigLIP + flow,
VAE + flow (and the fusion baselines when their configs exist), each scored and measured for sample diversity.
The grid is configs/ablations/toy/*.yaml, one small file per variant (its generator config and overrides).

    # the full grid, 10 minutes of generator training per variant (what the claims are tested with)
    OMP_NUM_THREADS=1 python scripts/run_ablations.py --data toy_data --budget-min 10
    # the paper's two claims only, on a 2-thread box
    OMP_NUM_THREADS=2 python scripts/run_ablations.py --variants clip_flow,clip_mse,vae_flow --budget-min 15
    # a fixed number of steps instead of a time budget (smoke tests), overrides like scripts/toy_world.py
    python scripts/run_ablations.py --steps 3 --eval-limit 4 gen.train.per_device_train_batch_size=4 \
        decoder.train.max_steps=3 data.num_workers=0 --out /tmp/abl

Claims tested (BLIP3-o, sec. 4): CLIP + flow scores best; flow gives more diverse samples than MSE.

Stages
1. Prerequisites, trained once and cached under OUT/prereq/ by a signature of their inputs (config text,
   overrides, data folder): the toy CLIP (configs/toy_clip.yaml; ``clip.`` overrides), a pixel decoder per
   CLIP target (configs/toy_decoder.yaml with model.target=T),
   and the toy VAE (scripts/train_toy_vae.py) for vae_flow and the fusion variants. Their times are reported
   separately from the variants' budgets (a cached prerequisite reports the time it took when it was built).
2. Per variant, the generator (its config + overrides) trains for an equal budget of training time: the
   trainer stops itself after --budget-min minutes of training steps (train.max_minutes, constant LR), so a
   cheaper variant gets more steps in the same time. Start-up, checkpoint writes and evaluation are outside the
   budget; results record the steps reached, the median s/step and the wall time. The machine's load moves
   s/step, so compare variants from one run on one machine.
3. Evaluation with the EMA weights the trainer saved: the toy eval prompts (GenEval layout) scored by
   ``blip3o.eval.toy.score_dir`` (per tag + overall), and diversity: --div-prompts prompts x --div-seeds seeds,
   the mean over prompts of the mean pairwise RMS pixel distance between the samples of one prompt, in [0, 1]
   pixel units (0 = identical images); also the same distance between the generated features, in units of
   the target's per-channel std and divided by sqrt(2), so two unrelated images of the data would score about 1
   (what the generator alone contributes: an MSE generator is deterministic, so any pixel diversity it shows
   comes from the diffusion decoder's own noise).

Writes OUT/results.json, OUT/results.md (the table), OUT/ablations.png (score bars, score vs diversity) and
OUT/<variant>/{model/, samples/, grid.png, diversity.png, *.log}. Each variant's result is written as
soon as it is done, so an interrupted run keeps what it finished; a variant model trained from the same config
text, overrides and budget is reused unless --fresh.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

from scripts.ablation_report import write_report
from scripts.toy_world import train  # one training subprocess with its log; exits with the log's tail


# ----------------------------------------------------------------------------------------------------------
# variants
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """A generator config + overrides, and where its pixels come from.

    pixels: a CLIP target name ("toy_clip", "siglip"): a diffusion decoder trained on that target's features;
        or "vae": the trained toy VAE's own decoder (no diffusion decoder).
    """
    config: str
    overrides: Sequence[str] = ()
    pixels: str = "toy_clip"
    target: str = "toy_clip"
    objective: str = "flow"
    note: str = ""


# One small YAML per variant in configs/ablations/toy/ (the file name is the variant's name; the paper-scale
# configs are configs/ablations/*.yaml). The CLIP variants diffuse the toy CLIP's 8x8x32 grid
# (configs/toy_gen.yaml; the toy CLIP is a shared prerequisite, trained once); SigLIP (a random tiny tower) is
# pooled to the same 8x8 grid; the toy VAE keeps its own 8x8x16 latents (a VAE target is what it is:
# target_kwargs cleared).
VARIANT_DIR = ROOT / "configs" / "ablations" / "toy"


def load_variants(folder: Path = VARIANT_DIR) -> Dict[str, Variant]:
    """name -> Variant for every folder/*.yaml, in the grid's order (each file's ``order``, then its name)."""
    found = []
    for path in sorted(folder.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        order = spec.pop("order", float("inf"))
        spec["overrides"] = tuple(spec.get("overrides") or ())
        try:
            found.append((order, path.stem, Variant(**spec)))
        except TypeError as e:
            raise ValueError(f"{path.relative_to(ROOT)}: {e}") from None
    return {name: v for _, name, v in sorted(found, key=lambda t: t[:2])}


VARIANTS: Dict[str, Variant] = load_variants()

# how each CLIP target's decoder (and generators) select that target: the trained toy CLIP by its path
# (filled in at run time), a random tiny SigLIP by its pooling
DECODER_TARGET_KWARGS = {"siglip": "{grid: [8, 8]}"}
DEFAULT_VARIANTS = ",".join(VARIANTS)


def parse_variants(spec: str) -> List[str]:
    """'a,b,c' -> names, in order; an unknown name raises a one-line ValueError listing the known ones."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--variants: no variant given")
    for n in names:
        if n not in VARIANTS:
            raise ValueError(f"unknown variant '{n}'; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------


def mean_pairwise_distance(samples) -> float:
    """Mean over pairs (i < j) of the RMS difference between samples i and j.

    samples: a sequence of arrays of one shape (images as uint8 -> scaled to [0, 1]; PIL images accepted;
    float arrays are used as they are). Identical samples give 0; for [0, 1] images the result is in [0, 1].
    """
    arrs = []
    for s in samples:
        a = np.asarray(s)
        arrs.append(a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64))
    if len(arrs) < 2:
        raise ValueError("diversity needs at least 2 samples")
    d = [float(np.sqrt(np.mean((a - b) ** 2))) for a, b in itertools.combinations(arrs, 2)]
    return float(np.mean(d))


def read_metrics(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _sig(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------------------


def prereq_clip(out: Path, shards: str, overrides: List[str]) -> dict:
    """The toy CLIP (configs/toy_clip.yaml), trained once: the target of the CLIP variants and their decoder."""
    cfg = ROOT / "configs" / "toy_clip.yaml"
    ov = [f"data.train_shards={shards}", *overrides]
    d = out / "prereq" / f"toy_clip-{_sig(cfg.read_text(), ov)}"
    if (d / "zero_shot.json").is_file() and (d / "ablation_info.json").is_file():
        info = json.loads((d / "ablation_info.json").read_text())
        print(f"[prereq] toy CLIP: cached {d} (built in {info['train_s']:.0f}s)", flush=True)
        return dict(info, cached=True)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    print(f"[prereq] training the toy CLIP -> {d}", flush=True)
    s = train(str(cfg.relative_to(ROOT)), [*ov, f"train.output_dir={d}"], d.parent / f"{d.name}.log")
    recs = read_metrics(d / "metrics.jsonl")
    info = {"kind": "clip", "path": str(d), "train_s": s, "overrides": ov, "steps": recs[-1]["step"] if recs else None,
            "final_loss": recs[-1]["loss"] if recs else None, "zero_shot": json.loads((d / "zero_shot.json").read_text()),
            "cached": False}
    (d / "ablation_info.json").write_text(json.dumps(info, indent=2))
    return info


def target_overrides(target: str, clip_path: Optional[str]) -> List[str]:
    if target == "toy_clip":
        return ["model.target=toy_clip", f"model.target_path={clip_path}"]
    return [f"model.target={target}", f"model.target_kwargs={DECODER_TARGET_KWARGS[target]}"]


def prereq_decoder(target: str, out: Path, shards: str, overrides: List[str], clip_path: Optional[str] = None) -> dict:
    cfg = ROOT / "configs" / "toy_decoder.yaml"
    ov = [f"data.train_shards={shards}", *target_overrides(target, clip_path), *overrides]
    d = out / "prereq" / f"decoder-{target}-{_sig(cfg.read_text(), ov)}"
    info_p = d / "ablation_info.json"
    if (d / "model_index.json").is_file() and info_p.is_file():
        info = json.loads(info_p.read_text())
        info["cached"] = True
        print(f"[prereq] decoder for {target}: cached {d} (built in {info['train_s']:.0f}s)", flush=True)
        return info
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    print(f"[prereq] training the {target} decoder -> {d}", flush=True)
    s = train(str(cfg.relative_to(ROOT)), [*ov, f"train.output_dir={d}"], d.parent / f"{d.name}.log")
    recs = read_metrics(d / "metrics.jsonl")
    info = {"kind": "decoder", "target": target, "path": str(d), "train_s": s, "overrides": ov,
            "steps": recs[-1]["step"] if recs else None, "final_loss": recs[-1]["loss"] if recs else None,
            "cached": False}
    info_p.write_text(json.dumps(info, indent=2))
    return info


def prereq_vae(out: Path, data: Path, vae_args: List[str]) -> dict:
    import subprocess

    from scripts import train_toy_vae

    ns = train_toy_vae.build_parser().parse_args(["--data", str(data), *vae_args])  # the script's own defaults
    d = out / "prereq" / f"vae-{train_toy_vae.signature(ns)}"
    info_p = d / "train_info.json"
    if info_p.is_file() and (d / "model.safetensors").is_file():
        info = json.loads(info_p.read_text())
        print(f"[prereq] toy VAE: cached {d} (built in {info['train_s']:.0f}s)", flush=True)
        return dict(info, kind="vae", path=str(d), cached=True)
    print(f"[prereq] training the toy VAE -> {d}", flush=True)
    d.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    log = d.parent / f"{d.name}.log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_toy_vae.py"), "--data", str(data),
                            "--out", str(d), *vae_args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"toy VAE training failed (see {log}):\n{log.read_text()[-3000:]}")
    info = json.loads(info_p.read_text())
    return dict(info, kind="vae", path=str(d), wall_s=time.time() - t, cached=False)


def train_variant(name: str, v: Variant, vdir: Path, base_ov: List[str], budget_min: Optional[float],
                  fixed_steps: Optional[int], fresh: bool) -> dict:
    model_dir = vdir / "model"
    info_p = vdir / "train_info.json"
    # reused only if trained from the same config text, overrides and budget
    sig = _sig((ROOT / v.config).read_text(), base_ov, None if fixed_steps else budget_min, fixed_steps)
    if not fresh and (model_dir / "config.json").is_file() and info_p.is_file():
        info = json.loads(info_p.read_text())
        if info.get("signature") == sig:
            print(f"[{name}] reusing {model_dir} ({info['steps']} steps)", flush=True)
            return dict(info, reused=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    info: dict = {"budget_min": budget_min, "signature": sig}
    if fixed_steps is not None:
        budget = [f"train.max_steps={fixed_steps}", "train.max_minutes=0"]
        print(f"[{name}] training {fixed_steps} steps", flush=True)
    else:  # the trainer stops itself after budget_min minutes of training steps (train.max_minutes)
        budget = [f"train.max_minutes={budget_min}", "train.max_steps=1000000", "train.lr_scheduler_type=constant"]
        print(f"[{name}] training for {budget_min:g} min", flush=True)
    wall = train(v.config, [*base_ov, f"train.output_dir={model_dir}", *budget], vdir / "train.log")
    recs = read_metrics(model_dir / "metrics.jsonl")
    st = [r["step_time_s"] for r in recs if "step_time_s" in r]
    steps = recs[-1]["step"] if recs else fixed_steps
    info.update(steps=steps, train_wall_s=wall, train_min=wall / 60.0,
                s_per_step=statistics.median(st[1:] or st) if st else None,
                step_min=steps * statistics.median(st[1:] or st) / 60.0 if st else None,  # without start-up
                final_loss=recs[-1]["loss"] if recs else None, reused=False)
    info_p.write_text(json.dumps(info, indent=2))
    return info


def _feature_scale(model, f):
    """Per-channel std of the target features (the checkpoint's statistics when target_norm is on), shaped for f."""
    shape = (1, -1) + (1,) * (f.dim() - 2)
    std = getattr(model, "target_std", None)
    if std is not None and getattr(model.config, "target_norm", "none") != "none":
        return std.detach().float().cpu().view(shape).clamp_min(1e-6)
    return f.transpose(0, 1).flatten(1).std(dim=1).view(shape).clamp_min(1e-6)


def evaluate_variant(name: str, vdir: Path, rows: List[dict], div_rows: List[dict], samples_per_prompt: int,
                     div_seeds: int, sample_steps: Optional[int], batch_size: int) -> dict:
    from PIL import Image

    from blip3o.eval.geneval import generate_geneval
    from blip3o.eval.toy import score_dir
    from blip3o.pipeline import Blip3oPipeline
    from blip3o.images import make_grid

    pipe = Blip3oPipeline.from_pretrained(vdir / "model", device="cpu")
    if not pipe.has_decoder():
        raise RuntimeError(f"{vdir / 'model'} has no pixel path (no diffusion-decoder/ and target is not vae)")
    if sample_steps is not None and pipe.decoder is not None:
        pipe.decoder.register_to_config(default_num_inference_steps=sample_steps)
    samples = vdir / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    t = time.time()
    n = generate_geneval(pipe, rows, str(samples), n_samples=samples_per_prompt, seed=0, batch_size=batch_size,
                         num_inference_steps=sample_steps, progress=False)
    sample_s = time.time() - t
    score = score_dir(str(samples))
    tiles = [Image.open(samples / f"{i:05d}" / "samples" / "0000.png").convert("RGB")
             for i in range(min(16, len(rows)))]
    make_grid(tiles, cols=4).save(vdir / "grid.png")

    # Diversity: S seeds per prompt, distinct from the scoring seeds.
    t = time.time()
    pix, feat, tiles = [], [], []
    for r in div_rows:
        res = pipe([r["prompt"]], num_images_per_prompt=div_seeds, seed=10_000, num_inference_steps=sample_steps)
        ims = [np.asarray(im.convert("RGB")) for im in res.images]
        pix.append(mean_pairwise_distance(ims))
        f = res.features.float()
        f = f / _feature_scale(pipe.model, f)
        feat.append(mean_pairwise_distance([x.numpy() for x in f]) / np.sqrt(2.0))
        tiles += res.images
    div_s = time.time() - t
    make_grid(tiles, cols=div_seeds).save(vdir / "diversity.png")
    return {"score": score["overall"], "tags": score["tags"], "images": score.get("images", n),
            "sample_s": sample_s, "sample_s_per_img": sample_s / max(n, 1),
            "diversity_pixel": float(np.mean(pix)), "diversity_pixel_per_prompt": pix,
            "diversity_feature_rel": float(np.mean(feat)), "diversity_s": div_s,
            "div_prompts": [r["prompt"] for r in div_rows], "div_seeds": div_seeds}


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value for every training; decoder.key=value for the "
                   "decoders only, gen.key=value for the generators only")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", default="outputs/ablations")
    p.add_argument("--data", default="toy_data")
    p.add_argument("--num", type=int, default=20000, help="toy training samples to generate if --data is missing")
    p.add_argument("--budget-min", type=float, default=10.0, help="generator training minutes per variant")
    p.add_argument("--steps", type=int, default=None, help="fixed generator steps instead of --budget-min")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N eval prompts")
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--div-prompts", type=int, default=8)
    p.add_argument("--div-seeds", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=None, help="DiT and decoder sampling steps (config default)")
    p.add_argument("--batch-size", type=int, default=32, help="sampling batch")
    p.add_argument("--vae-args", default="", help="extra arguments for scripts/train_toy_vae.py, e.g. '--steps 400'")
    p.add_argument("--fresh", action="store_true", help="retrain the variants (prerequisites stay cached)")
    a = p.parse_args(argv)
    try:
        names = parse_variants(a.variants)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.steps is None and a.budget_min <= 0:
        print("error: --budget-min must be > 0 (or pass --steps)", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import blip3o  # noqa: F401
    import torch

    from blip3o.data.toy import write_toy_dataset
    from blip3o.eval.geneval import read_prompt_rows

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    stage = ("clip.", "decoder.", "gen.")
    both = [o for o in a.overrides if not o.startswith(stage)]
    clip_ov, dec_ov, gen_ov = ([*both, *(o[len(p):] for o in a.overrides if o.startswith(p))] for p in stage)
    out, data = (ROOT / a.out).resolve(), (ROOT / a.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prompts = data / "eval" / "prompts.jsonl"
    if not prompts.is_file():
        print(f"[data] writing {a.num} toy samples to {data}", flush=True)
        write_toy_dataset(str(data), num=a.num, seed=0)
    shards = str(data / "train")
    rows = read_prompt_rows(str(prompts))[: a.eval_limit]
    all_rows = read_prompt_rows(str(prompts))
    k = min(a.div_prompts, len(all_rows))
    div_rows = [all_rows[int(i)] for i in np.linspace(0, len(all_rows) - 1, k).round().astype(int)]  # across tags

    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "budget": (f"{a.steps} steps per variant" if a.steps
               else f"{a.budget_min:g} min of generator training per variant"),
               "budget_min": a.budget_min if a.steps is None else None, "fixed_steps": a.steps,
               "eval_prompts": len(rows), "samples_per_prompt": a.samples_per_prompt, "div_prompts": k,
               "div_seeds": a.div_seeds, "sample_steps": a.sample_steps, "threads": torch.get_num_threads(),
               "overrides": a.overrides, "data": str(data), "prereqs": {}, "variants": []}
    failed = False
    vae_info = None
    for name in names:
        v = VARIANTS[name]
        rec = {"name": name, "config": v.config, "overrides": list(v.overrides), "target": v.target,
               "objective": v.objective, "pixels": v.pixels}
        if not (ROOT / v.config).is_file():
            msg = f"{v.config} does not exist yet"
            print(f"[{name}] skipped: {msg}", flush=True)
            results["variants"].append(dict(rec, status="skipped", message=msg))
            write_report(out, results)
            continue
        vdir = out / name
        vdir.mkdir(parents=True, exist_ok=True)
        try:
            ov = [f"data.train_shards={shards}", f"data.eval_prompts={prompts}", *v.overrides]
            if v.pixels == "vae":
                if vae_info is None:
                    vae_info = prereq_vae(out, data, a.vae_args.split())
                    results["prereqs"]["toy_vae"] = vae_info
                ov.append(f"model.target_path={vae_info['path']}")
            else:
                clip_path = None
                if v.pixels == "toy_clip":
                    if "toy_clip" not in results["prereqs"]:
                        results["prereqs"]["toy_clip"] = prereq_clip(out, shards, clip_ov)
                    clip_path = results["prereqs"]["toy_clip"]["path"]
                    ov.append(f"model.target_path={clip_path}")
                key = f"decoder_{v.pixels}"
                if key not in results["prereqs"]:
                    results["prereqs"][key] = prereq_decoder(v.pixels, out, shards, dec_ov, clip_path)
                ov.append(f"model.decoder_path={results['prereqs'][key]['path']}")
            ov += gen_ov
            rec.update(train_variant(name, v, vdir, ov, a.budget_min, a.steps, a.fresh))
            saved = vdir / "model" / "config.json"  # what was trained (a fusion config picks its own target)
            if saved.is_file():
                sc = json.loads(saved.read_text())
                rec.update(target=sc.get("target", rec["target"]), objective=sc.get("objective", rec["objective"]))
            rec.update(evaluate_variant(name, vdir, rows, div_rows, a.samples_per_prompt, a.div_seeds,
                                        a.sample_steps, a.batch_size))
            rec["status"] = "ok"
            print(f"[{name}] score {rec['score']:.3f} diversity px {rec['diversity_pixel']:.3f} "
                  f"feat {rec['diversity_feature_rel']:.3f}; {rec['steps']} steps in {rec['train_min']:.1f} min",
                  flush=True)
        except (Exception, SystemExit) as e:  # one failed variant must not lose the others
            failed = True
            msg = str(e).strip().splitlines()
            rec.update(status="failed", message=(msg[0] if msg else type(e).__name__)[:200])
            (vdir / "error.txt").write_text(str(e))
            print(f"[{name}] FAILED: {e}", file=sys.stderr, flush=True)
        results["variants"].append(rec)
        write_report(out, results)
    write_report(out, results)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, ablations.png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
