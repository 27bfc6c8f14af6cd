#!/bin/bash
# SDXL ControlNet on 2 nodes x 8 GPUs under SLURM:   sbatch examples/multinode/sbatch.sh
#
# One SLURM task per GPU. Lightning detects SLURM by itself (ranks from SLURM_PROCID and
# SLURM_LOCALID, the main address from SLURM_NODELIST, a port from the job id), so there is no
# torchrun here; --ntasks-per-node must equal trainer.devices and --nodes trainer.num_nodes.
# Submit from the repository root (a config's relative paths resolve against its own folder).
#SBATCH --job-name=cnet-sdxl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10        # data.num_workers (8) + the training process + slack
#SBATCH --mem=0                   # all of each node's memory
#SBATCH --time=48:00:00
#SBATCH --requeue                 # a requeued job resumes from the newest checkpoint
#SBATCH --signal=USR1@180         # 3 min before the time limit: every rank checkpoints at the
                                  # next step, then the job requeues itself (scontrol requeue)
#SBATCH --output=%x-%j.out

set -euo pipefail

# Set these for your cluster:
source .venv/bin/activate          # the environment with cnet-train (and deepspeed) installed
# export NCCL_SOCKET_IFNAME=ib0    # the interface between nodes, if NCCL picks the wrong one
# export HF_HOME=/shared/hf-cache  # a shared hub cache, so that every node finds the weights

CONFIG=examples/sdxl.yaml

# The text-embedding cache (cache.path) comes first, once, on one node with all its GPUs.
# Resumable: captions already cached are skipped, so a requeued job redoes nothing.
srun --nodes=1 --ntasks=1 --gpus-per-node=8 \
    torchrun --standalone --nproc-per-node 8 -m cnet_train.cli embed "$CONFIG"

# Training on every task; resumes from the newest checkpoint in run_dir (checkpoint.resume: auto).
# run_dir must be on a filesystem every node shares (cnet stops at start-up, saying so, if the
# nodes see different checkpoints). SIGUSR1 (above) or SIGTERM (preemption, scancel) makes every
# rank checkpoint at the next step and exit with 128 + the signal number.
srun cnet-train launch "$CONFIG" \
    --set trainer.num_nodes=2 \
    --set trainer.devices=8
