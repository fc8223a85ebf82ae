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
    local name value
    for name in NPROC_PER_NODE MAX_RESTARTS; do
        value=${!name:-}
        [[ -z $value || $value =~ ^[0-9]+$ ]] || usage_error "--${name,,}=$value must be a whole number"
    done
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
