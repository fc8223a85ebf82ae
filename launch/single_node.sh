#!/usr/bin/env bash
# Train on every GPU of this machine (or on the CPU), restarting from the last checkpoint if a worker dies.
#
#   launch/single_node.sh [--nproc_per_node=N] [--max_restarts=N] CONFIG [--key=value ...]
#
#   launch/single_node.sh config/owt.py                          # all local GPUs, DDP
#   launch/single_node.sh config/owt.py --parallelism=fsdp       # shard instead of replicate
#   launch/single_node.sh --nproc_per_node=2 config/shakespeare_char_cpu.py --device=cpu
#
# Processes: --nproc_per_node (or NPROC_PER_NODE), default one per visible GPU (CUDA_VISIBLE_DEVICES
# limits them), one process on a machine without GPUs. Restarts: --max_restarts (or MAX_RESTARTS),
# default 3. A config that starts from scratch runs with init_from=auto, so a restart (or running
# this again) resumes from out_dir/ckpt.pt; a fine-tuning config keeps its init_from and torchrun's
# restarts resume it. The config is checked before any process starts.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

parse_launcher_options "$@"
set -- "${TRAIN_ARGS[@]}"
[[ $# -ge 1 ]] || usage_error "usage: launch/single_node.sh [--nproc_per_node=N] [--max_restarts=N] CONFIG [--key=value ...]"
wants_help "$@" && exec "$PYTHON" train.py --help
NPROC=${NPROC_PER_NODE:-$(local_gpu_count)}
[[ $NPROC -ge 1 ]] || NPROC=1
INIT=$(init_from_args "$@")

exec "$PYTHON" -m forge.launch --standalone --nproc_per_node="$NPROC" --max_restarts="${MAX_RESTARTS:-3}" \
    train.py "$1" ${INIT:+"$INIT"} "${@:2}"
