#!/usr/bin/env bash
# Training of sorted_jax on one multi-GPU host: one process that owns every visible GPU (no
# jax.distributed; JAX sees all local GPUs and the config's mesh spans them).
#
#   launch/gpu_local.sh --workdir=runs/soft_7b [--config=configs/soft_7b.py] [--gpus=0,1,2,3] \
#       [--mesh=1,-1,1] [--] [--config.key=value ...]
#   launch/gpu_local.sh --dry-run --workdir=...     # print the exports and the command only
#
# Mesh: axes (data, fsdp, tensor), one -1 takes the remaining devices. --mesh=D,F,T is short for
# --config.mesh.shape=D,F,T; without it the config's own mesh is used (the Alpaca configs:
# 1,-1,1 = FSDP over all GPUs). E.g. 8 GPUs: 1,-1,1 shards params/optimizer 8 ways; 2,-1,1 is
# 2-way data parallel x 4-way FSDP; 1,-1,2 adds 2-way tensor parallelism.
#
# Settings (arguments win over the environment):
#   --config=FILE    SORTED_JAX_CONFIG      default configs/soft_7b.py (a relative path: the
#                                           current dir, else the repo)
#   --workdir=DIR    SORTED_JAX_WORKDIR     required (checkpoints, logs; re-run to resume)
#   --gpus=LIST      CUDA_VISIBLE_DEVICES   which GPUs (default: all)
#   --mesh=D,F,T     SORTED_JAX_MESH        default: the config's
#   other arguments  SORTED_JAX_TRAIN_ARGS  (whitespace-separated) passed on to sorted_jax.train
#   --dry-run / -n   DRY_RUN=1              print, do not run
#   PYTHON           default `python` (with the package installed: pip install -e .)
#   XLA_PYTHON_CLIENT_MEM_FRACTION  default 0.90 when unset (JAX's own default is 0.75)
#   XLA_FLAGS        default --xla_gpu_enable_latency_hiding_scheduler=true when unset (overlaps
#                    the FSDP all-gathers/reduce-scatters with compute); XLA_FLAGS= for none.
#                    More to try (jaxlib 0.10 knows them all):
#                      --xla_gpu_enable_pipelined_all_gather=true
#                      --xla_gpu_enable_pipelined_reduce_scatter=true
#                      --xla_gpu_enable_while_loop_double_buffering=true
#                      --xla_gpu_all_gather_combine_threshold_bytes=134217728
#                      --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
#                      --xla_gpu_enable_command_buffer=     (no CUDA graphs, when debugging)
# Attention runs cuDNN flash attention in bf16 on GPUs by default (attention_impl=auto).
# Ctrl-C or `kill -TERM PID` (the trainer is exec'd: PID is this script's) saves a checkpoint.
set -euo pipefail

PROG=launch/gpu_local.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR source=quote.sh
source "$SCRIPT_DIR/quote.sh"  # q, qjoin

setenv() {  # setenv NAME VALUE: export, and print it
  export "$1=$2"
  printf '+ export %s=%s\n' "$1" "$(q "$2")"
}

DRY_RUN=${DRY_RUN:-0}
CONFIG=${SORTED_JAX_CONFIG:-configs/soft_7b.py}
WORKDIR=${SORTED_JAX_WORKDIR:-}
MESH=${SORTED_JAX_MESH:-}
GPUS=""
PYTHON=${PYTHON:-python}
read -r -a TRAIN_ARGS <<<"${SORTED_JAX_TRAIN_ARGS:-}"

while (($#)); do
  case $1 in
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -n | --dry-run) DRY_RUN=1 ;;
    --config=* | --workdir=* | --gpus=* | --mesh=*)
      [[ -n ${1#*=} ]] || die "${1%%=*} needs a value"
      case $1 in
        --config=*) CONFIG=${1#*=} ;;
        --workdir=*) WORKDIR=${1#*=} ;;
        --gpus=*) GPUS=${1#*=} ;;
        --mesh=*) MESH=${1#*=} ;;
      esac
      ;;
    --config | --workdir | --gpus | --mesh)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue
      ;;
    --)
      shift
      TRAIN_ARGS+=("$@")
      break
      ;;
    *) TRAIN_ARGS+=("$1") ;;
  esac
  shift
done

if [[ -z $WORKDIR ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    WORKDIR=runs/YOUR_RUN
    printf '%s: workdir not set (pass --workdir=DIR or set SORTED_JAX_WORKDIR); printing %s\n' \
      "$PROG" "$WORKDIR" >&2
  else
    die "the workdir is not set: pass --workdir=DIR or set SORTED_JAX_WORKDIR"
  fi
fi
if [[ -n $GPUS && ! $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die "--gpus takes GPU indices like 0,1,2,3, got '$GPUS'"
fi
if [[ -n $MESH && ! $MESH =~ ^-?[0-9]+,-?[0-9]+,-?[0-9]+$ ]]; then
  die "--mesh takes data,fsdp,tensor sizes like 1,-1,1, got '$MESH'"
fi

REPO_DIR=$(dirname "$SCRIPT_DIR")
# A relative --config is looked up in the current directory, then in the repo.
config_file=${CONFIG%%:*}  # ml_collections allows FILE:ARG
if [[ $config_file != /* && ! -f $config_file && -f $REPO_DIR/$config_file ]]; then
  CONFIG=$REPO_DIR/$CONFIG
fi

if [[ -n $GPUS ]]; then setenv CUDA_VISIBLE_DEVICES "$GPUS"; fi
if [[ -z ${XLA_PYTHON_CLIENT_MEM_FRACTION+set} ]]; then setenv XLA_PYTHON_CLIENT_MEM_FRACTION 0.90; fi
if [[ -z ${XLA_FLAGS+set} ]]; then
  setenv XLA_FLAGS --xla_gpu_enable_latency_hiding_scheduler=true
fi

cmd=("$PYTHON" -m sorted_jax.train --config="$CONFIG" --workdir="$WORKDIR")
if [[ -n $MESH ]]; then cmd+=(--config.mesh.shape="$MESH"); fi
cmd+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
printf '+ %s\n' "$(qjoin "${cmd[@]}")"
if [[ $DRY_RUN != 1 ]]; then
  exec "${cmd[@]}"
fi
