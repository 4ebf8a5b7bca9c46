#!/bin/bash
# Multi-node training under Slurm: one torchrun agent per node (srun), c10d rendezvous on the first node.
#
#   sbatch --nodes=4 --gpus-per-node=8 slurm.sh configs/pretrain_8b.yaml          # the paper: 4 x 8 GPUs
#   IMG_FOLDER=/data/blip3o OUTPUT_FOLDER=/ckpt/8b sbatch --nodes=4 --gpus-per-node=8 slurm.sh
#   NPROC_PER_NODE=1 sbatch --ntasks=2 --ntasks-per-node=2 slurm.sh configs/toy.yaml  # 2 agents on one host (CPU test)
#
# Node count: sbatch --nodes (or --ntasks, one agent per task). GPUs per node: NPROC_PER_NODE
# (default SLURM_GPUS_ON_NODE, else 8). Extra arguments are a config file and/or overrides.
# Preemption: Slurm's SIGTERM reaches the trainer, which writes a checkpoint before exiting;
# resubmit with train.resume_from_checkpoint=latest (the default here).
#SBATCH --job-name=blip3o
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
NNODES=${SLURM_NTASKS:-${SLURM_NNODES:-1}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
OUTPUT_FOLDER=${OUTPUT_FOLDER:-outputs/slurm-${SLURM_JOB_ID:-run}}
ARGS=("train.output_dir=$OUTPUT_FOLDER" "train.resume_from_checkpoint=latest")
[ -n "${IMG_FOLDER:-}" ] && ARGS+=("data.train_shards=$IMG_FOLDER")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_id="${SLURM_JOB_ID:-0}" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  -m blip3o.train "$@" "${ARGS[@]}"
