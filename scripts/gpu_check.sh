#!/usr/bin/env bash
# The GPU check: real Unsloth GPU path + opensloth patches on one CUDA device, in one command.
#
#   bash scripts/gpu_wheels.sh                     # on a machine with a registry: fills .whl/
#   bash scripts/gpu_check.sh OUT_DIR              # on the CUDA machine (<= 380 s: a 365 s budget after the install)
#   bash scripts/gpu_check.sh OUT_DIR --dry-run    # on CPU: the same stages on the tiny model
#
# Without --dry-run it first installs .whl/*.whl (no index, no deps) into a temporary --target
# folder put first on PYTHONPATH, next to the machine's own torch/transformers/accelerate; with
# --dry-run it uses the current interpreter's packages. Then scripts/gpu_check.py runs the stages
# (env; two_ranks and dpo alongside model, sft_throughput's warm-ups; then sft_throughput's measured
# runs, packing, four_bit), each with its own timeout inside a 365 s budget, and writes
# OUT_DIR/results.json, OUT_DIR/results.md and OUT_DIR/gpu_check.log as stages finish.
# Extra arguments go to scripts/gpu_check.py (e.g. --stages env,model,sft_throughput --budget 300).
# Exit status: 0 all checks passed, 1 a check failed or timed out, 2 bad usage / no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh OUT_DIR [--dry-run] [gpu_check.py options]" >&2
  exit 2
fi
OUT=$1; shift
DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT"

if [ "$DRY" = 0 ]; then
  SITE=${GPU_CHECK_SITE:-$(mktemp -d /tmp/opensloth_site.XXXXXX)}
  if ls .whl/*.whl >/dev/null 2>&1; then
    t0=$(date +%s)
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" .whl/*.whl 2>&1 | grep -v "Running pip as the 'root' user" \
      | tee -a "$OUT/gpu_check.log"
    if [ "${PIPESTATUS[0]}" != 0 ]; then
      echo "gpu_check: installing .whl/*.whl into $SITE failed" | tee -a "$OUT/gpu_check.log" >&2
      exit 1
    fi
    echo "[gpu_check] installed $(ls .whl/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - t0 ))s" \
      | tee -a "$OUT/gpu_check.log"
  else
    echo "[gpu_check] no .whl/*.whl: using the packages already installed" | tee -a "$OUT/gpu_check.log"
  fi
  export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  # Compiled kernels shared by the check's processes (the 2-rank run reuses the 1-rank run's).
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$SITE/inductor_cache}
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$SITE/triton_cache}
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
# The driver keeps to its own --budget (365 s, dry run 480 s); this outer limit only stops a driver
# that itself hangs (raise GPU_CHECK_TIMEOUT along with --budget).
LIMIT=${GPU_CHECK_TIMEOUT:-$( [ "$DRY" = 1 ] && echo 540 || echo 375 )}
timeout -k 10 "$LIMIT" "$PY" -u scripts/gpu_check.py --out "$OUT" "$@"
