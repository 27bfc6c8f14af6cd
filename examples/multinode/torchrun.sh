#!/bin/bash
# SDXL ControlNet on 2 nodes x 8 GPUs with torchrun (no SLURM). Run this same script on both
# nodes, from the repository root:
#
#   RDZV_HOST=node0.example.org RDZV_ID=cnet-20261201-1 bash examples/multinode/torchrun.sh
#
# torchrun starts 8 processes per node; the c10d rendezvous on RDZV_HOST gathers both nodes
# and assigns node ranks, and Lightning reads the ranks torchrun sets (it detects torchelastic).
# The figures here must match the config: --nnodes = trainer.num_nodes, --nproc-per-node =
# trainer.devices.
#
# run_dir must be on a filesystem every node shares, at the same path on all. The c10d
# rendezvous gives node ranks in arrival order, so the node that writes the checkpoints can
# change between restarts; with a run_dir per node, the nodes would resume from different
# checkpoints (cnet stops the job at start-up and says so).
set -euo pipefail

# Set these:
: "${RDZV_HOST:?set RDZV_HOST to the address of the first node, reachable from every node}"
RDZV_PORT="${RDZV_PORT:-29500}"      # a free TCP port on RDZV_HOST
# A new id for each job, the same on every node: a reused id can join a stale rendezvous.
: "${RDZV_ID:?set RDZV_ID to a new id for this job, the same on every node, e.g. cnet-\$(date +%Y%m%d-%H%M)}"
CONFIG="${CONFIG:-examples/sdxl.yaml}"
# export NCCL_SOCKET_IFNAME=ib0      # the interface between nodes, if NCCL picks the wrong one
# export HF_HOME=/shared/hf-cache    # a shared hub cache, so that every node finds the weights

# Build the text-embedding cache (cache.path) once before the first run, on one node:
#   torchrun --standalone --nproc-per-node 8 -m cnet_train.cli embed "$CONFIG"

exec torchrun \
    --nnodes 2 \
    --nproc-per-node 8 \
    --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" \
    --rdzv-id "$RDZV_ID" \
    -m cnet_train.cli launch "$CONFIG" \
    --set trainer.num_nodes=2 \
    --set trainer.devices=8
