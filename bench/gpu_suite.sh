#!/usr/bin/env bash
# The GPU suite (issue 15): every accelerator figure docs/benchmarks.md needs, in one short run,
# so that rare GPU time is not spent on setting up. At most ~8 minutes on one H200 (--budget).
#
#   bench/gpu_suite.sh --out=DIR             # on the GPU machine (there: --out="$OUT")
#   bench/gpu_suite.sh --out=DIR --dry-run   # the same steps on CPU at tiny sizes (< 2 min)
#   bench/gpu_wheels.sh                      # once, where pip has a network: what to carry
#
# Steps, in this order, each under its own time limit (a step that fails or times out records
# an error line with its log's tail, and the suite goes on):
#   wheels          install the carried wheels in .whl/ (ml_collections, tensorboardX) into a
#                   temp dir on PYTHONPATH: the GPU machine has no network and lacks them
#   env             jax/jaxlib/CUDA versions, the device, bf16 8192^3 matmul TFLOP/s
#   train_1b        bench/train_step.py --size 1b --batch 8 --seq 2048 --peer-compile: SoFT
#                   (exits 8,...,22) and SFT, ours and the compiled PyTorch peer in one run
#   train_1b_tuned  the same, ours only, remat dots_with_no_batch_dims_saveable and
#                   --rows-per-chunk 8192 (why: below); only if the rest still fits the budget
#   decode          bench/decode.py, random 16-layer width-2048 model, bf16: ms/token per
#                   depth k, speculative and early-exit rows
#   train_tiny      wall time of python -m sorted_jax.train --config=configs/tiny.py
# then `targets` (the issue's targets checked on this run's figures) and `done`.
#
# Output: one JSON line per figure on stdout, as soon as it is measured, and the same lines in
# DIR/results.jsonl; everything else (the benchmarks' text, warnings) in DIR/suite.log, plus
# DIR/tiny_exit_table.md. Three files: the device tool brings back at most 8.
#
# Options:
#   --out=DIR        results dir (default runs/gpu_suite); its files are rewritten
#   --dry-run, -n    CPU only (JAX_PLATFORMS=cpu, CUDA_VISIBLE_DEVICES=, LLVM -O0), tiny
#                    shapes; the peer in fp32 and eager (torch.compile on CPU takes minutes)
#   --budget=S       seconds for the whole suite (default 480; dry run 300): a step is skipped,
#                    with a line saying so, when less time is left than it needs
#   PYTHON           default python3 (on the GPU machine: /opt/torch/.venv/bin/python3)
#
# The repo need not be installed: PYTHONPATH is set to the repo root (after the wheels' dir).
# The peer script is .gpu_carry/peer_soft_torch.py (copied by bench/gpu_wheels.sh; only the
# repo travels to the GPU machine), else ../shared/bench/peer_soft_torch.py.
#
# Why step 3's settings (TinyLlama-1.1B shape, 8 x 2048 tokens, 8 exits, one 141 GiB H200):
#   The 1.25x tokens/s target means ~530 model TFLOP/s (9.5 GFLOP a token x 55.8k tokens/s),
#   two thirds of the ~790 TFLOP/s a bf16 matmul reaches there: no room to recompute matmuls,
#   so step 2 runs remat none (train_step.py's default). The 0.6x memory target (37.5 GiB) is the tighter one there: fp32 params, grads
#   and Adam moments are ~16.4 GiB, the exits' [K, B, T, D] hidden states and cotangent ~2.7 GiB,
#   and remat none keeps ~1 GiB of activations a layer (~23 GiB for 22 layers): ~42 GiB.
#   dots_with_no_batch_dims_saveable keeps only the projections' outputs (q/k/v/o, gate/up/down:
#   ~0.55 GiB a layer, ~12 GiB) and recomputes the element-wise ops and the flash attention
#   forward (a few % of the FLOPs): ~31 GiB for a few % of time. full remat (+33% of the layer
#   FLOPs) or save_qkv_and_out_proj (recomputes the MLP: ~78% of the layer matmuls) would miss
#   the tokens/s target by far. rows_per_chunk 8192: with 8 exits x batch 8 a chunk is then 128
#   tokens, 16 loop trips of [8192, 2048] x [2048, 32000] matmuls instead of 32 trips of
#   half that; the per-trip overhead halves, for 1 GiB more of fp32 logits (2 GiB at 16384).
#   Which setting wins is what step 3 measures.
set -uo pipefail # no -e: a failing step records an error line and the suite goes on

PROG=bench/gpu_suite.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# shellcheck source-path=SCRIPTDIR source=../launch/quote.sh
source "$REPO/launch/quote.sh" # qjoin

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

OUT_DIR=runs/gpu_suite
DRY=0
BUDGET=""
PY=${PYTHON:-python3}
while (($#)); do
  case $1 in
    -h | --help)
      sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -n | --dry-run) DRY=1 ;;
    --out=* | --budget=*)
      [[ -n ${1#*=} ]] || die "${1%%=*} needs a value"
      case $1 in
        --out=*) OUT_DIR=${1#*=} ;;
        --budget=*) BUDGET=${1#*=} ;;
      esac
      ;;
    --out | --budget)
      (($# >= 2)) || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"
      continue
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ -z $BUDGET || $BUDGET =~ ^[0-9]+$ ]] || die "--budget takes whole seconds, got '$BUDGET'"
BUDGET=${BUDGET:-$((DRY ? 300 : 480))}

mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
OUT=$(cd "$OUT_DIR" && pwd)
LOG=$OUT/suite.log
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX") || die "mktemp failed"
trap 'rm -rf "$TMP"' EXIT
T0=$(date +%s.%N)
SECONDS=0
cd "$REPO" || die "cannot cd to $REPO"

say() { printf '# %s\n' "$*" | tee -a "$LOG" >&2; }

record() { # record CMD [ARGS...]: one line through bench/gpu_record.py
  local cmd=$1
  shift
  local extra=()
  if ((DRY)); then extra+=(--dry-run); fi
  "$PY" "$REPO/bench/gpu_record.py" "$cmd" --out "$OUT" --t0 "$T0" "${extra[@]}" "$@"
}

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { print b - a }'; } # seconds since $1

# run_step NAME LIMIT NEED PARSE CMD...: run CMD under `timeout LIMIT` (less if less of the
# budget is left), or skip it when less than NEED seconds are left. PARSE: json | decode (pipe
# stdout through gpu_record.py) or none (stdout to the log; the caller records). Sets STEP_RC
# and STEP_WALL (seconds).
STEP_RC=0 STEP_WALL=0
run_step() {
  local name=$1 limit=$2 need=$3 parse=$4
  shift 4
  local left=$((BUDGET - SECONDS)) steplog=$TMP/$name.log
  STEP_RC=0
  if ((left < need)); then
    say "skip $name: needs ~${need}s, ${left}s of the ${BUDGET}s budget left"
    record skip --step "$name" --reason "needs ~${need} s, ${left} s of the ${BUDGET} s budget left"
    STEP_RC=-1
    return
  fi
  if ((limit > left)); then limit=$left; fi
  record note --step "$name" figure=command "command=$(qjoin "$@")" "timeout_s=$limit"
  say "step $name (limit ${limit}s): $(qjoin "$@")"
  : >"$steplog"
  local t_start
  t_start=$(date +%s.%N)
  if [[ $parse == none ]]; then
    timeout --kill-after=10 "$limit" "$@" >>"$steplog" 2>&1
    STEP_RC=$?
  else
    local flags=()
    if [[ $parse == decode ]]; then flags+=(--decode); fi
    timeout --kill-after=10 "$limit" "$@" 2>>"$steplog" |
      record pipe --step "$name" "${flags[@]}" 2>>"$steplog"
    STEP_RC=${PIPESTATUS[0]}
  fi
  STEP_WALL=$(since "$t_start")
  { printf '\n## %s (exit %s)\n' "$name" "$STEP_RC"; cat "$steplog"; } >>"$LOG"
  if ((STEP_RC != 0)); then
    say "step $name failed (exit $STEP_RC); the suite goes on"
    record error --step "$name" --rc "$STEP_RC" --timeout "$limit" --log "$steplog"
  fi
}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore # no network there
# One compile of each train step, not two: train_step.py's memory plan (lower().compile())
# and its first jitted call share a persistent-cache entry (seen: the second compile of the
# step took 0.09 s instead of 6.5 s on CPU), and SoFT reuses SFT's compiled init.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$TMP/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
if ((DRY)); then
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  # Not the caller's XLA_FLAGS (e.g. the tests' 8 fake devices: the benchmarks want one); LLVM
  # at -O0: the dry run's time is compiling (~100 small programs), not running.
  export XLA_FLAGS=--xla_backend_optimization_level=0
else
  # JAX takes 75% of the GPU up front by default; the PyTorch peer runs in a child of
  # train_step.py while JAX still holds its memory, so JAX allocates as it goes instead.
  export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
fi
: >"$LOG"
: >"$OUT/results.jsonl" # one run per file: the targets line reads this run's figures only
rm -f "$OUT/tiny_exit_table.md"
say "sorted_jax GPU suite: dry run $DRY, budget ${BUDGET}s, out $OUT, python $PY"

# -- wheels: what the GPU machine lacks, carried in .whl/ --------------------------------------
SITE=$TMP/site
shopt -s nullglob
WHEELS=("$REPO"/.whl/*.whl)
shopt -u nullglob
if ((${#WHEELS[@]})); then
  if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "${WHEELS[@]}" >>"$LOG" 2>&1; then
    record note --step wheels figure=wheels "installed=${WHEELS[*]##*/}"
  else
    record error --step wheels --rc 1 --log "$LOG"
  fi
else
  record note --step wheels figure=wheels "installed=none (no .whl/: bench/gpu_wheels.sh makes it)"
fi
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
TINY_EXTRA=()
if ! "$PY" -c "import tensorboardX" >>"$LOG" 2>&1; then
  TINY_EXTRA+=(--config.tensorboard=False) # the trainer's only use of it
  record note --step wheels figure=note "tensorboardX=not importable: step train_tiny runs with --config.tensorboard=False"
fi

PEER=""
for p in "$REPO/.gpu_carry/peer_soft_torch.py" "$REPO/../shared/bench/peer_soft_torch.py"; do
  if [[ -f $p ]]; then
    PEER=$p
    break
  fi
done

# -- the steps --------------------------------------------------------------------------------
# L_*: a step's own time limit; N_*: skip it when fewer seconds are left (a step that cannot
# finish would only take time from the next). Step 2's limit leaves room for two torch.compile
# runs of the peer; step 3's N is its limit plus what steps 4 and 5 need, so the optional step
# never squeezes out the ones after it (at the default budget it runs only if step 2 was quick:
# pass a larger --budget to have it). GPU times are estimates until a first run.
if ((DRY)); then
  ENV_ARGS=(--n 256 --rounds 2 --reps 2)
  TRAIN=(--size tiny --batch 2 --seq 64 --steps 1 --warmup 1 --dtype float32 --attention xla)
  DECODE=(--layers 2 --width 64 --vocab 128 --prompt-len 8 --new-tokens 16 --repeats 2)
  TINY=(--config.num_steps=2 --config.eval_batches=1 --config.eval_at_start=False
    --config.log_every=1)
  L_ENV=60 L_TRAIN=120 L_TUNED=90 L_DECODE=90 L_TINY=120
  N_ENV=10 N_TRAIN=10 N_TUNED=120 N_DECODE=10 N_TINY=10
else
  ENV_ARGS=()
  TRAIN=(--size 1b --batch 8 --seq 2048 --peer-compile)
  DECODE=(--layers 16 --width 2048 --vocab 32000 --new-tokens 128 --repeats 3)
  TINY=()
  L_ENV=60 L_TRAIN=330 L_TUNED=150 L_DECODE=150 L_TINY=120
  N_ENV=20 N_TRAIN=120 N_TUNED=310 N_DECODE=75 N_TINY=40
fi
TUNED=(--remat dots_with_no_batch_dims_saveable --rows-per-chunk 8192 --no-peer)
PEER_ARGS=(--no-peer)
if [[ -n $PEER ]]; then
  PEER_ARGS=(--peer-script "$PEER")
else
  record note --step train_1b figure=peer_missing "peer=not found in .gpu_carry/ or ../shared/bench/ (run bench/gpu_wheels.sh)"
fi

run_step env "$L_ENV" "$N_ENV" json "$PY" bench/gpu_env.py "${ENV_ARGS[@]}"
run_step train_1b "$L_TRAIN" "$N_TRAIN" json \
  "$PY" bench/train_step.py "${TRAIN[@]}" "${PEER_ARGS[@]}"
run_step train_1b_tuned "$L_TUNED" "$N_TUNED" json \
  "$PY" bench/train_step.py "${TRAIN[@]}" "${TUNED[@]}"
run_step decode "$L_DECODE" "$N_DECODE" decode \
  "$PY" bench/decode.py "${DECODE[@]}" --dtype bfloat16

WORKDIR=$TMP/tiny # checkpoints and events stay out of DIR (the tool brings back 8 files)
run_step train_tiny "$L_TINY" "$N_TINY" none \
  "$PY" -m sorted_jax.train --config=configs/tiny.py --workdir="$WORKDIR" "${TINY[@]}" \
  "${TINY_EXTRA[@]}"
if ((STEP_RC == 0)); then
  record train-run --step train_tiny --workdir "$WORKDIR" --wall-s "$STEP_WALL" \
    --extra "$(qjoin "${TINY[@]}" "${TINY_EXTRA[@]}")"
  cp "$WORKDIR/exit_table.md" "$OUT/tiny_exit_table.md" 2>/dev/null
fi

record finish --step suite --wall-s "$(since "$T0")" --budget "$BUDGET"
say "done in ${SECONDS}s; figures in $OUT/results.jsonl"
