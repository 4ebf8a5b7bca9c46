"""Training-step time of the toy decoder (tiny SDXL UNet on pixel-unshuffled 64 px images), with and without
its attention blocks: the measurement behind configs/toy_decoder.yaml's attention-free UNet.

    OMP_NUM_THREADS=1 python benchmarks/toy_decoder_step.py --feature-dim 32 --tokens 64   # the 8x8 toy CLIP
    OMP_NUM_THREADS=1 python benchmarks/toy_decoder_step.py --feature-dim 64 --tokens 16   # the 4x4 one
    OMP_NUM_THREADS=1 python benchmarks/toy_decoder_step.py --feature-dim 64 --tokens 16 --widths 32 64 --bf16 --compile
        # configs/toy_decoder.yaml's UNet; --compile also times it compiled (train.compile=true) and the compile itself
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from blip3o.decoders import build_decoder
from blip3o.decoders.sdxl import sdxl_training_loss

NO_ATTENTION = dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                    mid_block_type="UNetMidBlock2D")
VARIANTS = {"with attention (tiny preset)": {}, "attention-free (toy default)": NO_ATTENTION}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--feature-dim", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="UNet block_out_channels, one per level (tiny preset: 64 128)")
    p.add_argument("--pixel-factor", type=int, default=4, help="pixel-unshuffle factor of the latents (4: 16x16x48)")
    p.add_argument("--bf16", action="store_true", help="under bf16 autocast (train.mixed_precision=bf16)")
    p.add_argument("--compile", action="store_true", help="also the attention-free UNet compiled in place")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    images = torch.rand(a.batch, 3, 64, 64) * 2 - 1
    feats = torch.randn(a.batch, a.tokens, a.feature_dim)
    variants = dict(VARIANTS)
    if a.compile:
        variants["attention-free, compiled"] = NO_ATTENTION
    widths = {"block_out_channels": tuple(a.widths)} if a.widths else {}
    if a.widths and len(a.widths) != 2:  # one plain down/up block per level
        widths.update(down_block_types=("DownBlock2D",) * len(a.widths), up_block_types=("UpBlock2D",) * len(a.widths),
                      attention_head_dim=(1,) * len(a.widths), norm_num_groups=min(32, min(a.widths)))
    for name, unet_config in variants.items():
        torch.manual_seed(0)
        pipe = build_decoder("sdxl", preset="tiny", feature_dim=a.feature_dim, num_tokens=a.tokens, vae="pixel",
                             spatial_features=True, unet_config={**unet_config, **widths}, pixel_factor=a.pixel_factor)
        parts = {"unet": pipe.unet, "vae": pipe.vae, "scheduler": pipe.scheduler, "null_condition": pipe.null_condition}
        pipe.unet.train()
        if name.endswith("compiled"):
            pipe.unet.compile()

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                out = sdxl_training_loss(parts, images, feats)
            (out[0] if isinstance(out, tuple) else out).backward()

        t = time.perf_counter()
        step()  # warm-up (and the compile)
        first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(a.repeats):
            step()
        params = sum(q.numel() for q in pipe.unet.parameters())
        print(f"{name}: {(time.perf_counter() - t) / a.repeats:.3f} s/step at batch {a.batch}, "
              f"{params / 1e6:.2f}M parameters; first step {first:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
