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
# A pip configured with a partial local mirror as an extra index (file:// URLs) warns once per
# package the mirror lacks ("Location 'file:///...' is ignored: it is neither a file nor a
# directory"), ~90 lines that say nothing about this install; only those lines are dropped,
# every other warning and error of pip is shown.
pip_q() {
  "$VENV/bin/python" -m pip "$@" 2> >(grep -v -E "^WARNING: Location 'file://[^']*' is ignored: it is neither a file nor a directory\.$" >&2)
}
pip_q install -q --upgrade pip
pip_q install -q -e ".[test]"
