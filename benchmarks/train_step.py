"""Training step time: the full entry point vs. a bare forward/backward/AdamW loop on the same model and batches,
for the ``tiny`` and ``small`` DiT presets and the toy config, by batch size and by process count.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py                      # ~15 min on a loaded 2-core box
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --quick               # 2 rows, ~2 min
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --markdown benchmarks/train_step.md

Measurements (each in fresh processes, so peak RSS is per configuration; all single-threaded):

* **bare (fixed batch)**: the task's model built exactly as the trainer builds it, one batch taken from the real
  loader and run through the frozen target encoder once, then ``loss = model(**batch).loss; loss.backward();
  AdamW.step(); zero_grad()`` in a loop: model compute only.
* **bare + data**: the same loop, but every step takes a new batch from the same loader and runs the frozen
  target encoder on it (``task.to_device``), as training must. The two bare loops alternate step by step in one
  process, so they see the same machine load.
* **entry point (CLI)**: ``python -m blip3o.train [configs/toy.yaml] preset=tiny ...`` (or under ``torchrun``),
  checkpoints and sampling off; wall per step = ``batch x world / samples_per_s`` from metrics.jsonl
  (logging_steps=1).
* **trainer, instrumented**: the same ``Trainer`` run in-process with its data iterator, ``task.to_device``,
  ``task.loss`` (forward), ``Tensor.backward`` and ``optimizer.step/zero_grad`` timed inside each real step.
  **Framework overhead = the rest of the step** (non-finite check, ``loss.item()``, gradient clipping, the LR
  scheduler, EMA, logging every 10 steps, progress bar), relative to the timed work. Both parts are measured in
  the same steps, so this ratio does not move with the machine load, unlike comparisons between separate runs
  (on this shared 2-core VM, separate runs of the same thing differ by up to ~15%).
"""
from __future__ import annotations

import argparse
import datetime
import json
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

# name -> (YAML or None, overrides). tiny/small: the `tiny` experiment preset (tiny frozen Qwen2.5-VL, tiny
# EVA-CLIP target, 64 queries, fp32) with the tiny (dim 64, 2 layers) or small (dim 256, 4 layers) DiT preset;
# toy: configs/toy.yaml as it stands.
MODELS = {
    "tiny": (None, ["preset=tiny", "model.dit_preset=tiny"]),
    "small": (None, ["preset=tiny", "model.dit_preset=small"]),
    "toy": (str(ROOT / "configs" / "toy.yaml"), []),
}
PARTS = ("data", "to_device", "forward", "backward", "optimizer")


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


def _overrides(data: Path, name: str, batch: int, steps: int, logging_steps: int = 1):
    return [*MODELS[name][1], f"data.train_shards={data / 'train'}",
            f"data.eval_prompts={data / 'eval' / 'prompts.jsonl'}", f"train.per_device_train_batch_size={batch}",
            f"train.max_steps={steps}", f"train.logging_steps={logging_steps}", "train.save_steps=0",
            "train.sample_steps=0", "data.num_workers=0"]


def _load() -> float:
    return os.getloadavg()[0]


def _child_setup(args):
    import blip3o  # noqa: F401  (torchvision shim before transformers)
    import torch

    from blip3o.config import load_config

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return load_config(args.config or None, args.overrides)


# ------------------------------------------------------------------------------------------------------------
def bare_child(args) -> dict:
    """Builds the model like the trainer and times the bare loops."""
    cfg = _child_setup(args)
    import torch

    from blip3o.train.distributed import DistInfo
    from blip3o.train.tasks import get_task

    t = cfg.train
    torch.manual_seed(t.seed)
    task = get_task(t.task)(cfg, DistInfo())
    model = task.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    it = iter(task.build_loader(0, 1, t.seed))
    dev = torch.device("cpu")

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fixed = task.to_device(next(it), dev)
    rec = {"bare_fixed": [], "bare_data": []}
    for i in range(args.warmup + args.measure):
        w0 = time.perf_counter()
        step(fixed)
        w1 = time.perf_counter()
        step(task.to_device(next(it), dev))
        w2 = time.perf_counter()
        if i >= args.warmup:
            rec["bare_fixed"].append(w1 - w0)
            rec["bare_data"].append(w2 - w1)
    res = {k: statistics.median(v) for k, v in rec.items()}
    res.update(trainable_params=sum(p.numel() for p in params), total_params=sum(p.numel() for p in model.parameters()),
               rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return res


def trainer_child(args) -> dict:
    """The real Trainer in this process, with the work inside each step timed (see the module docstring)."""
    cfg = _child_setup(args)
    import torch

    from blip3o.train.tasks import get_task
    from blip3o.train.trainer import Trainer

    tr = Trainer(cfg, get_task(cfg.train.task))
    acc = dict.fromkeys(PARTS, 0.0)
    steps = []  # per step: wall, and the timed parts inside it

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t0
        return wrapper

    class Loader:  # times next(); everything else goes to the real loader
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def __iter__(self):
            it = iter(self._inner)
            nxt = timed("data", lambda: next(it))

            class It:
                def __iter__(self):
                    return self

                def __next__(self):
                    return nxt()
            return It()

    tr.loader = Loader(tr.loader)
    tr.task.to_device = timed("to_device", tr.task.to_device)
    tr.task.loss = timed("forward", tr.task.loss)
    tr.optimizer.step = timed("optimizer", tr.optimizer.step)
    tr.optimizer.zero_grad = timed("optimizer", tr.optimizer.zero_grad)
    backward = torch.Tensor.backward
    torch.Tensor.backward = timed("backward", backward)
    sched_step = tr.scheduler.step
    last = [time.perf_counter()]

    def stamp(*a, **k):  # the scheduler steps once per optimizer step: a step boundary
        now = time.perf_counter()
        steps.append({"wall": now - last[0], **acc})
        acc.update(dict.fromkeys(PARTS, 0.0))
        last[0] = now
        return sched_step(*a, **k)

    tr.scheduler.step = stamp
    tr.train()
    torch.Tensor.backward = backward
    # A step boundary is the scheduler call, so step k's window runs from just before step k-1's scheduler call to
    # just before step k's: the same work as one full loop iteration (logging, bar, checks included).
    steady = steps[args.warmup:]
    res = {k: statistics.median(s[k] for s in steady) for k in ("wall", *PARTS)}
    res["framework"] = statistics.median(s["wall"] - sum(s[p] for p in PARTS) for s in steady)
    res["framework_pct"] = statistics.median(
        (s["wall"] - sum(s[p] for p in PARTS)) / sum(s[p] for p in PARTS) * 100 for s in steady)
    return res


# ------------------------------------------------------------------------------------------------------------
_WRAPPER = ("import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:]).returncode\n"
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
            "sys.exit(r)\n")


def run_child(mode, data, out, name, batch, warmup, measure):
    steps = warmup + measure + 1 if mode == "trainer" else 1
    ov = _overrides(data, name, batch, steps, logging_steps=10) + [f"train.output_dir={out}"]
    cmd = [sys.executable, __file__, f"--{mode}-child", "--config", MODELS[name][0] or "", "--warmup", str(warmup),
           "--measure", str(measure), "--", *ov]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{mode} run failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def run_entry(data, out, name, batch, warmup, measure, nproc):
    """The CLI. nproc 0: plain `python -m blip3o.train`; else torchrun --standalone --nproc_per_node=nproc."""
    launcher = [sys.executable, "-m", "blip3o.train"] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "blip3o.train"]
    cmd = [sys.executable, "-c", _WRAPPER, *launcher, *([MODELS[name][0]] if MODELS[name][0] else []),
           *_overrides(data, name, batch, warmup + measure), f"train.output_dir={out}"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"entry point failed ({name} bs {batch} nproc {nproc}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rss = [int(l.split()[1]) for l in p.stdout.splitlines() if l.startswith("MAXRSS_KB")][-1] / 1024
    world = max(nproc, 1)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["step"] > warmup]
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": statistics.median(batch * world / r["samples_per_s"] for r in steady),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
            "rss_mb": rss, "process_wall_s": wall, "world": world}


# ------------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--measure", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny bs 8 and small bs 16 only, no torchrun rows")
    p.add_argument("--markdown", help="write the tables to this file")
    p.add_argument("--bare-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare_child or args.trainer_child:
        res = (bare_child if args.bare_child else trainer_child)(args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    from blip3o.data.toy import write_toy_dataset

    tmp = Path(tempfile.mkdtemp(prefix="train_step_"))
    data = tmp / "toy"
    write_toy_dataset(str(data), num=2000, seed=0, shard_size=250)
    load_start = _load()
    started = time.time()

    single = [("tiny", 8), ("tiny", 16), ("tiny", 32), ("tiny", 64), ("small", 16), ("small", 32), ("small", 64),
              ("toy", 32)]
    procs = [("tiny", 32), ("small", 32)]  # torchrun 1 vs 2 processes (per-rank batch fixed)
    if args.quick:
        single, procs = [("tiny", 8), ("small", 16)], []
    rows, prow = [], []
    for name, batch in single:
        la = _load()
        b = run_child("bare", data, tmp / "bare", name, batch, args.warmup, args.measure)
        tr = run_child("trainer", data, tmp / "trainer", name, batch, args.warmup, args.measure)
        e = run_entry(data, tmp / "cli", name, batch, args.warmup, args.measure, nproc=0)
        rows.append({"model": name, "batch": batch, "load": (la + _load()) / 2, **b,
                     **{f"tr_{k}": v for k, v in tr.items()}, **{f"cli_{k}": v for k, v in e.items()}})
        print(json.dumps(rows[-1]), flush=True)
    for name, batch in procs:
        for nproc in (1, 2):
            la = _load()
            e = run_entry(data, tmp / "cli", name, batch, args.warmup, args.measure, nproc=nproc)
            prow.append({"model": name, "batch": batch, "nproc": nproc, "load": (la + _load()) / 2, **e})
            print(json.dumps(prow[-1]), flush=True)

    import torch

    ms = lambda s: f"{s * 1e3:.0f}"  # noqa: E731
    md = [f"# Training step time ({datetime.date.today().isoformat()}), `benchmarks/train_step.py`", "",
          f"Machine: {os.cpu_count()} vCPUs (KVM), {platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}, OMP_NUM_THREADS={_env()['OMP_NUM_THREADS']}, fp32 (the tiny preset's "
          f"`mixed_precision=no`), `data.num_workers=0`. Load average (1 min) {load_start:.1f} at the start, "
          f"{_load():.1f} at the end: the cores are shared with other jobs, so absolute times are inflated and "
          f"separate runs differ by up to ~15%. Times: medians of {args.measure} steps after {args.warmup} "
          f"warm-up steps, wall clock, in ms. Total {time.time() - started:.0f} s.", "",
          "Models: tiny / small = the `tiny` experiment preset (tiny frozen Qwen2.5-VL, tiny EVA-CLIP target, 64 "
          "queries) with the tiny (dim 64, 2 layers) / small (dim 256, 4 layers) DiT preset; toy = configs/toy.yaml "
          "at the time of the run.", "",
          "| model | batch | trainable / total params | bare fwd/bwd/AdamW, fixed batch | bare + data + target encode "
          "| entry point (CLI, 1 process) | trainer step (instrumented) | of which data + encode / fwd / bwd / opt "
          "| **framework overhead** | peak RSS bare / CLI | load |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['batch']} | {r['trainable_params'] / 1e6:.2f} M / {r['total_params'] / 1e6:.1f} M"
                  f" | {ms(r['bare_fixed'])} | {ms(r['bare_data'])} | {ms(r['cli_wall'])} | {ms(r['tr_wall'])} | "
                  f"{ms(r['tr_data'] + r['tr_to_device'])} / {ms(r['tr_forward'])} / {ms(r['tr_backward'])} / "
                  f"{ms(r['tr_optimizer'])} | {r['tr_framework'] * 1e3:.1f} ms = {r['tr_framework_pct']:.1f}% | "
                  f"{r['rss_mb']:.0f} / {r['cli_rss_mb']:.0f} MB | {r['load']:.1f} |")
    if prow:
        md += ["", "Processes: torchrun --standalone, DDP over gloo, per-rank batch fixed. The machine has 2 vCPUs, "
               "shared with other jobs, so 2 ranks compete with each other and with the load.", "",
               "| model | batch / rank | processes | step time (per rank) | samples/s (all ranks) | "
               "scaling vs 1 process | peak RSS (largest process) | load |", "|---|---|---|---|---|---|---|---|"]
        base = {}
        for r in prow:
            key = (r["model"], r["batch"])
            base.setdefault(key, r["samples_per_s"])
            md.append(f"| {r['model']} | {r['batch']} | {r['nproc']} | {ms(r['wall'])} | {r['samples_per_s']:.1f} | "
                      f"{r['samples_per_s'] / base[key]:.2f}x | {r['rss_mb']:.0f} MB | {r['load']:.1f} |")
    md += ["", "Notes:", "",
           "* framework overhead = trainer step minus the timed data / to_device / forward / backward / optimizer "
           "calls inside the same steps (median), as a share of the timed work; it covers the non-finite check, "
           "`loss.item()`, gradient clipping, the LR scheduler, EMA, logging every 10 steps and the progress bar.",
           "* \"bare, fixed batch\" reuses one batch, whose padded prompt length is a single draw; fresh batches "
           "vary, so this column can sit a little off the trend (it is the compute floor, not a like-for-like step).",
           "* The CLI wall comes from the trainer's own samples/s (logging_steps=1), which leaves out writing the "
           "log line; it is a separate process measured at a different moment than the bare loops, so it differs "
           "from them by the machine's run-to-run noise as well as by real cost.",
           "* Peak RSS is the largest process's maximum resident set (ru_maxrss), model + data + allocator caches."]
    text = "\n".join(md) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
