#!/usr/bin/env bash
# Single-node launcher.
#
#   bash run.sh                         # no arguments, no IMG_FOLDER/OUTPUT_FOLDER/HF_HOME: the toy-world
#                                       # default on CPU (toy shards -> decoder -> queries+DiT -> samples + score)
#   bash run.sh train.max_steps=5       # the toy default with config overrides
#   IMG_FOLDER=/data/blip3o OUTPUT_FOLDER=/ckpt/run1 NPROC_PER_NODE=8 bash run.sh   # paper pretraining
#   CONFIG=configs/sft_8b.yaml IMG_FOLDER=... bash run.sh train.max_steps=10000
#
# Environment (as the original run.sh): IMG_FOLDER (folder of .tar shards), OUTPUT_FOLDER, HF_HOME;
# plus CONFIG (default configs/pretrain_8b.yaml), NPROC_PER_NODE (default: GPUs, or 1), PYTHON.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [ -z "${IMG_FOLDER:-}" ] && [ -z "${OUTPUT_FOLDER:-}" ] && [ -z "${HF_HOME:-}" ]; then
  exec "$PYTHON" scripts/toy_world.py "$@"
fi

CONFIG=${CONFIG:-configs/pretrain_8b.yaml}
OUTPUT_FOLDER=${OUTPUT_FOLDER:-outputs/run}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
ARGS=("train.output_dir=$OUTPUT_FOLDER")
[ -n "${IMG_FOLDER:-}" ] && ARGS+=("data.train_shards=$IMG_FOLDER")
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" \
  -m blip3o.train "$CONFIG" "${ARGS[@]}" "$@"
