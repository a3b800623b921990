#!/usr/bin/env bash
# torchrun on several machines: run this script on each, with the same MASTER_ADDR and its own NODE_RANK.
#   MASTER_ADDR=10.0.0.1 NODE_RANK=0 NNODES=4 GPUS_PER_NODE=8 tools/launch/torchrun_multinode.sh \
#       recipe=dreambooth_lora output_dir=/shared/runs/dog data.instance_dir=/shared/photos/dog ...
# Everything after the script's name is passed to tuner unchanged. output_dir must be fixed (not a timestamp)
# so that a relaunch with resume=auto finds the run; TUNER_HOME and model.path on a shared filesystem too.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the machine with NODE_RANK=0}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
exec torchrun \
  --nnodes "${NNODES:-2}" \
  --node_rank "$NODE_RANK" \
  --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" \
  -m tuner "$@"
