"""Train BLIP3-o (or its pixel decoder). One command for every scale:

    # CPU, the tiny toy-world preset
    python -m blip3o.train configs/toy.yaml train.max_steps=20
    # one node, 8 GPUs, DeepSpeed ZeRO-1 (the paper's pretraining)
    torchrun --nproc_per_node=8 -m blip3o.train configs/pretrain_8b.yaml data.train_shards=$IMG_FOLDER
    # sharded engines: DeepSpeed ZeRO-3, or PyTorch FSDP2
    torchrun --nproc_per_node=8 -m blip3o.train configs/joint_8b.yaml train.deepspeed=configs/deepspeed/zero3.json
    torchrun --nproc_per_node=8 -m blip3o.train configs/joint_8b.yaml train.deepspeed=null train.fsdp=true
    # the DeepSpeed launcher
    deepspeed --num_gpus 8 --module blip3o.train configs/pretrain_8b.yaml
    # multi-node under Slurm: see slurm.sh (srun + torchrun c10d rendezvous)
    # resume after a crash or preemption
    python -m blip3o.train configs/toy.yaml train.resume_from_checkpoint=latest
    # a variant registered in your own module (docs/extending.md)
    python -m blip3o.train configs/toy.yaml imports=[my_pkg.variants] model.target=pooled_pixels

Arguments: a YAML experiment file (optional) followed by section.field=value overrides (and preset=NAME,
imports=[MODULE, ...]).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(prog="python -m blip3o.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="experiment YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    if args.config and "=" in args.config:  # only overrides given
        args.overrides.insert(0, args.config)
        args.config = None
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    # The package is imported only after the arguments are parsed: `--help` answers before torch loads, and
    # TOKENIZERS_PARALLELISM is set before tokenizers is imported.
    import blip3o  # noqa: F401  (torchvision shim first)
    from blip3o.config import ConfigError, load_config

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would drown the training bar
    from blip3o.data import AllBadError
    from blip3o.train.tasks import get_task
    from blip3o.train.trainer import NonFiniteLossError, Trainer

    try:
        trainer = Trainer(cfg, get_task(cfg.train.task))
        trainer.train()
    except (FileNotFoundError, ValueError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except AllBadError as e:
        # From a DataLoader worker the message carries the worker's traceback; its last line is the reason.
        last = [l for l in str(e).splitlines() if l.strip()][-1]
        print(f"error: {last.split('AllBadError: ', 1)[-1]}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
