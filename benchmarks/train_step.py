"""Training step time: the full entry point (``python -m blip3o.train``) vs. a bare forward/backward/AdamW loop on
the same model and batches, for the ``tiny`` and ``small`` DiT presets and the toy config, by batch size and by
process count.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py                      # ~20 min on a loaded 2-core box
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --quick               # 2 rows, ~3 min
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --markdown benchmarks/train_step.md

What is measured (each configuration in fresh processes, so peak RSS is per configuration):

* **bare (fixed batch)**: the task's model built exactly as the trainer builds it, one batch taken from the real
  loader and run through the frozen target encoder once, then ``loss = model(**batch).loss; loss.backward();
  AdamW.step(); zero_grad()`` in a loop: model compute only.
* **bare + data**: the same loop, but every step takes a new batch from the same loader and runs the frozen
  target encoder on it (``task.to_device``), as training must. The two bare loops alternate step by step in one
  process, so they see the same machine load.
* **entry point**: ``python -m blip3o.train [configs/toy.yaml] preset=tiny ...`` (or under ``torchrun``) on the
  same data, checkpoints and sampling off. It adds to "bare + data": the non-finite check, ``loss.item()``,
  gradient clipping, the LR scheduler, EMA (toy config), logging, the progress bar and, under torchrun, DDP.

Two clocks. **CPU time per step** is the robust one on a shared machine: every process is single-threaded
(OMP_NUM_THREADS=1, data.num_workers=0), so the CPU seconds a step burns barely depend on what else runs.
For the bare loops it is ``time.process_time()`` per step; for the entry point it is differential: the
process tree's CPU time (RUSAGE_CHILDREN) of a run of ``warmup + N`` steps minus that of a run of ``warmup``
steps, over N (start-up, model build and the final save cancel out; N is chosen so the difference is >= ~10 s
of CPU). **Wall time per step** (median; for the entry point ``batch x world / samples_per_s`` from
metrics.jsonl with logging_steps=1) is what a user sees, but it moves with the load average.

Overheads (CPU): ``framework = entry / (bare + data) - 1`` (what the trainer adds around the same work) and
``vs floor = entry / bare - 1`` (data loading + target encoding + trainer).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (YAML or None, overrides). tiny/small: the `tiny` experiment preset (tiny frozen Qwen2.5-VL, tiny
# EVA-CLIP target, 64 queries, fp32) with the tiny (dim 64, 2 layers) or small (dim 256, 4 layers) DiT preset;
# toy: configs/toy.yaml as it stands (its own DiT sizes, 16 queries, EMA, channel-normalised targets).
MODELS = {
    "tiny": (None, ["preset=tiny", "model.dit_preset=tiny"]),
    "small": (None, ["preset=tiny", "model.dit_preset=small"]),
    "toy": (str(ROOT / "configs" / "toy.yaml"), []),
}
MIN_DIFF_CPU_S = 10.0  # CPU seconds the measured steps of an entry-point run should add over its start-up


def _env():
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("BLIP3O_CACHE", str(ROOT / ".cache" / "blip3o"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _overrides(data: Path, name: str, batch: int, steps: int):
    return [*MODELS[name][1], f"data.train_shards={data / 'train'}",
            f"data.eval_prompts={data / 'eval' / 'prompts.jsonl'}", f"train.per_device_train_batch_size={batch}",
            f"train.max_steps={steps}", "train.logging_steps=1", "train.save_steps=0", "train.sample_steps=0",
            "data.num_workers=0"]


def _load() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------------------------
def bare_child(args) -> None:
    """Runs in its own process: builds the model like the trainer and times the bare loops; prints one JSON line."""
    import blip3o  # noqa: F401  (torchvision shim before transformers)
    import torch

    from blip3o.config import load_config
    from blip3o.train.distributed import DistInfo
    from blip3o.train.tasks import get_task

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(args.config or None, args.overrides)
    t = cfg.train
    torch.manual_seed(t.seed)
    task = get_task(t.task)(cfg, DistInfo())
    model = task.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2))
    it = iter(task.build_loader(0, 1, t.seed))
    dev = torch.device("cpu")

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    fixed = task.to_device(next(it), dev)
    res = {"trainable_params": sum(p.numel() for p in params),
           "total_params": sum(p.numel() for p in model.parameters())}
    rec = {k: [] for k in ("bare_fixed", "bare_data", "bare_fixed_cpu", "bare_data_cpu")}
    for i in range(args.warmup + args.measure):
        w0, c0 = time.perf_counter(), time.process_time()
        step(fixed)
        w1, c1 = time.perf_counter(), time.process_time()
        step(task.to_device(next(it), dev))
        w2, c2 = time.perf_counter(), time.process_time()
        if i >= args.warmup:
            rec["bare_fixed"].append(w1 - w0)
            rec["bare_data"].append(w2 - w1)
            rec["bare_fixed_cpu"].append(c1 - c0)
            rec["bare_data_cpu"].append(c2 - c1)
    res.update({k: statistics.median(v) for k, v in rec.items()})
    res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------------------------
_WRAPPER = ("import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:]).returncode\n"
            "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print('USAGE', u.ru_maxrss, u.ru_utime + u.ru_stime, flush=True)\n"
            "sys.exit(r)\n")


def run_bare(data, name, batch, warmup, measure):
    cmd = [sys.executable, __file__, "--bare-child", "--config", MODELS[name][0] or "", "--warmup", str(warmup),
           "--measure", str(measure), "--", *_overrides(data, name, batch, 1)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"bare run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def run_entry(data, out, name, batch, steps, warmup, nproc):
    """One entry-point run. nproc 0: plain `python -m blip3o.train`; else torchrun --standalone."""
    launcher = [sys.executable, "-m", "blip3o.train"] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "blip3o.train"]
    cmd = [sys.executable, "-c", _WRAPPER, *launcher, *([MODELS[name][0]] if MODELS[name][0] else []),
           *_overrides(data, name, batch, steps), f"train.output_dir={out}"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"entry point failed ({name} bs {batch} nproc {nproc}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rss_kb, cpu = [l.split()[1:] for l in p.stdout.splitlines() if l.startswith("USAGE")][-1]
    world = max(nproc, 1)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["step"] > warmup] or recs
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": statistics.median(batch * world / r["samples_per_s"] for r in steady),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
            "rss_mb": int(rss_kb) / 1024, "cpu_s": float(cpu), "process_wall_s": wall, "world": world}


def entry_pair(data, tmp, name, batch, warmup, measure, nproc):
    """A long and a short run: wall per step from the long one, CPU per step from their difference."""
    short = run_entry(data, tmp / "short", name, batch, warmup, warmup, nproc)
    long = run_entry(data, tmp / "long", name, batch, warmup + measure, warmup, nproc)
    return dict(long, cpu=(long["cpu_s"] - short["cpu_s"]) / measure, measure=measure,
                rss_mb=max(long["rss_mb"], short["rss_mb"]))


# ------------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--measure", type=int, default=20, help="bare-loop steps (entry point: more if cheap)")
    p.add_argument("--quick", action="store_true", help="tiny bs 8 and small bs 16 only")
    p.add_argument("--markdown", help="write the tables to this file")
    p.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare_child:
        return bare_child(args)

    from blip3o.data.toy import write_toy_dataset

    tmp = Path(tempfile.mkdtemp(prefix="train_step_"))
    data = tmp / "toy"
    write_toy_dataset(str(data), num=2000, seed=0, shard_size=250)
    load_start = _load()
    started = time.time()

    single = [("tiny", 8), ("tiny", 16), ("tiny", 32), ("tiny", 64), ("small", 16), ("small", 32), ("small", 64),
              ("toy", 64)]
    procs = [("tiny", 32), ("small", 32)]  # torchrun 1 vs 2 processes (per-rank batch fixed)
    if args.quick:
        single, procs = [("tiny", 8), ("small", 16)], []
    rows, prow, step_cpu = [], [], {}
    for name, batch in single:
        la = _load()
        b = run_bare(data, name, batch, args.warmup, args.measure)
        n = max(args.measure, math.ceil(MIN_DIFF_CPU_S / b["bare_data_cpu"]))
        step_cpu[(name, batch)] = b["bare_data_cpu"]
        e = entry_pair(data, tmp, name, batch, args.warmup, n, nproc=0)
        rows.append({"model": name, "batch": batch, "load": (la + _load()) / 2, **b,
                     **{f"entry_{k}": v for k, v in e.items()}})
        print(json.dumps(rows[-1]), flush=True)
    for name, batch in procs:
        n = max(args.measure, math.ceil(MIN_DIFF_CPU_S / step_cpu.get((name, batch), 1.0)))
        for nproc in (1, 2):
            la = _load()
            e = entry_pair(data, tmp, name, batch, args.warmup, n, nproc=nproc)
            prow.append({"model": name, "batch": batch, "nproc": nproc, "load": (la + _load()) / 2, **e})
            print(json.dumps(prow[-1]), flush=True)

    import torch

    ms = lambda s: f"{s * 1e3:.0f} ms"  # noqa: E731
    md = [f"# Training step time ({datetime.date.today().isoformat()}), `benchmarks/train_step.py`", "",
          f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}, OMP_NUM_THREADS={_env()['OMP_NUM_THREADS']}, fp32 (the tiny preset's "
          f"`mixed_precision=no`), `data.num_workers=0`. Load average (1 min) {load_start:.1f} at the start, "
          f"{_load():.1f} at the end (the cores are shared with other jobs). CPU time per step is the robust "
          f"measure here (single-threaded processes); wall times move with the load. Bare loops: medians of "
          f"{args.measure} steps after {args.warmup} warm-up steps. Entry point: CPU differential over N extra "
          f"steps (column N), wall = median of those steps. Total {time.time() - started:.0f} s.", "",
          "| model | batch | trainable / total params | bare fwd/bwd/AdamW, fixed batch: CPU (wall) | "
          "bare + data + target encode: CPU (wall) | entry point, 1 process: CPU (wall) | N | "
          "framework overhead (CPU) | vs bare floor (CPU) | peak RSS bare / entry | load |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['batch']} | {r['trainable_params'] / 1e6:.2f} M / "
                  f"{r['total_params'] / 1e6:.1f} M | {ms(r['bare_fixed_cpu'])} ({ms(r['bare_fixed'])}) | "
                  f"{ms(r['bare_data_cpu'])} ({ms(r['bare_data'])}) | {ms(r['entry_cpu'])} ({ms(r['entry_wall'])}) | "
                  f"{r['entry_measure']} | {(r['entry_cpu'] / r['bare_data_cpu'] - 1) * 100:+.0f}% | "
                  f"{(r['entry_cpu'] / r['bare_fixed_cpu'] - 1) * 100:+.0f}% | "
                  f"{r['rss_mb']:.0f} / {r['entry_rss_mb']:.0f} MB | {r['load']:.1f} |")
    if prow:
        md += ["", "Processes: torchrun --standalone, DDP over gloo, per-rank batch fixed, 2 processes on 2 "
               "shared cores. CPU is per step summed over all processes (agent included).", "",
               "| model | batch / rank | processes | CPU per step (all processes) | CPU per sample | "
               "wall per step | samples/s (all ranks, wall) | wall scaling vs 1 process | "
               "peak RSS (largest process) | load |", "|---|---|---|---|---|---|---|---|---|---|"]
        base = {}
        for r in prow:
            key = (r["model"], r["batch"])
            base.setdefault(key, r["samples_per_s"])
            md.append(f"| {r['model']} | {r['batch']} | {r['nproc']} | {ms(r['cpu'])} | "
                      f"{r['cpu'] / (r['batch'] * r['world']) * 1e3:.1f} ms | {ms(r['wall'])} | "
                      f"{r['samples_per_s']:.1f} | {r['samples_per_s'] / base[key]:.2f}x | {r['rss_mb']:.0f} MB | "
                      f"{r['load']:.1f} |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
