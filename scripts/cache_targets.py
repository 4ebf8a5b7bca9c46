"""Run the frozen target encoder once over WebDataset shards and store x0 beside them.

    python scripts/cache_targets.py /data/pretrain --target-dir checkpoints/eva_clip_target
    python scripts/cache_targets.py "toy_data/train/*.tar" --target eva_clip --preset tiny
    torchrun --nproc_per_node 8 scripts/cache_targets.py /data/pretrain --target-dir T --device cuda

For each shard DIR/NAME.tar this writes DIR/x0_cache/<target name>/NAME.tar with the same keys in the same
order (samples whose image is bad are left out and counted): KEY.x0.npy (numpy (C, h, w), float16 unless
--dtype float32) plus every non-image field of the original (txt, long.txt, json, ...), and
DIR/x0_cache/<target name>/signature.json (the target's signature(), dtype and shape). Training with
use_cache=auto|true then reads these shards instead of decoding images, after checking the signature.
Finished shards are skipped on a re-run (--overwrite redoes them); under torchrun, shards are split by rank.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shards", nargs="+", help="shard folder, glob, brace pattern or files")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-dir", help="a saved target encoder (TargetEncoder.save_pretrained)")
    g.add_argument("--target", help="target name (eva_clip, siglip, vae) built from --preset")
    p.add_argument("--preset", default="tiny", help="preset for --target (default: tiny)")
    p.add_argument("--out", default=None, help="cache folder (default: <shard folder>/x0_cache/<target name>)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="recompute shards that are already cached")
    p.add_argument("--seed", type=int, default=0, help="weight init seed for --target (random presets)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    # Imported here so `--help` is instant and the data package never depends on the models at import time.
    from blip3o.data.cache import CacheMismatchError, cache_shards
    from blip3o.data.shards import expand_shards
    from blip3o.models.targets import build_target_encoder, load_target_encoder

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        shards = expand_shards(args.shards)
        if args.target_dir:
            target = load_target_encoder(args.target_dir, device=args.device)
        else:
            import torch

            with torch.random.fork_rng(devices=[]):  # a random preset must be the same one on every rank/run
                torch.manual_seed(args.seed)
                target = build_target_encoder(args.target, preset=args.preset, device=args.device)
        t0 = time.time()
        result = cache_shards(shards, target, out_dir=args.out, batch_size=args.batch_size, dtype=args.dtype,
                              device=args.device, overwrite=args.overwrite, rank=rank, world_size=world)
    except (ValueError, FileNotFoundError, KeyError, CacheMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
