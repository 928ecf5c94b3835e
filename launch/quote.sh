# Shell quoting shared by launch/tpu_pod.sh and launch/gpu_local.sh (sourced, not run).
# gpu_slurm.sbatch keeps its own copy: sbatch runs a spooled copy of the script, away from
# this directory.
# shellcheck shell=bash

# One word, shell-quoted only where it needs it (POSIX single quotes: bash, dash, zsh agree);
# in '--flag=value' only the value is quoted.
q() {
  local s=$1 safe='*[!A-Za-z0-9_./:=@%+,-]*'
  # shellcheck disable=SC2053  # $safe is a pattern on purpose
  if [[ -n $s && $s != $safe ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9][A-Za-z0-9_.-]*=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    q "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Words joined into one shell-quoted command line.
qjoin() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(q "$w")"
  done
  printf '%s' "$out"
}
