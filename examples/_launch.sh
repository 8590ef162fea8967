# shellcheck shell=bash
# Shared launcher of examples/run_{sft,rlvr,opd,opsd}.sh; sourced by them, not run on its own.
#
#   examples/run_<stage>.sh [--dry-run] RECIPE [key=value ...]
#
# Outside torchrun it starts torchrun for this node from the usual variables:
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   GPUS_PER_NODE (the GPUs nvidia-smi lists, else 1)
#   SHUTDOWN_TIMEOUT (300): seconds the ranks get to checkpoint after a preemption signal
# Under torchrun (`torchrun ... --no-python examples/run_opd.sh RECIPE`, or any launcher that
# started one process per GPU and exported RANK, LOCAL_RANK, WORLD_SIZE) it execs the entry point.
# --dry-run prints the command instead of running it. PYTHON overrides the interpreter and
# TORCHRUN the launcher.

opd_usage() {
    echo "usage: $0 [--dry-run] RECIPE [key=value ...]   (runs stage '$1' of RECIPE)"
}

# The stage a recipe file names itself (empty when it inherits it through `defaults:`).
opd_recipe_stage() {
    sed -n 's/^stage:[[:space:]]*\([a-z]*\).*/\1/p' "$1" | tail -n 1
}

opd_gpu_count() {
    local count=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [ "$count" -gt 0 ]; then echo "$count"; else echo 1; fi
}

# torchrun (or an srun task per GPU) already made this process one rank.
opd_under_launcher() {
    [ -n "${TORCHELASTIC_RUN_ID:-}" ] || { [ -n "${LOCAL_RANK:-}" ] && [ -n "${RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ]; }
}

opd_print_command() {
    printf '%q' "$1"
    shift
    printf ' %q' "$@"
    printf '\n'
}

opd_launch() {
    local stage=$1 dry_run=0 recipe=""
    shift
    local -a overrides=()
    while [ $# -gt 0 ]; do
        case $1 in
            --dry-run) dry_run=1 ;;
            -h|--help) opd_usage "$stage"; return 0 ;;
            -*) echo "error: unknown option $1" >&2; opd_usage "$stage" >&2; return 2 ;;
            *) if [ -z "$recipe" ]; then recipe=$1; else overrides+=("$1"); fi ;;
        esac
        shift
    done
    if [ -z "$recipe" ]; then
        opd_usage "$stage" >&2
        return 2
    fi
    if [ ! -f "$recipe" ]; then
        echo "error: recipe $recipe not found" >&2
        return 2
    fi
    local named
    named=$(opd_recipe_stage "$recipe")
    if [ -n "$named" ] && [ "$named" != "$stage" ]; then
        echo "error: $recipe names stage '$named'; run it with examples/run_$named.sh" >&2
        return 2
    fi

    local repo
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    # A source checkout runs without being installed.
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    # Megatron's tensor-parallel communication overlap relies on one CUDA work queue per device.
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

    local -a entry=(-m opd_megatron train --config "$recipe" "stage=$stage" "${overrides[@]}")
    local -a cmd
    if opd_under_launcher; then
        cmd=("${PYTHON:-python}" "${entry[@]}")
    else
        cmd=("${TORCHRUN:-torchrun}"
             "--nnodes=${NNODES:-1}"
             "--node-rank=${NODE_RANK:-0}"
             "--master-addr=${MASTER_ADDR:-127.0.0.1}"
             "--master-port=${MASTER_PORT:-29500}"
             "--nproc-per-node=${GPUS_PER_NODE:-$(opd_gpu_count)}"
             # Forward SLURM's warning signal to the ranks too (they checkpoint and exit 0: the
             # recipe's trainer.preempt_signals), and give them time to write that checkpoint
             # before torchrun's SIGKILL.
             "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
             "--shutdown-timeout=${SHUTDOWN_TIMEOUT:-300}"
             "${entry[@]}")
    fi
    if [ "$dry_run" = 1 ]; then
        opd_print_command "${cmd[@]}"
        return 0
    fi
    exec "${cmd[@]}"
}
