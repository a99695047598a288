#!/usr/bin/env bash
# One short, bounded GPU session: environment probe + smoke check, featurization throughput
# against MadryLab's traker on the GPU (benchmarks/featurize.py --torch-device cuda), and the
# embedded demo end to end, timed. Every step has its own time limit inside a global budget, so
# the session ends on time and keeps what finished; outputs go to OUT_DIR as text files.
#
#   bash benchmarks/gpu_suite.sh OUT_DIR
#
# Environment (all optional):
#   PYTHON          interpreter (default python3); it needs a CUDA jaxlib and torch with CUDA.
#   EXTRA_PYTHONPATH  added to PYTHONPATH after the repository (e.g. a folder holding ml_collections, diffusers,
#                   traker when they are not installed).
#   PIN_PYTHONPATH  a folder with pinned flax / optax / orbax-checkpoint, tried only when the
#                   smoke check fails with the installed ones.
#   BUDGET_S        total seconds for the whole suite (default 530).
#   STEPS           which steps, in order (default "smoke featurize demo").
#   FEATURIZE_ARGS  extra arguments of featurize.py; TORCH_DEVICE its traker device (cuda).
#
# What the steps cost on an H200 host (16 cores; BENCHMARKS.md, 2026-11-26): smoke 120 s (it
# compiles the same program for the GPU and for the CPU reference); featurize about 20-65 s per
# row, almost all of it XLA compilation (7 rows: ~6-7 min); the demo > 2 min (fine-tuning and
# generation alone 85 s). A 15-minute device lease holds the probe plus one of featurize / demo.
set -u -o pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
start=$(date +%s)
deadline=$((start + ${BUDGET_S:-530}))
work=$(mktemp -d)

source "$repo/benchmarks/gpu_step.sh"  # step NAME CAP_S LOG CMD...

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cpus: $(nproc)"; git -C "$repo" rev-parse --short HEAD 2>/dev/null || cat "$repo/COMMIT" 2>/dev/null || true
  $py -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$out/env.txt"

want() { case " ${STEPS:-smoke featurize demo} " in *" $1 "*) return 0;; esac; return 1; }

if want smoke && ! step smoke 150 "$out/env.txt" $py benchmarks/gpu_smoke.py && [ -n "${PIN_PYTHONPATH:-}" ]; then
  export PYTHONPATH="$PIN_PYTHONPATH:$PYTHONPATH"
  step smoke-pinned 150 "$out/env.txt" $py benchmarks/gpu_smoke.py
fi

want featurize && step featurize 280 "$out/featurize.txt" $py benchmarks/featurize.py --torch-device "${TORCH_DEVICE:-cuda}" \
  --batches 50 --proj-batch 0 --skip-factored-table --dir "$work/featurize" ${FEATURIZE_ARGS:-}

want demo && step demo 400 "$out/demo.txt" $py -m jaxattrib.cli demo --run-dir "$work/demo" --no-progress
for f in attribution.json cgi_dm.json; do
  [ -f "$work/demo/results/$f" ] && cp "$work/demo/results/$f" "$out/demo_$f"
done
echo "## suite: $(( $(date +%s) - start )) s" | tee -a "$out/env.txt"
