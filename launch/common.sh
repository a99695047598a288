# Sourced by local.sh, tpu_pod.sh and slurm_gpu.sbatch: the argument parsing and interpreter
# default they share. Not meant to be run.

# parse_launch_args SCRIPT HELP_RANGE ARGS... sets DRY (0/1), CMD (featurize|train|attribute,
# default featurize), POS (remaining positionals) and EXTRA (--set KEY=VALUE pairs and the
# options --queries DIR, --journey-step N, --chunk-size N, --no-progress, passed on as given).
# -h/--help prints lines HELP_RANGE (a sed range such as '2,14p') of SCRIPT and exits; with
# HELP_RANGE empty they are ordinary positionals.
parse_launch_args() {
  local script="$1" help="$2"
  shift 2
  DRY=0
  CMD=featurize
  POS=()
  EXTRA=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY=1; shift ;;
      --set) EXTRA+=("--set" "$2"); shift 2 ;;
      --set=*) EXTRA+=("--set" "${1#--set=}"); shift ;;
      --queries|--journey-step|--chunk-size) EXTRA+=("$1" "$2"); shift 2 ;;
      --queries=*|--journey-step=*|--chunk-size=*|--no-progress) EXTRA+=("$1"); shift ;;
      -h|--help)
        if [ -n "$help" ]; then sed -n "$help" "$script"; exit 0; fi
        POS+=("$1"); shift ;;
      *) POS+=("$1"); shift ;;
    esac
  done
  if [ ${#POS[@]} -gt 0 ] && { [ "${POS[0]}" = featurize ] || [ "${POS[0]}" = train ] ||
                               [ "${POS[0]}" = attribute ]; }; then
    CMD="${POS[0]}"; POS=("${POS[@]:1}")
  fi
}

# default_python REPO: PYTHON, unless set, = REPO's .venv interpreter if present, else python3.
default_python() {
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$1/.venv/bin/python" ]; then PYTHON="$1/.venv/bin/python"; else PYTHON=python3; fi
  fi
}
