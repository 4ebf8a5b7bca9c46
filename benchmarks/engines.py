"""Step time and peak memory per process of the training engines: DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, each
run through the real entry point under ``torchrun`` on the toy world.

    OMP_NUM_THREADS=1 python benchmarks/engines.py                           # tiny preset, 2 processes, CPU
    OMP_NUM_THREADS=1 python benchmarks/engines.py --preset small --steps 20 --markdown benchmarks/engines.md
    python benchmarks/engines.py --nproc 8 --device cuda --preset small      # on a GPU node

Per engine: one ``torchrun --nproc_per_node=N -m blip3o.train`` run (checkpoints off, logging every step).
**Step time** is the median ``step_time_s`` from metrics.jsonl over the steps after the first two (warm-up).
**Peak memory** is each process's peak resident set (``ru_maxrss``: weights, optimizer state, activations *and*
the Python/torch runtime), plus ``torch.cuda.max_memory_allocated`` on GPU; every rank reports its own, via this
file acting as the torchrun worker (``--worker``) around ``blip3o.train``'s ``main``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "DDP": [],
    "ZeRO-2": ["train.deepspeed=configs/deepspeed/zero2.json"],
    "ZeRO-3": ["train.deepspeed=configs/deepspeed/zero3.json"],
    "FSDP": ["train.fsdp=true"],
}


def worker(argv) -> int:
    """torchrun entry: train, then write this rank's peak memory next to the run's metrics."""
    from blip3o.train.__main__ import main

    rc = main(argv)
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("train.output_dir="))
    rec = {"rank": int(os.environ.get("RANK", "0")), "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import torch

    if torch.cuda.is_available():
        rec["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"peak-rank{rec['rank']}.json").write_text(json.dumps(rec))
    return rc


def run_engine(name, args, data: Path, work: Path) -> dict:
    out = work / name
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k, v in (("HF_HUB_OFFLINE", "1"), ("WANDB_MODE", "disabled"), ("OMP_NUM_THREADS", "1"),
                 ("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")),  # DeepSpeed's op, built once
                 ("BLIP3O_CACHE", str(ROOT / ".cache" / "blip3o"))):  # the tiny presets, as the tests cache them
        env.setdefault(k, v)
    if args.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           str(Path(__file__).resolve()), "--worker", "preset=tiny", f"model.dit_preset={args.preset}",
           f"data.train_shards={data / 'train'}", f"data.eval_prompts={data / 'eval' / 'prompts.jsonl'}",
           f"train.output_dir={out}", f"train.max_steps={args.steps}", "train.save_steps=0", "train.logging_steps=1",
           f"train.per_device_train_batch_size={args.batch}", f"train.device={args.device}",
           "data.num_workers=0", *ENGINES[name]]
    if args.mixed_precision != "no":  # `tiny` already says "no" (which an override would read as YAML false)
        cmd.append(f"train.mixed_precision={args.mixed_precision}")
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-4000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in recs if r["step"] > 2]
    peaks = sorted((json.loads(p.read_text()) for p in out.glob("peak-rank*.json")), key=lambda r: r["rank"])
    return {"engine": name, "step_time_s": statistics.median(times), "wall_s": time.time() - t,
            "max_rss_mib": [round(p["max_rss_mib"]) for p in peaks],
            "cuda_max_allocated_mib": [round(p["cuda_max_allocated_mib"]) for p in peaks if "cuda_max_allocated_mib" in p],
            "final_loss": recs[-1]["loss"]}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"), help="DiT preset (the rest is `tiny`)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8, help="per process")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16"))
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args()
    from blip3o.data.toy import write_toy_dataset

    work = Path(tempfile.mkdtemp(prefix="blip3o_engines_"))
    try:
        write_toy_dataset(str(work / "data"), num=400, seed=0, shard_size=100)
        rows = []
        for name in args.engines.split(","):
            rows.append(run_engine(name, args, work / "data", work))
            print(json.dumps(rows[-1]), flush=True)  # each engine as it finishes (a long run shows progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    lines = [f"{args.nproc} processes, DiT preset {args.preset}, batch {args.batch}/process, {args.steps} steps, "
             f"{args.device}, mixed_precision={args.mixed_precision}; load average {load[0]:.2f} {load[1]:.2f} "
             f"{load[2]:.2f} at the end", "",
             "| engine | step time (s, median) | peak RSS per rank (MiB) | CUDA peak per rank (MiB) | final loss |",
             "|---|---|---|---|---|"]
    for r in rows:
        cuda = ", ".join(map(str, r["cuda_max_allocated_mib"])) or "-"
        lines.append(f"| {r['engine']} | {r['step_time_s']:.3f} | {', '.join(map(str, r['max_rss_mib']))} | {cuda} | "
                     f"{r['final_loss']:.4f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
