"""Training step time: the full entry point (``python -m blip3o.train``) vs. a bare forward/backward/AdamW loop on
the same model and batches, for the ``tiny`` DiT preset and the ``small`` one, with batch size and process count.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py                      # ~10 min on a loaded 2-core box
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --quick               # 2 configs, ~2 min
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --markdown benchmarks/train_step.md

What is measured (every configuration runs in fresh processes, so peak RSS is per configuration):

* **bare (fixed batch)**: the task's model built exactly as the trainer builds it, one batch taken from the real
  loader and encoded by the target encoder once, then ``loss = model(**batch).loss; loss.backward();
  AdamW.step(); zero_grad()`` in a loop. The floor: model compute only.
* **bare + data**: the same loop, but each step takes a new batch from the same loader and runs the frozen
  target encoder on it (``task.to_device``), as training must.
* **entry point**: ``python -m blip3o.train [configs/toy.yaml] preset=tiny ...`` (or under ``torchrun``) on the same data.
  Per-step wall time = ``batch x world / samples_per_s`` from metrics.jsonl with ``logging_steps=1`` (the
  trainer's window covers everything from one log to the next except writing the log line itself; checkpoints
  and sampling are off). It adds to "bare + data": the non-finite check, ``loss.item()``, gradient clipping,
  the LR scheduler, the progress bar and, under torchrun, DDP's gradient all-reduce.

Models: ``tiny`` and ``small`` are the ``tiny`` experiment preset with the tiny / small DiT preset; ``toy`` is
configs/toy.yaml as it stands (see MODELS).

Overheads: ``framework = entry / (bare + data) - 1`` (what the trainer adds around the same work) and
``vs floor = entry / bare - 1`` (data loading + target encoding + trainer). Times are medians over the
measured steps after ``--warmup`` steps. The machine is shared: the load average is recorded with every row.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


# name -> (YAML or None, overrides). tiny/small: the `tiny` experiment preset (tiny frozen Qwen2.5-VL, tiny
# EVA-CLIP target, 64 queries, fp32) with the tiny (dim 64, 2 layers) or small (dim 256, 4 layers) DiT preset;
# toy: configs/toy.yaml as it stands (its own DiT sizes, 16 queries, EMA, channel-normalised targets).
MODELS = {
    "tiny": (None, ["preset=tiny", "model.dit_preset=tiny"]),
    "small": (None, ["preset=tiny", "model.dit_preset=small"]),
    "toy": (str(ROOT / "configs" / "toy.yaml"), []),
}


def _overrides(data: Path, name: str, batch: int, steps: int):
    return [*MODELS[name][1], f"data.train_shards={data / 'train'}", f"data.eval_prompts={data / 'eval' / 'prompts.jsonl'}",
            f"train.per_device_train_batch_size={batch}", f"train.max_steps={steps}",
            "train.logging_steps=1", "train.save_steps=0", "train.sample_steps=0", "data.num_workers=0"]


def _config_args(name: str):
    return [MODELS[name][0]] if MODELS[name][0] else []


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
    for name, fresh in (("bare_fixed", False), ("bare_data", True)):
        times = []
        for i in range(args.warmup + args.measure):
            t0 = time.perf_counter()
            batch = task.to_device(next(it), dev) if fresh else fixed
            step(batch)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        res[name] = statistics.median(times)
    res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------------------------
_RSS_WRAPPER = ("import resource, subprocess, sys\n"
                "r = subprocess.run(sys.argv[1:]).returncode\n"
                "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
                "sys.exit(r)\n")


def run_bare(data, preset, batch, warmup, measure):
    cmd = [sys.executable, __file__, "--bare-child", "--config", MODELS[preset][0] or "", "--warmup", str(warmup),
           "--measure", str(measure), "--", *_overrides(data, preset, batch, 1)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"bare run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def run_entry(data, out, preset, batch, warmup, measure, nproc):
    """nproc 0: plain `python -m blip3o.train`; else torchrun --standalone --nproc_per_node=nproc."""
    launcher = [sys.executable, "-m", "blip3o.train"] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "blip3o.train"]
    cmd = [sys.executable, "-c", _RSS_WRAPPER, *launcher, *_config_args(preset),
           *_overrides(data, preset, batch, warmup + measure), f"train.output_dir={out}"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"entry point failed ({' '.join(cmd[3:6])}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rss = [int(l.split()[1]) for l in p.stdout.splitlines() if l.startswith("MAXRSS_KB")][-1] / 1024
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    world = max(nproc, 1)
    steady = [r for r in recs if r["step"] > warmup]
    return {"entry": statistics.median(batch * world / r["samples_per_s"] for r in steady),
            "entry_step_time": statistics.median(r["step_time_s"] for r in steady),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
            "rss_mb": rss, "process_wall_s": wall, "world": world}


# ------------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--measure", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny bs 8 and small bs 32 only")
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

    # (preset, batch): bare loops + single-process entry point.
    single = [("tiny", 8), ("tiny", 16), ("tiny", 32), ("tiny", 64), ("small", 16), ("small", 32), ("small", 64),
              ("toy", 64)]
    procs = [("tiny", 32), ("small", 32)]  # torchrun 1 vs 2 processes (per-rank batch fixed)
    if args.quick:
        single, procs = [("tiny", 8), ("small", 16)], []
    rows, prow = [], []
    for i, (preset, batch) in enumerate(single):
        la = _load()
        b = run_bare(data, preset, batch, args.warmup, args.measure)
        e = run_entry(data, tmp / f"run{i}", preset, batch, args.warmup, args.measure, nproc=0)
        rows.append({"preset": preset, "batch": batch, "load": (la + _load()) / 2, **b,
                     "entry": e["entry"], "entry_step_time": e["entry_step_time"], "entry_rss_mb": e["rss_mb"],
                     "bare_rss_mb": b["rss_mb"]})
        print(json.dumps(rows[-1]), flush=True)
    for j, (preset, batch) in enumerate(procs):
        for nproc in (1, 2):
            la = _load()
            e = run_entry(data, tmp / f"tr{j}_{nproc}", preset, batch, args.warmup, args.measure, nproc=nproc)
            prow.append({"preset": preset, "batch": batch, "nproc": nproc, "load": (la + _load()) / 2, **e})
            print(json.dumps(prow[-1]), flush=True)

    import torch

    md = [f"# Training step time (" + datetime.date.today().isoformat() + "), `benchmarks/train_step.py`", "",
          f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}, OMP_NUM_THREADS={_env()['OMP_NUM_THREADS']}, fp32 (the tiny preset's "
          f"`mixed_precision=no`), `data.num_workers=0`. Load average (1 min) {load_start:.1f} at the start, "
          f"{_load():.1f} at the end: the cores are shared with other jobs, so absolute times are inflated and "
          f"noisy; compare rows measured under similar load. Medians of {args.measure} steps after "
          f"{args.warmup} warm-up steps; total {time.time() - started:.0f} s.", "",
          "| model | batch | trainable params | bare fwd/bwd/AdamW (fixed batch) | bare + data + target encode "
          "| entry point (1 process) | framework overhead | vs bare floor | peak RSS bare / entry | load |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['preset']} | {r['batch']} | {r['trainable_params'] / 1e6:.2f} M | "
                  f"{r['bare_fixed'] * 1e3:.0f} ms | {r['bare_data'] * 1e3:.0f} ms | {r['entry'] * 1e3:.0f} ms | "
                  f"{(r['entry'] / r['bare_data'] - 1) * 100:+.0f}% | {(r['entry'] / r['bare_fixed'] - 1) * 100:+.0f}% | "
                  f"{r['bare_rss_mb']:.0f} / {r['entry_rss_mb']:.0f} MB | {r['load']:.1f} |")
    if prow:
        md += ["", "Processes (torchrun --standalone, DDP over gloo, per-rank batch fixed; 2 processes on 2 shared "
               "cores):", "",
               "| model | batch / rank | processes | step time (per rank) | samples/s (all ranks) | "
               "scaling vs 1 process | peak RSS (largest process) | load |", "|---|---|---|---|---|---|---|---|"]
        base = {}
        for r in prow:
            key = (r["preset"], r["batch"])
            base.setdefault(key, r["samples_per_s"])
            md.append(f"| {r['preset']} | {r['batch']} | {r['nproc']} | {r['entry'] * 1e3:.0f} ms | "
                      f"{r['samples_per_s']:.1f} | {r['samples_per_s'] / base[key]:.2f}x | {r['rss_mb']:.0f} MB | "
                      f"{r['load']:.1f} |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
