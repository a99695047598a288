#!/usr/bin/env bash
# SD-1.5-sized benchmarks (benchmarks/sd_scale.py) on a lent GPU, in bounded parts: each call
# of this script runs one PART in at most BUDGET_S seconds (default 470 s, under the device
# tool's 8-minute rule) and writes its table and logs under OUT_DIR.
#
#   bash benchmarks/gpu_sd_scale.sh PART OUT_DIR [--smoke]
#
# PART (each part holds its own peer row, so its ratios compare rows of one run on one card):
#   env      versions (jax / torch / CUDA / GPU seen), install the carried packages, build
#            trak's fast_jl from the carried source (timed), then sd_scale.py --smoke on the GPU
#   ft-bf16  ft-jax-bf16, ft-jax-bf16-remat, ft-torch-bf16      (targets: ≥ 1.0× torch, MFU ≥ 35 %)
#   ft-fp32  ft-jax-fp32, ft-jax-fp32-remat, ft-torch-bf16
#   feat     feat-trak, feat-jax-factored, limit-jax-grad, limit-jax-fwd   (≥ 3× trak, ≤ 1.5× grad)
#   feat2    feat-trak, feat-jax-rademacher, feat-jax-sjlt, limit-jax-grad
# Every part first makes sure the environment is ready (packages installed, fast_jl built): on a
# warm machine that is a no-op, on a fresh one it repeats the env steps (the build time is
# logged again). A 15-minute lease holds env + about two parts; run ft-bf16 and feat first.
#
# --smoke: the same parts at sd_scale.py's tiny shape (on a machine without a GPU the peers run
# on the CPU and fast_jl is not built): the CPU check of this script.
#
# What must travel (device tool: carry [".whl"]; .whl/ is git-ignored), prepared on a machine
# with PyPI (the device machine reaches nothing):
#   mkdir -p .whl && cd .whl
#   pip download --no-deps diffusers==0.42.1 ml_collections==1.1.0 importlib_metadata zipp
#   pip download --no-deps --no-binary :all: traker==0.3.2
#   git -C <a clone of MadryLab/trak> archive HEAD fast_jl | tar -x   # fast_jl 0.1.3's source
#   (pip cannot download fast_jl's sdist without CUDA: its setup.py asks for CUDA_HOME)
# The device image already has jax (CUDA), flax, optax, orbax, torch, peft and typer.
#
# Environment (optional): PYTHON (default python3), BUDGET_S, SITE (install folder, default
# /tmp/sd_scale_site), WORK (weights folder, default /tmp/sd_scale_work), MODEL (sd15 | sd21),
# FT_BATCH (default 4), FEAT_BATCH (1), K (10), ITERS (10), EXTRA_ARGS (more sd_scale.py args),
# STEP_S / SMOKE_S (cap of the rows step, default 460 s / of the env smoke step, 150 s).
set -u -o pipefail
part=${1:?usage: gpu_sd_scale.sh PART OUT_DIR [--smoke]}
out=${2:?usage: gpu_sd_scale.sh PART OUT_DIR [--smoke]}
smoke=${3:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
site=${SITE:-/tmp/sd_scale_site}
work=${WORK:-/tmp/sd_scale_work}
mkdir -p "$site" "$work"
export PYTHONPATH="$repo:$site" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
start=$(date +%s)
deadline=$((start + ${BUDGET_S:-470}))
gpu=0
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && gpu=1
dev=cpu; [ "$gpu" = 1 ] && dev=cuda
log="$out/$part.log"

source "$repo/benchmarks/gpu_step.sh"  # step NAME CAP_S LOG CMD...

ensure_env() {
  { date -u; echo "part $part, smoke '${smoke}', gpu $gpu, cpus $(nproc)"
    [ "$gpu" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    command -v nvcc >/dev/null && nvcc --version | tail -2
    git -C "$repo" rev-parse --short HEAD 2>/dev/null || true
  } 2>&1 | tee -a "$out/env.txt"
  # carried pure-Python packages (only those missing here)
  if [ -d .whl ] && ! $py -c 'import diffusers, trak, ml_collections' 2>/dev/null; then
    local t0=$(date +%s)
    $py -m pip install -q --no-index --no-deps --no-compile --no-build-isolation \
      --target "$site" .whl/*.whl .whl/traker-*.tar.gz 2>&1 | tail -3 | tee -a "$out/env.txt"
    echo "installed carried packages into $site in $(( $(date +%s) - t0 )) s" | tee -a "$out/env.txt"
  fi
  # trak's CUDA projector: build fast_jl from the carried source (GPU only)
  if [ "$gpu" = 1 ] && ! $py -c 'import torch, fast_jl' 2>/dev/null; then
    if [ -d .whl/fast_jl ]; then
      export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
      local t0=$(date +%s)
      (cd .whl/fast_jl && MAX_JOBS=$(nproc) timeout 400 $py -m pip install -q --no-index \
        --no-deps --no-build-isolation --target "$site" . ) > "$out/fast_jl_build.log" 2>&1
      local rc=$?
      echo "fast_jl build: exit $rc after $(( $(date +%s) - t0 )) s (log fast_jl_build.log)" \
        | tee -a "$out/env.txt"
    else
      echo "fast_jl: no carried source in .whl/fast_jl" | tee -a "$out/env.txt"
    fi
  fi
  $py - <<'EOF' 2>&1 | tee -a "$out/env.txt"
import importlib
for m in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "peft", "trak"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING:", e)
import jax, torch
print("jax devices:", jax.devices())
print("torch cuda:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
try:
    import fast_jl  # noqa: F401
    print("fast_jl: imports (traker will use CudaProjector on cuda)")
except Exception as e:  # noqa: BLE001
    print("fast_jl: NOT available (traker falls back to BasicProjector):", e)
EOF
}

ensure_env
common=(--dir "$work" --torch-device "$dev" --model "${MODEL:-sd15}" --iters "${ITERS:-10}"
        --ft-batch "${FT_BATCH:-4}" --feat-batch "${FEAT_BATCH:-1}" --K "${K:-10}"
        --row-timeout 300)
[ -n "$smoke" ] && common+=(--smoke --dir "$work/smoke")
run_rows() { step "$part" "${STEP_S:-460}" "$log" $py benchmarks/sd_scale.py "${common[@]}" --rows "$1" \
  --out "$out/table_$part" ${EXTRA_ARGS:-}; }
case "$part" in
  env) step smoke "${SMOKE_S:-150}" "$log" $py benchmarks/sd_scale.py --smoke --torch-device "$dev" \
         --dir "$work/smoke" --out "$out/table_smoke" ;;
  ft-bf16) run_rows ft-jax-bf16,ft-jax-bf16-remat,ft-torch-bf16 ;;
  ft-fp32) run_rows ft-jax-fp32,ft-jax-fp32-remat,ft-torch-bf16 ;;
  feat) run_rows feat-trak,feat-jax-factored,limit-jax-grad,limit-jax-fwd ;;
  feat2) run_rows feat-trak,feat-jax-rademacher,feat-jax-sjlt,limit-jax-grad ;;
  *) echo "unknown PART $part (env | ft-bf16 | ft-fp32 | feat | feat2)"; exit 2 ;;
esac
rc=$?
echo "## $part: $(( $(date +%s) - start )) s in all, exit $rc" | tee -a "$log"
exit $rc
