#!/usr/bin/env bash
# Screenshots a local HTML report with headless Chromium (no network, throwaway profile).
#
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]
#
# Needs Debian's `chromium` package (apt-get install -y chromium); set CHROMIUM=/path to use
# another binary. Exits non-zero if Chromium fails or writes no PNG.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
  exit 2
fi
REPORT=$1
OUT=$2
SIZE=${3:-1200,1600}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$CHROMIUM" ]; then
  echo "$0: chromium not found (apt-get install -y chromium)" >&2
  exit 3
fi
if [ ! -f "$REPORT" ]; then
  echo "$0: $REPORT: no such file" >&2
  exit 2
fi
ABS_REPORT=$(realpath "$REPORT")
ABS_OUT=$(realpath -m "$OUT")
PROFILE=$(mktemp -d)
trap 'rm -rf "$PROFILE"' EXIT
rm -f "$ABS_OUT"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --disable-dev-shm-usage --hide-scrollbars --user-data-dir="$PROFILE" \
  --screenshot="$ABS_OUT" --window-size="$SIZE" "file://$ABS_REPORT" \
  >"$PROFILE/chromium.log" 2>&1 || { cat "$PROFILE/chromium.log" >&2; exit 1; }
if [ ! -s "$ABS_OUT" ]; then
  cat "$PROFILE/chromium.log" >&2
  echo "$0: chromium wrote no screenshot to $ABS_OUT" >&2
  exit 1
fi
echo "$ABS_OUT"
