#!/usr/bin/env bash
# Train across several machines: run this once on every node, with the same arguments.
#
#   launch/multi_node.sh --nnodes=N --rdzv_endpoint=HOST:PORT [--rdzv_id=ID] [--nproc_per_node=G] \
#                        [--max_restarts=R] CONFIG [--key=value ...]
#
#   # on each of 4 nodes (node0 is any one of them, reachable from the others):
#   launch/multi_node.sh --nnodes=4 --rdzv_endpoint=node0:29500 --rdzv_id=owt-124m config/owt.py
#
# The nodes meet through torchrun's c10d rendezvous at HOST:PORT (the first node to arrive hosts it;
# PORT must be free and open between the nodes). --nnodes=MIN:MAX makes the job elastic. --rdzv_id
# names the job (default gptforge): two jobs sharing an endpoint need different ids. Each option can
# also come from the environment (NNODES, RDZV_ENDPOINT, RDZV_ID, NPROC_PER_NODE, MAX_RESTARTS).
# G defaults to the node's GPU count (1 without GPUs); R to 3.
#
# Failures: when a worker dies or hangs (past dist_timeout_s), torchrun stops the workers on every
# node and starts them again, up to R times; a scratch run uses init_from=auto, so they resume from
# the last checkpoint in out_dir, which must therefore be on storage every node sees (NFS, Lustre):
# rank 0 writes it, every rank reads it.
#
# Network knobs (environment variables; export them on every node):
#   NCCL_SOCKET_IFNAME=eth0    the interface NCCL uses for its sockets/bootstrap (multi-homed hosts;
#                              `ip addr` lists them; '^lo,docker' excludes instead)
#   GLOO_SOCKET_IFNAME=eth0    the same for the small CPU (gloo) group used for stop/preemption flags
#   NCCL_IB_DISABLE=1          no InfiniBand/RoCE: use TCP sockets (clusters without IB, or a broken IB)
#   NCCL_DEBUG=INFO            print NCCL's setup (which transport, which interface) to debug a slow
#                              or hanging start; WARN shows only problems
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (torch's default) aborts a rank whose NCCL collective timed out,
#                              so the job fails and restarts instead of hanging
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

parse_launcher_options "$@"
set -- "${TRAIN_ARGS[@]}"
USAGE="usage: launch/multi_node.sh --nnodes=N --rdzv_endpoint=HOST:PORT [--rdzv_id=ID] [--nproc_per_node=G] [--max_restarts=R] CONFIG [--key=value ...]"
[[ $# -ge 1 ]] || usage_error "$USAGE"
wants_help "$@" && exec "$PYTHON" train.py --help
[[ -n ${NNODES:-} ]] || usage_error "--nnodes is missing (the number of nodes, or MIN:MAX); $USAGE"
[[ -n ${RDZV_ENDPOINT:-} ]] || usage_error "--rdzv_endpoint is missing (HOST:PORT of one node, the same on every node); $USAGE"
check_rendezvous_options
NPROC=${NPROC_PER_NODE:-$(local_gpu_count)}
[[ $NPROC -ge 1 ]] || NPROC=1
INIT=$(init_from_args "$@")

exec "$PYTHON" -m forge.launch --nnodes="$NNODES" --nproc_per_node="$NPROC" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-gptforge}" \
    --max_restarts="${MAX_RESTARTS:-3}" \
    train.py "$1" ${INIT:+"$INIT"} "${@:2}"
