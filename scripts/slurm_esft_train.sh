#!/usr/bin/env bash
# ESFT training on several nodes with Slurm + torchrun (one torchrun per node, 8 GPUs each).
#   sbatch scripts/slurm_esft_train.sh configs/my_train.yaml [key=value ...]
# The output_dir must be on a filesystem every node sees (rank 0 writes, all ranks read on resume).
#SBATCH --job-name=esft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm_esft_train.sh CONFIG.yaml [key=value ...]}
shift
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
  --nnodes="$SLURM_NNODES" --nproc_per_node="${GPUS_PER_NODE:-8}" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:29500" --rdzv_id="$SLURM_JOB_ID" \
  -m esft train --config "$CONFIG" "$@"
