"""The toy world end to end on CPU: toy shards -> decoder (reconstruction) -> queries + DiT on captions ->
samples of the evaluation prompts -> pixel score. This is what ``bash run.sh`` runs with no arguments.

    python scripts/toy_world.py                                # defaults (configs/toy_decoder.yaml, configs/toy_gen.yaml)
    python scripts/toy_world.py train.max_steps=3              # plain overrides go to both training runs
    python scripts/toy_world.py clip.train.max_steps=20 decoder.train.max_steps=50 gen.train.max_steps=100 --out outputs/toy2
    python scripts/toy_world.py --budget-minutes 20            # a longer run; --budget-minutes 0: the configs' max_minutes
    python scripts/toy_world.py --vlm --out outputs/toy_vlm    # + the toy VLM, frozen under the generator; VQA in the table

Stages: the toy CLIP (configs/toy_clip.yaml, both cores), with --vlm the toy VLM (scripts/toy_vlm.py, both cores;
its backbone then replaces the generator's random one), then the decoder and the generator side by side (one
core each; the one that finishes first hands its core to the other), both targeting the CLIP's frozen image tower,
for what the wall-clock budget (--budget-minutes, 14) leaves after the data and the CLIP, less a reserve for
sampling. Writes OUT/clip/ (the toy CLIP), OUT/decoder/ (a decoder dir), OUT/model/ (a self-contained model dir
with diffusion-decoder/), OUT/samples/ (GenEval layout), OUT/score.json, OUT/grid.png, OUT/loss.png and
OUT/timings.json.
Stages whose output already exists are skipped (delete the folder, or pass --fresh, to redo them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(config: str, overrides, log: Path, threads: int):
    """Launch one training stage as its own process (its stdout/stderr go to `log`)."""
    cmd = [sys.executable, "-m", "blip3o.train", str(ROOT / config), *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.STDOUT, stdout=open(log, "w"), env=env), time.time()


def wait(proc, started: float, log: Path) -> float:
    if proc.wait() != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"training failed (see {log}):\n{tail}")
    return time.time() - started


def train(config: str, overrides, log: Path, threads: int = 1) -> float:
    return wait(*start(config, overrides, log, threads), log)


def attach_decoder(model_dir: Path, dec_dir: Path) -> None:
    """Copy the decoder into the model folder as diffusion-decoder/ (what save_final does when the generator
    is trained with model.decoder_path), so the model dir is self-contained."""
    dst = model_dir / "diffusion-decoder"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(dec_dir, dst)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["decoder_path"] = "diffusion-decoder"
    cfg_path.write_text(json.dumps(cfg, indent=2))


# Seconds kept for what follows training (model saving, sampling the 96 images, the stage table): 40-65 s measured
# on a fast and a slow 2-core box (benchmarks/toy_world.md), with room to spare.
RESERVE_S = 75.0
# The generator stops this much earlier than the decoder, whose UNet gains more from the core it hands over.
GENERATOR_LEAD_MIN = 0.5


def stage_minutes(budget_min: float, elapsed_s: float, parallel: bool, dec_ov, gen_ov):
    """(decoder, generator) train.max_minutes that fit the run into `budget_min`, given the seconds already spent
    on data and the toy CLIP; (None, None) when the budget is off, the stages run in a row, or an override sets a
    stage's max_minutes itself. A faster box gets more minutes, a slower one fewer: the budget is the wall clock."""
    if budget_min <= 0 or not parallel:
        return None, None
    if any(o.startswith("train.max_minutes=") for o in (*dec_ov, *gen_ov)):
        return None, None
    left = (budget_min * 60 - elapsed_s - RESERVE_S) / 60
    if left < 2 * GENERATOR_LEAD_MIN:
        raise SystemExit(f"--budget-minutes {budget_min}: the data and the toy CLIP took {elapsed_s:.0f} s, which "
                         "leaves no time to train; raise the budget or pass train.max_minutes=M")
    return left, left - GENERATOR_LEAD_MIN


def cache_complete(cache: Path, shard_dir: Path) -> bool:
    """Whether scripts/cache_targets.py finished `cache` for every shard of `shard_dir` (it writes each shard whole,
    under its final name only when done)."""
    return (cache / "signature.json").is_file() and all(
        (cache / s.name).is_file() for s in shard_dir.glob("*.tar"))


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there configs/toy_decoder.yaml's bf16 autocast
    runs the UNet 1.25-1.5x faster; elsewhere bf16 is emulated and slower than fp32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def loss_plot(runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5))
    for ax, (name, metrics) in zip(axes if len(runs) > 1 else [axes], runs):
        recs = [json.loads(l) for l in Path(metrics).read_text().splitlines()] if Path(metrics).is_file() else []
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default="outputs/toy")
    p.add_argument("--data", default="toy_data")
    p.add_argument("--num", type=int, default=20000, help="toy training samples to generate")
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="retrain even if outputs exist")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N evaluation prompts")
    p.add_argument("--steps", type=int, default=None, help="sampling steps of the DiT and the decoder")
    p.add_argument("--bank", type=int, default=4000, help="training scenes for the stage table's nearest-neighbour score")
    p.add_argument("--budget-minutes", type=float, default=14.0,
                   help="wall-clock budget of the whole run: the decoder and the generator get what the data and the "
                        "toy CLIP leave of it, less a reserve for sampling and scoring (0: the configs' max_minutes)")
    p.add_argument("--vlm", action="store_true",
                   help="train the toy VLM first (scripts/toy_vlm.py, OUT/vlm) and freeze its backbone under the "
                        "generator; its VQA accuracy joins the stage table")
    p.add_argument("--vlm-minutes", type=float, default=4.0, help="the toy VLM's training minutes (with --vlm)")
    p.add_argument("--sequential", action="store_true",
                   help="train the decoder, then the generator (default: side by side when there are 2+ cores)")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    stage = ("clip.", "decoder.", "gen.", "vlm.")
    both = [o for o in a.overrides if not o.startswith(stage)]
    clip_ov, dec_ov, gen_ov = ([*both, *(o[len(p):] for o in a.overrides if o.startswith(p))] for p in stage[:3])
    out, data = (ROOT / a.out).resolve(), (ROOT / a.data).resolve()
    if a.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.time()

    import blip3o  # noqa: F401
    from blip3o.data.toy import write_toy_dataset

    if not (data / "eval" / "prompts.jsonl").is_file():
        t = time.time()
        write_toy_dataset(str(data), num=a.num, seed=0)
        timings["data_s"] = time.time() - t
    shards = f"data.train_shards={data / 'train'}"
    prompts = data / "eval" / "prompts.jsonl"

    # Stage 1, the toy CLIP: its frozen image tower is the target of both later stages, so it trains first,
    # alone, on every core.
    clip_dir, dec_dir, model_dir = out / "clip", out / "decoder", out / "model"
    if not (clip_dir / "text_tower.safetensors").is_file():
        timings["clip_train_s"] = train("configs/toy_clip.yaml", [shards, f"train.output_dir={clip_dir}", *clip_ov],
                                        out / "clip.log", threads=int(os.environ["OMP_NUM_THREADS"]))
    target = f"model.target_path={clip_dir}"

    # Optional, the toy VLM: the tiny backbone trained on toy questions (joint recipe), then frozen under the
    # generator in place of the random one; on every core, before the two stages below.
    if a.vlm:
        vlm_dir = out / "vlm"
        if not (vlm_dir / "vqa.json").is_file():
            t = time.time()
            cmd = [sys.executable, str(ROOT / "scripts" / "toy_vlm.py"), "--out", str(vlm_dir), "--data", str(data),
                   "--vqa", str(data.parent / (data.name + "_vqa")), f"train.max_minutes={a.vlm_minutes}",
                   *(o[len("vlm."):] for o in a.overrides if o.startswith("vlm."))]
            print("$", " ".join(cmd[1:]), flush=True)
            if subprocess.call(cmd, cwd=ROOT) != 0:
                raise SystemExit("the toy VLM stage failed (see the lines above)")
            timings["vlm_s"] = time.time() - t
        gen_ov = [f"model.backbone_path={vlm_dir / 'backbone'}", *gen_ov]

    # The decoder learns from the target encoder's features of real images and the generator from the
    # captions, so neither needs the other: on 2+ cores they train side by side, one thread each (small
    # tensors scale poorly across threads, so two 1-thread processes beat two 2-thread stages in a row).
    parallel = not a.sequential and (os.cpu_count() or 1) >= 2
    threads = 1 if parallel else int(os.environ["OMP_NUM_THREADS"])
    dec_min, gen_min = stage_minutes(a.budget_minutes, time.time() - t0, parallel, dec_ov, gen_ov)
    dec_ov = [*([f"train.max_minutes={dec_min:.2f}"] if dec_min else []), *dec_ov]
    gen_ov = [*([f"train.max_minutes={gen_min:.2f}"] if gen_min else []), *gen_ov]
    if dec_min:
        timings["stage_minutes"] = {"decoder": round(dec_min, 2), "generator": round(gen_min, 2)}
    if not any(o.startswith("train.mixed_precision=") for o in dec_ov) and not native_bf16():
        dec_ov = ['train.mixed_precision="no"', *dec_ov]  # quoted: YAML reads a bare no as false
        print("no native bf16 on this CPU: the decoder trains in fp32", flush=True)
    if not any(o.startswith("train.compile=") for o in gen_ov) and not shutil.which(os.environ.get("CXX", "g++")) \
            and not shutil.which("clang++"):
        gen_ov = ["train.compile=no", *gen_ov]  # inductor builds its kernels with a C++ compiler
        print("no C++ compiler (g++, clang++ or $CXX): the generator's DiT trains uncompiled", flush=True)
    jobs = []
    if not (dec_dir / "model_index.json").is_file():
        jobs.append(("decoder_train_s", "configs/toy_decoder.yaml",
                     [shards, target, f"train.output_dir={dec_dir}", *dec_ov], out / "decoder.log"))
    # The generator reads the toy CLIP's features of its training images from a cache written once (beside the
    # decoder's first minute, on the other core) instead of decoding and encoding every image at every step.
    cache, caching = clip_dir / "x0_cache", None
    if not (model_dir / "model.safetensors").is_file():
        if not any(o.startswith("data.use_cache=") for o in gen_ov):
            gen_ov = [f"data.cache_dir={cache}", "data.use_cache=true", *gen_ov]
            if not cache_complete(cache, data / "train"):
                caching = [sys.executable, str(ROOT / "scripts" / "cache_targets.py"), str(data / "train"),
                           "--target-dir", str(clip_dir), "--out", str(cache), "--batch-size", "256"]
        jobs.append(("generator_train_s", "configs/toy_gen.yaml",
                     [shards, target, f"data.eval_prompts={prompts}", f"train.output_dir={model_dir}", *gen_ov],
                     out / "generator.log"))
    threads_file = out / "threads"
    threads_file.unlink(missing_ok=True)
    os.environ["BLIP3O_THREADS_FILE"] = str(threads_file)
    t_train = time.time()
    if parallel:
        gen_job = next((j for j in jobs if j[0] == "generator_train_s"), None)
        cache_proc = None
        if caching and gen_job:
            print("$", " ".join(caching[1:]), flush=True)
            cache_proc = subprocess.Popen(caching, cwd=ROOT, stdout=open(out / "cache.log", "w"),
                                          stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        running = [(key, log, *start(cfg, ov, log, threads)) for key, cfg, ov, log in jobs
                   if cache_proc is None or key != "generator_train_s"]
        try:
            pending = list(running)
            while pending or cache_proc is not None:
                if cache_proc is not None and cache_proc.poll() is not None:
                    if cache_proc.returncode != 0:
                        raise SystemExit(f"caching the toy CLIP's features failed (see {out / 'cache.log'}):\n"
                                         + (out / "cache.log").read_text()[-3000:])
                    timings["cache_s"] = time.time() - t_train
                    cache_proc = None
                    key, cfg, ov, log = gen_job
                    if gen_min:  # it still ends when the plan said: the cache came out of its minutes
                        ov = [f"train.max_minutes={gen_min - timings['cache_s'] / 60:.2f}",
                              *(o for o in ov if not o.startswith("train.max_minutes="))]
                    r = (key, log, *start(cfg, ov, log, threads))
                    running.append(r)
                    pending.append(r)
                done = [r for r in pending if r[2].poll() is not None]
                for key, log, proc, started in done:
                    timings[key] = wait(proc, started, log)
                    pending.remove((key, log, proc, started))
                    # hand its core on (blip3o/train/trainer.py reads the file between steps): the decoder's
                    # UNet runs 1.5-1.8x faster on two threads, the generator's small DiT 1.2x, so the
                    # generator gets the shorter budget and the decoder the freed core
                    if pending:
                        threads_file.write_text(os.environ["OMP_NUM_THREADS"])
                        timings.setdefault("handover_s", time.time() - t_train)
                if pending or cache_proc is not None:
                    time.sleep(0.5)
        finally:  # one stage failed (or Ctrl-C): do not leave the other training behind
            for proc in [r[2] for r in running] + ([cache_proc] if cache_proc is not None else []):
                if proc.poll() is None:
                    proc.terminate()
    else:
        if caching and jobs:
            t = time.time()
            if subprocess.call(caching, cwd=ROOT) != 0:
                raise SystemExit("caching the toy CLIP's features failed (see the lines above)")
            timings["cache_s"] = time.time() - t
        for key, cfg, ov, log in jobs:
            timings[key] = train(cfg, ov, log, threads)
    if jobs:
        attach_decoder(model_dir, dec_dir)
    timings["train_wall_s"] = time.time() - t0 - timings.get("data_s", 0.0)

    t = time.time()
    import torch

    from blip3o.eval.geneval import generate_geneval, read_prompt_rows
    from blip3o.eval.toy import score_dir
    from blip3o.pipeline import Blip3oPipeline
    from blip3o.images import make_grid

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    pipe = Blip3oPipeline.from_pretrained(model_dir, device="cpu")
    rows = read_prompt_rows(str(prompts))[: a.eval_limit]
    samples = out / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    if a.steps is not None and pipe.decoder is not None:
        pipe.decoder.register_to_config(default_num_inference_steps=a.steps)  # its default when none is passed
    generate_geneval(pipe, rows, str(samples), n_samples=a.samples_per_prompt, seed=0, batch_size=32,
                     num_inference_steps=a.steps)
    timings["sample_s"] = time.time() - t
    t = time.time()
    score = score_dir(str(samples))
    timings["score_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    score["timings"] = timings
    (out / "score.json").write_text(json.dumps(score, indent=2))
    t = time.time()
    from blip3o.eval.toy_stages import run_stages, table

    stages = run_stages(str(out), str(prompts), samples_per_prompt=a.samples_per_prompt, limit=a.eval_limit,
                        decoder_steps=a.steps, bank=a.bank, pipe=pipe)
    (out / "stages.json").write_text(json.dumps(stages, indent=2))
    (out / "stages.md").write_text(table(stages) + "\n")
    timings["stages_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    from PIL import Image

    tiles = [Image.open(samples / f"{i:05d}" / "samples" / "0000.png").convert("RGB") for i in range(min(16, len(rows)))]
    make_grid(tiles, cols=4).resize((4 * 128, ((len(tiles) + 3) // 4) * 128), Image.NEAREST).save(out / "grid.png")
    loss_plot([("toy CLIP", clip_dir / "metrics.jsonl"), ("decoder", dec_dir / "metrics.jsonl"),
               ("generator", model_dir / "metrics.jsonl")], out / "loss.png")
    print(table(stages))
    print(f"toy score {score['overall']:.3f} " + " ".join(f"{k}={v:.2f}" for k, v in score["tags"].items()))
    print(f"wrote {out}/score.json, grid.png, loss.png; stage times: " +
          ", ".join(f"{k}={v:.0f}s" for k, v in timings.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
