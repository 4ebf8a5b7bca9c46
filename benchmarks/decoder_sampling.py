"""Sampling (and training-step) speed of the tiny feature decoders on CPU.

    .venv/bin/python benchmarks/decoder_sampling.py                 # markdown table on stdout
    .venv/bin/python benchmarks/decoder_sampling.py --threads 1 --json out.json

Each decoder is sampled with its preset's default step count and guidance 3.0 (so every step runs the
doubled cond/uncond batch), after one warm-up call. Random weights: speed does not depend on training.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import blip3o  # noqa: F401  (torchvision shim before diffusers)
import torch

from blip3o.decoders import build_decoder, decoder_training_loss, trainable_parameters

VARIANTS = [("sdxl", "kl"), ("sdxl", "pixel"), ("sana", "dc"), ("sana", "pixel")]


def time_sampling(pipe, batch: int, feature_dim: int, repeats: int) -> float:
    features = torch.randn(batch, 64, feature_dim)
    pipe(features[:1], num_inference_steps=2, output_type="pt")  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(features, guidance_scale=3.0, output_type="pt")
        best = min(best, time.perf_counter() - start)
    return best / batch


def time_training_step(pipe, batch: int, feature_dim: int, repeats: int) -> float:
    params = trainable_parameters(pipe)
    opt = torch.optim.AdamW(params, lr=1e-4)
    images, features = torch.rand(batch, 3, 64, 64) * 2 - 1, torch.randn(batch, 64, feature_dim)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss, _ = decoder_training_loss(pipe, images, features)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for kind, vae in VARIANTS:
        pipe = build_decoder(kind, feature_dim=args.feature_dim, vae=vae)
        n_params = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                       for p in m.parameters())
        rows.append(dict(
            decoder=kind, vae=vae, params=n_params, steps=pipe.config.default_num_inference_steps,
            s_per_image_b1=time_sampling(pipe, 1, args.feature_dim, args.repeats),
            s_per_image_b8=time_sampling(pipe, 8, args.feature_dim, args.repeats),
            s_per_train_step=time_training_step(pipe, args.train_batch, args.feature_dim, args.repeats),
        ))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"| decoder | vae | params | steps | s/image (batch 1) | s/image (batch 8) | "
          f"s/train step (batch {args.train_batch}) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['decoder']} | {r['vae']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['s_per_image_b1']:.3f} | "
              f"{r['s_per_image_b8']:.3f} | {r['s_per_train_step']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=torch.get_num_threads(), feature_dim=args.feature_dim, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
