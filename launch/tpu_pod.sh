#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU VM pod slice (one process per host):
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh [--dry-run] [featurize|train|attribute] CONFIG \
#       [--set KEY=VALUE ...]
#
# = gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all --command "cd $REMOTE_DIR &&
#   $REMOTE_PYTHON -m jaxattrib.launch CMD CONFIG --distributed on ..."
# jax.distributed.initialize() finds the pod's workers through the TPU metadata server
# ('--distributed on'); every worker must hold the same checkout of the repository at
# REMOTE_DIR (default: jaxattrib, relative to the remote home) and its venv.
# Environment: TPU_NAME, ZONE (required); PROJECT (optional gcloud --project); REMOTE_DIR;
# REMOTE_PYTHON (default: .venv/bin/python inside REMOTE_DIR); PYTHON (local interpreter for
# the config check, default: the repository's .venv, else python3); GCLOUD (default gcloud).
# --dry-run validates the config locally and prints the gcloud command without running it.
# Put out_dir on storage every host can reach (e.g. a GCS FUSE mount): each process writes
# its share of the feature-store chunks there (docs/scaling.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
parse_launch_args "${BASH_SOURCE[0]}" '2,18p' "$@"
if [ ${#POS[@]} -ne 1 ]; then
  echo "usage: TPU_NAME=... ZONE=... launch/tpu_pod.sh [--dry-run] [featurize|train|attribute] CONFIG [--set KEY=VALUE ...]" >&2
  exit 2
fi
CONFIG="${POS[0]}"
if [ -z "${TPU_NAME:-}" ]; then echo "tpu_pod.sh: set TPU_NAME to the TPU VM (pod slice) name" >&2; exit 2; fi
if [ -z "${ZONE:-}" ]; then echo "tpu_pod.sh: set ZONE to the zone of the TPU" >&2; exit 2; fi
REMOTE_DIR="${REMOTE_DIR:-jaxattrib}"
REMOTE_PYTHON="${REMOTE_PYTHON:-.venv/bin/python}"
GCLOUD="${GCLOUD:-gcloud}"
default_python "$ROOT"
ARGS=("$CMD" "$CONFIG" "${EXTRA[@]+"${EXTRA[@]}"}")

# validate here first (same config everywhere; fails fast with a clear message)
if [ "$DRY" = 1 ]; then
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m jaxattrib.launch "${ARGS[@]}" --dry-run
else
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m jaxattrib.launch "${ARGS[@]}" --dry-run >/dev/null
fi

REMOTE="cd $(printf '%q' "$REMOTE_DIR") && PYTHONPATH=. $(printf '%q' "$REMOTE_PYTHON") -m jaxattrib.launch"
for a in "${ARGS[@]}"; do REMOTE+=" $(printf '%q' "$a")"; done
REMOTE+=" --distributed on"
GC=("$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE")
[ -n "${PROJECT:-}" ] && GC+=(--project "$PROJECT")
GC+=(--worker=all --command "$REMOTE")

if [ "$DRY" = 1 ]; then
  # the remote command single-quoted as one word, the rest shell-quoted
  printf '%q ' "${GC[@]:0:${#GC[@]}-1}"; printf "'%s'\n" "${REMOTE//\'/\'\\\'\'}"
  exit 0
fi
exec "${GC[@]}"
