#!/usr/bin/env bash
# Creates the virtual environment and installs jaxattrib with its test extra.
# torch is pinned to the CPU build (2.13.0) so pip takes the local CPU wheel instead of a
# multi-GB CUDA build; it is only a parity reference for the tests.
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
