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
# limits them); on a machine without GPUs, train.py's CPU plan: one per physical core with one thread
# each (cpu_procs, OMP_NUM_THREADS; forge/cpulaunch.py). Restarts: --max_restarts (or MAX_RESTARTS),
# default 3. A config that starts from scratch runs with init_from=auto, so a restart (or running
# this again) resumes from out_dir/ckpt.pt; a fine-tuning config keeps its init_from and torchrun's
# restarts resume it. The config is checked before any process starts.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

# "PROCESSES THREADS" of train.py's CPU plan for these arguments (THREADS None: torch's default)
cpu_plan() {
    "$PYTHON" - "$@" <<'PY'
import sys

from configurator import load_config
from forge.cpulaunch import available_memory, physical_cores, plan_processes
from forge.errors import run_main

run_main(lambda: print(*plan_processes(load_config(sys.argv[1:], prog="train.py"), physical_cores(),
                                       memory=available_memory())))
PY
}

parse_launcher_options "$@"
set -- "${TRAIN_ARGS[@]}"
[[ $# -ge 1 ]] || usage_error "usage: launch/single_node.sh [--nproc_per_node=N] [--max_restarts=N] CONFIG [--key=value ...]"
wants_help "$@" && exec "$PYTHON" train.py --help
INIT=$(init_from_args "$@")  # checks the config first: one error line
NPROC=${NPROC_PER_NODE:-$(local_gpu_count)}
if [[ -z ${NPROC_PER_NODE:-} && $NPROC -eq 0 ]]; then  # no GPUs: train.py's CPU plan
    PLAN=$(cpu_plan "$@")
    read -r NPROC THREADS <<< "$PLAN"
    [[ $THREADS == None ]] || export OMP_NUM_THREADS=$THREADS
fi
[[ $NPROC -ge 1 ]] || NPROC=1

exec "$PYTHON" -m forge.launch --standalone --nproc_per_node="$NPROC" --max_restarts="${MAX_RESTARTS:-3}" \
    train.py "$1" ${INIT:+"$INIT"} "${@:2}"
