#!/bin/bash
# Multi-node launch of recipes/pretrain/llama_1b.yaml: one torchrun per node, 8 GPUs each.
#   sbatch recipes/pretrain/slurm_llama_1b.sh [key=value ...]       # overrides go to the recipe
# Check the layout and per-GPU memory first, without GPUs:
#   kiln train recipes/pretrain/llama_1b.yaml --dry-run --world-size 32 parallel.tp=2
#SBATCH --job-name=kiln-llama-1b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=runs/pretrain/llama_1b/slurm-%j.out
#SBATCH --requeue
# Pre-emption / time limit: Slurm sends SIGTERM, torchrun forwards it to every rank, the trainer finishes the
# step, writes a checkpoint and exits 0; the recipe's `resume: true` makes the requeued job continue from it.
set -euo pipefail

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=29500
export OMP_NUM_THREADS=8

srun --kill-on-bad-exit=1 torchrun \
  --nnodes "$SLURM_NNODES" --nproc-per-node 8 \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \
  -m kiln train recipes/pretrain/llama_1b.yaml "$@"
