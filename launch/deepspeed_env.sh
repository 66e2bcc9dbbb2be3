#!/usr/bin/env bash
# Write ./.deepspeed_env from this shell's environment, so that a multi-node `deepspeed` launch gives every node the
# variables the training needs.
#
#   export WANDB_PROJECT=frrn OMP_NUM_THREADS=8 TORCH_EXTENSIONS_DIR=/shared/cache/torch_extensions
#   bash launch/deepspeed_env.sh [--with-secrets] [EXTRA_VAR ...]
#   .venv/bin/deepspeed -H launch/hostfile --master_addr node1 launch/train.py --config configs/frrn_b.yaml
#
# Why: the pdsh launcher starts the ranks over ssh with a fresh environment and forwards only variables whose names
# start with PYTHON, MLFLOW, MV2, UCX (and NCCL, when the launching node itself has a GPU), plus the KEY=VALUE lines
# of .deepspeed_env in the directory you launch from (and in ~; set DS_ENV_FILE to use another file name).
# `--launcher openmpi` forwards the same set with `mpirun -x`; `--launcher slurm` uses `srun --export=ALL`.
#
# Copied when set: WANDB_* (except WANDB_API_KEY), OMP_NUM_THREADS, MKL_NUM_THREADS, TORCH_* (TORCH_EXTENSIONS_DIR
# caches DeepSpeed's JIT builds), DS_*, DEEPSPEED_TIMEOUT, DALI_*, NCCL_*, GLOO_SOCKET_IFNAME, TP_SOCKET_IFNAME,
# HF_HOME, XDG_CACHE_HOME, MASTER_ADDR, MASTER_PORT (needed by --launcher openmpi), and any EXTRA_VAR named on the
# command line. Not copied: CUDA_VISIBLE_DEVICES (the launcher sets it per node) and PYTHON* (forwarded already;
# the runner also prepends the launch directory to PYTHONPATH, which a snapshot would undo).
# WANDB_API_KEY is a secret: it is copied only with --with-secrets (the file is mode 600 either way). The usual way
# is `wandb login` once, which writes ~/.netrc; a shared home gives it to every node.
#
# Run it again whenever one of these changes: the file is a snapshot, rewritten whole (atomically) each time.
# The runner splits every line at its first "=", so the file holds no comments or blank lines; values holding a
# newline, quote, backquote, $ or backslash are refused (the remote shell would expand them).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

with_secrets=0
extra=()
for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        --with-secrets) with_secrets=1 ;;
        -*) echo "deepspeed_env.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
        *)
            if [[ ! "$arg" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
                echo "deepspeed_env.sh: $arg is not a variable name" >&2
                exit 2
            fi
            extra+=("$arg")
            ;;
    esac
done

pattern='^(WANDB_[A-Z0-9_]*|OMP_NUM_THREADS|MKL_NUM_THREADS|TORCH_[A-Z0-9_]*|DS_[A-Z0-9_]*|DEEPSPEED_TIMEOUT|DALI_[A-Z0-9_]*|NCCL_[A-Z0-9_]*|GLOO_SOCKET_IFNAME|TP_SOCKET_IFNAME|HF_HOME|XDG_CACHE_HOME|MASTER_ADDR|MASTER_PORT)$'
out="${DS_ENV_FILE:-.deepspeed_env}"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
umask 077  # the file can hold tokens and host names; it is for this user only
: >"$tmp"

names=$(compgen -e | sort -u)
written=()
for name in $names ${extra[@]+"${extra[@]}"}; do
    [[ "$name" =~ $pattern ]] || [[ " ${extra[*]-} " == *" $name "* ]] || continue
    [[ "$name" == CUDA_VISIBLE_DEVICES || "$name" == DS_ENV_FILE ]] && continue
    [[ "$name" == WANDB_API_KEY && $with_secrets == 0 ]] && continue
    [[ " ${written[*]-} " == *" $name "* ]] && continue
    if [[ -z "${!name+set}" ]]; then
        echo "deepspeed_env.sh: $name is not set in this shell, skipped" >&2
        continue
    fi
    value="${!name}"
    if [[ "$value" == *[$'\n'\"\`\$\\]* ]]; then
        # pdsh runs `export NAME="value";` in a remote shell, which would expand or break on these
        echo "deepspeed_env.sh: $name holds a newline, quote, backquote, \$ or backslash; set it on the nodes instead" >&2
        exit 1
    fi
    printf '%s=%s\n' "$name" "$value" >>"$tmp"
    written+=("$name")
done
mv -f "$tmp" "$out"
trap - EXIT
echo "wrote $(pwd)/$out with ${#written[@]} variable(s): ${written[*]-}"
