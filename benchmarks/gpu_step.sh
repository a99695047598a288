# Sourced by benchmarks/gpu_suite.sh and benchmarks/gpu_sd_scale.sh (needs $deadline, epoch s).
# step NAME CAP_S LOG CMD...: runs CMD under min(CAP_S, time left), tee'd to LOG, and logs wall time.
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$((deadline - $(date +%s)))
  local lim=$((cap < left ? cap : left))
  if [ "$lim" -le 5 ]; then echo "## $name: skipped, budget spent" | tee -a "$log"; return 124; fi
  echo "## $name (limit ${lim} s): $*" | tee -a "$log"
  local t0=$(date +%s)
  timeout -k 10 "$lim" "$@" 2>&1 | tee -a "$log"
  local rc=$?
  echo "## $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$log"
  return $rc
}
