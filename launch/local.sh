#!/usr/bin/env bash
# Starts NUM_PROCESSES local JAX processes on loopback (CPU devices) running the same command:
#
#   launch/local.sh [--dry-run] [featurize|train|attribute] CONFIG [NUM_PROCESSES] \
#       [--set KEY=VALUE ...] [--queries DIR]
#
# Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT, JAX_NUM_PROCESSES, JAX_PROCESS_ID
# (read by jaxattrib.parallel.initialize_distributed) and DEVICES_PER_PROCESS emulated CPU
# devices; collectives use gloo. The command defaults to 'featurize', NUM_PROCESSES to 2.
# Environment: PYTHON (default: the repository's .venv, else python3), PORT (default: a free
# port), DEVICES_PER_PROCESS (default 1), LOG_DIR (default: none, output goes to the terminal
# prefixed by the process id).
# --dry-run validates the config (python -m jaxattrib.launch ... --dry-run) and prints the
# commands without starting anything. When a process fails the others are stopped (as srun
# --kill-on-bad-exit does) and the exit status is its status; a rerun resumes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
parse_launch_args "${BASH_SOURCE[0]}" '2,15p' "$@"
if [ ${#POS[@]} -lt 1 ] || [ ${#POS[@]} -gt 2 ]; then
  echo "usage: launch/local.sh [--dry-run] [featurize|train|attribute] CONFIG [NUM_PROCESSES] [--set KEY=VALUE ...]" >&2
  exit 2
fi
CONFIG="${POS[0]}"
NPROC="${POS[1]:-2}"
case "$NPROC" in ''|*[!0-9]*) echo "local.sh: NUM_PROCESSES must be a positive integer, got '$NPROC'" >&2; exit 2 ;; esac
[ "$NPROC" -ge 1 ] || { echo "local.sh: NUM_PROCESSES must be >= 1" >&2; exit 2; }
default_python "$ROOT"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
if [ -z "${PORT:-}" ]; then
  PORT="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

proc_env() {  # the environment of process $1
  echo "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
       "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT" \
       "JAX_NUM_PROCESSES=$NPROC JAX_PROCESS_ID=$1"
}
ARGS=("$CMD" "$CONFIG" "${EXTRA[@]+"${EXTRA[@]}"}")

if [ "$DRY" = 1 ]; then
  "$PYTHON" -m jaxattrib.launch "${ARGS[@]}" --dry-run
  for ((i = 0; i < NPROC; i++)); do
    echo "env $(proc_env "$i") $PYTHON -m jaxattrib.launch ${ARGS[*]}"
  done
  exit 0
fi

PIDS=()
# SIGTERM, then SIGKILL after 5 s (jax.distributed handles SIGTERM as a preemption notice and
# may not exit; the stores' writes are atomic, so a hard stop loses at most the chunks in work)
cleanup() {
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
  for _ in 1 2 3 4 5; do
    alive=0
    for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 1
  done
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup INT TERM
for ((i = 0; i < NPROC; i++)); do
  if [ -n "${LOG_DIR:-}" ]; then
    mkdir -p "$LOG_DIR"
    env $(proc_env "$i") "$PYTHON" -m jaxattrib.launch "${ARGS[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else  # $! is the python process (not the prefixing sed), so its status is waited for
    env $(proc_env "$i") "$PYTHON" -m jaxattrib.launch "${ARGS[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
  fi
  PIDS+=("$!")
done
STATUS=0
LEFT=("${PIDS[@]}")
while [ ${#LEFT[@]} -gt 0 ]; do  # wait -n -p: bash >= 5.1
  rc=0
  DONE=""
  wait -n -p DONE "${LEFT[@]}" || rc=$?
  [ -n "$DONE" ] || break
  NEW=()
  for p in "${LEFT[@]}"; do [ "$p" = "$DONE" ] || NEW+=("$p"); done
  LEFT=("${NEW[@]+"${NEW[@]}"}")
  if [ "$rc" != 0 ] && [ "$STATUS" = 0 ]; then
    STATUS=$rc
    echo "local.sh: process pid $DONE exited with status $rc; stopping the others" >&2
    cleanup
  fi
done
exit "$STATUS"
