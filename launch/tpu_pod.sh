#!/usr/bin/env bash
# SoFT / SFT training of sorted_jax on a Cloud TPU VM slice (one host or a multi-host pod).
# Run `launch/tpu_pod.sh --help` for the commands, settings and defaults.
set -euo pipefail

PROG=launch/tpu_pod.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<EOF
Usage: $PROG [OPTIONS] COMMAND [-- TRAIN_ARGS...]

Drive sorted_jax training on a Cloud TPU VM slice with gcloud. Every command is printed
(prefixed '+ ') before it runs; --dry-run prints them and runs nothing.

Commands:
  create   gcloud compute tpus tpu-vm create NAME (--spot / --preemptible optional)
  setup    copy the repo to every worker (or git-clone --repo URL there), then make a Python
           venv there (uv, Python \$SORTED_JAX_PYTHON) and install "jax[tpu]" and the package
  train    start 'python -m sorted_jax.train --config=CONFIG --workdir=WORKDIR
           --config.distributed.enabled=True TRAIN_ARGS...' on every worker in the background
           (nohup, output appended to LOG); refuses if a trainer is already running there
  tail     follow LOG of one worker (--worker, default 0)
  status   list the trainer processes on every worker
  stop     SIGTERM the trainer on every worker (it saves a checkpoint and exits), then wait for
           it to exit (at most --stop-timeout seconds)
  delete   gcloud compute tpus tpu-vm delete NAME --quiet

Options (each also from an environment variable; flags win):
  --name NAME               TPU_NAME              required
  --project PROJECT         TPU_PROJECT           required (falls back to CLOUDSDK_CORE_PROJECT)
  --zone ZONE               TPU_ZONE              default: us-east5-a
  --accelerator-type TYPE   TPU_TYPE              default: v5p-8
  --runtime-version VER     TPU_RUNTIME           default by TYPE: v6e* v2-alpha-tpuv6e,
                                                  v5p* v2-alpha-tpuv5, v5litepod*/v5e*
                                                  v2-alpha-tpuv5-lite, else tpu-ubuntu2204-base
  --spot | --preemptible    TPU_SPOT=1 | TPU_PREEMPTIBLE=1   (create only)
  --config FILE             SORTED_JAX_CONFIG     default: configs/soft_7b.py (in the repo)
  --workdir DIR             SORTED_JAX_WORKDIR    required by train. On a multi-host slice every
                                                  worker must see it: a shared mount, e.g. a
                                                  bucket mounted with gcsfuse on every worker
                                                  (gs:// URLs are refused); a relative path
                                                  is relative to the remote checkout
  --repo PATH|URL           SORTED_JAX_REPO       default: this checkout ($(dirname "$SCRIPT_DIR"))
                                                  A local dir is packed (git ls-files: tracked and
                                                  untracked-not-ignored files) and copied with
                                                  'tpu-vm scp'; a git URL is cloned on each worker
  --ref REF                 SORTED_JAX_REF        git URL only: branch/tag/commit (default HEAD)
  --remote-dir DIR          SORTED_JAX_REMOTE_DIR default: sorted_jax (relative to the remote home)
  --python VERSION          SORTED_JAX_PYTHON     default: 3.12 (jax>=0.10 needs Python >= 3.11;
                                                  the TPU images ship 3.10, so setup uses uv)
  --log FILE                SORTED_JAX_LOG        default: train.log (relative to --remote-dir)
  --env KEY=VALUE           (repeatable)          extra environment for the trainer
  --ssh-arg FLAG            TPU_SSH_ARGS (space-separated)  extra flag for 'tpu-vm ssh/scp',
                                                  e.g. --ssh-arg=--tunnel-through-iap
  --worker N                TPU_WORKER            tail only; default 0
  --stop-timeout SECONDS    SORTED_JAX_STOP_TIMEOUT  default: 900 (0: do not wait)
  -n, --dry-run                                   print the commands, run nothing. Missing
                                                  required settings become placeholders
                                                  (YOUR_PROJECT, YOUR_TPU_NAME, ...) with a note
  -h, --help

Everything after '--' goes to sorted_jax.train (train only), e.g.
  $PROG --name=soft --project=my-proj --workdir=/mnt/my-bucket/soft_7b train -- \\
      --config.exits=12,16,20,24,28,32 --config.mesh.shape=1,-1,1
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

note() { printf '%s: note: %s\n' "$PROG" "$*" >&2; }

# shellcheck source-path=SCRIPTDIR source=quote.sh
source "$SCRIPT_DIR/quote.sh"  # q, qjoin

# Print a command ('+ ' and its words, quoted), then run it unless --dry-run.
run() {
  printf '+ %s\n' "$(qjoin "$@")"
  if [[ $DRY_RUN != 1 ]]; then
    "$@"
  fi
}

# ------------------------------------------------------------------------------------------------
# settings

DRY_RUN=${DRY_RUN:-0}
NAME=${TPU_NAME:-}
PROJECT=${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ZONE=${TPU_ZONE:-us-east5-a}
TYPE=${TPU_TYPE:-v5p-8}
RUNTIME=${TPU_RUNTIME:-}
SPOT=${TPU_SPOT:-0}
PREEMPTIBLE=${TPU_PREEMPTIBLE:-0}
CONFIG=${SORTED_JAX_CONFIG:-configs/soft_7b.py}
WORKDIR=${SORTED_JAX_WORKDIR:-}
REPO=${SORTED_JAX_REPO:-$(dirname "$SCRIPT_DIR")}
REF=${SORTED_JAX_REF:-}
REMOTE_DIR=${SORTED_JAX_REMOTE_DIR:-sorted_jax}
PY_VERSION=${SORTED_JAX_PYTHON:-3.12}
LOG=${SORTED_JAX_LOG:-train.log}
WORKER=${TPU_WORKER:-0}
STOP_TIMEOUT=${SORTED_JAX_STOP_TIMEOUT:-900}
ENVS=()
read -r -a SSH_ARGS <<<"${TPU_SSH_ARGS:-}"
TRAIN_ARGS=()
CMD=""

set_opt() {  # set_opt --flag value
  [[ -n $2 ]] || die "$1 needs a value"
  case $1 in
    --name) NAME=$2 ;;
    --project) PROJECT=$2 ;;
    --zone) ZONE=$2 ;;
    --accelerator-type) TYPE=$2 ;;
    --runtime-version) RUNTIME=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --repo) REPO=$2 ;;
    --ref) REF=$2 ;;
    --remote-dir) REMOTE_DIR=$2 ;;
    --python) PY_VERSION=$2 ;;
    --log) LOG=$2 ;;
    --worker) WORKER=$2 ;;
    --stop-timeout) STOP_TIMEOUT=$2 ;;
    --ssh-arg) SSH_ARGS+=("$2") ;;
    --env)
      [[ $2 == [A-Za-z_]*=* && ${2%%=*} != *[!A-Za-z0-9_]* ]] || die "--env needs KEY=VALUE, got '$2'"
      ENVS+=("$2")
      ;;
  esac
}

VALUE_OPTS=" --name --project --zone --accelerator-type --runtime-version --config --workdir --repo \
--ref --remote-dir --python --log --worker --stop-timeout --env --ssh-arg "

while (($#)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    -n | --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --)
      shift
      TRAIN_ARGS=("$@")
      break
      ;;
    --*=*)
      [[ $VALUE_OPTS == *" ${1%%=*} "* ]] || die "unknown option '${1%%=*}' (see --help)"
      set_opt "${1%%=*}" "${1#*=}"
      ;;
    -*)
      [[ $VALUE_OPTS == *" $1 "* ]] || die "unknown option '$1' (see --help)"
      (($# >= 2)) || die "$1 needs a value"
      set_opt "$1" "$2"
      shift
      ;;
    *)
      [[ -z $CMD ]] || die "one command at a time, got '$CMD' and '$1' (see --help)"
      CMD=$1
      ;;
  esac
  shift
done

case $CMD in
  create | setup | train | tail | status | stop | delete) ;;
  "") die "no command given: create, setup, train, tail, status, stop or delete (see --help)" ;;
  *) die "unknown command '$CMD': use create, setup, train, tail, status, stop or delete" ;;
esac
if ((${#TRAIN_ARGS[@]})) && [[ $CMD != train ]]; then
  die "arguments after '--' are for 'train' only"
fi
if [[ $SPOT == 1 && $PREEMPTIBLE == 1 ]]; then
  die "--spot and --preemptible exclude each other"
fi
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker number (0, 1, ...), got '$WORKER'"
[[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "--stop-timeout must be a number of seconds, got '$STOP_TIMEOUT'"

# A required setting: its value, or in --dry-run a placeholder (and a note); else a clear error.
require() {  # require VAR what flag env placeholder
  if [[ -z ${!1} ]]; then
    if [[ $DRY_RUN == 1 ]]; then
      note "$2 is not set (pass $3 or set $4); printing the placeholder $5"
      printf -v "$1" '%s' "$5"
    else
      die "$2 is not set: pass $3 or set $4"
    fi
  fi
}

require NAME "the TPU name" "--name=NAME" "TPU_NAME" "YOUR_TPU_NAME"
require PROJECT "the Google Cloud project" "--project=PROJECT" "TPU_PROJECT" "YOUR_PROJECT"

if [[ -z $RUNTIME ]]; then
  case $TYPE in
    v6e*) RUNTIME=v2-alpha-tpuv6e ;;
    v5p*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod* | v5e*) RUNTIME=v2-alpha-tpuv5-lite ;;
    *) RUNTIME=tpu-ubuntu2204-base ;;
  esac
fi

TPU=(compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT")

# The trainer's processes: a first word naming python, then '-m sorted_jax.train'. Anchored at the
# start, so it never matches the remote shell ('bash -c ...') whose command line mentions it.
HOME_SIGN='~'  # the remote home, in messages
PATTERN='^[^ ]*python[^ ]* -m sorted_jax[.]train( |$)'
RDIR=$(q "$REMOTE_DIR")
RLOG=$(q "$LOG")

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  run gcloud "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" \
    ${SSH_ARGS[@]+"${SSH_ARGS[@]}"} --command="$2"
}

remote_path() {  # how a path relative to --remote-dir reads from the remote home (for messages)
  if [[ $1 == /* ]]; then
    printf '%s' "$1"
  elif [[ $REMOTE_DIR == /* ]]; then
    printf '%s' "$REMOTE_DIR/$1"
  else
    printf '%s' "$HOME_SIGN/$REMOTE_DIR/$1"
  fi
}

is_git_url() {
  [[ $1 == *://* || $1 == git@*:* ]]
}

# ------------------------------------------------------------------------------------------------
# commands

cmd_create() {
  local extra=()
  if [[ $SPOT == 1 ]]; then extra+=(--spot); fi
  if [[ $PREEMPTIBLE == 1 ]]; then extra+=(--preemptible); fi
  run gcloud "${TPU[@]}" create "$NAME" --zone="$ZONE" --accelerator-type="$TYPE" \
    --version="$RUNTIME" --project="$PROJECT" ${extra[@]+"${extra[@]}"}
}

cmd_setup() {
  local fetch install
  # uv makes the venv: the TPU images' Python is 3.10 and jax>=0.10 needs >= 3.11 (uv fetches a
  # managed CPython when the system has none of that version). "jax[tpu]" and the package are
  # resolved together so they agree on the jax version.
  install="cd $RDIR"
  install+=" && { python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet --user --upgrade uv; }"
  install+=" && { [ -x .venv/bin/python ] || python3 -m uv venv --python $(q "$PY_VERSION") .venv; }"
  install+=" && python3 -m uv pip install --python .venv/bin/python --upgrade 'jax[tpu]' -e ."
  install+=" && .venv/bin/python -c 'import jax, sorted_jax; print(\"sorted_jax ready, jax\", jax.__version__)'"

  if is_git_url "$REPO"; then
    fetch="set -e; [ -d $RDIR/.git ] || git clone --quiet $(q "$REPO") $RDIR"
    fetch+="; git -C $RDIR fetch --quiet $(q "$REPO") $(q "${REF:-HEAD}")"
    fetch+="; git -C $RDIR checkout --quiet --force FETCH_HEAD"
    ssh_workers all "$fetch; $install"
    return
  fi
  [[ -z $REF ]] || die "--ref is for a git URL --repo; a local --repo is copied as it is"
  [[ -d $REPO ]] || die "--repo '$REPO' is neither a directory nor a git URL"
  [[ -f $REPO/pyproject.toml ]] || die "--repo '$REPO' has no pyproject.toml: not a sorted_jax checkout"

  local tgz remote_tgz=sorted_jax-src.tgz
  tgz="${TMPDIR:-/tmp}/sorted_jax-src.$$.tgz"
  if [[ $DRY_RUN != 1 ]]; then
    trap 'rm -f "$tgz"' EXIT
  fi
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    local deleted
    deleted=$(git -C "$REPO" ls-files --deleted)
    [[ -z $deleted ]] || die "tracked files are deleted in '$REPO' but not in git (git rm them" \
      "or restore them): $(echo "$deleted" | tr '\n' ' ')"
    printf '+ %s | %s\n' "$(qjoin git -C "$REPO" ls-files -z --cached --others --exclude-standard)" \
      "$(qjoin tar -C "$REPO" --null -T - -czf "$tgz")"
    if [[ $DRY_RUN != 1 ]]; then
      git -C "$REPO" ls-files -z --cached --others --exclude-standard |
        tar -C "$REPO" --null -T - -czf "$tgz"
    fi
  else
    run tar -C "$REPO" -czf "$tgz" --exclude=.git --exclude=.venv --exclude=__pycache__ \
      --exclude=runs .
  fi
  run gcloud "${TPU[@]}" scp "$tgz" "$NAME:$remote_tgz" "${WHERE[@]}" --worker=all \
    ${SSH_ARGS[@]+"${SSH_ARGS[@]}"}
  fetch="set -e; mkdir -p $RDIR && tar -xzf $remote_tgz -C $RDIR && rm -f $remote_tgz"
  ssh_workers all "$fetch; $install"
}

cmd_train() {
  require WORKDIR "the workdir" "--workdir=DIR" "SORTED_JAX_WORKDIR" "/mnt/YOUR_SHARED_DIR/sorted_jax/run"
  if [[ $WORKDIR == *://* ]]; then
    die "workdir '$WORKDIR' is a URL; sorted_jax writes through the filesystem. Mount the bucket on every worker (e.g. gcsfuse --implicit-dirs BUCKET /mnt/BUCKET) and pass --workdir=/mnt/BUCKET/PATH"
  fi
  if [[ $WORKDIR != /* ]]; then
    note "workdir '$WORKDIR' is relative: it is $(remote_path "$WORKDIR") on each worker"
  fi
  local argv=(--config="$CONFIG" --workdir="$WORKDIR" --config.distributed.enabled=True)
  argv+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  local launch="nohup env PYTHONUNBUFFERED=1"
  if ((${#ENVS[@]})); then launch+=" $(qjoin "${ENVS[@]}")"; fi
  launch+=" .venv/bin/python -m sorted_jax.train $(qjoin "${argv[@]}")"
  local c="cd $RDIR"
  c+=" && if pgrep -f $(q "$PATTERN") >/dev/null; then"
  c+=" echo \"\$(hostname): sorted_jax.train is already running; stop it first\" >&2; exit 1; fi"
  c+=" && echo \"=== \$(date -u +%FT%TZ) \$(hostname): sorted_jax.train start\" >> $RLOG"
  c+=" && { $launch >> $RLOG 2>&1 < /dev/null & }"
  c+=" && echo \"\$(hostname): started pid \$!, log\" $(q "$(remote_path "$LOG")")"
  ssh_workers all "$c"
}

cmd_tail() {
  ssh_workers "$WORKER" "cd $RDIR && tail -n 100 -F $RLOG"
}

cmd_status() {
  ssh_workers all "pgrep -af $(q "$PATTERN") || echo \"\$(hostname): sorted_jax.train is not running\""
}

cmd_stop() {
  local p
  p=$(q "$PATTERN")
  local c="if pkill -TERM -f $p; then"
  c+=" echo \"\$(hostname): sent SIGTERM to sorted_jax.train; it saves a checkpoint and exits\";"
  if [[ $STOP_TIMEOUT == 0 ]]; then
    c+=" else echo \"\$(hostname): sorted_jax.train is not running\"; fi"
    ssh_workers all "$c"
    return
  fi
  c+=" i=0; while pgrep -f $p >/dev/null; do"
  c+=" if [ \$i -ge $STOP_TIMEOUT ]; then"
  c+=" echo \"\$(hostname): still running after ${STOP_TIMEOUT}s\" >&2; exit 1; fi;"
  c+=" i=\$((i + 1)); sleep 1; done; echo \"\$(hostname): stopped\";"
  c+=" else echo \"\$(hostname): sorted_jax.train is not running\"; fi"
  ssh_workers all "$c"
}

cmd_delete() {
  run gcloud "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

"cmd_$CMD"
