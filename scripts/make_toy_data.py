"""Write the toy world: WebDataset shards of coloured shapes + a GenEval-format evaluation prompt file.

    python scripts/make_toy_data.py OUT_DIR --num 20000 --seed 0            # 64x64, PNG, 1000 per shard
    python scripts/make_toy_data.py OUT_DIR --num 2000 --size 128 --eval-images

Writes OUT_DIR/train/toy-000000.tar ... (KEY.png, KEY.txt short caption, KEY.long.txt, KEY.json scene) and
OUT_DIR/eval/prompts.jsonl; --eval-images also writes the evaluation prompts' ground-truth images in
GenEval's layout under OUT_DIR/eval/gt (score them with `python -m blip3o.eval.toy OUT_DIR/eval/gt`).
The specification is in blip3o/data/toy.py and the README.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from blip3o.data.toy import write_toy_dataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--num", type=int, default=20000, help="training samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, choices=(64, 128), help="canvas size")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--format", default="png", choices=("png", "jpg"), help="image encoding in the shards")
    p.add_argument("--eval-per-tag", type=int, default=12, help="evaluation prompts per tag (4 tags)")
    p.add_argument("--eval-images", action="store_true", help="also write ground-truth images for the eval prompts")
    args = p.parse_args(argv)
    t0 = time.time()
    out = write_toy_dataset(args.out_dir, args.num, seed=args.seed, canvas=args.size, shard_size=args.shard_size,
                            image_format=args.format, eval_per_tag=args.eval_per_tag, eval_images=args.eval_images)
    print(f"wrote {args.num} samples in {len(out['shards'])} shards to {os.path.join(args.out_dir, 'train')} and "
          f"{out['num_eval']} eval prompts to {out['prompts']} ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
