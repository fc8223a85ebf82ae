# Shared by the launchers (sourced, not run): the Python to use, option parsing, config checks.

PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || command -v python3 || command -v python )}

usage_error() {
    echo "error: $1" >&2
    exit 2
}

# Launcher options (--name=value, before or among the training arguments) become variables;
# everything else is passed to train.py, in order, as TRAIN_ARGS.
parse_launcher_options() {
    TRAIN_ARGS=()
    local arg
    for arg in "$@"; do
        case "$arg" in
            --nproc_per_node=*|--nproc-per-node=*) NPROC_PER_NODE=${arg#*=} ;;
            --max_restarts=*|--max-restarts=*)     MAX_RESTARTS=${arg#*=} ;;
            --nnodes=*)                            NNODES=${arg#*=} ;;
            --rdzv_endpoint=*|--rdzv-endpoint=*)   RDZV_ENDPOINT=${arg#*=} ;;
            --rdzv_id=*|--rdzv-id=*)               RDZV_ID=${arg#*=} ;;
            *) TRAIN_ARGS+=("$arg") ;;
        esac
    done
    # plain decimal numbers only: bash arithmetic reads 08 as bad octal, and 0 processes would run nothing
    [[ -z ${NPROC_PER_NODE:-} || $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
        usage_error "--nproc_per_node=$NPROC_PER_NODE must be a whole number of processes, 1 or more (no leading zeros)"
    [[ -z ${MAX_RESTARTS:-} || $MAX_RESTARTS =~ ^(0|[1-9][0-9]*)$ ]] ||
        usage_error "--max_restarts=$MAX_RESTARTS must be a whole number, 0 or more (no leading zeros)"
}

# --nnodes=N or MIN:MAX with 1 <= MIN <= MAX, and --rdzv_endpoint=HOST:PORT with a port in 1..65535.
check_rendezvous_options() {
    [[ $NNODES =~ ^([1-9][0-9]*)(:([1-9][0-9]*))?$ ]] ||
        usage_error "--nnodes=$NNODES must be a number of nodes (1 or more) or MIN:MAX"
    [[ -z ${BASH_REMATCH[3]} || ${BASH_REMATCH[1]} -le ${BASH_REMATCH[3]} ]] ||
        usage_error "--nnodes=$NNODES: MIN must not exceed MAX"
    [[ $RDZV_ENDPOINT =~ ^[^:]+:([1-9][0-9]*)$ ]] && (( ${#BASH_REMATCH[1]} <= 5 && BASH_REMATCH[1] <= 65535 )) ||
        usage_error "--rdzv_endpoint=$RDZV_ENDPOINT must be HOST:PORT with a port in 1..65535, e.g. node0:29500"
}

wants_help() {
    local arg
    for arg in "$@"; do [[ $arg == --help || $arg == -h ]] && return 0; done
    return 1
}

local_gpu_count() {
    "$PYTHON" -c "import torch; print(torch.cuda.device_count())"
}

# Check the training arguments once, before any process starts (one clear line on a mistake), and
# print --init_from=auto when the run starts from scratch: then every restart, and every later run
# of the launcher, resumes from out_dir/ckpt.pt. Other init_from values (resume, gpt2*) are kept.
init_from_args() {
    "$PYTHON" - "$@" <<'PY'
import sys

from configurator import load_config
from forge.errors import run_main


def check():
    cfg = load_config(sys.argv[1:], prog="train.py")
    if cfg.init_from == "scratch":
        print("--init_from=auto")


run_main(check)
PY
}
